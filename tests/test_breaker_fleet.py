"""Breakers that decide as a fleet (resilience.breaker.fleet).

- The pure parts: FleetView turns flush replies into verdicts, and the state machine
  applies them (FLEET_TRANSITIONS), with a FakeClock.
- Against the shared Redis, several RedisFleet objects in one process are several
  members (each has an instance id of its own); flushes are made by hand with a long
  ``interval`` so each step is deterministic.
- The call path sends nothing to Redis: counted on a throwaway redis-server's INFO.
- Redis cut at a fault proxy: every breaker decides alone, logged once, counted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry
from support.faultproxy import FaultProxy
from support.redis_servers import RedisCluster3, RedisServer

import resilience as rs
from resilience.breaker import FLEET_TRANSITIONS, FleetVerdict, Trigger
from resilience.breaker.events import BreakerMode, CircuitState, StateChanged
from resilience.breaker.fleet import FleetReply, FleetRequest, FleetView
from resilience.breaker.policy import BreakerConfig, BreakerPolicy
from resilience.metrics import Metrics

C, O, H = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN  # noqa: E741


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom


def ok() -> int:
    return 1


def fail(b: rs.CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            b.call(boom)


# -- the pure state machine ---------------------------------------------------------------


def test_fleet_transitions_are_their_own_table() -> None:
    assert FLEET_TRANSITIONS == {
        (C, Trigger.FLEET_OPEN): O,
        (H, Trigger.FLEET_OPEN): O,
        (O, Trigger.FLEET_PROBE): H,
        (O, Trigger.FLEET_CLOSE): C,
        (H, Trigger.FLEET_CLOSE): C,
    }
    assert not set(FLEET_TRANSITIONS) & set(rs.breaker.TRANSITIONS)


def policy(**kwargs: object) -> BreakerPolicy:
    p = BreakerPolicy(BreakerConfig(name="p", **kwargs))  # type: ignore[arg-type]
    p.fleet_wait = 0.25
    return p


def test_fleet_open_holds_an_open_breaker_past_its_time_until_the_lease() -> None:
    p = policy(recovery_timeout=10.0)
    p.fleet_verdict(FleetVerdict.OPEN, 0.0, 2.0)  # the fleet has 2 s left
    assert p.state is O
    last = p.events[-1]
    assert isinstance(last, StateChanged)
    assert last.trigger is Trigger.FLEET_OPEN
    assert p.admit(1.0) == pytest.approx(1.0)
    assert p.admit(5.0) == 0.25  # time up, but no lease: ask again in one interval
    assert p.current_state(5.0) is O
    assert p.retry_after(5.0) == 0.25
    p.fleet_verdict(FleetVerdict.PROBE, 5.0)
    assert p.state is H
    admission = p.admit(5.0)
    assert isinstance(admission, tuple)
    assert admission[1]
    assert p.admit(5.0) == 0.0  # the one slot is taken
    p.fleet_verdict(FleetVerdict.CLOSE, 6.0)
    assert p.state is C
    assert p.fleet_hold is False


def test_fleet_open_from_half_open_and_a_new_period_while_open() -> None:
    p = policy(failure_threshold=1, recovery_timeout=1.0)
    p.record(p.admit(0.0), rs.Outcome.FAILURE, 0.0, None)  # type: ignore[arg-type]
    assert p.state is O
    n = len(p.events)
    p.fleet_verdict(FleetVerdict.OPEN, 0.5, 3.0)  # already open: only the period changes
    assert len(p.events) == n
    assert p.open_until == 3.5
    p.fleet_verdict(FleetVerdict.PROBE, 4.0)
    p.fleet_verdict(FleetVerdict.OPEN, 4.1, 3.0)  # the lease went elsewhere
    assert p.state is O
    assert p.open_until == pytest.approx(7.1)


def test_local_verdict_lets_an_open_breaker_probe_by_itself() -> None:
    p = policy(recovery_timeout=1.0)
    p.fleet_verdict(FleetVerdict.OPEN, 0.0, 1.0)
    assert p.current_state(2.0) is O  # held
    p.fleet_verdict(FleetVerdict.LOCAL, 2.0)
    assert p.current_state(2.0) is H  # deciding alone: its own recovery time is up


def test_hold_after_an_outage_keeps_what_was_decided_alone() -> None:
    p = policy()
    p.fleet_verdict(FleetVerdict.HOLD, 0.0, 5.0)
    assert p.state is C
    assert p.fleet_hold


def test_an_operator_outranks_the_fleet() -> None:
    p = policy()
    p.force_closed(0.0)
    for verdict in (FleetVerdict.OPEN, FleetVerdict.PROBE, FleetVerdict.CLOSE):
        p.fleet_verdict(verdict, 1.0, 5.0)
        assert p.state is C
        assert p.mode is BreakerMode.FORCED_CLOSED


def test_a_timed_force_open_still_ends_by_itself_under_a_fleet_hold() -> None:
    p = policy()
    p.fleet_verdict(FleetVerdict.HOLD, 0.0, 100.0)
    p.force_open(0.0, 1.0)
    assert p.current_state(2.0) is H


def changed(old: CircuitState, new: CircuitState, trigger: Trigger) -> StateChanged:
    return StateChanged("b", old, new, trigger, BreakerMode.NORMAL, 0.0)


def reply(gen: int, is_open: bool, *, holder: bool = False, left: float = 1.0) -> FleetReply:
    return FleetReply(gen, is_open, left, holder, 4, 0)


def holding(v: FleetView) -> str | None:
    return v.holding  # read through a function: mypy keeps no narrowing across calls


def test_fleet_view_turns_replies_into_verdicts() -> None:
    v = FleetView("me")
    sent = v.request(C, BreakerMode.NORMAL, 0)
    assert sent == FleetRequest(-1, False, "me:1", "")
    assert v.apply(sent, reply(3, False)) is None  # joined a closed fleet
    assert v.changed(changed(C, O, Trigger.TRIP))  # a trip is flushed at once
    sent = v.request(O, BreakerMode.NORMAL, 0)
    assert sent.vote == 3  # votes count only in the generation they were cast in
    assert v.apply(sent, reply(4, True)) is FleetVerdict.OPEN
    # Open with callers: it asks for the lease, and the reply says whether it got it.
    assert v.request(O, BreakerMode.NORMAL, 0).want_lease is False  # no caller since
    sent = v.request(O, BreakerMode.NORMAL, 5)
    assert sent.want_lease
    assert v.apply(sent, reply(4, True, holder=True)) is FleetVerdict.PROBE
    assert v.holding == sent.token
    # The probe fails: its verdict goes with the lease's token, then a new period.
    assert v.changed(changed(H, O, Trigger.PROBE_FAILED))
    sent = v.request(O, BreakerMode.NORMAL, 5)
    assert (sent.token, sent.verdict) == (v.holding, "f")
    assert v.apply(sent, reply(5, True)) is FleetVerdict.OPEN
    assert (v.pending, holding(v)) == ("", None)
    # Someone else's probe succeeds: the fleet closes, and so do we.
    sent = v.request(O, BreakerMode.NORMAL, 6)
    assert v.apply(sent, reply(5, True)) is None  # the lease went elsewhere
    assert v.apply(v.request(O, BreakerMode.NORMAL, 6), reply(6, False)) is FleetVerdict.CLOSE


def test_fleet_view_outage_and_return() -> None:
    v = FleetView("me")
    v.apply(v.request(C, BreakerMode.NORMAL, 0), reply(1, True))
    assert v.lost() is FleetVerdict.LOCAL
    assert v.lost() is None  # once per outage
    assert v.apply(v.request(C, BreakerMode.NORMAL, 0), reply(1, True)) is FleetVerdict.HOLD
    v.lost()
    assert v.apply(v.request(C, BreakerMode.NORMAL, 0), reply(2, False)) is FleetVerdict.CLOSE


def test_fleet_view_lease_lost_goes_back_to_waiting() -> None:
    v = FleetView("me")
    v.apply(v.request(O, BreakerMode.NORMAL, 0), reply(1, True))
    sent = v.request(O, BreakerMode.NORMAL, 1)
    assert v.apply(sent, reply(1, True, holder=True)) is FleetVerdict.PROBE
    assert v.apply(v.request(H, BreakerMode.NORMAL, 1), reply(1, True)) is FleetVerdict.OPEN


# -- construction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"quorum": 0}, ValueError, "quorum"),
        ({"quorum": 1.5}, ValueError, "quorum"),
        ({"quorum": math.nan}, ValueError, "quorum"),
        ({"quorum": True}, ValueError, "quorum"),
        ({"quorum": "0.5"}, ValueError, "quorum"),
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": -1.0}, ValueError, "interval"),
        ({"interval": math.inf}, ValueError, "interval"),
        ({"ttl": 0.5}, ValueError, "ttl"),
        ({"window": 0}, ValueError, "window"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"prefix": "a{b}"}, ValueError, "prefix"),
        ({"prefix": ""}, ValueError, "prefix"),
    ],
)
def test_bad_settings_are_refused_naming_the_parameter(
    redis_url: str, kwargs: dict[str, object], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        rs.RedisFleet(redis_url, **kwargs)  # type: ignore[arg-type]


def test_wrong_clients_are_refused_naming_the_parameter(redis_url: str) -> None:
    with pytest.raises(TypeError, match="client"):
        rs.RedisFleet(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client must be a sync"):
        rs.RedisFleet(redis.asyncio.Redis.from_url(redis_url))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client"):
        rs.RedisFleet()
    with pytest.raises(TypeError, match="fleet must be a RedisFleet"):
        rs.CircuitBreaker("x", fleet=object())


def test_a_breaker_name_with_braces_is_refused(redis_url: str) -> None:
    with rs.RedisFleet(redis_url, interval=60.0) as fleet, pytest.raises(ValueError, match="name"):
        rs.CircuitBreaker("a{b}", fleet=fleet)


def test_connection_kwargs_and_url(redis_url: str) -> None:
    with rs.RedisFleet(
        host="127.0.0.1",
        port=redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("port", 6379),
    ) as fleet:
        assert fleet.quorum == 0.5
        assert fleet.interval == 1.0
        assert fleet.ttl == 3.0


# -- against Redis ---------------------------------------------------------------------------

Make = Callable[..., tuple[rs.RedisFleet, rs.CircuitBreaker]]


@pytest.fixture
def make(redis_url: str, redis_prefix: str) -> Iterator[Make]:
    """A member: its own RedisFleet (own instance id) and breaker named ``dep``."""
    made: list[rs.RedisFleet] = []

    def member(
        quorum: float = 0.5, url: str = redis_url, interval: float = 60.0, **kwargs: object
    ) -> tuple[rs.RedisFleet, rs.CircuitBreaker]:
        fleet = rs.RedisFleet(url, quorum=quorum, interval=interval, prefix=redis_prefix + "f")
        made.append(fleet)
        options: dict[str, object] = {
            "failure_threshold": 2,
            "recovery_timeout": 0.2,
            "success_threshold": 1,
            "include": (Boom,),
        }
        options.update(kwargs)
        breaker = rs.CircuitBreaker("dep", fleet=fleet, **options)  # type: ignore[arg-type]
        fleet.flush()  # join
        return fleet, breaker

    yield member
    for fleet in made:
        fleet.close()


def flush(*fleets: rs.RedisFleet) -> None:
    for fleet in fleets:
        fleet.flush()


def test_a_quorum_of_trips_opens_every_member(make: Make) -> None:
    members = [make(quorum=0.5) for _ in range(4)]
    fleets = [f for f, _ in members]
    breakers = [b for _, b in members]
    fail(breakers[0], 2)
    flush(*fleets)
    assert [b.state for b in breakers] == [O, C, C, C]  # 1 of 4: below the quorum
    fail(breakers[1], 2)
    flush(fleets[1])  # the second vote reaches the quorum
    view = fleets[1].view(breakers[1])
    assert view is not None
    assert view.open
    assert view.live == 4  # (its trip may have been flushed by its thread already)
    flush(*fleets)  # every other member hears it at its next flush
    assert [b.state for b in breakers] == [O, O, O, O]
    with pytest.raises(rs.CircuitOpenError) as caught:
        breakers[3].call(ok)
    assert 0 < caught.value.retry_after <= 0.2


def test_the_fleet_wide_failure_rate_opens_every_member(make: Make) -> None:
    rate = rs.FailureRate(0.5, window=100, minimum_calls=20)
    members = [make(failure_rate=rate, failure_threshold=None) for _ in range(4)]
    for fleet, breaker in members:
        for _ in range(3):  # 5 calls each: no member has its minimum of 20
            with pytest.raises(Boom):
                breaker.call(boom)
        breaker.call(ok)
        breaker.call(ok)
        fleet.flush()
    flush(*(f for f, _ in members))
    assert {b.state for _, b in members} == {O}


def test_one_probe_per_window_and_its_verdict_reaches_everyone(make: Make) -> None:
    members = [make(quorum=0.25) for _ in range(4)]
    fleets = [f for f, _ in members]
    breakers = [b for _, b in members]
    fail(breakers[0], 2)
    flush(*fleets)
    assert {b.state for b in breakers} == {O}
    time.sleep(0.25)  # the fleet's recovery time, on Redis' clock
    for b in breakers:  # every member has callers: each one asks for the lease
        with pytest.raises(rs.CircuitOpenError) as caught:
            b.call(ok)
        assert caught.value.retry_after == 60.0  # held: ask again in one interval
    flush(*fleets)
    assert sorted(b.state.value for b in breakers) == ["half_open", "open", "open", "open"]
    holder = next(b for b in breakers if b.state is H)
    with pytest.raises(Boom):
        holder.call(boom)  # the probe fails: the whole fleet opens again
    flush(*fleets)
    assert {b.state for b in breakers} == {O}
    time.sleep(0.25)
    for b in breakers:
        with pytest.raises(rs.CircuitOpenError):
            b.call(ok)
    flush(*fleets)
    holders = [b for b in breakers if b.state is H]
    assert len(holders) == 1
    assert holders[0].call(ok) == 1  # the probe succeeds: every member closes
    flush(*fleets)
    assert {b.state for b in breakers} == {C}
    assert all(b.call(ok) == 1 for b in breakers)
    flush(*fleets)  # the old votes are of an older generation: nothing reopens
    assert {b.state for b in breakers} == {C}


def test_a_dead_members_vote_expires(make: Make, redis_url: str, redis_prefix: str) -> None:
    a, b = make(quorum=1.0), make(quorum=1.0)
    dead = rs.RedisFleet(redis_url, quorum=1.0, interval=60.0, ttl=61.0, prefix=redis_prefix + "f")
    # A member that stops flushing: its entry says live for ttl, then it is dropped.
    ghost = rs.CircuitBreaker("dep", failure_threshold=2, include=(Boom,), fleet=dead)
    dead.flush()
    fail(a[1], 2)
    fail(b[1], 2)
    flush(a[0], b[0], a[0])  # a reads after b's vote is in
    view = a[0].view(a[1])
    assert view is not None
    assert not view.open
    assert (view.live, view.votes) == (3, 2)
    client = redis.Redis.from_url(redis_url)
    key = f"{redis_prefix}f:{{dep}}:s"
    field = f"m:{dead.instance}"
    client.hset(key, field, "1 -1")  # its heartbeat ran out (an expiry in the past)
    flush(a[0])
    view = a[0].view(a[1])
    assert view is not None
    assert view.open
    assert (view.live, view.votes) == (2, 2)
    assert client.hget(key, field) is None
    dead._stop.set()
    del ghost


def test_members_leave_on_close(make: Make, redis_url: str, redis_prefix: str) -> None:
    a, _b, c = make(), make(), make()
    c[0].close()
    flush(a[0])
    view = a[0].view(a[1])
    assert view is not None
    assert view.live == 2


def test_keys_share_one_hash_slot(make: Make, redis_url: str, redis_prefix: str) -> None:
    rate = rs.FailureRate(0.5, window=100, minimum_calls=20)
    fleet, breaker = make(failure_rate=rate, failure_threshold=None)
    breaker.call(ok)
    fleet.flush()
    client = redis.Redis.from_url(redis_url)
    keys = [k.decode() for k in client.scan_iter(match=f"{redis_prefix}f:*")]
    assert len(keys) == 2  # state and the rate's counts (no lease while closed)
    assert {keyslot(k) for k in keys} == {keyslot("{dep}")}


def keyslot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def test_the_thread_flushes_by_itself_within_one_interval(make: Make) -> None:
    members = [make(quorum=0.5, interval=0.05) for _ in range(3)]
    fail(members[0][1], 2)
    fail(members[1][1], 2)  # each trip wakes its flusher
    start = time.monotonic()
    while any(b.state is not O for _, b in members):
        assert time.monotonic() - start < 0.05 + 0.5, "not open within one interval"
        time.sleep(0.005)


# -- no Redis on the call path ----------------------------------------------------------


@pytest.fixture(scope="module")
def own_redis(throwaway: RedisServer) -> RedisServer:
    return throwaway


def commands(client: redis.Redis) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}


def test_calls_send_nothing_to_redis(own_redis: RedisServer) -> None:
    client = own_redis.client()
    fleet = rs.RedisFleet(own_redis.url, interval=0.2, prefix="nocmd")
    rate = rs.FailureRate(0.9, window=100, minimum_calls=50)
    breaker = rs.CircuitBreaker("dep", failure_rate=rate, include=(Boom,), fleet=fleet)
    quiet = rs.CircuitBreaker("dep2", fleet=fleet)
    decorated = breaker(ok)
    decorated_quiet = quiet(ok)
    try:
        fleet.flush()
        # Snapshots taken between flushes (a flush holds this lock while its EVALSHA is out),
        # so a flush in flight counts on both sides or on neither.
        with fleet._flushing:
            before, flushes = commands(client), fleet.flushes
        start = time.monotonic()

        def work() -> None:
            for _ in range(20_000):
                decorated()
                decorated_quiet()

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        async def tasks() -> None:
            @breaker
            async def aok() -> int:
                return 1

            async with anyio.create_task_group() as tg:
                for _ in range(8):

                    async def run() -> None:
                        for _ in range(2_000):
                            await aok()

                    tg.start_soon(run)

        anyio.run(tasks)
        elapsed = time.monotonic() - start
        with fleet._flushing:
            after, made = commands(client), fleet.flushes - flushes
        sent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
        # 176,000 calls; Redis saw the flushes (one EVALSHA per breaker) and nothing else.
        assert made <= 2 * (elapsed / 0.2 + 2)
        # commandstats counts the commands a script runs too: those are the script's own.
        inside = {"time", "hmget", "get", "del", "hset", "hdel", "hget", "hincrby", "pexpire"}
        inside |= {"hgetall", "set"}
        outside = {k: n for k, n in sent.items() if k.removeprefix("cmdstat_") not in inside}
        assert outside == {"cmdstat_info": 1, "cmdstat_evalsha": made}, sent
        assert sent["cmdstat_time"] == made  # one TIME per script: nothing else calls it
    finally:
        fleet.close()


# -- Redis away -------------------------------------------------------------------------------


@pytest.mark.slow
def test_redis_cut_every_breaker_decides_alone(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    with FaultProxy(target.get("host", "127.0.0.1"), target.get("port", 6379)) as proxy:
        url = proxy.url_for(redis_url)
        fleets = [
            rs.RedisFleet(url, quorum=0.5, interval=60.0, timeout=0.2, prefix=redis_prefix + "c")
            for _ in range(2)
        ]
        breakers = [
            rs.CircuitBreaker(
                "dep",
                failure_threshold=2,
                recovery_timeout=0.2,
                success_threshold=1,
                include=(Boom,),
                fleet=f,
            )
            for f in fleets
        ]
        try:
            flush(*fleets)
            fail(breakers[0], 2)
            flush(*fleets)
            assert {b.state for b in breakers} == {O}
            time.sleep(0.25)
            proxy.cut()
            caplog.set_level(logging.WARNING, "resilience")
            start = time.monotonic()
            flush(*fleets)
            flush(*fleets)  # a second failed flush logs nothing more
            assert time.monotonic() - start < 2.0
            lines = [r for r in caplog.records if "deciding alone" in r.getMessage()]
            assert len(lines) == 2  # one per breaker
            assert lines[0].__dict__["breaker"] == "dep"
            assert lines[0].__dict__["fleet"] == redis_prefix + "c"
            assert fleets[0].local_fallbacks == 1
            assert fleets[0].guard.errors >= 1
            # Alone: each one probes by itself, and the dependency is back.
            for b in breakers:
                assert b.state is H
                assert b.call(ok) == 1
                assert b.state is C
            proxy.restore()
            time.sleep(1.1)  # the guard's own breaker probes Redis again after 1 s
            flush(*fleets)
            back = [r for r in caplog.records if "fleet back" in r.getMessage()]
            assert len(back) == 2  # one per breaker
            assert all(f.view(b) is not None for f, b in zip(fleets, breakers, strict=True))
            assert {b.state for b in breakers} == {C}  # the fleet's stale "open" undoes nothing
        finally:
            for f in fleets:
                f.close()


def test_metrics_show_the_fleets_redis_as_a_backend(make: Make) -> None:
    fleet, breaker = make()
    registry = CollectorRegistry()
    Metrics(registry).watch(breaker)
    backend = f"redis-fleet:{fleet.prefix}"
    assert registry.get_sample_value("resilience_backend_errors_total", {"backend": backend}) == 0


# -- async callers --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_callers_open_with_the_fleet(make: Make) -> None:
    members = [make(quorum=0.5) for _ in range(2)]

    @members[0][1]
    async def afail() -> None:
        raise Boom

    @members[1][1]
    async def aok() -> int:
        return 1

    for _ in range(2):
        with pytest.raises(Boom):
            await afail()
    await anyio.to_thread.run_sync(lambda: flush(*(f for f, _ in members)))
    with pytest.raises(rs.CircuitOpenError):
        await aok()


# -- Redis Cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3.start(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.mark.slow
def test_a_fleet_on_redis_cluster(cluster: RedisCluster3) -> None:
    fleets = [
        rs.RedisFleet(
            redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0]),
            quorum=0.5,
            interval=60.0,
            prefix="cl",
        )
        for _ in range(2)
    ]
    try:
        # Two breakers whose keys live on different nodes: each script stays in its slot.
        names = ["dep", "other"]
        assert len({cluster.node_of(keyslot("{" + n + "}")).port for n in names}) == 2
        for name in names:
            breakers = [
                rs.CircuitBreaker(name, failure_threshold=2, include=(Boom,), fleet=f)
                for f in fleets
            ]
            flush(*fleets)
            fail(breakers[0], 2)
            flush(*fleets)
            assert {b.state for b in breakers} == {O}
    finally:
        for f in fleets:
            f.close()


# -- many threads while verdicts arrive ----------------------------------------------------


def test_verdicts_land_safely_under_many_threads(make: Make) -> None:
    (fa, a), (fb, b) = make(quorum=0.5), make(quorum=0.5)
    stop = threading.Event()
    seen: list[set[str]] = [set() for _ in range(8)]

    def hammer(mine: set[str]) -> None:
        while not stop.is_set():
            try:
                b.call(ok)
                mine.add("ok")
            except rs.CircuitOpenError:
                mine.add("open")

    threads = [threading.Thread(target=hammer, args=(s,)) for s in seen]
    for t in threads:
        t.start()
    try:
        fail(a, 2)
        flush(fa, fb)  # b opens under 8 threads' calls
        assert b.state is O
        deadline = time.monotonic() + 5.0
        while not all("open" in s for s in seen):
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert b.stats().rejected > 0
