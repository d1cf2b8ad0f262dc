"""The ASGI middleware end to end: a real uvicorn server, a real HTTP client, real Redis.

Every app here is served by uvicorn on a free loopback port (``support.uvicorn_server``,
with ``proxy_headers=False`` so uvicorn itself never rewrites the client address) and
talked to with httpx over TCP.

1. RateLimitMiddleware: RateLimit fields, 429 + Retry-After, rules, exempt paths, keys.
2. client_ip: X-Forwarded-For / Forwarded only from trusted proxies, hops, IPv6 /64.
3. ResponseCacheMiddleware: the cache-leak checklist, on a local-only cache and on two
   instances sharing Redis (an entry written by one is served by the other).
4. Streaming, background tasks and contextvars through all three middlewares.
5. WebSocket and lifespan pass through.
6. CircuitBreakerMiddleware: 5xx and exceptions trip it, disconnects do not, rules.
7. A Redis outage under load, for each ``on_error`` policy.
8. Construction errors.
9. FastAPI (skipped when fastapi is not installed).
10. metrics_app.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` pin bugs that are still open.
"""

from __future__ import annotations

import contextvars
import queue
import re
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from support.faultproxy import FaultProxy
from support.uvicorn_server import UvicornServer
from support.ws_client import WebSocketClient, server_supports_websockets

import resilience as rs
from resilience.integrations.asgi import (
    CircuitBreakerMiddleware,
    RateLimitMiddleware,
    ResponseCacheMiddleware,
    Rule,
    client_ip,
    first,
    header,
    join,
    metrics_app,
    path_template,
)
from resilience.testing import FakeClock

SAFE = 1.0  # Redis timeout where no outage is staged: a busy shared Redis must not fail a test
RECOVERY = 0.1  # recovery_timeout of the breaker around Redis in the outage tests
SLOW = 0.001  # tokens per second: effectively no refill during a test

Closer = Callable[[], Awaitable[object]]
Endpoint = Callable[[Request], Awaitable[Response]]


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs only on asyncio.
    return "asyncio"


# --- helpers -----------------------------------------------------------------------------


def make_app(
    routes: Sequence[BaseRoute],
    middleware: Sequence[Middleware] = (),
    *,
    closers: Sequence[Closer] = (),
) -> Starlette:
    """A Starlette app whose lifespan shutdown awaits ``closers`` on the server's loop."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for close in closers:
                await close()

    return Starlette(routes=list(routes), middleware=list(middleware), lifespan=lifespan)


def counting(calls: Counter[str], name: str, **headers: str) -> Endpoint:
    """An endpoint that counts its calls and answers ``"<name> <count>"``."""
    fields = {k.replace("_", "-"): v for k, v in headers.items()}

    async def endpoint(request: Request) -> Response:
        calls[name] += 1
        return PlainTextResponse(f"{name} {calls[name]}", headers=fields)

    return endpoint


# uvicorn closes the connection after an app exception; a keep-alive client racing that
# close sees a reset on its next request. Requests that make the app raise send this.
CLOSE = {"connection": "close"}


def http(server: UvicornServer, **kwargs: Any) -> httpx.Client:
    # Plain HTTP on loopback: verify=False only skips building an SSL context per client.
    return httpx.Client(base_url=server.url, timeout=5.0, verify=False, **kwargs)


def statuses(client: httpx.Client, path: str, *headers: dict[str, str]) -> list[int]:
    """One GET per headers dict, in order."""
    return [client.get(path, headers=h).status_code for h in headers]


def limited_app(
    key: Callable[[Scope], str | None], capacity: int = 2, **options: Any
) -> tuple[Starlette, Counter[str]]:
    calls: Counter[str] = Counter()
    limiter = rs.TokenBucket(SLOW, capacity)
    app = make_app(
        [Route("/", counting(calls, "root"))],
        [Middleware(RateLimitMiddleware, limiter=limiter, key=key, **options)],
    )
    return app, calls


def fake_scope(peer: str | None, *headers: tuple[str, str], path: str = "/") -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "client": None if peer is None else (peer, 4711),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


# --- 1. RateLimitMiddleware --------------------------------------------------------------


def test_ratelimit_fields_on_allowed_and_limited_responses(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    limiter = rs.TokenBucket(rate=0.4, capacity=3)  # a token per 2.5 s, full after 7.5 s
    app = make_app(
        [Route("/", counting(calls, "root"))],
        [Middleware(RateLimitMiddleware, limiter=limiter)],
    )
    server = serve(app)
    with http(server) as client:
        responses = [client.get("/") for _ in range(4)]

    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert calls["root"] == 3  # the 429 never reached the app
    for r in responses:
        assert r.headers["ratelimit-policy"] == '"default";q=3;w=8'  # 7.5 s window, rounded up
    assert [r.headers["ratelimit"] for r in responses[:3]] == [
        '"default";r=2;t=3',
        '"default";r=1;t=5',
        '"default";r=0;t=8',
    ]
    assert all("retry-after" not in r.headers for r in responses[:3])
    limited = responses[3]
    # 2.5 s minus the few ms the requests took, rounded up to a whole second.
    assert limited.headers["retry-after"] == "3"
    assert limited.headers["ratelimit"] == '"default";r=0;t=8'
    assert limited.headers["content-type"] == "application/json"
    assert limited.json() == {"detail": "Too Many Requests"}


def test_ratelimit_fields_leave_an_app_s_reused_start_message_alone(
    serve: Callable[..., UvicornServer],
) -> None:
    """A raw ASGI app may send one module-level start message on every request: the
    fields go on a copy, so each response has one of each and the app's message and its
    header list stay as they were."""
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    start: Message = {"type": "http.response.start", "status": 200, "headers": headers}
    body: Message = {"type": "http.response.body", "body": b"ok"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send(body)

    limiter = rs.TokenBucket(rate=0.4, capacity=3)
    server = serve(RateLimitMiddleware(app, limiter), lifespan="off")
    with http(server) as client:
        responses = [client.get("/") for _ in range(3)]

    for r in responses:
        assert r.headers.get_list("ratelimit-policy") == ['"default";q=3;w=8']
        assert len(r.headers.get_list("ratelimit")) == 1
    assert [r.headers["ratelimit"].split(";")[1] for r in responses] == ["r=2", "r=1", "r=0"]
    assert start["headers"] is headers
    assert headers == [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    assert set(start) == {"type", "status", "headers"}


def test_rules_pick_limiter_cost_and_name_by_method_and_path(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    default = rs.TokenBucket(SLOW, 100, name="default-bucket")
    login = rs.TokenBucket(SLOW, 2, name="login-bucket")
    search = rs.TokenBucket(SLOW, 10, name="search-bucket")
    rules = [
        Rule(r"/login", limiter=login, methods=("post",), name="login"),  # lower case on purpose
        Rule(r"/search(/.*)?", limiter=search, cost=5, name="search"),
    ]
    app = make_app(
        [
            Route("/login", counting(calls, "login"), methods=["GET", "POST"]),
            Route("/search", counting(calls, "search")),
            Route("/search/deep", counting(calls, "search")),
            Route("/other", counting(calls, "other")),
        ],
        [Middleware(RateLimitMiddleware, limiter=default, rules=rules)],
    )
    server = serve(app)
    with http(server) as client:
        posts = [client.post("/login") for _ in range(3)]
        get_login = client.get("/login")
        searches = [client.get(p) for p in ("/search", "/search/deep", "/search")]
        other = client.get("/other")

    assert [r.status_code for r in posts] == [200, 200, 429]
    assert [r.headers["ratelimit"] for r in posts] == [
        '"login";r=1;t=1000',
        '"login";r=0;t=2000',
        '"login";r=0;t=2000',
    ]
    assert posts[0].headers["ratelimit-policy"] == '"login";q=2;w=2000'
    assert posts[2].headers["retry-after"] == "1000"
    # GET /login matches no rule (the rule is POST only): the default limiter.
    assert get_login.status_code == 200
    assert get_login.headers["ratelimit"].startswith('"default";r=99;')
    assert get_login.headers["ratelimit-policy"] == '"default";q=100;w=100000'
    # Cost 5 out of 10.
    assert [r.status_code for r in searches] == [200, 200, 429]
    assert [r.headers["ratelimit"].split(";t=")[0] for r in searches] == [
        '"search";r=5',
        '"search";r=0',
        '"search";r=0',
    ]
    assert searches[2].headers["retry-after"] == "5000"  # five tokens at 0.001/s
    assert other.headers["ratelimit"].startswith('"default";r=98;')
    assert calls == Counter({"login": 3, "search": 2, "other": 1})


def test_exempt_paths_are_never_limited(serve: Callable[..., UvicornServer]) -> None:
    calls: Counter[str] = Counter()
    limiter = rs.TokenBucket(SLOW, 1)
    app = make_app(
        [
            Route("/", counting(calls, "root")),
            Route("/health", counting(calls, "health")),
            Route("/healthz", counting(calls, "healthz")),
            Route("/static/{name}", counting(calls, "static")),
        ],
        [Middleware(RateLimitMiddleware, limiter=limiter, exempt=[r"/health", r"/static/.*"])],
    )
    server = serve(app)
    with http(server) as client:
        assert statuses(client, "/", {}, {}) == [200, 429]
        health = [client.get("/health") for _ in range(3)]
        static = client.get("/static/app.css")
        healthz = client.get("/healthz")  # exempt patterns match the whole path

    assert [r.status_code for r in health] == [200, 200, 200]
    assert all("ratelimit" not in r.headers for r in [*health, static])
    assert static.status_code == 200
    assert healthz.status_code == 429
    assert calls == Counter({"root": 1, "health": 3, "static": 1})


def test_key_header_falls_back_to_client_ip_with_first(
    serve: Callable[..., UvicornServer],
) -> None:
    app, _ = limited_app(first(header("x-api-key"), client_ip()))
    server = serve(app)
    a, b = {"x-api-key": "key-a"}, {"x-api-key": "key-b"}
    with http(server) as client:
        assert statuses(client, "/", a, a, a) == [200, 200, 429]
        assert statuses(client, "/", b) == [200]  # another key, another bucket
        assert statuses(client, "/", {}, {}, {}) == [200, 200, 429]  # no key: by address
        assert statuses(client, "/", b, b) == [200, 429]


def test_key_path_template_shares_a_bucket_across_ids(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    app = make_app(
        [
            Route("/users/{user_id}", counting(calls, "user")),
            Route("/items/{item_id}", counting(calls, "item")),
        ],
        [Middleware(RateLimitMiddleware, limiter=rs.TokenBucket(SLOW, 2), key=path_template())],
    )
    server = serve(app)
    with http(server) as client:
        assert statuses(client, "/users/1", {}) == [200]
        assert statuses(client, "/users/2", {}) == [200]
        assert statuses(client, "/users/3", {}) == [429]  # one template, one bucket
        assert statuses(client, "/items/1", {}) == [200]
        # Paths that match no route share one "<unmatched>" bucket: no key per junk path.
        assert [client.get(f"/junk/{i}").status_code for i in range(3)] == [404, 404, 429]
    assert calls == Counter({"user": 2, "item": 1})


def test_key_join_is_per_route_and_client_and_none_when_a_part_is_missing(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    key = join(path_template(), header("x-api-key"))
    app = make_app(
        [
            Route("/users/{user_id}", counting(calls, "user")),
            Route("/items/{item_id}", counting(calls, "item")),
        ],
        [Middleware(RateLimitMiddleware, limiter=rs.TokenBucket(SLOW, 1), key=key)],
    )
    server = serve(app)
    a, b = {"x-api-key": "a"}, {"x-api-key": "b"}
    with http(server) as client:
        assert statuses(client, "/users/1", a) == [200]
        assert statuses(client, "/users/2", a) == [429]  # same template, same client
        assert statuses(client, "/users/1", b) == [200]
        assert statuses(client, "/items/1", a) == [200]
        # No API key: join gives None, and a request without a key is not limited.
        unkeyed = [client.get("/users/1") for _ in range(3)]
    assert [r.status_code for r in unkeyed] == [200, 200, 200]
    assert all("ratelimit" not in r.headers for r in unkeyed)


def test_empty_key_header_is_not_a_server_error(serve: Callable[..., UvicornServer]) -> None:
    app, _ = limited_app(first(header("x-api-key"), client_ip()), capacity=5)
    server = serve(app)
    with http(server) as client:
        response = client.get("/", headers={"x-api-key": ""})
    assert response.status_code == 200


def test_rule_methods_given_as_a_string() -> None:
    limiter = rs.TokenBucket(SLOW, 2)
    try:
        rule = Rule(r"/login", limiter=limiter, methods="POST")
    except (TypeError, ValueError):
        return
    assert rule.methods == ("POST",)


# --- 2. client_ip and spoofing -----------------------------------------------------------

XFF = "x-forwarded-for"


def test_xff_from_a_trusted_proxy_keys_by_the_forwarded_client(
    serve: Callable[..., UvicornServer],
) -> None:
    # The test client connects from 127.0.0.1, so here it plays the trusted proxy.
    app, _ = limited_app(client_ip(trusted_proxies=["127.0.0.1"]))
    server = serve(app)
    one, other = {XFF: "203.0.113.7"}, {XFF: "203.0.113.8"}
    with http(server) as client:
        assert statuses(client, "/", one, one, one) == [200, 200, 429]
        assert statuses(client, "/", other, other, other) == [200, 200, 429]
        assert statuses(client, "/", {}) == [200]  # the proxy's own bucket is untouched


def test_spoofed_xff_is_ignored_without_trusted_proxies(
    serve: Callable[..., UvicornServer],
) -> None:
    app, _ = limited_app(client_ip())
    server = serve(app)
    with http(server) as client:
        got = statuses(
            client, "/", {XFF: "203.0.113.7"}, {XFF: "203.0.113.8"}, {XFF: "203.0.113.9"}, {}
        )
    assert got == [200, 200, 429, 429]  # one bucket: 127.0.0.1


def test_leftmost_spoof_through_a_trusted_proxy_keys_by_the_proxys_view(
    serve: Callable[..., UvicornServer],
) -> None:
    key = client_ip(trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    app, _ = limited_app(key)
    server = serve(app)
    with http(server) as client:
        # The client sent "1.1.1.1"; the proxy appended the address it saw.
        spoofed = {XFF: "1.1.1.1, 203.0.113.7"}
        assert statuses(client, "/", spoofed, spoofed) == [200, 200]
        assert statuses(client, "/", {XFF: "203.0.113.7"}) == [429]
        assert statuses(client, "/", {XFF: "9.9.9.9, 203.0.113.7"}) == [429]
        assert statuses(client, "/", {XFF: "1.1.1.1"}) == [200]  # the spoofed value is unused
        # A chain of trusted proxies (127.0.0.1 <- 10.1.2.3) is walked right to left.
        chain = {XFF: "6.6.6.6, 198.51.100.4, 10.1.2.3"}
        assert statuses(client, "/", chain, chain, {XFF: "198.51.100.4"}) == [200, 200, 429]


def test_trusted_hops_takes_the_address_before_our_proxies(
    serve: Callable[..., UvicornServer],
) -> None:
    app, _ = limited_app(client_ip(trusted_hops=1))  # one load balancer: the peer
    server = serve(app)
    with http(server) as client:
        assert statuses(
            client,
            "/",
            {XFF: "6.6.6.6, 203.0.113.7"},
            {XFF: "7.7.7.7, 203.0.113.7"},
            {XFF: "203.0.113.7"},
        ) == [200, 200, 429]
        assert statuses(client, "/", {XFF: "6.6.6.6, 203.0.113.8"}) == [200]


def test_forwarded_header_from_a_trusted_proxy(serve: Callable[..., UvicornServer]) -> None:
    # The proxy writes Forwarded; saying so means a client's own X-Forwarded-For is ignored.
    app, _ = limited_app(client_ip(trusted_proxies=["127.0.0.1"], forwarded_header="forwarded"))
    server = serve(app)
    fwd = "forwarded"
    with http(server) as client:
        assert statuses(
            client,
            "/",
            {fwd: "for=198.51.100.17;proto=http;by=203.0.113.43"},
            {fwd: 'for="198.51.100.17:4711"'},  # the port is not part of the client
            {fwd: "proto=https;for=198.51.100.17"},
        ) == [200, 200, 429]
        assert statuses(client, "/", {fwd: "for=198.51.100.18"}) == [200]
        # IPv6 clients, quoted with brackets and ports, grouped by /64.
        assert statuses(
            client,
            "/",
            {fwd: 'for="[2001:db8:cafe::17]:4711"'},
            {fwd: 'For="[2001:db8:cafe::18]"'},
            {fwd: 'for="[2001:db8:cafe:0:ffff::19]"'},
        ) == [200, 200, 429]
        assert statuses(client, "/", {fwd: 'for="[2001:db8:cafe:1::17]"'}) == [200]


def test_ipv6_grouping_and_chain_walk_unit() -> None:
    key = client_ip()
    assert key(fake_scope("2001:db8:1:2::1")) == "2001:db8:1:2::/64"
    assert key(fake_scope("2001:db8:1:2:ffff:ffff:ffff:ffff")) == "2001:db8:1:2::/64"
    assert key(fake_scope("2001:db8:1:3::1")) == "2001:db8:1:3::/64"
    assert key(fake_scope("::ffff:198.51.100.7")) == "198.51.100.7"  # v4-mapped: the v4 client
    assert key(fake_scope(None)) == "peer:none"  # never unkeyed (that meant unlimited)
    assert client_ip(ipv6_prefix=None)(fake_scope("2001:db8:1:2::1")) == "2001:db8:1:2::1"
    assert client_ip(ipv6_prefix=48)(fake_scope("2001:db8:1:ffff::1")) == "2001:db8:1::/48"
    # Headers from an untrusted IPv6 peer mean nothing.
    assert key(fake_scope("2001:db8:9::1", (XFF, "203.0.113.7"))) == "2001:db8:9::/64"

    proxied = client_ip(trusted_proxies=["2001:db8:ffff::/48"])
    peer = "2001:db8:ffff::1"
    assert proxied(fake_scope(peer, (XFF, "2001:db8:aaaa:1::5"))) == "2001:db8:aaaa:1::/64"
    # Trusted hops are checked by full address, not by /64, and skipped.
    assert (
        proxied(fake_scope(peer, (XFF, "2001:db8:aaaa:1::5, 2001:db8:ffff::2")))
        == "2001:db8:aaaa:1::/64"
    )
    # Garbage in the chain: the walk stops at the last good hop (here a trusted proxy).
    assert proxied(fake_scope(peer, (XFF, "garbage, 2001:db8:ffff::2"))) == "2001:db8:ffff::/64"
    # trusted_hops=2 with two proxies of ours: the third address from the right.
    hops = client_ip(trusted_hops=2)
    assert hops(fake_scope("10.0.0.2", (XFF, "1.1.1.1, 203.0.113.7, 10.0.0.1"))) == "203.0.113.7"


def test_trusted_ipv4_proxy_on_a_dual_stack_listener(
    serve: Callable[..., UvicornServer],
) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
    except OSError as e:
        pytest.skip(f"no dual-stack IPv6 here: {e}")
    app, _ = limited_app(client_ip(trusted_proxies=["127.0.0.1"]), capacity=1)
    server = serve(app, host="::")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", verify=False) as client:
        got = statuses(client, "/", {XFF: "203.0.113.7"}, {XFF: "203.0.113.8"})
    assert got == [200, 200]


def test_client_xff_does_not_override_a_proxy_set_forwarded() -> None:
    # The proxy writes Forwarded (configured so); the client's own X-Forwarded-For is ignored.
    key = client_ip(trusted_proxies=["127.0.0.1"], forwarded_header="forwarded")
    scope = fake_scope("127.0.0.1", ("forwarded", "for=203.0.113.7"), (XFF, "9.9.9.9"))
    assert key(scope) != "9.9.9.9"
    assert key(scope) == "203.0.113.7"


# --- 3. ResponseCacheMiddleware: the cache-leak checklist ----------------------------------


class RecordingCache(rs.TwoTierCache):
    """A TwoTierCache that counts stored responses, so a test can wait for a store to
    land in Redis before asking another instance."""

    def __init__(self, stored: Stores, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stored = stored

    async def aset(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        await super().aset(key, value, ttl=ttl)
        if not key.endswith(":vary"):
            self.stored.add()


class Stores:
    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._count >= n, timeout):
                raise AssertionError(f"expected {n} stored responses, saw {self._count}")


class Pair:
    """Two instances of one app behind ResponseCacheMiddleware: ``a`` and ``b``.

    "local": one server, one local-only cache (``a`` and ``b`` are two clients of it).
    "redis": two servers, each with its own TwoTierCache over one Redis prefix, so what
    ``a`` stores ``b`` must read back from Redis. Both send ``Host: app.test``.
    """

    def __init__(self, a: httpx.Client, b: httpx.Client, stores: Stores, kind: str) -> None:
        self.a, self.b, self.stores, self.kind = a, b, stores, kind


@pytest.fixture(params=["local", "redis"])
def cached_pair(
    request: pytest.FixtureRequest, serve: Callable[..., UvicornServer]
) -> Iterator[Callable[..., Pair]]:
    kind: str = request.param
    url = prefix = ""
    # The responses here carry no freshness information, which RFC 9111 stores for no
    # time at all; ttl is the explicit opt-in lifetime these leak checks run under.
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
    clients: list[httpx.Client] = []

    def start(routes: Sequence[BaseRoute], **options: Any) -> Pair:
        options.setdefault("ttl", 60.0)
        stores = Stores()
        servers: list[UvicornServer] = []
        if kind == "local":
            cache = RecordingCache(stores)
            mw = Middleware(ResponseCacheMiddleware, cache=cache, **options)
            server = serve(make_app(routes, [mw]))
            servers = [server, server]
        else:
            for _ in range(2):
                client = redis.asyncio.Redis.from_url(url)
                remote = rs.RedisCache(client, prefix=f"{prefix}cache", timeout=SAFE)
                cache = RecordingCache(stores, remote=remote)
                mw = Middleware(ResponseCacheMiddleware, cache=cache, **options)
                app = make_app(routes, [mw], closers=[cache.aclose, client.aclose])
                servers.append(serve(app))
        a, b = (http(s, headers={"host": "app.test"}) for s in servers)
        clients.extend([a, b])
        return Pair(a, b, stores, kind)

    yield start
    for c in clients:
        c.close()


def test_cache_stores_and_serves_a_plain_response(cached_pair: Callable[..., Pair]) -> None:
    calls: Counter[str] = Counter()
    pair = cached_pair([Route("/", counting(calls, "root"))])
    first_ = pair.a.get("/")
    pair.stores.wait_for(1)
    hit = pair.b.get("/")
    assert (first_.text, hit.text) == ("root 1", "root 1")
    assert calls["root"] == 1
    assert "age" not in first_.headers
    assert re.fullmatch(r"\d+", hit.headers["age"])
    assert hit.headers["content-type"] == first_.headers["content-type"]


def test_cache_never_stores_a_response_that_sets_a_cookie(
    cached_pair: Callable[..., Pair],
) -> None:
    calls: Counter[str] = Counter()

    async def login_page(request: Request) -> Response:
        calls["page"] += 1
        response = PlainTextResponse(f"csrf token {calls['page']}")
        response.set_cookie("csrftoken", f"secret-{calls['page']}")
        return response

    pair = cached_pair([Route("/", login_page)])
    got = []
    for client in (pair.a, pair.b, pair.a):
        got.append(client.get("/"))
        client.cookies.clear()  # never send it back: that would bypass the cache anyway
    assert [r.text for r in got] == ["csrf token 1", "csrf token 2", "csrf token 3"]
    assert [r.cookies["csrftoken"] for r in got] == ["secret-1", "secret-2", "secret-3"]
    assert calls["page"] == 3
    assert pair.stores.count == 0


def test_cache_never_stores_private_no_store_no_cache_or_vary_star(
    cached_pair: Callable[..., Pair],
) -> None:
    calls: Counter[str] = Counter()
    uncacheable = {
        "/private": {"cache-control": "private"},
        "/private-max-age": {"cache-control": "private, max-age=600"},
        "/no-store": {"cache-control": "no-store"},
        "/no-store-upper": {"cache-control": "public, NO-STORE"},
        "/no-cache": {"cache-control": "no-cache"},
        "/max-age-0": {"cache-control": "max-age=0"},
        "/vary-star": {"vary": "*"},
    }
    routes = [Route(p, counting(calls, p, **h)) for p, h in uncacheable.items()]
    routes.append(Route("/public", counting(calls, "/public", cache_control="public")))
    pair = cached_pair(routes)
    for path in [*uncacheable, "/public"]:
        pair.a.get(path)
    pair.stores.wait_for(1)  # only /public
    for path in [*uncacheable, "/public"]:
        pair.b.get(path)
        pair.a.get(path)
    assert calls == Counter({**dict.fromkeys(uncacheable, 3), "/public": 1})
    assert pair.stores.count == 1


def test_cache_never_shares_responses_to_credentialed_requests(
    cached_pair: Callable[..., Pair],
) -> None:
    calls: Counter[str] = Counter()

    async def me(request: Request) -> Response:
        calls["me"] += 1
        who = request.headers.get("authorization") or request.cookies.get("session") or "anon"
        return PlainTextResponse(f"profile of {who}")

    pair = cached_pair([Route("/me", me)])
    alice = pair.a.get("/me", headers={"authorization": "Bearer alice"})
    bob = pair.b.get("/me")
    assert alice.text == "profile of Bearer alice"
    assert bob.text == "profile of anon"  # never alice's
    pair.stores.wait_for(1)  # bob's anonymous response is shareable
    # A stored anonymous entry is never served to a credentialed request either.
    carol = pair.a.get("/me", headers={"authorization": "Bearer carol"})
    dave = pair.b.get("/me", headers={"cookie": "session=dave"})
    anon = pair.a.get("/me")
    assert carol.text == "profile of Bearer carol"
    assert dave.text == "profile of dave"
    assert anon.text == "profile of anon"
    assert "age" in anon.headers
    assert calls["me"] == 4  # alice, bob (stored), carol, dave; the last anon is a hit
    assert pair.stores.count == 1


def test_cache_honours_vary(cached_pair: Callable[..., Pair]) -> None:
    calls: Counter[str] = Counter()

    async def greet(request: Request) -> Response:
        calls["greet"] += 1
        lang = request.headers.get("accept-language", "en")
        text = {"en": "hello", "fr": "bonjour"}.get(lang, "?")
        return PlainTextResponse(text, headers={"vary": "Accept-Language"})

    pair = cached_pair([Route("/", greet)])
    en, fr = {"accept-language": "en"}, {"accept-language": "fr"}
    assert pair.a.get("/", headers=en).text == "hello"
    pair.stores.wait_for(1)
    assert pair.b.get("/", headers=fr).text == "bonjour"
    pair.stores.wait_for(2)
    got = [pair.b.get("/", headers=en), pair.a.get("/", headers=fr), pair.a.get("/", headers=en)]
    assert [r.text for r in got] == ["hello", "bonjour", "hello"]
    assert all("age" in r.headers for r in got)
    assert calls["greet"] == 2


def test_cache_etag_304_only_for_the_same_url(cached_pair: Callable[..., Pair]) -> None:
    calls: Counter[str] = Counter()
    pair = cached_pair([Route("/a", counting(calls, "a")), Route("/b", counting(calls, "b"))])
    first_ = pair.a.get("/a")
    pair.stores.wait_for(1)
    hit = pair.b.get("/a")
    etag = hit.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]+"', etag)  # strong
    assert first_.headers["etag"] == etag
    assert re.fullmatch(r"\d+", hit.headers["age"])

    not_modified = pair.b.get("/a", headers={"if-none-match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    listed = pair.a.get("/a", headers={"if-none-match": f'"other", W/{etag}'})
    assert listed.status_code == 304  # weak comparison, one of a list

    # The same validator sent for another URL: a full response, cached or not.
    other = pair.a.get("/b", headers={"if-none-match": etag})
    assert (other.status_code, other.text) == (200, "b 1")
    pair.stores.wait_for(2)
    other_hit = pair.b.get("/b", headers={"if-none-match": etag})
    assert (other_hit.status_code, other_hit.text) == (200, "b 1")
    assert other_hit.headers["etag"] != etag
    assert pair.a.get("/a", headers={"if-none-match": '"stale"'}).text == "a 1"
    assert calls == Counter({"a": 1, "b": 1})


def test_cache_keys_include_host_and_query(cached_pair: Callable[..., Pair]) -> None:
    calls: Counter[str] = Counter()

    async def reflect(request: Request) -> Response:
        calls["reflect"] += 1
        return PlainTextResponse(
            f"{request.url.scheme}://{request.headers['host']}?{request.url.query}"
        )

    pair = cached_pair([Route("/", reflect)])
    assert pair.a.get("/", headers={"host": "evil.test"}).text == "http://evil.test?"
    pair.stores.wait_for(1)
    assert pair.b.get("/").text == "http://app.test?"  # not the evil.test entry
    assert pair.a.get("/", params={"q": "1"}).text == "http://app.test?q=1"
    pair.stores.wait_for(3)
    assert pair.b.get("/", params={"q": "2"}).text == "http://app.test?q=2"
    assert pair.b.get("/", headers={"host": "EVIL.test"}).text == "http://evil.test?"  # a hit
    assert pair.a.get("/", params={"q": "1"}).text == "http://app.test?q=1"  # a hit
    assert calls["reflect"] == 4


def test_cache_serves_head_from_a_get_entry_without_a_body(
    cached_pair: Callable[..., Pair],
) -> None:
    calls: Counter[str] = Counter()
    pair = cached_pair(
        [Route("/page", counting(calls, "page")), Route("/other", counting(calls, "other"))]
    )
    got = pair.a.get("/page")
    pair.stores.wait_for(1)
    head = pair.b.head("/page")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["etag"] == got.headers["etag"]
    assert calls["page"] == 1
    # A HEAD miss goes to the app and stores nothing.
    assert pair.a.head("/other").status_code == 200
    assert pair.a.get("/other").text == "other 2"


def test_cache_never_stores_post(serve: Callable[..., UvicornServer]) -> None:
    calls: Counter[str] = Counter()

    async def echo(request: Request) -> Response:
        calls[request.method] += 1
        return PlainTextResponse(f"{request.method} {calls[request.method]}")

    app = make_app(
        [Route("/echo", echo, methods=["GET", "POST"])],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0)],
    )
    server = serve(app)
    with http(server) as client:
        assert client.get("/echo").text == "GET 1"
        assert client.get("/echo").text == "GET 1"  # stored ...
        assert client.post("/echo").text == "POST 1"  # ... never answers a POST ...
        # ... and a successful POST invalidates it (RFC 9111 section 4.4)
        assert [client.get("/echo").text for _ in range(2)] == ["GET 2", "GET 2"]
        assert client.post("/echo").text == "POST 2"


def test_cache_does_not_store_bodies_over_max_body(serve: Callable[..., UvicornServer]) -> None:
    calls: Counter[str] = Counter()

    async def sized(request: Request) -> Response:
        size = int(request.path_params["size"])
        calls[str(size)] += 1
        return PlainTextResponse("x" * size)

    async def streamed(request: Request) -> Response:
        calls["stream"] += 1

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"y" * 8

        return StreamingResponse(chunks())

    app = make_app(
        [Route("/sized/{size}", sized), Route("/stream", streamed)],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0, max_body=16)],
    )
    server = serve(app)
    with http(server) as client:
        for _ in range(2):
            assert client.get("/sized/16").text == "x" * 16
            assert client.get("/sized/17").text == "x" * 17
            assert client.get("/stream").text == "y" * 32  # crosses max_body mid-stream
    assert calls == Counter({"16": 1, "17": 2, "stream": 2})


def test_client_cache_control_never_changes_the_server_ttl(
    serve: Callable[..., UvicornServer],
) -> None:
    clock = FakeClock()
    calls: Counter[str] = Counter()
    cache = rs.TwoTierCache(rs.LocalCache(clock=clock), clock=clock)
    app = make_app(
        [Route("/", counting(calls, "root"))],
        [Middleware(ResponseCacheMiddleware, cache=cache, ttl=60.0)],
    )
    server = serve(app)
    with http(server) as client:
        assert client.get("/").text == "root 1"
        for h in (
            {"cache-control": "no-cache"},
            {"cache-control": "max-age=0"},
            {"cache-control": "no-store"},
            {"pragma": "no-cache"},
        ):
            assert client.get("/", headers=h).text == "root 1"
        clock.advance(59.0)
        assert client.get("/", headers={"cache-control": "max-age=0"}).text == "root 1"
        clock.advance(1.5)  # past the configured 60 s
        assert client.get("/").text == "root 2"
    assert calls["root"] == 2


def test_response_max_age_and_s_maxage_set_the_lifetime(
    serve: Callable[..., UvicornServer],
) -> None:
    clock = FakeClock()
    calls: Counter[str] = Counter()
    cache = rs.TwoTierCache(rs.LocalCache(clock=clock), clock=clock)
    app = make_app(
        [
            Route("/short", counting(calls, "short", cache_control="max-age=1")),
            Route("/shared", counting(calls, "shared", cache_control="max-age=1, s-maxage=5")),
            Route("/zero", counting(calls, "zero", cache_control="max-age=60, s-maxage=0")),
            Route("/default", counting(calls, "default")),
        ],
        [Middleware(ResponseCacheMiddleware, cache=cache, ttl=60.0)],
    )
    server = serve(app)
    paths = ["/short", "/shared", "/zero", "/default"]
    with http(server) as client:

        def get_all() -> list[str]:
            return [client.get(p).text.split()[1] for p in paths]

        assert get_all() == ["1", "1", "1", "1"]
        clock.advance(0.5)
        assert get_all() == ["1", "1", "2", "1"]
        clock.advance(0.6)  # 1.1 s: max-age=1 is over, s-maxage=5 wins for a shared cache
        assert get_all() == ["2", "1", "3", "1"]
        clock.advance(4.0)  # 5.1 s
        assert get_all() == ["3", "2", "4", "1"]


def test_unkeyed_forwarded_host_is_safe_with_vary(serve: Callable[..., UvicornServer]) -> None:
    # Classic poisoning: the app builds links from X-Forwarded-Host, which is not in the key.
    # Declaring it in Vary keys it; the middleware must honour that.
    calls: Counter[str] = Counter()

    async def page(request: Request) -> Response:
        calls["page"] += 1
        host = request.headers.get("x-forwarded-host", request.headers["host"])
        return PlainTextResponse(
            f'<script src="//{host}/app.js">', headers={"vary": "X-Forwarded-Host"}
        )

    app = make_app(
        [Route("/", page)],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0)],
    )
    server = serve(app)
    with http(server, headers={"host": "app.test"}) as client:
        evil = client.get("/", headers={"x-forwarded-host": "evil.test"})
        victim = client.get("/")
        again = client.get("/")
    assert "evil.test" in evil.text
    assert victim.text == '<script src="//app.test/app.js">'
    assert "age" in again.headers
    assert again.text == victim.text
    assert calls["page"] == 2


def test_weak_etag_from_the_app_validates(serve: Callable[..., UvicornServer]) -> None:
    calls: Counter[str] = Counter()
    app = make_app(
        [Route("/", counting(calls, "root", etag='W/"v1"'))],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0)],
    )
    server = serve(app)
    with http(server) as client:
        assert client.get("/").headers["etag"] == 'W/"v1"'
        response = client.get("/", headers={"if-none-match": 'W/"v1"'})
    assert response.status_code == 304


def test_expires_in_the_past_is_not_stored(serve: Callable[..., UvicornServer]) -> None:
    calls: Counter[str] = Counter()
    expired = "Thu, 01 Jan 1970 00:00:00 GMT"
    app = make_app(
        [Route("/", counting(calls, "root", expires=expired))],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache())],
    )
    server = serve(app)
    with http(server) as client:
        client.get("/")
        client.get("/")
    assert calls["root"] == 2


class MethodOverride:
    """App-side middleware some frameworks ship: X-HTTP-Method-Override on a GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-http-method-override":
                    scope = {**scope, "method": value.decode().upper()}
        await self.app(scope, receive, send)


@pytest.mark.parametrize("attack", ["fat-get", "method-override"])
def test_unkeyed_request_inputs_do_not_poison_the_cache(
    attack: str, serve: Callable[..., UvicornServer]
) -> None:
    async def item(request: Request) -> Response:
        if request.method == "DELETE":
            return PlainTextResponse("deleted")
        body = await request.body()
        return PlainTextResponse(body.decode() or "the item")

    app = make_app(
        [Route("/item", item, methods=["GET", "DELETE"])],
        [
            Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache()),
            Middleware(MethodOverride),
        ],
    )
    server = serve(app)
    with http(server) as client:
        if attack == "fat-get":
            client.request("GET", "/item", content=b"<script>alert(1)</script>")
        else:
            client.get("/item", headers={"x-http-method-override": "DELETE"})
        victim = client.get("/item")
    assert victim.text == "the item"


def test_cached_responses_do_not_replay_another_clients_ratelimit_fields(
    serve: Callable[..., UvicornServer],
) -> None:
    calls: Counter[str] = Counter()
    app = make_app([Route("/", counting(calls, "root"))])
    app.add_middleware(
        RateLimitMiddleware, limiter=rs.TokenBucket(SLOW, 10), key=header("x-api-key")
    )
    app.add_middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=60.0)
    app.add_middleware(CircuitBreakerMiddleware, breaker=rs.CircuitBreaker("design-order"))
    server = serve(app)
    with http(server) as client:
        for _ in range(3):
            client.post("/", headers={"x-api-key": "alice"})  # alice uses some quota
        alice = client.get("/", headers={"x-api-key": "alice"})
        bob = client.get("/", headers={"x-api-key": "bob"})
    assert alice.headers["ratelimit"].startswith('"default";r=6;')
    assert "age" in bob.headers  # a hit: served without asking bob's bucket ...
    assert "ratelimit" not in bob.headers  # ... so it must not claim alice's numbers


@pytest.mark.anyio
async def test_cache_passes_pathsend_through_after_the_start() -> None:
    async def file_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]}
        )
        await send({"type": "http.response.pathsend", "path": "/srv/static/a.txt"})

    sent: list[str] = []

    async def send(message: Message) -> None:
        sent.append(message["type"])

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware = ResponseCacheMiddleware(file_app, rs.TwoTierCache())
    scope = fake_scope("127.0.0.1")
    scope.update(query_string=b"", extensions={"http.response.pathsend": {}})
    await middleware(scope, receive, send)
    assert sent == ["http.response.start", "http.response.pathsend"]


# --- 4. streaming, background tasks, contextvars through all three -------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
endpoint_mark: contextvars.ContextVar[str] = contextvars.ContextVar("endpoint_mark", default="-")


class ContextMiddleware:
    """Outermost: sets request_id from X-Request-Id, and records what the endpoint set."""

    def __init__(self, app: ASGIApp, seen: list[tuple[str, str]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = dict(scope["headers"]).get(b"x-request-id", b"none").decode()
        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send)
            self.seen.append(("outer-after-app", endpoint_mark.get()))
        finally:
            request_id.reset(token)


def full_stack(
    routes: Sequence[BaseRoute],
    seen: list[tuple[str, str]],
    *,
    breaker: rs.CircuitBreaker | None = None,
    capacity: int = 100,
    key: Callable[[Scope], str | None] | None = None,
    lifespan: Any = None,
    cache: rs.TwoTierCache | None = None,
) -> Starlette:
    """The three middlewares stacked (breaker outermost), under ContextMiddleware."""
    middleware = [
        Middleware(ContextMiddleware, seen=seen),
        Middleware(CircuitBreakerMiddleware, breaker=breaker or rs.CircuitBreaker("stack")),
        Middleware(ResponseCacheMiddleware, cache=cache or rs.TwoTierCache(), ttl=60.0),
        Middleware(RateLimitMiddleware, limiter=rs.TokenBucket(SLOW, capacity), key=key),
    ]
    return Starlette(routes=list(routes), middleware=middleware, lifespan=lifespan)


def test_streaming_arrives_chunk_by_chunk_through_all_three(
    serve: Callable[..., UvicornServer],
) -> None:
    release = threading.Event()
    finished = threading.Event()
    seen: list[tuple[str, str]] = []
    calls: Counter[str] = Counter()

    async def stream(request: Request) -> Response:
        calls["stream"] += 1

        async def chunks() -> AsyncIterator[bytes]:
            yield f"chunk-1 {request_id.get()}\n".encode()
            # Until the test has read chunk 1 (a worker thread waits, the loop runs on).
            assert await anyio.to_thread.run_sync(release.wait, 5.0)
            yield b"chunk-2\n"
            finished.set()

        return StreamingResponse(chunks(), media_type="text/plain")

    stores = Stores()
    server = serve(full_stack([Route("/stream", stream)], seen, cache=RecordingCache(stores)))
    with http(server) as client:
        with client.stream("GET", "/stream", headers={"x-request-id": "r-1"}) as response:
            assert response.status_code == 200
            assert response.headers["ratelimit"].startswith('"default";r=99;')
            parts = response.iter_raw()
            assert next(parts) == b"chunk-1 r-1\n"
            assert not finished.is_set()  # chunk 1 came while the generator still waited
            release.set()
            assert b"".join(parts) == b"chunk-2\n"
        assert finished.is_set()
        # The whole streamed body fitted max_body, so it was stored; a hit replays it whole.
        stores.wait_for(1)
        again = client.get("/stream")
    assert again.text == "chunk-1 r-1\nchunk-2\n"
    assert calls["stream"] == 1


def test_background_task_runs_after_the_response_through_all_three(
    serve: Callable[..., UvicornServer],
) -> None:
    release = threading.Event()
    done = threading.Event()
    seen: list[tuple[str, str]] = []

    async def with_task(request: Request) -> Response:
        endpoint_mark.set(f"endpoint saw {request_id.get()}")

        async def task() -> None:
            assert await anyio.to_thread.run_sync(release.wait, 5.0)
            seen.append(("background", f"{request_id.get()} / {endpoint_mark.get()}"))
            done.set()

        return PlainTextResponse(f"sent {request_id.get()}", background=BackgroundTask(task))

    server = serve(full_stack([Route("/task", with_task)], seen))
    with http(server) as client:
        response = client.get("/task", headers={"x-request-id": "r-2"})
        assert response.text == "sent r-2"
        assert not done.is_set()  # the response arrived while the task still waited
        release.set()
        assert done.wait(5)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    # Pure ASGI all the way: one task, one context. The endpoint's contextvars reach its
    # background task and, after the call, the outer middleware.
    assert seen == [
        ("background", "r-2 / endpoint saw r-2"),
        ("outer-after-app", "endpoint saw r-2"),
    ]


# --- 5. WebSocket and lifespan pass through ------------------------------------------------


def test_websocket_passes_through_all_three(serve: Callable[..., UvicornServer]) -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            try:
                text = await websocket.receive_text()
            except WebSocketDisconnect:
                return
            await websocket.send_text(f"echo {text} via {websocket.scope['type']}")

    breaker = rs.CircuitBreaker("ws-stack")
    # Capacity 1 and one key for everybody: were WebSockets limited, the second would fail.
    app = full_stack(
        [WebSocketRoute("/ws", echo)], [], breaker=breaker, capacity=1, key=lambda s: "all"
    )
    breaker.force_open()  # an open breaker answers HTTP with 503; WebSockets pass
    replies: list[str | bytes] = []
    if server_supports_websockets():
        # Real: uvicorn on a socket, and a raw-socket RFC 6455 client.
        server = serve(app)
        for i in range(3):
            with WebSocketClient.connect("127.0.0.1", server.port, "/ws") as ws:
                ws.send_text(f"m{i}")
                replies.append(ws.recv())
        with http(server) as client:
            assert client.get("/anything").status_code == 503
    else:
        # uvicorn serves WebSockets only with `websockets` or `wsproto` installed, and
        # neither is: fall back to Starlette's TestClient for this part only. (Starlette
        # 1.x warns that TestClient on httpx is deprecated in favour of httpx2.)
        from starlette.exceptions import StarletteDeprecationWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StarletteDeprecationWarning)
            from starlette.testclient import TestClient
        with TestClient(app) as test_client:
            for i in range(3):
                with test_client.websocket_connect("/ws") as ws:
                    ws.send_text(f"m{i}")
                    replies.append(ws.receive_text())
            assert test_client.get("/anything").status_code == 503
    assert replies == [f"echo m{i} via websocket" for i in range(3)]


def test_lifespan_passes_through_all_three() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("startup")
        yield {"greeting": "hello from lifespan"}
        events.append("shutdown")

    async def hello(request: Request) -> Response:
        return PlainTextResponse(request.state.greeting)

    app = full_stack([Route("/", hello)], [], lifespan=lifespan)
    server = UvicornServer(app)
    server.start()
    try:
        assert events == ["startup"]
        with http(server) as client:
            assert client.get("/").text == "hello from lifespan"
    finally:
        server.stop()
    assert events == ["startup", "shutdown"]


# --- 6. CircuitBreakerMiddleware ---------------------------------------------------------


class Verdicts:
    """The CallFinished outcomes of a breaker, in order.

    The middleware reports a response's outcome after the response has been sent, so a
    test reading ``breaker.stats()`` right after a response would race it; it waits here.
    """

    def __init__(self, breaker: rs.CircuitBreaker) -> None:
        self._queue: queue.Queue[rs.Outcome] = queue.Queue()
        breaker.add_listener(self._on_event, only=(rs.CallFinished,))

    def _on_event(self, event: rs.BreakerEvent) -> None:
        if isinstance(event, rs.CallFinished):
            self._queue.put(event.outcome)

    def next(self, n: int = 1) -> list[rs.Outcome]:
        return [self._queue.get(timeout=5) for _ in range(n)]


FAILURE, SUCCESS, IGNORED = rs.Outcome.FAILURE, rs.Outcome.SUCCESS, rs.Outcome.IGNORED


def test_breaker_trips_on_5xx_and_answers_503_with_retry_after(
    serve: Callable[..., UvicornServer],
) -> None:
    clock = FakeClock()
    breaker = rs.CircuitBreaker(
        "api", failure_threshold=3, recovery_timeout=2.5, success_threshold=1, clock=clock
    )
    calls: Counter[str] = Counter()

    async def fail(request: Request) -> Response:
        calls["fail"] += 1
        return PlainTextResponse("upstream broke", status_code=502)

    app = make_app(
        [Route("/fail", fail), Route("/ok", counting(calls, "ok"))],
        [Middleware(CircuitBreakerMiddleware, breaker=breaker)],
    )
    verdicts = Verdicts(breaker)
    server = serve(app)
    with http(server) as client:
        got = [client.get(p).status_code for p in ("/fail", "/fail", "/missing")]
        assert got == [502, 502, 404]
        assert verdicts.next(3) == [FAILURE, FAILURE, SUCCESS]  # a 404 is no failure of ours
        assert breaker.stats().consecutive_failures == 0
        assert [client.get("/fail").status_code for _ in range(3)] == [502, 502, 502]
        assert verdicts.next(3) == [FAILURE] * 3
        assert breaker.state is rs.CircuitState.OPEN

        rejected = client.get("/ok")
        assert rejected.status_code == 503
        assert rejected.headers["retry-after"] == "3"  # 2.5 s rounded up
        assert rejected.json() == {"detail": "Service Unavailable"}
        clock.advance(1.2)
        assert client.get("/fail").headers["retry-after"] == "2"  # 1.3 s left
        clock.advance(1.3)
        assert client.get("/ok").status_code == 200  # the half-open probe
        assert verdicts.next() == [SUCCESS]
        assert breaker.stats().state is rs.CircuitState.CLOSED
    assert calls == Counter({"fail": 5, "ok": 1})


def test_breaker_counts_app_exceptions_as_failures(
    serve: Callable[..., UvicornServer],
) -> None:
    breaker = rs.CircuitBreaker("exc", failure_threshold=3, recovery_timeout=60.0)

    async def crash(request: Request) -> Response:
        raise RuntimeError("database went away")

    async def teapot(request: Request) -> Response:
        raise HTTPException(status_code=418)

    async def bad_gateway(request: Request) -> Response:
        raise HTTPException(status_code=502)

    app = make_app(
        [Route("/crash", crash), Route("/teapot", teapot), Route("/bad-gateway", bad_gateway)],
        [Middleware(CircuitBreakerMiddleware, breaker=breaker)],
    )
    verdicts = Verdicts(breaker)
    server = serve(app)
    with http(server) as client:
        assert client.get("/crash", headers=CLOSE).status_code == 500
        assert client.get("/crash", headers=CLOSE).status_code == 500
        assert verdicts.next(2) == [FAILURE, FAILURE]
        assert breaker.stats().consecutive_failures == 2
        assert client.get("/teapot").status_code == 418  # a 4xx HTTPException: a success
        assert verdicts.next() == [SUCCESS]
        assert breaker.stats().consecutive_failures == 0
        paths = ("/crash", "/bad-gateway", "/crash", "/crash")
        got = [client.get(p, headers=CLOSE).status_code for p in paths]
    assert got == [500, 502, 500, 503]
    assert verdicts.next(3) == [FAILURE] * 3
    assert breaker.state is rs.CircuitState.OPEN


def test_breaker_middleware_honours_exclude(serve: Callable[..., UvicornServer]) -> None:
    breaker = rs.CircuitBreaker("excl", failure_threshold=2, exclude=(PermissionError,))

    async def forbidden(request: Request) -> Response:
        raise PermissionError("not yours")

    app = make_app([Route("/", forbidden)], [Middleware(CircuitBreakerMiddleware, breaker=breaker)])
    server = serve(app)
    with http(server) as client:
        got = [client.get("/", headers=CLOSE).status_code for _ in range(3)]
    assert got == [500, 500, 500]
    assert breaker.stats().consecutive_failures == 0


def test_client_disconnect_mid_request_is_not_a_failure(
    serve: Callable[..., UvicornServer],
) -> None:
    breaker = rs.CircuitBreaker("disc", failure_threshold=2, recovery_timeout=60.0)
    verdicts = Verdicts(breaker)
    entered = threading.Event()
    aborted: list[str] = []

    async def slow(request: Request) -> Response:
        entered.set()
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await anyio.sleep(5)  # the slow dependency
            tg.cancel_scope.cancel()
            return PlainTextResponse("done")
        # What a typical app does when its work is abandoned: it raises.
        aborted.append("aborted")
        raise RuntimeError("request aborted: the client went away")

    async def fail(request: Request) -> Response:
        return PlainTextResponse("no", status_code=500)

    app = make_app(
        [Route("/slow", slow), Route("/fail", fail)],
        [Middleware(CircuitBreakerMiddleware, breaker=breaker)],
    )
    server = serve(app)
    with http(server) as client:
        assert client.get("/fail").status_code == 500  # control: a failure is seen
    assert verdicts.next() == [FAILURE]
    assert breaker.stats().consecutive_failures == 1

    for _ in range(3):  # threshold is 2: three counted disconnects would open it
        entered.clear()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: app.test\r\n\r\n")
            assert entered.wait(5)
        # The socket is closed: the endpoint sees http.disconnect, gives up and raises.
        assert verdicts.next() == [IGNORED]

    assert aborted == ["aborted"] * 3
    stats = breaker.stats()
    assert stats.consecutive_failures == 1  # the control failure only
    assert stats.state is rs.CircuitState.CLOSED


def test_breaker_rules_per_route_group(serve: Callable[..., UvicornServer]) -> None:
    payments = rs.CircuitBreaker("payments", failure_threshold=2, recovery_timeout=60.0)
    default = rs.CircuitBreaker("default", failure_threshold=2, recovery_timeout=60.0)
    calls: Counter[str] = Counter()

    async def charge(request: Request) -> Response:
        calls["charge"] += 1
        return PlainTextResponse("psp down", status_code=503)

    app = make_app(
        [
            Route("/api/payments/charge", charge),
            Route("/api/payments/refund", counting(calls, "refund")),
            Route("/api/orders", counting(calls, "orders")),
        ],
        [
            Middleware(
                CircuitBreakerMiddleware,
                breaker=default,
                rules=[(r"/api/payments/.*", payments)],
            )
        ],
    )
    server = serve(app)
    with http(server) as client:
        assert [client.get("/api/payments/charge").status_code for _ in range(3)] == [
            503,
            503,
            503,
        ]
        refund = client.get("/api/payments/refund")
        orders = client.get("/api/orders")
    assert "retry-after" in refund.headers
    assert refund.status_code == 503
    assert orders.status_code == 200
    assert payments.state is rs.CircuitState.OPEN
    assert default.state is rs.CircuitState.CLOSED
    assert default.stats().consecutive_failures == 0
    assert calls == Counter({"charge": 2, "orders": 1})


# --- 7. a Redis outage under load --------------------------------------------------------


def allowed(codes: list[int]) -> int:
    assert set(codes) <= {200, 429}, codes  # never a 500
    return codes.count(200)


class OverRedis:
    """RateLimitMiddleware on a TokenBucket in Redis, reached through a FaultProxy."""

    CAPACITY = 10

    def __init__(
        self,
        server: UvicornServer,
        http_client: httpx.AsyncClient,
        guard: rs.CircuitBreaker,
        redis_client: redis.Redis,
        prefix: str,
    ) -> None:
        self.server = server
        self.http = http_client
        self.guard = guard
        self.redis = redis_client
        self.prefix = prefix
        self.availability: list[bool] = []

    def on_change(self, event: rs.BackendStateChanged) -> None:
        self.availability.append(event.available)

    def in_redis(self, key: str) -> bool:
        return bool(self.redis.exists(f"{self.prefix}:{{{key}}}:outage"))

    async def get(self, key: str) -> int:
        response = await self.http.get("/", headers={"x-client": key})
        if response.status_code == 429:
            assert re.fullmatch(r"\d+", response.headers["retry-after"])
        return response.status_code

    async def batch(self, key: str, n: int = 50) -> list[int]:
        """``n`` concurrent requests with one key; their statuses."""
        codes: list[int] = []

        async def one() -> None:
            codes.append(await self.get(key))

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
        return codes

    async def wait_closed(self) -> None:
        """Single requests until the breaker around Redis has closed again."""
        deadline = time.monotonic() + 5
        while self.guard.state is not rs.CircuitState.CLOSED:
            assert time.monotonic() < deadline, "the Redis breaker never closed again"
            await self.get("probe")
            await anyio.sleep(0.02)


@pytest.fixture
async def over_redis(
    proxy: FaultProxy,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    serve: Callable[..., UvicornServer],
) -> AsyncIterator[Callable[[str], Awaitable[OverRedis]]]:
    async with httpx.AsyncClient(timeout=10.0, verify=False) as http_client:

        async def start(policy: str) -> OverRedis:
            prefix = redis_prefix.rstrip(":")
            guard = rs.CircuitBreaker(
                "redis-guard",
                failure_threshold=1,
                recovery_timeout=RECOVERY,
                success_threshold=1,
                # A probe that reports after its lease is ignored (docs/breaker.md), and
                # the lease defaults to RECOVERY: shorter than one round trip under
                # proxy.delay(0.05), let alone a reconnect's four. Let it last as long as
                # a Redis answer may take.
                probe_lease=SAFE,
                include=(redis.RedisError, OSError),
            )
            client = redis.asyncio.Redis.from_url(proxy.url_for(redis_url))
            calls: Counter[str] = Counter()
            holder: list[OverRedis] = []
            backend = rs.RedisBackend(
                client,
                prefix=prefix,
                timeout=SAFE,
                on_error=policy,
                breaker=guard,
                listeners=[lambda event: holder[0].on_change(event)],
            )
            bucket = rs.TokenBucket(SLOW, OverRedis.CAPACITY, backend=backend, name="outage")
            app = make_app(
                [Route("/", counting(calls, "root"))],
                [Middleware(RateLimitMiddleware, limiter=bucket, key=header("x-client"))],
                closers=[backend.aclose, client.aclose],
            )
            server = serve(app)
            http_client.base_url = httpx.URL(server.url)
            holder.append(OverRedis(server, http_client, guard, redis_client, prefix))
            return holder[0]

        yield start


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["local", "fail_open", "fail_closed"])
async def test_redis_outage_under_load(
    policy: str, proxy: FaultProxy, over_redis: Callable[[str], Awaitable[OverRedis]]
) -> None:
    limited = await over_redis(policy)
    capacity = OverRedis.CAPACITY

    # Healthy: Redis decides, exactly `capacity` of 50 concurrent requests pass.
    assert allowed(await limited.batch("before")) == capacity
    assert limited.in_redis("before")

    # Cut Redis while a batch is in flight: every request still gets an answer.
    results: list[list[int]] = []

    async def in_flight() -> None:
        results.append(await limited.batch("during-cut"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(in_flight)
        await anyio.sleep(0.005)
        await anyio.to_thread.run_sync(proxy.cut)
    allowed(results[0])

    # Down: the policy decides, in process, without waiting on Redis.
    expected = {"local": capacity, "fail_open": 50, "fail_closed": 0}[policy]
    for i in range(3):
        assert allowed(await limited.batch(f"down-{i}")) == expected
        assert not limited.in_redis(f"down-{i}")
    assert limited.availability == [False]

    # Back: after the breaker's recovery, Redis decides again: "before" stays used up (a
    # local or fail-open fallback would admit it) and a fresh key gets exactly `capacity`
    # (fail-closed would refuse it). Only eventually, though: a connection that was in use
    # when the cut came can go back to the pool dead and re-open the breaker once more.
    await anyio.to_thread.run_sync(proxy.restore)
    deadline = time.monotonic() + 10
    attempt = 0
    while True:
        await limited.wait_closed()
        seen = list(limited.availability)
        spent = allowed(await limited.batch("before"))
        fresh = allowed(await limited.batch(f"after-{attempt}"))
        if limited.availability == seen and (spent, fresh) == (0, capacity):
            break
        assert time.monotonic() < deadline, f"Redis never took over: {limited.availability}"
        attempt += 1
    assert limited.in_redis(f"after-{attempt}")
    assert not limited.in_redis("down-0")  # the outage's decisions never reached Redis
    assert limited.availability[-1] is True


@pytest.mark.redis
@pytest.mark.anyio
async def test_first_burst_after_redis_recovers_is_decided_by_redis(
    proxy: FaultProxy, over_redis: Callable[[str], Awaitable[OverRedis]]
) -> None:
    limited = await over_redis("fail_closed")  # a fallback decision is a visible 429
    # 50 ms each way per Redis round trip keeps each burst's 50 requests in flight
    # together, so the pool grows to ~50 connections and the burst after recovery needs
    # them all. A reconnect then costs four round trips (redis-py 8 sends HELLO, CLIENT
    # MAINT_NOTIFICATIONS and CLIENT SETINFO first): the fixture's probe_lease covers it.
    await anyio.to_thread.run_sync(proxy.delay, 0.05)
    assert allowed(await limited.batch("warm")) == OverRedis.CAPACITY
    await anyio.to_thread.run_sync(proxy.cut)
    # One request finds Redis gone and opens the breaker; the other pooled connections
    # stay idle (as under light traffic, or with the breaker open before they are used).
    assert await limited.get("down") == 429
    await anyio.to_thread.run_sync(proxy.restore)
    await anyio.sleep(RECOVERY + 0.05)
    # Redis is healthy again: the half-open probe, and everything after it, should reach it.
    assert await limited.get("probe") == 200
    assert limited.availability == [False, True]
    assert allowed(await limited.batch("after")) == OverRedis.CAPACITY
    assert limited.availability == [False, True]


# --- 8. construction errors --------------------------------------------------------------


async def nothing(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("never called")


def test_sync_redis_clients_are_refused_at_construction() -> None:
    sync_client = redis.Redis()  # never connects: construction must fail first
    backend = rs.RedisBackend(sync_client, prefix="never")
    cache = rs.TwoTierCache(remote=rs.RedisCache(sync_client, prefix="never"), invalidation=False)
    try:
        bucket = rs.TokenBucket(1.0, 5, backend=backend)
        with pytest.raises(ValueError, match=r"^limiter: .*redis\.asyncio client"):
            RateLimitMiddleware(nothing, bucket)
        # A rule checks its limiter as it is built, before any middleware sees it.
        with pytest.raises(ValueError, match=r"^limiter: .*redis\.asyncio"):
            Rule("/b", limiter=bucket)
        with pytest.raises(ValueError, match=r"^limiter: .*redis\.asyncio"):
            RateLimitMiddleware(
                nothing, rs.LimitGroup(bucket, rs.TokenBucket(1, 9, backend=backend))
            )
        with pytest.raises(ValueError, match=r"^cache: .*redis\.asyncio client"):
            ResponseCacheMiddleware(nothing, cache)
    finally:
        cache.close()
        backend.close()
        sync_client.close()


def test_bad_configuration_fails_loudly() -> None:
    bucket = rs.TokenBucket(1.0, 5)
    with pytest.raises(ValueError, match=r"^path: '\(' is not a regular expression"):
        Rule("(", limiter=bucket)
    for bad in ["", "two words", 'quo"te', "semi;colon", "caf\u00e9", "new\nline"]:
        with pytest.raises(ValueError, match=r"^name must be a short token"):
            RateLimitMiddleware(nothing, bucket, name=bad)
    RateLimitMiddleware(nothing, bucket, name="api-v1.read_2")  # a fine token
    with pytest.raises(ValueError, match=r"^limiter: give a limiter, rules, or both"):
        RateLimitMiddleware(nothing)
    with pytest.raises(TypeError, match=r"^limiter must be a TokenBucket or LimitGroup"):
        RateLimitMiddleware(nothing, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^rules\[0\] must be a Rule"):
        RateLimitMiddleware(nothing, bucket, rules=[("/x", bucket)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^key must be a function"):
        RateLimitMiddleware(nothing, bucket, key="x-api-key")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^cost 6 is above capacity 5"):
        RateLimitMiddleware(nothing, bucket, cost=6)

    with pytest.raises(TypeError, match=r"^cache must be a TwoTierCache"):
        ResponseCacheMiddleware(nothing, rs.LocalCache())  # type: ignore[arg-type]
    for ttl in (0, -1, True):
        with pytest.raises(ValueError, match=r"^ttl must be a positive number"):
            ResponseCacheMiddleware(nothing, rs.TwoTierCache(), ttl=ttl)
    with pytest.raises(ValueError, match=r"^max_body must be an int >= 0"):
        ResponseCacheMiddleware(nothing, rs.TwoTierCache(), max_body=-1)

    breaker = rs.CircuitBreaker("conf")
    with pytest.raises(ValueError, match=r"^breaker: give a breaker, rules, or both"):
        CircuitBreakerMiddleware(nothing)
    with pytest.raises(TypeError, match=r"^breaker must be a CircuitBreaker"):
        CircuitBreakerMiddleware(nothing, breaker=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^rules\[0\] must be \(path regex, CircuitBreaker\)"):
        CircuitBreakerMiddleware(nothing, rules=[("(", breaker)])
    with pytest.raises(TypeError, match=r"^rules\[0\] breaker must be a CircuitBreaker"):
        CircuitBreakerMiddleware(nothing, rules=[("/x", object())])  # type: ignore[list-item]

    with pytest.raises(ValueError, match=r"^trusted_proxies: 'proxy\.local'"):
        client_ip(trusted_proxies=["proxy.local"])
    with pytest.raises(ValueError, match=r"^pass trusted_proxies or trusted_hops, not both"):
        client_ip(trusted_proxies=["10.0.0.1"], trusted_hops=1)
    with pytest.raises(ValueError, match=r"^trusted_hops must be an int >= 0"):
        client_ip(trusted_hops=-1)
    with pytest.raises(ValueError, match=r"^ipv6_prefix must be None or 1\.\.128"):
        client_ip(ipv6_prefix=0)
    with pytest.raises(ValueError, match=r"^name must be a non-empty header name"):
        header("")
    with pytest.raises(ValueError, match=r"^join needs at least one key function"):
        join()
    with pytest.raises(ValueError, match=r"^first needs at least one key function"):
        first()
    with pytest.raises(TypeError, match=r"^registry must be a CollectorRegistry"):
        metrics_app("default")  # type: ignore[arg-type]


def test_rule_cost_above_capacity_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"cost"):
        RateLimitMiddleware(
            nothing, rs.TokenBucket(1, 10), rules=[Rule("/x", rs.TokenBucket(1, 2), cost=5)]
        )


def test_rule_name_must_be_a_token() -> None:
    with pytest.raises(ValueError, match=r"name"):
        RateLimitMiddleware(nothing, rules=[Rule("/x", rs.TokenBucket(1, 2), name='a "b"')])


@pytest.mark.parametrize(
    ("which", "build"),
    [
        ("exempt", lambda: RateLimitMiddleware(nothing, rs.TokenBucket(1, 2), exempt=["("])),
        (
            "allow_credentials",
            lambda: ResponseCacheMiddleware(nothing, rs.TwoTierCache(), allow_credentials=["("]),
        ),
    ],
    ids=["exempt", "allow_credentials"],
)
def test_bad_regex_lists_raise_value_error_naming_the_parameter(
    which: str, build: Callable[[], object]
) -> None:
    with pytest.raises(ValueError, match=which):
        build()


# --- 9. FastAPI --------------------------------------------------------------------------


def test_fastapi_add_middleware(serve: Callable[..., UvicornServer]) -> None:
    fastapi = pytest.importorskip(
        "fastapi", reason="fastapi is not installed (it is installable: pip install fastapi)"
    )
    calls: Counter[str] = Counter()

    async def get_item(item_id: int) -> dict[str, int]:
        calls["item"] += 1
        return {"item": item_id, "call": calls["item"]}

    app = fastapi.FastAPI()
    app.add_api_route("/items/{item_id}", get_item, methods=["GET"])
    app.add_middleware(RateLimitMiddleware, limiter=rs.TokenBucket(SLOW, 3), key=path_template())
    app.add_middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=30.0)
    server = serve(app)
    with http(server) as client:
        first_ = client.get("/items/1")
        hit = client.get("/items/1")  # the cache is outermost: a hit costs no token
        others = [client.get(f"/items/{i}") for i in (2, 3, 4)]
        still = client.get("/items/1")
    assert first_.json() == {"item": 1, "call": 1}
    assert first_.headers["ratelimit"].startswith('"default";r=2;')
    assert hit.json() == {"item": 1, "call": 1}
    assert "age" in hit.headers
    # One route template, one bucket: /items/2 and /items/3 take the last two tokens.
    assert [r.status_code for r in others] == [200, 200, 429]
    assert others[2].headers["retry-after"] == "1000"
    assert still.status_code == 200
    assert still.json()["call"] == 1
    assert calls["item"] == 3


# --- 10. metrics_app ---------------------------------------------------------------------


def test_metrics_app_serves_prometheus_text(serve: Callable[..., UvicornServer]) -> None:
    registry = CollectorRegistry()
    hits = PromCounter("demo_hits", "Requests to /.", registry=registry)

    async def root(request: Request) -> Response:
        hits.inc()
        return PlainTextResponse("ok")

    app = make_app(
        [Route("/", root), Mount("/metrics", app=metrics_app(registry))],
        [
            Middleware(
                RateLimitMiddleware, limiter=rs.TokenBucket(SLOW, 2), exempt=[r"/metrics(/.*)?"]
            )
        ],
    )
    server = serve(app)
    with http(server, follow_redirects=True) as client:
        assert statuses(client, "/", {}, {}, {}) == [200, 200, 429]
        scrapes = [client.get("/metrics/"), client.get("/metrics")]
    for scrape in scrapes:
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain; version=")
        assert "# HELP demo_hits_total Requests to /." in scrape.text
        assert "# TYPE demo_hits_total counter" in scrape.text
        assert re.search(r"^demo_hits_total 2\.0$", scrape.text, re.M)
        assert "python_gc" not in scrape.text  # the fresh registry, not the global one


def test_metrics_are_not_frozen_by_the_response_cache(
    serve: Callable[..., UvicornServer],
) -> None:
    registry = CollectorRegistry()
    hits = PromCounter("demo_hits", "Hits.", registry=registry)
    app = make_app(
        [Mount("/metrics", app=metrics_app(registry))],
        [Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache())],
    )
    server = serve(app)
    with http(server) as client:
        client.get("/metrics/")
        hits.inc(5)
        scrape = client.get("/metrics/")
    assert re.search(r"^demo_hits_total 5\.0$", scrape.text, re.M)
