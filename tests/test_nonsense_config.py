"""Every constructor refuses nonsense at once, naming the parameter.

Each value here once passed construction and failed later, far from the mistake
(``OverflowError: timestamp out of range`` from a socket, every IPv6 request raising),
or is one of the usual suspects: 0, negative, NaN, infinity, bools, wrong types.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio

import resilience as rs
from resilience.integrations.asgi import ResponseCacheMiddleware, client_ip

NAN, INF = math.nan, math.inf
BAD_SECONDS = [0, -1, NAN, INF, -INF, True, False, "1", None]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None


def build(name: str, value: object) -> Callable[[], object]:
    """A constructor call with ``value`` for the parameter ``name``."""
    sync = redis.Redis()  # connects lazily: nothing is sent
    makers: dict[str, Callable[[], object]] = {
        "RedisBackend.timeout": lambda: rs.RedisBackend(sync, timeout=value),  # type: ignore[arg-type]
        "RedisCache.timeout": lambda: rs.RedisCache(sync, timeout=value),  # type: ignore[arg-type]
        "LocalCache.ttl": lambda: rs.LocalCache(ttl=value),  # type: ignore[arg-type]
        "LocalCache.max_entries": lambda: rs.LocalCache(max_entries=value),  # type: ignore[arg-type]
        "TwoTierCache.ttl": lambda: rs.TwoTierCache(ttl=value),  # type: ignore[arg-type]
        "TwoTierCache.lock": lambda: rs.TwoTierCache(
            remote=rs.RedisCache(sync),
            lock=value,  # type: ignore[arg-type]
        ),
        "TokenBucket.rate": lambda: rs.TokenBucket(rate=value, capacity=1),  # type: ignore[arg-type]
        "TokenBucket.capacity": lambda: rs.TokenBucket(rate=1, capacity=value),  # type: ignore[arg-type]
        "CircuitBreaker.recovery_timeout": lambda: rs.CircuitBreaker(
            "x",
            recovery_timeout=value,  # type: ignore[arg-type]
        ),
        "CircuitBreaker.failure_threshold": lambda: rs.CircuitBreaker(
            "x",
            failure_threshold=value,  # type: ignore[arg-type]
        ),
        "ResponseCacheMiddleware.ttl": lambda: ResponseCacheMiddleware(
            _app,
            rs.TwoTierCache(),
            ttl=value,  # type: ignore[arg-type]
        ),
        "client_ip.ipv6_prefix": lambda: client_ip(ipv6_prefix=value),  # type: ignore[arg-type]
        "client_ip.trusted_hops": lambda: client_ip(trusted_hops=value),  # type: ignore[arg-type]
    }
    return makers[name]


CASES = [
    *[("RedisBackend.timeout", v) for v in [*BAD_SECONDS, 1e12]],
    *[("RedisCache.timeout", v) for v in [*BAD_SECONDS, 1e12]],
    *[("LocalCache.ttl", v) for v in BAD_SECONDS],
    *[("LocalCache.max_entries", v) for v in [0, -1, 1.5, True, "10", NAN]],
    *[("TwoTierCache.ttl", v) for v in [0, -1, NAN, INF, True, "1"]],
    *[("TwoTierCache.lock", v) for v in [0, -1, NAN, INF, "1"]],
    *[("TokenBucket.rate", v) for v in [0, -1, NAN, INF, True, "1", None, 5e-324, 1e-300]],
    *[("TokenBucket.capacity", v) for v in [0, -1, NAN, INF, True, "1", None]],
    *[("CircuitBreaker.recovery_timeout", v) for v in [0, -1, NAN, INF, True, "1"]],
    *[("CircuitBreaker.failure_threshold", v) for v in [0, -1, 1.5, True, "5"]],
    # None is the default: no lifetime for responses without freshness (RFC 9111).
    *[("ResponseCacheMiddleware.ttl", v) for v in BAD_SECONDS if v is not None],
    *[("client_ip.ipv6_prefix", v) for v in [True, False, 0, 129, -1, 64.0, "64"]],
    *[("client_ip.trusted_hops", v) for v in [True, -1, 1.5, "1", NAN]],
]


@pytest.mark.parametrize(("name", "value"), CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_nonsense_is_refused_at_construction_naming_the_parameter(name: str, value: object) -> None:
    param = name.rsplit(".", 1)[1]
    with pytest.raises((ValueError, TypeError)) as refused:
        build(name, value)()
    assert param in str(refused.value)


def test_a_bucket_as_slow_as_redis_allows_is_accepted() -> None:
    # One token a century still fits: the bound only refuses what cannot be computed.
    century = 100 * 365 * 86400.0
    assert rs.TokenBucket(rate=1 / century, capacity=1).try_acquire("k").allowed


@pytest.mark.parametrize("value", [0.001, 0.1, 30, 3600])
def test_sensible_redis_timeouts_pass(value: float) -> None:
    rs.RedisBackend(redis.asyncio.Redis(), timeout=value)


@pytest.mark.parametrize(("timeout", "lease"), [(0.05, 1.0), (0.1, 1.0), (2.0, 10.0)])
def test_the_default_redis_breaker_lets_a_probe_last_a_reconnect(
    timeout: float, lease: float
) -> None:
    # A probe reporting after its lease is ignored by design; with a lease shorter than a
    # reconnect (up to ~4 round trips of `timeout`), a slow Redis stayed half-open.
    for backend in (
        rs.RedisBackend(redis.Redis(), timeout=timeout),
        rs.RedisCache(redis.Redis(), timeout=timeout),
    ):
        assert backend.guard.breaker.config.lease == lease
        backend.close()
