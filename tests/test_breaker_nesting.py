"""One breaker guarding one call twice: the inner entry passes through, counted once.

The README once did ``payments.call(charge, ...)`` with ``charge`` already decorated by
``@payments``. A failure then counted twice, and in half-open the outer call took the
only probe slot, the inner one was refused, and that refusal failed the probe: the
breaker never closed again.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

import resilience as rs
from resilience.testing import FakeClock


class Down(Exception):
    pass


def breaker(clock: FakeClock, **kw: object) -> rs.CircuitBreaker:
    options: dict[str, object] = {
        "failure_threshold": 2,
        "recovery_timeout": 10.0,
        "success_threshold": 2,
        "half_open_max_calls": 1,
    }
    options.update(kw)
    return rs.CircuitBreaker("nested", clock=clock, **options)  # type: ignore[arg-type]


def fails() -> None:
    raise Down


def works() -> str:
    return "ok"


SHAPES: dict[str, Callable[[rs.CircuitBreaker, Callable[[], object]], object]] = {
    "call(decorated)": lambda b, fn: b.call(b(fn)),
    "decorated(decorated)": lambda b, fn: b(lambda: b(fn)())(),
    "with + decorated": lambda b, fn: _with(b, b(fn)),
    "with + with": lambda b, fn: _with(b, lambda: _with(b, fn)),
    "guard + call": lambda b, fn: b.call(b.guard(_Client(fn), methods=["send"]).send),
}


def _with(b: rs.CircuitBreaker, fn: Callable[[], object]) -> object:
    with b:
        return fn()


class _Client:
    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn

    def send(self) -> object:
        return self.fn()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_nested_failure_counts_once(shape: str, clock: FakeClock) -> None:
    b = breaker(clock)
    with pytest.raises(Down):
        SHAPES[shape](b, fails)
    assert b.stats().consecutive_failures == 1
    assert b.state is rs.CircuitState.CLOSED  # failure_threshold=2: one failure is not two


@pytest.mark.parametrize("shape", list(SHAPES))
def test_nested_probes_close_a_half_open_breaker(shape: str, clock: FakeClock) -> None:
    b = breaker(clock)
    for _ in range(2):
        with pytest.raises(Down):
            b.call(fails)
    clock.advance(10.0)
    assert b.state is rs.CircuitState.HALF_OPEN
    assert SHAPES[shape](b, works) == "ok"
    assert SHAPES[shape](b, works) == "ok"
    assert b.stats().state is rs.CircuitState.CLOSED


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_nested_failed_probe_reopens_once(shape: str, clock: FakeClock) -> None:
    b = breaker(clock)
    for _ in range(2):
        with pytest.raises(Down):
            b.call(fails)
    clock.advance(10.0)
    with pytest.raises(Down):
        SHAPES[shape](b, fails)
    stats = b.stats()
    assert (stats.state, stats.trips, stats.consecutive_failures) == (rs.CircuitState.OPEN, 2, 3)


def test_nested_calls_count_one_call_in_a_failure_rate_window(clock: FakeClock) -> None:
    b = breaker(clock, failure_rate=rs.FailureRate(0.5, window=100, minimum_calls=100))
    assert b.call(b(works)) == "ok"
    with pytest.raises(Down):
        b(lambda: b(fails)())()
    stats = b.stats()
    assert (stats.window_calls, stats.window_failures) == (2, 1)


@pytest.mark.anyio
async def test_async_nested_shapes_count_once_and_close_from_half_open(clock: FakeClock) -> None:
    b = breaker(clock)

    @b
    async def afails() -> None:
        raise Down

    @b
    async def aworks() -> str:
        return "ok"

    with pytest.raises(Down):
        await b.acall(afails)
    assert b.stats().consecutive_failures == 1
    with pytest.raises(Down):
        async with b:
            await afails()
    assert b.state is rs.CircuitState.OPEN  # two calls, two failures
    clock.advance(10.0)
    assert await b.acall(aworks) == "ok"
    async with b:
        assert await aworks() == "ok"
    assert b.stats().state is rs.CircuitState.CLOSED


@pytest.mark.anyio
async def test_a_sync_call_inside_an_async_block_passes_through(clock: FakeClock) -> None:
    b = breaker(clock)
    with pytest.raises(Down):
        async with b:
            b(fails)()
    assert b.stats().consecutive_failures == 1


def test_a_permit_taken_inside_a_call_reports_nothing(clock: FakeClock) -> None:
    b = breaker(clock, failure_threshold=1)
    with b:
        permit = b.try_acquire()
        assert permit is not None
        permit.failure(Down())
    assert b.state is rs.CircuitState.CLOSED


def test_the_same_exception_raised_in_separate_calls_counts_each_time(clock: FakeClock) -> None:
    b = breaker(clock, failure_threshold=3)
    error = Down()

    @b
    def raises_the_same() -> None:
        raise error

    for expected in (1, 2):
        with pytest.raises(Down):
            raises_the_same()
        assert b.stats().consecutive_failures == expected
    with pytest.raises(Down):
        raises_the_same()
    assert b.state is rs.CircuitState.OPEN


def test_a_counted_exception_still_copies_and_pickles(clock: FakeClock) -> None:
    b = breaker(clock)
    with pytest.raises(Down) as caught:
        b(fails)()
    error = caught.value
    assert isinstance(pickle.loads(pickle.dumps(error)), Down)
    assert isinstance(copy.copy(error), Down)


def test_other_breakers_still_count_a_call_nested_in_this_one(clock: FakeClock) -> None:
    outer, inner = breaker(clock), rs.CircuitBreaker("other", failure_threshold=1, clock=clock)
    with pytest.raises(Down):
        outer.call(inner(fails))
    assert (outer.stats().consecutive_failures, inner.state) == (1, rs.CircuitState.OPEN)


def test_many_threads_nesting_at_once_count_every_call_once(clock: FakeClock) -> None:
    rate = rs.FailureRate(1.0, window=10_000, minimum_calls=10_000)
    b = breaker(clock, failure_threshold=None, failure_rate=rate)
    threads, calls = 16, 200
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        start.wait()
        for n in range(calls):
            try:
                if (i + n) % 2:
                    b.call(b(fails))
                else:
                    with b:
                        b(works)()
            except Down:
                pass

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    stats = b.stats()
    assert (stats.window_calls, stats.window_failures) == (threads * calls, threads * calls // 2)


@pytest.mark.anyio
async def test_many_tasks_nesting_at_once_count_every_call_once(clock: FakeClock) -> None:
    rate = rs.FailureRate(1.0, window=10_000, minimum_calls=10_000)
    b = breaker(clock, failure_threshold=None, failure_rate=rate)

    @b
    async def afails() -> None:
        await anyio.lowlevel.checkpoint()
        raise Down

    async def task() -> None:
        for _ in range(10):
            with pytest.raises(Down):
                await b.acall(afails)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(task)
    stats = b.stats()
    assert (stats.window_calls, stats.window_failures) == (2000, 2000)


def test_a_refused_half_open_call_says_half_open_and_no_probe_slot(clock: FakeClock) -> None:
    b = breaker(clock)
    for _ in range(2):
        with pytest.raises(Down):
            b.call(fails)
    clock.advance(10.0)
    probe = b.try_acquire()
    assert probe is not None
    with pytest.raises(rs.CircuitOpenError) as refused:
        b.call(works)
    assert refused.value.state == "half_open"
    assert "half-open" in str(refused.value)
    assert "no probe slot" in str(refused.value)
    assert "is open" not in str(refused.value)
    probe.success()
    clock.advance(0.0)
    b.force_open()
    with pytest.raises(rs.CircuitOpenError) as opened:
        b.call(works)
    assert opened.value.state == "open"
    assert "is open" in str(opened.value)


def test_a_failed_probe_counts_as_one_more_consecutive_failure(clock: FakeClock) -> None:
    # pybreaker, circuitbreaker and aiobreaker users read 4 here: the probe was a call.
    b = breaker(clock, failure_threshold=3)
    for _ in range(3):
        with pytest.raises(Down):
            b.call(fails)
    clock.advance(10.0)
    with pytest.raises(Down):
        b.call(fails)
    assert b.stats().consecutive_failures == 4
    clock.advance(10.0)
    b.call(works)  # a good probe ends the run of failures
    assert b.stats().consecutive_failures == 0
