"""TokenBucket and LimitGroup: the sync and async shells over a bucket backend.

A limiter is assembled from ``LimiterCore`` (``_core.py``: limits, tables, clock,
listeners, checks), ``AsyncLimiterOps`` (``_async_shell.py``: the async methods) and
``SyncLimiterOps``, generated from it by scripts/unasync.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from resilience._clock import Clock
from resilience.limiter._async_shell import AsyncLimiterOps
from resilience.limiter._core import LimiterDecision, check_timeout
from resilience.limiter._sync_shell import SyncLimiterOps
from resilience.limiter.bucket import Decision, Limit
from resilience.limiter.memory import MemoryBackend

__all__ = ["Backend", "LimitGroup", "LimiterDecision", "TokenBucket"]

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

    def peek(self, tables: Sequence[Any], key: str, cost: float, now: float) -> Decision: ...

    async def apeek(self, tables: Sequence[Any], key: str, cost: float, now: float) -> Decision: ...

    def reset(self, tables: Sequence[Any], key: str) -> bool: ...

    async def areset(self, tables: Sequence[Any], key: str) -> bool: ...


class _Limiter(SyncLimiterOps, AsyncLimiterOps):
    """What TokenBucket and LimitGroup share: the sync and async methods, the decorator."""

    def __init__(
        self, limits: Sequence[Limit], tables: Sequence[Any], backend: Any, clock: Clock | None
    ) -> None:
        super().__init__(limits, tables, backend, clock)
        self._route()

    def _route(self) -> None:
        """While one in-memory limit decides alone (whole-token capacity, nobody
        listening), ``try_acquire`` on this instance is its table's hot path: a cost of 1
        is decided in one Python call. Listeners bring back the general path."""
        self.__dict__.pop("try_acquire", None)
        table = self._fast
        if table is not None and self._unit_ok and not self._events:
            general = self.try_acquire
            allowed, denied = self._allowed, self._denied
            hot = table.hot_path(
                general,
                self._now,
                None if allowed is None else allowed.add,
                None if denied is None else denied.add,
            )
            self.__dict__["try_acquire"] = functools.update_wrapper(hot, general)

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
            timeout = check_timeout(wait)
        key_of: Callable[..., str] = key if callable(key) else (lambda *a, **k: key)

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(fn):
                afn = cast(Callable[P, Awaitable[Any]], fn)
                return cast(Callable[P, R], self._wrap_async(afn, key_of, cost, timeout))
            return self._wrap_sync(fn, key_of, cost, timeout)

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
