"""Breaker state shared through Redis, for operators: see every instance's state, and force
a breaker open or closed across the fleet.

The breaker's decisions stay local and lock-free: the store never sits on the call path. A
background thread publishes each attached breaker's state (at once on a change, and as a
heartbeat every ``interval``) and applies the operator's override when it changes. While
Redis is away the breakers work as before, and the store logs that once.

Keys (``prefix`` default ``resilience:breaker``):

* ``{prefix}:state:{name}:{instance}``: a hash (state, since, trips, updated), expiring
  after three heartbeats, so an instance that stopped disappears.
* ``{prefix}:force:{name}``: ``open`` or ``closed`` while an operator forces it, or
  ``open until <ms>`` for a timed force-open (``force(name, "open", duration=...)``):
  ``<ms>`` is its end in Redis ``TIME`` milliseconds, so hosts with skewed clocks agree.
  Each instance forces its breaker open for the time left, and when that runs out the
  breaker moves to half-open by itself and probes; the key outlives the end by
  ``FORCE_GRACE`` seconds, so that no instance mistakes its expiry for a lift.

What the store does not carry: a breaker's own ``force_open()``, ``half_open()`` and
``reset()`` calls stay local (as before, the store only applies what changes in Redis).
``half_open()`` is a one-off nudge, and the override key is a standing order that an
instance starting later obeys too; probing is no standing order (a process starting an
hour later must not start in half-open). To make the fleet probe, force it open with a
duration: when the time is up every instance is half-open.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import uuid
import weakref
from typing import Any, Final

import redis

from resilience import _clock
from resilience._checks import positive_seconds
from resilience.breaker.breaker import CircuitBreaker
from resilience.breaker.policy import BreakerMode, StateChanged
from resilience.remote import OUTAGE_ERRORS, budgeted, check_timeout

__all__ = ["FORCE_GRACE", "FORCE_VALUES", "RedisBreakerStore"]

log = logging.getLogger("resilience")

FORCE_VALUES: Final = ("open", "closed")
#: Seconds a timed override's key outlives its end (see the module's docstring).
FORCE_GRACE: Final = 60.0
_TIMED: Final = "open until "


def _parse(raw: str | None, now_ms: int) -> tuple[str | None, int | None]:
    """An override as (force, end in Redis ms or None if untimed); (None, None) when
    there is none, it is malformed, or its time is up."""
    if raw in FORCE_VALUES:
        return raw, None
    if raw is not None and raw.startswith(_TIMED):
        try:
            until = int(raw[len(_TIMED) :])
        except ValueError:
            return None, None
        return ("open", until) if until > now_ms else (None, None)
    return None, None


def _redis_ms(reply: Any) -> int:
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


class RedisBreakerStore:
    """Publishes breaker states to Redis and applies overrides set there (sync client)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "resilience:breaker",
        interval: float = 1.0,
        timeout: float = 0.5,
    ) -> None:
        if not isinstance(client, redis.Redis):
            raise TypeError(
                f"client must be a sync redis.Redis (the store runs in a thread), "
                f"got {type(client).__name__}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.prefix = prefix
        self.interval = check_timeout(interval)
        self._client = budgeted(client, check_timeout(timeout))
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._breakers: weakref.WeakValueDictionary[str, CircuitBreaker] = (
            weakref.WeakValueDictionary()
        )
        # Per breaker, the override last applied: the raw value while in force, else None.
        self._applied: dict[str, str | None] = {}
        self._syncing = threading.Lock()  # the thread's sync and a caller's take turns
        self._since: dict[str, float] = {}
        self._wake: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._healthy = True
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisBreakerStore(prefix={self.prefix!r})"

    def state_key(self, name: str, instance: str | None = None) -> str:
        return f"{self.prefix}:state:{name}:{instance or self.instance}"

    def force_key(self, name: str) -> str:
        return f"{self.prefix}:force:{name}"

    def attach(self, breaker: CircuitBreaker) -> None:
        """Share ``breaker``'s state (``CircuitBreaker(store=...)`` calls this)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._breakers[breaker.name] = breaker
            # A breaker made again under a name obeys the standing override as well.
            self._applied.pop(breaker.name, None)
            self._since[breaker.name] = _clock.SYSTEM_CLOCK.time()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="resilience-breaker-store", daemon=True
                )
                self._thread.start()
        name = breaker.name

        def changed(event: object) -> None:
            if isinstance(event, StateChanged):
                self._since[name] = _clock.SYSTEM_CLOCK.time()
                self._wake.put(name)

        # State changes only: the breaker keeps its lock-free path.
        breaker.add_listener(changed, only=(StateChanged,))
        self._wake.put(name)

    def close(self) -> None:
        """Stop the thread and delete this instance's state keys."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.put(None)
        if thread is not None:
            thread.join(timeout=5.0)
        try:
            names = list(self._breakers)
            if names:
                self._client.delete(*(self.state_key(n) for n in names))
        except OUTAGE_ERRORS:
            pass
        self._client.close()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._wake.get(timeout=self.interval)
            except queue.Empty:
                first = ""
            if first is None:
                return
            self.sync()

    def sync(self) -> None:
        """Publish every state and apply overrides now (the thread does this each tick)."""
        with self._syncing:
            self._sync()

    def _sync(self) -> None:
        breakers = dict(self._breakers.items())
        if not breakers:
            return
        names = list(breakers)
        try:
            read = self._client.pipeline(transaction=False)
            read.time()  # Redis' clock tells every instance the time left of a timed force
            read.mget([self.force_key(n) for n in names])
            reply, forced = read.execute()
            now_ms = _redis_ms(reply)
            for name, raw in zip(names, forced, strict=True):
                self._apply(breakers[name], raw.decode() if raw else None, now_ms)
            pipe = self._client.pipeline(transaction=False)
            now = _clock.SYSTEM_CLOCK.time()
            for name, breaker in breakers.items():
                stats = breaker.stats()
                key = self.state_key(name)
                pipe.hset(
                    key,
                    mapping={
                        "state": stats.state.value,
                        "mode": stats.mode.value,
                        "since": repr(self._since.get(name, now)),
                        "trips": stats.trips,
                        "retry_after": repr(stats.retry_after),
                        "updated": repr(now),
                    },
                )
                pipe.pexpire(key, int(self.interval * 3000) + 1000)
            pipe.execute()
        except OUTAGE_ERRORS as error:
            if self._healthy:
                self._healthy = False
                log.warning(
                    "resilience breaker store unavailable (%s); breakers go on",
                    error,
                    extra={
                        "resilience_event": "breaker_store.unavailable",
                        "resilience_name": self.prefix,
                        "resilience_from_state": "available",
                        "resilience_to_state": "unavailable",
                        "resilience_error_type": type(error).__name__,
                    },
                )
            return
        if not self._healthy:
            self._healthy = True
            log.warning(
                "resilience breaker store recovered",
                extra={
                    "resilience_event": "breaker_store.recovered",
                    "resilience_name": self.prefix,
                    "resilience_from_state": "unavailable",
                    "resilience_to_state": "available",
                },
            )

    def _apply(self, breaker: CircuitBreaker, raw: str | None, now_ms: int) -> None:
        force, until = _parse(raw, now_ms)
        applied = force and raw
        previous = self._applied.get(breaker.name)
        if previous == applied:
            return
        self._applied[breaker.name] = applied
        if force == "open" and until is not None:
            left = (until - now_ms) / 1000
            breaker.force_open(duration=left)
            what = f"open for {left:.3f}s, then half-open"
        elif force == "open":
            breaker.force_open()
            what = "open"
        elif force == "closed":
            breaker.force_closed()
            what = "closed"
        elif previous is not None and previous.startswith(_TIMED):
            # A timed force-open is no longer in force. Its time ran out (the breaker
            # moves to half-open on its own clock, so nothing to do), or the key was
            # deleted while the breaker is still forced: lifted early, as `auto` does.
            if raw is None and breaker.mode is BreakerMode.FORCED_OPEN:
                breaker.reset()
                what = "lifted"
            else:
                what = "ended"
        else:
            breaker.reset()
            what = "lifted"
        log.warning(
            "resilience breaker %r: operator override %s",
            breaker.name,
            what,
            extra={
                "resilience_event": "breaker.override",
                "resilience_name": breaker.name,
                "resilience_reason": what,
                "resilience_backend": self.prefix,
            },
        )

    # -- what operators do (the CLI) -----------------------------------------------------

    def force(self, name: str, value: str | None, *, duration: float | None = None) -> None:
        """Force ``name`` open or closed on every instance, or lift it with ``None``.

        ``duration`` (seconds, with ``"open"`` only): every instance forces its breaker
        open until that much time has passed on Redis' clock, then it is half-open and
        probes. Instances starting later within that time join in for the time left.
        """
        if value is not None and value not in FORCE_VALUES:
            raise ValueError(f"value must be 'open', 'closed' or None, got {value!r}")
        if duration is not None and value != "open":
            raise ValueError(f"duration goes with value 'open' only, got value {value!r}")
        if value is None:
            self._client.delete(self.force_key(name))
            return
        if duration is None:
            self._client.set(self.force_key(name), value)  # SET drops a timed one's expiry
            return
        seconds = positive_seconds("duration", duration)
        until = _redis_ms(self._client.time()) + max(1, math.ceil(seconds * 1000))
        grace = math.ceil(FORCE_GRACE * 1000)
        self._client.set(self.force_key(name), f"{_TIMED}{until}", pxat=until + grace)

    def states(self) -> list[dict[str, Any]]:
        """Every instance's published state, with any override, sorted by name."""
        rows = []
        for key in self._client.scan_iter(match=f"{self.prefix}:state:*", count=500):
            # The instance is host:pid:id, so a breaker name may hold colons of its own.
            name, *parts = key.decode()[len(self.prefix) + 7 :].rsplit(":", 3)
            instance = ":".join(parts)
            fields = {k.decode(): v.decode() for k, v in self._client.hgetall(key).items()}
            if fields:
                rows.append({"name": name, "instance": instance, **fields})
        # "force": "open", "closed" or ""; a timed force-open adds "force_until", its end
        # in Redis' clock (Unix seconds). One whose time is up is no override any more.
        forced: dict[str, dict[str, str]] = {}
        now_ms = _redis_ms(self._client.time())
        for key in self._client.scan_iter(match=f"{self.prefix}:force:*", count=500):
            raw = self._client.get(key)
            force, until = _parse(raw.decode() if raw else None, now_ms)
            if force is None:
                continue
            entry = {"force": force}
            if until is not None:
                entry["force_until"] = repr(until / 1000)
            forced[key.decode()[len(self.prefix) + 7 :]] = entry
        for row in rows:
            row.update(forced.pop(row["name"], {"force": ""}))
        rows.extend({"name": n, "instance": "", **v} for n, v in forced.items())
        return sorted(rows, key=lambda r: (r["name"], r["instance"]))
