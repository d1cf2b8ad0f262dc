"""The httpx transport's cost: ours against plain httpx and httpx-retries.

Groups, each measured in this one process with its cases interleaved:

a. sync ``httpx.Client.get`` over loopback to a uvicorn server in a child process (one
   keep-alive connection per client, requests one at a time, every response 200 "ok").
b. the same with ``httpx.AsyncClient`` on one asyncio loop.
c. no network: the inner transport is an ``httpx.MockTransport``, so the table shows
   what each transport adds in nanoseconds, without a socket's noise.

Cases: plain httpx; ours with its defaults (the server's limits followed, in memory);
ours with every layer on (per-host breaker, Retry, TokenBucket, server limits, metrics
watching); httpx-retries' RetryTransport (its default Retry), when installed. The
target: what ours adds, with every layer on, is at most 0.1x a request's own cost, that
is ours/plain <= 1.10 on raw time per request, paired by round.
"""

from __future__ import annotations

import importlib.metadata
import socket
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
TARGET: Final = 1.10  # ours/plain: added cost <= 0.1x the request's own
SERVER_LIFETIME: Final = 300.0

_clock = time.perf_counter_ns

SERVER = """
import asyncio, os, socket, sys, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2"), (b"content-type", b"text/plain")]})
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
    for dist in ("httpx", "httpcore", "uvicorn", "httpx-retries"):
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
    print("\n## targets (paired ratio of raw ns/request: <= 1.10 is an added cost <= 0.1x)")
    for target in targets:
        print_target(target)
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
