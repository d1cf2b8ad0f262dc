"""ASGI middleware benchmarks: our RateLimitMiddleware against slowapi's middlewares.

Groups:

a. raw ASGI calls, no network: ``GET /`` on a Starlette app with one
   ``PlainTextResponse("ok")`` route, called directly on one asyncio event loop, bare
   and behind each rate-limit middleware; the middleware's cost is the case minus bare.
   "ours response cache" is ResponseCacheMiddleware answering every request from a
   stored entry; its target is a hit's added cost at most 1.0x the bare response's time.
   a2 takes our middleware over a minimal ASGI app (no Starlette) and times its steps
   (key function, limiter decision, header fields) alone, to show where the time goes.
b. load: each app served by uvicorn in its own child process on a loopback port, driven
   from this process over keep-alive connections (bounded concurrency, a fixed number
   of requests per case, cases interleaved); requests/s, and the server's CPU time per
   request read from /proc. The client is a lean asyncio one: wrk is not assumed, and
   httpx.AsyncClient spent 3-13x the server's CPU per request here (1.4 ms at 10
   connections, 8.8 ms at 50), so with it the client, not the server, set the rate.

Every limit is generous (1e9 per second, burst 1e9), so every request is allowed: the
common case, and the one each middleware must do in full. Servers get a socket this
process bound on 127.0.0.1 (port 0, so no race for a port), exit when this process
goes away or after SERVER_LIFETIME seconds, and are terminated at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks._harness import (
    AsyncLoop,
    CaseResult,
    Group,
    Settings,
    TargetResult,
    check_overhead_target,
    ensure_integrations,
    event_loop,
    interleave,
    measure_async_in,
    print_group,
    print_target,
    serve_uvicorn,
    settings,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: import name -> distribution name; starlette is what the middleware runs in, the
#: rest are peers or only needed for the load run.
PEERS: Final = {
    "starlette": "starlette",
    "slowapi": "slowapi",
    "uvicorn": "uvicorn",
}
RATE: Final = 1e9
CAPACITY: Final = 1e9
SLOWAPI_LIMIT: Final = "1000000000/second"
CLIENT: Final = ("127.0.0.1", 51234)
#: What uvicorn puts in a scope for ``GET /`` (its spec_version is 2.3, so Starlette's
#: streaming responses listen for the disconnect on ``receive``).
SCOPE: Final[dict[str, Any]] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": CLIENT,
    "scheme": "http",
    "method": "GET",
    "root_path": "",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"benchmarks/asgi"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip, deflate"),
    ],
}
REQUEST: Final[dict[str, Any]] = {"type": "http.request", "body": b"", "more_body": False}

BARE: Final = "bare"
OURS: Final = "ours"
OURS_NO_HEADERS: Final = "ours, headers off"
SLOWAPI_ASGI: Final = "slowapi ASGI"
SLOWAPI_ASGI_HEADERS: Final = "slowapi ASGI, headers on"
SLOWAPI_BASE: Final = "slowapi BaseHTTPMiddleware"
OURS_CACHE: Final = "ours response cache"
OURS_BREAKER: Final = "ours circuit breaker"
OURS_ALL: Final = "ours, all three"
#: The cases of the load run (each is one uvicorn child process).
LOAD_CASES: Final = (BARE, OURS, OURS_CACHE, OURS_BREAKER, OURS_ALL, SLOWAPI_ASGI)
TARGET: Final = 0.05  # our added cost / slowapi ASGI's added cost
HIT_TARGET: Final = 1.0  # a cache hit's added cost / the bare response's own time
SERVER_LIFETIME: Final = 120.0  # seconds; a server exits by itself after this
START_TIMEOUT: Final = 30.0  # seconds for a server to answer its first request
CASE_TIMEOUT: Final = 60.0  # seconds for one case's requests in one round

_clock = time.perf_counter_ns


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    requests: int  # per case per round
    concurrency: int
    rounds: int
    warmup_rounds: int

    @property
    def description(self) -> str:
        return (
            f"{self.requests:,} requests per case per round, {self.concurrency} at a time, "
            f"{self.rounds} rounds (+{self.warmup_rounds} warm-up)"
        )


def load_settings(quick: bool) -> LoadSettings:
    if quick:
        return LoadSettings(requests=600, concurrency=50, rounds=3, warmup_rounds=1)
    return LoadSettings(requests=3000, concurrency=50, rounds=8, warmup_rounds=1)


# -- importing ----------------------------------------------------------------------------


def _load_peers() -> tuple[dict[str, Any], dict[str, str | None]]:
    modules: dict[str, Any] = {}
    versions: dict[str, str | None] = {}
    for name, dist in PEERS.items():
        try:
            modules[name] = importlib.import_module(name)
            versions[dist] = importlib.metadata.version(dist)
        except ImportError:
            versions[dist] = None
    return modules, versions


# -- the apps -----------------------------------------------------------------------------


async def _ok(request: Any) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("ok")


def _slowapi_limiter(headers: bool) -> Any:
    """slowapi's documented global limit: ``default_limits`` on a Limiter kept on
    ``app.state.limiter``, with its RateLimitExceeded handler registered."""
    slowapi = importlib.import_module("slowapi")
    util = importlib.import_module("slowapi.util")
    return slowapi.Limiter(
        key_func=util.get_remote_address,
        default_limits=[SLOWAPI_LIMIT],
        headers_enabled=headers,
    )


def build_app(case: str) -> Any:
    """The Starlette app of one case (each with its own limiter)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    import resilience as rs

    middleware: list[Middleware] = []
    limiter: Any = None
    if case in (OURS, OURS_NO_HEADERS, OURS_CACHE, OURS_BREAKER, OURS_ALL):
        ensure_integrations()
        from resilience.integrations.asgi import (
            CircuitBreakerMiddleware,
            RateLimitMiddleware,
            ResponseCacheMiddleware,
        )

        if case in (OURS, OURS_NO_HEADERS, OURS_ALL):
            bucket = rs.TokenBucket(rate=RATE, capacity=CAPACITY)
            middleware.append(
                Middleware(RateLimitMiddleware, limiter=bucket, headers=case != OURS_NO_HEADERS)
            )
        if case in (OURS_CACHE, OURS_ALL):  # after the first request, every one is a hit
            middleware.append(Middleware(ResponseCacheMiddleware, cache=rs.TwoTierCache(), ttl=300))
        if case in (OURS_BREAKER, OURS_ALL):
            breaker = rs.CircuitBreaker("bench", failure_threshold=1000)
            middleware.append(Middleware(CircuitBreakerMiddleware, breaker=breaker))
    elif case in (SLOWAPI_ASGI, SLOWAPI_ASGI_HEADERS, SLOWAPI_BASE):
        mw = importlib.import_module("slowapi.middleware")
        limiter = _slowapi_limiter(headers=case == SLOWAPI_ASGI_HEADERS)
        kind = mw.SlowAPIMiddleware if case == SLOWAPI_BASE else mw.SlowAPIASGIMiddleware
        middleware.append(Middleware(kind))
    elif case != BARE:
        raise ValueError(f"unknown case {case!r}")
    app = Starlette(routes=[Route("/", _ok)], middleware=middleware)
    if limiter is not None:
        app.state.limiter = limiter
        errors = importlib.import_module("slowapi.errors")
        slowapi = importlib.import_module("slowapi")
        app.add_exception_handler(errors.RateLimitExceeded, slowapi._rate_limit_exceeded_handler)
    return app


def _settle_slowapi(app: Any) -> Callable[[], None] | None:
    """limits' MemoryStorage expires keys on a threading.Timer it re-arms 10 ms after a
    hit; waiting for it after a loop keeps its work out of the next case."""
    storage: Any = getattr(getattr(app.state, "limiter", None), "_storage", None)
    if getattr(storage, "timer", None) is None:
        return None

    def settle() -> None:
        t = storage.timer
        if t.is_alive():
            t.join()

    return settle


# -- raw ASGI calls -----------------------------------------------------------------------


class _Exchange:
    """One request's receive and send, as a server offers them.

    ``receive`` gives the request once and then waits, as a server does until the client
    goes away (the app's task group cancels that wait when the response is done);
    ``send`` keeps what it is given.
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = False
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if not self.received:
            self.received = True
            return REQUEST
        await asyncio.get_running_loop().create_future()  # never set
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def status(self) -> int:
        return int(self.sent[0]["status"]) if self.sent else 0

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0].get("headers", ())) if self.sent else {}

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def _check(name: str, exchange: _Exchange) -> None:
    if exchange.status() != 200 or exchange.body() != b"ok":
        raise RuntimeError(
            f"{name}: expected 200 'ok', got {exchange.status()} {exchange.body()!r}"
        )


def request_loop(name: str, app: ASGIApp, settle: Callable[[], None] | None = None) -> AsyncLoop:
    """n requests, one after another; each gets a fresh copy of the scope (apps add to
    it) and a fresh exchange. The last response is checked outside the timed part."""

    async def loop(n: int) -> int:
        indices = range(n)
        exchange = _Exchange()
        start = _clock()
        for _ in indices:
            exchange = _Exchange()
            await app(dict(SCOPE), exchange.receive, exchange.send)
        elapsed = _clock() - start
        _check(name, exchange)
        if settle is not None:
            settle()
        return elapsed

    return loop


async def _one(app: ASGIApp) -> _Exchange:
    exchange = _Exchange()
    await app(dict(SCOPE), exchange.receive, exchange.send)
    return exchange


def _expect(name: str, exchange: _Exchange, fields: Sequence[bytes], absent: bool) -> None:
    _check(name, exchange)
    headers = exchange.headers()
    missing = [f.decode() for f in fields if (f in headers) == absent]
    if missing:
        what = "unexpected" if absent else "missing"
        raise RuntimeError(f"{name}: {what} response fields {missing}")


OUR_FIELDS: Final = (b"ratelimit-policy", b"ratelimit")
SLOWAPI_FIELDS: Final = (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")


def raw_calls(peers: dict[str, Any], s: Settings) -> Group:
    group = Group("a. raw ASGI calls, GET / on Starlette", "ns/request", {}, BARE, SLOWAPI_ASGI)
    cases = [BARE, OURS, OURS_NO_HEADERS, OURS_CACHE]
    if "slowapi" in peers:
        cases += [SLOWAPI_ASGI, SLOWAPI_ASGI_HEADERS, SLOWAPI_BASE]
    else:
        group.skipped.append("slowapi not installed")
    apps = {name: build_app(name) for name in cases}
    expected = {
        BARE: (OUR_FIELDS + SLOWAPI_FIELDS, True),
        OURS: (OUR_FIELDS, False),
        OURS_NO_HEADERS: (OUR_FIELDS, True),
        OURS_CACHE: (OUR_FIELDS, True),
        SLOWAPI_ASGI: (SLOWAPI_FIELDS, True),
        SLOWAPI_ASGI_HEADERS: (SLOWAPI_FIELDS, False),
        SLOWAPI_BASE: (SLOWAPI_FIELDS, True),
    }
    with event_loop() as loop:
        for name, app in apps.items():
            fields, absent = expected[name]
            _expect(name, loop.run_until_complete(_one(app)), fields, absent)
        # The first request stored the response: from here on every one is a hit.
        _expect(OURS_CACHE, loop.run_until_complete(_one(apps[OURS_CACHE])), (b"age",), False)
        loops = {name: request_loop(name, app, _settle_slowapi(app)) for name, app in apps.items()}
        group.results = measure_async_in(loop, loops, s)
    group.notes += [
        f"ours: RateLimitMiddleware(TokenBucket(rate={RATE:g}, capacity={CAPACITY:g})),"
        " default key client_ip(); 'ours' sends RateLimit-Policy and RateLimit fields",
        f"slowapi: Limiter(key_func=get_remote_address, default_limits=['{SLOWAPI_LIMIT}'])"
        " on app.state.limiter, add_exception_handler(RateLimitExceeded,"
        " _rate_limit_exceeded_handler), then the middleware (its documented global-limit"
        " set-up); headers_enabled=False (its default) unless 'headers on'",
        "every middleware is the app's only user middleware (inside Starlette's"
        " ServerErrorMiddleware, outside its ExceptionMiddleware and router)",
        f"{OURS_CACHE}: ResponseCacheMiddleware(TwoTierCache(), ttl=300), local tier only;"
        " every timed request is a hit (it carries Age), so the router and endpoint never run",
        "limits' MemoryStorage expiry timer is joined after each slowapi loop, untimed",
    ]
    return group


# -- where our time goes ------------------------------------------------------------------


async def _minimal_app(scope: Scope, receive: Receive, send: Send) -> None:
    # Fresh messages every call, as a framework builds them (a middleware may edit them).
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def step_loop(step: Callable[[], object]) -> AsyncLoop:
    async def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for _ in indices:
            step()
        return _clock() - start

    return loop


def async_step_loop(step: Callable[[], Awaitable[object]]) -> AsyncLoop:
    async def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for _ in indices:
            await step()
        return _clock() - start

    return loop


MINIMAL: Final = "minimal app"
MINIMAL_OURS: Final = "ours over minimal app"
MINIMAL_OURS_NO_HEADERS: Final = "ours over minimal app, headers off"
STEP_KEY: Final = "step: client_ip() key"
STEP_DECIDE: Final = "step: await atry_acquire(key)"
STEP_FIELDS: Final = "step: ratelimit_headers()"


def our_steps(s: Settings) -> Group:
    import resilience as rs
    from resilience.integrations.asgi import RateLimitMiddleware, client_ip, ratelimit_headers

    group = Group(
        "a2. our middleware over a minimal ASGI app, and its steps alone", "ns/op", {}, None, None
    )
    bucket = rs.TokenBucket(rate=RATE, capacity=CAPACITY)
    key = client_ip()
    scope = dict(SCOPE)
    address = key(scope)
    if address is None:
        raise RuntimeError("client_ip() found no address in the scope")
    decision = bucket.try_acquire(address)
    apps: dict[str, ASGIApp] = {
        MINIMAL: _minimal_app,
        MINIMAL_OURS: RateLimitMiddleware(_minimal_app, bucket),
        MINIMAL_OURS_NO_HEADERS: RateLimitMiddleware(_minimal_app, bucket, headers=False),
    }
    loops: dict[str, AsyncLoop] = {name: request_loop(name, app) for name, app in apps.items()}
    loops[STEP_KEY] = step_loop(lambda: key(scope))
    loops[STEP_DECIDE] = async_step_loop(lambda: bucket.atry_acquire(address))
    loops[STEP_FIELDS] = step_loop(lambda: ratelimit_headers("default", bucket, decision))
    with event_loop() as loop:
        _expect(MINIMAL_OURS, loop.run_until_complete(_one(apps[MINIMAL_OURS])), OUR_FIELDS, False)
        group.results = measure_async_in(loop, loops, s)
    group.notes += [
        "steps are timed alone in tight loops (warm caches); ratelimit_headers() is called"
        " without a prebuilt policy field, so it also formats RateLimit-Policy",
    ]
    return group


def _step_summary(group: Group) -> list[str]:
    med = {name: r.median for name, r in group.results.items()}

    def added_to_minimal(case: str) -> float:
        pairs = zip(group.results[case].samples, group.results[MINIMAL].samples, strict=True)
        return statistics.median(a - z for a, z in pairs)

    added = added_to_minimal(MINIMAL_OURS)
    added_off = added_to_minimal(MINIMAL_OURS_NO_HEADERS)
    key, decide, fields = med[STEP_KEY], med[STEP_DECIDE], med[STEP_FIELDS]
    rest_off = added_off - key - decide
    return [
        f"ours adds {added:,.0f} ns over the minimal app, paired by round"
        f" ({added_off:,.0f} ns with headers off)",
        f"  key {key:,.0f} + decision {decide:,.0f} = {key + decide:,.0f} ns;"
        f" the rest of the headers-off path (type/exempt checks, rule pick, awaits):"
        f" {rest_off:,.0f} ns",
        f"  headers on costs {added - added_off:,.0f} ns more: fields {fields:,.0f} ns"
        f" (policy included), the rest is the send wrapper (a closure, a wrapped send per"
        f" message, a new header list)",
    ]


# -- load run -----------------------------------------------------------------------------


def serve(case: str, fd: int, lifetime: float) -> None:
    """Child process: serve ``build_app(case)`` on the listening socket ``fd``."""
    serve_uvicorn(build_app(case), fd, lifetime)


def _main_serve() -> None:
    serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))


@dataclasses.dataclass
class _Server:
    case: str
    process: subprocess.Popen[bytes]
    port: int

    def cpu_seconds(self) -> float | None:
        """user + system CPU of the server process so far (Linux /proc), else None."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def _spawn(case: str) -> _Server:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        port = sock.getsockname()[1]
        root = Path(__file__).resolve().parent.parent
        code = "from benchmarks.asgi import _main_serve; _main_serve()"
        args = [sys.executable, "-c", code, case, str(sock.fileno()), str(SERVER_LIFETIME)]
        process = subprocess.Popen(
            args, cwd=root, pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL
        )
    finally:
        sock.close()  # the child has its own copy
    return _Server(case, process, port)


def _stop(server: _Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


#: One keep-alive request, as bytes: the client below only writes this and reads back.
GET: Final = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: benchmarks/asgi\r\nAccept: */*\r\n\r\n"
)


class _Connection:
    """A lean HTTP/1.1 keep-alive client connection: one request at a time, the response
    read by Content-Length (enough for these apps, far cheaper per request than a full
    client, so the server is what the load run measures)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self) -> tuple[int, dict[bytes, bytes], bytes]:
        self.writer.write(GET)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(fields.get(b"content-length", b"0")))
        return status, fields, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def _first_response(server: _Server) -> None:
    """Wait until the server answers (the socket listens from the start, so the first
    request simply waits for the app to load), and check that answer."""
    connection = await asyncio.wait_for(_Connection.open(server.port), START_TIMEOUT)
    try:
        status, fields, body = await asyncio.wait_for(connection.get(), START_TIMEOUT)
    finally:
        await connection.close()
    if status != 200 or body != b"ok":
        raise RuntimeError(f"{server.case}: expected 200 'ok', got {status} {body!r}")
    has_ours = all(f in fields for f in OUR_FIELDS)
    if has_ours != (server.case in (OURS, OURS_ALL)):
        raise RuntimeError(f"{server.case}: RateLimit fields {'' if has_ours else 'not '}sent")


async def _load(connections: Sequence[_Connection], requests: int) -> int:
    """``requests`` GETs spread over the connections, one in flight on each; the ns it
    took. Every response must be 200 'ok'."""
    left = requests
    bad: list[tuple[int, bytes]] = []

    async def worker(connection: _Connection) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status, _, body = await connection.get()
            if status != 200 or body != b"ok":
                bad.append((status, body))

    start = _clock()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = _clock() - start
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return elapsed


def load_run(peers: dict[str, Any], quick: bool) -> tuple[Group, Group]:
    ls = load_settings(quick)
    title = "b. uvicorn over loopback"
    rps = Group(f"{title}: requests/s", "req/s", {}, None, BARE)
    cpu = Group(f"{title}: server CPU per request", "us CPU/request", {}, BARE, BARE)
    if "uvicorn" not in peers:
        rps.skipped.append("uvicorn not installed")
        return rps, cpu
    cases = [c for c in LOAD_CASES if c != SLOWAPI_ASGI or "slowapi" in peers]
    if SLOWAPI_ASGI not in cases:
        rps.skipped.append("slowapi not installed")
    s = Settings(rounds=ls.rounds, warmup_rounds=ls.warmup_rounds, loop_ns=0)
    servers: dict[str, _Server] = {}
    connections: dict[str, list[_Connection]] = {}
    server_cpu: list[dict[str, float]] = []
    client_cpu: list[float] = []

    async def open_all() -> None:
        for case, server in servers.items():
            await _first_response(server)
            connections[case] = [await _Connection.open(server.port) for _ in range(ls.concurrency)]

    async def close_all() -> None:
        for group in connections.values():
            for connection in group:
                await connection.close()

    def run_round(order: Sequence[str]) -> dict[str, float]:
        totals: dict[str, float] = {}
        used: dict[str, float] = {}
        for case in order:
            before, mine = servers[case].cpu_seconds(), time.process_time()
            work = asyncio.wait_for(_load(connections[case], ls.requests), CASE_TIMEOUT)
            ns = loop.run_until_complete(work)
            after = servers[case].cpu_seconds()
            client_cpu.append((time.process_time() - mine) / ls.requests * 1e6)
            totals[case] = ls.requests / (ns / 1e9)
            if before is not None and after is not None:
                used[case] = (after - before) / ls.requests * 1e6
        server_cpu.append(used)
        return totals

    with contextlib.ExitStack() as stack, event_loop() as loop:
        for case in cases:  # all start at once; each loads its app in its own process
            servers[case] = _spawn(case)
            stack.callback(_stop, servers[case])
        try:
            loop.run_until_complete(open_all())
            rps.results = interleave(cases, run_round, s)
        finally:
            loop.run_until_complete(close_all())
    measured = server_cpu[ls.warmup_rounds :]
    if all(len(r) == len(cases) for r in measured):
        cpu.results = {c: CaseResult(c, 1, [r[c] for r in measured]) for c in cases}
    else:
        cpu.skipped.append("no /proc/<pid>/stat here")
    rps.notes += [
        f"{ls.description}; {ls.concurrency} keep-alive connections per server, one request"
        " in flight on each, from a lean asyncio client in this process (fixed request"
        " bytes, response read by Content-Length); every response checked for 200 'ok'",
        f"client CPU per request (this process): median {statistics.median(client_cpu):,.0f} us",
        "each server: uvicorn in its own process, 1 worker, asyncio loop, HTTP protocol"
        f" 'auto' ({'httptools' if importlib.util.find_spec('httptools') else 'h11'}),"
        " access log off",
    ]
    cpu.notes.append(
        "user+system CPU of the server process over a case's requests (/proc, clock ticks),"
        " per request; includes HTTP parsing and the socket work"
    )
    return rps, cpu


# -- entry point --------------------------------------------------------------------------


def _hit_target(group: Group) -> TargetResult:
    """A cache hit's added cost over the bare Starlette response, as a share of that
    response's own time, paired by round: (hit - bare) / bare."""
    hit, bare = group.results.get(OURS_CACHE), group.results.get(BARE)
    value = None
    if hit is not None and bare is not None:
        pairs = zip(hit.samples, bare.samples, strict=True)
        value = statistics.median((h - b) / b for h, b in pairs if b > 0)
    label = "cache hit added ns/request vs the bare response's ns"
    return TargetResult(label, OURS_CACHE, BARE, HIT_TARGET, value)


def _overheads(group: Group) -> tuple[list[str], dict[str, float | None]]:
    lines = ["added per request (median over rounds of case - bare in the same round):"]
    added: dict[str, float | None] = {}
    for name in group.results:
        if name == BARE or (value := group.paired_overhead(name)) is None:
            continue
        added[name] = value
        line = f"  {name}: {value:+,.0f} ns"
        if name != SLOWAPI_ASGI and (ratio := group.overhead_ratio(name, SLOWAPI_ASGI)) is not None:
            line += f" ({ratio:.3f}x what {SLOWAPI_ASGI} adds, paired by round)"
        lines.append(line)
    return lines, added


def main(quick: bool) -> dict[str, Any]:
    peers, versions = _load_peers()
    s = settings(quick)
    print("# asgi")
    print(
        "peers: "
        + ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items())
    )
    if "starlette" not in peers:
        print("skipped: starlette is not installed (pip install 'resilience[asgi]')")
        return {"peers": versions, "skipped": "starlette not installed"}
    note = ensure_integrations()
    if note is not None:
        print(f"note: {note}")
    print(f"measurement (a): {s.description}; cases interleaved, median and min over rounds")
    print("overhead = median - median of bare; ratio = median over rounds of")
    print("case / reference measured in the same round (pairing cancels machine drift)")

    groups: dict[str, Group] = {}
    groups["raw"] = raw_calls(peers, s)
    print_group(groups["raw"])
    added_lines, added = _overheads(groups["raw"])
    for line in added_lines:
        print(line)

    groups["steps"] = our_steps(s)
    print_group(groups["steps"])
    for line in _step_summary(groups["steps"]):
        print(line)

    groups["load_rps"], groups["load_cpu"] = load_run(peers, quick)
    print_group(groups["load_rps"])
    if groups["load_cpu"].results:
        print_group(groups["load_cpu"])

    raw = groups["raw"]
    targets: list[TargetResult] = []
    for peer in (SLOWAPI_ASGI, SLOWAPI_ASGI_HEADERS):
        if peer in raw.results:
            targets.append(
                check_overhead_target(
                    f"added ns/request vs bare, {OURS} (headers on)", raw, OURS, peer, TARGET
                )
            )
        else:
            targets.append(TargetResult("added ns/request", OURS, peer, TARGET, None))
    targets.append(_hit_target(raw))
    print("\n## targets (paired ratio of added cost: (case - bare) / (peer - bare) per round)")
    for target in targets:
        print_target(target)

    return {
        "peers": versions,
        "settings": {"rounds": s.rounds, "warmup_rounds": s.warmup_rounds, "loop_ns": s.loop_ns},
        "load_settings": dataclasses.asdict(load_settings(quick)),
        "groups": {key: group.as_dict() for key, group in groups.items()},
        "added_ns_per_request": added,
        "targets": [target.as_dict() for target in targets],
    }
