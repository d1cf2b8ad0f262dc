"""ConcurrencyLimitMiddleware: admission, shedding with 503 + Retry-After before the app
runs, a brief bounded queue, exempt paths, partitions, samples; and the evidence: a real
uvicorn app driven past its capacity, with and without the middleware.

1. Raw ASGI calls on asyncio and trio (the app is a coroutine we control).
2. A Starlette app on a real uvicorn server, over TCP.
3. The overload run (``python -m benchmarks shedding --quick``): slow, ~30 s.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support.uvicorn_server import UvicornServer

import resilience as rs
from resilience.integrations.asgi import ConcurrencyLimitMiddleware, header
from resilience.testing import FakeClock

ROOT = pathlib.Path(__file__).resolve().parent.parent
anyio_test = pytest.mark.anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def scope(path: str = "/", **headers: str) -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }


class Exchange:
    """One request's receive and send."""

    def __init__(self, disconnect: bool = False) -> None:
        self.sent: list[Message] = []
        self.received = 0
        self.disconnect = disconnect

    async def receive(self) -> Message:
        self.received += 1
        if self.disconnect:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"]) if self.sent else 0

    def header(self, name: bytes) -> bytes | None:
        return dict(self.sent[0]["headers"]).get(name) if self.sent else None


class Gate:
    """An app whose requests hold their slot until released."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.entered = 0
        self.release = anyio.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.entered += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def ok_app(scope: Scope, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling what the tasks change
            await anyio.sleep(0.001)


async def call(app: Any, exchange: Exchange, path: str = "/", **headers: str) -> Exchange:
    await app(scope(path, **headers), exchange.receive, exchange.send)
    return exchange


def calling(
    app: Any, exchange: Exchange, **headers: str
) -> Callable[[], Coroutine[Any, Any, Exchange]]:
    """``call`` with headers, for start_soon (which takes no keyword arguments)."""

    async def run() -> Exchange:
        return await call(app, exchange, **headers)

    return run


# -- 1. raw ASGI ------------------------------------------------------------------------------


@anyio_test
async def test_requests_beyond_the_limit_are_shed_before_the_app_runs() -> None:
    gate = Gate()
    limiter = rs.ConcurrencyLimit(initial=2, name="shed-unit")
    app = ConcurrencyLimitMiddleware(gate, limiter, retry_after=2.5)
    held = [Exchange(), Exchange()]
    async with anyio.create_task_group() as tg:
        for exchange in held:
            tg.start_soon(call, app, exchange)
        await until(lambda: gate.entered == 2)
        shed = await call(app, Exchange())
        assert shed.status == 503
        assert shed.header(b"retry-after") == b"3"  # whole seconds, rounded up
        assert shed.sent[1]["body"] == b'{"detail":"Service Unavailable"}'
        assert shed.received == 0  # not a byte of the request was read
        assert gate.entered == 2  # the app never saw it
        gate.release.set()
    assert [e.status for e in held] == [200, 200]
    read = limiter.telemetry().read()
    assert (read["admitted"], read["rejected"], read["in_flight"]) == (2, 1, 0)


@anyio_test
async def test_a_bounded_queue_waits_briefly_for_a_slot() -> None:
    gate = Gate()
    limiter = rs.ConcurrencyLimit(initial=1, max_wait=5.0, max_queue=1)
    app = ConcurrencyLimitMiddleware(gate, limiter)
    first, queued = Exchange(), Exchange()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, app, first)
        await until(lambda: gate.entered == 1)
        tg.start_soon(call, app, queued)
        await until(lambda: limiter.waiting == 1)
        overflow = await call(app, Exchange())  # the queue holds one: shed at once
        assert overflow.status == 503
        gate.release.set()
    assert (first.status, queued.status) == (200, 200)
    assert gate.entered == 2


@anyio_test
async def test_a_queued_request_that_waits_too_long_is_shed() -> None:
    gate = Gate()
    app = ConcurrencyLimitMiddleware(gate, rs.ConcurrencyLimit(initial=1, max_wait=0.02))
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, app, Exchange())
        await until(lambda: gate.entered == 1)
        late = await call(app, Exchange())
        gate.release.set()
    assert late.status == 503


@anyio_test
async def test_exempt_paths_are_never_shed_nor_counted() -> None:
    gate = Gate()
    limiter = rs.ConcurrencyLimit(initial=1)
    app = ConcurrencyLimitMiddleware(gate, limiter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, app, Exchange())
        await until(lambda: gate.entered == 1)
        paths = ("/health", "/healthz", "/readyz", "/metrics")
        exempt = [Exchange() for _ in paths]
        for exchange, path in zip(exempt, paths, strict=True):
            tg.start_soon(call, app, exchange, path)
        await until(lambda: gate.entered == 5)
        assert limiter.in_flight == 1
        assert (await call(app, Exchange(), "/other")).status == 503
        gate.release.set()
    assert [e.status for e in exempt] == [200] * 4


@anyio_test
async def test_partitions_keep_a_guaranteed_share() -> None:
    gate = Gate()
    limiter = rs.ConcurrencyLimit(initial=4, partitions={"live": 0.5, "batch": 0.25})
    app = ConcurrencyLimitMiddleware(gate, limiter, partition=header("x-priority"))
    async with anyio.create_task_group() as tg:
        for _ in range(4):  # batch fills the whole limit while it is free
            tg.start_soon(calling(app, Exchange(), **{"x-priority": "batch"}))
        await until(lambda: gate.entered == 4)
        assert (await call(app, Exchange(), **{"x-priority": "batch"})).status == 503
        assert (await call(app, Exchange())).status == 503
        live = [Exchange(), Exchange()]
        for exchange in live:  # live's share, ceil(4 * 0.5) = 2, gets in over the limit
            tg.start_soon(calling(app, exchange, **{"x-priority": "live"}))
        await until(lambda: gate.entered == 6)
        assert (await call(app, Exchange(), **{"x-priority": "live"})).status == 503
        gate.release.set()
    assert [e.status for e in live] == [200, 200]


@anyio_test
async def test_samples_drops_and_disconnects(clock: FakeClock) -> None:
    limiter = rs.ConcurrencyLimit("aimd", initial=10, window=None, clock=clock)
    app = ConcurrencyLimitMiddleware(Gate504(), limiter)
    assert (await call(app, Exchange())).status == 504
    assert limiter.limit == 9  # a 504 is a drop: int(10 * 0.9)

    async def raises(scope: Scope, receive: Any, send: Any) -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await call(ConcurrencyLimitMiddleware(raises, limiter), Exchange())
    assert limiter.limit == 8  # drop_on matched

    async def listens(scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # the client is gone; the app gives up without answering

    await call(ConcurrencyLimitMiddleware(listens, limiter), Exchange(disconnect=True))
    assert limiter.limit == 8  # no sample
    assert limiter.in_flight == 0
    assert limiter.telemetry().read()["dropped"] == 2


class Gate504:
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 504, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@anyio_test
async def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    limiter = rs.ConcurrencyLimit(initial=1)
    middleware = ConcurrencyLimitMiddleware(app, limiter)
    async with limiter:  # full: HTTP would be shed, these are not
        await middleware({"type": "lifespan"}, Exchange().receive, Exchange().send)
        await middleware({"type": "websocket", "path": "/"}, Exchange().receive, Exchange().send)
    assert seen == ["lifespan", "websocket"]


def test_construction_errors() -> None:
    with pytest.raises(TypeError, match="limiter"):
        ConcurrencyLimitMiddleware(ok_app, rs.Bulkhead(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_wait"):
        ConcurrencyLimitMiddleware(ok_app, rs.ConcurrencyLimit(max_wait=None))
    with pytest.raises(TypeError, match="partition"):
        ConcurrencyLimitMiddleware(ok_app, partition="x-priority")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_after"):
        ConcurrencyLimitMiddleware(ok_app, retry_after=-1)
    with pytest.raises(ValueError, match="exempt"):
        ConcurrencyLimitMiddleware(ok_app, exempt=["("])
    default = ConcurrencyLimitMiddleware(ok_app)
    assert default.limiter.name == "asgi"
    assert default.limiter.max_wait == 0.05


# -- 2. Starlette on uvicorn --------------------------------------------------------------------


@pytest.fixture
def starlette_server() -> Iterator[tuple[UvicornServer, rs.ConcurrencyLimit, threading.Event]]:
    release = threading.Event()

    async def slow(request: Request) -> PlainTextResponse:
        await anyio.to_thread.run_sync(release.wait, 10)
        return PlainTextResponse("slow")

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("healthy")

    limiter = rs.ConcurrencyLimit(initial=2, name="starlette")
    app = Starlette(
        routes=[Route("/", slow), Route("/health", health)],
        middleware=[Middleware(ConcurrencyLimitMiddleware, limiter=limiter)],
    )
    with UvicornServer(app) as server:
        try:
            yield server, limiter, release
        finally:
            release.set()


def test_on_uvicorn_the_overflow_gets_503_and_health_stays_up(
    starlette_server: tuple[UvicornServer, rs.ConcurrencyLimit, threading.Event],
) -> None:
    server, limiter, release = starlette_server
    answers: list[int] = []

    def slow_request() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            answers.append(client.get("/").status_code)

    threads = [threading.Thread(target=slow_request) for _ in range(2)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(500):
            if limiter.in_flight == 2:
                break
            threading.Event().wait(0.01)
        shed = client.get("/")
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert client.get("/health").text == "healthy"
    release.set()
    for thread in threads:
        thread.join(10)
    assert answers == [200, 200]


# -- 3. the overload evidence -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_under_overload_shedding_keeps_latency_and_goodput(tmp_path: pathlib.Path) -> None:
    """The quick benchmark: a fresh uvicorn app per run (capacity 200 req/s: 8 slots of
    40 ms), at x0.5, x1 and x2.5 of capacity, with and without the middleware. Every
    assertion compares runs of this same invocation, so a slow machine slows both."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "shedding", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())["results"]["shedding"]
    overload = report["overload"]
    runs = {(r["case"], r["multiple"]): r for r in overload["runs"]}
    unloaded = runs[("shedding", 0.5)]["p99"]
    peak = overload["peak_goodput"]
    with_mw, without = runs[("shedding", 2.5)], runs[("bare", 2.5)]
    summary = proc.stdout[proc.stdout.index("## c. overload") :]
    # Without the middleware the queue of abandoned work grows: nearly nothing is good.
    assert without["goodput"] < 0.5 * peak, summary
    assert without["p99"] is None or without["p99"] > 4 * unloaded, summary
    # With it: the app keeps serving near its capacity, at near its unloaded latency.
    assert with_mw["goodput"] >= 0.8 * peak, summary
    assert with_mw["goodput"] > 3 * without["goodput"], summary
    assert with_mw["p99"] <= 2.5 * unloaded, summary
    assert with_mw["shed"] > 0, summary
    assert with_mw["timeouts"] == 0, summary
    assert with_mw["health_failed"] == 0, summary  # /health was never shed
    # The per-call targets were measured and printed too.
    assert proc.stdout.count("(target <=") >= 3, proc.stdout
