"""Rate limiting never switches itself off for a request whose peer is not an IP.

Starlette's TestClient reports its peer as ``"testclient"`` and an app on a Unix socket
has no peer at all; ``client_ip()`` once returned None for both, and the middleware then
neither limited nor sent a header: a user's first test showed no limiting at all.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from support.uvicorn_server import UvicornServer

import resilience as rs
from resilience.integrations.asgi import RateLimitMiddleware, client_ip
from resilience.integrations.asgi.keys import BAD_FORWARDED, NO_PEER

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 here; the client users have is what we test with.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

SLOW = 0.001


async def hello(request: Request) -> Response:
    return PlainTextResponse("hi")


def limited(**key_options: object) -> Starlette:
    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(
        RateLimitMiddleware,
        limiter=rs.TokenBucket(SLOW, 2),
        key=client_ip(**key_options),  # type: ignore[arg-type]
    )
    return app


def test_starlette_testclient_requests_are_limited_and_get_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.WARNING, "resilience.integrations.asgi"),
        TestClient(limited()) as client,
    ):
        responses = [client.get("/") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 429, 429]
    assert responses[0].headers["ratelimit"].startswith('"default";r=1;')
    assert "retry-after" in responses[2].headers
    warnings = [r for r in caplog.records if "client_ip" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per request
    assert "peer:testclient" in warnings[0].getMessage()


def test_an_app_on_a_unix_socket_is_limited_under_the_no_peer_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "app.sock")
        with caplog.at_level(logging.WARNING, "resilience.integrations.asgi"):
            server = UvicornServer(limited(), unix_path=path).start()
            try:
                transport = httpx.HTTPTransport(uds=path)
                with httpx.Client(transport=transport, base_url="http://app") as client:
                    codes = [client.get("/").status_code for _ in range(3)]
            finally:
                server.stop()
    assert codes == [200, 200, 429]
    assert any(NO_PEER in r.getMessage() for r in caplog.records)


def scope(peer: str | None, *headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {
        "type": "http",
        "path": "/",
        "client": None if peer is None else (peer, 1),
        "headers": list(headers),
    }


@pytest.mark.parametrize(
    ("make", "request_scope", "expected"),
    [
        (client_ip, scope(None), NO_PEER),
        (client_ip, scope("testclient"), "peer:testclient"),
        (lambda: client_ip(trusted_proxies=["10.0.0.0/8"]), scope(None), NO_PEER),
        # trusted_hops: the address our proxy wrote is garbage, or there is none at all.
        (
            lambda: client_ip(trusted_hops=1),
            scope("10.0.0.1", (b"x-forwarded-for", b"<script>")),
            BAD_FORWARDED,
        ),
        (lambda: client_ip(trusted_hops=1), scope(None), NO_PEER),
        (lambda: client_ip(trusted_hops=1), scope("10.0.0.1"), "10.0.0.1"),
    ],
)
def test_client_ip_never_returns_no_key(
    make: Callable[[], Callable[[dict[str, object]], str | None]],
    request_scope: dict[str, object],
    expected: str,
) -> None:
    assert make()(request_scope) == expected


def test_a_spoofed_garbage_hop_cannot_escape_the_limit() -> None:
    # With trusted_hops=1 a client that sends garbage as X-Forwarded-For once got no key.
    key = client_ip(trusted_hops=1)
    first = key(scope("10.0.0.1", (b"x-forwarded-for", b"garbage-1")))
    second = key(scope("10.0.0.1", (b"x-forwarded-for", b"garbage-2")))
    assert first == second == BAD_FORWARDED


@pytest.mark.parametrize("prefix", [True, False, 0, 129, -1, 64.0, "64"])
def test_ipv6_prefix_must_be_an_int_in_range(prefix: object) -> None:
    with pytest.raises(ValueError, match="ipv6_prefix"):
        client_ip(ipv6_prefix=prefix)  # type: ignore[arg-type]
