"""Breaker state shared through Redis, for operators: see every instance's state, and force
a breaker open or closed across the fleet.

The breaker's decisions stay local and lock-free: the store never sits on the call path. A
background thread publishes each attached breaker's state (at once on a change, and as a
heartbeat every ``interval``) and applies the operator's override when it changes. While
Redis is away the breakers work as before, and the store logs that once.

Keys (``prefix`` default ``resilience:breaker``):

* ``{prefix}:state:{name}:{instance}``: a hash (state, since, trips, updated), expiring
  after three heartbeats, so an instance that stopped disappears.
* ``{prefix}:force:{name}``: ``open`` or ``closed`` while an operator forces it.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import uuid
import weakref
from typing import Any, Final

import redis

from resilience import _clock
from resilience.breaker.breaker import CircuitBreaker
from resilience.breaker.policy import StateChanged
from resilience.remote import OUTAGE_ERRORS, budgeted, check_timeout

__all__ = ["FORCE_VALUES", "RedisBreakerStore"]

log = logging.getLogger("resilience")

FORCE_VALUES: Final = ("open", "closed")


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
        self._applied: dict[str, str | None] = {}
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
        breakers = dict(self._breakers.items())
        if not breakers:
            return
        names = list(breakers)
        try:
            forced = self._client.mget([self.force_key(n) for n in names])
            for name, raw in zip(names, forced, strict=True):
                self._apply(breakers[name], raw.decode() if raw else None)
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
                log.warning("resilience breaker store unavailable (%s); breakers go on", error)
            return
        if not self._healthy:
            self._healthy = True
            log.warning("resilience breaker store recovered")

    def _apply(self, breaker: CircuitBreaker, force: str | None) -> None:
        if force not in FORCE_VALUES:
            force = None
        if self._applied.get(breaker.name) == force:
            return
        self._applied[breaker.name] = force
        if force == "open":
            breaker.force_open()
        elif force == "closed":
            breaker.force_closed()
        else:
            breaker.reset()
        log.warning("resilience breaker %r: operator override %s", breaker.name, force or "lifted")

    # -- what operators do (the CLI) -----------------------------------------------------

    def force(self, name: str, value: str | None) -> None:
        """Force ``name`` open or closed on every instance, or lift it with ``None``."""
        if value is None:
            self._client.delete(self.force_key(name))
            return
        if value not in FORCE_VALUES:
            raise ValueError(f"value must be 'open', 'closed' or None, got {value!r}")
        self._client.set(self.force_key(name), value)

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
        forced = {}
        for key in self._client.scan_iter(match=f"{self.prefix}:force:*", count=500):
            raw = self._client.get(key)
            forced[key.decode()[len(self.prefix) + 7 :]] = raw.decode() if raw else ""
        for row in rows:
            row["force"] = forced.pop(row["name"], "")
        rows.extend({"name": n, "instance": "", "force": v} for n, v in forced.items())
        return sorted(rows, key=lambda r: (r["name"], r["instance"]))
