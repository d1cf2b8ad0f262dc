"""ResponseCacheMiddleware as a driver of resilience.http's rules: defaults, per-route
lifetimes, revalidation, stale-while-revalidate and stale-if-error, invalidation, Range,
targeted fields, and what stays true while all that happens (nothing personal shared,
streaming, the size cap).

Most tests go through the ASGI app with httpx's ASGITransport on asyncio and trio, time
moved by the cache's FakeClock; the ones marked "uvicorn" run a real server.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from support.uvicorn_server import UvicornServer
from test_asgi import http, make_app

import resilience as rs
from resilience.http import format_http_date
from resilience.integrations.asgi import ResponseCacheMiddleware
from resilience.testing import FakeClock

pytestmark = pytest.mark.anyio
START = 1_700_000_000.0


class Origin:
    """A Starlette app whose one route answers with ``headers``/``status``/``body`` (set
    them between requests), counts its calls, records their headers, and answers 304
    when the request's validators match its own, as an origin does."""

    def __init__(self, **headers: str) -> None:
        self.headers: dict[str, str] = {k.replace("_", "-"): v for k, v in headers.items()}
        self.status = 200
        self.body: str | None = None
        self.fail = False
        self.gate: anyio.Event | None = None  # when set, every call waits for it
        self.calls = 0
        self.seen: list[dict[str, str]] = []
        self._called = threading.Condition()  # uvicorn calls it on the server's thread

    def wait_for(self, calls: int, timeout: float = 5.0) -> bool:
        with self._called:
            return self._called.wait_for(lambda: self.calls >= calls, timeout)

    async def endpoint(self, request: Request) -> Response:
        with self._called:
            self.calls += 1
            self._called.notify_all()
        self.seen.append(dict(request.headers))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("the app is down")
        etag = self.headers.get("etag")
        lm = self.headers.get("last-modified")
        inm = request.headers.get("if-none-match")
        ims = request.headers.get("if-modified-since")
        if self.status == 200 and (
            (etag is not None and inm == etag) or (inm is None and lm is not None and ims == lm)
        ):
            return Response(status_code=304, headers=self.headers)
        body = self.body if self.body is not None else f"response {self.calls}"
        return PlainTextResponse(body, status_code=self.status, headers=self.headers)

    def app(self, **options: Any) -> tuple[Any, FakeClock]:
        clock = FakeClock(wall_start=START)
        cache = rs.TwoTierCache(clock=clock)
        routes = [
            Route("/{path:path}", self.endpoint, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
        ]
        return ResponseCacheMiddleware(make_app(routes), cache, **options), clock


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://app.test")


def imf(seconds: float) -> str:
    return format_http_date(START + seconds)


# --- defaults and per-route lifetimes -----------------------------------------------------


async def test_a_response_without_freshness_information_is_not_stored_by_default() -> None:
    origin = Origin()
    app, _ = origin.app()
    async with client(app) as c:
        assert [(await c.get("/")).text for _ in range(2)] == ["response 1", "response 2"]


async def test_last_modified_gives_heuristic_freshness() -> None:
    origin = Origin(last_modified=imf(-1000))  # 10% of 1000 s: fresh for 100 s
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(99)
        hit = await c.get("/")
        assert (hit.text, hit.headers["age"]) == ("response 1", "99")
        clock.advance(2)  # stale: revalidated by date, and the origin says 304
        again = await c.get("/")
    assert again.text == "response 1"
    assert origin.seen[-1]["if-modified-since"] == imf(-1000)


async def test_ttl_and_default_ttl_are_opt_in_lifetimes_per_route() -> None:
    origin = Origin()
    app, clock = origin.app(ttl=10, default_ttl={"/long.*": 100, "/never": None})
    async with client(app) as c:

        async def bodies() -> list[str]:
            return [(await c.get(p)).text for p in ("/long/a", "/other", "/never")]

        assert await bodies() == ["response 1", "response 2", "response 3"]
        assert await bodies() == ["response 1", "response 2", "response 4"]
        clock.advance(11)  # past ttl: /other goes; /long/a has 100 s
        assert await bodies() == ["response 1", "response 5", "response 6"]


async def test_an_opt_in_lifetime_never_overrides_the_origins_own() -> None:
    origin = Origin(cache_control="max-age=5")
    app, clock = origin.app(ttl=100)
    async with client(app) as c:
        await c.get("/")
        clock.advance(6)
        assert (await c.get("/")).text == "response 2"


async def test_an_opt_in_lifetime_only_for_heuristically_cacheable_statuses() -> None:
    origin = Origin()
    origin.status = 201
    app, _ = origin.app(ttl=100)
    async with client(app) as c:
        assert [(await c.get("/")).text for _ in range(2)] == ["response 1", "response 2"]


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"default_ttl": "/a"}, "default_ttl"),
        ({"default_ttl": {"(": 5}}, "default_ttl"),
        ({"default_ttl": {"/a": -5}}, "default_ttl"),
        ({"keep_stale": -1}, "keep_stale"),
        ({"stale_if_error": float("nan")}, "stale_if_error"),
        ({"targeted": "cdn-cache-control"}, "targeted"),
        ({"targeted": ["two words"]}, "targeted"),
        ({"statuses": [200, 600]}, "statuses"),
    ],
)
def test_bad_configuration_names_the_parameter(options: dict[str, Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        ResponseCacheMiddleware(make_app([]), rs.TwoTierCache(), **options)


# --- Age, Date ----------------------------------------------------------------------------


async def test_hits_carry_age_and_the_origins_date() -> None:
    origin = Origin(cache_control="max-age=600", date=imf(-30), age="10")
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        hit = await c.get("/")
    # 4.2.3: the larger of apparent age (30) and Age (10), plus 20 s resident
    assert hit.headers["age"] == "50"
    assert hit.headers["date"] == imf(-30)


async def test_a_stored_response_without_date_gets_the_time_it_arrived() -> None:
    origin = Origin(cache_control="max-age=600")
    app, clock = origin.app()
    async with client(app) as c:
        first = await c.get("/")
        clock.advance(20)
        hit = await c.get("/")
    assert first.headers["date"] == hit.headers["date"] == imf(0)
    assert hit.headers["age"] == "20"


# --- revalidation -------------------------------------------------------------------------


async def test_a_stale_entry_is_revalidated_and_a_304_refreshes_it() -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"', x_version="1")
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(11)
        origin.headers.update({"cache-control": "max-age=100", "x-version": "2"})
        refreshed = await c.get("/")
        clock.advance(50)
        hit = await c.get("/")
    assert origin.calls == 2
    assert origin.seen[1]["if-none-match"] == '"v1"'
    assert (refreshed.text, refreshed.headers["x-version"]) == ("response 1", "2")
    assert (hit.text, hit.headers["x-version"], hit.headers["age"]) == ("response 1", "2", "50")


async def test_a_200_to_a_revalidation_replaces_the_entry() -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"')
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(11)
        origin.headers["etag"] = '"v2"'
        replaced = await c.get("/")
        hit = await c.get("/")
    assert replaced.text == hit.text == "response 2"
    assert hit.headers["etag"] == '"v2"'


async def test_the_clients_own_preconditions_are_not_sent_when_revalidating() -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"')
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(11)
        answer = await c.get("/", headers={"if-none-match": '"v1"', "range": "bytes=0-1"})
    assert origin.seen[1]["if-none-match"] == '"v1"'  # ours, for the entry
    assert "range" not in origin.seen[1]
    assert answer.status_code == 304  # the client's, answered from the refreshed entry


async def test_no_cache_is_stored_and_revalidated_every_time() -> None:
    origin = Origin(cache_control="no-cache", etag='"v1"')
    app, _ = origin.app()
    async with client(app) as c:
        texts = [(await c.get("/")).text for _ in range(3)]
    assert texts == ["response 1"] * 3
    assert origin.calls == 3
    assert [s.get("if-none-match") for s in origin.seen] == [None, '"v1"', '"v1"']


async def test_our_own_etag_is_never_sent_to_the_app() -> None:
    origin = Origin(cache_control="max-age=10, stale-if-error=60")
    app, clock = origin.app()
    async with client(app) as c:
        first = await c.get("/")
        clock.advance(11)
        await c.get("/")
    assert first.headers["etag"].startswith('"')  # a content hash, for clients
    assert "if-none-match" not in origin.seen[1]


async def test_an_entry_with_a_validator_is_kept_keep_stale_seconds() -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"')
    app, clock = origin.app(keep_stale=100)
    async with client(app) as c:
        await c.get("/")
        clock.advance(105)  # 95 s stale: still kept, so a 304 can refresh it
        await c.get("/")
        clock.advance(200)  # 190 s stale after its refresh: gone, fetched whole
        await c.get("/")
    assert [s.get("if-none-match") for s in origin.seen] == [None, '"v1"', None]


async def test_a_304_that_adds_a_cookie_is_served_once_and_not_kept() -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"')
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(11)
        origin.headers["set-cookie"] = "id=alice"
        alice = await c.get("/")
        c.cookies.clear()
        del origin.headers["set-cookie"]
        bob = await c.get("/")
    assert alice.headers["set-cookie"] == "id=alice"
    assert "set-cookie" not in bob.headers
    assert origin.calls == 3  # the entry went with alice's answer


async def test_a_stale_head_goes_to_the_app_and_its_200_refreshes_the_entry() -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"')
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(11)
        origin.headers["cache-control"] = "max-age=100"
        head = await c.head("/")
        clock.advance(50)
        hit = await c.get("/")
    assert head.status_code == 200
    assert origin.calls == 2
    assert (hit.text, hit.headers["age"]) == ("response 1", "50")


# --- serving stale ------------------------------------------------------------------------


async def test_stale_while_revalidate_serves_stale_and_revalidates_once_in_the_background() -> None:
    origin = Origin(cache_control="max-age=10, stale-while-revalidate=60", etag='"v1"')
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        origin.headers["etag"] = '"v2"'
        origin.gate = anyio.Event()  # the revalidation waits until four answers are out
        answers: list[httpx.Response] = []

        async def get() -> None:
            answers.append(await c.get("/"))
            if len(answers) == 4:
                assert origin.gate is not None
                origin.gate.set()

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(get)
        fresh = await c.get("/")
    assert [a.text for a in answers] == ["response 1"] * 5
    assert all(a.headers["age"] == "20" for a in answers)
    assert origin.calls == 2  # one background revalidation for five stale answers
    assert fresh.text == "response 2"


async def test_past_stale_while_revalidate_the_client_waits_for_the_app() -> None:
    origin = Origin(cache_control="max-age=10, stale-while-revalidate=5", etag='"v1"')
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        origin.headers["etag"] = '"v2"'
        assert (await c.get("/")).text == "response 2"


@pytest.mark.parametrize("failure", ["503", "raises"])
async def test_stale_if_error_serves_the_entry_when_the_app_fails(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    origin = Origin(cache_control="max-age=10, stale-if-error=60")
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        if failure == "503":
            origin.status = 503
        else:
            origin.fail = True
        with caplog.at_level(logging.WARNING, "resilience.integrations.asgi"):
            stale = await c.get("/")
        clock.advance(60)  # past the window: the failure shows
        failed = await c.get("/")
    assert (stale.status_code, stale.text, stale.headers["age"]) == (200, "response 1", "20")
    assert failed.status_code in (500, 503)
    if failure == "raises":
        assert "stale-if-error" in caplog.text


async def test_an_app_that_keeps_failing_warns_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    origin = Origin(cache_control="max-age=10, stale-if-error=600")
    app, clock = origin.app()
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        origin.fail = True
        with caplog.at_level(logging.DEBUG, "resilience.integrations.asgi"):
            for _ in range(5):
                assert (await c.get("/")).text == "response 1"
            origin.fail = False  # it recovers: the next streak warns again
            fresh = (await c.get("/")).text
            assert fresh != "response 1"
            clock.advance(20)
            origin.fail = True
            assert (await c.get("/")).text == fresh
    served = [r for r in caplog.records if "stale-if-error" in r.getMessage()]
    levels = [r.levelno for r in served]
    assert levels == [logging.WARNING, *[logging.DEBUG] * 4, logging.WARNING]


async def test_stale_if_error_as_your_default_for_silent_responses() -> None:
    origin = Origin(cache_control="max-age=10")
    app, clock = origin.app(stale_if_error=60)
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        origin.status = 503
        assert (await c.get("/")).text == "response 1"


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=10"])
async def test_nothing_forbidden_is_served_stale(directive: str) -> None:
    origin = Origin(cache_control=f"max-age=10, {directive}, stale-if-error=60", etag='"v1"')
    app, clock = origin.app(stale_if_error=60)
    async with client(app) as c:
        await c.get("/")
        clock.advance(20)
        origin.status = 503
        assert (await c.get("/")).status_code == 503


async def test_only_if_cached_gets_504_without_a_fresh_entry() -> None:
    origin = Origin(cache_control="max-age=10")
    app, _ = origin.app()
    async with client(app) as c:
        miss = await c.get("/", headers={"cache-control": "only-if-cached"})
        await c.get("/")
        hit = await c.get("/", headers={"cache-control": "only-if-cached"})
    assert (miss.status_code, hit.status_code, origin.calls) == (504, 200, 1)


# --- invalidation -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_unsafe_requests_invalidate_every_variant_of_the_target(method: str) -> None:
    origin = Origin(cache_control="max-age=600", vary="Accept-Language")
    app, _ = origin.app()
    async with client(app) as c:
        en, de = {"accept-language": "en"}, {"accept-language": "de"}
        await c.get("/page", headers=en)
        await c.get("/page", headers=de)
        await c.request(method, "/page")
        after = [(await c.get("/page", headers=h)).text for h in (en, de)]
    assert after == ["response 4", "response 5"]


async def test_location_and_content_location_on_the_same_origin_are_invalidated() -> None:
    origin = Origin(cache_control="max-age=600")
    app, _ = origin.app()
    async with client(app) as c:
        for path in ("/a", "/b", "/c"):
            await c.get(path)
        origin.headers.update({"location": "/a", "content-location": "http://app.test/b"})
        origin.status = 201
        await c.post("/new")
        origin.status = 200
        del origin.headers["location"], origin.headers["content-location"]
        texts = [(await c.get(p)).text for p in ("/a", "/b", "/c")]
    assert texts == ["response 5", "response 6", "response 3"]


async def test_an_error_response_invalidates_nothing() -> None:
    origin = Origin(cache_control="max-age=600")
    app, _ = origin.app()
    async with client(app) as c:
        await c.get("/")
        origin.status = 500
        await c.post("/")
        origin.status = 200
        assert (await c.get("/")).text == "response 1"


# --- clients' conditional requests, Vary, Range --------------------------------------------


async def test_if_modified_since_gets_304_from_a_stored_response() -> None:
    origin = Origin(cache_control="max-age=600", last_modified=imf(-3600))
    app, _ = origin.app()
    async with client(app) as c:
        await c.get("/")
        same = await c.get("/", headers={"if-modified-since": imf(-3600)})
        older = await c.get("/", headers={"if-modified-since": imf(-7200)})
    assert (same.status_code, same.content) == (304, b"")
    assert same.headers["last-modified"] == imf(-3600)
    assert older.status_code == 200


async def test_vary_matches_normalised_values() -> None:
    origin = Origin(cache_control="max-age=600", vary="Accept-Encoding, X-Tags")
    app, _ = origin.app()
    async with client(app) as c:
        first = await c.get("/", headers={"accept-encoding": "gzip, br", "x-tags": "a,b"})
        same = await c.get("/", headers={"accept-encoding": "br,gzip", "x-tags": " a, b "})
        other = await c.get("/", headers={"accept-encoding": "br,gzip", "x-tags": "b, a"})
    assert first.text == same.text == "response 1"
    assert other.text == "response 2"  # X-Tags' order may matter: kept


@pytest.mark.parametrize(
    ("spec", "status", "body", "content_range"),
    [
        ("bytes=0-3", 206, b"0123", "bytes 0-3/10"),
        ("bytes=-2", 206, b"89", "bytes 8-9/10"),
        ("bytes=20-", 416, b"", "bytes */10"),
        ("bytes=0-1,4-5", 200, b"0123456789", None),
    ],
)
async def test_range_requests_are_served_from_a_stored_response(
    spec: str, status: int, body: bytes, content_range: str | None
) -> None:
    origin = Origin(cache_control="max-age=600")
    origin.body = "0123456789"
    app, _ = origin.app()
    async with client(app) as c:
        await c.get("/")
        answer = await c.get("/", headers={"range": spec})
    assert (answer.status_code, answer.content) == (status, body)
    assert answer.headers.get("content-range") == content_range
    assert origin.calls == 1


async def test_if_range_with_another_validator_gets_the_whole_body() -> None:
    origin = Origin(cache_control="max-age=600", etag='"v1"')
    origin.body = "0123456789"
    app, _ = origin.app()
    async with client(app) as c:
        await c.get("/")
        same = await c.get("/", headers={"range": "bytes=0-1", "if-range": '"v1"'})
        other = await c.get("/", headers={"range": "bytes=0-1", "if-range": '"v0"'})
    assert (same.status_code, other.status_code) == (206, 200)


async def test_a_range_miss_goes_to_the_app_and_a_206_is_never_stored() -> None:
    async def partial(request: Request) -> Response:
        return Response(
            b"0123",
            status_code=206,
            headers={"cache-control": "max-age=600", "content-range": "bytes 0-3/10"},
        )

    app = ResponseCacheMiddleware(make_app([Route("/", partial)]), rs.TwoTierCache())
    async with client(app) as c:
        ranged = await c.get("/", headers={"range": "bytes=0-3"})
        whole = await c.get("/")
    assert ranged.status_code == whole.status_code == 206  # the app's, each time


# --- targeted fields, must-understand, stored fields ---------------------------------------


async def test_our_targeted_field_steers_this_cache_apart_from_browsers() -> None:
    origin = Origin(cache_control="no-store", resilience_cache_control="max-age=60")
    app, _ = origin.app()
    async with client(app) as c:
        texts = [(await c.get("/")).text for _ in range(2)]
        hit = await c.get("/")
    assert texts == ["response 1", "response 1"]
    assert hit.headers["cache-control"] == "no-store"  # what browsers see, unchanged


async def test_the_target_list_is_configurable() -> None:
    origin = Origin(cache_control="max-age=60", cdn_cache_control="no-store", edge="max-age=5")
    app, clock = origin.app(targeted=["edge"])
    async with client(app) as c:
        await c.get("/")
        assert (await c.get("/")).text == "response 1"  # Edge, not CDN-Cache-Control
        clock.advance(6)
        assert (await c.get("/")).text == "response 2"


async def test_must_understand_lets_a_known_status_be_stored_despite_no_store() -> None:
    origin = Origin(cache_control="must-understand, no-store, max-age=60")
    app, _ = origin.app()
    async with client(app) as c:
        assert [(await c.get("/")).text for _ in range(2)] == ["response 1"] * 2


async def test_fields_named_by_connection_and_qualified_no_cache_are_not_stored() -> None:
    origin = Origin(cache_control='max-age=60, no-cache="x-secret"', x_secret="s", x_public="p")
    app, _ = origin.app()
    async with client(app) as c:
        await c.get("/")
        hit = await c.get("/")
    assert hit.text == "response 1"  # the qualified form still allows reuse ...
    assert "x-secret" not in hit.headers  # ... without the fields it names
    assert hit.headers["x-public"] == "p"


async def test_a_streamed_revalidation_answer_passes_through_and_is_stored() -> None:
    calls = Counter[str]()

    async def stream(request: Request) -> Response:
        calls["n"] += 1
        n = calls["n"]

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"{n}.{i};".encode()
                await anyio.lowlevel.checkpoint()

        return StreamingResponse(chunks(), headers={"cache-control": "max-age=10"})

    clock = FakeClock(wall_start=START)
    app = ResponseCacheMiddleware(make_app([Route("/", stream)]), rs.TwoTierCache(clock=clock))
    async with client(app) as c:
        await c.get("/")
        clock.advance(11)
        replaced = await c.get("/")
        hit = await c.get("/")
    assert replaced.text == hit.text == "2.0;2.1;2.2;"
    assert calls["n"] == 2


# --- end to end, uvicorn ------------------------------------------------------------------


def uvicorn_origin(origin: Origin, **options: Any) -> tuple[Any, FakeClock]:
    clock = FakeClock(wall_start=START)
    routes: Sequence[Route] = [
        Route("/{path:path}", origin.endpoint, methods=["GET", "HEAD", "POST"])
    ]
    cache = rs.TwoTierCache(clock=clock)
    app = make_app(routes, [Middleware(ResponseCacheMiddleware, cache=cache, **options)])
    return app, clock


def test_uvicorn_revalidation_304_and_age(serve: Callable[..., UvicornServer]) -> None:
    origin = Origin(cache_control="max-age=10", etag='"v1"')
    app, clock = uvicorn_origin(origin)
    server = serve(app, date_header=False)  # the cache's Date is the only one
    with http(server) as c:
        first = c.get("/")
        clock.advance(11)
        refreshed = c.get("/")
        conditional = c.get("/", headers={"if-none-match": '"v1"'})
    assert refreshed.text == first.text == "response 1"
    assert refreshed.headers["age"] == "0"
    assert refreshed.headers["date"] == imf(11)  # the 304's Date (the app sent none)
    assert conditional.status_code == 304
    assert origin.calls == 2


def test_uvicorn_stale_while_revalidate_in_the_background(
    serve: Callable[..., UvicornServer],
) -> None:
    origin = Origin(cache_control="max-age=10, stale-while-revalidate=60", etag='"v1"')
    app, clock = uvicorn_origin(origin)
    server = serve(app)
    with http(server) as c:
        c.get("/")
        clock.advance(20)
        origin.headers["etag"] = '"v2"'
        stale = c.get("/")
        assert origin.wait_for(2)  # the background request, after the stale answer
        fresh = c.get("/")
    assert stale.text == "response 1"
    assert fresh.text == "response 2"
    assert origin.calls == 2


def test_uvicorn_post_invalidates_and_range_is_served(
    serve: Callable[..., UvicornServer],
) -> None:
    origin = Origin(cache_control="max-age=600")
    origin.body = "0123456789"
    app, _ = uvicorn_origin(origin)
    server = serve(app)
    with http(server) as c:
        c.get("/doc")
        ranged = c.get("/doc", headers={"range": "bytes=2-4"})
        c.post("/doc")
        after = c.get("/doc")
    assert (ranged.status_code, ranged.content) == (206, b"234")
    assert ranged.headers["content-range"] == "bytes 2-4/10"
    assert origin.calls == 3  # GET, POST, and the GET after it
    assert after.status_code == 200
