"""Retry, Backoff and RetryBudget (issue 13), sync and async (asyncio and trio).

All time is on :class:`FakeClock`: a retry's sleeps move it, so a whole schedule runs
instantly and the tests read it back exactly. Most behaviour tests take the ``flavor``
fixture and run once as a sync call, once under asyncio and once under trio (the body is
the same sync function; the async flavors await a checkpoint before running it).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import random
import re
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import resilience as rs
from resilience.policies import JITTERS
from resilience.policies.budget import BudgetWindow
from resilience.policies.retry import REASONS
from resilience.testing import FakeClock, no_waits

# -- helpers ---------------------------------------------------------------------------------


class RecordingClock(FakeClock):
    """A FakeClock that also records every sleep asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        #: Called (with the sleep's number, from 1) as each sleep starts.
        self.on_sleep: Callable[[int], None] | None = None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        super().sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        await super().asleep(seconds)


class NoSleepClock(FakeClock):
    """A FakeClock on which any sleep fails the test."""

    def sleep(self, seconds: float) -> None:
        raise AssertionError(f"slept {seconds}")

    async def asleep(self, seconds: float) -> None:
        raise AssertionError(f"slept {seconds}")


def conn_error() -> BaseException:
    return ConnectionError("down")


class Dependency:
    """A sync callee: raises ``error()`` for its first ``failures`` calls (all of them
    when None), then returns ``value``. Counts calls (thread-safe) and records what
    ``rs.remaining()`` said at each; ``takes`` seconds of ``clock`` pass in each call."""

    def __init__(
        self,
        failures: int | None = None,
        error: Callable[[], BaseException] = conn_error,
        value: object = "ok",
        *,
        clock: FakeClock | None = None,
        takes: float = 0.0,
    ) -> None:
        self.failures = failures
        self.error = error
        self.value = value
        self.clock = clock
        self.takes = takes
        self.calls = 0
        self.seen: list[float | None] = []
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.calls += 1
            n = self.calls
            self.seen.append(rs.remaining())
        if self.takes and self.clock is not None:
            self.clock.advance(self.takes)
        if self.failures is None or n <= self.failures:
            raise self.error()
        return self.value


class Flavor:
    """Run a sync body through policies (outermost first) as a sync call, or as an async
    call on one anyio backend."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def run(self, body: Callable[[], Any], *policies: Any) -> Any:
        if self.name == "sync":
            fn: Callable[[], Any] = body
            for policy in reversed(policies):
                fn = functools.partial(policy.call, fn)
            return fn()

        async def abody() -> Any:
            await anyio.lowlevel.checkpoint()
            return body()

        afn: Callable[[], Awaitable[Any]] = abody
        for policy in reversed(policies):
            afn = functools.partial(policy.acall, afn)

        async def main() -> Any:
            return await afn()

        return anyio.run(main, backend=self.name)


@pytest.fixture(params=["sync", "asyncio", "trio"])
def flavor(request: pytest.FixtureRequest) -> Flavor:
    return Flavor(request.param)


@pytest.fixture
def rclock() -> RecordingClock:
    return RecordingClock()


def none_backoff(
    initial: float = 0.25, multiplier: float = 1.0, maximum: float | None = None
) -> rs.Backoff:
    """No jitter; ``maximum`` 10 s (or ``initial`` when that is longer)."""
    top = max(10.0, initial) if maximum is None else maximum
    return rs.Backoff(initial, top, multiplier, jitter="none")


def gave_up(retry: rs.Retry) -> dict[str, int]:
    counts: dict[str, int] = dict(retry.telemetry().read()["gave_up"])
    return {reason: n for reason, n in counts.items() if n}


def notes(error: BaseException) -> list[str]:
    return list(getattr(error, "__notes__", []))


# -- attempts and the schedule ---------------------------------------------------------------


@pytest.mark.parametrize("failures", [0, 1, 3])
def test_success_after_n_failures(flavor: Flavor, rclock: RecordingClock, failures: int) -> None:
    retry = rs.Retry(attempts=4, backoff=none_backoff(0.5, 2.0), clock=rclock)
    dep = Dependency(failures)
    assert flavor.run(dep, retry) == "ok"
    assert dep.calls == failures + 1
    assert rclock.sleeps == [0.5, 1.0, 2.0][:failures]
    assert retry.telemetry().read()["retries"] == failures
    assert gave_up(retry) == {}


def test_attempts_run_out_raises_the_last_error(flavor: Flavor, rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=3, backoff=none_backoff(), clock=rclock, name="payments")
    n = 0

    def numbered() -> BaseException:
        nonlocal n
        n += 1
        return ConnectionError(f"failure {n}")

    dep = Dependency(error=numbered)
    with pytest.raises(ConnectionError, match="failure 3") as info:
        flavor.run(dep, retry)
    assert dep.calls == 3
    assert rclock.sleeps == [0.25, 0.25]
    error = info.value
    assert error.attempts == 3  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        assert notes(error) == ["resilience: 'payments' gave up after 3 attempt(s) (attempts)"]
    # The last error is raised as it is: not chained to the first one it replaced.
    assert error.__context__ is None
    assert gave_up(retry) == {"attempts": 1}


def test_attempts_one_never_retries(flavor: Flavor, rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=1, clock=rclock)
    dep = Dependency()
    with pytest.raises(ConnectionError) as info:
        flavor.run(dep, retry)
    assert (dep.calls, rclock.sleeps, info.value.attempts) == (1, [], 1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("jitter", JITTERS)
def test_sleep_schedule_is_the_backoffs(
    flavor: Flavor, rclock: RecordingClock, jitter: str
) -> None:
    """The issue's check: a failing call retried 3 times on a FakeClock makes the same
    number of attempts and the same sleeps as the configured backoff."""

    def backoff() -> rs.Backoff:
        return rs.Backoff(0.1, 10.0, 2.0, jitter=jitter, rng=random.Random(1234))

    retry = rs.Retry(attempts=4, backoff=backoff(), clock=rclock)
    dep = Dependency()
    with pytest.raises(ConnectionError):
        flavor.run(dep, retry)
    expected = backoff().schedule(3)
    assert dep.calls == 4
    assert rclock.sleeps == expected
    assert rclock.monotonic() == pytest.approx(sum(expected))
    if jitter == "none":
        assert expected == [0.1, 0.2, 0.4]


# -- Backoff alone -----------------------------------------------------------------------------


def test_backoff_ceiling_grows_and_caps() -> None:
    b = rs.Backoff(0.5, 5.0, 3.0, jitter="none")
    assert [b.ceiling(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 5.0, 5.0]
    assert b.schedule(5) == [0.5, 1.5, 4.5, 5.0, 5.0]
    assert rs.Backoff(2.0, 2.0, 1.0, jitter="none").schedule(3) == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_jitter_bounds(seed: int) -> None:
    rng = random.Random(seed)
    initial, maximum, multiplier = 0.2, 8.0, 2.0
    kinds = {j: rs.Backoff(initial, maximum, multiplier, jitter=j, rng=rng) for j in JITTERS}
    for retry in range(1, 40):
        d = min(maximum, initial * multiplier ** (retry - 1))
        for _ in range(25):
            assert 0.0 <= kinds["full"].delay(retry) <= d
            assert d / 2 <= kinds["equal"].delay(retry) <= d
            assert kinds["none"].delay(retry) == d
    previous = 0.0
    for retry in range(1, 200):
        delay = kinds["decorrelated"].delay(retry, previous)
        high = 3 * (previous if previous > initial else initial)
        assert initial <= delay <= min(maximum, high)
        previous = delay


def test_jitter_spreads_callers() -> None:
    """Jittered delays differ between callers, including the first retry (decorrelated
    jitter used to give every caller exactly ``initial`` for it: all in step)."""
    rng = random.Random(5)
    for jitter in ("full", "equal", "decorrelated"):
        b = rs.Backoff(1.0, 100.0, jitter=jitter, rng=rng)
        firsts = {b.delay(1) for _ in range(50)}
        assert len(firsts) > 40, jitter
        assert all(0.0 <= f <= 3.0 for f in firsts)


def test_seeded_rng_repeats_the_schedule() -> None:
    for jitter in JITTERS:
        one = rs.Backoff(jitter=jitter, rng=random.Random(3)).schedule(20)
        two = rs.Backoff(jitter=jitter, rng=random.Random(3)).schedule(20)
        assert one == two


@pytest.mark.parametrize("retry", [1_100, 10**6, 10**100], ids=["1e3", "1e6", "1e100"])
@pytest.mark.parametrize("jitter", JITTERS)
def test_huge_retry_numbers_do_not_overflow(retry: int, jitter: str) -> None:
    b = rs.Backoff(1.0, 60.0, 2.0, jitter=jitter, rng=random.Random(0))
    assert b.ceiling(retry) == 60.0
    for _ in range(20):
        delay = b.delay(retry, 60.0)
        assert math.isfinite(delay)
        assert 0.0 <= delay <= 60.0
        if jitter in ("equal", "none"):
            assert delay >= 30.0
    # A huge multiplier overflows early; an initial of 0 stays 0 (not the maximum).
    assert rs.Backoff(1.0, 5.0, 1e300, jitter="none").delay(3) == 5.0
    assert rs.Backoff(0.0, 5.0, 2.0, jitter=jitter).delay(retry) == 0.0
    assert rs.Backoff(0.0, 5.0, 1e300, jitter=jitter).delay(3) == 0.0


def test_retry_at_huge_attempt_numbers(rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=2_000, backoff=rs.Backoff(0.001, 0.01, 2.0), clock=rclock)
    dep = Dependency(1_999)
    assert retry.call(dep) == "ok"
    assert len(rclock.sleeps) == 1_999
    assert all(0.0 <= s <= 0.01 for s in rclock.sleeps)


# -- what is retried ---------------------------------------------------------------------------


class Flaky(Exception):
    pass


class Other(Exception):
    pass


@pytest.mark.parametrize(
    ("on", "not_retried"),
    [
        (Flaky, KeyError("k")),
        ((Other, Flaky), KeyError("k")),
        (lambda error: isinstance(error, Flaky) and "again" in str(error), Flaky("fatal")),
    ],
    ids=["class", "tuple", "predicate"],
)
def test_on_selects_what_is_retried(
    flavor: Flavor, rclock: RecordingClock, on: object, not_retried: Exception
) -> None:
    retry = rs.Retry(attempts=3, backoff=none_backoff(), on=on, clock=rclock)
    dep = Dependency(2, error=lambda: Flaky("again"))
    assert flavor.run(dep, retry) == "ok"
    assert dep.calls == 3
    assert rclock.sleeps == [0.25, 0.25]
    # Anything else propagates at once: one call, no sleep, no attempts stamped.
    for error in (ValueError("bug"), not_retried):
        rclock.sleeps.clear()
        other = Dependency(error=lambda: error)  # noqa: B023 - used within the iteration
        with pytest.raises(type(error)) as info:
            flavor.run(other, retry)
        assert info.value is error
        assert other.calls == 1
        assert rclock.sleeps == []
        assert not hasattr(info.value, "attempts")
    assert gave_up(retry) == {}


def test_base_exceptions_are_never_retried(flavor: Flavor, rclock: RecordingClock) -> None:
    """Not even with ``on=BaseException``: KeyboardInterrupt, SystemExit, cancellation."""
    retry = rs.Retry(attempts=5, backoff=none_backoff(), on=BaseException, clock=rclock)
    for error in (KeyboardInterrupt, SystemExit, GeneratorExit):
        dep = Dependency(error=error)
        with pytest.raises(error):
            flavor.run(dep, retry)
        assert dep.calls == 1
    assert rclock.sleeps == []


@pytest.mark.parametrize("mode", ["sync", "asyncio"])
def test_asyncio_cancelled_error_is_never_retried(mode: str, rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=5, backoff=none_backoff(), on=BaseException, clock=rclock)
    dep = Dependency(error=asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        Flavor(mode).run(dep, retry)
    assert dep.calls == 1
    assert rclock.sleeps == []


@pytest.mark.anyio
async def test_cancelled_callee_is_not_retried(rclock: RecordingClock) -> None:
    """Cancellation by an anyio cancel scope (asyncio's CancelledError, trio's
    Cancelled) ends the retry: the attempt that saw it is the last."""
    retry = rs.Retry(attempts=5, backoff=none_backoff(), on=BaseException, clock=rclock)
    calls = 0
    with anyio.CancelScope() as scope:

        async def cancelled() -> None:
            nonlocal calls
            calls += 1
            scope.cancel()
            await anyio.lowlevel.checkpoint()  # the cancellation is delivered here

        await retry.acall(cancelled)
    assert scope.cancelled_caught
    assert calls == 1
    assert rclock.sleeps == []
    assert retry.telemetry().read()["retries"] == 0


@pytest.mark.anyio
async def test_cancelled_while_waiting_stops_the_retry(rclock: RecordingClock) -> None:
    """Cancellation delivered during a backoff wait ends the retry there."""
    retry = rs.Retry(attempts=5, backoff=none_backoff(), clock=rclock)
    dep = Dependency()

    async def down() -> None:
        await anyio.lowlevel.checkpoint()
        dep()

    with anyio.CancelScope() as scope:
        rclock.on_sleep = lambda n: scope.cancel()
        await retry.acall(down)
    assert scope.cancelled_caught
    assert dep.calls == 1
    assert rclock.sleeps == [0.25]


@pytest.mark.anyio
async def test_task_cancelled_from_outside_mid_retry(rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=1_000, backoff=none_backoff(), clock=rclock)
    dep = Dependency()

    async def down() -> None:
        await anyio.lowlevel.checkpoint()
        dep()

    async with anyio.create_task_group() as tg:
        rclock.on_sleep = lambda n: tg.cancel_scope.cancel() if n == 3 else None
        tg.start_soon(retry.acall, down)
    assert dep.calls == 3
    assert retry.telemetry().read()["retries"] == 3  # the third retry's wait was cut


@pytest.mark.anyio
async def test_an_already_cancelled_scope_gets_the_last_error(rclock: RecordingClock) -> None:
    """A failed attempt inside a cancelled scope (its deadline is -inf): no wait and no
    new attempt; the retry gives up at once with the error it has (a deadline give-up),
    which the scope does not swallow."""
    retry = rs.Retry(attempts=5, backoff=none_backoff(), clock=rclock)
    calls = 0
    with anyio.CancelScope() as scope:

        async def fails_then_cancelled() -> None:
            nonlocal calls
            calls += 1
            scope.cancel()
            raise ConnectionError("down")

        with pytest.raises(ConnectionError):
            await retry.acall(fails_then_cancelled)
    assert calls == 1
    assert rclock.sleeps == []
    assert gave_up(retry) == {"deadline": 1}


# -- on_result -------------------------------------------------------------------------------


def test_on_result_retries_results(flavor: Flavor, rclock: RecordingClock) -> None:
    results = iter([None, None, 42])
    retry = rs.Retry(
        attempts=4, backoff=none_backoff(), on_result=lambda r: r is None, clock=rclock
    )
    calls = 0

    def body() -> int | None:
        nonlocal calls
        calls += 1
        return next(results)

    assert flavor.run(body, retry) == 42
    assert calls == 3
    assert rclock.sleeps == [0.25, 0.25]


def test_on_result_returns_the_last_result_when_attempts_run_out(
    flavor: Flavor, rclock: RecordingClock
) -> None:
    retry = rs.Retry(attempts=3, backoff=none_backoff(), on_result=lambda r: r < 10, clock=rclock)
    n = 0

    def body() -> int:
        nonlocal n
        n += 1
        return n

    assert flavor.run(body, retry) == 3
    assert rclock.sleeps == [0.25, 0.25]
    assert gave_up(retry) == {"attempts": 1}


def test_on_result_and_errors_mix(flavor: Flavor, rclock: RecordingClock) -> None:
    outcomes: list[object] = ["busy", ConnectionError("down"), "busy", "done"]

    def body() -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    retry = rs.Retry(
        attempts=4, backoff=none_backoff(), on_result=lambda r: r == "busy", clock=rclock
    )
    assert flavor.run(body, retry) == "done"
    assert rclock.sleeps == [0.25, 0.25, 0.25]


# -- deadlines -------------------------------------------------------------------------------


def test_deadline_never_sleeps_past_it(flavor: Flavor, rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=10, backoff=none_backoff(0.25, 2.0), deadline=1.0, clock=rclock)
    dep = Dependency()
    with pytest.raises(ConnectionError) as info:
        flavor.run(dep, retry)
    # 0.25 then 0.5 (at 0.75); the next wait (1.0) would end past the deadline.
    assert rclock.sleeps == [0.25, 0.5]
    assert rclock.monotonic() == 0.75
    assert dep.calls == 3
    assert info.value.attempts == 3  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        assert notes(info.value) == ["resilience: 'retry' gave up after 3 attempt(s) (deadline)"]
    assert gave_up(retry) == {"deadline": 1}


def test_deadline_counts_the_time_calls_take(flavor: Flavor, rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=10, backoff=none_backoff(0.25), deadline=1.0, clock=rclock)
    dep = Dependency(clock=rclock, takes=0.4)
    with pytest.raises(ConnectionError) as info:
        flavor.run(dep, retry)
    # 0.4 (call) + 0.25 (wait) + 0.4 (call) = 1.05: the deadline passed, stop at once.
    assert dep.calls == 2
    assert rclock.sleeps == [0.25]
    assert info.value.attempts == 2  # type: ignore[attr-defined]
    assert dep.seen == [1.0, 0.35]


def test_remaining_seen_inside_a_retry_with_deadline(
    flavor: Flavor, rclock: RecordingClock
) -> None:
    retry = rs.Retry(attempts=10, backoff=none_backoff(0.25), deadline=1.0, clock=rclock)
    dep = Dependency()
    assert rs.remaining() is None
    with pytest.raises(ConnectionError):
        flavor.run(dep, retry)
    assert dep.seen == [1.0, 0.75, 0.5, 0.25]
    assert rs.remaining() is None  # reset on the way out


def test_no_deadline_no_remaining(flavor: Flavor, rclock: RecordingClock) -> None:
    dep = Dependency(1)
    assert flavor.run(dep, rs.Retry(backoff=none_backoff(), clock=rclock)) == "ok"
    assert dep.seen == [None, None]


def test_remaining_seen_inside_an_enclosing_timeout(flavor: Flavor, rclock: RecordingClock) -> None:
    """A retry with no deadline of its own honours an enclosing Timeout: the callee sees
    its time left, and the retry stops waiting (raising the call's own error, not
    TimeoutExceeded) when the next wait would outlive it."""
    timeout = rs.Timeout(1.0, clock=rclock)
    retry = rs.Retry(attempts=10, backoff=none_backoff(0.25), clock=rclock)
    dep = Dependency()
    with pytest.raises(ConnectionError) as info:
        flavor.run(dep, timeout, retry)
    assert dep.seen == [1.0, 0.75, 0.5, 0.25]
    assert rclock.monotonic() == 0.75
    assert info.value.attempts == 4  # type: ignore[attr-defined]
    assert gave_up(retry) == {"deadline": 1}


@pytest.mark.parametrize(("outer", "own"), [(10.0, 0.5), (0.5, 10.0)])
def test_nested_deadlines_keep_the_earliest(
    flavor: Flavor, rclock: RecordingClock, outer: float, own: float
) -> None:
    timeout = rs.Timeout(outer, clock=rclock)
    retry = rs.Retry(attempts=3, backoff=none_backoff(0.125), deadline=own, clock=rclock)
    dep = Dependency(1)
    assert flavor.run(dep, timeout, retry) == "ok"
    assert dep.seen == [0.5, 0.375]


def test_deadline_with_no_waits_still_bounds_attempts(flavor: Flavor) -> None:
    clock = NoSleepClock()
    retry = rs.Retry(attempts=5, backoff=none_backoff(0.1), deadline=1.0, clock=clock)
    dep = Dependency(clock=clock, takes=0.4)
    with no_waits(), pytest.raises(ConnectionError):
        flavor.run(dep, retry)
    assert dep.calls == 3  # at 0.0, 0.4, 0.8; at 1.2 the deadline has passed


@pytest.mark.anyio
async def test_enclosing_cancel_scope_deadline_is_honoured(rclock: RecordingClock) -> None:
    """An anyio/trio deadline (real time) bounds the waits of an async retry."""
    retry = rs.Retry(attempts=3, backoff=none_backoff(30.0), clock=rclock)
    dep = Dependency()

    async def call() -> None:
        await anyio.lowlevel.checkpoint()
        dep()

    with anyio.fail_after(5.0), pytest.raises(ConnectionError):
        await retry.acall(call)
    assert dep.calls == 1
    assert rclock.sleeps == []
    assert gave_up(retry) == {"deadline": 1}
    # Without the scope, the same retry waits its backoff.
    with pytest.raises(ConnectionError):
        await retry.acall(call)
    assert rclock.sleeps == [30.0, 30.0]


# -- rejections: breakers, limiters, retry_after ---------------------------------------------


def test_open_breaker_stops_the_retry_at_once(flavor: Flavor, rclock: RecordingClock) -> None:
    """retry_after (29.5 s) beyond the window (no deadline: the backoff's maximum, 10 s)."""
    breaker = rs.CircuitBreaker(
        "retry-open-stop", failure_threshold=1, recovery_timeout=30.0, clock=rclock
    )
    retry = rs.Retry(attempts=5, backoff=none_backoff(0.5), on=ConnectionError, clock=rclock)
    dep = Dependency()
    with pytest.raises(rs.CircuitOpenError) as info:
        flavor.run(dep, retry, breaker)
    assert dep.calls == 1
    assert rclock.sleeps == [0.5]
    assert info.value.attempts == 2  # type: ignore[attr-defined]
    assert info.value.retry_after == pytest.approx(29.5)
    if sys.version_info >= (3, 11):
        assert "(rejected)" in notes(info.value)[0]
    assert gave_up(retry) == {"rejected": 1}


def test_open_breaker_beyond_the_deadline_stops_at_once(
    flavor: Flavor, rclock: RecordingClock
) -> None:
    breaker = rs.CircuitBreaker(
        "retry-open-deadline", failure_threshold=1, recovery_timeout=4.0, clock=rclock
    )
    breaker.force_open(duration=4.0)
    retry = rs.Retry(attempts=5, backoff=none_backoff(0.5), deadline=3.0, clock=rclock)
    dep = Dependency(0)
    with pytest.raises(rs.CircuitOpenError):
        flavor.run(dep, retry, breaker)
    assert dep.calls == 0
    assert rclock.sleeps == []
    assert gave_up(retry) == {"rejected": 1}


@pytest.mark.parametrize("deadline", [None, 10.0])
def test_open_breaker_is_retried_after_retry_after_when_it_fits(
    flavor: Flavor, rclock: RecordingClock, deadline: float | None
) -> None:
    breaker = rs.CircuitBreaker(
        f"retry-open-fits-{deadline}",
        failure_threshold=1,
        recovery_timeout=2.0,
        success_threshold=1,
        clock=rclock,
    )
    retry = rs.Retry(
        attempts=4, backoff=none_backoff(0.5), on=ConnectionError, deadline=deadline, clock=rclock
    )
    states: list[rs.CircuitState] = []
    dep = Dependency(1)

    def body() -> Any:
        states.append(breaker.state)
        return dep()

    assert flavor.run(body, retry, breaker) == "ok"
    # Failed at 0 (the breaker opens until 2.0), waited 0.5, was rejected with
    # retry_after 1.5, waited exactly that, and the probe at 2.0 succeeded.
    assert rclock.sleeps == [0.5, 1.5]
    assert rclock.monotonic() == 2.0
    assert states == [rs.CircuitState.CLOSED, rs.CircuitState.HALF_OPEN]
    assert breaker.state is rs.CircuitState.CLOSED
    assert retry.telemetry().read()["retries"] == 2


def test_retry_after_that_fits_wins_over_a_backoff_that_does_not(
    flavor: Flavor, rclock: RecordingClock
) -> None:
    """The breaker says 1 s, the backoff 5 s, 3 s are left: wait the 1 s (the rule is
    "stop unless retry_after fits in the remaining deadline")."""
    breaker = rs.CircuitBreaker("retry-fits-backoff", success_threshold=1, clock=rclock)
    breaker.force_open(duration=1.0)
    retry = rs.Retry(attempts=3, backoff=none_backoff(5.0), deadline=3.0, clock=rclock)
    dep = Dependency(0)
    assert flavor.run(dep, retry, breaker) == "ok"
    assert rclock.sleeps == [1.0]
    assert dep.calls == 1


class Throttled(Exception):
    """A server's 429/503 with its Retry-After, as a user's client might raise it."""

    def __init__(self, retry_after: object) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


@pytest.mark.parametrize("kind", ["rate_limited", "custom"])
def test_retry_after_from_errors(flavor: Flavor, rclock: RecordingClock, kind: str) -> None:
    def make(seconds: float) -> Callable[[], BaseException]:
        if kind == "rate_limited":
            return lambda: rs.RateLimited(seconds, key="k")
        return lambda: Throttled(seconds)

    # RateLimited is retried whatever `on` says; a custom error must match `on`.
    on = ConnectionError if kind == "rate_limited" else (ConnectionError, Throttled)

    # Fits (no deadline: within the backoff's maximum): waits at least retry_after.
    retry = rs.Retry(attempts=3, backoff=none_backoff(0.25, maximum=5.0), on=on, clock=rclock)
    dep = Dependency(2, error=make(0.75))
    assert flavor.run(dep, retry) == "ok"
    assert rclock.sleeps == [0.75, 0.75]

    # A short retry_after never shortens the backoff.
    rclock.sleeps.clear()
    dep = Dependency(1, error=make(0.1))
    assert flavor.run(dep, retry) == "ok"
    assert rclock.sleeps == [0.25]

    # Beyond the window: stops at once.
    rclock.sleeps.clear()
    dep = Dependency(error=make(30.0))
    with pytest.raises((rs.RateLimited, Throttled)) as info:
        flavor.run(dep, retry)
    assert (dep.calls, rclock.sleeps, info.value.attempts) == (1, [], 1)  # type: ignore[attr-defined]

    # Beyond a deadline, though within the maximum: stops at once too.
    tight = rs.Retry(attempts=3, backoff=none_backoff(0.25), on=on, deadline=2.0, clock=rclock)
    dep = Dependency(error=make(3.0))
    with pytest.raises((rs.RateLimited, Throttled)):
        flavor.run(dep, tight)
    assert (dep.calls, rclock.sleeps) == (1, [])
    assert gave_up(retry) == {"rejected": 1}
    assert gave_up(tight) == {"rejected": 1}


def test_retry_after_does_not_make_an_error_retryable(
    flavor: Flavor, rclock: RecordingClock
) -> None:
    retry = rs.Retry(attempts=3, on=ConnectionError, clock=rclock)
    dep = Dependency(error=lambda: Throttled(0.1))
    with pytest.raises(Throttled):
        flavor.run(dep, retry)
    assert dep.calls == 1


@pytest.mark.parametrize("junk", ["soon", math.nan, True, None, -5.0])
def test_unusable_retry_after_is_ignored(rclock: RecordingClock, junk: object) -> None:
    retry = rs.Retry(attempts=3, backoff=none_backoff(0.25), on=Throttled, clock=rclock)
    dep = Dependency(2, error=lambda: Throttled(junk))
    assert retry.call(dep) == "ok"
    # Junk: the backoff alone; a negative wait means "now": the backoff again.
    assert rclock.sleeps == [0.25, 0.25]


# -- RetryBudget ------------------------------------------------------------------------------


def test_budget_math(clock: FakeClock) -> None:
    budget = rs.RetryBudget(ratio=0.5, min_per_second=1.0, window=10.0, clock=clock)
    assert budget.balance() == 10.0  # the floor: 1 per second over the 10 s window
    for _ in range(4):
        budget.deposit()
    assert budget.balance() == 12.0
    assert all(budget.try_withdraw() for _ in range(12))
    assert not budget.try_withdraw()
    assert not budget.try_withdraw()
    assert budget.balance() == 0.0
    assert budget.telemetry().read() == {
        "deposits": 4,
        "withdrawals": 12,
        "exhausted": 2,
        "balance": 0.0,
    }


def test_budget_window_expiry(clock: FakeClock) -> None:
    budget = rs.RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(3):
        budget.deposit()  # at 0
    clock.advance(5.0)
    budget.deposit()
    budget.deposit()  # at 5
    assert budget.balance() == 5.0
    clock.advance(4.5)
    assert budget.balance() == 5.0  # the deposits at 0 are 9.5 s old: still counted
    clock.advance(0.5)
    assert budget.balance() == 2.0  # 10 s old: expired
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    clock.advance(10.0)
    assert budget.balance() == 0.0  # deposits and withdrawals alike expired
    budget.deposit()
    assert budget.balance() == 1.0


def test_budget_withdrawals_expire_and_the_floor_refills(clock: FakeClock) -> None:
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0.1, window=10.0, clock=clock)
    assert budget.balance() == pytest.approx(1.0)
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    clock.advance(9.0)
    assert not budget.try_withdraw()
    clock.advance(1.0)
    assert budget.try_withdraw()


def test_budget_window_slots_are_pure() -> None:
    w = BudgetWindow(ratio=1.0, min_per_second=0.0, window=10.0)  # 10 slots of 1 s
    w.deposit(0.5)
    w.deposit(9.5)
    assert w.counts(9.5) == (2, 0)
    assert w.counts(9.999) == (2, 0)
    # A deposit expires when its slot leaves the window: up to one slot (1 s) early.
    assert w.counts(10.0) == (1, 0)
    assert w.counts(18.999) == (1, 0)
    assert w.counts(19.0) == (0, 0)
    assert w.balance(15.0) == 1.0
    assert w.try_withdraw(15.0)
    assert not w.try_withdraw(15.0)
    assert w.counts(15.0) == (1, 1)
    assert w.balance(15.0) == 0.0


@pytest.mark.parametrize(
    ("ratio", "deposits", "retries"), [(0.1, 100, 10), (0.7, 90, 63), (0.3, 10, 3)]
)
def test_budget_ratio_is_exact(clock: FakeClock, ratio: float, deposits: int, retries: int) -> None:
    """ratio * deposits is a float product (0.7 * 90 == 62.99999...); it must still
    allow 63 retries."""
    budget = rs.RetryBudget(ratio=ratio, min_per_second=0.0, clock=clock)
    for _ in range(deposits):
        budget.deposit()
    allowed = 0
    while budget.try_withdraw():
        allowed += 1
    assert allowed == retries


def test_exhausted_budget_gives_up_at_once(flavor: Flavor, rclock: RecordingClock) -> None:
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0.0, clock=rclock)
    retry = rs.Retry(attempts=5, backoff=none_backoff(1.0), budget=budget, clock=rclock)
    dep = Dependency()
    with pytest.raises(ConnectionError, match="down") as info:
        flavor.run(dep, retry)
    assert dep.calls == 1
    assert rclock.sleeps == []
    assert rclock.monotonic() == 0.0
    assert info.value.attempts == 1  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        assert "(budget)" in notes(info.value)[0]
    assert gave_up(retry) == {"budget": 1}
    read = budget.telemetry().read()
    assert (read["deposits"], read["withdrawals"], read["exhausted"]) == (1, 0, 1)
    assert retry.telemetry().links == (budget,)


def test_budget_fills_from_first_attempts_of_every_policy_sharing_it(
    flavor: Flavor, rclock: RecordingClock
) -> None:
    budget = rs.RetryBudget(ratio=0.5, min_per_second=0.0, clock=rclock)
    one = rs.Retry(attempts=3, backoff=none_backoff(), budget=budget, clock=rclock)
    two = rs.Retry(attempts=3, backoff=none_backoff(), budget=budget, clock=rclock)
    assert flavor.run(Dependency(0), one) == "ok"
    assert flavor.run(Dependency(0), one) == "ok"  # 2 first attempts: 1 retry in the budget
    dep = Dependency(2)
    with pytest.raises(ConnectionError):
        flavor.run(dep, two)  # its own first attempt adds 0.5: still one retry
    assert dep.calls == 2
    assert gave_up(two) == {"budget": 1}


STORM_CALLERS = 100


def storm_retry(budget: rs.RetryBudget | None, clock: FakeClock) -> rs.Retry:
    return rs.Retry(
        attempts=4, backoff=none_backoff(0.001), on=ConnectionError, budget=budget, clock=clock
    )


@pytest.mark.parametrize("with_budget", [True, False], ids=["budget", "no-budget"])
def test_retry_storm_threads(clock: FakeClock, with_budget: bool) -> None:
    """100 threads against a dependency that always fails. Without a budget every caller
    makes its 4 attempts (400 calls). With RetryBudget(ratio=0.1, min_per_second=0) the
    retries are at most 0.1 * the 100 first attempts: 110 calls at most, no slack
    needed: the floor is 0, and the window (10 s) cannot expire since the FakeClock
    moves only by the retries' waits (at most 10 * 0.001 s)."""
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0.0, clock=clock) if with_budget else None
    retry = storm_retry(budget, clock)
    dep = Dependency()
    start = threading.Barrier(STORM_CALLERS)
    failures: list[BaseException] = []

    def caller() -> None:
        start.wait()
        try:
            retry.call(dep)
        except ConnectionError as error:
            failures.append(error)

    threads = [threading.Thread(target=caller) for _ in range(STORM_CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == STORM_CALLERS
    read = retry.telemetry().read()
    assert read["calls"] == STORM_CALLERS
    assert read["retries"] == dep.calls - STORM_CALLERS
    if not with_budget:
        assert dep.calls == 4 * STORM_CALLERS
        assert gave_up(retry) == {"attempts": STORM_CALLERS}
        return
    assert budget is not None
    assert STORM_CALLERS <= dep.calls <= 1.1 * STORM_CALLERS
    b = budget.telemetry().read()
    assert b["deposits"] == STORM_CALLERS
    assert b["withdrawals"] == dep.calls - STORM_CALLERS
    assert sum(gave_up(retry).values()) == STORM_CALLERS


@pytest.mark.anyio
@pytest.mark.parametrize("with_budget", [True, False], ids=["budget", "no-budget"])
async def test_retry_storm_tasks(clock: FakeClock, with_budget: bool) -> None:
    """As the thread storm, with 100 tasks. Every task makes its first attempt (and its
    deposit) before any sees its failure (the dependency awaits first), so the budget
    allows exactly 0.1 * 100 retries: 110 calls."""
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0.0, clock=clock) if with_budget else None
    retry = storm_retry(budget, clock)
    dep = Dependency()
    failures = 0

    async def dependency() -> None:
        await anyio.lowlevel.checkpoint()
        dep()

    async def caller() -> None:
        nonlocal failures
        try:
            await retry.acall(dependency)
        except ConnectionError:
            failures += 1

    async with anyio.create_task_group() as tg:
        for _ in range(STORM_CALLERS):
            tg.start_soon(caller)
    assert failures == STORM_CALLERS
    assert dep.calls == (110 if with_budget else 400)
    assert retry.telemetry().read()["retries"] == dep.calls - STORM_CALLERS


# -- resilience.testing.no_waits -------------------------------------------------------------


def test_no_waits_retries_without_waiting(flavor: Flavor) -> None:
    clock = NoSleepClock()
    retry = rs.Retry(attempts=4, backoff=none_backoff(100.0, maximum=100.0), clock=clock)
    events: list[rs.RetryEvent] = []
    retry.add_listener(events.append)
    dep = Dependency(3)
    with no_waits():
        assert flavor.run(dep, retry) == "ok"
        with no_waits():
            pass
        dep = Dependency(1, error=lambda: rs.RateLimited(5.0))
        assert flavor.run(dep, retry) == "ok"  # retry_after waits are skipped too
    assert clock.monotonic() == 0.0
    assert [e.delay for e in events] == [100.0, 100.0, 100.0, 100.0]  # reported, not waited
    # Outside the block, waits are back.
    with pytest.raises(AssertionError, match="slept 100"):
        flavor.run(Dependency(1), retry)


def test_no_waits_restores_on_error() -> None:
    clock = RecordingClock()
    with pytest.raises(RuntimeError), no_waits():
        raise RuntimeError
    rs.Retry(backoff=none_backoff(), clock=clock).call(Dependency(1))
    assert clock.sleeps == [0.25]


# -- events and telemetry --------------------------------------------------------------------


def test_listener_gets_a_retry_event_per_retry(flavor: Flavor, rclock: RecordingClock) -> None:
    retry = rs.Retry(attempts=4, backoff=none_backoff(0.5, 2.0), clock=rclock, name="orders")
    events: list[rs.RetryEvent] = []
    # One bound method object, added and removed (events.Dispatcher.remove matches a
    # listener by identity once found by equality: a fresh ``events.append`` fails).
    listener = events.append
    retry.add_listener(listener)
    errors: list[BaseException] = []

    def recording() -> BaseException:
        errors.append(ConnectionError(len(errors)))
        return errors[-1]

    assert flavor.run(Dependency(2, error=recording), retry) == "ok"
    assert events == [
        rs.RetryEvent("orders", 1, 0.5, errors[0]),
        rs.RetryEvent("orders", 2, 1.0, errors[1]),
    ]
    retry.remove_listener(listener)
    flavor.run(Dependency(1), retry)
    assert len(events) == 2


def test_result_retries_have_no_error_in_the_event(rclock: RecordingClock) -> None:
    retry = rs.Retry(backoff=none_backoff(), on_result=lambda r: r is None, clock=rclock)
    events: list[rs.RetryEvent] = []
    retry.add_listener(events.append)
    results = iter([None, 1])
    assert retry.call(lambda: next(results)) == 1
    assert events == [rs.RetryEvent("retry", 1, 0.25, None)]


def test_a_failing_listener_does_not_break_the_retry(rclock: RecordingClock) -> None:
    retry = rs.Retry(backoff=none_backoff(), clock=rclock)

    def broken(event: rs.RetryEvent) -> None:
        raise RuntimeError("listener bug")

    retry.add_listener(broken)
    assert retry.call(Dependency(1)) == "ok"


def test_telemetry_counts(flavor: Flavor, rclock: RecordingClock) -> None:
    budget = rs.RetryBudget(ratio=1.0, min_per_second=0.0, clock=rclock)
    retry = rs.Retry(
        attempts=3,
        backoff=none_backoff(),
        on=ConnectionError,
        deadline=0.6,
        budget=budget,
        clock=rclock,
    )
    flavor.run(Dependency(0), retry)  # a success
    flavor.run(Dependency(1), retry)  # one retry
    with pytest.raises(ConnectionError):
        flavor.run(Dependency(), retry)  # two retries, then attempts
    with pytest.raises(ConnectionError):
        flavor.run(Dependency(clock=rclock, takes=0.5), retry)  # deadline after one
    with pytest.raises(ValueError):
        flavor.run(Dependency(error=lambda: ValueError("bug")), retry)  # not retried
    drained = rs.RetryBudget(ratio=0.1, min_per_second=0.0, clock=rclock)
    starved = rs.Retry(attempts=3, budget=drained, clock=rclock, name="starved")
    with pytest.raises(ConnectionError):
        flavor.run(Dependency(), starved)
    telemetry = retry.telemetry()
    assert (telemetry.kind, telemetry.name) == ("retry", "retry")
    assert telemetry.read() == {
        "calls": 5,
        "retries": 3,
        "gave_up": {"attempts": 1, "deadline": 1, "budget": 0, "rejected": 0},
    }
    assert gave_up(starved) == {"budget": 1}
    assert set(retry.telemetry().read()["gave_up"]) == set(REASONS)


# -- decorating ------------------------------------------------------------------------------


def test_decorator_keeps_the_signature(rclock: RecordingClock) -> None:
    retry = rs.Retry(backoff=none_backoff(), clock=rclock)

    def fetch(order_id: str, *, verbose: bool = False) -> str:
        """Fetch one order."""
        return order_id

    async def afetch(order_id: str, *, verbose: bool = False) -> str:
        return order_id

    for fn in (fetch, afetch):
        wrapped = retry(fn)
        assert wrapped.__name__ == fn.__name__
        assert wrapped.__wrapped__ is fn  # type: ignore[attr-defined]
        assert inspect.signature(wrapped) == inspect.signature(fn)
        assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(fn)
    assert retry(fetch).__doc__ == "Fetch one order."
    assert retry(fetch)("a", verbose=True) == "a"


def test_decorated_functions_retry(flavor: Flavor, rclock: RecordingClock) -> None:
    retry = rs.Retry(backoff=none_backoff(), clock=rclock)
    dep = Dependency(2)

    @retry
    def sync_fetch() -> Any:
        return dep()

    @retry
    async def async_fetch() -> Any:
        await anyio.lowlevel.checkpoint()
        return dep()

    if flavor.name == "sync":
        assert sync_fetch() == "ok"
    else:
        assert anyio.run(async_fetch, backend=flavor.name) == "ok"
    assert dep.calls == 3


class Service:
    retry = rs.Retry(attempts=3, backoff=none_backoff(), clock=FakeClock())

    def __init__(self) -> None:
        self.calls = 0

    @retry
    def method(self, x: int) -> int:
        self.calls += 1
        if self.calls < 3:
            raise ConnectionError
        return x * 2

    @retry
    async def amethod(self, x: int) -> int:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.calls < 3:
            raise ConnectionError
        return x * 3

    counter = 0

    @classmethod
    @retry
    def cmethod(cls, x: int) -> tuple[type, int]:
        cls.counter += 1
        if cls.counter % 2:
            raise ConnectionError
        return cls, x

    @retry
    @classmethod
    def cmethod_outer(cls, x: int) -> tuple[type, int]:
        cls.counter += 1
        if cls.counter % 2:
            raise ConnectionError
        return cls, x

    @retry
    @staticmethod
    def smethod(x: int) -> int:
        return x + 1


def test_methods() -> None:
    s = Service()
    assert s.method(2) == 4
    assert s.calls == 3
    assert inspect.signature(Service.method) == inspect.signature(Service.method.__wrapped__)  # type: ignore[attr-defined]
    assert list(inspect.signature(s.method).parameters) == ["x"]
    Service.counter = 0
    assert Service.cmethod(1) == (Service, 1)
    assert Service.cmethod_outer(2) == (Service, 2)
    assert Service.counter == 4
    assert Service.smethod(1) == 2
    assert Service().smethod(1) == 2
    assert Service.cmethod_outer.__name__ == "cmethod_outer"


@pytest.mark.anyio
async def test_async_methods() -> None:
    s = Service()
    assert inspect.iscoroutinefunction(s.amethod)
    assert await s.amethod(2) == 6
    assert s.calls == 3


def test_generators_are_refused() -> None:
    retry = rs.Retry()

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> AsyncIterator[int]:
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            retry(fn)


def test_not_callable_is_refused() -> None:
    with pytest.raises(TypeError):
        rs.Retry()(42)  # type: ignore[call-overload]


# -- bad input -------------------------------------------------------------------------------

BAD_RETRY: list[tuple[str, dict[str, Any]]] = [
    ("attempts", {"attempts": 0}),
    ("attempts", {"attempts": -1}),
    ("attempts", {"attempts": True}),
    ("attempts", {"attempts": 1.5}),
    ("attempts", {"attempts": "3"}),
    ("attempts", {"attempts": None}),
    ("backoff", {"backoff": 0.1}),
    ("backoff", {"backoff": "full"}),
    ("backoff", {"backoff": rs.RetryBudget()}),
    ("on", {"on": 42}),
    ("on", {"on": ()}),
    ("on", {"on": (int,)}),
    ("on", {"on": (ValueError, "x")}),
    ("on", {"on": int}),
    ("on", {"on": ValueError("x")}),
    ("on", {"on": None}),
    ("on_result", {"on_result": 3}),
    ("on_result", {"on_result": "none"}),
    ("deadline", {"deadline": 0}),
    ("deadline", {"deadline": -1}),
    ("deadline", {"deadline": math.nan}),
    ("deadline", {"deadline": math.inf}),
    ("deadline", {"deadline": True}),
    ("deadline", {"deadline": "1"}),
    ("budget", {"budget": 0.1}),
    ("budget", {"budget": rs.Backoff()}),
    ("name", {"name": ""}),
    ("clock", {"clock": object()}),
]


@pytest.mark.parametrize(
    ("field", "kwargs"), BAD_RETRY, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_RETRY)]
)
def test_retry_rejects_bad_input(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        rs.Retry(**kwargs)
    assert re.match(rf"{field}\b", str(info.value)), info.value


BAD_BACKOFF: list[tuple[str, dict[str, Any]]] = [
    ("initial", {"initial": -1}),
    ("initial", {"initial": math.nan}),
    ("initial", {"initial": math.inf}),
    ("initial", {"initial": True}),
    ("initial", {"initial": "0.1"}),
    ("maximum", {"initial": 2.0, "maximum": 1.0}),
    ("maximum", {"maximum": -1}),
    ("maximum", {"maximum": math.inf}),
    ("multiplier", {"multiplier": 0.5}),
    ("multiplier", {"multiplier": 0}),
    ("multiplier", {"multiplier": math.inf}),
    ("multiplier", {"multiplier": math.nan}),
    ("multiplier", {"multiplier": True}),
    ("jitter", {"jitter": "bogus"}),
    ("jitter", {"jitter": None}),
    ("jitter", {"jitter": "FULL"}),
    ("rng", {"rng": 42}),
]


@pytest.mark.parametrize(
    ("field", "kwargs"), BAD_BACKOFF, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_BACKOFF)]
)
def test_backoff_rejects_bad_input(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        rs.Backoff(**kwargs)
    assert re.match(rf"{field}\b", str(info.value)), info.value


BAD_BUDGET: list[tuple[str, dict[str, Any]]] = [
    ("ratio", {"ratio": 0}),
    ("ratio", {"ratio": 1.5}),
    ("ratio", {"ratio": -0.1}),
    ("ratio", {"ratio": math.nan}),
    ("ratio", {"ratio": True}),
    ("ratio", {"ratio": "0.1"}),
    ("min_per_second", {"min_per_second": -1}),
    ("min_per_second", {"min_per_second": math.inf}),
    ("min_per_second", {"min_per_second": math.nan}),
    ("window", {"window": 0}),
    ("window", {"window": -1}),
    ("window", {"window": math.inf}),
    ("window", {"window": 1e-320}),
    ("window", {"window": 86_401}),
    ("name", {"name": ""}),
    ("clock", {"clock": "now"}),
]


@pytest.mark.parametrize(
    ("field", "kwargs"), BAD_BUDGET, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_BUDGET)]
)
def test_budget_rejects_bad_input(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        rs.RetryBudget(**kwargs)
    assert re.match(rf"{field}\b", str(info.value)), info.value


def test_edge_values_accepted() -> None:
    assert rs.Backoff(0, 0, 1).schedule(3) == [0.0, 0.0, 0.0]
    assert rs.RetryBudget(ratio=1, min_per_second=0).balance() == 0.0
    assert rs.Retry(attempts=1, deadline=1e-9).attempts == 1
    assert "attempts=1" in repr(rs.Retry(attempts=1))
    assert "jitter='none'" in repr(none_backoff())
    assert "ratio=1.0" in repr(rs.RetryBudget(ratio=1))


# -- threads ---------------------------------------------------------------------------------


def test_one_retry_shared_by_threads(clock: FakeClock) -> None:
    """20 threads through one Retry at once: per-call state stays per call, and the
    counts are exact."""
    retry = rs.Retry(attempts=4, backoff=none_backoff(0.001), clock=clock)
    events: list[rs.RetryEvent] = []
    retry.add_listener(events.append)
    n = 20
    start = threading.Barrier(n)
    results: list[object] = []
    failures: list[BaseException] = []
    deps = [Dependency(i % 4 if i % 5 else None) for i in range(n)]  # every fifth never succeeds

    def caller(dep: Dependency) -> None:
        start.wait()
        for _ in range(10):
            dep.calls = 0
            try:
                results.append(retry.call(dep))
            except ConnectionError as error:
                failures.append(error)

    threads = [threading.Thread(target=caller, args=(d,)) for d in deps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    succeeding = [d for d in deps if d.failures is not None]
    failing = n - len(succeeding)
    assert len(results) == 10 * len(succeeding)
    assert len(failures) == 10 * failing
    assert all(e.attempts == 4 for e in failures)  # type: ignore[attr-defined]
    retries = 10 * (sum(d.failures or 0 for d in succeeding) + 3 * failing)
    assert retry.telemetry().read() == {
        "calls": 10 * n,
        "retries": retries,
        "gave_up": {"attempts": 10 * failing, "deadline": 0, "budget": 0, "rejected": 0},
    }
    assert len(events) == retries


def test_a_backoff_wait_beyond_a_year_is_refused() -> None:
    # time.sleep(1e308) overflows: refused where the mistake is made.
    with pytest.raises(ValueError, match=r"^maximum"):
        rs.Backoff(initial=0.1, maximum=1e308)
    with pytest.raises(ValueError, match=r"^initial"):
        rs.Backoff(initial=1e308, maximum=1e308)
