"""Retry and pipeline benchmarks: ours against tenacity, stamina and backoff.

The success path only (the first attempt returns, no retry is needed), which is what a
decorated outbound call costs nearly every time it runs. Two groups, each measured in
this one process with its cases interleaved:

a. sync decorated call       b. async decorated call, every round on one asyncio loop

Ours runs as production runs it, watched by Prometheus metrics; an unwatched row of each
shows what watching costs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any, Final

from prometheus_client import CollectorRegistry

import resilience as rs
from benchmarks._harness import (
    AsyncLoop,
    Group,
    Settings,
    TargetResult,
    async_call_loop,
    call_loop,
    check_target,
    event_loop,
    measure_async_in,
    measure_sync,
    print_group,
    print_target,
    settings,
)
from resilience.metrics import Metrics

PEERS = ("tenacity", "stamina", "backoff")
ATTEMPTS = 3
# The tenacity wait below uses our default Backoff's initial and maximum, so the two
# would wait alike if a retry were needed (none is on this path).
WAIT_MULTIPLIER_S = 0.1
WAIT_MAX_S = 10.0
# The breaker in the pipeline: the breaker benchmark's settings.
THRESHOLD = 5
RECOVERY_S = 3600.0
TIMEOUT_S = 2.0
BULKHEAD_SLOTS = 10
BULKHEAD_WAIT_S = 0.5
CACHED: Final = -1  # the fallback's answer; never returned on this path

RETRY: Final = "ours @retry"
RETRY_UNWATCHED: Final = "ours @retry, unwatched"
PIPELINE: Final = "ours pipeline"
PIPELINE_UNWATCHED: Final = "ours pipeline, unwatched"


def work(i: int) -> int:
    return i


async def awork(i: int) -> int:
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


# -- ours -----------------------------------------------------------------------------------


def _watch(policy: Any) -> Any:
    """As production runs it: watched by Prometheus metrics (a pipeline's members too)."""
    Metrics(CollectorRegistry()).watch(policy)
    return policy


def _retry(name: str) -> rs.Retry:
    return rs.Retry(attempts=ATTEMPTS, on=ConnectionError, name=name)


def _pipeline(name: str) -> rs.Pipeline:
    """The issue's recommended order, outermost first."""
    return rs.pipeline(
        rs.Fallback(lambda error: CACHED, on=(rs.CircuitOpenError, rs.BulkheadFull)),
        rs.Retry(attempts=ATTEMPTS, on=ConnectionError),
        rs.CircuitBreaker(name, failure_threshold=THRESHOLD, recovery_timeout=RECOVERY_S),
        rs.Timeout(TIMEOUT_S),
        rs.Bulkhead(max_concurrent=BULKHEAD_SLOTS, max_wait=BULKHEAD_WAIT_S),
        name=name,
    )


def _ours(fns: dict[str, Any], target: Any, suffix: str) -> None:
    fns[RETRY] = _watch(_retry(f"bench-retry-{suffix}"))(target)
    fns[RETRY_UNWATCHED] = _retry(f"bench-retry-{suffix}-unwatched")(target)


def _ours_pipeline(fns: dict[str, Any], target: Any, suffix: str) -> None:
    fns[PIPELINE] = _watch(_pipeline(f"bench-pipeline-{suffix}"))(target)
    fns[PIPELINE_UNWATCHED] = _pipeline(f"bench-pipeline-{suffix}-unwatched")(target)


# -- peers ----------------------------------------------------------------------------------


def _tenacity(tenacity: Any) -> Callable[[Any], Any]:
    return tenacity.retry(  # type: ignore[no-any-return]
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        wait=tenacity.wait_exponential(multiplier=WAIT_MULTIPLIER_S, max=WAIT_MAX_S),
    )


def _stamina(stamina: Any) -> Callable[[Any], Any]:
    return stamina.retry(on=ConnectionError, attempts=ATTEMPTS)  # type: ignore[no-any-return]


def _backoff(backoff: Any) -> Callable[[Any], Any]:
    return backoff.on_exception(  # type: ignore[no-any-return]
        backoff.expo, ConnectionError, max_tries=ATTEMPTS
    )


def _stamina_defaults(stamina: Any) -> str:
    """Put stamina's switches in their default state, and say what that state is."""
    stamina.set_active(True)  # the default: retrying on
    stamina.instrumentation.set_on_retry_hooks(None)  # None: reset to the default hooks
    if stamina.is_testing():
        raise RuntimeError("stamina is in testing mode; the benchmark needs its default state")

    def found(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    # stamina picks its default hooks on the first scheduled retry, from what is installed.
    hooks = (["PrometheusOnRetryHook"] if found("prometheus_client") else []) + [
        "StructlogOnRetryHook" if found("structlog") else "LoggingOnRetryHook"
    ]
    return (
        "stamina's instrumentation is in its default state (set_on_retry_hooks(None), "
        f"active, not in testing mode): its default hooks here are {' + '.join(hooks)}, "
        "which run only when a retry is scheduled, so never on this path"
    )


def _peers(peers: dict[str, Any], fns: dict[str, Any], target: Any) -> None:
    if "tenacity" in peers:
        fns["tenacity"] = _tenacity(peers["tenacity"])(target)
    if "stamina" in peers:
        fns["stamina"] = _stamina(peers["stamina"])(target)
    if "backoff" in peers:
        fns["backoff"] = _backoff(peers["backoff"])(target)


def _notes(peers: dict[str, Any], group: Group) -> None:
    group.notes.append(
        f"ours: rs.Retry(attempts={ATTEMPTS}, on=ConnectionError), default Backoff "
        "(0.1 s initial, 10 s maximum, x2, full jitter); '@retry' and 'pipeline' are watched"
        " (resilience.metrics.Metrics(CollectorRegistry()).watch(policy), as production runs"
        " it; a pipeline's watch covers its members), the 'unwatched' rows are not"
    )
    group.notes.append(
        "ours pipeline: rs.pipeline(Fallback(lambda error: CACHED, on=(CircuitOpenError, "
        f"BulkheadFull)), Retry(attempts={ATTEMPTS}, on=ConnectionError), CircuitBreaker("
        f"failure_threshold={THRESHOLD}, recovery_timeout={RECOVERY_S:g}), "
        f"Timeout({TIMEOUT_S:g}), Bulkhead(max_concurrent={BULKHEAD_SLOTS}, "
        f"max_wait={BULKHEAD_WAIT_S:g})), outermost first, used as a decorator"
    )
    if "tenacity" in peers:
        group.notes.append(
            f"tenacity: @retry(stop=stop_after_attempt({ATTEMPTS}), "
            "retry=retry_if_exception_type(ConnectionError), "
            f"wait=wait_exponential(multiplier={WAIT_MULTIPLIER_S:g}, max={WAIT_MAX_S:g}))"
            "; no before/after/before_sleep callbacks; as always, each call copies the"
            " Retrying object and resets its statistics dict (tenacity's design)"
        )
    if "stamina" in peers:
        group.notes.append(
            f"stamina: @stamina.retry(on=ConnectionError, attempts={ATTEMPTS}), every other"
            " argument at its default (timeout=45.0, wait_initial=0.1, wait_max=5.0,"
            " wait_jitter=1.0, wait_exp_base=2)"
        )
        group.notes.append(_stamina_defaults(peers["stamina"]))
    if "backoff" in peers:
        group.notes.append(
            f"backoff: @backoff.on_exception(backoff.expo, ConnectionError, max_tries="
            f"{ATTEMPTS}), every other argument at its default (expo base 2, factor 1, no"
            " max_value; jitter=full_jitter; logger='backoff'; no on_success handlers)"
        )
    group.skipped = [f"{p} not installed" for p in PEERS if p not in peers]


def _expect_value(fn: Callable[[int], object]) -> None:
    if fn(7) != 7:
        raise RuntimeError(f"{fn!r} did not pass the call through")


async def _aexpect_value(fn: Callable[[int], Awaitable[object]]) -> None:
    if await fn(7) != 7:
        raise RuntimeError(f"{fn!r} did not pass the call through")


# -- a. sync ----------------------------------------------------------------------------------


def success_sync(peers: dict[str, Any], s: Settings) -> Group:
    group = Group("a. success path, sync decorated call", "ns/op", {}, "bare", "tenacity")
    fns: dict[str, Callable[[int], object]] = {"bare": work}
    _ours(fns, work, "sync")
    _peers(peers, fns, work)
    _ours_pipeline(fns, work, "sync")
    _notes(peers, group)
    for fn in fns.values():
        _expect_value(fn)
    group.results = measure_sync({name: call_loop(fn) for name, fn in fns.items()}, s)
    return group


# -- b. async ---------------------------------------------------------------------------------


def success_async(peers: dict[str, Any], s: Settings) -> Group:
    group = Group(
        "b. success path, async decorated call (one asyncio loop)",
        "ns/op",
        {},
        "bare",
        "tenacity",
    )
    fns: dict[str, Callable[[int], Awaitable[object]]] = {"bare": awork}
    _ours(fns, awork, "async")
    _peers(peers, fns, awork)
    _ours_pipeline(fns, awork, "async")
    _notes(peers, group)
    group.notes.append(
        "every round runs on the one asyncio loop (as a service's calls do), so our"
        " Timeout keeps its per-loop timer across rounds"
    )

    async def check_all() -> None:
        for fn in fns.values():
            await _aexpect_value(fn)

    loops: dict[str, AsyncLoop] = {name: async_call_loop(fn) for name, fn in fns.items()}
    with event_loop() as loop:
        loop.run_until_complete(check_all())
        group.results = measure_async_in(loop, loops, s)
    return group


# -- entry point ------------------------------------------------------------------------------


def main(quick: bool) -> dict[str, Any]:
    peers, versions = _load_peers()
    s = settings(quick)
    print("# policies")
    print(
        "peers: "
        + ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items())
    )
    print(f"measurement: {s.description}; cases interleaved, median and min over rounds")
    print("success path only: the first attempt returns, nothing is retried")
    print("overhead = median - median of the bare case; ratio = median over rounds of")
    print("case / reference measured in the same round (pairing cancels machine drift)")

    groups: dict[str, Group] = {}
    builders: list[tuple[str, Callable[[], Group]]] = [
        ("success_sync", lambda: success_sync(peers, s)),
        ("success_async", lambda: success_async(peers, s)),
    ]
    for key, build in builders:
        groups[key] = build()
        print_group(groups[key])  # as each finishes, so a long run shows progress

    targets: list[TargetResult] = []
    for key, kind in (("success_sync", "sync"), ("success_async", "async")):
        group = groups[key]
        targets += [
            check_target(f"@retry {kind}", group, RETRY, "tenacity", 0.05),
            check_target(f"@retry {kind}", group, RETRY, "backoff", 0.3),
            check_target(f"pipeline {kind}", group, PIPELINE, "tenacity", 0.15),
        ]
    print("\n## targets (paired ratio of raw ns/op, not of overhead)")
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
