"""Timeout, Bulkhead, Fallback and pipeline: what each promises, on asyncio, trio and threads.

Async cancellation needs real time, so those tests use tiny timeouts (0.02-0.1 s);
everything else runs on a FakeClock.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import itertools
import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.lowlevel
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

import resilience as rs
from resilience.metrics import Metrics
from resilience.policies._base import Policy
from resilience.policies.timeout import EXPIRED
from resilience.testing import FakeClock

P = ParamSpec("P")
R = TypeVar("R")

anyio_test = pytest.mark.anyio
_serial = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_serial)}"


def cancelling() -> int:
    """The current asyncio task's pending cancellation requests (Python >= 3.11)."""
    task: Any = asyncio.current_task()
    return int(task.cancelling())


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling state another thread changes
            await anyio.sleep(0.001)


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    ends = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < ends, "condition not met in time"
        time.sleep(0.001)


def started(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def assert_idle(bulkhead: rs.Bulkhead) -> None:
    """No slot held, no one waiting: nothing leaked."""
    assert bulkhead.active == 0
    assert bulkhead.waiting == 0


def waiting_is(bulkhead: rs.Bulkhead, n: int) -> bool:
    return bulkhead.waiting == n


async def join(*threads: threading.Thread) -> None:
    for thread in threads:
        await anyio.to_thread.run_sync(thread.join, 10)
        assert not thread.is_alive()


async def forever() -> None:
    await anyio.sleep(10)


async def fast(value: int = 1) -> int:
    await anyio.lowlevel.checkpoint()
    return value


# -- Timeout, async ------------------------------------------------------------------------


@anyio_test
async def test_slow_call_is_cancelled_at_the_deadline(anyio_backend: str) -> None:
    timeout = rs.Timeout(0.05, name="slow")
    cancelled: list[BaseException] = []

    async def slow() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class() as error:
            cancelled.append(error)
            raise

    start = time.monotonic()
    with pytest.raises(rs.TimeoutExceeded) as caught:
        await timeout.acall(slow)
    assert time.monotonic() - start < 2.0
    assert len(cancelled) == 1
    if anyio_backend == "asyncio":  # what the call sees says why it was cancelled
        assert cancelled[0].args == (EXPIRED,)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.seconds == 0.05
    assert caught.value.name == "slow"
    assert timeout.telemetry().read() == {"calls": 1, "timeouts": 1, "overruns": 0}
    await anyio.sleep(0.01)  # no stray cancellation is left for the task


@anyio_test
async def test_fast_call_returns_its_value() -> None:
    timeout = rs.Timeout(0.1)

    @timeout
    async def double(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 2 * x

    assert await double(21) == 42
    assert await timeout.acall(fast, 7) == 7
    assert timeout.telemetry().read() == {"calls": 2, "timeouts": 0, "overruns": 0}


@anyio_test
async def test_thousands_of_sequential_calls_leave_no_stray_cancellation(
    anyio_backend: str,
) -> None:
    timeout = rs.Timeout(0.1)
    calls = 0
    ends = time.monotonic() + 0.3  # long enough for the timer to fire mid-run
    while calls < 3000 or time.monotonic() < ends:
        assert await timeout.acall(fast, calls) == calls
        calls += 1
    await anyio.sleep(0.15)  # past every call's deadline: nothing may cancel us now
    assert timeout.telemetry().read()["timeouts"] == 0
    if anyio_backend == "asyncio":
        assert cancelling() == 0
        watch = timeout._watches[asyncio.get_running_loop()]
        assert not watch.queue  # the queue drained
        assert not watch.armed


@anyio_test
async def test_500_concurrent_calls_leave_no_stray_cancellation(anyio_backend: str) -> None:
    timeout = rs.Timeout(0.1)
    done: list[int] = []
    errors: list[BaseException] = []

    async def caller(i: int) -> None:
        try:
            assert await timeout.acall(fast, i) == i
            await anyio.sleep(0.15)  # a stray cancellation would land here
            if anyio_backend == "asyncio":
                assert cancelling() == 0
        except BaseException as error:  # recorded: a task group may hide a cancellation
            errors.append(error)
            raise
        done.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(caller, i)
    assert not errors
    assert sorted(done) == list(range(500))
    if anyio_backend == "asyncio":
        watch = timeout._watches[asyncio.get_running_loop()]
        await until(lambda: not watch.queue and not watch.armed)


@anyio_test
async def test_finished_calls_are_not_kept_alive_by_the_timer(require_asyncio: None) -> None:
    timeout = rs.Timeout(5.0)
    for i in range(10):
        await timeout.acall(fast, i)
    watch = timeout._watches[asyncio.get_running_loop()]
    assert len(watch.queue) == 10  # still queued until the timer comes, but ...
    assert all(entry[1] is None for entry in watch.queue)  # ... holding no task


@anyio_test
async def test_cancellation_from_a_cancel_scope_stays_a_cancellation() -> None:
    timeout = rs.Timeout(5.0)
    seen: list[BaseException] = []
    inside = anyio.Event()

    async def victim() -> None:
        inside.set()
        await anyio.sleep(10)

    async def run() -> None:
        try:
            await timeout.acall(victim)
        except BaseException as error:
            seen.append(error)
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await inside.wait()
        tg.cancel_scope.cancel()
    assert len(seen) == 1
    assert isinstance(seen[0], anyio.get_cancelled_exc_class())
    assert not isinstance(seen[0], rs.TimeoutExceeded)
    assert timeout.telemetry().read()["timeouts"] == 0


@anyio_test
async def test_task_cancel_stays_a_cancellation(require_asyncio: None) -> None:
    timeout = rs.Timeout(5.0)
    inside = asyncio.Event()

    async def victim() -> None:
        inside.set()
        await asyncio.sleep(10)

    task = asyncio.ensure_future(timeout.acall(victim))
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert timeout.telemetry().read()["timeouts"] == 0


@anyio_test
async def test_outside_cancel_landing_with_the_deadline_wins(require_asyncio: None) -> None:
    """Both requests arrive before the call resumes: the outside one is not swallowed."""
    timeout = rs.Timeout(0.02)

    async def victim() -> None:
        me = asyncio.current_task()
        assert me is not None
        asyncio.get_running_loop().call_soon(me.cancel)  # the outside request ...
        time.sleep(0.05)  # noqa: ASYNC251 - ... and the deadline passes while the loop is blocked
        await asyncio.sleep(10)

    task = asyncio.ensure_future(timeout.acall(victim))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


@anyio_test
async def test_enclosing_fail_after_wins() -> None:
    timeout = rs.Timeout(5.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        with anyio.fail_after(0.05):
            await timeout.acall(forever)
    assert not isinstance(caught.value, rs.TimeoutExceeded)  # it is the scope's own
    assert time.monotonic() - start < 2.0
    assert timeout.telemetry().read()["timeouts"] == 0
    await anyio.sleep(0.01)


@anyio_test
async def test_enclosing_shorter_timeout_wins_and_remaining_shows_it() -> None:
    outer, inner = rs.Timeout(0.05, name="outer"), rs.Timeout(5.0, name="inner")
    seen: list[float | None] = []

    async def slow() -> None:
        seen.append(rs.remaining())
        await anyio.sleep(10)

    start = time.monotonic()
    with pytest.raises(rs.TimeoutExceeded) as caught:
        await outer.acall(inner.acall, slow)
    assert time.monotonic() - start < 2.0
    assert caught.value.name == "outer"
    left = seen[0]
    assert left is not None
    assert 0.0 < left <= 0.05
    assert rs.remaining() is None
    await anyio.sleep(0.01)


@anyio_test
async def test_enclosing_longer_timeout_leaves_the_inner_one_in_charge() -> None:
    outer, inner = rs.Timeout(5.0, name="outer"), rs.Timeout(0.05, name="inner")
    seen: list[float | None] = []

    async def slow() -> None:
        seen.append(rs.remaining())
        await anyio.sleep(10)

    with pytest.raises(rs.TimeoutExceeded) as caught:
        await outer.acall(inner.acall, slow)
    assert caught.value.name == "inner"
    left = seen[0]
    assert left is not None
    assert 0.0 < left <= 0.05
    assert outer.telemetry().read()["timeouts"] == 0


@anyio_test
async def test_a_callee_that_swallows_its_cancellation_still_times_out(
    anyio_backend: str,
) -> None:
    timeout = rs.Timeout(0.02)

    async def stubborn() -> str:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            return "swallowed"
        return "slept"

    with pytest.raises(rs.TimeoutExceeded):
        await timeout.acall(stubborn)
    assert timeout.telemetry().read()["timeouts"] == 1
    if anyio_backend == "asyncio":
        assert cancelling() == 0
    await anyio.sleep(0.03)  # no stray cancellation


@anyio_test
async def test_a_callee_that_swallows_under_a_tighter_enclosing_deadline(
    anyio_backend: str,
) -> None:
    """The inner Timeout then runs on a cancel scope; swallowing does not beat it."""
    outer, inner = rs.Timeout(0.05), rs.Timeout(5.0)

    async def stubborn() -> str:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            return "swallowed"
        return "slept"

    with pytest.raises(rs.TimeoutExceeded):
        await outer.acall(inner.acall, stubborn)
    if anyio_backend == "asyncio":
        assert cancelling() == 0
    await anyio.sleep(0.06)


@anyio_test
async def test_a_callee_turning_its_cancellation_into_an_error(anyio_backend: str) -> None:
    timeout = rs.Timeout(0.02)

    async def converts() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            raise ConnectionAbortedError("aborted") from None

    with pytest.raises(ConnectionAbortedError):
        await timeout.acall(converts)
    if anyio_backend == "asyncio":
        assert cancelling() == 0  # our cancellation request was taken back
    await anyio.sleep(0.03)
    with anyio.move_on_after(0.01) as scope:  # cancel scopes still work in this task
        await anyio.sleep(1)
    assert scope.cancelled_caught


@anyio_test
async def test_no_call_starts_once_an_enclosing_deadline_has_passed(clock: FakeClock) -> None:
    outer, inner = rs.Timeout(1.0, clock=clock), rs.Timeout(5.0, clock=clock)
    ran: list[int] = []

    async def callee() -> None:
        ran.append(1)

    async def late() -> None:
        clock.advance(1.5)
        await inner.acall(callee)

    with pytest.raises(rs.TimeoutExceeded):
        await outer.acall(late)
    assert ran == []
    assert inner.telemetry().read()["timeouts"] == 1


def test_timeouts_on_event_loops_in_several_threads_at_once() -> None:
    timeout = rs.Timeout(0.1)
    barrier = threading.Barrier(3, timeout=10)
    results: dict[str, tuple[int, str]] = {}
    errors: list[BaseException] = []

    async def work(label: str) -> None:
        barrier.wait()
        calls = 0
        ends = time.monotonic() + 0.3
        while time.monotonic() < ends:
            assert await timeout.acall(fast, calls) == calls
            calls += 1
        try:
            await timeout.acall(forever)
        except rs.TimeoutExceeded:
            results[label] = (calls, "timed out")

    def thread(label: str, runner: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                runner()
            except BaseException as error:
                errors.append(error)

        return started(run)

    threads = [
        thread("asyncio-1", lambda: asyncio.run(work("asyncio-1"))),
        thread("asyncio-2", lambda: asyncio.run(work("asyncio-2"))),
        thread("trio", lambda: trio.run(work, "trio")),
    ]
    for each in threads:
        each.join(10)
    assert not errors
    assert {label: outcome for label, (_, outcome) in results.items()} == {
        "asyncio-1": "timed out",
        "asyncio-2": "timed out",
        "trio": "timed out",
    }
    assert all(calls > 0 for calls, _ in results.values())
    assert timeout.telemetry().read()["timeouts"] == 3
    gc.collect()
    assert len(timeout._watches) == 0  # finished loops are not kept alive


@anyio_test
async def test_breaker_counts_a_timeout_inside_it_as_a_failure() -> None:
    breaker = rs.CircuitBreaker(unique("timeouts"), failure_threshold=2, recovery_timeout=60)
    policy = rs.pipeline(breaker, rs.Timeout(0.02))
    ran: list[int] = []

    async def slow() -> None:
        ran.append(1)
        await anyio.sleep(10)

    for _ in range(2):
        with pytest.raises(rs.TimeoutExceeded):
            await policy.acall(slow)
    assert breaker.state is rs.CircuitState.OPEN
    with pytest.raises(rs.CircuitOpenError):
        await policy.acall(slow)
    assert len(ran) == 2


def test_breaker_counts_a_sync_overrun_as_a_failure(clock: FakeClock) -> None:
    breaker = rs.CircuitBreaker(unique("overruns"), failure_threshold=1, clock=clock)
    policy = rs.pipeline(breaker, rs.Timeout(1.0, clock=clock))
    with pytest.raises(rs.TimeoutExceeded):
        policy.call(clock.advance, 2.0)
    assert breaker.state is rs.CircuitState.OPEN


# -- Timeout, sync -------------------------------------------------------------------------


def test_remaining_inside_a_sync_call(clock: FakeClock) -> None:
    timeout = rs.Timeout(2.0, clock=clock)
    seen: list[float | None] = []

    @timeout
    def lookup(key: str) -> str:
        seen.append(rs.remaining())
        clock.advance(0.5)
        seen.append(rs.remaining())
        clock.advance(1.5)
        seen.append(rs.remaining())
        return key

    assert rs.remaining() is None
    assert lookup("k") == "k"  # exactly at the deadline is still in time
    assert seen == [2.0, 1.5, 0.0]
    assert rs.remaining() is None


def test_a_sync_overrun_raises_and_is_counted(clock: FakeClock) -> None:
    timeout = rs.Timeout(1.0, name="sync", clock=clock)
    ran: list[int] = []

    def slow() -> str:
        ran.append(1)
        clock.advance(1.01)
        return "too late"

    with pytest.raises(rs.TimeoutExceeded) as caught:
        timeout.call(slow)
    assert ran == [1]  # it ran to the end: a sync call is not interrupted
    assert caught.value.name == "sync"
    assert caught.value.seconds == 1.0
    assert timeout.telemetry().read() == {"calls": 1, "timeouts": 0, "overruns": 1}


def test_a_sync_error_propagates_unchanged(clock: FakeClock) -> None:
    timeout = rs.Timeout(1.0, clock=clock)

    def fails() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        timeout.call(fails)
    assert rs.remaining() is None  # the deadline was reset on the way out


def test_no_sync_call_starts_once_an_enclosing_deadline_has_passed(clock: FakeClock) -> None:
    outer, inner = rs.Timeout(1.0, clock=clock), rs.Timeout(5.0, clock=clock)
    ran: list[int] = []

    def late() -> None:
        clock.advance(1.0)
        inner.call(ran.append, 1)

    with pytest.raises(rs.TimeoutExceeded):
        outer.call(late)
    assert ran == []
    assert inner.telemetry().read() == {"calls": 1, "timeouts": 1, "overruns": 0}


@pytest.mark.parametrize(("outer_s", "inner_s"), [(1.0, 5.0), (5.0, 1.0)])
def test_nested_sync_timeouts_keep_the_earlier_deadline(
    clock: FakeClock, outer_s: float, inner_s: float
) -> None:
    outer, inner = rs.Timeout(outer_s, clock=clock), rs.Timeout(inner_s, clock=clock)
    seen: list[float | None] = []

    def body() -> None:
        seen.append(rs.remaining())
        inner.call(lambda: seen.append(rs.remaining()))
        seen.append(rs.remaining())

    outer.call(body)
    assert seen == [outer_s, 1.0, outer_s]


def test_nested_sync_overrun_of_the_outer_deadline_is_caught_inside(clock: FakeClock) -> None:
    outer = rs.Timeout(1.0, name="outer", clock=clock)
    inner = rs.Timeout(5.0, name="inner", clock=clock)
    with pytest.raises(rs.TimeoutExceeded) as caught:
        outer.call(inner.call, clock.advance, 1.5)
    assert caught.value.name == "inner"  # it ran under the tighter deadline
    assert inner.telemetry().read()["overruns"] == 1


def test_timeout_decorates_and_keeps_the_signature() -> None:
    timeout = rs.Timeout(1.0)

    def add(a: int, b: int = 2) -> int:
        """Add."""
        return a + b

    async def aadd(a: int, b: int = 2) -> int:
        return a + b

    wrapped, awrapped = timeout(add), timeout(aadd)
    assert wrapped(1) == 3
    assert inspect.signature(wrapped) == inspect.signature(add)
    assert wrapped.__name__ == "add"
    assert wrapped.__doc__ == "Add."
    assert inspect.iscoroutinefunction(awrapped)
    assert inspect.signature(awrapped) == inspect.signature(aadd)


# -- Bulkhead ------------------------------------------------------------------------------


@anyio_test
async def test_one_bulkhead_bounds_threads_and_tasks_together() -> None:
    bulkhead = rs.Bulkhead(4, max_wait=None)
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def enter() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])

    def leave() -> None:
        with lock:
            running[0] -= 1

    def work_sync() -> None:
        enter()
        time.sleep(0.005)
        leave()

    async def work_async() -> None:
        enter()
        await anyio.sleep(0.005)
        leave()

    def thread_body() -> None:
        for _ in range(3):
            bulkhead.call(work_sync)

    threads = [started(thread_body) for _ in range(20)]
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            for _ in range(3):
                tg.start_soon(bulkhead.acall, work_async)
    await join(*threads)
    assert 1 <= peak[0] <= 4
    assert_idle(bulkhead)
    read = bulkhead.telemetry().read()
    assert read["admitted"] == 120
    assert read["rejected"] == 0


def test_max_wait_zero_rejects_at_once() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=0.0, name="tight")
    ran: list[int] = []
    with bulkhead:
        start = time.monotonic()
        with pytest.raises(rs.BulkheadFull) as caught:
            bulkhead.call(ran.append, 1)
        assert time.monotonic() - start < 0.5
    assert ran == []
    assert caught.value.waited == 0.0
    assert caught.value.name == "tight"
    assert caught.value.max_concurrent == 1
    assert bulkhead.active == 0
    assert bulkhead.telemetry().read() == {
        "admitted": 1,
        "rejected": 1,
        "active": 0,
        "waiting": 0,
        "max_concurrent": 1,
    }


@anyio_test
async def test_max_wait_zero_rejects_an_async_caller_at_once() -> None:
    bulkhead = rs.Bulkhead(1)
    async with bulkhead:
        with pytest.raises(rs.BulkheadFull) as caught:
            await bulkhead.acall(fast)
    assert caught.value.waited == 0.0
    assert bulkhead.active == 0


def test_max_wait_bounds_a_thread_waiting() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=0.05)
    with bulkhead, pytest.raises(rs.BulkheadFull) as caught:
        bulkhead.call(print, "never")
    assert 0.04 <= caught.value.waited < 2.0
    assert "after waiting" in str(caught.value)
    assert_idle(bulkhead)
    assert bulkhead.telemetry().read()["rejected"] == 1


@anyio_test
async def test_max_wait_bounds_a_task_waiting() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=0.05)
    async with bulkhead:
        with pytest.raises(rs.BulkheadFull) as caught:
            await bulkhead.acall(fast)
    assert 0.04 <= caught.value.waited < 2.0
    assert_idle(bulkhead)
    assert bulkhead.telemetry().read()["rejected"] == 1


def test_max_queue_rejects_at_once() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None, max_queue=1)
    order: list[str] = []
    bulkhead.__enter__()
    queued = started(lambda: bulkhead.call(order.append, "queued"))
    wait_for(lambda: bulkhead.waiting == 1)
    start = time.monotonic()
    with pytest.raises(rs.BulkheadFull) as caught:
        bulkhead.call(order.append, "rejected")
    assert time.monotonic() - start < 0.5
    assert caught.value.waited == 0.0
    bulkhead.__exit__(None, None, None)
    queued.join(10)
    assert order == ["queued"]
    assert_idle(bulkhead)


def test_threads_get_freed_slots_in_fifo_order() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    order: list[int] = []
    threads = []
    with bulkhead:
        for i in range(6):
            threads.append(started(functools.partial(bulkhead.call, order.append, i)))
            wait_for(functools.partial(waiting_is, bulkhead, i + 1))
    for thread in threads:
        thread.join(10)
    assert order == list(range(6))
    assert_idle(bulkhead)


@anyio_test
async def test_threads_and_tasks_get_freed_slots_in_fifo_order() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    order: list[str] = []
    threads = []

    async def task_waiter(label: str) -> None:
        async with bulkhead:
            order.append(label)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        with bulkhead:
            for i in range(6):
                label = f"{'thread' if i % 2 == 0 else 'task'}-{i}"
                if i % 2 == 0:
                    threads.append(started(functools.partial(bulkhead.call, order.append, label)))
                else:
                    tg.start_soon(task_waiter, label)
                await until(functools.partial(waiting_is, bulkhead, i + 1))
        await until(lambda: len(order) == 6)
    await join(*threads)
    assert order == [f"{'thread' if i % 2 == 0 else 'task'}-{i}" for i in range(6)]
    assert_idle(bulkhead)


def test_fresh_callers_do_not_barge_past_waiters() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    order: list[str] = []
    bulkhead.__enter__()
    first = started(lambda: bulkhead.call(order.append, "waiter"))
    wait_for(lambda: bulkhead.waiting == 1)
    bulkhead.__exit__(None, None, None)  # the slot goes to the waiter, not to us
    bulkhead.call(order.append, "fresh")
    first.join(10)
    assert order[0] == "waiter"


@anyio_test
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    ran: list[int] = []

    async def waiter() -> None:
        await bulkhead.acall(fast)
        ran.append(1)

    async with bulkhead:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await until(lambda: bulkhead.waiting == 1)
            tg.cancel_scope.cancel()
        assert bulkhead.waiting == 0
    assert ran == []
    assert_idle(bulkhead)
    # Going away is not a rejection: the bulkhead refused no one.
    assert bulkhead.telemetry().read()["rejected"] == 0
    assert await bulkhead.acall(fast, 5) == 5


@anyio_test
async def test_a_slot_handed_to_a_waiter_as_it_is_cancelled_passes_on() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    order: list[str] = []
    scopes = {"a": anyio.CancelScope(), "b": anyio.CancelScope()}

    async def waiter(label: str) -> None:
        with scopes[label]:
            async with bulkhead:
                order.append(label)

    async with anyio.create_task_group() as tg:
        bulkhead.__enter__()
        tg.start_soon(waiter, "a")
        await until(lambda: bulkhead.waiting == 1)
        tg.start_soon(waiter, "b")
        await until(lambda: bulkhead.waiting == 2)
        bulkhead.__exit__(None, None, None)  # "a" is handed the slot ...
        scopes["a"].cancel()  # ... and cancelled before it could take it
    assert order == ["b"]
    assert_idle(bulkhead)
    assert bulkhead.telemetry().read()["admitted"] == 2  # us, then "b"


@anyio_test
async def test_a_waiter_whose_time_runs_out_as_a_slot_arrives_takes_it() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=0.05)
    ran: list[int] = []

    async def waiter() -> None:
        async with bulkhead:
            ran.append(1)

    async with anyio.create_task_group() as tg:
        bulkhead.__enter__()
        tg.start_soon(waiter)
        await until(lambda: bulkhead.waiting == 1)
        time.sleep(0.1)  # noqa: ASYNC251 - its max_wait passes while the loop is blocked ...
        bulkhead.__exit__(None, None, None)  # ... and the slot is handed to it
    assert ran == [1]
    assert_idle(bulkhead)
    read = bulkhead.telemetry().read()
    assert read["admitted"] == 2
    assert read["rejected"] == 0


@anyio_test
async def test_a_thread_frees_the_slot_a_task_waits_for() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with bulkhead:
            holding.set()
            assert release.wait(10)

    thread = started(holder)
    await anyio.to_thread.run_sync(holding.wait, 10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.acall, fast)
        await until(lambda: bulkhead.waiting == 1)
        release.set()
    await join(thread)
    assert_idle(bulkhead)
    assert bulkhead.telemetry().read()["admitted"] == 2


@anyio_test
async def test_a_task_frees_the_slot_a_thread_waits_for() -> None:
    bulkhead = rs.Bulkhead(1, max_wait=None)
    ran: list[str] = []
    async with bulkhead:
        thread = started(lambda: bulkhead.call(ran.append, "thread"))
        await until(lambda: bulkhead.waiting == 1)
        assert ran == []
    await join(thread)
    assert ran == ["thread"]
    assert_idle(bulkhead)


def test_bulkhead_with_block_releases_on_error() -> None:
    bulkhead = rs.Bulkhead(2)
    with bulkhead as entered:
        assert entered is bulkhead
        assert bulkhead.active == 1
    with pytest.raises(KeyError), bulkhead:
        raise KeyError
    assert bulkhead.active == 0


@anyio_test
async def test_bulkhead_async_with_block_releases_on_error() -> None:
    bulkhead = rs.Bulkhead(2)
    async with bulkhead as entered:
        assert entered is bulkhead
        assert bulkhead.active == 1
    with pytest.raises(KeyError):
        async with bulkhead:
            raise KeyError
    assert bulkhead.active == 0


def test_a_bulkhead_slot_is_freed_when_the_call_raises() -> None:
    bulkhead = rs.Bulkhead(1)

    @bulkhead
    def fails() -> None:
        raise ValueError

    for _ in range(3):
        with pytest.raises(ValueError):
            fails()
    assert bulkhead.active == 0
    assert bulkhead.telemetry().read()["admitted"] == 3


def test_a_slot_handed_to_a_closed_event_loop_passes_on() -> None:
    """A waiter whose loop closed without cancelling it cannot take its slot."""
    bulkhead = rs.Bulkhead(1, max_wait=None)
    loop = asyncio.new_event_loop()

    async def wait_forever() -> None:
        await bulkhead.acall(fast)

    bulkhead.__enter__()
    task = loop.create_task(wait_forever())
    loop.run_until_complete(asyncio.sleep(0.01))
    assert bulkhead.waiting == 1
    loop.close()  # the task is left pending, never to run
    order: list[str] = []
    queued = started(lambda: bulkhead.call(order.append, "thread"))
    wait_for(lambda: bulkhead.waiting == 2)
    bulkhead.__exit__(None, None, None)
    queued.join(10)
    assert order == ["thread"]
    assert_idle(bulkhead)
    del task


class Interrupted(Exception):
    pass


def test_a_thread_waiter_interrupted_by_a_signal_leaves_the_queue() -> None:
    """KeyboardInterrupt (or any signal handler's error) while a thread waits."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    bulkhead = rs.Bulkhead(1, max_wait=None)
    ran: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with bulkhead:
            holding.set()
            assert release.wait(10)

    thread = started(holder)
    assert holding.wait(10)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            bulkhead.call(ran.append, "main")  # waits in the main thread: signals land here
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert bulkhead.waiting == 0
    release.set()
    thread.join(10)
    assert ran == []
    assert_idle(bulkhead)


# -- Fallback ------------------------------------------------------------------------------


def fails_with(error: BaseException) -> Callable[[], Any]:
    def fail() -> Any:
        raise error

    return fail


def afails_with(error: BaseException) -> Callable[[], Awaitable[Any]]:
    async def fail() -> Any:
        await anyio.lowlevel.checkpoint()
        raise error

    return fail


def test_fallback_value_and_function_of_the_error() -> None:
    value = rs.Fallback("cached", on=ConnectionError)
    function = rs.Fallback(lambda error: f"after {error}", on=ConnectionError)
    assert value.call(fails_with(ConnectionError("reset"))) == "cached"
    assert function.call(fails_with(ConnectionError("reset"))) == "after reset"
    assert value.call(lambda: "fine") == "fine"
    assert value.telemetry().read() == {"calls": 2, "fallbacks": 1}


@anyio_test
async def test_fallback_async_with_sync_and_async_handlers() -> None:
    async def handler(error: BaseException) -> str:
        await anyio.lowlevel.checkpoint()
        return f"async {error}"

    assert await rs.Fallback("v", on=OSError).acall(afails_with(OSError("x"))) == "v"
    sync = rs.Fallback(lambda error: f"sync {error}", on=OSError)
    assert await sync.acall(afails_with(OSError("x"))) == "sync x"
    asynchronous = rs.Fallback(handler, on=OSError)
    assert await asynchronous.acall(afails_with(OSError("x"))) == "async x"

    @asynchronous
    async def decorated(x: int) -> str:
        raise OSError(x)

    assert await decorated(3) == "async 3"


def test_fallback_only_for_the_listed_errors() -> None:
    fallback = rs.Fallback("cached", on=(ConnectionError, rs.CircuitOpenError))
    with pytest.raises(ValueError):
        fallback.call(fails_with(ValueError("bad input")))
    predicate = rs.Fallback("cached", on=lambda error: "retryable" in str(error))
    assert predicate.call(fails_with(RuntimeError("retryable"))) == "cached"
    with pytest.raises(RuntimeError):
        predicate.call(fails_with(RuntimeError("fatal")))
    assert predicate.telemetry().read() == {"calls": 2, "fallbacks": 1}


@anyio_test
async def test_fallback_only_for_the_listed_errors_async() -> None:
    fallback = rs.Fallback("cached", on=ConnectionError)
    with pytest.raises(ValueError):
        await fallback.acall(afails_with(ValueError("bad input")))


def test_an_async_handler_on_a_sync_call_is_a_type_error() -> None:
    async def handler(error: BaseException) -> str:
        return "never"

    ran: list[int] = []
    with pytest.raises(TypeError, match="async handler"):
        rs.Fallback(handler).call(ran.append, 1)
    assert ran == []


@anyio_test
async def test_cancellation_never_falls_back() -> None:
    fallback = rs.Fallback("cached", on=BaseException)
    seen: list[BaseException] = []
    inside = anyio.Event()

    async def victim() -> None:
        inside.set()
        await anyio.sleep(10)

    async def run() -> None:
        try:
            await fallback.acall(victim)
        except BaseException as error:
            seen.append(error)
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await inside.wait()
        tg.cancel_scope.cancel()
    assert len(seen) == 1
    assert isinstance(seen[0], anyio.get_cancelled_exc_class())
    assert fallback.telemetry().read()["fallbacks"] == 0


def test_keyboard_interrupt_never_falls_back() -> None:
    fallback = rs.Fallback("cached", on=BaseException)
    with pytest.raises(KeyboardInterrupt):
        fallback.call(fails_with(KeyboardInterrupt()))


@anyio_test
async def test_fallback_answers_a_timeout() -> None:
    policy = rs.pipeline(rs.Fallback("late", on=rs.TimeoutExceeded), rs.Timeout(0.02))

    async def slow() -> str:
        await anyio.sleep(10)
        return "slept"

    assert await policy.acall(slow) == "late"


# -- pipeline ------------------------------------------------------------------------------


class Recorder(Policy):
    """A policy that writes down when calls pass through it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.log.append(f"enter {self.name}")
        try:
            return fn(*args, **kwargs)
        finally:
            self.log.append(f"exit {self.name}")

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.log.append(f"enter {self.name}")
        try:
            return await fn(*args, **kwargs)
        finally:
            self.log.append(f"exit {self.name}")


def recording_decorator(name: str, log: list[str]) -> Callable[[Any], Any]:
    """A plain decorator (as a limiter's limit() is), sync or async."""

    def decorate(fn: Any) -> Any:
        if inspect.iscoroutinefunction(fn):

            async def arun(*args: Any, **kwargs: Any) -> Any:
                log.append(f"enter {name}")
                try:
                    return await fn(*args, **kwargs)
                finally:
                    log.append(f"exit {name}")

            return arun

        def run(*args: Any, **kwargs: Any) -> Any:
            log.append(f"enter {name}")
            try:
                return fn(*args, **kwargs)
            finally:
                log.append(f"exit {name}")

        return run

    return decorate


def expected(names: str) -> list[str]:
    return [f"enter {n}" for n in names] + ["call"] + [f"exit {n}" for n in reversed(names)]


@pytest.mark.parametrize("names", ["abc", "cba", "bac"])
def test_pipeline_honours_the_order_given(names: str) -> None:
    log: list[str] = []
    members: dict[str, Any] = {
        "a": Recorder("a", log),
        "b": recording_decorator("b", log),
        "c": Recorder("c", log),
    }
    policy = rs.pipeline(*(members[n] for n in names))

    @policy
    def decorated() -> str:
        log.append("call")
        return "ok"

    assert decorated() == "ok"
    assert log == expected(names)
    log.clear()
    assert policy.call(decorated.__wrapped__) == "ok"  # type: ignore[attr-defined]
    assert log == expected(names)


@anyio_test
@pytest.mark.parametrize("names", ["abc", "cba"])
async def test_pipeline_honours_the_order_given_async(names: str) -> None:
    log: list[str] = []
    members: dict[str, Any] = {
        "a": Recorder("a", log),
        "b": recording_decorator("b", log),
        "c": Recorder("c", log),
    }
    policy = rs.pipeline(*(members[n] for n in names))

    async def body(value: str) -> str:
        await anyio.lowlevel.checkpoint()
        log.append("call")
        return value

    assert await policy(body)("ok") == "ok"
    assert log == expected(names)
    log.clear()
    assert await policy.acall(body, "again") == "again"
    assert log == expected(names)


def test_pipelines_nest() -> None:
    log: list[str] = []
    inner = rs.pipeline(Recorder("b", log), Recorder("c", log))
    policy = rs.pipeline(Recorder("a", log), inner)

    def body() -> int:
        log.append("call")
        return 1

    assert policy.call(body) == 1
    assert log == expected("abc")


def test_pipeline_decorated_functions_keep_their_signature() -> None:
    policy = rs.pipeline(rs.Retry(attempts=2), rs.Timeout(1.0), rs.Bulkhead(2))

    def lookup(sku: str, *, fresh: bool = False) -> dict[str, object]:
        """Look a SKU up."""
        return {"sku": sku, "fresh": fresh}

    async def alookup(sku: str, *, fresh: bool = False) -> dict[str, object]:
        return {"sku": sku, "fresh": fresh}

    sync, asynchronous = policy(lookup), policy(alookup)
    for wrapped, original in ((sync, lookup), (asynchronous, alookup)):
        assert inspect.signature(wrapped) == inspect.signature(original)
        assert wrapped.__name__ == original.__name__
        assert inspect.unwrap(wrapped) is original
    assert sync.__doc__ == "Look a SKU up."
    assert not inspect.iscoroutinefunction(sync)
    assert inspect.iscoroutinefunction(asynchronous)
    assert sync("s", fresh=True) == {"sku": "s", "fresh": True}
    assert asyncio.run(asynchronous("s")) == {"sku": "s", "fresh": False}


def test_pipeline_decorates_methods() -> None:
    policy = rs.pipeline(rs.Timeout(1.0), rs.Bulkhead(1))

    class Client:
        def __init__(self) -> None:
            self.base = 10

        @policy
        def get(self, x: int) -> int:
            return self.base + x

        @policy
        @classmethod
        def kind(cls) -> str:
            return cls.__name__

        @policy
        @staticmethod
        def pure(x: int) -> int:
            return -x

    assert Client().get(1) == 11
    assert Client.kind() == "Client"
    assert Client.pure(3) == -3


def test_a_limiter_decorator_is_a_member(clock: FakeClock) -> None:
    bucket = rs.TokenBucket(rate=1.0, capacity=2, clock=clock)
    bulkhead = rs.Bulkhead(1)
    policy = rs.pipeline(rs.Timeout(1.0, clock=clock), bucket.limit(key="k"), bulkhead)

    @policy
    def call(x: int) -> int:
        return x

    assert call(1) == 1
    assert call(2) == 2
    with pytest.raises(rs.RateLimited):
        call(3)
    assert bulkhead.telemetry().read()["admitted"] == 2  # the limiter stopped the third
    clock.advance(1.0)
    assert policy.call(lambda: "refilled") == "refilled"


@anyio_test
async def test_a_limiter_decorator_is_a_member_async(clock: FakeClock) -> None:
    bucket = rs.TokenBucket(rate=1.0, capacity=1, clock=clock)
    policy = rs.pipeline(rs.Timeout(1.0), bucket.limit(key="k"))
    assert await policy.acall(fast, 4) == 4
    with pytest.raises(rs.RateLimited):
        await policy.acall(fast, 5)


@anyio_test
async def test_a_decorator_member_sees_an_async_callable_object_as_async(
    clock: FakeClock,
) -> None:
    """Decorators such as the limiter's tell sync from async by iscoroutinefunction:
    they must be handed an async function, or they would wrap the coroutine's creation
    rather than its run."""
    log: list[str] = []
    bucket = rs.TokenBucket(rate=1.0, capacity=1, clock=clock)
    policy = rs.pipeline(rs.Timeout(1.0), bucket.limit(key="k"), recording_decorator("d", log))

    class Fetch:
        async def __call__(self, x: int) -> int:
            await anyio.lowlevel.checkpoint()
            log.append("call")
            return x

    fetch = policy(Fetch())
    assert await fetch(1) == 1
    assert log == expected("d")
    with pytest.raises(rs.RateLimited):
        await fetch(2)


def full_pipeline(
    clock: FakeClock, calls: list[int]
) -> tuple[rs.Pipeline, rs.Retry, rs.CircuitBreaker, rs.Fallback, rs.Bulkhead]:
    fallback = rs.Fallback(lambda error: "cached", on=(rs.CircuitOpenError, rs.BulkheadFull))
    retry = rs.Retry(
        attempts=5,
        backoff=rs.Backoff(0.1, 1.0, jitter="none"),
        on=ConnectionError,
        clock=clock,
    )
    breaker = rs.CircuitBreaker(
        unique("e2e"), failure_threshold=2, recovery_timeout=30.0, clock=clock
    )
    timeout = rs.Timeout(5.0, clock=clock)
    bulkhead = rs.Bulkhead(2)
    return (
        rs.pipeline(fallback, retry, breaker, timeout, bulkhead),
        retry,
        breaker,
        fallback,
        bulkhead,
    )


def test_full_pipeline_open_breaker_stops_retry_and_fallback_answers(clock: FakeClock) -> None:
    calls: list[int] = []
    policy, retry, breaker, fallback, bulkhead = full_pipeline(clock, calls)

    @policy
    def down() -> str:
        calls.append(1)
        raise ConnectionError("down")

    assert down() == "cached"
    assert len(calls) == 2  # two failures opened the breaker; the retry stopped there
    assert breaker.state is rs.CircuitState.OPEN
    assert retry.telemetry().read()["gave_up"]["rejected"] == 1
    assert fallback.telemetry().read()["fallbacks"] == 1
    assert clock.monotonic() == pytest.approx(0.1 + 0.2)  # two backoff waits, none at the breaker
    assert down() == "cached"  # open: nothing reaches the dependency
    assert len(calls) == 2
    assert bulkhead.active == 0


@anyio_test
async def test_full_pipeline_open_breaker_stops_retry_and_fallback_answers_async(
    clock: FakeClock,
) -> None:
    calls: list[int] = []
    policy, retry, breaker, fallback, bulkhead = full_pipeline(clock, calls)

    @policy
    async def down() -> str:
        await anyio.lowlevel.checkpoint()
        calls.append(1)
        raise ConnectionError("down")

    assert await down() == "cached"
    assert len(calls) == 2
    assert breaker.state is rs.CircuitState.OPEN
    assert retry.telemetry().read()["gave_up"]["rejected"] == 1
    assert fallback.telemetry().read()["fallbacks"] == 1
    assert bulkhead.active == 0


def test_full_pipeline_success_passes_the_value_through(clock: FakeClock) -> None:
    policy, *_ = full_pipeline(clock, [])
    assert policy.call(lambda sku: {"sku": sku}, "s-1") == {"sku": "s-1"}


def test_metrics_export_every_member_of_a_pipeline(clock: FakeClock) -> None:
    fallback = rs.Fallback("cached", on=rs.BulkheadFull, name="fb")
    retry = rs.Retry(attempts=2, backoff=rs.Backoff(0.0, 0.0, jitter="none"), name="rt")
    timeout = rs.Timeout(1.0, name="to", clock=clock)
    bulkhead = rs.Bulkhead(1, name="bh")
    breaker = rs.CircuitBreaker(unique("metrics"), clock=clock)
    policy = rs.pipeline(fallback, retry, breaker, timeout, bulkhead, name="p")
    registry = CollectorRegistry()
    Metrics(registry).watch(policy)

    assert policy.call(lambda: "ok") == "ok"
    with bulkhead:
        assert policy.call(lambda: "never") == "cached"
    text = generate_latest(registry).decode()
    for series in (
        'resilience_retry_calls_total{policy="rt"} 2.0',
        'resilience_retry_retries_total{policy="rt"} 1.0',
        'resilience_retry_attempts_total{policy="rt"} 3.0',
        'resilience_timeout_calls_total{policy="to"} 3.0',
        'resilience_timeout_expired_total{policy="to"} 0.0',
        'resilience_timeout_overruns_total{policy="to"} 0.0',
        'resilience_bulkhead_admitted_total{bulkhead="bh"} 2.0',
        'resilience_bulkhead_rejected_total{bulkhead="bh"} 2.0',
        'resilience_bulkhead_active{bulkhead="bh"} 0.0',
        'resilience_bulkhead_queue{bulkhead="bh"} 0.0',
        'resilience_bulkhead_max_concurrent{bulkhead="bh"} 1.0',
        'resilience_fallback_calls_total{policy="fb"} 2.0',
        'resilience_fallback_used_total{policy="fb"} 1.0',
        "resilience_breaker_state{",
    ):
        assert series in text, series


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, -1, math.nan, math.inf, True, "1", None, 10**9])
def test_timeout_rejects_nonsense(seconds: object) -> None:
    with pytest.raises(ValueError, match="seconds"):
        rs.Timeout(seconds)  # type: ignore[arg-type]


def test_timeout_rejects_a_bad_name_or_clock() -> None:
    with pytest.raises(ValueError, match="name"):
        rs.Timeout(1.0, name="")
    with pytest.raises(TypeError, match="clock"):
        rs.Timeout(1.0, clock=object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": -1}, "max_concurrent"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"max_concurrent": 1.5}, "max_concurrent"),
        ({"max_concurrent": "4"}, "max_concurrent"),
        ({"max_concurrent": 1, "max_wait": -1}, "max_wait"),
        ({"max_concurrent": 1, "max_wait": math.nan}, "max_wait"),
        ({"max_concurrent": 1, "max_wait": 1e308}, "max_wait"),
        ({"max_concurrent": 1, "max_wait": math.inf}, "max_wait"),
        ({"max_concurrent": 1, "max_wait": True}, "max_wait"),
        ({"max_concurrent": 1, "max_wait": "1"}, "max_wait"),
        ({"max_concurrent": 1, "max_queue": -1}, "max_queue"),
        ({"max_concurrent": 1, "max_queue": True}, "max_queue"),
        ({"max_concurrent": 1, "max_queue": 1.5}, "max_queue"),
        ({"max_concurrent": 1, "name": ""}, "name"),
    ],
)
def test_bulkhead_rejects_nonsense(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises((TypeError, ValueError), match=field):
        rs.Bulkhead(**kwargs)


@pytest.mark.parametrize("on", [42, (), [ValueError], ValueError(), (ValueError, 42), int])
def test_fallback_rejects_nonsense(on: object) -> None:
    with pytest.raises(TypeError, match="on"):
        rs.Fallback("x", on=on)


def test_fallback_rejects_a_bad_name() -> None:
    with pytest.raises(ValueError, match="name"):
        rs.Fallback("x", name="")


class SomeClass:
    def call(self) -> None: ...

    def acall(self) -> None: ...


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        ((), ValueError, "policies"),
        ((42,), TypeError, "policies: member 1"),
        ((rs.Timeout(1.0), "retry"), TypeError, "policies: member 2"),
        ((SomeClass,), TypeError, "class SomeClass"),
        ((rs.Retry,), TypeError, r"Retry\(\.\.\.\)"),
    ],
)
def test_pipeline_rejects_nonsense(
    members: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        rs.pipeline(*members)


def test_pipeline_rejects_a_bad_name() -> None:
    with pytest.raises(ValueError, match="name"):
        rs.pipeline(rs.Timeout(1.0), name=42)  # type: ignore[arg-type]


def test_pipeline_member_that_is_not_a_decorator() -> None:
    policy = rs.pipeline(lambda fn: None)
    with pytest.raises(TypeError, match="not a decorator"):
        policy(lambda: 1)


def test_policies_refuse_what_they_cannot_decorate() -> None:
    def gen() -> Iterator[int]:
        yield 1

    for policy in (rs.Timeout(1.0), rs.Bulkhead(1), rs.Fallback(0), rs.pipeline(rs.Bulkhead(1))):
        with pytest.raises(TypeError, match="generator"):
            policy(gen)
        with pytest.raises(TypeError, match="callables"):
            policy(42)  # type: ignore[call-overload]


async def test_a_timeout_outside_the_breaker_counts_as_its_failure(anyio_backend: str) -> None:
    # pipeline(timeout, breaker): the breaker sees the cancellation, not TimeoutExceeded,
    # and must still tell the deadline from a caller that went away, on both backends.
    breaker = rs.CircuitBreaker(f"outside-{anyio_backend}", failure_threshold=2)
    policy = rs.pipeline(rs.Timeout(0.02), breaker)

    @policy
    async def hangs() -> None:
        await anyio.sleep(10)

    for _ in range(2):
        with pytest.raises(rs.TimeoutExceeded):
            await hangs()
    assert breaker.state is rs.CircuitState.OPEN
