"""Shared measurement helpers for the benchmark modules.

Every case of a group is measured in the same process and interleaved: each round
runs every case once, in a rotating order, so a machine that speeds up or slows down
(turbo, thermal limits, a noisy neighbour) hits all cases alike. Results are raw
per-op times; nothing is subtracted, but a bare baseline case lets the table show
the overhead a wrapper adds on top of the call itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "AsyncLoop",
    "CaseResult",
    "Group",
    "Settings",
    "SyncLoop",
    "TargetResult",
    "async_call_loop",
    "call_loop",
    "check_overhead_target",
    "check_target",
    "ensure_integrations",
    "event_loop",
    "interleave",
    "measure_async",
    "measure_async_in",
    "measure_sync",
    "print_group",
    "print_target",
    "rejection_loop",
    "run_async",
    "settings",
]

T = TypeVar("T")
Backend = Literal["asyncio", "trio"]

#: Runs ``n`` operations and returns the nanoseconds its timed part took.
SyncLoop = Callable[[int], int]
#: The same for an async case; awaited inside the round's event loop.
AsyncLoop = Callable[[int], Awaitable[int]]

_clock = time.perf_counter_ns


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int  # measured rounds; the median is taken over these
    warmup_rounds: int  # run and thrown away (caches, branch predictors, lazy imports)
    loop_ns: int  # how long one case's loop should run in one round

    @property
    def description(self) -> str:
        return (
            f"{self.rounds} rounds (+{self.warmup_rounds} warm-up), "
            f"~{self.loop_ns / 1e6:g} ms per case per round"
        )


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(rounds=7, warmup_rounds=1, loop_ns=4_000_000)
    return Settings(rounds=41, warmup_rounds=2, loop_ns=20_000_000)


@dataclasses.dataclass
class CaseResult:
    name: str
    n: int  # operations per round (1 for wall-time cases)
    samples: list[float]  # one value per measured round, in the group's unit

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "median": self.median, "min": self.min, "samples": self.samples}


@dataclasses.dataclass
class Group:
    """One table: cases measured together, plus what could not be measured and why."""

    title: str
    unit: str  # e.g. "ns/op" or "ms wall"
    results: dict[str, CaseResult]
    baseline: str | None  # the bare case that overhead is computed against
    reference: str | None  # the case the ratio column divides by
    skipped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def median(self, case: str) -> float | None:
        result = self.results.get(case)
        return None if result is None else result.median

    def ratio(self, case: str, reference: str | None) -> float | None:
        """Median over rounds of case/reference within the same round.

        Pairing by round cancels drift slower than a round (the cases of a round run
        back to back), which a ratio of the two overall medians would not.
        """
        mine = self.results.get(case)
        theirs = self.results.get(reference) if reference else None
        if mine is None or theirs is None:
            return None
        pairs = zip(mine.samples, theirs.samples, strict=True)
        return statistics.median(a / b for a, b in pairs if b > 0)

    def paired_overhead(self, case: str) -> float | None:
        """Median over rounds of case - baseline within the same round (steadier than the
        difference of the two medians when the machine drifts)."""
        mine = self.results.get(case)
        base = self.results.get(self.baseline) if self.baseline else None
        if mine is None or base is None:
            return None
        return statistics.median(a - z for a, z in zip(mine.samples, base.samples, strict=True))

    def overhead_ratio(self, case: str, reference: str) -> float | None:
        """Median over rounds of (case - baseline) / (reference - baseline), all three
        from the same round: how the added costs compare, paired like ``ratio``."""
        if self.baseline is None:
            return None
        mine, theirs = self.results.get(case), self.results.get(reference)
        base = self.results.get(self.baseline)
        if mine is None or theirs is None or base is None:
            return None
        rounds = zip(mine.samples, theirs.samples, base.samples, strict=True)
        ratios = [(a - z) / (b - z) for a, b, z in rounds if b > z]
        return statistics.median(ratios) if ratios else None

    def as_dict(self) -> dict[str, Any]:
        cases = {
            name: {**r.as_dict(), "ratio_vs_reference": self.ratio(name, self.reference)}
            for name, r in self.results.items()
        }
        return {
            "title": self.title,
            "unit": self.unit,
            "baseline": self.baseline,
            "reference": self.reference,
            "cases": cases,
            "skipped": self.skipped,
            "notes": self.notes,
        }


# -- loops --------------------------------------------------------------------------------
# The loop variable is passed as the argument so each call does real argument passing
# without an extra lambda layer that would dilute the differences being measured.


def call_loop(fn: Callable[[int], object]) -> SyncLoop:
    def loop(n: int) -> int:
        indices = range(n)  # built before the clock starts
        start = _clock()
        for i in indices:
            fn(i)
        return _clock() - start

    return loop


def rejection_loop(
    fn: Callable[[int], object], error: type[BaseException] | tuple[type[BaseException], ...]
) -> SyncLoop:
    """try/call/except per iteration; the bare baseline uses the same shape."""

    def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for i in indices:
            try:  # noqa: SIM105 - contextlib.suppress would add a context manager per op
                fn(i)
            except error:
                pass
        return _clock() - start

    return loop


def async_call_loop(fn: Callable[[int], Awaitable[object]]) -> AsyncLoop:
    async def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for i in indices:
            await fn(i)
        return _clock() - start

    return loop


# -- interleaving -------------------------------------------------------------------------


def _orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Rotate the start each round and reverse every other pass, so each case sits in
    every position and after every neighbour about equally often."""
    k = len(names)
    orders = []
    for r in range(rounds):
        shift = r % k
        order = list(names[shift:]) + list(names[:shift])
        if (r // k) % 2:
            order.reverse()
        orders.append(order)
    return orders


def interleave(
    names: Sequence[str],
    run_round: Callable[[Sequence[str]], Mapping[str, float]],
    s: Settings,
    ops: Mapping[str, int] | None = None,
) -> dict[str, CaseResult]:
    """Run ``run_round(order)`` warm-up + measured times; it returns one total per case
    (ns for ``ops[name]`` operations, or any unit when ``ops`` is None)."""
    per_op = dict(ops) if ops is not None else dict.fromkeys(names, 1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r, order in enumerate(_orders(names, s.warmup_rounds + s.rounds)):
        gc.collect()  # start every round from the same heap, outside any timed part
        totals = run_round(order)
        if r < s.warmup_rounds:
            continue
        for name in order:
            samples[name].append(totals[name] / per_op[name])
    return {name: CaseResult(name, per_op[name], samples[name]) for name in names}


def _size(elapsed_ns: int, n: int, loop_ns: int) -> int:
    return max(100, round(n * loop_ns / max(elapsed_ns, 1)))


def _calibrate(loop: SyncLoop, loop_ns: int) -> int:
    """Grow n until one loop takes a measurable while, then scale n to ``loop_ns``."""
    n = 100
    while True:
        elapsed = loop(n)
        if elapsed >= loop_ns // 10 or n >= 100_000_000:
            return _size(elapsed, n, loop_ns)
        n *= 10


def measure_sync(cases: Mapping[str, SyncLoop], s: Settings) -> dict[str, CaseResult]:
    ops = {name: _calibrate(loop, s.loop_ns) for name, loop in cases.items()}

    def run_round(order: Sequence[str]) -> dict[str, float]:
        return {name: cases[name](ops[name]) for name in order}

    return interleave(list(cases), run_round, s, ops)


# -- async --------------------------------------------------------------------------------


def run_async(fn: Callable[[], Coroutine[Any, Any, T]], backend: Backend = "asyncio") -> T:
    """Run ``fn()`` in a fresh event loop of ``backend``."""
    if backend == "trio":
        import trio  # only needed when asked for

        return trio.run(fn)
    return asyncio.run(fn())


def measure_async(
    cases: Mapping[str, AsyncLoop], s: Settings, backend: Backend = "asyncio"
) -> dict[str, CaseResult]:
    """Like measure_sync; every round runs all cases inside one fresh event loop."""

    async def calibrate_all() -> dict[str, int]:
        ops: dict[str, int] = {}
        for name, loop in cases.items():
            n = 100
            while True:
                elapsed = await loop(n)
                if elapsed >= s.loop_ns // 10 or n >= 100_000_000:
                    ops[name] = _size(elapsed, n, s.loop_ns)
                    break
                n *= 10
        return ops

    ops = run_async(calibrate_all, backend)

    def run_round(order: Sequence[str]) -> dict[str, float]:
        async def one_round() -> dict[str, float]:
            return {name: await cases[name](ops[name]) for name in order}

        return run_async(one_round, backend)

    return interleave(list(cases), run_round, s, ops)


@contextlib.contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One asyncio loop kept across several ``run_until_complete`` calls (what
    ``asyncio.Runner`` does on 3.11+); leftover tasks are cancelled before it closes."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def measure_async_in(
    loop: asyncio.AbstractEventLoop, cases: Mapping[str, AsyncLoop], s: Settings
) -> dict[str, CaseResult]:
    """Like measure_async, but every round runs in the one asyncio ``loop`` given, for
    cases that hold loop-bound resources (async client connections, loop-bound limiters)."""

    async def calibrate(case: AsyncLoop) -> int:
        n = 100
        while True:
            elapsed = await case(n)
            if elapsed >= s.loop_ns // 10 or n >= 100_000_000:
                return _size(elapsed, n, s.loop_ns)
            n *= 10

    ops = {name: loop.run_until_complete(calibrate(case)) for name, case in cases.items()}

    def run_round(order: Sequence[str]) -> dict[str, float]:
        async def one_round() -> dict[str, float]:
            return {name: await cases[name](ops[name]) for name in order}

        return loop.run_until_complete(one_round())

    return interleave(list(cases), run_round, s, ops)


# -- output -------------------------------------------------------------------------------


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_group(group: Group) -> None:
    print(f"\n## {group.title}")
    base = group.median(group.baseline) if group.baseline else None
    headers = [
        "case",
        f"{group.unit} (median)",
        "min",
        f"overhead vs {group.baseline}" if group.baseline else "overhead",
        f"ratio vs {group.reference}" if group.reference else "ratio",
    ]
    rows = []
    for name, result in group.results.items():
        overhead = "-" if base is None or name == group.baseline else _num(result.median - base)
        paired = group.ratio(name, group.reference)
        ratio = "-" if paired is None else f"{paired:.2f}x"
        rows.append([name, _num(result.median), _num(result.min), overhead, ratio])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    for skipped in group.skipped:
        print(f"skipped: {skipped}")
    for note in group.notes:
        print(f"note: {note}")


@dataclasses.dataclass(frozen=True)
class TargetResult:
    label: str
    ours: str
    peer: str
    limit: float
    value: float | None  # None when a side could not be measured

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else self.value <= self.limit

    def line(self) -> str:
        lhs = f"{self.label}: {self.ours}/{self.peer}"
        if self.value is None:
            return f"{lhs} = n/a (target <= {self.limit:.2f}) SKIP"
        verdict = "PASS" if self.passed else "FAIL"
        return f"{lhs} = {self.value:.2f} (target <= {self.limit:.2f}) {verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "ours": self.ours,
            "peer": self.peer,
            "limit": self.limit,
            "value": self.value,
            "passed": self.passed,
        }


def check_target(
    label: str, group: Group, ours: str, peer: str, limit: float, *, peer_label: str | None = None
) -> TargetResult:
    """ours/peer on raw values (not overhead), paired by round, against ``limit``."""
    value = group.ratio(ours, peer)
    return TargetResult(label, ours, peer_label or peer, limit, value)


def check_overhead_target(
    label: str, group: Group, ours: str, peer: str, limit: float, *, peer_label: str | None = None
) -> TargetResult:
    """ours/peer on added cost (each minus the group's baseline), paired by round."""
    value = group.overhead_ratio(ours, peer)
    return TargetResult(label, ours, peer_label or peer, limit, value)


def print_target(target: TargetResult) -> None:
    print(target.line())


class KeyCycle:
    """Keys in turn; each take() continues where the last one stopped."""

    def __init__(self, keys: Sequence[Any]) -> None:
        self._keys = list(keys)
        self._pos = 0

    def take(self, n: int) -> list[Any]:
        start, size = self._pos, len(self._keys)
        self._pos = (start + n) % size
        return (self._keys * ((start + n) // size + 1))[start : start + n]


def ensure_integrations() -> str | None:
    """Make ``resilience.integrations`` importable; a note when that took a fallback.

    Run from the repository root, ``./resilience`` (the source folder) comes first on
    sys.path and shadows the installed link tree, which is where ``integrations/`` is
    mapped to ``resilience.integrations``. The fallback does that mapping by hand, as
    pyproject's package-dir does; the code is the same files either way.
    """
    try:
        importlib.import_module("resilience.integrations")
    except ModuleNotFoundError as error:
        if error.name != "resilience.integrations":
            raise
    else:
        return None
    import resilience

    folder = Path(__file__).resolve().parent.parent / "integrations"
    spec = importlib.util.spec_from_file_location(
        "resilience.integrations",
        folder / "__init__.py",
        submodule_search_locations=[str(folder)],
    )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("resilience.integrations", name="resilience.integrations")
    module = importlib.util.module_from_spec(spec)
    sys.modules["resilience.integrations"] = module
    spec.loader.exec_module(module)
    resilience.integrations = module  # type: ignore[attr-defined]
    return (
        f"resilience.integrations was shadowed by {Path(resilience.__file__).parent}"
        f" (run from the repository root); loaded from {folder}"
    )


def serve_uvicorn(app: Any, fd: int, lifetime: float, **config: Any) -> None:
    """In a child process: serve ``app`` with uvicorn on the listening socket ``fd`` the
    parent bound; exit when the parent goes away or after ``lifetime`` seconds."""
    import uvicorn

    sock = socket.socket(fileno=fd)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            timeout_keep_alive=int(lifetime),  # connections idle while other cases run
            **config,
        )
    )
    parent = os.getppid()

    async def watch() -> None:
        deadline = time.monotonic() + lifetime
        while not server.should_exit:
            if os.getppid() != parent or time.monotonic() > deadline:
                server.should_exit = True
            await asyncio.sleep(0.25)

    async def run() -> None:
        watcher = asyncio.ensure_future(watch())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    asyncio.run(run())
