"""Middleware details checked with direct ASGI calls (the uvicorn tests are in test_asgi.py)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import resilience as rs
from resilience.integrations.asgi import RateLimitMiddleware

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


START: dict[str, Any] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain")],
}


async def reusing_app(scope: Any, receive: Any, send: Any) -> None:
    await send(START)  # the same dict on every request, as some apps do
    await send({"type": "http.response.body", "body": b"ok"})


async def test_rate_limit_fields_never_pile_up_on_a_reused_start_message() -> None:
    mw = RateLimitMiddleware(reusing_app, limiter=rs.TokenBucket(100, 100))
    scope = {
        "type": "http",
        "path": "/",
        "method": "GET",
        "client": ("192.0.2.1", 1),
        "headers": [],
    }
    for _ in range(3):
        sent: list[Any] = []

        async def send(message: Any, sent: list[Any] = sent) -> None:
            sent.append(message)

        async def receive() -> Any:
            return {"type": "http.request"}

        await mw(scope, receive, send)
        names = [k for k, _ in sent[0]["headers"]]
        assert names.count(b"ratelimit") == 1
        assert names.count(b"ratelimit-policy") == 1
    assert START["headers"] == [(b"content-type", b"text/plain")]


def test_cache_parts_reject_bad_names_prefixes_and_statuses() -> None:
    from resilience.integrations.asgi import ResponseCacheMiddleware

    with pytest.raises(ValueError, match="name"):
        rs.TwoTierCache(name="")
    with pytest.raises(ValueError, match="prefix"):
        ResponseCacheMiddleware(reusing_app, rs.TwoTierCache(), prefix="")
    for bad in (["200"], [99], [True], []):
        with pytest.raises(ValueError, match="statuses"):
            ResponseCacheMiddleware(reusing_app, rs.TwoTierCache(), statuses=bad)  # type: ignore[arg-type]


def test_both_ratelimit_field_paths_round_the_reset_by_one_rule() -> None:
    from resilience.integrations.asgi import ratelimit_headers
    from resilience.integrations.asgi.ratelimit import reset_seconds

    assert [reset_seconds(x) for x in (1.0000000000000002, 1.5, 0.0, -3.0, 999.9 + 0.1)] == [
        1,
        2,
        0,
        0,
        1000,
    ]
    limiter = rs.TokenBucket(100, 100)
    hair = rs.Decision(True, 5, 0.0, 1.0000000000000002, 100)
    limiter.try_acquire = lambda key, cost=1: hair  # type: ignore[method-assign]
    mw = RateLimitMiddleware(reusing_app, limiter=limiter)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    scope = {"type": "http", "path": "/", "method": "GET", "client": ("192.0.2.1", 1)}
    anyio.run(mw, {**scope, "headers": []}, receive, send)
    middleware_field = dict(sent[0]["headers"])[b"ratelimit"]
    helper_field = dict(ratelimit_headers("default", limiter, hair))[b"ratelimit"]
    assert middleware_field == helper_field == b'"default";r=5;t=1'


def _scope() -> dict[str, Any]:
    return {"type": "http", "path": "/", "method": "GET", "client": ("192.0.2.1", 1)}


async def _receive() -> Any:
    return {"type": "http.request"}


async def _gone(message: Any) -> None:
    raise ConnectionResetError("client went away")


async def _failing_app(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("app bug")


async def test_a_client_gone_mid_response_is_no_verdict_and_its_error_goes_on() -> None:
    from resilience.integrations.asgi import CircuitBreakerMiddleware, ConcurrencyLimitMiddleware

    breaker = rs.CircuitBreaker("units-gone", failure_threshold=1)
    limit = rs.ConcurrencyLimit("aimd", initial=5, window=0)
    for mw in (
        CircuitBreakerMiddleware(reusing_app, breaker=breaker),
        ConcurrencyLimitMiddleware(reusing_app, limiter=limit),
    ):
        with pytest.raises(ConnectionResetError):  # the server's own error, not a wrapper
            await mw(_scope(), _receive, _gone)
    assert breaker.state is rs.CircuitState.CLOSED  # one counted failure would open it
    assert limit.in_flight == 0
    assert limit.limit == 5  # no sample, no drop


async def test_an_app_error_is_a_verdict_and_raised_as_it_was() -> None:
    from resilience.integrations.asgi import CircuitBreakerMiddleware

    breaker = rs.CircuitBreaker("units-error", failure_threshold=1)
    mw = CircuitBreakerMiddleware(_failing_app, breaker=breaker)
    with pytest.raises(RuntimeError, match="app bug"):
        await mw(_scope(), _receive, _gone)
    assert breaker.state is rs.CircuitState.OPEN
