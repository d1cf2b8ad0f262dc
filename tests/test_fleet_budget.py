"""FleetRetryBudget against real Redis servers: counts shared by two "hosts", off the
call path.

- Two instances share deposits and withdrawals after a sync (``sync_now()``, no sleeps);
  between syncs each decides on the fleet's last totals plus its own counts since.
- The key layout: one hash per budget in the ``{name}`` hash slot, slots that left the
  window deleted by the script, an expiry of about two windows; Redis TIME, not the hosts'
  clocks, places the counts.
- Outages: a throwaway redis-server killed and started again on its port (no data, no
  scripts: NOSCRIPT reloads), and a FaultProxy blackhole (a slow Redis). Decisions go on
  from local counts, ``sync_errors`` counts, and the budget recovers by itself.
- A Retry storm across two instances stays within the ratio; a real Redis Cluster.
- Closing, garbage collection ends the thread; telemetry and metrics; bad inputs.

The shared Redis gets only keys under this test's ``redis_prefix``; anything destructive
runs on redis-server processes started (and killed) here.
"""

from __future__ import annotations

import gc
import math
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from redis.crc import key_slot
from support.faultproxy import FaultProxy
from support.redis_servers import START_TIMEOUT, RedisCluster3, RedisServer

import resilience as rs
from resilience.metrics import Metrics
from resilience.policies import Retry, RetryBudget
from resilience.policies.budget import SLOTS
from resilience.policies.fleet_budget import FleetRetryBudget
from resilience.remote import OUTAGE_ERRORS
from resilience.testing import FakeClock, no_waits

pytestmark = pytest.mark.redis

RECOVERY = 0.05  # the fast breaker's recovery_timeout, seconds
QUIET = 10.0  # sync_interval of budgets the tests sync by hand: the thread syncs at start


# --- helpers ---------------------------------------------------------------------------


def fast_breaker(name: str = "budget-redis-test") -> rs.CircuitBreaker:
    """Opens on the first failure, probes again after RECOVERY seconds."""
    return rs.CircuitBreaker(
        name,
        failure_threshold=1,
        recovery_timeout=RECOVERY,
        success_threshold=1,
        include=OUTAGE_ERRORS,
    )


def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll ``condition`` until it holds (a bounded wait for a background event)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.01)


def text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def read(budget: FleetRetryBudget) -> dict[str, Any]:
    return dict(budget.telemetry().read())


def withdraw_all(budget: RetryBudget, limit: int = 1000) -> int:
    """Withdraw until refused; how many were taken."""
    taken = 0
    while taken < limit and budget.try_withdraw():
        taken += 1
    return taken


def deposit(budget: RetryBudget, n: int) -> None:
    for _ in range(n):
        budget.deposit()


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """This test's prefix on the shared Redis, as a budget prefix (no trailing ':')."""
    return redis_prefix.rstrip(":")


Factory = Callable[..., FleetRetryBudget]


@pytest.fixture
def make(redis_client: redis.Redis, prefix: str) -> Iterator[Factory]:
    """FleetRetryBudget(**kwargs) on the shared Redis under this test's prefix, synced by
    hand (the thread syncs once at start), on a FakeClock unless given; closed after."""
    made: list[FleetRetryBudget] = []

    def factory(client: Any = None, **kwargs: Any) -> FleetRetryBudget:
        kwargs.setdefault("prefix", prefix)
        kwargs.setdefault("sync_interval", QUIET)
        kwargs.setdefault("clock", FakeClock())
        kwargs.setdefault("timeout", 1.0)  # a busy shared Redis must not fail a test
        budget = FleetRetryBudget(redis_client if client is None else client, **kwargs)
        made.append(budget)
        return budget

    yield factory
    for budget in made:
        budget.close()


def restart(server: RedisServer) -> RedisServer:
    """A new redis-server on the port of ``server`` (stopped): empty, no scripts loaded."""
    binary = shutil.which("redis-server")
    assert binary is not None
    workdir = server.workdir
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(server.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis-restarted.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    again = RedisServer(server.port, process, workdir)

    def answers() -> bool:
        assert process.poll() is None, "the restarted redis-server exited"
        try:
            with again.client() as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    until(answers, f"redis-server back on port {server.port}", within=START_TIMEOUT)
    return again


# --- 1. sharing ------------------------------------------------------------------------


def test_deposits_on_one_host_allow_withdrawals_on_another(make: Factory) -> None:
    a = make(ratio=0.1, min_per_second=0.0)
    b = make(ratio=0.1, min_per_second=0.0)
    deposit(a, 100)  # 100 first attempts on host A: 10 retries for the fleet
    assert a.balance() == pytest.approx(10.0)  # A counts its own at once
    assert b.balance() == pytest.approx(0.0)  # B has not heard yet
    assert a.sync_now()
    assert b.sync_now()
    assert b.fleet
    assert b.balance() == pytest.approx(10.0)
    assert withdraw_all(b) == 10  # spent on B
    assert a.balance() == pytest.approx(10.0)  # A has not heard of B's retries yet
    assert b.sync_now()
    assert a.sync_now()
    assert a.balance() == pytest.approx(0.0)
    assert not a.try_withdraw()
    ta, tb = read(a), read(b)
    assert (ta["deposits"], ta["withdrawals"], ta["exhausted"]) == (100, 0, 1)
    assert (tb["deposits"], tb["withdrawals"], tb["exhausted"]) == (0, 10, 1)
    assert ta["fleet_deposits"] == tb["fleet_deposits"] == 100
    assert ta["fleet_withdrawals"] == tb["fleet_withdrawals"] == 10
    assert ta["fleet"] == tb["fleet"] == 1.0
    assert ta["sync_errors"] == tb["sync_errors"] == 0


def test_between_syncs_the_fleet_totals_plus_local_counts_decide(make: Factory) -> None:
    a = make(ratio=0.5, min_per_second=0.1)  # floor: 0.1/s x 10 s = 1 retry
    b = make(ratio=0.5, min_per_second=0.1)
    deposit(a, 10)
    deposit(b, 4)
    assert a.sync_now()
    assert b.sync_now()
    assert a.sync_now()  # both have seen 14 deposits
    assert a.balance() == b.balance() == pytest.approx(1 + 0.5 * 14)
    deposit(b, 2)  # not synced: B counts them, A does not
    assert b.try_withdraw()
    assert b.balance() == pytest.approx(1 + 0.5 * 16 - 1)
    assert a.balance() == pytest.approx(1 + 0.5 * 14)
    assert b.sync_now()
    assert a.sync_now()
    assert a.balance() == b.balance() == pytest.approx(1 + 0.5 * 16 - 1)


def test_a_budget_is_shared_by_name_and_prefix_only(make: Factory) -> None:
    a = make(min_per_second=0.0, name="payments")
    other = make(min_per_second=0.0, name="search")
    deposit(a, 50)
    assert a.sync_now()
    assert other.sync_now()
    assert other.balance() == 0.0
    assert a.key != other.key


def test_the_fleet_view_goes_stale_and_local_counts_decide(make: Factory) -> None:
    clock = FakeClock()
    a = make(min_per_second=0.0, clock=clock)
    b = make(min_per_second=0.0, clock=clock, sync_interval=1.0, timeout=0.5)
    deposit(a, 100)
    assert a.sync_now()
    assert b.sync_now()
    assert b.balance() == pytest.approx(10.0)
    clock.advance(2 * 1.0 + 0.5 + 0.001)  # its last sync is older than 2 intervals + timeout
    assert not b.fleet
    assert b.balance() == 0.0  # B's own counts: no first attempts there
    assert read(b)["fleet"] == 0.0
    assert b.sync_now()
    assert b.fleet


# --- 2. the key layout and Redis's clock -----------------------------------------------


def test_one_hash_per_budget_in_the_name_hash_slot(
    make: Factory, redis_client: redis.Redis, prefix: str
) -> None:
    a = make(min_per_second=0.0, name="orders", window=10.0)
    assert a.key == f"{prefix}:{{orders}}:10.0"
    assert key_slot(a.key.encode()) == key_slot(b"orders")
    deposit(a, 3)
    assert a.try_withdraw() is False  # 0.3 of a retry
    assert a.sync_now()
    fields = {text(k): int(v) for k, v in redis_client.hgetall(a.key).items()}
    assert list(fields.values()) == [3]
    (name,) = fields
    seconds, micros = redis_client.time()
    epoch = (int(seconds) * 1_000_000 + int(micros)) // int(10.0 * 1e6 / SLOTS)
    assert name[0] == "d"
    assert epoch - 1 <= int(name[1:]) <= epoch  # a slot of Redis TIME
    assert 0 < redis_client.pttl(a.key) <= 2 * 10_000 + 1000  # about two windows


def test_slots_that_left_the_window_are_dropped(make: Factory, redis_client: redis.Redis) -> None:
    a = make(ratio=1.0, min_per_second=0.0)
    seconds, _ = redis_client.time()
    now_epoch = int(seconds) * 1_000_000 // int(10.0 * 1e6 / SLOTS)
    old = now_epoch - SLOTS - 5  # a window ago and more
    redis_client.hset(a.key, mapping={f"d{old}": 500, f"w{old}": 7, "junk": 1})
    deposit(a, 2)
    assert a.sync_now()
    assert read(a)["fleet_deposits"] == 2
    assert read(a)["fleet_withdrawals"] == 0
    (left,) = redis_client.hkeys(a.key)
    assert text(left).startswith("d")


def test_hosts_clocks_do_not_matter(make: Factory) -> None:
    # Local clocks a day apart (and one far behind): Redis TIME places every count.
    a = make(min_per_second=0.0, clock=FakeClock(start=86_400.0))
    b = make(min_per_second=0.0, clock=FakeClock(start=5.0))
    deposit(a, 40)
    deposit(b, 60)
    assert a.sync_now()
    assert b.sync_now()
    assert a.sync_now()
    assert a.balance() == b.balance() == pytest.approx(10.0)


def test_a_mismatched_window_does_not_mix_slots(make: Factory) -> None:
    ten = make(min_per_second=0.0, window=10.0)
    one = make(min_per_second=0.0, window=1.0, sync_interval=1.0)
    deposit(ten, 100)
    assert ten.sync_now()
    assert one.sync_now()
    assert one.balance() == 0.0
    assert ten.sync_now()
    assert ten.balance() == pytest.approx(10.0)  # the other's sync deleted nothing


def test_the_thread_syncs_by_itself(make: Factory) -> None:
    a = make(min_per_second=0.0, sync_interval=0.01, clock=None)
    b = make(min_per_second=0.0, sync_interval=0.01, clock=None)
    deposit(a, 30)
    until(lambda: b.balance() >= 3.0 - 1e-9, "B hears of A's deposits")
    assert read(b)["syncs"] >= 1


# --- 3. outages ------------------------------------------------------------------------


def test_redis_killed_then_back_local_decisions_then_recovery(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path)
    clients: list[redis.Redis] = []
    try:
        client = redis.Redis(port=server.port)
        clients.append(client)
        kw: dict[str, Any] = {"sync_interval": QUIET, "timeout": 0.5, "clock": FakeClock()}
        a = FleetRetryBudget(client, 0.1, 1.0, breaker=fast_breaker("a"), **kw)
        b = FleetRetryBudget(client, 0.1, 1.0, breaker=fast_breaker("b"), **kw)
        with a, b:
            deposit(a, 100)
            assert a.sync_now()
            assert b.sync_now()
            assert b.balance() == pytest.approx(10 + 10)  # floor 1/s x 10 s, and 100 x 0.1
            assert [b.try_withdraw() for _ in range(5)] == [True] * 5

            server.stop()  # Redis is gone
            assert not b.sync_now()
            assert not b.sync_now()
            t = read(b)
            assert t["sync_errors"] == 2
            assert t["fleet"] == 0.0
            assert b.guard.errors >= 1
            # Local counts alone: B's floor of 10, no deposits of its own, 5 withdrawn.
            assert b.balance() == pytest.approx(5.0)
            deposit(b, 10)  # the call path does not touch Redis
            assert withdraw_all(b) == 6
            assert not b.try_withdraw()

            server = restart(server)  # empty, and no script loaded (NOSCRIPT, reload)
            until(b.sync_now, "B syncs again")
            t = read(b)
            assert t["fleet"] == 1.0
            # The new Redis holds what B counted in the window: 10 deposits and 11
            # withdrawals (5 before the outage, 6 during it).
            assert (t["fleet_deposits"], t["fleet_withdrawals"]) == (10, 11)
            assert b.balance() == pytest.approx(10 + 1 - 11)
            # A's 100 deposits are in the window too: its first sync adds them again.
            until(a.sync_now, "A syncs again")
            assert b.sync_now()
            assert a.balance() == b.balance() == pytest.approx(10 + 11 - 11)
    finally:
        for c in clients:
            c.close()
        server.stop()


def test_slow_redis_local_decisions_then_recovery(
    proxy: FaultProxy, redis_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    seen: list[rs.BackendStateChanged] = []
    try:
        budget = FleetRetryBudget(
            client,
            0.1,
            0.0,
            prefix=prefix,
            sync_interval=QUIET,
            timeout=0.1,
            breaker=fast_breaker(),
            clock=FakeClock(),
        )
        budget.guard.add_listener(seen.append)
        with budget:
            until(budget.sync_now, "the first sync")
            deposit(budget, 50)
            proxy.blackhole()  # connections accepted, nothing answers: syncs time out
            assert not budget.sync_now()
            assert read(budget)["sync_errors"] >= 1
            assert budget.balance() == pytest.approx(5.0)  # local: its own 50 deposits
            assert withdraw_all(budget) == 5
            proxy.restore()
            until(budget.sync_now, "a sync after the blackhole")
            t = read(budget)
            assert (t["fleet_deposits"], t["fleet_withdrawals"]) == (50, 5)
            assert t["fleet"] == 1.0
        assert [e.available for e in seen] == [False, True]
    finally:
        client.close()


def test_counts_older_than_the_window_are_not_sent_after_an_outage(
    proxy: FaultProxy, redis_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    clock = FakeClock()
    try:
        budget = FleetRetryBudget(
            client,
            0.1,
            0.0,
            prefix=prefix,
            sync_interval=QUIET,
            timeout=0.5,
            breaker=fast_breaker(),
            clock=clock,
        )
        with budget:
            until(budget.sync_now, "the first sync")
            proxy.cut()
            deposit(budget, 100)
            assert not budget.sync_now()
            clock.advance(11.0)  # a window passes while Redis is away
            deposit(budget, 20)
            proxy.restore()
            until(budget.sync_now, "a sync after the cut")
            assert read(budget)["fleet_deposits"] == 20
    finally:
        client.close()


# --- 4. Retry ---------------------------------------------------------------------------


def _down() -> None:
    raise ConnectionError("the dependency is down")


def test_a_retry_storm_across_two_instances_stays_within_ratio(make: Factory) -> None:
    a = make(ratio=0.1, min_per_second=0.0)
    b = make(ratio=0.1, min_per_second=0.0)
    retries = [
        Retry(attempts=4, on=ConnectionError, budget=budget, name=f"retry-{i}")
        for i, budget in enumerate((a, b))
    ]
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        _down()

    first = 0
    with no_waits():
        for _ in range(20):  # 20 sync intervals of 10 failing calls on each instance
            for _ in range(10):
                for retry in retries:
                    first += 1
                    with pytest.raises(ConnectionError):
                        retry.call(down)
            assert a.sync_now()
            assert b.sync_now()
    extra = calls - first
    # 0.1 x 400 first attempts, plus what the other instance withdrew unseen in one
    # interval (at most 2 here: one interval's 1 retry each, and one round's lag).
    assert 0.1 * first - 2 <= extra <= 0.1 * first + 2, (first, extra)
    a.sync_now()
    assert read(a)["fleet_withdrawals"] == extra
    assert read(a)["fleet_deposits"] == first


def test_a_threaded_storm_of_100_callers_on_two_instances(make: Factory) -> None:
    # The sync threads run on their own (every 10 ms) while 100 threads call.
    a = make(ratio=0.1, min_per_second=0.0, sync_interval=0.01, clock=None)
    b = make(ratio=0.1, min_per_second=0.0, sync_interval=0.01, clock=None)
    retries = [
        Retry(attempts=4, on=ConnectionError, budget=budget, name=f"threads-{i}")
        for i, budget in enumerate((a, b))
    ]
    calls = 0
    lock = threading.Lock()
    start = threading.Barrier(100)

    def down() -> None:
        nonlocal calls
        with lock:
            calls += 1
        _down()

    def caller(retry: Retry) -> None:
        start.wait()
        for _ in range(10):
            with pytest.raises(ConnectionError):
                retry.call(down)

    threads = [threading.Thread(target=caller, args=(retries[i % 2],)) for i in range(100)]
    with no_waits():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    first = 100 * 10
    extra = calls - first
    # ~10% extra calls: what overshoot the sync lag allows is bounded by one interval.
    assert extra <= 0.1 * first + 10, extra


def test_first_attempts_on_one_instance_pay_for_retries_on_another(make: Factory) -> None:
    a = make(ratio=0.1, min_per_second=0.0)
    b = make(ratio=0.1, min_per_second=0.0)
    healthy = Retry(attempts=4, on=ConnectionError, budget=a, name="healthy")
    failing = Retry(attempts=4, on=ConnectionError, budget=b, name="failing")
    for _ in range(200):
        assert healthy.call(lambda: 1) == 1
    assert a.sync_now()
    assert b.sync_now()
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        _down()

    with no_waits():
        for _ in range(20):
            with pytest.raises(ConnectionError):
                failing.call(down)
    # B's 20 first attempts; 0.1 x 220 = 22 retries for the fleet, all taken by B.
    assert calls - 20 == 22
    assert read(b)["exhausted"] > 0


# --- 5. Redis Cluster -------------------------------------------------------------------


@pytest.mark.slow
def test_on_a_redis_cluster(tmp_path: Path) -> None:
    with RedisCluster3.start(tmp_path) as cluster:
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        try:
            kw: dict[str, Any] = {
                "min_per_second": 0.0,
                "sync_interval": QUIET,
                "timeout": 1.0,
                "clock": FakeClock(),
            }
            with FleetRetryBudget(client, **kw) as a, FleetRetryBudget(client, **kw) as b:
                deposit(a, 100)
                assert a.sync_now()
                for node in cluster.nodes:  # NOSCRIPT on every node: reloaded
                    with node.client() as c:
                        c.script_flush()
                assert b.sync_now()
                assert withdraw_all(b) == 10
                assert b.sync_now()
                assert a.sync_now()
                assert a.balance() == 0.0
                owner = cluster.node_of(key_slot(a.key.encode()))
                with owner.client() as c:
                    assert c.exists(a.key) == 1
        finally:
            client.close()


# --- 6. lifecycle and observing -------------------------------------------------------


def test_close_stops_the_thread_and_decisions_go_on_locally(make: Factory) -> None:
    a = make(min_per_second=0.0)
    deposit(a, 100)
    assert a.sync_now()
    thread = a._thread
    assert thread.is_alive()
    a.close()
    assert not thread.is_alive()
    a.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        a.sync_now()
    assert not a.fleet
    assert withdraw_all(a) == 10  # its own deposits
    deposit(a, 10)
    assert a.try_withdraw()


def test_context_manager_closes(make: Factory) -> None:
    with make() as budget:
        thread = budget._thread
        assert thread.is_alive()
    assert not thread.is_alive()


def test_the_thread_does_not_keep_the_budget_alive(redis_client: redis.Redis, prefix: str) -> None:
    def started() -> tuple[weakref.ref[FleetRetryBudget], threading.Thread]:
        budget = FleetRetryBudget(redis_client, prefix=prefix, sync_interval=0.01)
        until(lambda: read(budget)["syncs"] >= 1, "a first sync")
        return weakref.ref(budget), budget._thread

    ref, thread = started()
    # The thread holds the budget only while it syncs (every 0.01 s here).
    until(lambda: gc.collect() >= 0 and ref() is None, "the budget is collected")
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert not any(t is thread for t in threading.enumerate())


def test_telemetry_and_metrics(make: Factory) -> None:
    budget = make(name="fleet_metrics")
    deposit(budget, 5)
    assert budget.sync_now()
    telemetry = budget.telemetry()
    assert telemetry.kind == "budget"
    assert telemetry.links == (budget.guard,)
    t = dict(telemetry.read())
    assert {"deposits", "withdrawals", "exhausted", "balance", "sync_errors"} <= set(t)
    assert t["deposits"] == 5
    assert t["syncs"] >= 1
    registry = CollectorRegistry()
    Metrics(registry).watch(budget)
    text = generate_latest(registry).decode()
    assert 'resilience_retry_budget_balance{budget="fleet_metrics"}' in text
    assert "resilience_backend_available" in text  # the linked guard


def test_it_is_a_retry_budget(make: Factory) -> None:
    budget = make()
    assert isinstance(budget, RetryBudget)
    assert Retry(budget=budget).budget is budget
    assert "FleetRetryBudget(" in repr(budget)


# --- 7. bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": 0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": math.nan}, "ratio"),
        ({"min_per_second": -1}, "min_per_second"),
        ({"min_per_second": math.inf}, "min_per_second"),
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"window": math.nan}, "window"),
        ({"name": ""}, "name"),
        ({"name": "a{b}"}, "name"),
        ({"prefix": ""}, "prefix"),
        ({"prefix": "x{y"}, "prefix"),
        ({"prefix": 5}, "prefix"),
        ({"sync_interval": 0}, "sync_interval"),
        ({"sync_interval": -1}, "sync_interval"),
        ({"sync_interval": math.nan}, "sync_interval"),
        ({"sync_interval": math.inf}, "sync_interval"),
        ({"sync_interval": True}, "sync_interval"),
        ({"sync_interval": "1"}, "sync_interval"),
        ({"sync_interval": 0.0001}, "sync_interval"),
        ({"sync_interval": 11.0}, "sync_interval"),  # more than the window
        ({"window": 1.0, "sync_interval": 2.0}, "sync_interval"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": 1e9}, "timeout"),
    ],
)
def test_bad_values_name_the_parameter(kwargs: dict[str, Any], field: str) -> None:
    before = threading.active_count()
    with pytest.raises(ValueError, match=field):
        FleetRetryBudget(redis.Redis(), **kwargs)
    assert threading.active_count() == before  # no thread was started


def test_bad_types_name_the_parameter() -> None:
    with pytest.raises(TypeError, match="client"):
        FleetRetryBudget("redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client"):
        FleetRetryBudget(redis.asyncio.Redis())  # type: ignore[arg-type]  # a thread syncs
    with pytest.raises(TypeError, match="breaker"):
        FleetRetryBudget(redis.Redis(), breaker="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        FleetRetryBudget(redis.Redis(), clock=object())  # type: ignore[arg-type]


def test_a_sync_sent_twice_or_late_counts_nothing_twice(make: Factory) -> None:
    # A reply lost after Redis applied the sync: the next sync carries the same running
    # totals, and Redis adds only what it has not seen from this instance.
    a = make(min_per_second=0.0)
    deposit(a, 30)
    assert a.sync_now()
    once = (30, 0, 0, 0)  # totals, and totals less the counts still in the window
    assert a._eval(once) == [30, 0]  # sent again: nothing added
    assert a._eval((10, 0, 0, 0)) == [30, 0]  # an older sync arriving late: nothing
    deposit(a, 5)
    assert a.sync_now()
    assert read(a)["fleet_deposits"] == 35
