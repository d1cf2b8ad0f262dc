"""Issue 13, what users of the peers expect of breakers: a registry of live breakers by
name, a manual half_open(), and force_open(duration=...) that ends in probing.

Time moves on a FakeClock only. Names are unique per test: the registry is the process's
own, and other tests keep breakers of their own alive.
"""

from __future__ import annotations

import gc
import math
import threading
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis

import resilience as rs
from resilience.breaker.store import FORCE_GRACE
from resilience.testing import FakeClock, disabled

pytestmark = pytest.mark.anyio

C, O, H = rs.CircuitState.CLOSED, rs.CircuitState.OPEN, rs.CircuitState.HALF_OPEN  # noqa: E741
NORMAL, FORCED_OPEN = rs.BreakerMode.NORMAL, rs.BreakerMode.FORCED_OPEN


class Boom(Exception):
    pass


def uniq(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:10]}"


def make(clock: FakeClock, name: str | None = None, **kw: Any) -> rs.CircuitBreaker:
    kw.setdefault("failure_threshold", 2)
    kw.setdefault("recovery_timeout", 10.0)
    kw.setdefault("success_threshold", 2)
    return rs.CircuitBreaker(name or uniq("t"), clock=clock, **kw)


def boom() -> None:
    raise Boom


def trip(b: rs.CircuitBreaker) -> None:
    while b.state is not O:
        with pytest.raises(Boom):
            b.call(boom)


def rejected(b: rs.CircuitBreaker) -> rs.CircuitOpenError:
    with pytest.raises(rs.CircuitOpenError) as info:
        b.call(int)
    return info.value


def changes(events: list[rs.BreakerEvent]) -> list[tuple[str, str, str, str]]:
    return [
        (e.old.value, e.new.value, e.trigger.value, e.mode.value)
        for e in events
        if isinstance(e, rs.StateChanged)
    ]


def mine(tag: str) -> list[rs.CircuitBreaker]:
    return [b for b in rs.breakers() if b.name.startswith(tag)]


# -- the registry ------------------------------------------------------------------------


def test_breakers_lists_the_live_ones_sorted_by_name() -> None:
    tag = uniq("list")
    zeta = rs.CircuitBreaker(f"{tag}-zeta")
    alpha = rs.CircuitBreaker(f"{tag}-alpha")
    twin_1 = rs.CircuitBreaker(f"{tag}-mid")
    twin_2 = rs.CircuitBreaker(f"{tag}-mid")  # same name: allowed, both listed
    listed = mine(tag)
    assert listed == [alpha, twin_1, twin_2, zeta]  # same names in the order made
    assert (listed[1], listed[2]) == (twin_1, twin_2)
    assert listed[1] is twin_1
    assert all(isinstance(b, rs.CircuitBreaker) for b in rs.breakers())
    listed.clear()  # a fresh list per call: changing it changes nothing
    assert len(mine(tag)) == 4


def test_get_breaker_finds_one_by_name_and_operates_it() -> None:
    name = uniq("lookup")

    @rs.CircuitBreaker(name)
    def ping() -> str:
        return "pong"

    # Only the decorated function holds the breaker, and the registry finds it.
    b = rs.get_breaker(name)
    assert b.name == name
    b.force_open()
    with pytest.raises(rs.CircuitOpenError):
        ping()
    rs.get_breaker(name).reset()
    assert ping() == "pong"


def test_get_breaker_names_the_live_breakers_when_missing() -> None:
    tag = uniq("missing")
    known = [rs.CircuitBreaker(f"{tag}-a"), rs.CircuitBreaker(f"{tag}-b")]
    with pytest.raises(KeyError) as info:
        rs.get_breaker(f"{tag}-c")
    message = str(info.value)
    assert f"no live breaker named '{tag}-c'" in message
    if len({b.name for b in rs.breakers()}) <= 20:
        assert f"'{tag}-a', '{tag}-b'" in message
    assert len(known) == 2


def test_get_breaker_shortens_a_long_list_of_names() -> None:
    tag = uniq("many")
    keep = [rs.CircuitBreaker(f"{tag}-{i:02}") for i in range(25)]
    with pytest.raises(KeyError) as info:
        rs.get_breaker(f"{tag}-nope")
    message = str(info.value)
    assert message.count("', '") == 19  # twenty names shown
    total = len({b.name for b in rs.breakers()})
    assert f"and {total - 20} more" in message
    assert len(keep) == 25


def test_get_breaker_refuses_to_guess_between_breakers_of_one_name() -> None:
    name = uniq("twin")
    first = rs.CircuitBreaker(name)
    second = rs.CircuitBreaker(name)
    with pytest.raises(LookupError, match=rf"2 live breakers are named '{name}'") as info:
        rs.get_breaker(name)
    assert not isinstance(info.value, KeyError)  # not "missing": there are two
    del second, info  # the traceback's frames hold both
    gc.collect()
    assert rs.get_breaker(name) is first  # one left: found again


@pytest.mark.parametrize("bad", [None, 3, b"name", ["x"]])
def test_get_breaker_wants_a_string(bad: Any) -> None:
    with pytest.raises(TypeError, match="name must be a str"):
        rs.get_breaker(bad)


def test_collected_breakers_vanish_from_the_registry() -> None:
    name = uniq("gone")
    b = rs.CircuitBreaker(name, failure_threshold=1)

    @b
    def work() -> int:
        return 1

    work()
    ref = weakref.ref(b)
    del b, work
    gc.collect()
    assert ref() is None
    assert mine(name) == []
    with pytest.raises(KeyError):
        rs.get_breaker(name)


def test_the_registry_is_thread_safe() -> None:
    tag = uniq("threads")
    workers, rounds = 8, 150
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []
    kept: list[list[rs.CircuitBreaker]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(rounds):
                b = rs.CircuitBreaker(f"{tag}-{i}-{j}")
                if j % 2 == 0:
                    kept[i].append(b)  # the odd ones become garbage at once
                assert b in rs.breakers()  # a snapshot while others add and drop
                assert rs.get_breaker(b.name) is b
                if j % 40 == 0:
                    gc.collect()  # collections in any thread, during others' reads
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert errors == []
    assert {b.name for b in mine(f"{tag}-")} == {b.name for ks in kept for b in ks}
    assert len(mine(f"{tag}-")) == workers * rounds // 2


# -- half_open() -------------------------------------------------------------------------


def test_half_open_from_open_probes_at_once(clock: FakeClock) -> None:
    events: list[rs.BreakerEvent] = []
    b = make(clock, half_open_max_calls=1, success_threshold=2)
    trip(b)
    b.add_listener(events.append, only=(rs.StateChanged,))
    b.half_open()  # long before recovery_timeout
    assert (b.state, b.mode, b.retry_after) == (H, NORMAL, 0.0)
    assert changes(events) == [("open", "half_open", "half_open", "normal")]
    assert isinstance(events[0], rs.StateChanged)
    assert events[0].at == clock.monotonic()

    probe = b.try_acquire()
    assert probe is not None
    error = rejected(b)  # half_open_max_calls=1: the one slot is taken
    assert (error.state, error.retry_after) == ("half_open", 0.0)
    probe.success()
    assert b.state is H  # one success of two
    assert b.call(lambda: 7) == 7
    assert b.state is C
    assert changes(events)[-1] == ("half_open", "closed", "probes_succeeded", "normal")


def test_one_failed_probe_after_half_open_reopens(clock: FakeClock) -> None:
    b = make(clock, recovery_timeout=10.0)
    b.half_open()  # from closed: probing a healthy-looking breaker on purpose
    assert b.state is H
    with pytest.raises(Boom):
        b.call(boom)
    assert b.state is O
    assert rejected(b).retry_after == 10.0  # a normal trip: recovery_timeout from now
    clock.advance(10.0)
    assert b.state is H  # and the normal state machine carries on


def test_calls_started_before_half_open_do_not_count_as_probes(clock: FakeClock) -> None:
    b = make(clock, success_threshold=1)
    early = b.try_acquire()  # admitted while closed
    assert early is not None
    b.half_open()
    early.failure(Boom())  # from the generation before: ignored
    assert b.state is H
    b.call(int)
    assert b.state is C


@pytest.mark.parametrize("operator", ["force_open", "force_closed", "disable"])
def test_half_open_ends_every_operator_mode(clock: FakeClock, operator: str) -> None:
    b = make(clock, success_threshold=1)
    getattr(b, operator)()
    b.half_open()
    assert (b.state, b.mode) == (H, NORMAL)
    with pytest.raises(Boom):
        b.call(boom)
    assert (b.state, b.mode) == (O, NORMAL)


def test_half_open_leaves_the_lock_free_paths(clock: FakeClock) -> None:
    b = make(clock, half_open_max_calls=1, success_threshold=2)

    @b
    def ok() -> int:
        return 1

    assert ok() == 1  # closed and quiet: the decorator's lock-free path
    b.half_open()
    held = b.try_acquire()
    assert held is not None
    with pytest.raises(rs.CircuitOpenError):
        ok()  # the decorator now asks the policy: no slot free
    held.ignore()
    assert ok() == 1
    assert b.stats().half_open_successes == 1
    assert ok() == 1
    assert b.state is C

    trip(b)  # open and unobserved: rejections decided lock-free from one float
    assert rejected(b).retry_after == 10.0
    b.half_open()
    assert ok() == 1  # the stale rejection deadline is gone with the transition


def test_half_open_twice_restarts_probing(clock: FakeClock) -> None:
    b = make(clock, half_open_max_calls=1, success_threshold=2)
    b.half_open()
    b.call(int)
    assert b.stats().half_open_successes == 1
    held = b.try_acquire()
    assert held is not None
    b.half_open()  # half-open to half-open: a new generation, counts cleared
    assert b.stats().half_open_successes == 0
    assert b.stats().probes_in_flight == 0
    held.success()  # from the old generation: does not count
    assert b.stats().half_open_successes == 0


async def test_half_open_async_probes(clock: FakeClock) -> None:
    b = make(clock, half_open_max_calls=1, success_threshold=2)
    entered, release = anyio.Event(), anyio.Event()

    @b
    async def slow() -> int:
        entered.set()
        await release.wait()
        return 2

    @b
    async def quick() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    assert await quick() == 1
    b.half_open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await entered.wait()  # the one probe slot is held by slow()
        with pytest.raises(rs.CircuitOpenError) as info:
            await quick()
        assert info.value.state == "half_open"
        release.set()
    assert b.state is H
    assert await b.acall(quick) == 1
    assert b.state is C

    b.half_open()
    with pytest.raises(Boom):
        async with b:
            raise Boom
    assert b.state is O


# -- force_open(duration=...) ------------------------------------------------------------


def test_timed_force_open_counts_down_then_probes(clock: FakeClock) -> None:
    events: list[rs.BreakerEvent] = []
    b = make(clock, recovery_timeout=10.0, success_threshold=1)
    b.add_listener(events.append, only=(rs.StateChanged,))

    @b
    def ok() -> int:
        return 1

    b.force_open(duration=30.0)
    assert (b.state, b.mode) == (O, FORCED_OPEN)
    with pytest.raises(rs.CircuitOpenError) as info:
        ok()  # the decorator's path
    assert info.value.retry_after == 30.0  # the time left, not recovery_timeout
    clock.advance(12.5)
    assert rejected(b).retry_after == 17.5
    assert b.try_acquire() is None
    assert b.retry_after == 17.5
    assert b.stats().retry_after == 17.5
    clock.advance(17.5)
    # Time is up: half-open under the normal state machine, even before any call.
    assert (b.mode, b.state) == (NORMAL, H)
    assert ok() == 1
    assert b.state is C
    assert changes(events) == [
        ("closed", "open", "force_open", "forced_open"),
        ("open", "half_open", "recovery_elapsed", "normal"),
        ("half_open", "closed", "probes_succeeded", "normal"),
    ]


def test_a_failed_probe_after_a_timed_force_opens_normally(clock: FakeClock) -> None:
    b = make(clock, recovery_timeout=10.0)
    b.force_open(duration=5)
    clock.advance(5)
    with pytest.raises(Boom):
        b.call(boom)  # the first call after the force is a probe
    assert (b.state, b.mode) == (O, NORMAL)
    assert rejected(b).retry_after == 10.0
    clock.advance(10)
    assert b.state is H


def test_timed_force_open_while_observed(clock: FakeClock) -> None:
    events: list[rs.BreakerEvent] = []
    b = make(clock, listeners=[events.append])  # CallRejected wanted: the locked path
    b.force_open(duration=4.0)
    clock.advance(1.0)
    assert rejected(b).retry_after == 3.0
    assert [(e.state, e.retry_after) for e in events if isinstance(e, rs.CallRejected)] == [
        (O, 3.0)
    ]
    clock.advance(3.0)
    assert b.call(int) == 0
    assert b.state is H


def test_untimed_force_open_is_unchanged(clock: FakeClock) -> None:
    b = make(clock, recovery_timeout=10.0)
    b.force_open()
    clock.advance(1e6)
    assert (b.state, b.mode) == (O, FORCED_OPEN)
    assert rejected(b).retry_after == 10.0  # no real time to give: one recovery period
    assert b.retry_after == 10.0


def test_operators_override_a_timed_force_open(clock: FakeClock) -> None:
    b = make(clock)
    b.force_open(duration=5)
    b.force_open()  # untimed wins: never ends
    clock.advance(100)
    assert b.mode is FORCED_OPEN
    b.force_open(duration=2)  # and timed again
    clock.advance(2)
    assert (b.state, b.mode) == (H, NORMAL)

    b.force_open(duration=5)
    b.force_closed()
    clock.advance(10)
    assert (b.state, b.mode) == (C, rs.BreakerMode.FORCED_CLOSED)

    b.force_open(duration=5)
    b.half_open()
    assert (b.state, b.mode) == (H, NORMAL)
    b.force_open(duration=5)
    b.reset()
    clock.advance(10)
    assert (b.state, b.mode) == (C, NORMAL)


@pytest.mark.parametrize("bad", [0, 0.0, -1, math.nan, math.inf, -math.inf, True, "5", [5]])
def test_force_open_duration_must_be_positive_finite_seconds(clock: FakeClock, bad: Any) -> None:
    b = make(clock)
    with pytest.raises(ValueError, match="duration must be a positive number of seconds"):
        b.force_open(duration=bad)
    assert (b.state, b.mode) == (C, NORMAL)  # nothing happened


async def test_timed_force_open_async(clock: FakeClock) -> None:
    b = make(clock, success_threshold=1)

    @b
    async def ok() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    b.force_open(duration=8)
    clock.advance(3)
    with pytest.raises(rs.CircuitOpenError) as info:
        await ok()
    assert info.value.retry_after == 5.0
    with pytest.raises(rs.CircuitOpenError):
        await b.acall(ok)
    assert await b.atry_acquire() is None
    clock.advance(5)
    assert await ok() == 1
    assert (b.state, b.mode) == (C, NORMAL)


def test_disabled_restores_a_timed_force_open_with_its_time_left(clock: FakeClock) -> None:
    b = make(clock)
    b.force_open(duration=10)
    short = make(clock)
    short.force_open(duration=1)
    with disabled():
        assert b.call(lambda: 1) == 1
        clock.advance(4)
    assert b.mode is FORCED_OPEN
    assert b.retry_after == 6.0
    assert (short.state, short.mode) == (H, NORMAL)  # its time ran out in the block
    clock.advance(6)
    assert (b.state, b.mode) == (H, NORMAL)


# -- with a RedisBreakerStore ------------------------------------------------------------


@pytest.fixture
def store(redis_client: redis.Redis, redis_prefix: str) -> Iterator[rs.RedisBreakerStore]:
    # A long interval: the tests call sync() themselves (the thread takes turns with it).
    s = rs.RedisBreakerStore(redis_client, prefix=f"{redis_prefix}:breaker", interval=30.0)
    yield s
    s.close()


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.redis
def test_a_timed_override_forces_every_instance_then_they_probe(
    store: rs.RedisBreakerStore, clock: FakeClock, redis_client: redis.Redis
) -> None:
    name = uniq("pay")
    b = make(clock, name, success_threshold=1, store=store)
    store.force(name, "open", duration=30)
    store.sync()
    assert (b.state, b.mode) == (O, FORCED_OPEN)
    assert 29.0 < rejected(b).retry_after <= 30.0  # the time left on Redis' clock
    ttl = redis_client.pttl(store.force_key(name))
    assert 30_000 < ttl <= (30 + FORCE_GRACE) * 1000  # outlives the end
    [row] = [r for r in store.states() if r["name"] == name]
    assert row["force"] == "open"
    assert 29.0 < float(row["force_until"]) - _redis_now(redis_client) <= 30.0
    assert row["mode"] == "forced_open"
    assert 29.0 < float(row["retry_after"]) <= 30.0

    # Another instance starting meanwhile joins in for the time left.
    other = rs.RedisBreakerStore(redis_client, prefix=store.prefix, interval=30.0)
    try:
        late = make(clock, name, store=other)
        other.sync()
        assert late.mode is FORCED_OPEN
        assert 29.0 < late.retry_after <= 30.0
    finally:
        other.close()
    # So does a breaker made again under this store.
    again = make(clock, name, success_threshold=1, store=store)
    store.sync()
    assert again.mode is FORCED_OPEN
    assert 29.0 < again.retry_after <= 30.0
    b = again

    clock.advance(30)
    assert (b.state, b.mode) == (H, NORMAL)
    store.sync()  # the override in Redis has not changed: not applied again
    assert b.state is H
    b.call(int)
    assert b.state is C
    store.sync()
    assert redis_client.hget(store.state_key(name), "state") == b"closed"


@pytest.mark.redis
def test_lifting_a_timed_override_early_resets(
    store: rs.RedisBreakerStore, clock: FakeClock
) -> None:
    b = make(clock, store=store)
    store.force(b.name, "open", duration=60)
    store.sync()
    assert b.mode is FORCED_OPEN
    store.force(b.name, None)
    store.sync()
    assert (b.state, b.mode) == (C, NORMAL)


@pytest.mark.redis
def test_a_timed_override_that_ended_leaves_the_breakers_to_their_clocks(
    store: rs.RedisBreakerStore, clock: FakeClock, redis_client: redis.Redis
) -> None:
    b = make(clock, store=store)
    store.force(b.name, "open", duration=60)
    store.sync()
    # Its end passes on Redis' clock (written here; tests do not wait a minute) while
    # this breaker's clock still has time left: the breaker ends it by itself, no reset.
    ended = int(_redis_now(redis_client) * 1000) - 1
    redis_client.set(store.force_key(b.name), f"open until {ended}", px=60_000)
    store.sync()
    assert b.mode is FORCED_OPEN
    assert [r.get("force") for r in store.states() if r["name"] == b.name] == [""]
    clock.advance(60)
    assert (b.state, b.mode) == (H, NORMAL)
    redis_client.delete(store.force_key(b.name))  # the grace ran out: nothing to lift
    store.sync()
    assert b.state is H


@pytest.mark.redis
def test_a_local_half_open_is_not_undone_by_a_standing_override(
    store: rs.RedisBreakerStore, clock: FakeClock, redis_client: redis.Redis
) -> None:
    b = make(clock, store=store)
    store.force(b.name, "open")
    store.sync()
    assert b.mode is FORCED_OPEN
    b.half_open()  # local: the store applies what changes in Redis, and this did not
    store.sync()
    assert (b.state, b.mode) == (H, NORMAL)
    assert redis_client.hget(store.state_key(b.name), "state") == b"half_open"
    store.force(b.name, "open", duration=5)  # a new override is applied again
    store.sync()
    assert b.mode is FORCED_OPEN


@pytest.mark.redis
@pytest.mark.parametrize(
    ("value", "duration", "match"),
    [
        ("closed", 5, "duration goes with value 'open' only"),
        (None, 5, "duration goes with value 'open' only"),
        ("open", 0, "duration must be a positive number"),
        ("open", True, "duration must be a positive number"),
        ("open", math.inf, "duration must be a positive number"),
        ("half_open", None, "value must be 'open', 'closed' or None"),
    ],
)
def test_store_force_checks_its_arguments(
    store: rs.RedisBreakerStore,
    redis_client: redis.Redis,
    value: Any,
    duration: Any,
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        store.force("x", value, duration=duration)
    assert redis_client.exists(store.force_key("x")) == 0
