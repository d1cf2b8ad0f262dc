"""What TwoTierCache's sync and async methods share: its state and every decision.

Nothing here performs I/O. Everything after a local miss (reading Redis, the
cross-process lock, the loader, storing, serving stale values) is written once, as a
plan (a generator) that yields the I/O it needs; the shells in ``_async_shell.py`` and
its generated sync twin perform those steps, one with await and one without.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import uuid
from collections.abc import Callable, Generator, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

import anyio

from resilience._checks import a, positive_seconds
from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.cache.local import LocalCache
from resilience.cache.policy import MISSING, CachePolicy, Entry, Freshness
from resilience.cache.redis import RedisCache, _Corrupt
from resilience.events import Dispatcher, Listener, Tally, Telemetry, key_hash
from resilience.flight import LEADER_GONE, Flight, SingleFlight
from resilience.remote import UNAVAILABLE

__all__ = ["CacheCore", "CacheEvent", "Call", "Condition", "Fetched", "LoadTtl", "Plan"]

log = logging.getLogger("resilience")

#: Tests patch this to steer jitter and early refresh.
_random = random.random


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """What a cache did: ``kind`` is hit, miss, load, load_error, stale, corrupt,
    invalidated, flushed, ttl_error or condition_error (a load's ``ttl`` or ``condition``
    function failed, so its value was returned but not stored); ``tier`` is "local",
    "remote" or "" (the cache as a whole)."""

    cache: str
    kind: str
    tier: str
    key: str | None = None
    duration: float | None = None
    error: BaseException | None = None


# The steps a plan asks for, and what each returns to it:
GET: Final = "get"  # (GET, rkey) -> bytes | None | UNAVAILABLE
WRITE: Final = "write"  # (WRITE, rkey, blob, px) -> None | UNAVAILABLE
LOCK: Final = "lock"  # (LOCK, rkey, token, px) -> bool | UNAVAILABLE
UNLOCK: Final = "unlock"  # (UNLOCK, rkey, token) -> None | UNAVAILABLE
WAIT: Final = "wait"  # (WAIT, flight, seconds) -> None
LOAD: Final = "load"  # (LOAD,) -> the loader's value, or its exception thrown in

Plan = Generator[tuple[Any, ...], Any, Any]

#: The loader's call, made only if the plan asks for it: (fn, args, kwargs).
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]

#: A Redis read made before the caller joined the key's flight, for the plan to reuse:
#: (the local tier's ticket taken before it, the landing count then, the entry it found
#: that was not fresh enough to serve, or None).
Fetched = tuple[int, int, "Entry | None"]

#: A load's lifetime: seconds, None (the cache's ttl) or a function of the loaded value
#: returning either of those.
LoadTtl: TypeAlias = "float | Callable[[Any], Any] | None"
#: Whether a loaded value may be stored: a function of it, or None (always).
Condition: TypeAlias = "Callable[[Any], Any] | None"


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must be a non-empty string")
    return key


#: The longest lifetime a cache takes: 100 years. Far beyond any real use, and far
#: below what overflows Redis's 64-bit millisecond expiry (~2.9e8 years), which would
#: fail every write long after construction.
MAX_TTL: Final = 100 * 365 * 86_400.0


def check_ttl(ttl: object, field: str = "ttl") -> float | None:
    return None if ttl is None else positive_seconds(field, ttl, maximum=MAX_TTL)


def check_load_ttl(ttl: object) -> LoadTtl:
    """A load's ``ttl``: None, a positive number of seconds, or a function of the value."""
    if ttl is None or callable(ttl):
        return cast(LoadTtl, ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(
            "ttl must be a number of seconds, None or a function of the loaded value, "
            f"got {a(type(ttl).__name__)}"
        )
    return positive_seconds("ttl", ttl, maximum=MAX_TTL)


def check_condition(condition: object) -> Condition:
    if condition is not None and not callable(condition):
        raise TypeError(
            "condition must be a function of the loaded value (or None), "
            f"got {a(type(condition).__name__)}"
        )
    return cast(Condition, condition)


def _seconds_returned(seconds: object) -> float | None:
    """What a ttl function returned, checked: seconds or None; else an error naming ttl."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(
            f"the ttl function returned {a(type(seconds).__name__)}; it must return a "
            "positive number of seconds or None (the cache's ttl)"
        )
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TTL):
        raise ValueError(
            f"the ttl function returned {seconds!r}; it must return a positive number of "
            f"seconds up to {MAX_TTL:g} or None (the cache's ttl)"
        )
    return float(seconds)


# What a watched cache counts, by (kind, tier) as _emit reports them.
_COUNTED: Final = tuple(
    (kind, tier)
    for kind in ("hit", "miss", "load", "load_error", "stale", "invalidated", "corrupt")
    for tier in ("local", "remote", "")
)


class CacheCore:
    """A TwoTierCache's state, its freshness decisions and its plan (see TwoTierCache)."""

    def __init__(
        self,
        local: LocalCache | None = None,
        remote: RedisCache | None = None,
        *,
        ttl: float = 300.0,
        jitter: float = 0.0,
        early_refresh: float | None = None,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        negative_ttl: float | None = None,
        lock: bool | float = False,
        invalidation: bool = True,
        name: str = "cache",
        listeners: Iterable[Listener[CacheEvent]] = (),
        clock: Clock | None = None,
    ) -> None:
        if local is not None and not isinstance(local, LocalCache):
            raise TypeError(f"local must be a LocalCache, got {type(local).__name__}")
        if remote is not None and not isinstance(remote, RedisCache):
            raise TypeError(f"remote must be a RedisCache or None, got {type(remote).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.policy = CachePolicy(
            ttl=ttl,
            jitter=jitter,
            early_refresh=early_refresh,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            negative_ttl=negative_ttl,
        )
        if lock is True:
            lock_seconds = 10.0
        elif lock is False:
            lock_seconds = 0.0
        else:
            lock_seconds = check_ttl(lock, "lock") or 0.0
        if lock_seconds and remote is None:
            raise ValueError("lock needs a remote tier: the lock lives in Redis")
        self._lock_px = int(lock_seconds * 1000)
        self.name = name
        self._clock = resolve(clock)
        self.local = local if local is not None else LocalCache(clock=self._clock)
        self.remote = remote
        self._mono = self._clock.monotonic
        self._wall = self._clock.time
        # The hot path reads the system clock through a module global (see _clock).
        self._now: Callable[[], float] | None = (
            None if self._clock is SYSTEM_CLOCK else self._clock.monotonic
        )
        self._flights = SingleFlight()
        # Keys whose Redis read runs outside a flight right now: others join the flight.
        self._reading: dict[Hashable, object] = {}
        # Bumped after a flight's plan is done and before the flight lands, so a read
        # made earlier knows whether it may stand in for the plan's own (see _plan).
        self._landings = itertools.count(1)
        self._landed = 0
        self._stale: dict[Hashable, Any] = {}  # values to serve while their refresh runs
        # "ttl" / "condition" once one of those functions failed (logged at WARNING once).
        self._warned: set[str] = set()
        self._events: Dispatcher[CacheEvent] = Dispatcher(listeners)
        # (kind, tier) -> count, once a metrics consumer asks for telemetry (see _emit).
        self._tallies: dict[tuple[str, str], Tally] | None = None
        self._count_hit: Callable[[], object] | None = None  # the hot path's local hits
        self._xfetch = early_refresh is not None
        # Whether a local entry past its freshness may still be served (stale windows).
        self._keeps_stale = self.policy.keep_for > 0
        # True while a fresh local hit needs nothing but a lookup (no XFetch, no listeners).
        self._hot = not self._xfetch and not self._events
        if remote is not None and invalidation:
            remote.start(self._on_remote_invalidate, self._on_channel_lost)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The clock this cache reads (injectable, e.g. a FakeClock in tests)."""
        return self._clock

    def _kind(self, want_async: bool, method: str) -> None:
        """Sync methods need a sync Redis client, async ones an asyncio client."""
        remote = self.remote
        if remote is not None and remote.is_async != want_async:
            kind = "redis.asyncio" if remote.is_async else "sync redis"
            other = "a" + method if not want_async else method[1:]
            raise TypeError(f"{method}() cannot use this cache's {kind} client; call {other}()")

    # One name for each shell: the async one calls _need_async, its sync twin _need_sync.
    def _need_sync(self, method: str) -> None:
        self._kind(False, method)

    def _need_async(self, method: str) -> None:
        self._kind(True, method)

    # Where closing differs: an async close also ends a tier on a sync client.
    def _close_remote(self) -> None:
        self._need_sync("close")
        if self.remote is not None:
            self.remote.close()

    async def _aclose_remote(self) -> None:
        if self.remote is not None:
            if self.remote.is_async:
                await self.remote.aclose()
            else:
                self.remote.close()

    def add_listener(self, listener: Listener[CacheEvent]) -> None:
        self._events.add(listener)
        self._hot = False

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads (resilience.events). Asking for it turns on
        lock-free counters of hits, misses, loads and the rest; hits stay on the hot path.
        """
        if self._tallies is None:
            tallies = {pair: Tally() for pair in _COUNTED}
            self._count_hit = tallies[("hit", "local")].add
            self._tallies = tallies
        remote = self.remote
        links = (remote,) if remote is not None else ()
        return Telemetry(
            "cache", self.name, self._read, listen=self._listen, timed=(CacheEvent,), links=links
        )

    def _listen(self, listener: Listener[CacheEvent], only: object = None) -> None:
        self.add_listener(listener)

    def _read(self) -> dict[str, Any]:
        assert self._tallies is not None
        n = {pair: tally.value() for pair, tally in self._tallies.items()}
        return {
            "hits": {"local": n["hit", "local"] + n["hit", ""], "remote": n["hit", "remote"]},
            "misses": {
                "local": n["miss", "local"] + n["miss", ""],
                "remote": n["miss", "remote"],
            },
            "loads": n["load", ""] + n["load_error", ""],
            "load_errors": n["load_error", ""],
            "stale": n["stale", ""] + n["stale", "local"],
            "invalidated": n["invalidated", "local"],
            "errors": {
                "remote": n["corrupt", "remote"] + n["corrupt", ""],
                "local": n["corrupt", "local"],
            },
        }

    def report(self, kind: str, tier: str, key: Any = None) -> None:
        """Count a lookup answered on this cache's behalf by a layer over it (an HTTP
        cache reading its entries through ``get``): ``kind`` "hit", "miss" or "stale",
        ``tier`` "local", "remote" or "". Metrics and listeners see it as the cache's own."""
        self._emit(kind, tier, key)

    def _emit(self, kind: str, tier: str, key: Any, **fields: Any) -> None:
        tallies = self._tallies
        if tallies is not None:
            counter = tallies.get((kind, tier))
            if counter is not None:
                counter.add()
        if self._events:
            shown = key if isinstance(key, str) or key is None else repr(key)
            self._events.queue.append(CacheEvent(self.name, kind, tier, shown, **fields))
            self._events.drain()

    def _on_remote_invalidate(self, rkey: str) -> None:
        self.local.invalidate(rkey)
        self._emit("invalidated", "local", rkey)

    def _on_channel_lost(self) -> None:
        self.local.clear()
        self._emit("flushed", "local", None)

    # -- after a local miss: the remote's answer, then the plan -----------------------------

    def _fresh_from_remote(self, blob: Any, rkey: str) -> Entry | None:
        """Decode a Redis reply into an entry on the monotonic clock (None: absent/corrupt)."""
        if blob is None or blob is UNAVAILABLE:
            return None
        assert self.remote is not None
        try:
            entry = self.remote.decode(blob)
        except _Corrupt:
            self._emit("corrupt", "remote", rkey)
            return None
        if entry is None:
            return None
        now = self._mono()
        fresh_until = now + (entry.fresh_until - self._wall())
        return Entry(entry.value, fresh_until, entry.delta)

    def _fill_local(
        self, lkey: Hashable, rkey: str, entry: Entry, ticket: int, now: float | None = None
    ) -> None:
        """Put a Redis entry in the local tier, for at most the local tier's ttl."""
        now = self._mono() if now is None else now
        fresh_until = min(entry.fresh_until, now + self.local.ttl)
        self.local.fill(lkey, Entry(entry.value, fresh_until, entry.delta), ticket, rkey)

    def _serve_remote(self, lkey: Hashable, rkey: str, entry: Entry | None, ticket: int) -> Any:
        """A fresh Redis entry's value, put in the local tier; else MISSING (both counted)."""
        if entry is not None:
            now = self._mono()
            if (
                now < entry.fresh_until  # all there is to freshness without early refresh
                if not self._xfetch
                else self.policy.freshness(entry, now, 1.0 - _random()) is Freshness.FRESH
            ):
                self._fill_local(lkey, rkey, entry, ticket, now)
                self._emit("hit", "remote", rkey)
                return entry.value
        self._emit("miss", "remote", rkey)
        return MISSING

    def _claim_read(self, lkey: Hashable) -> object | None:
        """A token when the caller may read Redis before joining the key's flight.

        Only while no flight and no other such read runs for the key: a burst of misses on
        one key reads Redis once or twice, never once per caller.
        """
        if self.remote is None or self._flights.in_flight(lkey):
            return None
        token = object()
        return token if self._reading.setdefault(lkey, token) is token else None

    def _release_read(self, lkey: Hashable, token: object) -> None:
        if self._reading.get(lkey) is token:
            del self._reading[lkey]

    def _plan(
        self,
        lkey: Hashable,
        rkey: str,
        ttl: LoadTtl,
        condition: Condition,
        stale: Entry | None,
        fetched: Fetched | None,
    ) -> Plan:
        remote = self.remote
        locked_token: str | None = None
        if remote is not None:
            if fetched is not None and fetched[1] == self._landed:
                # No flight landed since that read: it is as good as reading now.
                ticket, entry = fetched[0], fetched[2]
            else:
                ticket = self.local.ticket()
                entry = self._fresh_from_remote((yield (GET, rkey)), rkey)
                value = self._serve_remote(lkey, rkey, entry, ticket)
                if value is not MISSING:
                    return value
            if entry is not None:
                stale = entry
            if self._lock_px:
                token = uuid.uuid4().hex
                got = yield (LOCK, rkey, token, self._lock_px)
                if got is True:
                    locked_token = token
                elif got is False:
                    # Another process loads it: wait for its notice (or its lease to end).
                    waiter = remote.waiter(rkey)
                    entry = self._fresh_from_remote((yield (GET, rkey)), rkey)
                    if entry is None or entry.fresh_until <= self._mono():
                        yield (WAIT, waiter, self._lock_px / 1000)
                        entry = self._fresh_from_remote((yield (GET, rkey)), rkey)
                    if entry is not None and entry.fresh_until > self._mono():
                        self._fill_local(lkey, rkey, entry, ticket)
                        self._emit("hit", "remote", rkey)
                        return entry.value
        else:
            ticket = self.local.ticket()
        if stale is not None:
            self._stale[lkey] = stale.value
        try:
            value = yield from self._load_and_store(lkey, rkey, ttl, condition, stale, ticket)
        except Exception:
            if locked_token is not None:
                yield (UNLOCK, rkey, locked_token)
            raise
        finally:
            self._stale.pop(lkey, None)
        # Not in `finally`: a plan closed by cancellation must not yield; the lease ends it.
        if locked_token is not None:
            yield (UNLOCK, rkey, locked_token)
        return value

    def _load_and_store(
        self,
        lkey: Hashable,
        rkey: str,
        ttl: LoadTtl,
        condition: Condition,
        stale: Entry | None,
        ticket: int,
    ) -> Plan:
        policy, remote = self.policy, self.remote
        start = self._mono()
        try:
            value = yield (LOAD,)
        except Exception as error:
            now = self._mono()
            if stale is not None and policy.can_serve_on_error(stale, now):
                self._emit("stale", "", rkey, error=error)
                return stale.value
            self._emit("load_error", "", rkey, duration=now - start, error=error)
            raise
        now = self._mono()
        delta = now - start
        self._emit("load", "", rkey, duration=delta)
        life = self._lifetime(value, ttl, condition, rkey)
        if life is None:
            return value
        if remote is None:
            keep = now + life + policy.keep_for
            self.local.fill(lkey, Entry(value, now + life, delta, keep), ticket, rkey)
            return value
        blob = remote.encode(value, self._wall() + life, delta)
        entry = Entry(value, now + min(life, self.local.ttl), delta)
        if not self.local.fill(lkey, entry, ticket, rkey):
            # The key was written or deleted since this load began: that write is newer,
            # so this value must not overwrite it in Redis either.
            return value
        yield (WRITE, rkey, blob, math.ceil((life + policy.keep_for) * 1000))
        return value

    def _lifetime(self, value: Any, ttl: LoadTtl, condition: Condition, rkey: str) -> float | None:
        """How long to store a loaded value (jitter applied), or None: store it nowhere.

        A ``condition`` or ``ttl`` function that raises, or a ``ttl`` function that returns
        anything but a positive number of seconds or None, costs the caller nothing: the
        value is still returned, just not stored; the failure is an event and is logged.
        """
        policy = self.policy
        if value is None and policy.negative_ttl is None:
            return None  # without negative_ttl, None is never cached
        if condition is not None:
            try:
                keep = bool(condition(value))
            except Exception as error:
                self._not_stored("condition", rkey, error)
                return None
            if not keep:
                return None
        seconds: float | None
        if ttl is None or isinstance(ttl, float):
            seconds = ttl
        elif value is None:
            seconds = None  # a None's lifetime is negative_ttl: the function is not asked
        else:
            try:
                seconds = _seconds_returned(ttl(value))
            except Exception as error:
                self._not_stored("ttl", rkey, error)
                return None
        return policy.ttl_for(value, seconds, _random())

    def _not_stored(self, parameter: str, rkey: str, error: Exception) -> None:
        self._emit(f"{parameter}_error", "", rkey, error=error)
        first = parameter not in self._warned
        self._warned.add(parameter)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "resilience cache %r: the %s function failed for key hash %s (%s: %s); the "
            "loaded value was returned but not stored%s",
            self.name,
            parameter,
            key_hash(rkey),
            type(error).__name__,
            error,
            " (later failures are logged at DEBUG)" if first else "",
            exc_info=error,
            extra={
                "resilience_event": f"cache.{parameter}_failed",
                "resilience_name": self.name,
                "resilience_key_hash": key_hash(rkey),
                "resilience_error_type": type(error).__name__,
            },
        )

    # Where waiting for another process's notice differs (the WAIT step of a plan).
    @staticmethod
    def _wait_notice(flight: Flight, seconds: float) -> None:
        flight._done.wait(seconds)

    @staticmethod
    async def _await_notice(flight: Flight, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await flight.await_done()

    # -- the local tier and single-flight --------------------------------------------------

    def _local_hit(self, lkey: Hashable) -> tuple[Any, Entry | None]:
        """(value or MISSING, the entry to serve stale if the value is not fresh)."""
        now = self._mono()
        entry = self.local.get_entry(lkey, now)
        if entry is None:
            return MISSING, None
        if now < entry.fresh_until and (
            not self._xfetch
            or self.policy.freshness(entry, now, 1.0 - _random()) is Freshness.FRESH
        ):
            self._emit("hit", "local", lkey)
            return entry.value, None
        return MISSING, entry

    def _land(self, lkey: Hashable, flight: Flight, value: Any) -> None:
        self._landed = next(self._landings)
        self._flights.land(lkey, flight, value)

    def _land_error(self, lkey: Hashable, flight: Flight, error: BaseException) -> None:
        # An exception reaches every waiter; a cancelled or killed leader hands the turn on.
        outcome = error if isinstance(error, Exception) else LEADER_GONE
        self._landed = next(self._landings)
        self._flights.land(lkey, flight, error=outcome)

    def _serve_stale(self, lkey: Hashable, stale: Entry | None) -> Any:
        """While one caller refreshes, others get the old value within the SWR window."""
        if not self.policy.stale_while_revalidate:
            return MISSING
        value = self._stale.get(lkey, MISSING)
        if (
            value is MISSING
            and stale is not None
            and self.policy.freshness(stale, self._mono(), 1.0) is not Freshness.EXPIRED
        ):
            value = stale.value
        if value is not MISSING:
            self._emit("stale", "local", lkey)
        return value

    # -- get and set -----------------------------------------------------------------------

    def _after_remote_get(self, key: str, entry: Entry | None, ticket: int, default: Any) -> Any:
        if entry is None or entry.fresh_until <= self._mono():
            self._emit("miss", "remote", key)
            return default
        self._fill_local(key, key, entry, ticket)
        self._emit("hit", "remote", key)
        return entry.value

    def _prepare_set(self, key: str, value: Any, ttl: float | None) -> tuple[bytes | None, int]:
        life = self.policy.ttl if ttl is None else ttl
        if self.policy.jitter:
            life *= 1.0 - self.policy.jitter * _random()
        now = self._mono()
        # Serialize first: an unserializable value fails before anything changes.
        blob = None if self.remote is None else self.remote.encode(value, self._wall() + life, 0.0)
        self.local.invalidate(key)  # fills that started earlier must not land over this
        local_life = life if self.remote is None else min(life, self.local.ttl)
        self.local.fill(key, Entry(value, now + local_life, 0.0))
        return blob, math.ceil((life + self.policy.keep_for) * 1000)
