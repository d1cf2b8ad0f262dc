"""The httpx transports' private cache (``cache=``, RFC 9111 with the private rules of
section 3.5), against a real uvicorn server on loopback.

Every scenario runs with ``httpx.Client`` and with ``httpx.AsyncClient`` on asyncio and
trio (the sync client inside the asyncio run only, so it runs once). Time moves with a
FakeClock shared by the cache and the transport: ``Age`` and staleness are exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from support.faultproxy import FaultProxy
from support.uvicorn_server import UvicornServer

import resilience as rs
from resilience.http import normalise_percent
from resilience.integrations.httpx import AsyncResilientTransport, ResilientTransport
from resilience.metrics import Metrics
from resilience.testing import FakeClock

Scope = dict[str, Any]
Reply = tuple[int, dict[str, str], bytes]


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    path: str  # the raw target, percent-encoding as sent
    headers: dict[str, str]


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class Origin:
    """An ASGI app answering each request with ``handler(seen)``; records every request."""

    def __init__(self, handler: Callable[[Seen], Reply]) -> None:
        self.handler = handler
        self.seen: list[Seen] = []

    @property
    def hits(self) -> int:
        return len(self.seen)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        target = scope["raw_path"].decode()
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode()
        seen = Seen(scope["method"], target, {k.decode(): v.decode() for k, v in scope["headers"]})
        self.seen.append(seen)
        status, headers, body = self.handler(seen)
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if "content-length" not in {k.lower() for k in headers}:
            raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


class Http:
    """One API over httpx.Client and httpx.AsyncClient, so a scenario is written once."""

    def __init__(self, transport: Any, base_url: str) -> None:
        self.transport = transport
        self.is_async = isinstance(transport, AsyncResilientTransport)
        self.client: Any = (
            httpx.AsyncClient(transport=transport, base_url=base_url)
            if self.is_async
            else httpx.Client(transport=transport, base_url=base_url)
        )

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.is_async:
            response: httpx.Response = await self.client.request(method, url, **kwargs)
        else:
            response = self.client.request(method, url, **kwargs)
        return response

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def first_chunk(self, url: str) -> bytes:
        """Read one chunk of a streamed response, then close it."""
        if self.is_async:
            async with self.client.stream("GET", url) as response:
                async for chunk in response.aiter_raw():
                    return bytes(chunk)
        else:
            with self.client.stream("GET", url) as response:
                for chunk in response.iter_raw():
                    return bytes(chunk)
        return b""

    async def close(self) -> None:
        if self.is_async:
            await self.client.aclose()
        else:
            self.client.close()


# Three modes, each test once in each: the sync client (inside an asyncio run, which it
# blocks; the server has its own thread and loop), the async client on asyncio, on trio.
MODES = [
    pytest.param(("sync", "asyncio"), id="sync"),
    pytest.param(("async", "asyncio"), id="asyncio"),
    pytest.param(("async", "trio"), id="trio"),
]


@pytest.fixture(scope="module", params=MODES)
def mode(request: pytest.FixtureRequest) -> tuple[str, str]:
    pair: tuple[str, str] = request.param
    return pair


@pytest.fixture(scope="module")
def anyio_backend(mode: tuple[str, str]) -> str:  # the suite's, narrowed by the mode
    return mode[1]


@pytest.fixture
def side(mode: tuple[str, str]) -> str:
    return mode[0]


@pytest.fixture
async def connect(
    side: str, clock: FakeClock, serve: Callable[[Any], UvicornServer]
) -> AsyncIterator[Callable[..., Http]]:
    """``connect(handler, **transport_kwargs)``: a server answering with ``handler``
    and a client whose transport has a local TwoTierCache on the FakeClock."""
    made: list[Http] = []

    def make(origin: Origin, **kwargs: Any) -> Http:
        server = serve(origin)
        kwargs.setdefault("cache", rs.TwoTierCache(local=rs.LocalCache(clock=clock), clock=clock))
        kwargs.setdefault("clock", clock)
        cls = AsyncResilientTransport if side == "async" else ResilientTransport
        http = Http(cls(**kwargs), server.url)
        made.append(http)
        return http

    yield make
    for http in made:
        await http.close()


def status(response: httpx.Response) -> str:
    how: str = response.extensions["resilience.cache"]
    return how


def fixed(
    status_code: int, headers: dict[str, str], body: bytes = b"body"
) -> Callable[[Seen], Reply]:
    def handle(seen: Seen) -> Reply:
        return status_code, headers, body

    return handle


# -- freshness and Age ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_fresh_hit_is_answered_without_a_request_and_age_grows(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60", "Content-Type": "text/plain"}))
    http = connect(origin)
    first = await http.get("/fresh")
    assert (first.text, status(first), first.headers.get("age")) == ("body", "miss", None)
    clock.advance(5)
    second = await http.get("/fresh")
    assert (second.text, status(second), second.headers["age"]) == ("body", "hit", "5")
    assert second.headers["content-type"] == "text/plain"
    clock.advance(50)
    assert (await http.get("/fresh")).headers["age"] == "55"
    assert origin.hits == 1
    clock.advance(5)  # 60 s old: stale, no validator, fetched anew
    assert status(await http.get("/fresh")) == "miss"
    assert origin.hits == 2


@pytest.mark.anyio
async def test_the_key_has_the_method_and_the_whole_url(connect: Callable[..., Http]) -> None:
    origin = Origin(lambda seen: (200, {"Cache-Control": "max-age=60"}, seen.path.encode()))
    http = connect(origin)
    for url in ("/a", "/a?x=1", "/a?x=2", "/b", "/a/"):
        assert (await http.get(url)).text == url
        assert (await http.get(url)).text == url  # each its own entry
    assert origin.hits == 5
    assert status(await http.request("HEAD", "/a")) == "bypass"  # HEAD goes to the origin
    assert origin.hits == 6


# -- validation -----------------------------------------------------------------------------


def _validated(etag: str, *, changed: list[bool] | None = None) -> Callable[[Seen], Reply]:
    """A resource with an ETag and Last-Modified: 304 to a matching condition."""
    modified = "Sun, 06 Nov 1994 08:49:37 GMT"

    def handle(seen: Seen) -> Reply:
        tag = '"v2"' if changed and changed[0] else etag
        if seen.headers.get("if-none-match") == tag:
            return 304, {"ETag": tag, "Cache-Control": "max-age=30", "X-Version": "2"}, b""
        headers = {
            "ETag": tag,
            "Last-Modified": modified,
            "Cache-Control": "max-age=10",
            "X-Version": "1",
        }
        return 200, headers, f"content {tag}".encode()

    return handle


@pytest.mark.anyio
async def test_a_stale_entry_is_revalidated_and_a_304_refreshes_it(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    origin = Origin(_validated('"v1"'))
    http = connect(origin)
    assert (await http.get("/doc")).text == 'content "v1"'
    clock.advance(12)
    again = await http.get("/doc")
    assert status(again) == "revalidated"
    assert again.text == 'content "v1"'  # the stored body
    assert again.headers["x-version"] == "2"  # the 304's fields replace the stored ones
    assert again.headers["age"] == "0"
    assert origin.seen[1].headers["if-none-match"] == '"v1"'
    assert origin.seen[1].headers["if-modified-since"] == "Sun, 06 Nov 1994 08:49:37 GMT"
    clock.advance(20)  # fresh for the 304's max-age=30
    hit = await http.get("/doc")
    assert (status(hit), hit.headers["age"], hit.headers["x-version"]) == ("hit", "20", "2")
    assert origin.hits == 2


@pytest.mark.anyio
async def test_a_changed_resource_replaces_the_entry(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    changed = [False]
    origin = Origin(_validated('"v1"', changed=changed))
    http = connect(origin)
    await http.get("/doc")
    changed[0] = True
    clock.advance(11)
    fresh = await http.get("/doc")
    assert (status(fresh), fresh.text) == ("miss", 'content "v2"')
    assert status(await http.get("/doc")) == "hit"
    assert (await http.get("/doc")).text == 'content "v2"'
    assert origin.hits == 2


@pytest.mark.anyio
async def test_a_304_about_another_response_is_asked_again_unconditionally(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    def handle(seen: Seen) -> Reply:
        if "if-none-match" in seen.headers:  # a 304 naming a tag we do not hold
            return 304, {"ETag": '"other"', "Cache-Control": "max-age=60"}, b""
        return 200, {"ETag": '"mine"', "Cache-Control": "max-age=1"}, b"full"

    origin = Origin(handle)
    http = connect(origin)
    await http.get("/o")
    clock.advance(2)
    response = await http.get("/o")
    assert (response.status_code, status(response), response.text) == (200, "miss", "full")
    assert [("if-none-match" in seen.headers) for seen in origin.seen] == [False, True, False]


@pytest.mark.anyio
async def test_validation_by_last_modified_alone(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    modified = "Sun, 06 Nov 1994 08:49:37 GMT"

    def handle(seen: Seen) -> Reply:
        if seen.headers.get("if-modified-since") == modified:
            return 304, {"Cache-Control": "max-age=10"}, b""
        return 200, {"Last-Modified": modified, "Cache-Control": "max-age=1"}, b"dated"

    origin = Origin(handle)
    http = connect(origin)
    await http.get("/dated")
    clock.advance(2)
    again = await http.get("/dated")
    assert (status(again), again.text) == ("revalidated", "dated")
    assert "if-none-match" not in origin.seen[1].headers


@pytest.mark.anyio
async def test_no_cache_is_revalidated_every_time(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    def handle(seen: Seen) -> Reply:
        if seen.headers.get("if-none-match") == '"n"':
            return 304, {"ETag": '"n"', "Cache-Control": "no-cache"}, b""
        return 200, {"ETag": '"n"', "Cache-Control": "no-cache, max-age=3600"}, b"checked"

    origin = Origin(handle)
    http = connect(origin)
    assert status(await http.get("/nc")) == "miss"
    for _ in range(3):
        response = await http.get("/nc")
        assert (status(response), response.text) == ("revalidated", "checked")
    assert origin.hits == 4
    assert all(seen.headers.get("if-none-match") == '"n"' for seen in origin.seen[1:])


@pytest.mark.anyio
async def test_the_requests_own_directives(connect: Callable[..., Http], clock: FakeClock) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60", "ETag": '"d"'}))
    http = connect(origin)
    await http.get("/r")
    clock.advance(10)
    assert status(await http.get("/r", headers={"Cache-Control": "max-age=5"})) == "miss"
    clock.advance(10)  # stored anew 10 s ago: fresh for 50 s more
    assert status(await http.get("/r", headers={"Cache-Control": "min-fresh=40"})) == "hit"
    assert status(await http.get("/r", headers={"Cache-Control": "min-fresh=55"})) == "miss"
    assert status(await http.get("/r", headers={"Cache-Control": "no-cache"})) == "miss"
    assert status(await http.get("/r", headers={"Pragma": "no-cache"})) == "miss"
    assert status(await http.get("/r")) == "hit"
    assert origin.hits == 5
    clock.advance(100)  # kept past its freshness: it has a validator
    stale = await http.get("/r", headers={"Cache-Control": "max-stale"})
    assert (status(stale), stale.headers["age"]) == ("hit", "100")
    assert status(await http.get("/r", headers={"Cache-Control": "max-stale=30"})) != "hit"
    gone = await http.get("/other", headers={"Cache-Control": "only-if-cached"})
    assert gone.status_code == 504
    assert origin.hits == 6
    # The caller's own conditions and ranges are the origin's to answer.
    assert status(await http.get("/r", headers={"If-None-Match": '"x"'})) == "bypass"
    assert status(await http.get("/r", headers={"Range": "bytes=0-1"})) == "bypass"


# -- Vary, no-store, private ----------------------------------------------------------------


@pytest.mark.anyio
async def test_vary_keeps_a_variant_per_selecting_value(connect: Callable[..., Http]) -> None:
    def handle(seen: Seen) -> Reply:
        language = seen.headers.get("accept-language", "none")
        return 200, {"Cache-Control": "max-age=60", "Vary": "Accept-Language"}, language.encode()

    origin = Origin(handle)
    http = connect(origin)
    assert (await http.get("/v", headers={"Accept-Language": "en"})).text == "en"
    assert (await http.get("/v", headers={"Accept-Language": "fr"})).text == "fr"
    assert (await http.get("/v")).text == "none"
    assert origin.hits == 3
    for language in ("en", "fr", "EN"):  # language tags are case-insensitive
        response = await http.get("/v", headers={"Accept-Language": language})
        assert (status(response), response.text) == ("hit", language.lower())
    assert (await http.get("/v")).text == "none"
    assert origin.hits == 3


@pytest.mark.anyio
async def test_vary_star_and_no_store_are_never_stored(connect: Callable[..., Http]) -> None:
    origin = Origin(
        lambda seen: (
            200,
            {
                "Cache-Control": "max-age=60" + (", no-store" if "ns" in seen.path else ""),
                "Vary": "*",
            }
            if "star" in seen.path
            else {"Cache-Control": "no-store, max-age=60"},
            b"x",
        )
    )
    http = connect(origin)
    for path in ("/ns", "/ns", "/star", "/star"):
        assert status(await http.get(path)) == "miss"
    assert origin.hits == 4
    # A request's own no-store keeps its response out too.
    plain = Origin(fixed(200, {"Cache-Control": "max-age=60"}))
    other = connect(plain)
    await other.get("/q", headers={"Cache-Control": "no-store"})
    assert status(await other.get("/q")) == "miss"


@pytest.mark.anyio
async def test_private_responses_and_credentials_are_stored_per_user(
    connect: Callable[..., Http],
) -> None:
    def handle(seen: Seen) -> Reply:
        who = seen.headers.get("authorization", "nobody")
        return 200, {"Cache-Control": "private, max-age=60"}, who.encode()

    origin = Origin(handle)
    http = connect(origin)
    alice = {"Authorization": "Bearer alice"}
    bob = {"Authorization": "Bearer bob"}
    assert (await http.get("/me", headers=alice)).text == "Bearer alice"
    hit = await http.get("/me", headers=alice)
    assert (status(hit), hit.text) == ("hit", "Bearer alice")  # private: stored here
    assert (await http.get("/me", headers=bob)).text == "Bearer bob"  # never alice's
    assert (await http.get("/me")).text == "nobody"
    assert origin.hits == 3


@pytest.mark.anyio
async def test_set_cookie_is_stored_in_a_private_cache_but_not_replayed(
    connect: Callable[..., Http],
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60", "Set-Cookie": "session=1"}))
    http = connect(origin)
    first = await http.get("/c")
    assert first.headers["set-cookie"] == "session=1"
    # The client now sends the cookie, and requests with other cookies (or none) never
    # share an entry: one miss, then hits.
    assert status(await http.get("/c")) == "miss"
    assert origin.seen[1].headers["cookie"] == "session=1"
    third = await http.get("/c")
    assert (status(third), third.text) == ("hit", "body")
    assert "set-cookie" not in third.headers  # a replay could undo a later cookie
    assert origin.hits == 2


# -- unsafe methods ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_unsafe_methods_invalidate_the_target_and_its_locations(
    connect: Callable[..., Http], serve: Callable[[Any], UvicornServer]
) -> None:
    def handle(seen: Seen) -> Reply:
        if seen.method == "GET":
            return 200, {"Cache-Control": "max-age=600"}, seen.path.encode()
        if seen.path == "/fail":
            return 500, {}, b""
        return 201, {"Location": "/items/2", "Content-Location": "http://elsewhere.test/x"}, b""

    origin = Origin(handle)
    http = connect(origin)
    for path in ("/items", "/items/2", "/items/3", "/fail"):
        await http.get(path)
    assert origin.hits == 4
    response = await http.request("POST", "/items", json={"n": 1})
    assert (response.status_code, status(response)) == (201, "bypass")
    assert status(await http.get("/items")) == "miss"  # its own URI
    assert status(await http.get("/items/2")) == "miss"  # its Location, same origin
    assert status(await http.get("/items/3")) == "hit"
    assert (await http.request("POST", "/fail")).status_code == 500  # an error evicts nothing
    assert status(await http.get("/fail")) == "hit"
    for method in ("PUT", "PATCH", "DELETE"):
        await http.request(method, "/items/3")
        assert status(await http.get("/items/3")) == "miss"


# -- stale-if-error -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stale_if_error_answers_while_the_hosts_breaker_is_open(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=10, stale-if-error=60"}, b"old"))
    http = connect(origin, breaker=rs.CircuitBreaker("sie", failure_threshold=1, clock=clock))
    await http.get("/s")
    (breaker,) = http.transport.breakers.values()
    breaker.force_open()
    assert status(await http.get("/s")) == "hit"  # fresh: the breaker is not asked
    clock.advance(30)
    stale = await http.get("/s")
    assert (status(stale), stale.text, stale.headers["age"]) == ("stale-if-error", "old", "30")
    assert origin.hits == 1
    clock.advance(40)  # 70 s old: past max-age + stale-if-error
    with pytest.raises(rs.CircuitOpenError):
        await http.get("/s")
    without = Origin(fixed(200, {"Cache-Control": "max-age=10"}))
    plain = connect(without, breaker=rs.CircuitBreaker("nosie", failure_threshold=1, clock=clock))
    await plain.get("/s")
    (other,) = plain.transport.breakers.values()
    other.force_open()
    clock.advance(11)
    with pytest.raises(rs.CircuitOpenError):  # the response did not allow it
        await plain.get("/s")


@pytest.mark.anyio
async def test_stale_if_error_answers_for_a_5xx(
    connect: Callable[..., Http], clock: FakeClock
) -> None:
    down = [False]

    def handle(seen: Seen) -> Reply:
        if down[0]:
            return 503, {}, b"down"
        if seen.path == "/no":
            return 200, {"Cache-Control": "max-age=10"}, b"up"
        return 200, {"Cache-Control": "max-age=10, stale-if-error=60"}, b"up"

    origin = Origin(handle)
    http = connect(origin)
    await http.get("/yes")
    await http.get("/no")
    down[0] = True
    clock.advance(20)
    stale = await http.get("/yes")
    assert (stale.status_code, status(stale), stale.text) == (200, "stale-if-error", "up")
    failed = await http.get("/no")
    assert (failed.status_code, failed.text) == (503, "down")  # not allowed: the error
    down[0] = False
    assert status(await http.get("/yes")) == "miss"  # the origin answers again
    assert status(await http.get("/no")) == "miss"  # the 503 did not evict the entry...
    assert origin.hits == 6


@pytest.mark.anyio
async def test_stale_if_error_answers_when_the_origin_is_unreachable(
    side: str, clock: FakeClock, serve: Callable[[Any], UvicornServer]
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=1, stale-if-error=600"}, b"kept"))
    server = serve(origin)
    cache = rs.TwoTierCache(local=rs.LocalCache(clock=clock), clock=clock)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        cls = AsyncResilientTransport if side == "async" else ResilientTransport
        http = Http(cls(cache=cache, clock=clock), f"http://127.0.0.1:{proxy.port}")
        try:
            await http.get("/u")
            proxy.cut()
            clock.advance(5)
            stale = await http.get("/u")
            assert (status(stale), stale.text) == ("stale-if-error", "kept")
            with pytest.raises(httpx.TransportError):
                await http.get("/never-stored")
        finally:
            await http.close()


# -- bodies: complete only, huge ones passed through ---------------------------------------


class Truncating:
    """Promises 100 bytes, sends 10 and stops: the connection ends mid-body."""

    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        self.hits += 1
        headers = [(b"cache-control", b"max-age=60"), (b"content-length", b"100")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
        raise RuntimeError("the origin dies mid-body")


@pytest.mark.anyio
async def test_a_truncated_body_is_never_stored(
    connect: Callable[..., Http], side: str, clock: FakeClock, serve: Callable[[Any], UvicornServer]
) -> None:
    app = Truncating()
    server = serve(app)
    cache = rs.TwoTierCache(local=rs.LocalCache(clock=clock), clock=clock)
    cls = AsyncResilientTransport if side == "async" else ResilientTransport
    http = Http(cls(cache=cache, clock=clock), server.url)
    try:
        for _ in range(2):
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/t")
    finally:
        await http.close()
    assert app.hits == 2


# On trio, httpx's own async generators, abandoned by a partial read, warn when collected
# (plain httpx does the same); the cache adds no generator of its own.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.anyio
async def test_a_body_read_in_part_is_not_stored(connect: Callable[..., Http]) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60"}, b"x" * 200_000))
    http = connect(origin)
    assert (await http.first_chunk("/part")).startswith(b"x")
    assert status(await http.get("/part")) == "miss"  # the partial read stored nothing
    whole = await http.get("/part")
    assert (status(whole), len(whole.content)) == ("hit", 200_000)
    assert origin.hits == 2


@pytest.mark.anyio
async def test_encoded_bodies_are_stored_as_sent_and_decoded_on_a_hit(
    connect: Callable[..., Http],
) -> None:
    text = b"compressible " * 500
    headers = {"Cache-Control": "max-age=60", "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    origin = Origin(fixed(200, headers, gzip.compress(text)))
    http = connect(origin)
    assert (await http.get("/z")).content == text
    hit = await http.get("/z")
    assert (status(hit), hit.content, hit.headers["content-encoding"]) == ("hit", text, "gzip")
    assert origin.hits == 1


@pytest.mark.anyio
async def test_a_huge_body_passes_through_whole_and_unstored(connect: Callable[..., Http]) -> None:
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60"}, big))
    http = connect(origin)
    for _ in range(2):
        response = await http.get("/big")
        assert (status(response), response.content == big) == ("miss", True)
    small = connect(
        Origin(fixed(200, {"Cache-Control": "max-age=60"}, b"y" * 100)), cache_max_body=99
    )
    await small.get("/y")
    assert status(await small.get("/y")) == "miss"
    assert origin.hits == 2


class Streaming:
    """A chunked body, with no Content-Length, sent in ``parts``."""

    def __init__(self, parts: list[bytes], cache_control: bytes) -> None:
        self.parts = parts
        self.cache_control = cache_control
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        self.hits += 1
        headers = [(b"cache-control", self.cache_control)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for part in self.parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.anyio
async def test_streamed_bodies_are_stored_whole_or_passed_through(
    side: str, clock: FakeClock, serve: Callable[[Any], UvicornServer]
) -> None:
    cls = AsyncResilientTransport if side == "async" else ResilientTransport
    cache = rs.TwoTierCache(local=rs.LocalCache(clock=clock), clock=clock)
    kept = Streaming([b"a" * 1000] * 5, b"max-age=60")
    huge = Streaming([b"b" * 65536] * 40, b"max-age=60")  # 2.5 MiB, no Content-Length
    never = Streaming([b"c"] * 3, b"no-store")
    for app, first, second in (
        (kept, "miss", "hit"),
        (huge, "miss", "miss"),
        (never, "miss", "miss"),
    ):
        server = serve(app)
        http = Http(cls(cache=cache, clock=clock), server.url)
        try:
            one, two = await http.get("/"), await http.get("/")
            assert (status(one), status(two)) == (first, second)
            assert one.content == two.content == b"".join(app.parts)
        finally:
            await http.close()
    assert (kept.hits, huge.hits, never.hits) == (1, 2, 2)


# -- hostile keys ---------------------------------------------------------------------------


def test_percent_encoding_is_normalised_only_where_meaning_is_kept() -> None:
    assert normalise_percent("/%7euser/%41%2f") == "/~user/A%2F"
    assert normalise_percent("/a%2Fb") != normalise_percent("/a/b")
    assert normalise_percent("/x%3Fy") == "/x%3Fy"
    assert normalise_percent("/bad%zz%4") == "/bad%zz%4"
    assert normalise_percent("q=%e2%82%ac") == "q=%E2%82%AC"


@pytest.mark.anyio
async def test_no_spelling_of_a_url_reaches_another_urls_entry(
    connect: Callable[..., Http],
) -> None:
    origin = Origin(lambda seen: (200, {"Cache-Control": "max-age=60"}, seen.path.encode()))
    http = connect(origin)
    assert (await http.get("/a%2Fb")).text == "/a%2Fb"
    assert (await http.get("/a/b")).text == "/a/b"  # an encoded slash is another path
    assert (await http.get("/a%2fb")).text == "/a%2Fb"  # the same one, other hex case
    assert (await http.get("/x%3Fy")).text == "/x%3Fy"
    assert (await http.get("/x?y")).text == "/x?y"  # a query is not an encoded "?"
    assert (await http.get("/%7Euser")).text == "/%7Euser"
    assert (await http.get("/~user")).text == "/%7Euser"  # an unreserved character
    assert (await http.get("/q?v=%41")).text == "/q?v=%41"
    assert (await http.get("/q?v=A")).text == "/q?v=%41"
    assert origin.hits == 6


# -- shared tiers, outages, metrics, threads ------------------------------------------------


@pytest.mark.anyio
async def test_a_redis_tier_shares_entries_between_transports(
    side: str,
    anyio_backend: str,
    serve: Callable[[Any], UvicornServer],
    redis_url: str,
    redis_prefix: str,
) -> None:
    if side == "async" and anyio_backend != "asyncio":
        pytest.skip("redis.asyncio runs on asyncio only")
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60", "ETag": '"r"'}, b"shared"))
    server = serve(origin)
    module: Any = redis.asyncio if side == "async" else redis
    clients = [module.Redis.from_url(redis_url) for _ in range(2)]
    caches = [
        rs.TwoTierCache(local=rs.LocalCache(), remote=rs.RedisCache(c, prefix=redis_prefix))
        for c in clients
    ]
    cls = AsyncResilientTransport if side == "async" else ResilientTransport
    one, two = (Http(cls(cache=cache), server.url) for cache in caches)
    try:
        assert (await one.get("/r")).text == "shared"
        response = await two.get("/r")  # another process's transport, in effect
        assert (status(response), response.text) == ("hit", "shared")
        assert response.headers["etag"] == '"r"'
        caches[1].local.clear()
        assert status(await two.get("/r")) == "hit"  # from Redis again
        assert origin.hits == 1
    finally:
        for http in (one, two):
            await http.close()
        for cache in caches:
            if side == "async":
                await cache.aclose()
            else:
                cache.close()


def test_a_redis_outage_falls_through_to_the_network(
    serve: Callable[[Any], UvicornServer], proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=60"}, b"origin"))
    server = serve(origin)
    client = redis.Redis.from_url(proxy.url_for(redis_url), socket_timeout=0.5)
    cache = rs.TwoTierCache(
        local=rs.LocalCache(), remote=rs.RedisCache(client, prefix=redis_prefix), invalidation=False
    )
    try:
        with httpx.Client(transport=ResilientTransport(cache=cache), base_url=server.url) as http:
            proxy.cut()
            for path in ("/o1", "/o2"):
                response = http.get(path)
                assert (response.status_code, response.text, status(response)) == (
                    200,
                    "origin",
                    "miss",
                )
            assert status(http.get("/o1")) == "hit"  # the local tier kept it meanwhile
            proxy.restore()
    finally:
        cache.close()
        client.close()
    assert origin.hits == 2


def test_metrics_count_the_caches_hits_misses_and_stale_answers(
    serve: Callable[[Any], UvicornServer], clock: FakeClock
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=10, stale-if-error=60"}))
    server = serve(origin)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    heard: list[rs.CacheEvent] = []
    cache = rs.TwoTierCache(local=rs.LocalCache(clock=clock), clock=clock, name="http-private")
    template = rs.CircuitBreaker("metered", failure_threshold=1, clock=clock)
    transport = ResilientTransport(cache=cache, breaker=template, clock=clock)
    metrics.watch(transport)
    cache.add_listener(heard.append)
    with httpx.Client(transport=transport, base_url=server.url) as client:
        client.get("/m")
        client.get("/m")
        client.get("/m")
        (breaker,) = transport.breakers.values()
        breaker.force_open()
        clock.advance(20)
        assert status(client.get("/m")) == "stale-if-error"
    text = generate_latest(registry).decode()
    assert 'cache_hits_total{cache="http-private",tier="local"} 3.0' in text
    assert 'cache_misses_total{cache="http-private",tier="local"} 1.0' in text
    assert 'cache_stale_served_total{cache="http-private"} 1.0' in text
    assert [e.kind for e in heard] == ["miss", "hit", "hit", "hit", "stale"]


def _threads(transport: ResilientTransport, url: str, bodies: list[str]) -> None:
    with httpx.Client(transport=transport, base_url=url) as client:
        client.get("/t")
        barrier = threading.Barrier(8)

        def hammer() -> None:
            barrier.wait()
            for _ in range(50):
                bodies.append(client.get("/t").text)

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)


@pytest.mark.anyio
async def test_threads_and_tasks_share_one_cached_transport(
    side: str, serve: Callable[[Any], UvicornServer]
) -> None:
    origin = Origin(fixed(200, {"Cache-Control": "max-age=600"}, b"many"))
    server = serve(origin)
    cache = rs.TwoTierCache(local=rs.LocalCache())
    bodies: list[str] = []
    if side == "sync":
        _threads(ResilientTransport(cache=cache), server.url, bodies)
    else:
        transport = AsyncResilientTransport(cache=cache)
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as aclient:
            await aclient.get("/t")

            async def ahammer() -> None:
                for _ in range(20):
                    bodies.append((await aclient.get("/t")).text)

            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(ahammer)
    assert bodies == ["many"] * 400
    assert origin.hits == 1


# -- construction ---------------------------------------------------------------------------


def test_cache_construction_errors_name_the_parameter(redis_url: str) -> None:
    bad: object
    for bad in ("cache", {}, rs.LocalCache()):
        with pytest.raises(TypeError, match="cache"):
            ResilientTransport(cache=bad)
        with pytest.raises(TypeError, match="cache"):
            AsyncResilientTransport(cache=bad)
    size: Any
    for size in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cache_max_body"):
            ResilientTransport(cache=rs.TwoTierCache(), cache_max_body=size)
    sync_client = redis.Redis.from_url(redis_url)
    async_client = redis.asyncio.Redis.from_url(redis_url)
    sync_cache = rs.TwoTierCache(remote=rs.RedisCache(sync_client, prefix="x"), invalidation=False)
    async_cache = rs.TwoTierCache(
        remote=rs.RedisCache(async_client, prefix="x"), invalidation=False
    )
    try:
        with pytest.raises(ValueError, match="cache"):
            AsyncResilientTransport(cache=sync_cache)
        with pytest.raises(ValueError, match="cache"):
            ResilientTransport(cache=async_cache)
        assert ResilientTransport(cache=sync_cache).cache is sync_cache
    finally:
        sync_client.close()
        asyncio.run(async_client.aclose())
