"""ResponseCacheMiddleware stores only whole responses, under keys no two URLs share.

Each of these was found by someone attacking the cache: a truncated stream served to
every later client, two URLs poisoning each other's entry, quoted Cache-Control
arguments read as directives. Real uvicorn and httpx where the wire matters; direct
ASGI calls where the app's own misbehaviour is the point.
"""

from __future__ import annotations

import math
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from support.uvicorn_server import UvicornServer
from test_asgi import counting, http, make_app

import resilience as rs
from resilience.integrations.asgi import ResponseCacheMiddleware
from resilience.testing import FakeClock

Message = MutableMapping[str, Any]


# --- truncated bodies ---------------------------------------------------------------------


def test_a_stream_cut_short_by_the_client_is_never_stored(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    cut = threading.Event()  # set once the first client has hung up

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield f"chunk {i:02d}\n".encode()
            if i == 3:  # wait until the client is gone, then go on writing
                await anyio.to_thread.run_sync(cut.wait, 5.0)
            # A real stream awaits between chunks; without that, whether the server
            # reports the disconnect before the last chunk is a race (and a body the
            # app finished before hearing of it is whole, so storing it is fine).
            await anyio.lowlevel.checkpoint()

    async def stream(request: Request) -> Response:
        calls["stream"] += 1
        return StreamingResponse(chunks(), media_type="text/plain")

    app = make_app(
        [Route("/stream", stream)],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0)],
    )
    server = serve(app)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: app.test\r\n\r\n")
        seen = b""
        while b"chunk 03" not in seen:
            seen += sock.recv(4096)
    cut.set()
    with http(server, headers={"host": "app.test"}) as client:
        # The first request ran to its end inside the server or was cut: either way the
        # whole body comes from the app, never a stored fraction.
        whole = client.get("/stream")
        again = client.get("/stream")
    assert whole.text.count("chunk") == 50
    assert again.text.count("chunk") == 50
    assert calls["stream"] >= 2  # the cut response was not served from the cache


async def _call(
    mw: ResponseCacheMiddleware,
    path: str = "/",
    raw: bytes | None = None,
    incoming: str = "http.request",
) -> bytes:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "query_string": b"",
        "headers": [(b"host", b"app.test")],
    }
    if raw is not None:
        scope["raw_path"] = raw
    body = b""

    async def receive() -> Message:
        if incoming != "http.request":
            return {"type": incoming}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal body
        if message["type"] == "http.response.body":
            body += message.get("body", b"")

    await mw(scope, receive, send)
    return body


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


START: Message = {"type": "http.response.start", "status": 200, "headers": []}
PART: Message = {"type": "http.response.body", "body": b"part", "more_body": True}
END: Message = {"type": "http.response.body", "body": b"", "more_body": False}
LONG: Message = {**START, "headers": [(b"content-length", b"100")]}
SHORT: Message = {"type": "http.response.body", "body": b"only ten b"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("messages", "client_leaves"),
    [
        pytest.param([START, PART], False, id="returns-mid-body"),
        pytest.param([LONG, SHORT], False, id="shorter-than-content-length"),
        pytest.param([START, PART, "receive", END], True, id="disconnect-before-the-end"),
    ],
)
async def test_only_a_whole_body_is_stored(
    messages: list[Message | str], client_leaves: bool
) -> None:
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        for message in messages:
            if message == "receive":
                assert (await receive())["type"] == "http.disconnect"
            else:
                await send(message)

    mw = ResponseCacheMiddleware(app, rs.TwoTierCache())
    incoming = "http.disconnect" if client_leaves else "http.request"
    await _call(mw, incoming=incoming)
    await _call(mw, incoming=incoming)
    assert calls == 2


# --- keys -------------------------------------------------------------------------------


def echo_path_app(calls: Counter[str]) -> Any:
    async def echo(request: Request) -> Response:
        calls[request.url.path] += 1
        return PlainTextResponse(f"path={request.url.path!r} query={request.url.query!r}")

    return make_app(
        [Route("/p/{rest:path}", echo)],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0)],
    )


@pytest.mark.parametrize(
    "order",
    [("/p/x%3Fy", "/p/x?y?"), ("/p/x?y?", "/p/x%3Fy")],
    ids=["encoded-first", "query-first"],
)
def test_an_encoded_question_mark_and_a_query_never_share_an_entry(
    order: tuple[str, str], serve: Callable[..., UvicornServer]
) -> None:
    calls: Counter[str] = Counter()
    server = serve(echo_path_app(calls))
    with http(server) as client:
        first = [client.get(u).text for u in order]
        second = [client.get(u).text for u in order]  # both hits now
    assert first[0] != first[1]
    assert second == first
    assert "query='y?'" in dict(zip(order, first, strict=True))["/p/x?y?"]


def test_a_host_with_a_slash_cannot_poison_a_longer_path(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    server = serve(echo_path_app(calls))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
        # Host "app.test/p" with path "/p/x" once read as "http://app.test/p/p/x".
        sock.sendall(b"GET /p/x HTTP/1.1\r\nHost: app.test/p\r\nConnection: close\r\n\r\n")
        while sock.recv(4096):
            pass
    with http(server, headers={"host": "app.test"}) as client:
        victim = client.get("/p/p/x")
    assert "path='/p/p/x'" in victim.text


@pytest.mark.anyio
async def test_without_raw_path_the_decoded_path_is_re_encoded_for_the_key() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    mw = ResponseCacheMiddleware(app, rs.TwoTierCache(), ttl=60.0)
    # "/a?b" as a decoded path must not be served for "/a" with an empty query.
    assert await _call(mw, "/a?b") == b"/a?b"
    assert await _call(mw, "/a") == b"/a"
    assert await _call(mw, "/a?b") == b"/a?b"  # a hit
    assert seen == ["/a?b", "/a"]


# --- Cache-Control --------------------------------------------------------------------------


def lifetimes_app(clock: FakeClock, calls: Counter[str], ttl: float) -> Any:
    cache = rs.TwoTierCache(rs.LocalCache(clock=clock), clock=clock)
    routes = [
        Route("/quoted", counting(calls, "quoted", cache_control='community="a,max-age=9999"')),
        Route("/private-list", counting(calls, "pl", cache_control='private="set-cookie, x"')),
        Route("/upper", counting(calls, "upper", cache_control="Max-Age=60")),
        Route("/no-store-upper", counting(calls, "nsu", cache_control="NO-STORE")),
        Route("/utc", counting(calls, "utc", expires="Thu, 01 Jan 1970 00:01:40 GMT")),
        # RFC 9110 5.6.7: an HTTP-date ends in GMT. email.utils reads "-0000" as a zone;
        # a cache must read it as an invalid Expires, that is, already expired.
        Route("/zone", counting(calls, "zone", expires="Thu, 01 Jan 1970 00:01:40 -0000")),
    ]
    return make_app(routes, [Middleware(ResponseCacheMiddleware, cache=cache, ttl=ttl)])


def test_cache_control_is_parsed_quote_aware_and_case_insensitively(
    serve: Callable[..., UvicornServer],
) -> None:
    clock = FakeClock(wall_start=0.0)  # the epoch: "00:01:40" is 100 s away
    calls: Counter[str] = Counter()
    server = serve(lifetimes_app(clock, calls, ttl=10.0))
    paths = ["/quoted", "/private-list", "/upper", "/no-store-upper", "/utc", "/zone"]
    with http(server) as client:

        def counts() -> list[str]:
            return [client.get(p).text.split()[1] for p in paths]

        assert counts() == ["1", "1", "1", "1", "1", "1"]
        # private="...", NO-STORE and an Expires that is no HTTP-date: never served
        assert counts() == ["1", "2", "1", "2", "1", "2"]
        clock.advance(11.0)  # past ttl=10: the quoted max-age=9999 is data, not a directive
        assert counts() == ["2", "3", "1", "3", "1", "3"]
        clock.advance(50.0)  # 61 s: Max-Age=60 is over; the Expires (GMT) is still ahead
        assert counts() == ["3", "4", "2", "4", "1", "4"]
        clock.advance(40.0)  # 101 s: past the Expires
        assert counts()[4] == "2"


@pytest.mark.parametrize("ttl", [math.inf, -math.inf, math.nan, 0, -1, True, "60"])
def test_ttl_must_be_finite_and_positive(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        ResponseCacheMiddleware(lambda *a: None, rs.TwoTierCache(), ttl=ttl)  # type: ignore[arg-type]
