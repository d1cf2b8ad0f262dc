"""RedisBackend against real Redis servers: what only a real server can show.

- Keys expire once their bucket is full again (PEXPIRE of the time to refill).
- SCRIPT FLUSH mid-run (NOSCRIPT -> reload) changes no decision (throwaway server).
- Decisions use Redis TIME: skewed client clocks (freezegun, in process and in four
  processes hammering one key) never admit more than ``capacity + rate x elapsed``.
- A real three-node Redis Cluster (throwaway servers): keys on many slots, groups on one.
- Outages through a TCP FaultProxy, for each ``on_error`` policy, sync and async: the
  breaker stops contacting the dead server (counted at the proxy), recovery goes back to
  Redis; listeners and the log see each transition once.
- Wrong client kind for the call, and a 200-item batch in one call.

The shared Redis gets only keys under this test's ``redis_prefix``; everything
destructive runs on ``redis-server`` processes started (and killed) here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone

import anyio
import pytest
import redis
import redis.asyncio
from freezegun import freeze_time
from redis.crc import key_slot
from support.faultproxy import FaultProxy
from support.redis_servers import RedisCluster3, RedisServer

import resilience as rs
from resilience.limiter import redis as layout
from resilience.testing import FakeClock

pytestmark = pytest.mark.redis


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs only on asyncio; trio coverage of the limiter: test_limiter_memory.py.
    return "asyncio"


POLICIES = ["local", "fail_open", "fail_closed"]
RECOVERY = 0.2  # the fast breaker's recovery_timeout, seconds
HANDFUL = 3  # connection attempts allowed while the breaker guards a dead server
SAFE = 1.0  # timeout where no outage is staged: a busy shared Redis must not fail a test


# --- helpers ---------------------------------------------------------------------------


def fast_breaker(name: str = "redis-test") -> rs.CircuitBreaker:
    """Opens on the first failure, probes again after RECOVERY seconds."""
    return rs.CircuitBreaker(
        name,
        failure_threshold=1,
        recovery_timeout=RECOVERY,
        success_threshold=1,
        include=(redis.RedisError, OSError),
    )


def bucket_key(prefix: str, key: str, bucket: rs.TokenBucket) -> str:
    return f"{prefix}:{{{key}}}:{bucket.name}"


def redis_now_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def allowed_count(decisions: list[rs.Decision]) -> int:
    return sum(1 for d in decisions if d.allowed)


class Events:
    """A listener that keeps every BackendStateChanged."""

    def __init__(self) -> None:
        self.seen: list[rs.BackendStateChanged] = []

    def __call__(self, event: rs.BackendStateChanged) -> None:
        self.seen.append(event)

    @property
    def availability(self) -> list[bool]:
        return [e.available for e in self.seen]


def new_prefix() -> str:
    return f"rstest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """This test's prefix on the shared Redis, as a RedisBackend prefix (no trailing ':')."""
    return redis_prefix.rstrip(":")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3.start(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def throwaway_client(throwaway: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(throwaway.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def athrowaway_client(
    require_asyncio: None, throwaway: RedisServer
) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(throwaway.url)
    try:
        yield client
    finally:
        await client.aclose()


async def aclose_backend(backend: rs.RedisBackend) -> None:
    """Close the pool the backend built for itself (the test closes its own client).

    Without this, redis.asyncio warns "unclosed Connection" when the pool is collected.
    """
    await backend.aclose()


# --- 1. keys expire --------------------------------------------------------------------


def test_key_pttl_is_the_time_to_refill(redis_client: redis.Redis, prefix: str) -> None:
    backend = rs.RedisBackend(redis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed")
    bucket = rs.TokenBucket(10, 20, backend=backend)  # 100 ms per token
    key = bucket_key(prefix, "user:1", bucket)

    d = bucket.try_acquire("user:1", cost=5)
    assert d.allowed
    assert d.remaining == 15
    pttl = redis_client.pttl(key)
    assert 0 < pttl <= 500 + 1  # 5 tokens to refill at 10/s

    d = bucket.try_acquire("user:1", cost=5)
    assert d.remaining == 10
    pttl = redis_client.pttl(key)
    assert 400 < pttl <= 1000 + 1  # now 10 tokens short
    assert pttl <= d.reset_after * 1000 + 1

    # Emptied: 20 tokens short. A denial then stores nothing, so the expiry stays put.
    assert bucket.try_acquire("user:1", cost=10).remaining == 0
    before = redis_client.pttl(key)
    assert 1900 < before <= 2000 + 1
    assert not bucket.try_acquire("user:1", cost=1)
    assert 0 < redis_client.pttl(key) <= before


def test_group_keys_expire_each_on_its_own_refill_time(
    redis_client: redis.Redis, prefix: str
) -> None:
    backend = rs.RedisBackend(redis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed")
    per_second = rs.TokenBucket(10, 20, backend=backend)
    per_minute = rs.TokenBucket(1, 60, backend=backend)
    group = rs.LimitGroup(per_second, per_minute)

    assert group.try_acquire("k", cost=2)
    assert 0 < redis_client.pttl(bucket_key(prefix, "k", per_second)) <= 200 + 1
    assert 1800 < redis_client.pttl(bucket_key(prefix, "k", per_minute)) <= 2000 + 1


def test_full_bucket_key_is_gone(redis_client: redis.Redis, prefix: str) -> None:
    backend = rs.RedisBackend(redis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed")
    bucket = rs.TokenBucket(1000, 5, backend=backend)  # full again 5 ms after emptying
    # Seeing the key at all needs our PTTL to arrive within its 5 ms of life: retry.
    for attempt in range(10):
        name = f"fast:{attempt}"
        d = bucket.try_acquire(name, cost=5)
        assert d.allowed
        assert d.remaining == 0
        pttl = redis_client.pttl(bucket_key(prefix, name, bucket))
        if pttl > 0:
            break
    else:
        pytest.fail("never saw the fast bucket's key before it expired")
    assert pttl <= 5 + 1
    time.sleep(0.02)
    assert redis_client.exists(bucket_key(prefix, name, bucket)) == 0
    assert list(redis_client.scan_iter(match=f"{prefix}:*", count=1000)) == []
    # The key expired because the bucket is full, not because state was lost.
    assert bucket.try_acquire(name, cost=5).allowed


# --- 2. SCRIPT FLUSH mid-run -----------------------------------------------------------


def test_script_flush_mid_run_changes_nothing(throwaway_client: redis.Redis) -> None:
    events = Events()
    backend = rs.RedisBackend(
        throwaway_client,
        prefix=new_prefix(),
        timeout=SAFE,
        on_error="fail_closed",
        listeners=[events],
    )
    bucket = rs.TokenBucket(0.001, 10, backend=backend)  # no refill to speak of
    throwaway_client.script_flush()  # the very first call meets NOSCRIPT too

    decisions = []
    for i in range(15):
        if i % 3 == 1:
            throwaway_client.script_flush()
        decisions.append(bucket.try_acquire("k"))

    assert allowed_count(decisions) == 10
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 5
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert events.seen == []  # fail_closed would have hidden an error as a denial


def test_script_flush_mid_batches_changes_nothing(throwaway_client: redis.Redis) -> None:
    events = Events()
    backend = rs.RedisBackend(
        throwaway_client,
        prefix=new_prefix(),
        timeout=SAFE,
        on_error="fail_closed",
        listeners=[events],
    )
    bucket = rs.TokenBucket(0.001, 10, backend=backend)

    decisions: list[rs.Decision] = []
    for _ in range(3):
        throwaway_client.script_flush()
        decisions += bucket.try_acquire_many(["k"] * 4 + [("other", 2)])

    keyed = [d for i, d in enumerate(decisions) if i % 5 != 4]
    other = [d for i, d in enumerate(decisions) if i % 5 == 4]
    assert [d.allowed for d in keyed] == [True] * 10 + [False] * 2
    assert [d.remaining for d in keyed[:10]] == list(range(9, -1, -1))
    assert [d.remaining for d in other] == [8, 6, 4]
    assert events.seen == []


@pytest.mark.anyio
async def test_script_flush_mid_run_changes_nothing_async(
    athrowaway_client: redis.asyncio.Redis,
) -> None:
    events = Events()
    backend = rs.RedisBackend(
        athrowaway_client,
        prefix=new_prefix(),
        timeout=SAFE,
        on_error="fail_closed",
        listeners=[events],
    )
    try:
        bucket = rs.TokenBucket(0.001, 10, backend=backend)
        await athrowaway_client.script_flush()
        decisions = []
        for i in range(15):
            if i % 3 == 1:
                await athrowaway_client.script_flush()
            decisions.append(await bucket.atry_acquire("k"))
        assert [d.allowed for d in decisions] == [True] * 10 + [False] * 5

        batches: list[rs.Decision] = []
        for _ in range(3):
            await athrowaway_client.script_flush()
            batches += await bucket.atry_acquire_many(["batch"] * 5)
        assert allowed_count(batches) == 10
        assert [d.remaining for d in batches[:10]] == list(range(9, -1, -1))
        assert events.seen == []
    finally:
        await aclose_backend(backend)


# --- 3. clock skew ---------------------------------------------------------------------


def test_frozen_skewed_client_clock_changes_nothing(redis_client: redis.Redis, prefix: str) -> None:
    backend = rs.RedisBackend(redis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed")
    bucket = rs.TokenBucket(0.1, 5, backend=backend)  # a token every 10 s
    key = bucket_key(prefix, "skew", bucket)
    now = datetime.now(timezone.utc)

    assert bucket.try_acquire("skew", cost=2).remaining == 3
    with freeze_time(now + timedelta(hours=1)):
        assert time.time() - redis_now_us(redis_client) / 1e6 > 3500  # the clock moved
        # A client clock an hour ahead would see a full bucket (remaining 4).
        ahead = bucket.try_acquire("skew")
    assert (ahead.allowed, ahead.remaining) == (True, 2)
    assert 29.0 < ahead.reset_after <= 30.0
    with freeze_time(now - timedelta(hours=1)):
        assert redis_now_us(redis_client) / 1e6 - time.time() > 3500
        # ...and one an hour behind would see the bucket empty for an hour.
        behind = bucket.try_acquire("skew")
        denied = bucket.try_acquire("skew", cost=3)
    assert (behind.allowed, behind.remaining) == (True, 1)
    assert (denied.allowed, denied.remaining) == (False, 1)
    assert 19.0 < denied.retry_after <= 20.0
    # The stored deadline is on Redis's clock: 40 s (four tokens) after Redis's now.
    full_at = float(redis_client.get(key) or 0)
    assert 39e6 < full_at - redis_now_us(redis_client) <= 40e6


HAMMER_CHILD = r"""
import json, sys, time
from datetime import datetime, timedelta, timezone

import redis
from freezegun import freeze_time
from redis.crc import key_slot

import resilience as rs

url, prefix, key, go_key = sys.argv[1:5]
rate, capacity, shift = (float(a) for a in sys.argv[5:8])
client = redis.Redis.from_url(url)
events = []
backend = rs.RedisBackend(
    client, prefix=prefix, timeout=2.0, on_error="fail_closed", listeners=[events.append]
)
bucket = rs.TokenBucket(rate, capacity, backend=backend)


def redis_us():
    s, us = client.time()
    return int(s) * 1_000_000 + int(us)


with freeze_time(datetime.now(timezone.utc) + timedelta(seconds=shift), tick=True):
    skew = time.time() - redis_us() / 1e6
    bucket.try_acquire(key + ":warm-up")  # connect and load the script before the start
    print("ready", flush=True)
    while (raw := client.get(go_key)) is None:
        time.sleep(0.001)
    deadline = int(raw)
    admitted = denied = 0
    last = 0
    while last < deadline:
        for _ in range(10):
            if bucket.try_acquire(key):
                admitted += 1
            else:
                denied += 1
        last = redis_us()
print(json.dumps({"admitted": admitted, "denied": denied, "skew": skew,
                  "last": last, "outages": len(events)}), flush=True)
"""


@pytest.mark.slow
def test_processes_with_skewed_clocks_share_one_bucket(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    rate, capacity, seconds = 200.0, 50.0, 3.0
    key, go_key = "hammered", f"{prefix}:go"
    shifts = [3600.0, -3600.0, 0.0, 0.0]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    child = [sys.executable, "-c", HAMMER_CHILD, redis_url, prefix, key, go_key]
    child += [str(rate), str(capacity)]
    procs = [
        subprocess.Popen(
            [*child, str(shift)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for shift in shifts
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        start = redis_now_us(redis_client)
        deadline = start + int(seconds * 1e6)
        redis_client.set(go_key, deadline, px=60_000)
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=30)
            assert p.returncode == 0
            results.append(json.loads(out.strip().splitlines()[-1]))
        end = redis_now_us(redis_client)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()

    for shift, r in zip(shifts, results, strict=True):
        assert abs(r["skew"] - shift) < 60, "freezegun did not shift the child's clock"
        assert r["outages"] == 0
        assert r["admitted"] > 0  # every child, skewed or not, got tokens
        assert r["last"] >= deadline
    admitted = sum(r["admitted"] for r in results)
    denied = sum(r["denied"] for r in results)
    elapsed = (end - start) / 1e6
    window = (deadline - start) / 1e6
    assert denied > admitted  # the bucket was saturated throughout
    assert admitted <= capacity + rate * elapsed + 1
    # Tighter: every admitted call came before its process's last TIME reading.
    assert admitted <= capacity + rate * (max(r["last"] for r in results) - start) / 1e6 + 1
    assert admitted >= 0.9 * (capacity + rate * window)


# --- 4. Redis Cluster ------------------------------------------------------------------


@pytest.fixture
def cluster_client(cluster: RedisCluster3) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        yield client
    finally:
        client.close()


def keys_per_node(cluster: RedisCluster3, prefix: str) -> list[int]:
    counts = []
    for node in cluster.nodes:
        with node.client() as c:
            counts.append(len(list(c.scan_iter(match=f"{prefix}:*", count=1000))))
    return counts


@pytest.mark.slow
def test_cluster_single_key_decisions_on_many_slots(
    cluster: RedisCluster3, cluster_client: redis.RedisCluster
) -> None:
    prefix = new_prefix()
    events = Events()
    backend = rs.RedisBackend(
        cluster_client, prefix=prefix, timeout=SAFE, on_error="fail_closed", listeners=[events]
    )
    bucket = rs.TokenBucket(0.001, 3, backend=backend)
    users = [f"user:{i}" for i in range(40)]
    for user in users:
        decisions = [bucket.try_acquire(user) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    slots = {key_slot(bucket_key(prefix, u, bucket).encode()) for u in users}
    assert len(slots) > 30
    per_node = keys_per_node(cluster, prefix)
    assert sum(per_node) == len(users)
    assert all(n > 0 for n in per_node), per_node  # every node took some keys

    # SCRIPT FLUSH on every node: NOSCRIPT, reload on all primaries, same answers.
    for node in cluster.nodes:
        with node.client() as c:
            c.script_flush()
    assert [bucket.try_acquire(u).allowed for u in users[:10]] == [False] * 10
    fresh = [f"fresh:{i}" for i in range(10)]
    assert [bucket.try_acquire(u).remaining for u in fresh] == [2] * 10
    assert events.seen == []


@pytest.mark.slow
def test_cluster_limit_group_is_one_call_on_one_slot(
    cluster: RedisCluster3, cluster_client: redis.RedisCluster
) -> None:
    prefix = new_prefix()
    events = Events()
    backend = rs.RedisBackend(
        cluster_client, prefix=prefix, timeout=SAFE, on_error="fail_closed", listeners=[events]
    )
    small = rs.TokenBucket(0.001, 3, backend=backend)
    large = rs.TokenBucket(0.001, 5, backend=backend, name="large")
    group = rs.LimitGroup(small, large)
    for user in [f"user:{i}" for i in range(20)]:
        decisions = [group.try_acquire(user) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        # Nothing was taken from the larger limit by the denied call: 5 - 3 = 2 left.
        assert large.try_acquire(user, cost=2).remaining == 0
        assert not large.try_acquire(user)
        slots = {key_slot(bucket_key(prefix, user, b).encode()) for b in (small, large)}
        assert len(slots) == 1
    assert events.seen == []


@pytest.mark.slow
def test_cluster_limit_group_with_brace_in_key(cluster_client: redis.RedisCluster) -> None:
    backend = rs.RedisBackend(cluster_client, prefix=new_prefix(), on_error="fail_closed")
    group = rs.LimitGroup(
        rs.TokenBucket(0.001, 3, backend=backend),
        rs.TokenBucket(0.001, 5, backend=backend, name="large"),
    )
    assert [group.try_acquire("}x").remaining for _ in range(3)] == [2, 1, 0]


@pytest.mark.slow
def test_cluster_try_acquire_many(cluster_client: redis.RedisCluster) -> None:
    backend = rs.RedisBackend(cluster_client, prefix=new_prefix(), on_error="fail_closed")
    bucket = rs.TokenBucket(0.001, 3, backend=backend)
    decisions = bucket.try_acquire_many([f"user:{i % 10}" for i in range(40)])
    assert allowed_count(decisions) == 30


@pytest.fixture
async def acluster_client(
    require_asyncio: None, cluster: RedisCluster3
) -> AsyncIterator[redis.asyncio.RedisCluster]:
    client = redis.asyncio.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_cluster_decisions_and_group(
    cluster: RedisCluster3, acluster_client: redis.asyncio.RedisCluster
) -> None:
    prefix = new_prefix()
    events = Events()
    backend = rs.RedisBackend(
        acluster_client, prefix=prefix, timeout=SAFE, on_error="fail_closed", listeners=[events]
    )
    bucket = rs.TokenBucket(0.001, 3, backend=backend)
    group = rs.LimitGroup(bucket, rs.TokenBucket(0.001, 5, backend=backend, name="large"))
    users = [f"user:{i}" for i in range(30)]
    for user in users:
        decisions = [await bucket.atry_acquire(user) for _ in range(4)]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert not decisions[-1]
        grouped = [await group.atry_acquire(f"g:{user}") for _ in range(4)]
        assert [d.allowed for d in grouped] == [True, True, True, False]
    assert all(n > 0 for n in keys_per_node(cluster, prefix))
    assert events.seen == []


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_cluster_try_acquire_many(
    acluster_client: redis.asyncio.RedisCluster,
) -> None:
    backend = rs.RedisBackend(acluster_client, prefix=new_prefix(), on_error="fail_closed")
    bucket = rs.TokenBucket(0.001, 3, backend=backend)
    decisions = await bucket.atry_acquire_many([f"user:{i % 10}" for i in range(40)])
    assert allowed_count(decisions) == 30


# --- 5. outages, sync ------------------------------------------------------------------


def expected_while_down(policy: str, capacity: int, n: int) -> list[bool]:
    if policy == "fail_open":
        return [True] * n
    if policy == "fail_closed":
        return [False] * n
    return [True] * capacity + [False] * (n - capacity)  # local: same limits, in memory


@pytest.mark.parametrize("policy", POLICIES)
def test_cut_outage_sync(
    policy: str, proxy: FaultProxy, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    events = Events()
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(
            client,
            prefix=prefix,
            timeout=SAFE,
            on_error=policy,
            breaker=fast_breaker(),
            listeners=[events],
        )
        bucket = rs.TokenBucket(0.001, 5, backend=backend)
        assert [bucket.try_acquire("pre").remaining for _ in range(2)] == [4, 3]
        assert redis_client.exists(bucket_key(prefix, "pre", bucket)) == 1

        proxy.cut(refuse=False)  # connections accepted and reset: attempts are counted
        before = proxy.stats
        decisions = [bucket.try_acquire("out") for _ in range(1000)]
        after = proxy.stats
        assert [d.allowed for d in decisions] == expected_while_down(policy, 5, 1000)
        if policy == "local":
            assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
        assert 1 <= after.rejected - before.rejected <= HANDFUL
        assert after.upstream_connects == before.upstream_connects
        assert events.availability == [False]
        assert redis_client.exists(bucket_key(prefix, "out", bucket)) == 0

        proxy.restore()
        time.sleep(RECOVERY + 0.05)
        d = bucket.try_acquire("pre")
        assert (d.allowed, d.remaining) == (True, 2)  # Redis's count: 5 - 3
        assert proxy.stats.upstream_connects > after.upstream_connects
        assert bucket.try_acquire("out").remaining == 4  # Redis never saw the outage calls
        assert redis_client.exists(bucket_key(prefix, "out", bucket)) == 1
        assert events.availability == [False, True]
    finally:
        client.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_blackhole_outage_sync(policy: str, proxy: FaultProxy, redis_url: str, prefix: str) -> None:
    events = Events()
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(
            client,
            prefix=prefix,
            timeout=0.05,
            on_error=policy,
            breaker=fast_breaker(),
            listeners=[events],
        )
        bucket = rs.TokenBucket(0.001, 5, backend=backend)
        assert bucket.try_acquire("pre").remaining == 4

        proxy.blackhole()
        before = proxy.stats
        started = time.monotonic()
        first = bucket.try_acquire("out")
        took = time.monotonic() - started
        assert 0.04 <= took < 0.4  # the 0.05 s budget, not redis-py's default seconds
        assert events.availability == [False]
        assert isinstance(events.seen[0].error, redis.TimeoutError)
        rest = [bucket.try_acquire("out") for _ in range(999)]
        assert [d.allowed for d in [first, *rest]] == expected_while_down(policy, 5, 1000)
        assert proxy.stats.accepted - before.accepted <= HANDFUL

        proxy.restore()
        time.sleep(RECOVERY + 0.05)
        d = bucket.try_acquire("pre")
        assert (d.allowed, d.remaining) == (True, 3)
        assert events.availability == [False, True]
    finally:
        client.close()


# --- 6. outages, async -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("policy", POLICIES)
async def test_cut_outage_async(
    policy: str,
    require_asyncio: None,
    proxy: FaultProxy,
    redis_url: str,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    events = Events()
    client = redis.asyncio.Redis.from_url(proxy.url_for(redis_url))
    backend = rs.RedisBackend(
        client,
        prefix=prefix,
        timeout=SAFE,
        on_error=policy,
        breaker=fast_breaker(),
        listeners=[events],
    )
    try:
        bucket = rs.TokenBucket(0.001, 5, backend=backend)
        assert [(await bucket.atry_acquire("pre")).remaining for _ in range(2)] == [4, 3]

        proxy.cut(refuse=False)
        before = proxy.stats
        decisions = [await bucket.atry_acquire("out") for _ in range(1000)]
        after = proxy.stats
        assert [d.allowed for d in decisions] == expected_while_down(policy, 5, 1000)
        # The first call fails on its reset connection without reconnecting.
        assert after.rejected - before.rejected <= HANDFUL
        assert after.upstream_connects == before.upstream_connects
        assert events.availability == [False]

        proxy.restore()
        await anyio.sleep(RECOVERY + 0.05)
        d = await bucket.atry_acquire("pre")
        assert (d.allowed, d.remaining) == (True, 2)
        assert redis_client.exists(bucket_key(prefix, "out", bucket)) == 0
        assert (await bucket.atry_acquire("out")).remaining == 4
        assert events.availability == [False, True]
    finally:
        await aclose_backend(backend)
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("policy", POLICIES)
async def test_blackhole_outage_async(
    policy: str, require_asyncio: None, proxy: FaultProxy, redis_url: str, prefix: str
) -> None:
    events = Events()
    client = redis.asyncio.Redis.from_url(proxy.url_for(redis_url))
    backend = rs.RedisBackend(
        client,
        prefix=prefix,
        timeout=0.05,
        on_error=policy,
        breaker=fast_breaker(),
        listeners=[events],
    )
    try:
        bucket = rs.TokenBucket(0.001, 5, backend=backend)
        assert (await bucket.atry_acquire("pre")).remaining == 4

        proxy.blackhole()
        before = proxy.stats
        started = time.monotonic()
        first = await bucket.atry_acquire("out")
        took = time.monotonic() - started
        assert 0.04 <= took < 0.4
        assert events.availability == [False]
        rest = [await bucket.atry_acquire("out") for _ in range(999)]
        assert [d.allowed for d in [first, *rest]] == expected_while_down(policy, 5, 1000)
        assert proxy.stats.accepted - before.accepted <= HANDFUL

        proxy.restore()
        await anyio.sleep(RECOVERY + 0.05)
        d = await bucket.atry_acquire("pre")
        assert (d.allowed, d.remaining) == (True, 3)
        assert events.availability == [False, True]
    finally:
        await aclose_backend(backend)
        await client.aclose()


# --- 7. listeners and logging ----------------------------------------------------------


def warnings_from_resilience(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "resilience" and r.levelno == logging.WARNING
    ]


def test_each_transition_is_reported_and_logged_once(
    proxy: FaultProxy,
    redis_url: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilience")
    events = Events()
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(
            client,
            prefix=prefix,
            timeout=SAFE,
            on_error="local",
            breaker=fast_breaker(),
            listeners=[events],
        )
        bucket = rs.TokenBucket(100, 10, backend=backend)
        assert bucket.try_acquire("k")
        assert events.seen == []
        assert warnings_from_resilience(caplog) == []

        proxy.cut(refuse=False)
        for _ in range(500):
            bucket.try_acquire("k")
        assert events.availability == [False]
        down = events.seen[0]
        assert down.on_error is rs.OnError.LOCAL
        assert isinstance(down.error, (redis.ConnectionError, OSError))
        assert prefix in down.backend
        logged = warnings_from_resilience(caplog)
        assert len(logged) == 1
        assert "unavailable" in logged[0]

        proxy.restore()
        time.sleep(RECOVERY + 0.05)
        for _ in range(500):
            bucket.try_acquire("k")
        assert events.availability == [False, True]
        assert events.seen[1].error is None
        logged = warnings_from_resilience(caplog)
        assert len(logged) == 2
        assert "recovered" in logged[1]
    finally:
        client.close()


def test_long_outage_is_reported_once(
    proxy: FaultProxy,
    redis_url: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilience")
    events = Events()
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(
            client,
            prefix=prefix,
            timeout=SAFE,
            on_error="local",
            breaker=fast_breaker(),
            listeners=[events],
        )
        bucket = rs.TokenBucket(100, 10, backend=backend)
        assert bucket.try_acquire("k")
        proxy.cut(refuse=False)
        for _ in range(3):  # three probes, each failing: still the same outage
            for _ in range(100):
                bucket.try_acquire("k")
            time.sleep(RECOVERY + 0.05)
        proxy.restore()
        bucket.try_acquire("k")
        assert events.availability == [False, True]
        assert len(warnings_from_resilience(caplog)) == 2
    finally:
        client.close()


def test_outage_warning_says_what_failed(
    proxy: FaultProxy, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilience")
    events = Events()
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(
            client,
            prefix=prefix,
            timeout=SAFE,
            on_error="local",
            breaker=fast_breaker(),
            listeners=[events],
        )
        bucket = rs.TokenBucket(100, 10, backend=backend)
        assert bucket.try_acquire("k")
        proxy.cut(refuse=False)
        bucket.try_acquire("k")
        assert events.availability == [False]
        error = events.seen[0].error
        assert error is not None
        assert str(error)  # redis-py says what happened...
        [logged] = warnings_from_resilience(caplog)
        assert str(error) in logged  # ...and the log should say it too
        backend.close()
    finally:
        client.close()


# --- 8. wrong client kind --------------------------------------------------------------


@pytest.mark.anyio
async def test_sync_backend_refuses_async_calls(redis_client: redis.Redis, prefix: str) -> None:
    events = Events()
    backend = rs.RedisBackend(
        redis_client, prefix=prefix, timeout=SAFE, on_error="fail_open", listeners=[events]
    )
    bucket = rs.TokenBucket(10, 20, backend=backend)
    group = rs.LimitGroup(bucket, rs.TokenBucket(1, 5, backend=backend))
    # A TypeError, not a fallback decision: fail_open would otherwise hide the mistake.
    with pytest.raises(TypeError, match=r"atry_acquire\(\).*sync redis.*call try_acquire\(\)"):
        await bucket.atry_acquire("k")
    with pytest.raises(TypeError, match=r"call try_acquire\(\)"):
        await group.atry_acquire("k")
    with pytest.raises(TypeError, match=r"call try_acquire_many\(\)"):
        await bucket.atry_acquire_many(["k"])
    with pytest.raises(TypeError, match=r"call try_acquire\(\)"):
        await bucket.aacquire("k", timeout=1.0)
    with pytest.raises(TypeError, match=r"call close\(\)"):
        await backend.aclose()
    assert events.seen == []
    assert backend.guard.breaker.state is rs.CircuitState.CLOSED  # mistakes are not outages
    assert bucket.try_acquire("k").remaining == 19  # nothing was consumed by the mistakes
    backend.close()


def test_async_backend_refuses_sync_calls() -> None:
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379)  # never connects
    backend = rs.RedisBackend(client, prefix="never", on_error="fail_open")
    bucket = rs.TokenBucket(10, 20, backend=backend)
    with pytest.raises(TypeError, match=r"try_acquire\(\).*redis\.asyncio.*call atry_acquire\(\)"):
        bucket.try_acquire("k")
    with pytest.raises(TypeError, match=r"call atry_acquire\(\)"):
        rs.LimitGroup(bucket, rs.TokenBucket(1, 5, backend=backend)).try_acquire("k")
    with pytest.raises(TypeError, match=r"call atry_acquire_many\(\)"):
        bucket.try_acquire_many(["k"])
    with pytest.raises(TypeError, match=r"call atry_acquire\(\)"):
        bucket.acquire("k", timeout=1.0)
    with pytest.raises(TypeError, match=r"call aclose\(\)"):
        backend.close()


def proxy_idle(proxy: FaultProxy) -> bool:
    """Wait (up to 1 s) until the proxy has no client connection open."""
    for _ in range(100):  # the proxy sees a close a moment after the client makes it
        if proxy.stats.active == 0:
            return True
        time.sleep(0.01)
    return False


def test_close_releases_the_backends_own_pool(
    proxy: FaultProxy, redis_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(client, prefix=prefix)
        assert rs.TokenBucket(10, 20, backend=backend).try_acquire("k")
        assert proxy.stats.active == 1  # the backend's own connection: the client made none
        backend.close()
        assert proxy_idle(proxy)
        assert client.ping()  # the application's client is not closed for it
    finally:
        client.close()


@pytest.mark.anyio
async def test_aclose_releases_the_backends_own_pool(
    require_asyncio: None, proxy: FaultProxy, redis_url: str, prefix: str
) -> None:
    client = redis.asyncio.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(client, prefix=prefix)
        assert await rs.TokenBucket(10, 20, backend=backend).atry_acquire("k")
        assert proxy.stats.active == 1
        await backend.aclose()
        assert proxy_idle(proxy)
        assert await client.ping()
    finally:
        await client.aclose()


# --- 9. batches ------------------------------------------------------------------------


def batch_items() -> list[tuple[str, float]]:
    """200 requests: seven keys with mixed costs, then one key asked 30 times."""
    items = [(f"k{i % 7}", float(1 + i % 3)) for i in range(170)]
    return items + [("same", 1.0)] * 30


def expected_batch(items: list[tuple[str, float]]) -> list[rs.Decision]:
    reference = rs.TokenBucket(0.001, 20, clock=FakeClock())
    return [reference.try_acquire(key, cost) for key, cost in items]


def assert_batch_matches(got: list[rs.Decision], want: list[rs.Decision]) -> None:
    assert len(got) == len(want) == 200
    assert [(d.allowed, d.remaining) for d in got] == [(d.allowed, d.remaining) for d in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g.retry_after - w.retry_after) < 1.0  # 1 s is 0.1% of a token here
        assert g.limit == 20
    same = got[170:]
    assert [d.remaining for d in same[:20]] == list(range(19, -1, -1))
    assert [d.allowed for d in same] == [True] * 20 + [False] * 10


def test_batch_of_200_in_one_call(redis_client: redis.Redis, prefix: str) -> None:
    events = Events()
    backend = rs.RedisBackend(
        redis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed", listeners=[events]
    )
    bucket = rs.TokenBucket(0.001, 20, backend=backend)
    items = batch_items()
    got = bucket.try_acquire_many(items)
    assert_batch_matches(got, expected_batch(items))
    assert events.seen == []
    # The batch's state is in Redis: the next single call continues from it.
    assert not bucket.try_acquire("same")
    assert len(list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))) == 8


@pytest.mark.anyio
async def test_batch_of_200_in_one_call_async(
    aredis_client: redis.asyncio.Redis, prefix: str
) -> None:
    events = Events()
    backend = rs.RedisBackend(
        aredis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed", listeners=[events]
    )
    try:
        bucket = rs.TokenBucket(0.001, 20, backend=backend)
        items = batch_items()
        got = await bucket.atry_acquire_many(items)
        assert_batch_matches(got, expected_batch(items))
        assert events.seen == []
    finally:
        await aclose_backend(backend)


# --- 10. the bucket layout, read back ----------------------------------------------------


def test_layout_functions_match_what_the_backend_writes(
    redis_client: redis.Redis, prefix: str
) -> None:
    backend = rs.RedisBackend(redis_client, prefix=prefix, timeout=SAFE, on_error="fail_closed")
    default = rs.TokenBucket(rate=1.0, capacity=10, backend=backend)
    custom = rs.TokenBucket(rate=2.0, capacity=4, backend=backend, name="api")
    odd_key = "we{ir}d%key"
    for _ in range(4):
        assert default.try_acquire("user:1")
    assert custom.try_acquire(odd_key, cost=3)

    key = layout.bucket_key(prefix, "user:1", default.name)
    assert key == bucket_key(prefix, "user:1", default)
    assert redis_client.exists(key) == 1
    odd = layout.bucket_key(prefix, odd_key, "api")
    assert odd == f"{prefix}:{{we%7Bir%7Dd%25key}}:api"
    assert redis_client.exists(odd) == 1
    assert layout.split_bucket_key(prefix, odd) == ("we%7Bir%7Dd%25key", "api")
    assert layout.split_bucket_key(prefix, f"{prefix}:other") is None
    assert layout.split_bucket_key("elsewhere", key) is None

    assert layout.limit_from_name(default.name) == rs.Limit(rate=1.0, capacity=10)
    assert layout.limit_from_name("api") is None
    assert layout.limit_from_name("1@0/s") is None  # a name that only looks like a limit

    now = redis_now_us(redis_client)
    value = redis_client.get(key)
    assert value is not None
    assert 3.5 <= layout.full_in(value, now) <= 4.0  # 4 tokens at 1/s
    assert 6.0 <= layout.tokens_now(value, now, 1.0, 10) <= 6.5
    assert layout.tokens_now(now - 5_000_000, now, 1.0, 10) == 10  # full: never above

    levels = {(lv.key, lv.name): lv for lv in layout.bucket_levels(redis_client, prefix)}
    assert set(levels) == {("user:1", default.name), ("we%7Bir%7Dd%25key", "api")}
    assert levels["user:1", default.name].capacity == 10
    tokens = levels["user:1", default.name].tokens
    assert tokens is not None
    assert 6.0 <= tokens <= 6.5
    assert levels["we%7Bir%7Dd%25key", "api"].tokens is None  # the name does not say
    given = list(layout.bucket_levels(redis_client, prefix, match="we*", rate=2.0, capacity=4))
    assert [(lv.name, lv.capacity) for lv in given] == [("api", 4)]
    assert given[0].tokens == pytest.approx(1.0, abs=0.3)
    with pytest.raises(ValueError, match="together"):
        list(layout.bucket_levels(redis_client, prefix, rate=1.0))
    backend.close()
