"""TwoTierCache: cache-aside over a local tier and an optional Redis tier, sync and async.

The class is assembled from three parts: ``CacheCore`` (``_core.py``: the state, the
freshness decisions and the plan that everything after a local miss follows, written
once), ``AsyncCacheOps`` (``_async_shell.py``: the async methods, which perform the
plan's I/O with await) and ``SyncCacheOps``, generated from it by scripts/unasync.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, ParamSpec, TypeVar, cast

from resilience.cache._async_shell import AsyncCacheOps
from resilience.cache._core import CacheEvent, check_condition, check_key, check_load_ttl
from resilience.cache._sync_shell import SyncCacheOps
from resilience.cache.keys import KeyBuilder

__all__ = ["CacheEvent", "TwoTierCache"]

P = ParamSpec("P")
R = TypeVar("R")


class TwoTierCache(SyncCacheOps, AsyncCacheOps):
    """Cache-aside with a bounded in-process tier in front of Redis.

    ``local`` is the in-process tier (default ``LocalCache()``); ``remote`` the Redis
    tier, or None for a local-only cache. ``ttl`` is the default lifetime; ``jitter``,
    ``early_refresh``, ``stale_while_revalidate``, ``stale_if_error`` and
    ``negative_ttl`` are the stampede controls (see docs/cache.md). ``lock`` turns on
    the cross-process single-flight lock on Redis (``True`` or its lease in seconds).
    """

    def cached(
        self,
        ttl: float | Callable[[Any], float | None] | None = None,
        *,
        key: Callable[..., str] | None = None,
        version: str = "1",
        namespace: str | None = None,
        condition: Callable[[Any], object] | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Cache a sync or async function's results, keyed by its arguments.

        The default key comes from the bound call (``f(1)`` and ``f(x=1)`` are one key;
        ``1``, ``1.0``, ``True`` and ``"1"`` are four), namespaced by module, qualified
        name and ``version``. ``key`` replaces it with a function of the arguments.

        ``ttl`` is seconds, or a function of the result returning seconds (None: the
        cache's ttl). With ``condition``, a result is stored only when
        ``condition(result)`` is true; otherwise it is returned (to every caller waiting
        for that call) and not cached. See docs/cache.md.
        """
        life = check_load_ttl(ttl)
        check_condition(condition)
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
            local_key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable]
            remote_key: Callable[[Any], str]
            if key is None:
                local_key, remote_key = builder.fast_local, builder.remote
            else:
                user_key = key

                def local_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
                    return check_key(user_key(*args, **kwargs))

                remote_key = _same  # the caller's key names the entry in both tiers
            if is_async:
                afn = cast(Callable[..., Awaitable[Any]], fn)
                wrapped = self._awrap(afn, local_key, remote_key, life, condition)
                return cast(Callable[P, R], wrapped)
            return cast(Callable[P, R], self._wrap(fn, local_key, remote_key, life, condition))

        return decorate


def _same(key: str) -> str:
    return key
