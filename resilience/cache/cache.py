"""TwoTierCache: cache-aside over a local tier and an optional Redis tier, sync and async.

The hit path is short and written twice (sync and async) because it is the hot path.
Everything after a local miss (reading Redis, the cross-process lock, the loader,
storing, serving stale values) is written once, as a plan (a generator) that yields the
I/O it needs; ``_run`` performs those steps synchronously and ``_arun`` with await.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Generator, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar, cast

import anyio

from resilience._checks import positive_seconds
from resilience._clock import Clock, resolve
from resilience._remote import UNAVAILABLE
from resilience.cache.keys import KeyBuilder
from resilience.cache.local import LocalCache
from resilience.cache.policy import MISSING, CachePolicy, Entry, Freshness
from resilience.cache.redis import RedisCache, _Corrupt
from resilience.events import Dispatcher, Listener
from resilience.flight import LEADER_GONE, Flight, SingleFlight

__all__ = ["CacheEvent", "TwoTierCache"]

P = ParamSpec("P")
R = TypeVar("R")

_random = random.random


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """What a cache did: ``kind`` is hit, miss, load, load_error, stale, corrupt,
    invalidated or flushed; ``tier`` is "local", "remote" or "" (the cache as a whole)."""

    cache: str
    kind: str
    tier: str
    key: str | None = None
    duration: float | None = None
    error: BaseException | None = None


# The steps a plan asks for, and what each returns to it:
_GET: Final = "get"  # (GET, rkey) -> bytes | None | UNAVAILABLE
_WRITE: Final = "write"  # (WRITE, rkey, blob, px) -> None | UNAVAILABLE
_LOCK: Final = "lock"  # (LOCK, rkey, token, px) -> bool | UNAVAILABLE
_UNLOCK: Final = "unlock"  # (UNLOCK, rkey, token) -> None | UNAVAILABLE
_WAIT: Final = "wait"  # (WAIT, flight, seconds) -> None
_LOAD: Final = "load"  # (LOAD,) -> the loader's value, or its exception thrown in

Plan = Generator[tuple[Any, ...], Any, Any]


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must be a non-empty string")
    return key


def _check_ttl(ttl: object, field: str = "ttl") -> float | None:
    return None if ttl is None else positive_seconds(field, ttl)


class TwoTierCache:
    """Cache-aside with a bounded in-process tier in front of Redis.

    ``local`` is the in-process tier (default ``LocalCache()``); ``remote`` the Redis
    tier, or None for a local-only cache. ``ttl`` is the default lifetime; ``jitter``,
    ``early_refresh``, ``stale_while_revalidate``, ``stale_if_error`` and
    ``negative_ttl`` are the stampede controls (see docs/cache.md). ``lock`` turns on
    the cross-process single-flight lock on Redis (``True`` or its lease in seconds).
    """

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
            lock_seconds = _check_ttl(lock, "lock") or 0.0
        if lock_seconds and remote is None:
            raise ValueError("lock needs a remote tier: the lock lives in Redis")
        self._lock_px = int(lock_seconds * 1000)
        self.name = name
        self._clock = resolve(clock)
        self.local = local if local is not None else LocalCache(clock=self._clock)
        self.remote = remote
        self._mono = self._clock.monotonic
        self._wall = self._clock.time
        self._flights = SingleFlight()
        self._stale: dict[Hashable, Any] = {}  # values to serve while their refresh runs
        self._events: Dispatcher[CacheEvent] = Dispatcher(listeners)
        self._xfetch = early_refresh is not None
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

    def close(self) -> None:
        """Stop listening for invalidations and close the Redis tier's own connections."""
        self._kind(False, "close")
        if self.remote is not None:
            self.remote.close()

    async def aclose(self) -> None:
        if self.remote is not None:
            if self.remote.is_async:
                await self.remote.aclose()
            else:
                self.remote.close()

    def __enter__(self) -> TwoTierCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> TwoTierCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def add_listener(self, listener: Listener[CacheEvent]) -> None:
        self._events.add(listener)
        self._hot = False

    def _emit(self, kind: str, tier: str, key: Any, **fields: Any) -> None:
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

    # -- the plan: everything after a local miss, written once -----------------------------

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

    def _fill_local(self, lkey: Hashable, rkey: str, entry: Entry, ticket: int) -> None:
        """Put a Redis entry in the local tier, for at most the local tier's ttl."""
        fresh_until = min(entry.fresh_until, self._mono() + self.local.ttl)
        self.local.fill(lkey, Entry(entry.value, fresh_until, entry.delta), ticket, rkey)

    def _plan(self, lkey: Hashable, rkey: str, ttl: float | None, stale: Entry | None) -> Plan:
        policy, remote = self.policy, self.remote
        ticket = self.local.ticket()
        locked_token: str | None = None
        if remote is not None:
            entry = self._fresh_from_remote((yield (_GET, rkey)), rkey)
            if entry is not None:
                state = policy.freshness(entry, self._mono(), 1.0 - _random())
                if state is Freshness.FRESH:
                    self._fill_local(lkey, rkey, entry, ticket)
                    self._emit("hit", "remote", rkey)
                    return entry.value
                stale = entry
            self._emit("miss", "remote", rkey)
            if self._lock_px:
                token = uuid.uuid4().hex
                got = yield (_LOCK, rkey, token, self._lock_px)
                if got is True:
                    locked_token = token
                elif got is False:
                    # Another process loads it: wait for its notice (or its lease to end).
                    waiter = remote.waiter(rkey)
                    entry = self._fresh_from_remote((yield (_GET, rkey)), rkey)
                    if entry is None or entry.fresh_until <= self._mono():
                        yield (_WAIT, waiter, self._lock_px / 1000)
                        entry = self._fresh_from_remote((yield (_GET, rkey)), rkey)
                    if entry is not None and entry.fresh_until > self._mono():
                        self._fill_local(lkey, rkey, entry, ticket)
                        self._emit("hit", "remote", rkey)
                        return entry.value
        if stale is not None:
            self._stale[lkey] = stale.value
        try:
            value = yield from self._load_and_store(lkey, rkey, ttl, stale, ticket)
        except Exception:
            if locked_token is not None:
                yield (_UNLOCK, rkey, locked_token)
            raise
        finally:
            self._stale.pop(lkey, None)
        # Not in `finally`: a plan closed by cancellation must not yield; the lease ends it.
        if locked_token is not None:
            yield (_UNLOCK, rkey, locked_token)
        return value

    def _load_and_store(
        self, lkey: Hashable, rkey: str, ttl: float | None, stale: Entry | None, ticket: int
    ) -> Plan:
        policy, remote = self.policy, self.remote
        start = self._mono()
        try:
            value = yield (_LOAD,)
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
        life = policy.ttl_for(value, ttl, _random())
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
        yield (_WRITE, rkey, blob, math.ceil((life + policy.keep_for) * 1000))
        return value

    # -- performing a plan -----------------------------------------------------------------

    def _step(self, step: tuple[Any, ...], loader: Callable[[], Any]) -> Any:
        kind, remote = step[0], self.remote
        if kind is _LOAD:
            return loader()
        assert remote is not None
        call = remote.guard.call
        if kind is _GET:
            return call(remote.get, step[1])
        if kind is _WRITE:
            return call(remote.write, step[1], step[2], step[3])
        if kind is _LOCK:
            return call(remote.lock, step[1], step[2], step[3])
        if kind is _UNLOCK:
            return call(remote.unlock, step[1], step[2])
        flight, seconds = step[1], step[2]
        flight._done.wait(seconds)
        return None

    async def _astep(self, step: tuple[Any, ...], loader: Callable[[], Any]) -> Any:
        kind, remote = step[0], self.remote
        if kind is _LOAD:
            return await loader()
        assert remote is not None
        call = remote.guard.acall
        if kind is _GET:
            return await call(remote.aget, step[1])
        if kind is _WRITE:
            return await call(remote.awrite, step[1], step[2], step[3])
        if kind is _LOCK:
            return await call(remote.alock, step[1], step[2], step[3])
        if kind is _UNLOCK:
            return await call(remote.aunlock, step[1], step[2])
        flight, seconds = step[1], step[2]
        with anyio.move_on_after(seconds):
            await flight.await_done()
        return None

    def _run(self, plan: Plan, loader: Callable[[], Any]) -> Any:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = plan.throw(error) if error is not None else plan.send(reply)
            except StopIteration as done:
                return done.value
            error = None
            try:
                reply = self._step(step, loader)
            except Exception as exc:  # the loader's: the plan decides (stale-if-error)
                reply, error = None, exc

    async def _arun(self, plan: Plan, loader: Callable[[], Any]) -> Any:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = plan.throw(error) if error is not None else plan.send(reply)
            except StopIteration as done:
                return done.value
            error = None
            try:
                reply = await self._astep(step, loader)
            except Exception as exc:
                reply, error = None, exc

    # -- get_or_load -------------------------------------------------------------------------

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

    def _load(self, lkey: Hashable, rkey: str, loader: Callable[[], Any], ttl: float | None) -> Any:
        value, stale = self._local_hit(lkey)
        if value is not MISSING:
            return value
        self._emit("miss", "local", lkey)
        while True:
            flight, leader = self._flights.join(lkey)
            if not leader:
                served = self._serve_stale(lkey, stale)
                if served is not MISSING:
                    return served
                flight.wait()
                if flight.error is LEADER_GONE:
                    continue
                return flight.outcome()
            try:
                value = self._run(self._plan(lkey, rkey, ttl, stale), loader)
            except BaseException as error:
                self._land_error(lkey, flight, error)
                raise
            self._flights.land(lkey, flight, value)
            return value

    async def _aload(
        self, lkey: Hashable, rkey: str, loader: Callable[[], Awaitable[Any]], ttl: float | None
    ) -> Any:
        value, stale = self._local_hit(lkey)
        if value is not MISSING:
            return value
        self._emit("miss", "local", lkey)
        while True:
            flight, leader = self._flights.join(lkey)
            if not leader:
                served = self._serve_stale(lkey, stale)
                if served is not MISSING:
                    return served
                await flight.await_done()
                if flight.error is LEADER_GONE:
                    continue
                return flight.outcome()
            try:
                value = await self._arun(self._plan(lkey, rkey, ttl, stale), loader)
            except BaseException as error:
                self._land_error(lkey, flight, error)
                raise
            self._flights.land(lkey, flight, value)
            return value

    def _land_error(self, lkey: Hashable, flight: Flight, error: BaseException) -> None:
        # An exception reaches every waiter; a cancelled or killed leader hands the turn on.
        outcome = error if isinstance(error, Exception) else LEADER_GONE
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

    def get_or_load(self, key: str, loader: Callable[[], R], *, ttl: float | None = None) -> R:
        """The value for ``key``; on a miss, ``loader()`` runs once for all concurrent callers."""
        self._kind(False, "get_or_load")
        key = _check_key(key)
        if not callable(loader):
            raise TypeError(f"loader must be callable, got {type(loader).__name__}")
        return cast(R, self._load(key, key, loader, _check_ttl(ttl)))

    async def aget_or_load(
        self, key: str, loader: Callable[[], Awaitable[R]], *, ttl: float | None = None
    ) -> R:
        self._kind(True, "aget_or_load")
        key = _check_key(key)
        if not callable(loader):
            raise TypeError(f"loader must be callable, got {type(loader).__name__}")
        return cast(R, await self._aload(key, key, loader, _check_ttl(ttl)))

    # -- get, set, delete --------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value, or ``default``; never loads."""
        self._kind(False, "get")
        key = _check_key(key)
        value, _ = self._local_hit(key)
        if value is not MISSING or self.remote is None:
            return default if value is MISSING else value
        ticket = self.local.ticket()
        entry = self._fresh_from_remote(self.remote.guard.call(self.remote.get, key), key)
        return self._after_remote_get(key, entry, ticket, default)

    async def aget(self, key: str, default: Any = None) -> Any:
        self._kind(True, "aget")
        key = _check_key(key)
        value, _ = self._local_hit(key)
        if value is not MISSING or self.remote is None:
            return default if value is MISSING else value
        ticket = self.local.ticket()
        blob = await self.remote.guard.acall(self.remote.aget, key)
        entry = self._fresh_from_remote(blob, key)
        return self._after_remote_get(key, entry, ticket, default)

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

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` in both tiers and evict it from other instances' local tiers."""
        self._kind(False, "set")
        key = _check_key(key)
        blob, px = self._prepare_set(key, value, _check_ttl(ttl))
        if self.remote is not None and blob is not None:
            self.remote.guard.call(self.remote.write, key, blob, px)

    async def aset(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        self._kind(True, "aset")
        key = _check_key(key)
        blob, px = self._prepare_set(key, value, _check_ttl(ttl))
        if self.remote is not None and blob is not None:
            await self.remote.guard.acall(self.remote.awrite, key, blob, px)

    def delete(self, key: str) -> None:
        """Remove ``key`` from both tiers and from other instances' local tiers."""
        self._kind(False, "delete")
        key = _check_key(key)
        self.local.invalidate(key)
        if self.remote is not None:
            self.remote.guard.call(self.remote.write, key, b"", 0)

    async def adelete(self, key: str) -> None:
        self._kind(True, "adelete")
        key = _check_key(key)
        self.local.invalidate(key)
        if self.remote is not None:
            await self.remote.guard.acall(self.remote.awrite, key, b"", 0)

    # -- decorator ---------------------------------------------------------------------------

    def cached(
        self,
        ttl: float | None = None,
        *,
        key: Callable[..., str] | None = None,
        version: str = "1",
        namespace: str | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Cache a sync or async function's results, keyed by its arguments.

        The default key comes from the bound call (``f(1)`` and ``f(x=1)`` are one key;
        ``1``, ``1.0``, ``True`` and ``"1"`` are four), namespaced by module, qualified
        name and ``version``. ``key`` replaces it with a function of the arguments.
        """
        life = _check_ttl(ttl)
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable returning a str, got {key!r}")

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:

            is_async = inspect.iscoroutinefunction(fn)
            remote = self.remote
            if remote is not None and remote.is_async != is_async:
                raise TypeError(
                    f"cached: {'an async' if is_async else 'a sync'} function needs a cache "
                    f"whose RedisCache has {'a redis.asyncio' if is_async else 'a sync redis'} "
                    "client (a blocking call on an event loop, or an await without one)"
                )
            builder = KeyBuilder(fn, version=version, namespace=namespace)
            local_key = builder.local
            remote_key = builder.remote
            get_entry, mono = self.local.get_entry, self._mono
            if is_async:
                afn = cast(Callable[..., Awaitable[Any]], fn)

                @functools.wraps(fn)
                async def cached_async(*args: Any, **kwargs: Any) -> Any:
                    given = None if key is None else _check_key(key(*args, **kwargs))
                    lkey = local_key(args, kwargs) if given is None else given
                    if self._hot:  # the hot path: a fresh local entry
                        now = mono()
                        entry = get_entry(lkey, now)
                        if entry is not None and now < entry.fresh_until:
                            return entry.value
                    rkey = remote_key(lkey) if given is None else given
                    return await self._aload(lkey, rkey, lambda: afn(*args, **kwargs), life)

                return cast(Callable[P, R], cached_async)

            @functools.wraps(fn)
            def cached_sync(*args: Any, **kwargs: Any) -> Any:
                given = None if key is None else _check_key(key(*args, **kwargs))
                lkey = local_key(args, kwargs) if given is None else given
                if self._hot:
                    now = mono()
                    entry = get_entry(lkey, now)
                    if entry is not None and now < entry.fresh_until:
                        return entry.value
                rkey = remote_key(lkey) if given is None else given
                return self._load(lkey, rkey, lambda: fn(*args, **kwargs), life)

            return cast(Callable[P, R], cached_sync)

        return decorate
