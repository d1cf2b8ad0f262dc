"""CircuitBreaker as users meet it: decorators, context managers, permits, listeners."""

from __future__ import annotations

import gc
import inspect
import logging
import threading
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import resilience as rs
from resilience.testing import FakeClock, disabled

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


class NotFound(Exception):
    pass


def make(clock: FakeClock, **kw: Any) -> rs.CircuitBreaker:
    kw.setdefault("failure_threshold", 2)
    kw.setdefault("recovery_timeout", 10.0)
    kw.setdefault("success_threshold", 1)
    return rs.CircuitBreaker("t", clock=clock, **kw)


def fail_sync(b: rs.CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            b.call(_raise)


def _raise() -> None:
    raise Boom


# -- call shapes -------------------------------------------------------------------------


def test_sync_function_keeps_signature_and_trips(clock: FakeClock) -> None:
    b = make(clock)

    @b
    def div(a: int, b_: int = 1) -> float:
        """Divide."""
        return a / b_

    assert div.__name__ == "div"
    assert div.__doc__ == "Divide."
    assert str(inspect.signature(div)) == "(a: 'int', b_: 'int' = 1) -> 'float'"
    assert div(6, b_=3) == 2
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            div(1, 0)
    with pytest.raises(rs.CircuitOpenError) as info:
        div(1)
    assert (info.value.name, info.value.retry_after) == ("t", 10.0)
    clock.advance(10.0)
    assert div(4, 2) == 2
    assert b.state is rs.CircuitState.CLOSED


async def test_async_function_stays_a_coroutine_function(clock: FakeClock) -> None:
    b = make(clock)

    @b
    async def fetch(x: int) -> int:
        if x < 0:
            raise Boom
        await anyio.lowlevel.checkpoint()
        return x * 2

    assert inspect.iscoroutinefunction(fetch)
    assert await fetch(2) == 4
    for _ in range(2):
        with pytest.raises(Boom):
            await fetch(-1)
    with pytest.raises(rs.CircuitOpenError):
        await fetch(1)


async def test_methods_classmethods_and_staticmethods(clock: FakeClock) -> None:
    b = make(clock)

    class Client:
        factor = 3

        def __init__(self) -> None:
            self.calls = 0

        @b
        def get(self, x: int) -> int:
            self.calls += 1
            return x * self.factor

        @b
        async def aget(self, x: int) -> int:
            return x + self.factor

        @classmethod
        @b
        def cm_inner(cls, x: int) -> int:
            return x * cls.factor

        @b  # the breaker outside classmethod works too
        @classmethod
        def cm_outer(cls, x: int) -> int:
            return x - cls.factor

        @b
        @staticmethod
        def sm(x: int) -> int:
            return -x

    c = Client()
    assert c.get(2) == 6
    assert c.calls == 1
    assert await c.aget(2) == 5
    assert Client.cm_inner(2) == 6
    assert Client.cm_outer(5) == 2
    assert Client.sm(4) == -4
    assert c.sm(4) == -4
    assert inspect.iscoroutinefunction(c.aget)


def test_generator_failure_during_iteration_counts(clock: FakeClock) -> None:
    b = make(clock)

    @b
    def rows(n: int, fail_at: int | None = None) -> Iterator[int]:
        for i in range(n):
            if i == fail_at:
                raise Boom
            yield i

    assert inspect.isgeneratorfunction(rows)
    assert list(rows(3)) == [0, 1, 2]
    gen = rows(10)
    assert next(gen) == 0
    gen.close()  # the consumer stopping early is not a failure
    assert b.stats().consecutive_failures == 0
    for _ in range(2):
        with pytest.raises(Boom):
            list(rows(5, fail_at=2))
    assert b.state is rs.CircuitState.OPEN
    with pytest.raises(rs.CircuitOpenError):
        next(rows(1))


async def test_async_generator_failure_during_iteration_counts(clock: FakeClock) -> None:
    b = make(clock)

    @b
    async def stream(n: int, fail_at: int | None = None) -> AsyncIterator[int]:
        for i in range(n):
            if i == fail_at:
                raise Boom
            yield i

    assert inspect.isasyncgenfunction(stream)
    assert [x async for x in stream(3)] == [0, 1, 2]
    agen = stream(10)
    assert await agen.__anext__() == 0
    await agen.aclose()
    assert b.stats().consecutive_failures == 0
    for _ in range(2):
        with pytest.raises(Boom):
            [x async for x in stream(5, fail_at=1)]
    with pytest.raises(rs.CircuitOpenError):
        await stream(1).__anext__()


async def test_async_generator_delegates_asend_and_athrow(clock: FakeClock) -> None:
    b = make(clock)

    @b
    async def echo() -> AsyncGenerator[str, str | None]:
        received: str | None = "start"
        while True:
            try:
                received = yield f"got {received}"
            except KeyError:
                received = "recovered"

    agen = echo()
    assert await agen.asend(None) == "got start"
    assert await agen.asend("a") == "got a"
    assert await agen.athrow(KeyError()) == "got recovered"
    await agen.aclose()
    assert b.stats().consecutive_failures == 0


async def test_callable_object_with_async_call(clock: FakeClock) -> None:
    b = make(clock)

    class Handler:
        async def __call__(self, x: int) -> int:
            return x + 1

    wrapped = b(Handler())
    assert inspect.iscoroutinefunction(wrapped)
    assert await wrapped(1) == 2


def test_call_and_context_manager(clock: FakeClock) -> None:
    b = make(clock)
    assert b.call(lambda x: x + 1, 1) == 2
    with b:
        pass
    for _ in range(2):
        with pytest.raises(Boom), b:
            raise Boom
    with pytest.raises(rs.CircuitOpenError), b:
        pytest.fail("must not run while open")


async def test_acall_and_async_context_manager(clock: FakeClock) -> None:
    b = make(clock)

    async def plus(x: int) -> int:
        return x + 1

    assert await b.acall(plus, 1) == 2
    async with b:
        pass
    for _ in range(2):
        with pytest.raises(Boom):
            async with b:
                raise Boom
    with pytest.raises(rs.CircuitOpenError):
        async with b:
            pytest.fail("must not run while open")


def test_context_manager_permits_are_per_thread(clock: FakeClock) -> None:
    b = make(clock, failure_threshold=100)
    inside = threading.Barrier(16, timeout=5)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with b:
                inside.wait()  # all 16 are inside `with b` at once
                if i % 2:
                    raise Boom
        except Boom:
            pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert b.stats().consecutive_failures <= 8


# -- outcomes ------------------------------------------------------------------------------


def test_exclude_and_include_filters(clock: FakeClock) -> None:
    b = make(clock, exclude=[NotFound], include=(Boom, NotFound))
    for _ in range(5):
        with pytest.raises(NotFound):
            b.call(_raise_not_found)
    with pytest.raises(KeyError):  # not included: passes through, not counted
        b.call(_raise_key_error)
    assert b.stats().consecutive_failures == 0
    fail_sync(b, 2)
    assert b.state is rs.CircuitState.OPEN


def _raise_not_found() -> None:
    raise NotFound


def _raise_key_error() -> None:
    raise KeyError("k")


async def test_fail_on_result_counts_returned_values(clock: FakeClock) -> None:
    b = make(clock, fail_on_result=lambda status: status >= 500)

    @b
    def sync_status(code: int) -> int:
        return code

    @b
    async def async_status(code: int) -> int:
        return code

    assert sync_status(200) == 200
    assert sync_status(503) == 503
    assert await async_status(500) == 500
    assert b.state is rs.CircuitState.OPEN


def test_permit_api(clock: FakeClock) -> None:
    b = make(clock)
    permit = b.try_acquire()
    assert permit is not None
    permit.failure(Boom())
    permit.success()  # a second report is ignored
    assert b.stats().consecutive_failures == 1
    p2 = b.try_acquire()
    assert p2 is not None
    p2.failure()
    assert b.try_acquire() is None
    clock.advance(10.0)
    probe = b.try_acquire()
    assert probe is not None
    assert b.try_acquire() is None  # one probe at a time
    probe.ignore()
    probe2 = b.try_acquire()
    assert probe2 is not None
    probe2.success()
    assert b.state is rs.CircuitState.CLOSED


async def test_async_permit_api(clock: FakeClock) -> None:
    b = make(clock)
    for _ in range(2):
        permit = await b.atry_acquire()
        assert permit is not None
        await permit.afailure(Boom())
    assert await b.atry_acquire() is None
    clock.advance(10.0)
    probe = await b.atry_acquire()
    assert probe is not None
    await probe.aignore()
    probe = await b.atry_acquire()
    assert probe is not None
    await probe.asuccess()
    assert b.state is rs.CircuitState.CLOSED


# -- operators, stats, errors -----------------------------------------------------------


def test_operator_controls_and_stats(clock: FakeClock) -> None:
    b = make(clock)
    b.force_open()
    assert (b.state, b.mode) == (rs.CircuitState.OPEN, rs.BreakerMode.FORCED_OPEN)
    clock.advance(1000)
    with pytest.raises(rs.CircuitOpenError) as info:
        b.call(int)
    assert info.value.retry_after == 10.0
    assert b.stats().rejected == 1
    b.force_closed()
    fail_sync(b, 5)
    assert b.state is rs.CircuitState.CLOSED
    b.disable()
    fail_sync(b, 5)
    stats = b.stats()
    assert (stats.state, stats.consecutive_failures) == (rs.CircuitState.CLOSED, 5)
    b.reset()
    fail_sync(b, 2)
    assert b.retry_after == 10.0
    clock.advance(4)
    assert b.retry_after == 6.0
    assert b.stats().trips == 1


def test_integer_timeouts_are_accepted(clock: FakeClock) -> None:
    b = rs.CircuitBreaker("ints", recovery_timeout=30, probe_lease=5, clock=clock)
    b.force_open()
    with pytest.raises(rs.CircuitOpenError) as info:
        b.call(int)
    assert info.value.retry_after == 30.0
    assert b.try_acquire() is None


def test_rejections_raise_fresh_errors_and_do_not_grow_memory(clock: FakeClock) -> None:
    b = make(clock)
    b.force_open()

    def reject() -> rs.CircuitOpenError:
        try:
            b.call(int)
        except rs.CircuitOpenError as e:
            return e
        raise AssertionError("not rejected")

    first, second = reject(), reject()
    assert first is not second
    depth = len(_frames(first))
    for _ in range(100):
        reject()
    assert len(_frames(reject())) == depth  # tracebacks do not pile up

    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(2_000):
            reject()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            reject()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16_384, f"20k rejections grew memory by {grown} bytes"


def _frames(e: BaseException) -> list[object]:
    tb, frames = e.__traceback__, list[object]()
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": [ValueError, "x"]}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"fail_on_result": 5}, "fail_on_result"),
        ({"clock": object()}, "clock"),
        ({"listeners": [1]}, "listener"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"half_open_max_calls": -1}, "half_open_max_calls"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        rs.CircuitBreaker("x", **kwargs)


def test_decorating_a_non_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="callables"):
        rs.CircuitBreaker("x")(42)  # type: ignore[call-overload]


def test_rate_rule_replaces_the_default_consecutive_count(clock: FakeClock) -> None:
    b = make(
        clock,
        failure_threshold=rs.breaker.breaker._UNSET,
        failure_rate=rs.FailureRate(0.5, window=20, minimum_calls=20),
    )
    fail_sync(b, 10)
    assert b.state is rs.CircuitState.CLOSED  # 10 straight failures, but fewer than 20 calls


# -- listeners -----------------------------------------------------------------------------


def test_listeners_see_events_in_order_outside_the_lock(clock: FakeClock) -> None:
    seen: list[str] = []
    b = make(clock)

    def listener(event: rs.BreakerEvent) -> None:
        b.stats()  # would deadlock if listeners ran under the breaker's lock
        if isinstance(event, rs.StateChanged):
            seen.append(f"{event.old.value}->{event.new.value}")
        elif isinstance(event, rs.CallRejected):
            seen.append("rejected")
        else:
            seen.append(event.outcome.value)

    b.add_listener(listener)
    fail_sync(b, 2)
    with pytest.raises(rs.CircuitOpenError):
        b.call(int)
    clock.advance(10)
    b.call(int)
    assert seen == [
        "failure",
        "failure",
        "closed->open",
        "rejected",
        "open->half_open",
        "success",
        "half_open->closed",
    ]
    b.remove_listener(listener)
    b.call(int)
    assert len(seen) == 7


def test_a_failing_listener_is_logged_and_isolated(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    good: list[object] = []

    def bad(event: object) -> None:
        raise RuntimeError("listener bug")

    b = make(clock, listeners=[bad, good.append])
    with caplog.at_level(logging.ERROR, logger="resilience"):
        assert b.call(lambda: 7) == 7
    assert len(good) == 1
    assert "listener bug" in caplog.text


async def test_async_listeners_are_awaited_in_order(clock: FakeClock) -> None:
    seen: list[str] = []

    async def alistener(event: rs.BreakerEvent) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(type(event).__name__)

    b = make(clock, listeners=[alistener])

    async def boom() -> None:
        raise Boom

    for _ in range(2):
        with pytest.raises(Boom):
            await b.acall(boom)
    assert seen == ["CallFinished", "CallFinished", "StateChanged"]


async def test_listener_durations_use_the_clock(clock: FakeClock) -> None:
    durations: list[float | None] = []
    b = make(clock, listeners=[lambda e: durations.append(getattr(e, "duration", None))])

    async def slow() -> None:
        clock.advance(1.5)

    await b.acall(slow)
    assert durations == [1.5]


# -- guard -----------------------------------------------------------------------------------


class Producer:
    """A stand-in for a broker client the user already has."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.topic = "orders"
        self.down = False

    def send(self, msg: str) -> str:
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append(msg)
        return "ack"

    async def asend(self, msg: str) -> str:
        return self.send(msg)

    def flush(self) -> int:
        return len(self.sent)


async def test_guard_wraps_only_the_named_methods(clock: FakeClock) -> None:
    b = make(clock)
    producer = Producer()
    guarded = b.guard(producer, methods=["send", "asend"])
    assert isinstance(guarded, Producer)
    assert guarded.topic == "orders"
    guarded.topic = "payments"
    assert producer.topic == "payments"
    assert guarded.send("a") == "ack"
    assert await guarded.asend("b") == "ack"
    assert inspect.iscoroutinefunction(guarded.asend)
    producer.down = True
    for _ in range(2):
        with pytest.raises(ConnectionError):
            guarded.send("c")
    with pytest.raises(rs.CircuitOpenError):
        await guarded.asend("d")
    assert guarded.flush() == 2  # not guarded: still works while open
    assert producer.sent == ["a", "b"]


def test_guard_rejects_unknown_methods() -> None:
    b = rs.CircuitBreaker("g")
    with pytest.raises(ValueError, match="methods: Producer has no callable attribute 'nope'"):
        b.guard(Producer(), methods=["nope"])
    with pytest.raises(ValueError, match="methods"):
        b.guard(Producer(), methods=[])


# -- testing helpers ---------------------------------------------------------------------------


def test_testing_disabled_switch(clock: FakeClock) -> None:
    b = make(clock)
    b.force_open()
    normal = make(clock)
    with disabled():
        assert b.call(lambda: 1) == 1
        fail_sync(normal, 5)
        late = rs.CircuitBreaker("late", failure_threshold=1)
        fail_sync(late, 3)
        assert late.state is rs.CircuitState.CLOSED
    assert b.mode is rs.BreakerMode.FORCED_OPEN
    assert normal.mode is rs.BreakerMode.NORMAL
    fail_sync(late, 1)
    assert late.state.value == "open"


def test_fake_clock_rejects_going_backwards() -> None:
    with pytest.raises(ValueError, match="seconds"):
        FakeClock().advance(-1)
