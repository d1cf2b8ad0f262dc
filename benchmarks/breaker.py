"""Circuit breaker benchmarks: ours against circuitbreaker, pybreaker, purgatory, aiobreaker.

Four groups, each measured in this one process with its cases interleaved:

a. closed state, sync decorated call     c. open-state rejection (sync)
b. closed state, async decorated call    d. 8 threads through a GIL-releasing 1 ms call
e. fleet mode on vs off (RedisFleet; needs Redis, skipped without it)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import importlib.metadata
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

from prometheus_client import CollectorRegistry

import resilience as rs
from benchmarks._harness import (
    AsyncLoop,
    Group,
    Settings,
    SyncLoop,
    TargetResult,
    async_call_loop,
    call_loop,
    check_target,
    interleave,
    measure_async,
    measure_sync,
    print_group,
    print_target,
    rejection_loop,
    run_async,
    settings,
)
from benchmarks._redis import redis_or_reason, redis_url, unlink_prefix
from resilience.metrics import Metrics

PEERS = ("circuitbreaker", "pybreaker", "purgatory", "aiobreaker")
THRESHOLD = 5
# Long enough that no open breaker half-opens during a run. A float on purpose: with an
# int, a force_open()ed resilience breaker raises TypeError instead of CircuitOpenError
# (_admit returns config.recovery_timeout, which is not a float, to _enter).
RECOVERY_S = 3600.0
THREADS = 8
BLOCK_S = 0.001


class _Boom(Exception):
    """The failure used to trip breakers; nothing else raises it."""


def work(i: int) -> int:
    return i


async def awork(i: int) -> int:
    return i


def fail(i: int) -> int:
    raise _Boom(i)


def blocking(i: int) -> int:
    time.sleep(BLOCK_S)  # releases the GIL, like a socket read would
    return i


def _load_peers() -> tuple[dict[str, Any], dict[str, str | None]]:
    modules: dict[str, Any] = {}
    versions: dict[str, str | None] = {}
    for name in PEERS:
        try:
            modules[name] = importlib.import_module(name)
            versions[name] = importlib.metadata.version(name)
        except ImportError:
            versions[name] = None
    return modules, versions


def _ours(name: str) -> rs.CircuitBreaker:
    return rs.CircuitBreaker(name, failure_threshold=THRESHOLD, recovery_timeout=RECOVERY_S)


WATCHED: Final = "ours, watched"


def _watched(name: str) -> rs.CircuitBreaker:
    """A breaker as production runs it: watched by Prometheus metrics."""
    breaker = _ours(name)
    Metrics(CollectorRegistry()).watch(breaker)
    return breaker


def _trip(decorated_fail: Callable[[int], object]) -> None:
    """Fail THRESHOLD times through a breaker so it opens by its normal state machine."""
    for i in range(THRESHOLD):
        with contextlib.suppress(Exception):  # _Boom, or the peer's own "just tripped" error
            decorated_fail(i)


def _expect_value(fn: Callable[[int], object]) -> None:
    if fn(7) != 7:
        raise RuntimeError(f"{fn!r} did not pass the call through")


async def _aexpect_value(fn: Callable[[int], Awaitable[object]]) -> None:
    if await fn(7) != 7:
        raise RuntimeError(f"{fn!r} did not pass the call through")


def _expect_rejection(
    fn: Callable[[int], object], error: type[BaseException] | tuple[type[BaseException], ...]
) -> None:
    try:
        fn(0)
    except error:
        return
    raise RuntimeError(f"{fn!r} is not open: the call went through")


# -- a. closed state, sync ----------------------------------------------------------------


def closed_sync(peers: dict[str, Any], s: Settings) -> Group:
    group = Group("a. closed state, sync decorated call", "ns/op", {}, "bare", "circuitbreaker")
    ours = _ours("bench-closed-sync")
    watched = _watched("bench-closed-sync-watched")
    fns: dict[str, Callable[[int], object]] = {
        "bare": work,
        "ours": ours(work),
        WATCHED: watched(work),
        "ours b.call()": functools.partial(cast(Any, ours.call), work),
    }
    if "circuitbreaker" in peers:
        cb = peers["circuitbreaker"].circuit(
            failure_threshold=THRESHOLD, recovery_timeout=RECOVERY_S, name="bench-closed-sync"
        )
        fns["circuitbreaker"] = cb(work)
    if "pybreaker" in peers:
        pb = peers["pybreaker"].CircuitBreaker(fail_max=THRESHOLD, reset_timeout=RECOVERY_S)
        fns["pybreaker"] = pb(work)
    if "purgatory" in peers:
        # purgatory looks its breaker up by name in a unit of work on every call.
        factory = peers["purgatory"].SyncCircuitBreakerFactory(
            default_threshold=THRESHOLD, default_ttl=RECOVERY_S
        )
        fns["purgatory"] = factory("bench-closed-sync")(work)
    if "aiobreaker" in peers:
        # aiobreaker's decorator picks its sync path (CircuitBreaker.call) for a plain def.
        ab = peers["aiobreaker"].CircuitBreaker(
            fail_max=THRESHOLD, timeout_duration=datetime.timedelta(seconds=RECOVERY_S)
        )
        fns["aiobreaker"] = ab(work)
    group.skipped = [f"{p} not installed" for p in PEERS if p not in peers]
    group.notes.append(
        "ours b.call() is the undecorated call API (not a target); @b has the lock-free fast path"
    )
    for fn in fns.values():
        _expect_value(fn)
    group.results = measure_sync({name: call_loop(fn) for name, fn in fns.items()}, s)
    return group


# -- b. closed state, async ---------------------------------------------------------------


def closed_async(peers: dict[str, Any], s: Settings) -> Group:
    group = Group(
        "b. closed state, async decorated call (asyncio)", "ns/op", {}, "bare", "circuitbreaker"
    )
    ours = _ours("bench-closed-async")
    watched = _watched("bench-closed-async-watched")
    fns: dict[str, Callable[[int], Awaitable[object]]] = {
        "bare": awork,
        "ours": ours(awork),
        WATCHED: watched(awork),
        "ours b.acall()": functools.partial(cast(Any, ours.acall), awork),
    }
    if "circuitbreaker" in peers:
        cb = peers["circuitbreaker"].circuit(
            failure_threshold=THRESHOLD, recovery_timeout=RECOVERY_S, name="bench-closed-async"
        )
        fns["circuitbreaker"] = cb(awork)
    if "pybreaker" in peers:
        pb = peers["pybreaker"].CircuitBreaker(fail_max=THRESHOLD, reset_timeout=RECOVERY_S)
        fns["pybreaker"] = pb(awork)
        group.notes.append(
            "pybreaker wraps async def as a sync call: it records success when the coroutine is"
            " created and never sees the awaited outcome, so it does not track async failures"
        )
    if "purgatory" in peers:
        factory = peers["purgatory"].AsyncCircuitBreakerFactory(
            default_threshold=THRESHOLD, default_ttl=RECOVERY_S
        )
        fns["purgatory"] = factory("bench-closed-async")(awork)
    if "aiobreaker" in peers:
        ab = peers["aiobreaker"].CircuitBreaker(
            fail_max=THRESHOLD, timeout_duration=datetime.timedelta(seconds=RECOVERY_S)
        )
        fns["aiobreaker"] = ab(awork)
    group.skipped = [f"{p} not installed" for p in PEERS if p not in peers]

    async def check_all() -> None:
        for fn in fns.values():
            await _aexpect_value(fn)

    run_async(check_all)
    loops: dict[str, AsyncLoop] = {name: async_call_loop(fn) for name, fn in fns.items()}
    group.results = measure_async(loops, s)
    return group


# -- c. open-state rejection --------------------------------------------------------------


def _raise_fresh(i: int) -> int:
    raise _Boom(i)


def open_rejection(peers: dict[str, Any], s: Settings) -> Group:
    group = Group(
        "c. open-state rejection, sync (try/call/except)", "ns/op", {}, "bare", "pybreaker"
    )
    loops: dict[str, SyncLoop] = {}

    def add(name: str, fn: Callable[[int], object], error: Any, *, check: bool = True) -> None:
        if check:
            _expect_rejection(fn, error)
        loops[name] = rejection_loop(fn, error)

    # bare: the same try/call/except loop around a call that returns; "raise+catch" shows
    # what a plain Python raise of a fresh exception costs, for scale.
    add("bare", work, _Boom, check=False)
    add("raise+catch, no breaker", _raise_fresh, _Boom)
    forced = _ours("bench-open-forced")
    forced.force_open()
    add("ours", forced(work), rs.CircuitOpenError)
    tripped = _ours("bench-open-tripped")
    _trip(tripped(fail))
    add("ours (tripped)", tripped(work), rs.CircuitOpenError)
    if "pybreaker" in peers:
        pybreaker = peers["pybreaker"]
        pb = pybreaker.CircuitBreaker(fail_max=THRESHOLD, reset_timeout=RECOVERY_S)
        pb.open()
        add("pybreaker", pb(work), pybreaker.CircuitBreakerError)
    if "circuitbreaker" in peers:
        circuitbreaker = peers["circuitbreaker"]
        cb = circuitbreaker.circuit(
            failure_threshold=THRESHOLD, recovery_timeout=RECOVERY_S, name="bench-open"
        )
        _trip(cb(fail))
        add("circuitbreaker", cb(work), circuitbreaker.CircuitBreakerError)
    if "purgatory" in peers:
        loops["purgatory"] = _purgatory_open_loop(peers["purgatory"])
        group.notes.append(
            "purgatory raises its one OpenedState instance on every rejection, so that"
            " exception's traceback grows by ~6 frames per rejection (unbounded memory);"
            " the case rebuilds its breaker each round to keep memory bounded"
        )
    if "aiobreaker" in peers:
        aiobreaker = peers["aiobreaker"]
        ab = aiobreaker.CircuitBreaker(
            fail_max=THRESHOLD, timeout_duration=datetime.timedelta(seconds=RECOVERY_S)
        )
        ab.open()
        add("aiobreaker", ab(work), aiobreaker.CircuitBreakerError)
    group.skipped = [f"{p} not installed" for p in PEERS if p not in peers]
    group.results = measure_sync(loops, s)
    return group


def _purgatory_open_loop(purgatory: Any) -> SyncLoop:
    opened_state = importlib.import_module("purgatory.domain.model").OpenedState
    counter = iter(range(1 << 62))

    def loop(n: int) -> int:
        # A fresh, freshly tripped breaker per call of the loop, outside the timed part.
        factory = purgatory.SyncCircuitBreakerFactory(
            default_threshold=THRESHOLD, default_ttl=RECOVERY_S
        )
        name = f"bench-open-{next(counter)}"
        _trip(factory(name)(fail))
        fn = factory(name)(work)
        _expect_rejection(fn, opened_state)
        return rejection_loop(fn, opened_state)(n)

    return loop


# -- d. thread scaling --------------------------------------------------------------------


def _wall_ns(fn: Callable[[int], object], threads: int, calls: int) -> int:
    """Wall time for ``threads`` threads making ``calls`` calls each, from a common start."""
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        for i in range(calls):
            fn(i)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()  # thread start-up stays outside the timed part
    barrier.wait()
    start = time.perf_counter_ns()
    for thread in pool:
        thread.join()
    return time.perf_counter_ns() - start


def thread_scaling(peers: dict[str, Any], quick: bool) -> Group:
    calls = 8 if quick else 20
    s = Settings(rounds=3, warmup_rounds=0, loop_ns=0) if quick else Settings(5, 1, 0)
    group = Group(
        f"d. {THREADS} threads x {calls} calls of a {BLOCK_S * 1000:g} ms GIL-releasing call",
        "ms wall",
        {},
        "no breaker",
        "no breaker",
    )
    fns: dict[str, Callable[[int], object]] = {
        "no breaker": blocking,
        "ours": _ours("bench-threads")(blocking),
    }
    if "pybreaker" in peers:
        pb = peers["pybreaker"].CircuitBreaker(fail_max=THRESHOLD, reset_timeout=RECOVERY_S)
        fns["pybreaker"] = pb(blocking)
        group.notes.append(
            f"pybreaker holds its RLock across the protected call, so the {THREADS} threads"
            f" run one at a time (expect ~{THREADS}x)"
        )
    else:
        group.skipped.append("pybreaker not installed")
    group.notes.append(
        f"ideal wall time is {calls} x {BLOCK_S * 1000:g} ms plus sleep overshoot;"
        f" {s.rounds} rounds (+{s.warmup_rounds} warm-up)"
    )

    def run_round(order: Sequence[str]) -> dict[str, float]:
        return {name: _wall_ns(fns[name], THREADS, calls) / 1e6 for name in order}

    group.results = interleave(list(fns), run_round, s)
    return group


# -- e. fleet mode ------------------------------------------------------------------------

FLEET_PREFIX: Final = "resilience-bench:fleet"


def fleet_mode(s: Settings) -> Group:
    group = Group(
        "e. fleet mode on vs off, sync decorated call, watched", "ns/op", {}, "bare", WATCHED
    )
    client, reason = redis_or_reason(redis_url())
    if client is None:
        group.skipped.append(f"fleet mode: {reason}")
        return group
    rate = rs.FailureRate(0.5, window=100, minimum_calls=20)
    fleet = rs.RedisFleet(client, interval=1.0, prefix=FLEET_PREFIX)
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def watched(name: str, **kwargs: Any) -> rs.CircuitBreaker:
        breaker = rs.CircuitBreaker(name, recovery_timeout=RECOVERY_S, **kwargs)
        metrics.watch(breaker)
        return breaker

    fns: dict[str, Callable[[int], object]] = {
        "bare": work,
        WATCHED: watched("bench-fleet-off", failure_threshold=THRESHOLD)(work),
        "ours, watched, fleet": watched("bench-fleet-on", failure_threshold=THRESHOLD, fleet=fleet)(
            work
        ),
        "rate, watched": watched("bench-fleet-rate-off", failure_rate=rate)(work),
        "rate, watched, fleet": watched("bench-fleet-rate-on", failure_rate=rate, fleet=fleet)(
            work
        ),
    }
    try:
        for fn in fns.values():
            _expect_value(fn)
        flushes = fleet.flushes
        group.results = measure_sync({name: call_loop(fn) for name, fn in fns.items()}, s)
        group.notes.append(
            "rate rows (FailureRate 0.5 over 100 calls) compare with each other: a watched"
            " rate rule times every call and takes the lock, with or without a fleet"
        )
        group.notes.append(
            f"the fleet flushed {fleet.flushes - flushes} times in the background meanwhile"
            f" (2 breakers, interval {fleet.interval:g} s); calls send nothing to Redis"
            " (tests/test_breaker_fleet.py counts the server's commands)"
        )
    finally:
        fleet.close()
        unlink_prefix(client, FLEET_PREFIX)
        client.close()
    return group


# -- entry point --------------------------------------------------------------------------


def main(quick: bool) -> dict[str, Any]:
    peers, versions = _load_peers()
    s = settings(quick)
    print("# breaker")
    print(
        "peers: "
        + ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items())
    )
    print(f"measurement: {s.description}; cases interleaved, median and min over rounds")
    print("overhead = median - median of the bare case; ratio = median over rounds of")
    print("case / reference measured in the same round (pairing cancels machine drift)")

    groups: dict[str, Group] = {}
    builders: list[tuple[str, Callable[[], Group]]] = [
        ("closed_sync", lambda: closed_sync(peers, s)),
        ("closed_async", lambda: closed_async(peers, s)),
        ("open_rejection", lambda: open_rejection(peers, s)),
        ("threads", lambda: thread_scaling(peers, quick)),
        ("fleet", lambda: fleet_mode(s)),
    ]
    for key, build in builders:
        groups[key] = build()
        print_group(groups[key])  # as each finishes, so a long run shows progress

    targets: list[TargetResult] = [
        check_target("closed sync", groups["closed_sync"], "ours", "circuitbreaker", 0.25),
        check_target("closed async", groups["closed_async"], "ours", "circuitbreaker", 0.33),
        check_target("closed sync, watched", groups["closed_sync"], WATCHED, "ours", 1.5),
        check_target("closed async, watched", groups["closed_async"], WATCHED, "ours", 1.5),
        check_target("open rejection", groups["open_rejection"], "ours", "pybreaker", 0.50),
        check_target(
            f"{THREADS} threads",
            groups["threads"],
            "ours",
            "no breaker",
            1.20,
            peer_label="no-breaker",
        ),
    ]
    if groups["fleet"].results:  # Redis answered
        targets.append(
            check_target("fleet mode on", groups["fleet"], "ours, watched, fleet", WATCHED, 1.2)
        )
    print("\n## targets (paired ratio of raw ns/op or wall time, not of overhead)")
    for target in targets:
        print_target(target)

    return {
        "peers": versions,
        "settings": {
            "rounds": s.rounds,
            "warmup_rounds": s.warmup_rounds,
            "loop_ns": s.loop_ns,
        },
        "groups": {key: group.as_dict() for key, group in groups.items()},
        "targets": [target.as_dict() for target in targets],
    }
