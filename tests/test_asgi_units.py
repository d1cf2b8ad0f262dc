"""Middleware details checked with direct ASGI calls (the uvicorn tests are in test_asgi.py)."""

from __future__ import annotations

from typing import Any

import pytest
from resilience.integrations.asgi import RateLimitMiddleware

import resilience as rs

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
