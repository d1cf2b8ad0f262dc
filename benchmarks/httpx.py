"""The httpx transport's cost: ours against plain httpx, httpx-retries and hishel.

Groups, each measured in this one process with its cases interleaved:

a. sync ``httpx.Client.get`` over loopback to a uvicorn server in a child process (one
   keep-alive connection per client, requests one at a time, every response 200 "ok").
b. the same with ``httpx.AsyncClient`` on one asyncio loop.
c. no network: the inner transport is an ``httpx.MockTransport``, so the table shows
   what each transport adds in nanoseconds, without a socket's noise.
d. a private cache's hit: sync ``Client.get`` of a URL the server answered with
   ``Cache-Control: max-age=3600``. Ours (``cache=`` a local-only TwoTierCache) against
   hishel's CacheTransport in RFC 9111 mode on its in-memory storage (SqliteStorage on a
   ``:memory:`` connection), the same server, the same URL; a network request for
   scale, and a floor: a transport that builds the same 200 response at once, which is
   what httpx.Client costs around any cache hit. Targets: our hit <= 0.5x hishel's, at
   the transport (d2: what each cache spends) and through Client.get as cost added over
   the floor (both caches carry the same httpx.Client work, about 0.55x of hishel's whole
   hit on its own, so the raw Client.get ratio is printed for information). (hishel's
   async storage needs anysqlite, which is not installed; the async row is ours alone.)

Cases: plain httpx; ours with its defaults (the server's limits followed, in memory);
ours with every layer on (per-host breaker, Retry, TokenBucket, server limits, metrics
watching); httpx-retries' RetryTransport (its default Retry), when installed. The
target: what ours adds, with every layer on, is at most 0.1x a request's own cost, that
is ours/plain <= 1.10 on raw time per request, paired by round.
"""

from __future__ import annotations

import importlib.metadata
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
from prometheus_client import CollectorRegistry

import resilience as rs
from benchmarks._harness import (
    AsyncLoop,
    Group,
    Settings,
    SyncLoop,
    TargetResult,
    check_overhead_target,
    check_target,
    ensure_integrations,
    event_loop,
    measure_async_in,
    measure_sync,
    print_group,
    print_target,
    settings,
)
from resilience.metrics import Metrics

PLAIN: Final = "httpx"
OURS: Final = "ours, defaults"
OURS_ALL: Final = "ours, every layer"
RETRIES: Final = "httpx-retries"
OURS_HIT: Final = "ours, cache hit"
HISHEL_HIT: Final = "hishel, cache hit"
NETWORK: Final = "httpx, no cache (network)"
FLOOR: Final = "floor: a transport that answers at once"
TARGET: Final = 1.10  # ours/plain: added cost <= 0.1x the request's own
HIT_TARGET: Final = 0.5  # our cache hit / hishel's
SERVER_LIFETIME: Final = 300.0

_clock = time.perf_counter_ns

SERVER = """
import asyncio, os, socket, sys, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"2"), (b"content-type", b"text/plain")]
    if scope["path"] == "/cached":
        headers += [(b"cache-control", b"max-age=3600"), (b"etag", b'"ok"')]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})

sock = socket.socket(fileno=int(sys.argv[1]))
lifetime = float(sys.argv[2])
config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                        loop="asyncio", http="h11", timeout_keep_alive=int(lifetime))
server = uvicorn.Server(config)
parent = os.getppid()

async def watch():
    deadline = time.monotonic() + lifetime
    while not server.should_exit:
        if os.getppid() != parent or time.monotonic() > deadline:
            server.should_exit = True
        await asyncio.sleep(0.25)

async def run():
    watcher = asyncio.ensure_future(watch())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()

asyncio.run(run())
"""


def _spawn() -> tuple[subprocess.Popen[bytes], str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        args = [sys.executable, "-c", SERVER, str(sock.fileno()), str(SERVER_LIFETIME)]
        process = subprocess.Popen(args, pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL)
    finally:
        sock.close()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()


def _retries() -> Any:
    try:
        import httpx_retries
    except ImportError:
        return None
    return httpx_retries


def _every_layer(inner: Any, name: str, is_async: bool) -> Any:
    from resilience.integrations.httpx import AsyncResilientTransport, ResilientTransport

    metrics = Metrics(CollectorRegistry())
    cls = AsyncResilientTransport if is_async else ResilientTransport
    transport = cls(
        inner,
        breaker=rs.CircuitBreaker(name, failure_threshold=5, recovery_timeout=30.0),
        retry=rs.Retry(attempts=3, name=f"{name}-retry"),
        limiter=rs.TokenBucket(rate=1e9, capacity=1e9),
        on_new_breaker=metrics.watch,
        name=name,
    )
    metrics.watch(transport)
    return transport


def _transports(make: Callable[[], Any], is_async: bool, tag: str) -> dict[str, Any]:
    from resilience.integrations.httpx import AsyncResilientTransport, ResilientTransport

    ours = AsyncResilientTransport if is_async else ResilientTransport
    cases = {
        PLAIN: make(),
        OURS: ours(make(), name=f"bench-{tag}-defaults"),
        OURS_ALL: _every_layer(make(), f"bench-{tag}", is_async),
    }
    retries = _retries()
    if retries is not None:
        cases[RETRIES] = retries.RetryTransport(make())
    return cases


def _sync_loop(client: httpx.Client, url: str) -> SyncLoop:
    get = client.get

    def loop(n: int) -> int:
        start = _clock()
        for _ in range(n):
            get(url)
        return _clock() - start

    return loop


def _async_loop(client: httpx.AsyncClient, url: str) -> AsyncLoop:
    get = client.get

    async def loop(n: int) -> int:
        start = _clock()
        for _ in range(n):
            await get(url)
        return _clock() - start

    return loop


def sync_group(url: str, s: Settings, title: str, make: Callable[[], Any]) -> Group:
    clients = {
        name: httpx.Client(transport=t) for name, t in _transports(make, False, "sync").items()
    }
    try:
        for client in clients.values():
            assert client.get(url).text == "ok"
        results = measure_sync({n: _sync_loop(c, url) for n, c in clients.items()}, s)
    finally:
        for client in clients.values():
            client.close()
    return Group(title, "ns/request", results, PLAIN, PLAIN)


def async_group(url: str, s: Settings, title: str, make: Callable[[], Any]) -> Group:
    with event_loop() as loop:
        clients = {
            name: httpx.AsyncClient(transport=t)
            for name, t in _transports(make, True, "async").items()
        }

        async def check() -> None:
            for client in clients.values():
                assert (await client.get(url)).text == "ok"

        try:
            loop.run_until_complete(check())
            cases = {n: _async_loop(c, url) for n, c in clients.items()}
            results = measure_async_in(loop, cases, s)
        finally:

            async def close() -> None:
                for client in clients.values():
                    await client.aclose()

            loop.run_until_complete(close())
    return Group(title, "ns/request", results, PLAIN, PLAIN)


def _hishel() -> Any:
    try:
        import hishel
        import hishel.httpx
    except ImportError:
        return None
    return hishel


def _hishel_storage(hishel: Any) -> Any:
    connection = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    return hishel.SqliteStorage(connection=connection)


class _AtOnce(httpx.BaseTransport):
    """The floor of any cache hit: the stored 200 built and returned, nothing looked up."""

    HEADERS: Final = [
        ("content-length", "2"),
        ("content-type", "text/plain"),
        ("cache-control", "max-age=3600"),
        ("etag", '"ok"'),
    ]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=self.HEADERS, content=b"ok", request=request)


def _cache_transports() -> tuple[dict[str, Any], list[str]]:
    from resilience.integrations.httpx import ResilientTransport

    transports: dict[str, Any] = {
        NETWORK: httpx.HTTPTransport(),
        FLOOR: _AtOnce(),
        OURS_HIT: ResilientTransport(
            cache=rs.TwoTierCache(local=rs.LocalCache(), name="bench-cache"), name="bench-cache"
        ),
    }
    hishel = _hishel()
    skipped = []
    if hishel is not None:
        transports[HISHEL_HIT] = hishel.httpx.CacheTransport(
            httpx.HTTPTransport(), storage=_hishel_storage(hishel), rfc=True
        )
    else:
        skipped.append("hishel: not installed")
    return transports, skipped


def _check_hit(name: str, response: httpx.Response) -> None:
    assert response.read() == b"ok"
    if name == OURS_HIT:
        assert response.extensions["resilience.cache"] == "hit"
    elif name == HISHEL_HIT:
        assert response.extensions["caching"]["from_cache"]


def cache_group(base: str, s: Settings) -> Group:
    """d. sync cache hits through httpx.Client.get: ours, hishel's, the network."""
    url = base + "cached"
    transports, skipped = _cache_transports()
    clients = {name: httpx.Client(transport=t) for name, t in transports.items()}
    try:
        for name, client in clients.items():
            client.get(url)  # stored
            _check_hit(name, client.get(url))
        results = measure_sync({n: _sync_loop(c, url) for n, c in clients.items()}, s)
    finally:
        for client in clients.values():
            client.close()
    reference = HISHEL_HIT if HISHEL_HIT in results else None
    group = Group(
        "d. sync Client.get, a cache hit (max-age=3600)",
        "ns/request",
        results,
        FLOOR,
        reference,
        skipped=skipped,
    )
    group.notes.append("hishel: CacheTransport(rfc=True), SqliteStorage on sqlite3 :memory:")
    group.notes.append("both include httpx.Client's own work per request (URL, cookies, read)")
    return group


def _transport_loop(transport: Any, request: httpx.Request) -> SyncLoop:
    handle = transport.handle_request

    def loop(n: int) -> int:
        start = _clock()
        for _ in range(n):
            response = handle(request)
            response.read()
            response.close()
        return _clock() - start

    return loop


def cache_transport_group(base: str, s: Settings) -> Group:
    """d2. the same hits without httpx.Client: the transport's handle_request on a built
    request, body read. What each cache itself spends to answer."""
    transports, skipped = _cache_transports()
    request = httpx.Client().build_request("GET", base + "cached")
    try:
        for name, transport in transports.items():
            transport.handle_request(request).read()
            _check_hit(name, transport.handle_request(request))
        cases = {n: _transport_loop(t, request) for n, t in transports.items()}
        results = measure_sync(cases, s)
    finally:
        for transport in transports.values():
            transport.close()
    reference = HISHEL_HIT if HISHEL_HIT in results else None
    return Group(
        "d2. sync transport.handle_request, a cache hit (the cache's own cost)",
        "ns/request",
        results,
        None,
        reference,
        skipped=skipped,
    )


def async_cache_group(base: str, s: Settings) -> Group:
    """The async hit, ours alone (hishel's async storage needs anysqlite)."""
    from resilience.integrations.httpx import AsyncResilientTransport

    url = base + "cached"
    with event_loop() as loop:
        clients = {
            NETWORK: httpx.AsyncClient(transport=httpx.AsyncHTTPTransport()),
            OURS_HIT: httpx.AsyncClient(
                transport=AsyncResilientTransport(
                    cache=rs.TwoTierCache(local=rs.LocalCache()), name="bench-acache"
                )
            ),
        }

        async def check() -> None:
            for client in clients.values():
                await client.get(url)
                assert (await client.get(url)).text == "ok"

        try:
            loop.run_until_complete(check())
            results = measure_async_in(
                loop, {n: _async_loop(c, url) for n, c in clients.items()}, s
            )
        finally:

            async def close() -> None:
                for client in clients.values():
                    await client.aclose()

            loop.run_until_complete(close())
    return Group("e. AsyncClient.get (asyncio), a cache hit", "ns/request", results, None, NETWORK)


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text="ok")


def _added(group: Group) -> list[str]:
    lines = ["added per request (median over rounds of case - httpx in the same round):"]
    for name in group.results:
        if name != PLAIN and (value := group.paired_overhead(name)) is not None:
            lines.append(f"  {name}: {value:+,.0f} ns")
    return lines


def main(quick: bool) -> dict[str, Any]:
    print("# httpx")
    note = ensure_integrations()
    if note is not None:
        print(f"note: {note}")
    versions: dict[str, str | None] = {}
    for dist in ("httpx", "httpcore", "uvicorn", "httpx-retries", "hishel"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    print("peers: " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in versions.items()))
    s = settings(quick)
    print(f"measurement: {s.description}; cases interleaved, median and min over rounds")
    print("ratio = median over rounds of case / httpx measured in the same round")
    groups: dict[str, Group] = {}
    process, url = _spawn()
    try:
        groups["sync"] = sync_group(
            url, s, "a. sync Client.get, uvicorn over loopback", httpx.HTTPTransport
        )
        print_group(groups["sync"])
        for line in _added(groups["sync"]):
            print(line)
        groups["async"] = async_group(
            url, s, "b. AsyncClient.get (asyncio), uvicorn over loopback", httpx.AsyncHTTPTransport
        )
        print_group(groups["async"])
        for line in _added(groups["async"]):
            print(line)
        groups["cache"] = cache_group(url, s)
        print_group(groups["cache"])
        groups["cache_transport"] = cache_transport_group(url, s)
        print_group(groups["cache_transport"])
        groups["acache"] = async_cache_group(url, s)
        print_group(groups["acache"])
    finally:
        _stop(process)
    groups["mock"] = sync_group(
        "http://bench.test/",
        s,
        "c. sync Client.get on httpx.MockTransport (no network)",
        lambda: httpx.MockTransport(_ok),
    )
    groups["mock"].notes.append("what each transport adds, without the socket's noise")
    print_group(groups["mock"])
    for line in _added(groups["mock"]):
        print(line)

    targets: list[TargetResult] = [
        check_target("sync request over loopback", groups["sync"], OURS_ALL, PLAIN, TARGET),
        check_target("async request over loopback", groups["async"], OURS_ALL, PLAIN, TARGET),
    ]
    if HISHEL_HIT in groups["cache"].results:
        targets.append(
            check_target(
                "sync cache hit, the cache's own cost",
                groups["cache_transport"],
                OURS_HIT,
                HISHEL_HIT,
                HIT_TARGET,
            )
        )
        targets.append(
            check_overhead_target(
                "sync cache hit through Client.get, added over a transport that answers at once",
                groups["cache"],
                OURS_HIT,
                HISHEL_HIT,
                HIT_TARGET,
            )
        )
    print(
        "\n## targets (paired ratio of raw ns/request: <= 1.10 is an added cost <= 0.1x;"
        " a cache hit <= 0.5x hishel's)"
    )
    for target in targets:
        print_target(target)
    cache = groups["cache"]
    raw, floor = cache.ratio(OURS_HIT, HISHEL_HIT), cache.ratio(FLOOR, HISHEL_HIT)
    if raw is not None and floor is not None:
        print(
            f"sync cache hit through Client.get (info): ours/hishel = {raw:.2f} raw;"
            f" the floor alone (httpx.Client around a transport that answers at once)"
            f" is {floor:.2f} of hishel's hit"
        )
    for group in (groups["sync"], groups["async"]):
        if RETRIES in group.results and OURS_ALL in group.results:
            ours, theirs = group.paired_overhead(OURS_ALL), group.paired_overhead(RETRIES)
            if ours is not None and theirs is not None:
                print(
                    f"{group.title.split(',')[0]} (info): ours, every layer adds {ours:+,.0f} ns;"
                    f" httpx-retries adds {theirs:+,.0f} ns"
                )
    return {
        "versions": versions,
        "groups": {name: group.as_dict() for name, group in groups.items()},
        "targets": [t.as_dict() for t in targets],
    }


if __name__ == "__main__":  # pragma: no cover
    main("--quick" in sys.argv)
