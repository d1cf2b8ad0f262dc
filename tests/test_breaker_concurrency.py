"""Many threads and tasks on one breaker: half-open probing, lock scope, cancellation."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

import resilience as rs
from resilience.testing import FakeClock

pytestmark = pytest.mark.anyio

PROBES = 3


def half_open_breaker(clock: FakeClock, **kw: object) -> rs.CircuitBreaker:
    b = rs.CircuitBreaker(
        "conc",
        failure_threshold=1,
        recovery_timeout=5.0,
        half_open_max_calls=PROBES,
        success_threshold=PROBES,
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    clock.advance(5.0)
    return b


def run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_half_open_admits_exactly_max_calls_across_64_threads(clock: FakeClock) -> None:
    b = half_open_breaker(clock)
    n = 64
    start = threading.Barrier(n, timeout=5)
    release = threading.Event()
    admitted: list[int] = []
    rejected: list[int] = []
    lock = threading.Lock()

    @b
    def probe(i: int) -> None:
        with lock:
            admitted.append(i)
        assert release.wait(timeout=5)

    def worker(i: int) -> None:
        start.wait()
        try:
            probe(i)
        except rs.CircuitOpenError:
            with lock:
                rejected.append(i)
            if len(rejected) == n - PROBES:
                release.set()  # every other caller was turned away at once, not queued

    run_threads(n, worker)
    assert len(admitted) == PROBES
    assert len(rejected) == n - PROBES
    assert b.state is rs.CircuitState.CLOSED  # the PROBES probes all succeeded


async def test_half_open_admits_exactly_max_calls_across_600_tasks(clock: FakeClock) -> None:
    b = half_open_breaker(clock)
    n = 600
    release = anyio.Event()
    admitted = rejected = 0

    @b
    async def probe() -> None:
        nonlocal admitted
        admitted += 1
        await release.wait()

    async def worker() -> None:
        nonlocal rejected
        try:
            await probe()
        except rs.CircuitOpenError:
            rejected += 1
            if rejected == n - PROBES:
                release.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(worker)
    assert (admitted, rejected) == (PROBES, n - PROBES)
    assert b.state is rs.CircuitState.CLOSED


async def test_threads_and_tasks_share_the_probe_slots(clock: FakeClock) -> None:
    b = half_open_breaker(clock)
    n_threads, n_tasks = 32, 300
    lock = threading.Lock()
    counts = {"admitted": 0, "rejected": 0}
    all_done = threading.Event()
    release = threading.Event()

    def note(key: str) -> None:
        with lock:
            counts[key] += 1
            if counts["rejected"] == n_threads + n_tasks - PROBES:
                release.set()
            if counts["admitted"] + counts["rejected"] == n_threads + n_tasks:
                all_done.set()

    @b
    def sync_probe() -> None:
        note("admitted")
        assert release.wait(timeout=5)

    @b
    async def async_probe() -> None:
        note("admitted")
        assert await anyio.to_thread.run_sync(release.wait, 5)

    start = threading.Barrier(n_threads + 1, timeout=5)

    def thread_worker(_: int) -> None:
        start.wait()
        try:
            sync_probe()
        except rs.CircuitOpenError:
            note("rejected")

    async def task_worker() -> None:
        try:
            await async_probe()
        except rs.CircuitOpenError:
            note("rejected")

    threads = [threading.Thread(target=thread_worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await anyio.to_thread.run_sync(start.wait)
            for _ in range(n_tasks):
                tg.start_soon(task_worker)
    for t in threads:
        t.join(timeout=10)
    assert all_done.is_set()
    assert counts == {"admitted": PROBES, "rejected": n_threads + n_tasks - PROBES}


def test_the_lock_is_never_held_across_the_call() -> None:
    # If one lock were held across calls (pybreaker), 8 callers could never all be inside.
    b = rs.CircuitBreaker("lockscope", failure_threshold=100)
    inside = threading.Barrier(8, timeout=5)

    @b
    def call() -> None:
        inside.wait()

    run_threads(8, lambda _: call())
    assert b.stats().consecutive_failures == 0

    # The same holds on the slow path (listeners make every call take the lock twice).
    b.add_listener(lambda e: None)
    inside.reset()
    run_threads(8, lambda _: call())


async def test_tasks_run_concurrently_inside_the_breaker() -> None:
    b = rs.CircuitBreaker("tasks", listeners=[lambda e: None])
    inside = 0
    everyone_in = anyio.Event()

    @b
    async def call() -> None:
        nonlocal inside
        inside += 1
        if inside == 200:
            everyone_in.set()
        await everyone_in.wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)


# -- cancellation and timeouts -----------------------------------------------------------


async def test_caller_cancellation_is_ignored_and_frees_the_probe(clock: FakeClock) -> None:
    b = half_open_breaker(clock)
    started = anyio.Event()

    @b
    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    for _ in range(PROBES):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            await started.wait()
            started = anyio.Event()
            tg.cancel_scope.cancel()
    stats = b.stats()
    assert stats.state is rs.CircuitState.HALF_OPEN
    assert (stats.probes_in_flight, stats.half_open_successes) == (0, 0)
    await b.acall(anyio.sleep, 0)  # slots are free again


async def test_a_deadline_outside_the_call_is_a_failure(clock: FakeClock) -> None:
    b = rs.CircuitBreaker("deadline", failure_threshold=2, clock=clock)

    @b
    async def slow() -> None:
        await anyio.sleep(10)

    for _ in range(2):
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.01):
                await slow()
    assert b.state is rs.CircuitState.OPEN


async def test_timeout_inside_the_call_is_a_failure(clock: FakeClock) -> None:
    b = rs.CircuitBreaker("inner-timeout", failure_threshold=2, clock=clock)

    @b
    async def with_own_timeout() -> None:
        with anyio.fail_after(0.01):
            await anyio.sleep(10)

    for _ in range(2):
        with pytest.raises(TimeoutError):
            await with_own_timeout()
    assert b.state is rs.CircuitState.OPEN


async def test_move_on_after_cancels_only_the_call_and_counts_it(clock: FakeClock) -> None:
    b = rs.CircuitBreaker("move-on", failure_threshold=1, clock=clock)
    with anyio.move_on_after(0.01):
        await b.acall(anyio.sleep, 10)
    assert b.state is rs.CircuitState.OPEN


def test_probe_lease_reclaims_a_hung_thread(clock: FakeClock) -> None:
    b = half_open_breaker(clock, probe_lease=2.0)
    hung = [b.try_acquire() for _ in range(PROBES)]
    assert all(p is not None for p in hung)
    assert b.try_acquire() is None
    clock.advance(2.0)
    fresh = b.try_acquire()
    assert fresh is not None
    for p in hung:
        assert p is not None
        p.failure()  # late: the lease ran out, so it cannot reopen the breaker
    assert b.state is rs.CircuitState.HALF_OPEN
