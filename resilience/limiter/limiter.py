"""TokenBucket and LimitGroup: the sync and async shells over a bucket backend."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar, cast

import anyio

from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience._clock import monotonic as _monotonic
from resilience.errors import RateLimited
from resilience.events import Dispatcher, Listener
from resilience.limiter.bucket import Decision, Limit
from resilience.limiter.memory import MemoryBackend, MemoryTable

__all__ = ["Backend", "LimitGroup", "LimiterDecision", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class LimiterDecision:
    """One decision, for listeners (metrics). ``limiter`` is the limiter's name."""

    limiter: str
    key: str
    cost: float
    decision: Decision


P = ParamSpec("P")
R = TypeVar("R")


class Backend(Protocol):
    """Where buckets live. MemoryBackend and RedisBackend implement it."""

    def table(self, name: str, limit: Limit) -> Any: ...

    def decide(self, tables: Sequence[Any], key: str, cost: float, now: float) -> Decision: ...

    async def adecide(
        self, tables: Sequence[Any], key: str, cost: float, now: float
    ) -> Decision: ...

    def decide_many(
        self, tables: Sequence[Any], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]: ...

    async def adecide_many(
        self, tables: Sequence[Any], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]: ...


def _bad_key(key: object) -> NoReturn:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    raise ValueError("key must be a non-empty string")


def _timeout(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {value!r}")
    return float(value)


class _Limiter:
    """What TokenBucket and LimitGroup share: validation, waiting, batches, decorator."""

    def __init__(
        self, limits: Sequence[Limit], tables: Sequence[Any], backend: Any, clock: Clock | None
    ) -> None:
        self.limits = tuple(limits)
        self.backend = backend
        self._tables = tuple(tables)
        self._clock = resolve(clock)
        self._sleep: Callable[[float], None] = getattr(self._clock, "sleep", time.sleep)
        self._asleep: Callable[[float], Awaitable[None]] = getattr(
            self._clock, "asleep", anyio.sleep
        )
        # The system clock is read through a module global (see _monotonic); others as given.
        self._now: Callable[[], float] | None = (
            None if self._clock is SYSTEM_CLOCK else self._clock.monotonic
        )
        # A cost of exactly 1 needs no check when every capacity holds a whole token.
        self._unit_ok = min(limit.capacity for limit in limits) >= 1
        # One in-memory limit: call its table directly (the hot path). Listeners take the
        # general path, so a limiter nobody listens to pays nothing for the hook.
        self._fast: MemoryTable | None = (
            self._tables[0] if len(tables) == 1 and isinstance(backend, MemoryBackend) else None
        )
        self._single: MemoryTable | None = self._fast
        self._events: Dispatcher[LimiterDecision] = Dispatcher()
        self.name = ""

    def add_listener(self, listener: Listener[LimiterDecision]) -> None:
        """Call ``listener(LimiterDecision)`` after every decision."""
        self._events.add(listener)
        self._single = None

    def remove_listener(self, listener: Listener[LimiterDecision]) -> None:
        self._events.remove(listener)
        if not self._events:
            self._single = self._fast

    def _emit(self, key: str, cost: float, decision: Decision) -> None:
        self._events.queue.append(LimiterDecision(self.name, key, cost, decision))
        self._events.drain()

    async def _aemit(self, key: str, cost: float, decision: Decision) -> None:
        self._events.queue.append(LimiterDecision(self.name, key, cost, decision))
        await self._events.adrain()

    def _cost(self, cost: float) -> float:
        for limit in self.limits:
            limit.check_cost(cost)
        return float(cost)

    def try_acquire(self, key: str, cost: float = 1) -> Decision:
        """Take ``cost`` tokens for ``key`` if they are there; never waits."""
        if key.__class__ is not str or not key:
            _bad_key(key)
        if not self._unit_ok or cost != 1 or cost.__class__ is not int:
            cost = self._cost(cost)
        now = _monotonic() if self._now is None else self._now()
        single = self._single
        if single is not None:
            return single.decide(key, cost, now)
        decision: Decision = self.backend.decide(self._tables, key, cost, now)
        if self._events:
            self._emit(key, cost, decision)
        return decision

    async def atry_acquire(self, key: str, cost: float = 1) -> Decision:
        if key.__class__ is not str or not key:
            _bad_key(key)
        if not self._unit_ok or cost != 1 or cost.__class__ is not int:
            cost = self._cost(cost)
        now = _monotonic() if self._now is None else self._now()
        single = self._single
        if single is not None:
            return single.decide(key, cost, now)
        decision: Decision = await self.backend.adecide(self._tables, key, cost, now)
        if self._events:
            await self._aemit(key, cost, decision)
        return decision

    def acquire(self, key: str, cost: float = 1, timeout: float | None = None) -> Decision:
        """Wait for ``cost`` tokens, up to ``timeout`` seconds, or raise RateLimited.

        It sleeps exactly ``retry_after`` and checks again; when the wait needed is longer
        than the time left, it raises at once instead of sleeping in vain.
        """
        limit = _timeout(timeout)
        deadline = None if limit is None else self._clock.monotonic() + limit
        while True:
            decision = self.try_acquire(key, cost)
            if decision.allowed:
                return decision
            self._check_wait(decision, key, deadline)
            self._sleep(decision.retry_after)

    async def aacquire(self, key: str, cost: float = 1, timeout: float | None = None) -> Decision:
        limit = _timeout(timeout)
        deadline = None if limit is None else self._clock.monotonic() + limit
        while True:
            decision = await self.atry_acquire(key, cost)
            if decision.allowed:
                return decision
            self._check_wait(decision, key, deadline)
            await self._asleep(decision.retry_after)

    def _check_wait(self, decision: Decision, key: str, deadline: float | None) -> None:
        if deadline is not None and self._clock.monotonic() + decision.retry_after > deadline:
            raise RateLimited(decision.retry_after, key)

    def _items(self, items: Iterable[str | tuple[str, float]]) -> list[tuple[str, float]]:
        out = []
        for item in items:
            key, cost = (item, 1) if isinstance(item, str) else item
            if key.__class__ is not str or not key:
                _bad_key(key)
            out.append((key, self._cost(cost)))
        return out

    def try_acquire_many(self, items: Iterable[str | tuple[str, float]]) -> list[Decision]:
        """Decide many requests in one round trip (Redis: one pipeline). Each is separate."""
        pairs = self._items(items)
        decisions = cast(
            "list[Decision]",
            self.backend.decide_many(self._tables, pairs, self._clock.monotonic()),
        )
        if self._events:
            for (key, cost), decision in zip(pairs, decisions, strict=True):
                self._emit(key, cost, decision)
        return decisions

    async def atry_acquire_many(self, items: Iterable[str | tuple[str, float]]) -> list[Decision]:
        pairs = self._items(items)
        decisions = cast(
            "list[Decision]",
            await self.backend.adecide_many(self._tables, pairs, self._clock.monotonic()),
        )
        if self._events:
            for (key, cost), decision in zip(pairs, decisions, strict=True):
                await self._aemit(key, cost, decision)
        return decisions

    def limit(
        self,
        key: str | Callable[..., str],
        cost: float = 1,
        *,
        wait: bool | float = False,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a sync or async function so each call takes tokens first.

        ``key`` is a string or a function of the call's arguments. A call that finds too
        few tokens raises RateLimited; with ``wait=True`` it waits as long as needed,
        with ``wait=<seconds>`` it waits up to that long.
        """
        if not (isinstance(key, str) and key) and not callable(key):
            raise TypeError(f"key must be a non-empty string or a callable, got {key!r}")
        self._cost(cost)
        if wait is True:
            timeout: float | None = None
        elif wait is False:
            timeout = 0.0
        else:
            timeout = _timeout(wait)
        key_of: Callable[..., str] = key if callable(key) else (lambda *a, **k: key)

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(fn):
                afn = cast(Callable[P, Awaitable[Any]], fn)

                @functools.wraps(fn)
                async def limited_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                    await self.aacquire(key_of(*args, **kwargs), cost, timeout)
                    return await afn(*args, **kwargs)

                return cast(Callable[P, R], limited_async)

            @functools.wraps(fn)
            def limited(*args: P.args, **kwargs: P.kwargs) -> R:
                self.acquire(key_of(*args, **kwargs), cost, timeout)
                return fn(*args, **kwargs)

            return limited

        return decorate


class TokenBucket(_Limiter):
    """``capacity`` tokens per key, refilled at ``rate`` tokens per second.

    ``backend=None`` keeps buckets in this process (``MemoryBackend``); pass
    ``rs.RedisBackend(client)`` to share them across processes and hosts. ``name``
    tells limits apart in a shared backend (default: ``"<capacity>@<rate>/s"``).
    """

    def __init__(
        self,
        rate: float,
        capacity: float,
        *,
        backend: Backend | None = None,
        name: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        limit = Limit(rate, capacity)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name or str(limit)
        self.limit_spec = limit
        store: Any = backend if backend is not None else MemoryBackend()
        if not callable(getattr(store, "table", None)):
            raise TypeError(f"backend must be a MemoryBackend or RedisBackend, got {store!r}")
        name = self.name
        super().__init__([limit], [store.table(name, limit)], store, clock)
        self.name = name

    @property
    def rate(self) -> float:
        return self.limit_spec.rate

    @property
    def capacity(self) -> float:
        return self.limit_spec.capacity

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate:g}, capacity={self.capacity:g}, name={self.name!r})"


class LimitGroup(_Limiter):
    """Several limits on the same keys (say 10/s and 1000/h), decided atomically.

    A request takes tokens from every limit, or from none. The buckets must share one
    backend; on Redis the whole group is one script call.
    """

    def __init__(self, *buckets: TokenBucket, clock: Clock | None = None) -> None:
        if not buckets:
            raise ValueError("buckets: a LimitGroup needs at least one TokenBucket")
        for b in buckets:
            if not isinstance(b, TokenBucket):
                raise TypeError(f"buckets must be TokenBuckets, got {type(b).__name__}")
        backend = buckets[0].backend
        if any(b.backend is not backend for b in buckets):
            raise ValueError("buckets must share one backend to be decided atomically")
        names = [b.name for b in buckets]
        if len(set(names)) != len(names):
            raise ValueError(f"buckets must have distinct names, got {names}")
        tables = [t for b in buckets for t in b._tables]
        super().__init__(
            [b.limit_spec for b in buckets], tables, backend, clock or buckets[0]._clock
        )
        self.buckets = buckets
        self.name = "+".join(names)
