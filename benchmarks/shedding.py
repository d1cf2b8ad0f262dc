"""Adaptive concurrency limits: what a call costs, and what shedding buys under overload.

Groups:

a./b. per-call cost, sync and async (one asyncio loop): a decorated call through our
   static ``Bulkhead`` and through ``ConcurrencyLimit`` (each algorithm), side by side,
   interleaved; every call is admitted, and the limit's samples (two clock reads, the
   window's sums) are what it adds.
c. overload: a real uvicorn app whose latency grows with concurrency (a fake database:
   an ``asyncio.Semaphore(SLOTS)`` held for ``WORK_S`` per request, so its capacity is
   SLOTS / WORK_S requests per second) is driven at multiples of that capacity by an
   open-loop load generator on loopback: arrivals at a fixed rate (users do not slow
   down because a server does), at most BOUND requests outstanding, each with a client
   deadline of DEADLINE_S (a request that misses it is abandoned and its connection
   closed, as a client that times out does; the server does not notice, and still does
   the work). Goodput is responses 200 within the deadline per second. Each run gets a
   fresh server: a warm-up at half the capacity, a settling period at the run's rate,
   then the measured period. ``bare`` is the app alone; ``shedding`` puts
   ``ConcurrencyLimitMiddleware`` in front of it.

The servers run in child processes (as in benchmarks/asgi.py, whose lean client this
reuses); they get a socket this process bound, and exit with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Final

import resilience as rs
from benchmarks._harness import (
    AsyncLoop,
    Group,
    Settings,
    TargetResult,
    async_call_loop,
    call_loop,
    check_target,
    ensure_integrations,
    event_loop,
    measure_async_in,
    measure_sync,
    print_group,
    print_target,
    serve_uvicorn,
    settings,
)
from benchmarks.asgi import _Connection, _Server, _stop

# -- a./b. per-call cost ----------------------------------------------------------------------

BARE: Final = "bare"
BULKHEAD: Final = "Bulkhead"
LIMIT: Final = "ConcurrencyLimit"  # the default algorithm, gradient2
LIMIT_VEGAS: Final = "ConcurrencyLimit vegas"
LIMIT_AIMD: Final = "ConcurrencyLimit aimd"
LIMIT_PER_SAMPLE: Final = "ConcurrencyLimit, window=None"
PER_CALL_TARGET: Final = 1.5


def work(i: int) -> int:
    return i


async def awork(i: int) -> int:
    return i


def _decorated(target: Any) -> dict[str, Any]:
    return {
        BARE: target,
        BULKHEAD: rs.Bulkhead(20)(target),
        LIMIT: rs.ConcurrencyLimit()(target),
        LIMIT_VEGAS: rs.ConcurrencyLimit("vegas")(target),
        LIMIT_AIMD: rs.ConcurrencyLimit("aimd")(target),
        LIMIT_PER_SAMPLE: rs.ConcurrencyLimit(window=None)(target),
    }


_PER_CALL_NOTES: Final = [
    "Bulkhead: rs.Bulkhead(20); ConcurrencyLimit: rs.ConcurrencyLimit() (gradient2, 1 s"
    " window, initial 20), 'vegas'/'aimd' the same with that algorithm; 'window=None'"
    " runs the algorithm on every sample (no window); all used as decorators",
    "every call is admitted (one at a time); the limit times each call and adds it to"
    " its window, the bulkhead only counts",
]


def per_call_sync(s: Settings) -> Group:
    group = Group("a. per-call cost, sync decorated call", "ns/op", {}, BARE, BULKHEAD)
    fns = _decorated(work)
    for name, fn in fns.items():
        if fn(7) != 7:
            raise RuntimeError(f"{name} did not pass the call through")
    group.results = measure_sync({name: call_loop(fn) for name, fn in fns.items()}, s)
    group.notes += _PER_CALL_NOTES
    return group


def per_call_async(s: Settings) -> Group:
    group = Group(
        "b. per-call cost, async decorated call (one asyncio loop)", "ns/op", {}, BARE, BULKHEAD
    )
    fns = _decorated(awork)

    async def check_all() -> None:
        for name, fn in fns.items():
            if await fn(7) != 7:
                raise RuntimeError(f"{name} did not pass the call through")

    loops: dict[str, AsyncLoop] = {name: async_call_loop(fn) for name, fn in fns.items()}
    with event_loop() as loop:
        loop.run_until_complete(check_all())
        group.results = measure_async_in(loop, loops, s)
    group.notes += _PER_CALL_NOTES
    return group


# -- c. overload --------------------------------------------------------------------------------

SLOTS: Final = 8  # the fake database's connections
WORK_S: Final = 0.04  # seconds a request holds one
CAPACITY: Final = SLOTS / WORK_S  # requests per second the app can serve
DEADLINE_S: Final = 1.0  # the clients' timeout
BOUND: Final = 256  # requests outstanding at most (connections)
SERVER_LIFETIME: Final = 300.0
START_TIMEOUT: Final = 30.0
BARE_APP: Final = "bare"
SHEDDING: Final = "shedding"
CASES: Final = (BARE_APP, SHEDDING)
P99_TARGET: Final = 2.0  # admitted p99 under overload / unloaded p99
GOODPUT_TARGET: Final = 0.9  # goodput under overload / peak goodput
#: The middleware's limit in the shedding case: gradient2 with a queue allowance of 2
#: (its default, 4, would let an 8-slot app queue 50% more: admitted latency pays for the
#: allowance), a short window (a server's latency is milliseconds), a ceiling, and a
#: brief, bounded queue in the middleware.
QUEUE_SIZE: Final = 2
LIMITER_DOC: Final = (
    f"ConcurrencyLimit(Gradient2(initial=20, max=200, queue_size={QUEUE_SIZE}), window=0.1,"
    f" max_wait=0.01, max_queue={SLOTS})"
)


@dataclasses.dataclass(frozen=True)
class OverloadSettings:
    multiples: tuple[float, ...]  # of CAPACITY; the first is the unloaded run
    warmup_s: float
    settle_s: float
    measure_s: float

    @property
    def description(self) -> str:
        return (
            f"per run: {self.warmup_s:g} s warm-up at {CAPACITY / 2:g} req/s, {self.settle_s:g} s"
            f" settling at the run's rate, {self.measure_s:g} s measured"
        )


def overload_settings(quick: bool) -> OverloadSettings:
    if quick:
        return OverloadSettings((0.5, 1.0, 2.5), warmup_s=1.0, settle_s=1.0, measure_s=2.0)
    return OverloadSettings(
        (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0), warmup_s=1.5, settle_s=1.5, measure_s=3.0
    )


def build_app(case: str) -> Any:
    """The app of one case: the fake database behind ``/``, ``/health`` and ``/stats``
    answered at once (with the middleware's limit figures in ``/stats``)."""
    slots = asyncio.Semaphore(SLOTS)
    limiter: rs.ConcurrencyLimit | None = None
    served = [0]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "/")
        if path == "/health":
            body = b"ok"
        elif path == "/stats":
            figures = {} if limiter is None else dict(limiter.telemetry().read())
            body = json.dumps({**figures, "served": served[0]}).encode()
        else:
            async with slots:
                await asyncio.sleep(WORK_S)
            served[0] += 1
            body = b"ok"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    if case == BARE_APP:
        return app
    if case != SHEDDING:
        raise ValueError(f"unknown case {case!r}")
    ensure_integrations()
    from resilience.integrations.asgi import ConcurrencyLimitMiddleware
    from resilience.policies.limits_math import Gradient2

    limiter = rs.ConcurrencyLimit(
        Gradient2(initial=20, max=200, queue_size=QUEUE_SIZE),
        window=0.1,
        max_wait=0.01,
        max_queue=SLOTS,
        name="shed",
    )
    return ConcurrencyLimitMiddleware(app, limiter, exempt=(r"/health", r"/stats"))


def serve(case: str, fd: int, lifetime: float) -> None:
    """Child process: serve ``build_app(case)`` on the listening socket ``fd``."""
    serve_uvicorn(build_app(case), fd, lifetime, backlog=2048)


def _main_serve() -> None:
    serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))


def _spawn(case: str) -> _Server:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        port = sock.getsockname()[1]
        root = Path(__file__).resolve().parent.parent
        code = "from benchmarks.shedding import _main_serve; _main_serve()"
        args = [sys.executable, "-c", code, case, str(sock.fileno()), str(SERVER_LIFETIME)]
        process = subprocess.Popen(
            args, cwd=root, pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL
        )
    finally:
        sock.close()
    return _Server(case, process, port)


class _Client(_Connection):
    """benchmarks/asgi.py's lean keep-alive connection, for any path."""

    async def fetch(self, path: bytes) -> tuple[int, bytes]:
        self.writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    @classmethod
    async def connect(cls, port: int) -> _Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)


@dataclasses.dataclass
class Run:
    """One case at one rate: what the clients saw in the measured period."""

    case: str
    multiple: float
    seconds: float
    sent: int = 0
    ok: int = 0
    shed: int = 0
    timeouts: int = 0
    errors: int = 0
    unsent: int = 0  # arrivals with every connection busy (the load loop's bound)
    latencies: list[float] = dataclasses.field(default_factory=list)  # of the 200s
    health: list[float] = dataclasses.field(default_factory=list)  # /health latencies
    health_failed: int = 0
    limit: int | None = None

    @property
    def offered(self) -> float:
        return self.multiple * CAPACITY

    @property
    def goodput(self) -> float:
        return self.ok / self.seconds

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ranked = sorted(self.latencies)
        return ranked[min(len(ranked), max(1, math.ceil(q * len(ranked)))) - 1]

    def as_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["latencies"], fields["health"]
        return {
            **fields,
            "offered": self.offered,
            "goodput": self.goodput,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "health_max": max(self.health) if self.health else None,
        }


class _Pool:
    """At most ``size`` keep-alive connections; one that timed out is closed and
    replaced in the background."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.idle: list[_Client] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def fill(self) -> None:
        self.idle = list(
            await asyncio.gather(*(_Client.connect(self.port) for _ in range(self.size)))
        )

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def lost(self, connection: _Client) -> None:
        connection.writer.close()
        self.spawn(self._replace())

    async def _replace(self) -> None:
        while True:
            try:
                self.idle.append(await _Client.connect(self.port))
                return
            except OSError:
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for connection in self.idle:
            await connection.close()


async def _request(pool: _Pool, connection: _Client, run: Run | None) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        status, body = await asyncio.wait_for(connection.fetch(b"/"), DEADLINE_S)
    except asyncio.TimeoutError:
        if run is not None:
            run.timeouts += 1
        pool.lost(connection)
        return
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        if run is not None:
            run.errors += 1
        pool.lost(connection)
        return
    pool.idle.append(connection)
    if run is None:
        return
    if status == 200 and body == b"ok":
        run.ok += 1
        run.latencies.append(loop.time() - start)
    elif status == 503:
        run.shed += 1
    else:
        run.errors += 1


async def _arrivals(pool: _Pool, rate: float, seconds: float, run: Run | None) -> None:
    """Requests at ``rate`` per second for ``seconds``, open loop."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    launched = 0
    while (elapsed := loop.time() - start) < seconds:
        due = int(elapsed * rate) - launched
        for _ in range(due):
            launched += 1
            if not pool.idle:
                if run is not None:
                    run.unsent += 1
                continue
            if run is not None:
                run.sent += 1
            pool.spawn(_request(pool, pool.idle.pop(), run))
        await asyncio.sleep(0.002)


async def _probe_health(port: int, run: Run, seconds: float) -> None:
    """GET /health every 50 ms: an exempt path must answer at once whatever the load."""
    connection = await _Client.connect(port)
    loop = asyncio.get_running_loop()
    ends = loop.time() + seconds
    try:
        while loop.time() < ends:
            start = loop.time()
            try:
                status, _ = await asyncio.wait_for(connection.fetch(b"/health"), DEADLINE_S)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
                run.health_failed += 1
                await connection.close()
                connection = await _Client.connect(port)
                continue
            if status == 200:
                run.health.append(loop.time() - start)
            else:
                run.health_failed += 1
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def _stats(port: int) -> dict[str, Any]:
    connection = await _Client.connect(port)
    try:
        status, body = await asyncio.wait_for(connection.fetch(b"/stats"), START_TIMEOUT)
    finally:
        await connection.close()
    if status != 200:
        raise RuntimeError(f"/stats answered {status}")
    figures: dict[str, Any] = json.loads(body)
    return figures


async def _wait_ready(port: int) -> None:
    ends = time.monotonic() + START_TIMEOUT
    while True:
        try:
            await _stats(port)
            return
        except OSError:
            if time.monotonic() > ends:
                raise
            await asyncio.sleep(0.05)


async def run_case(port: int, case: str, multiple: float, o: OverloadSettings) -> Run:
    """One run on a fresh server: warm-up, settling, measured period, drain."""
    await _wait_ready(port)
    pool = _Pool(port, BOUND)
    await pool.fill()
    run = Run(case, multiple, o.measure_s)
    try:
        await _arrivals(pool, CAPACITY / 2, o.warmup_s, None)
        await _arrivals(pool, multiple * CAPACITY, o.settle_s, None)
        probe = asyncio.ensure_future(_probe_health(port, run, o.measure_s))
        await _arrivals(pool, multiple * CAPACITY, o.measure_s, run)
        await probe
        stats = await _stats(port)
        run.limit = stats.get("limit")
        # The measured requests still out end within their deadline.
        pending = [t for t in pool.tasks if not t.done()]
        await asyncio.wait(pending, timeout=DEADLINE_S + 1) if pending else None
    finally:
        await pool.close()
    return run


def overload_run(quick: bool) -> list[Run]:
    """Every case at every rate, each on a fresh server (a bare app's backlog of
    abandoned requests would otherwise spill into the next run)."""
    o = overload_settings(quick)
    runs: list[Run] = []
    with event_loop() as loop:
        for multiple in o.multiples:
            servers = {case: _spawn(case) for case in CASES}
            try:
                for case in CASES:
                    work = run_case(servers[case].port, case, multiple, o)
                    runs.append(loop.run_until_complete(work))
            finally:
                for server in servers.values():
                    _stop(server)
    return runs


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the overload runs show: the unloaded p99, the peak goodput, and per
    overloaded run of each case its p99 and goodput relative to those."""

    unloaded_p99: float
    peak: float
    rows: list[tuple[Run, float | None, float]]  # run, p99 / unloaded p99, goodput / peak

    def targets(self) -> list[str]:
        lines = []
        for run, p99, good in self.rows:
            if run.case != SHEDDING:
                continue
            label = f"overload x{run.multiple:g}, {SHEDDING}"
            lines.append(_line(f"{label}: admitted p99 / unloaded p99", p99, P99_TARGET, "<="))
            lines.append(_line(f"{label}: goodput / peak", good, GOODPUT_TARGET, ">="))
        return lines


def _line(label: str, value: float | None, limit: float, op: str) -> str:
    if value is None:
        return f"{label} = n/a (target {op} {limit:.2f}) SKIP"
    ok = value <= limit if op == "<=" else value >= limit
    return f"{label} = {value:.2f} (target {op} {limit:.2f}) {'PASS' if ok else 'FAIL'}"


def verdict(runs: Sequence[Run]) -> Verdict:
    lowest = min(r.multiple for r in runs)
    unloaded = next(r for r in runs if r.multiple == lowest and r.case == SHEDDING)
    unloaded_p99 = unloaded.quantile(0.99) or math.nan
    peak = max(r.goodput for r in runs)
    rows = []
    for run in runs:
        if run.multiple <= 1.25:
            continue
        p99 = run.quantile(0.99)
        rows.append((run, None if p99 is None else p99 / unloaded_p99, run.goodput / peak))
    return Verdict(unloaded_p99, peak, rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.1f}"


def print_overload(runs: Sequence[Run], o: OverloadSettings) -> None:
    print(f"\n## c. overload: uvicorn app, capacity {CAPACITY:g} req/s, clients time out at"
          f" {DEADLINE_S:g} s")  # fmt: skip
    headers = [
        "case", "offered/s", "x cap", "goodput/s", "shed/s", "timeouts/s", "unsent/s",
        "p50 ms", "p99 ms", "limit", "health max ms",
    ]  # fmt: skip
    rows = []
    for r in runs:
        per_s = 1 / r.seconds
        rows.append([
            r.case, f"{r.offered:,.0f}", f"{r.multiple:g}", f"{r.goodput:,.0f}",
            f"{r.shed * per_s:,.0f}", f"{r.timeouts * per_s:,.0f}", f"{r.unsent * per_s:,.0f}",
            _ms(r.quantile(0.5)), _ms(r.quantile(0.99)),
            "-" if r.limit is None else str(r.limit),
            _ms(max(r.health) if r.health else None)
            + (f" ({r.health_failed} failed)" if r.health_failed else ""),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                    enumerate(zip(headers, widths, strict=True))))  # fmt: skip
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(row, widths, strict=True))))  # fmt: skip
    print(
        f"note: the app: asyncio.Semaphore({SLOTS}) held for {WORK_S * 1000:g} ms per request"
        f" (capacity {CAPACITY:g} req/s); raw ASGI, uvicorn in its own process (h11,"
        " asyncio loop); /health and /stats answered at once, exempt from shedding"
    )
    print(f"note: shedding: ConcurrencyLimitMiddleware with {LIMITER_DOC}")
    print(
        f"note: load: open loop, arrivals at the offered rate, at most {BOUND} outstanding"
        f" (keep-alive connections; 'unsent' arrivals found all busy); a request without"
        f" an answer in {DEADLINE_S:g} s is abandoned (connection closed) and counted in"
        " timeouts; goodput = 200s within the deadline per second; p50/p99 of the 200s;"
        " 'limit' = the middleware's limit at the end; /health probed every 50 ms"
    )
    print(f"note: {o.description}; a fresh server per run")


# -- entry point --------------------------------------------------------------------------------


def _have_uvicorn() -> bool:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def main(quick: bool) -> dict[str, Any]:
    s = settings(quick)
    print("# shedding")
    print(f"measurement (a, b): {s.description}; cases interleaved, median and min over rounds")
    print("ratio = median over rounds of case / Bulkhead measured in the same round")
    groups = {"per_call_sync": per_call_sync(s)}
    print_group(groups["per_call_sync"])
    groups["per_call_async"] = per_call_async(s)
    print_group(groups["per_call_async"])
    targets: list[TargetResult] = [
        check_target(f"per call, {kind}", groups[key], LIMIT, BULKHEAD, PER_CALL_TARGET)
        for key, kind in (("per_call_sync", "sync"), ("per_call_async", "async"))
    ]
    runs: list[Run] = []
    overload_lines: list[str] = []
    found: Verdict | None = None
    if _have_uvicorn():
        o = overload_settings(quick)
        runs = overload_run(quick)
        print_overload(runs, o)
        found = verdict(runs)
        print(
            f"unloaded p99 ({SHEDDING}, x{min(r.multiple for r in runs):g}):"
            f" {found.unloaded_p99 * 1000:.1f} ms; peak goodput: {found.peak:,.0f}/s"
        )
        for run, p99, good in found.rows:
            if run.case == BARE_APP:
                shown = "n/a (no 200s)" if p99 is None else f"{p99:.1f}x"
                print(
                    f"  {BARE_APP} at x{run.multiple:g}: p99 / unloaded p99 = {shown},"
                    f" goodput / peak = {good:.2f}"
                )
        overload_lines = found.targets()
    else:
        print("\nskipped: c. overload (uvicorn is not installed)")
    print("\n## targets")
    for target in targets:
        print_target(target)
    for line in overload_lines:
        print(line)
    return {
        "settings": {"rounds": s.rounds, "warmup_rounds": s.warmup_rounds, "loop_ns": s.loop_ns},
        "groups": {key: group.as_dict() for key, group in groups.items()},
        "targets": [target.as_dict() for target in targets],
        "overload": {
            "capacity": CAPACITY,
            "deadline_s": DEADLINE_S,
            "settings": dataclasses.asdict(overload_settings(quick)),
            "runs": [run.as_dict() for run in runs],
            "unloaded_p99": None if found is None else found.unloaded_p99,
            "peak_goodput": None if found is None else found.peak,
            "targets": overload_lines,
        },
    }
