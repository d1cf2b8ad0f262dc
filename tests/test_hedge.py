"""Hedge: a slow call gets another attempt, the first success wins, the rest are
cancelled; a retry budget caps the extra load; async only. On asyncio and trio.

Hedging is about time, so these tests use real, short delays (20-50 ms) against
attempts that sleep far longer (10 s) when they are meant to be slow: a loser that was
not cancelled would hold a test up for seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import resilience as rs
from resilience.metrics import Metrics

anyio_test = pytest.mark.anyio
SLOW = 10.0


class Attempts:
    """A dependency whose n-th attempt (0-based) sleeps ``plan[n]`` seconds and then
    returns ``n``, or raises when the plan entry is an exception; it records what
    started, finished and was cancelled."""

    def __init__(self, *plan: float | BaseException) -> None:
        self.plan = list(plan)
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []

    async def __call__(self) -> int:
        n = len(self.started)
        self.started.append(n)
        step = self.plan[n] if n < len(self.plan) else self.plan[-1]
        try:
            if isinstance(step, BaseException):
                await anyio.lowlevel.checkpoint()
                raise step
            await anyio.sleep(step)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(n)
            raise
        self.finished.append(n)
        return n


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    start = time.monotonic()
    result = await fn()
    return result, time.monotonic() - start


@anyio_test
async def test_a_fast_call_is_not_hedged() -> None:
    hedge = rs.Hedge(delay=0.5)
    dependency = Attempts(0.0)
    assert await hedge.acall(dependency) == 0
    assert dependency.started == [0]
    assert hedge.telemetry().read() == {"calls": 1, "hedges": 0, "wins": 0, "refused": 0}


@anyio_test
async def test_a_slow_call_is_hedged_and_the_loser_cancelled() -> None:
    hedge = rs.Hedge(delay=0.02)
    dependency = Attempts(SLOW, 0.0)
    result, took = await timed(lambda: hedge.acall(dependency))
    assert result == 1  # the hedge answered
    assert took < 2.0
    assert dependency.started == [0, 1]
    assert dependency.cancelled == [0]
    assert hedge.telemetry().read() == {"calls": 1, "hedges": 1, "wins": 1, "refused": 0}


@anyio_test
async def test_hedges_start_one_delay_apart_up_to_max_extra() -> None:
    hedge = rs.Hedge(delay=0.03, max_extra=2)
    dependency = Attempts(SLOW, SLOW, 0.0)
    result, took = await timed(lambda: hedge.acall(dependency))
    assert result == 2
    assert 0.05 <= took < 2.0  # the third attempt started two delays in
    assert sorted(dependency.cancelled) == [0, 1]
    read = hedge.telemetry().read()
    assert (read["hedges"], read["wins"]) == (2, 1)


@anyio_test
async def test_the_first_attempt_may_still_win() -> None:
    hedge = rs.Hedge(delay=0.02)
    dependency = Attempts(0.06, SLOW)
    assert await hedge.acall(dependency) == 0
    assert dependency.cancelled == [1]
    read = hedge.telemetry().read()
    assert (read["hedges"], read["wins"]) == (1, 0)


@anyio_test
async def test_delay_zero_starts_every_attempt_at_once() -> None:
    hedge = rs.Hedge(delay=0, max_extra=2)
    dependency = Attempts(SLOW, 0.01, SLOW)
    assert await hedge.acall(dependency) == 1
    assert dependency.started == [0, 1, 2]
    assert sorted(dependency.cancelled) == [0, 2]


@anyio_test
async def test_a_lone_failure_is_raised_at_once_without_a_hedge() -> None:
    hedge = rs.Hedge(delay=0.5)
    dependency = Attempts(ConnectionError("reset"))
    with pytest.raises(ConnectionError, match="reset"):
        await hedge.acall(dependency)
    assert dependency.started == [0]  # retrying errors is Retry's job
    assert hedge.telemetry().read()["hedges"] == 0


@anyio_test
async def test_a_failed_hedge_leaves_the_race_to_the_first_attempt() -> None:
    hedge = rs.Hedge(delay=0.02, max_extra=1)
    dependency = Attempts(0.08, ConnectionError("hedge failed"))
    assert await hedge.acall(dependency) == 0
    assert dependency.started == [0, 1]


@anyio_test
async def test_when_every_attempt_fails_the_last_error_is_raised() -> None:
    hedge = rs.Hedge(delay=0.02, max_extra=1)

    calls: list[int] = []

    async def failing() -> None:
        n = len(calls)
        calls.append(n)
        if n == 0:
            await anyio.sleep(0.06)
        raise ConnectionError(f"attempt {n}")

    with pytest.raises(ConnectionError, match="attempt 0"):  # the hedge failed first
        await hedge.acall(failing)
    assert calls == [0, 1]


@anyio_test
async def test_an_outside_cancellation_cancels_every_attempt() -> None:
    hedge = rs.Hedge(delay=0.01, max_extra=2)
    dependency = Attempts(SLOW)
    with anyio.move_on_after(0.1) as scope:
        await hedge.acall(dependency)
    assert scope.cancelled_caught
    assert sorted(dependency.cancelled) == [0, 1, 2]


@anyio_test
async def test_a_spent_budget_starts_no_hedge() -> None:
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0)
    hedge = rs.Hedge(delay=0.01, budget=budget, name="budgeted")
    dependency = Attempts(0.04)  # every attempt slow enough to be hedged
    for _ in range(20):
        await hedge.acall(dependency)
    read = hedge.telemetry().read()
    # 20 first attempts deposit 2 tokens: two hedges, the other 18 refused
    assert (read["calls"], read["hedges"], read["refused"]) == (20, 2, 18)
    assert len(dependency.started) == 22  # not 40: hedging did not double the load


@anyio_test
async def test_a_quantile_delay_follows_recent_first_attempts() -> None:
    hedge = rs.Hedge(delay="p95", min_samples=20)
    fast = Attempts(0.001)
    assert hedge.current_delay() is None
    for _ in range(20):
        await hedge.acall(fast)  # not hedged: too few samples yet
    assert hedge.telemetry().read()["hedges"] == 0
    delay = hedge.current_delay()
    assert delay is not None
    assert 0.0005 <= delay < 0.5
    slow = Attempts(SLOW, 0.0)
    result, took = await timed(lambda: hedge.acall(slow))
    assert result == 1
    assert took < 2.0
    assert hedge.telemetry().read()["wins"] == 1


@anyio_test
async def test_hedge_in_a_pipeline_times_out_each_attempt() -> None:
    hedge = rs.Hedge(delay=0.02, max_extra=1)
    policy = rs.pipeline(hedge, rs.Timeout(5.0))

    @policy
    async def lookup(dependency: Attempts) -> int:
        return await dependency()

    dependency = Attempts(SLOW, 0.0)
    assert await lookup(dependency) == 1
    assert dependency.cancelled == [0]


def test_sync_calls_are_refused_with_the_reason() -> None:
    hedge = rs.Hedge(name="h")
    with pytest.raises(TypeError, match="cannot be cancelled"):
        hedge.call(lambda: 1)
    with pytest.raises(TypeError, match="async functions only"):

        @hedge
        def sync() -> int:
            return 1

    with pytest.raises(TypeError, match="cannot be cancelled"):
        rs.pipeline(hedge, rs.Timeout(1.0)).call(lambda: 1)


@anyio_test
async def test_hedge_decorates_async_methods() -> None:
    class Client:
        @rs.Hedge(delay=0.5)
        async def get(self, key: str) -> str:
            return key.upper()

        @classmethod
        @rs.Hedge(delay=0.5)
        async def make(cls) -> str:
            return cls.__name__

    assert await Client().get("a") == "A"
    assert await Client.make() == "Client"


@anyio_test
async def test_metrics_bring_the_budget_along() -> None:
    budget = rs.RetryBudget(name="hb")
    hedge = rs.Hedge(delay=0.01, budget=budget, name="search")
    registry = CollectorRegistry()
    Metrics(registry).watch(hedge)
    await hedge.acall(Attempts(SLOW, 0.0))
    text = generate_latest(registry).decode()
    for series in (
        'resilience_hedge_calls_total{policy="search"} 1.0',
        'resilience_hedge_hedges_total{policy="search"} 1.0',
        'resilience_hedge_wins_total{policy="search"} 1.0',
        'resilience_hedge_budget_refused_total{policy="search"} 0.0',
        'resilience_retry_budget_withdrawals_total{budget="hb"} 1.0',
    ):
        assert series in text, series


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delay": -1}, "delay"),
        ({"delay": math.nan}, "delay"),
        ({"delay": math.inf}, "delay"),
        ({"delay": True}, "delay"),
        ({"delay": "fast"}, "quantile"),
        ({"delay": "p100"}, "quantile"),
        ({"max_extra": -1}, "max_extra"),
        ({"max_extra": 11}, "max_extra"),
        ({"max_extra": 1.5}, "max_extra"),
        ({"budget": 3}, "budget"),
        ({"history": 0}, "size"),
        ({"name": ""}, "name"),
    ],
)
def test_nonsense_is_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises((TypeError, ValueError), match=field):
        rs.Hedge(**kwargs)


def test_repr() -> None:
    assert repr(rs.Hedge(delay="p99", max_extra=2, name="h")) == (
        "Hedge(delay='p99', max_extra=2, name='h')"
    )
