"""Reading a key's bucket without taking tokens (peek), and resetting one key (reset).

- peek answers what try_acquire would answer at that moment, takes nothing, and creates
  nothing (no table entry in memory, no key in Redis); for a LimitGroup, every limit.
- reset makes the key's bucket full again (memory: its entry dropped; Redis: its keys,
  every limit's for a group, deleted).
- Memory, Redis and a Redis Cluster; sync and async (memory on asyncio and trio,
  redis.asyncio on asyncio only). Memory runs on a FakeClock; Redis runs on Redis's own
  clock with rates slow enough that nothing refills during a test, so nothing sleeps.
- While Redis is unreachable, peek answers what each ``on_error`` policy would answer and
  reset says it could not reach Redis.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from support.faultproxy import FaultProxy
from support.redis_servers import RedisCluster3

import resilience as rs
from resilience.limiter import redis as layout
from resilience.testing import FakeClock

SLOW = 0.01  # tokens per second: one token per 100 s, so no refill during a test
# (backend kind, anyio backend): the async memory calls on asyncio and trio; sync calls
# once (they do not depend on the event loop); redis.asyncio runs only on asyncio.
KINDS = [
    ("memory", "asyncio"),
    ("amemory", "asyncio"),
    ("amemory", "trio"),
    ("redis", "asyncio"),
    ("aredis", "asyncio"),
]
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio
each_kind = pytest.mark.parametrize(
    ("h", "anyio_backend"), KINDS, indirect=["h"], ids=[f"{k}-{b}" for k, b in KINDS]
)


class Harness:
    """The sync or async API of one backend kind, behind one signature."""

    def __init__(
        self,
        kind: str,
        backend: Any,
        clock: FakeClock | None,
        client: redis.Redis | None = None,
        prefix: str = "",
    ) -> None:
        self.kind = kind
        self.backend = backend
        self.clock = clock
        self.client = client  # a sync client on the same Redis, to look at keys
        self.prefix = prefix
        self.is_async = kind.startswith("a")

    def bucket(self, capacity: float, name: str | None = None, rate: float = SLOW) -> Any:
        return rs.TokenBucket(rate, capacity, backend=self.backend, name=name, clock=self.clock)

    async def try_acquire(self, lim: Any, key: str, cost: float = 1) -> rs.Decision:
        if self.is_async:
            return await lim.atry_acquire(key, cost)  # type: ignore[no-any-return]
        return lim.try_acquire(key, cost)  # type: ignore[no-any-return]

    async def peek(self, lim: Any, key: str, cost: float = 1) -> rs.Decision:
        if self.is_async:
            return await lim.apeek(key, cost)  # type: ignore[no-any-return]
        return lim.peek(key, cost)  # type: ignore[no-any-return]

    async def reset(self, lim: Any, key: str) -> bool:
        if self.is_async:
            return await lim.areset(key)  # type: ignore[no-any-return]
        return lim.reset(key)  # type: ignore[no-any-return]

    def stored(self) -> int:
        """How many buckets the backend holds: table entries, or Redis keys."""
        if self.client is None:
            return len(self.backend)
        return len(list(self.client.scan_iter(match=f"{self.prefix}:*", count=1000)))

    def same(self, peeked: rs.Decision, decided: rs.Decision) -> None:
        """Memory answers exactly; Redis a moment later on its own clock."""
        if self.clock is not None:
            assert peeked == decided
            return
        assert peeked[:2] == decided[:2]  # allowed, remaining
        assert peeked.limit == decided.limit
        assert peeked.retry_after == pytest.approx(decided.retry_after, abs=0.05)
        assert peeked.reset_after == pytest.approx(decided.reset_after, abs=0.05)


@pytest.fixture
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind = request.param
    if kind in ("memory", "amemory"):
        yield Harness(kind, rs.MemoryBackend(), FakeClock())
        return
    redis_url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    look = redis.Redis.from_url(redis_url)
    try:
        if kind == "redis":
            client = redis.Redis.from_url(redis_url)
            backend = rs.RedisBackend(client, prefix=prefix, timeout=1.0)
            yield Harness(kind, backend, None, look, prefix)
            backend.close()
            client.close()
        else:
            aclient = redis.asyncio.Redis.from_url(redis_url)
            backend = rs.RedisBackend(aclient, prefix=prefix, timeout=1.0)
            yield Harness(kind, backend, None, look, prefix)
            await backend.aclose()
            await aclient.aclose()
    finally:
        look.close()


# --- peek ------------------------------------------------------------------------------


@each_kind
@pytest.mark.anyio
async def test_peek_agrees_with_what_try_acquire_then_answers(h: Harness) -> None:
    lim = h.bucket(3)
    for _ in range(5):  # three allowed, then denied
        h.same(await h.peek(lim, "k"), await h.try_acquire(lim, "k"))
    first = await h.peek(lim, "k")
    assert not first.allowed
    assert first.remaining == 0
    assert first.retry_after == pytest.approx(100.0, abs=0.05)
    assert first.reset_after == pytest.approx(300.0, abs=0.05)
    assert first.limit == 3


@each_kind
@pytest.mark.anyio
async def test_peek_with_a_cost(h: Harness) -> None:
    lim = h.bucket(10)
    whole = await h.peek(lim, "k", 10)
    assert (whole.allowed, whole.remaining, whole.retry_after) == (True, 0, 0.0)
    assert whole.reset_after == pytest.approx(1000.0, abs=0.05)
    h.same(await h.peek(lim, "k", 7), await h.try_acquire(lim, "k", 7))
    denied = await h.peek(lim, "k", 4)
    assert (denied.allowed, denied.remaining) == (False, 3)
    assert denied.retry_after == pytest.approx(100.0, abs=0.05)
    h.same(denied, await h.try_acquire(lim, "k", 4))
    h.same(await h.peek(lim, "k", 3), await h.try_acquire(lim, "k", 3))


@each_kind
@pytest.mark.anyio
async def test_many_peeks_take_nothing(h: Harness) -> None:
    lim = h.bucket(3)
    assert (await h.try_acquire(lim, "k")).remaining == 2
    peeks = [await h.peek(lim, "k") for _ in range(50)]
    assert {(p.allowed, p.remaining) for p in peeks} == {(True, 1)}
    assert [(await h.try_acquire(lim, "k")).allowed for _ in range(3)] == [True, True, False]


@each_kind
@pytest.mark.anyio
async def test_peek_on_a_missing_key_creates_nothing(h: Harness) -> None:
    lim = h.bucket(3)
    for key in ("never-seen", "{brace}", "x" * 300):
        peeked = await h.peek(lim, key)
        assert (peeked.allowed, peeked.remaining, peeked.limit) == (True, 2, 3)
    assert h.stored() == 0
    if h.client is not None:
        assert h.client.exists(layout.bucket_key(h.prefix, "never-seen", lim.name)) == 0


@each_kind
@pytest.mark.anyio
async def test_group_peek_is_the_groups_answer(h: Harness) -> None:
    per_second = h.bucket(3, name="sec")
    per_hour = h.bucket(5, name="hour", rate=SLOW / 10)
    group = rs.LimitGroup(per_second, per_hour)
    assert (await h.peek(group, "u")).remaining == 2  # the tighter limit
    assert h.stored() == 0
    for _ in range(4):  # three allowed, then the second limit denies
        h.same(await h.peek(group, "u"), await h.try_acquire(group, "u"))
    denied = await h.peek(group, "u")
    assert not denied.allowed
    assert denied.limit == 3  # it describes the limit that denies
    # The hour limit alone still has 2: the group's peek took nothing from it either.
    assert (await h.peek(per_hour, "u", 2)).allowed
    assert not (await h.peek(per_hour, "u", 3)).allowed
    # Exhaust the hour limit on another key: the group is denied by it alone.
    assert (await h.try_acquire(per_hour, "v", 5)).allowed
    by_hour = await h.peek(group, "v")
    assert (by_hour.allowed, by_hour.limit) == (False, 5)
    assert by_hour.retry_after == pytest.approx(1000.0, abs=0.05)
    assert (await h.peek(per_second, "v")).allowed
    h.same(by_hour, await h.try_acquire(group, "v"))


# --- reset -----------------------------------------------------------------------------


@each_kind
@pytest.mark.anyio
async def test_reset_restores_full_capacity(h: Harness) -> None:
    lim = h.bucket(3)
    assert [(await h.try_acquire(lim, "k")).allowed for _ in range(4)] == [True] * 3 + [False]
    assert (await h.try_acquire(lim, "other")).remaining == 2
    assert h.stored() == 2
    assert await h.reset(lim, "k") is True
    assert h.stored() == 1  # only "other" is left
    assert (await h.peek(lim, "k")).remaining == 2
    assert [(await h.try_acquire(lim, "k")).allowed for _ in range(4)] == [True] * 3 + [False]
    assert (await h.peek(lim, "other")).remaining == 1  # other keys keep their tokens


@each_kind
@pytest.mark.anyio
async def test_reset_of_a_missing_key_is_a_no_op(h: Harness) -> None:
    lim = h.bucket(3)
    assert await h.reset(lim, "never-seen") is True
    assert h.stored() == 0


@each_kind
@pytest.mark.anyio
async def test_group_reset_resets_every_limit(h: Harness) -> None:
    per_second = h.bucket(3, name="sec")
    per_hour = h.bucket(5, name="hour")
    other = h.bucket(2, name="other")  # same backend, not in the group
    group = rs.LimitGroup(per_second, per_hour)
    assert [(await h.try_acquire(group, "u")).allowed for _ in range(4)] == [True] * 3 + [False]
    assert (await h.try_acquire(other, "u")).allowed
    assert h.stored() == 3
    assert await h.reset(group, "u") is True
    assert h.stored() == 1  # the group's two buckets are gone, the other limit's stays
    assert (await h.peek(per_second, "u")).remaining == 2
    assert (await h.peek(per_hour, "u", 5)).allowed
    assert (await h.peek(other, "u")).remaining == 0
    # One limit's reset leaves the group's other limit as it was.
    assert (await h.try_acquire(group, "u", 3)).allowed
    assert await h.reset(per_second, "u") is True
    assert (await h.peek(per_hour, "u")).remaining == 1
    assert (await h.peek(group, "u")).remaining == 1


# --- memory on a FakeClock -------------------------------------------------------------


def test_peek_follows_the_refill_exactly() -> None:
    clock = FakeClock()
    lim = rs.TokenBucket(2.0, 4, clock=clock)
    assert lim.try_acquire("k", 4).allowed
    empty = lim.peek("k")
    assert (empty.allowed, empty.remaining, empty.limit) == (False, 0, 4)
    assert (empty.retry_after, empty.reset_after) == pytest.approx((0.5, 2.0))
    clock.advance(0.25)
    assert lim.peek("k").retry_after == pytest.approx(0.25)
    assert lim.peek("k") == lim.try_acquire("k")
    clock.advance(0.25)
    assert lim.peek("k") == (True, 0, 0.0, 2.0, 4)
    clock.advance(10.0)  # full again: the entry is stale, peek reads it as full
    assert lim.peek("k", 4) == (True, 0, 0.0, 2.0, 4)
    assert lim.peek("k") == lim.try_acquire("k")


# Costs and pauses that each of these limits can take (a cost never above a capacity).
steps = st.lists(
    st.tuples(st.sampled_from([1, 1, 1, 2, 3, 0.5]), st.floats(0.0, 3.0)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps=steps)
def test_peek_always_agrees_with_try_acquire(steps: list[tuple[float, float]]) -> None:
    clock = FakeClock()
    backend = rs.MemoryBackend()
    single = rs.TokenBucket(1.5, 3, backend=backend, clock=clock)
    group = rs.LimitGroup(single, rs.TokenBucket(0.7, 5, backend=backend, name="b", clock=clock))
    for cost, pause in steps:
        clock.advance(pause)
        for lim, key in ((single, "s"), (group, "g")):
            peeked = lim.peek(key, cost)
            assert lim.peek(key, cost) == peeked  # a peek changes nothing
            assert lim.try_acquire(key, cost) == peeked


def test_peeks_are_not_decisions_for_listeners_or_counters() -> None:
    lim = rs.TokenBucket(1.0, 3, clock=FakeClock())
    seen: list[rs.LimiterDecision] = []
    lim.add_listener(seen.append)
    telemetry = lim.telemetry()
    for _ in range(5):
        lim.peek("k")
    assert lim.reset("k") is True
    assert seen == []
    assert telemetry.read() == {"allowed": 0, "denied": 0}
    lim.try_acquire("k")
    assert len(seen) == 1
    assert telemetry.read() == {"allowed": 1, "denied": 0}


def test_the_hot_path_survives_peeks_and_resets() -> None:
    lim = rs.TokenBucket(1.0, 3, clock=FakeClock())
    hot = lim.__dict__["try_acquire"]
    lim.peek("k")
    lim.reset("k")
    assert lim.__dict__["try_acquire"] is hot


def test_reset_against_try_acquire_from_many_threads() -> None:
    """Each reset gives back at most one bucketful, and nothing is ever lost or torn."""
    clock = FakeClock()  # frozen: no refill, so every token admitted comes from a reset
    lim = rs.TokenBucket(1.0, 10, clock=clock)
    group = rs.LimitGroup(lim, rs.TokenBucket(1.0, 20, backend=lim.backend, name="wide"))
    admitted = [0] * 8
    start = threading.Barrier(9, timeout=5)
    resets = 50

    def worker(i: int) -> None:
        start.wait()
        for n in range(400):
            target = group if n % 2 else lim
            if target.try_acquire("shared"):
                admitted[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    start.wait()
    for _ in range(resets):
        assert group.reset("shared") is True
    for t in threads:
        t.join()
    assert 10 <= sum(admitted) <= 10 * (resets + 1)
    assert group.reset("shared") is True
    assert len(lim.backend) == 0
    assert [lim.try_acquire("shared").allowed for _ in range(11)] == [True] * 10 + [False]


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "error", "text"),
    [
        (42, TypeError, "key must be a str, got int"),
        (None, TypeError, "key must be a str, got NoneType"),
        (b"k", TypeError, "key must be a str, got bytes"),
        ("", ValueError, "key must be a non-empty string"),
    ],
)
@pytest.mark.anyio
async def test_bad_keys_are_refused(key: Any, error: type[Exception], text: str) -> None:
    lim = rs.TokenBucket(1.0, 3, clock=FakeClock())
    group = rs.LimitGroup(lim, rs.TokenBucket(1.0, 5, backend=lim.backend, name="b"))
    for target in (lim, group):
        with pytest.raises(error, match=text):
            target.peek(key)
        with pytest.raises(error, match=text):
            await target.apeek(key)
        with pytest.raises(error, match=text):
            target.reset(key)
        with pytest.raises(error, match=text):
            await target.areset(key)
    assert len(lim.backend) == 0


@pytest.mark.parametrize(
    ("cost", "error", "text"),
    [
        ("1", TypeError, "cost must be a number, got str"),
        (True, TypeError, "cost must be a number, got bool"),
        (None, TypeError, "cost must be a number, got NoneType"),
        (0, ValueError, "cost must be a positive finite number, got 0"),
        (-1, ValueError, "cost must be a positive finite number, got -1"),
        (float("nan"), ValueError, "cost must be a positive finite number, got nan"),
        (float("inf"), ValueError, "cost must be a positive finite number, got inf"),
        (4, ValueError, r"cost 4 is above capacity 3: it could never be allowed"),
    ],
)
@pytest.mark.anyio
async def test_bad_costs_are_refused(cost: Any, error: type[Exception], text: str) -> None:
    lim = rs.TokenBucket(1.0, 3, clock=FakeClock())
    group = rs.LimitGroup(lim, rs.TokenBucket(1.0, 5, backend=lim.backend, name="b"))
    for target in (lim, group):
        with pytest.raises(error, match=text):
            target.peek("k", cost)
        with pytest.raises(error, match=text):
            await target.apeek("k", cost)
    assert len(lim.backend) == 0


# --- Redis: wrong client kind, outages -------------------------------------------------


@pytest.mark.redis
def test_wrong_client_kind_is_refused_by_name() -> None:
    aclient = redis.asyncio.Redis(host="127.0.0.1", port=6379)  # never connects
    abucket = rs.TokenBucket(10, 20, backend=rs.RedisBackend(aclient, prefix="never"))
    with pytest.raises(TypeError, match=r"peek\(\).*redis\.asyncio.*call apeek\(\)"):
        abucket.peek("k")
    with pytest.raises(TypeError, match=r"reset\(\).*redis\.asyncio.*call areset\(\)"):
        abucket.reset("k")


@pytest.mark.redis
@asyncio_only
@pytest.mark.anyio
async def test_sync_client_refuses_async_calls(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    backend = rs.RedisBackend(redis_client, prefix=redis_prefix.rstrip(":"), on_error="fail_open")
    bucket = rs.TokenBucket(10, 20, backend=backend)
    with pytest.raises(TypeError, match=r"apeek\(\).*sync redis.*call peek\(\)"):
        await bucket.apeek("k")
    with pytest.raises(TypeError, match=r"areset\(\).*sync redis.*call reset\(\)"):
        await bucket.areset("k")
    assert backend.guard.breaker.state is rs.CircuitState.CLOSED  # mistakes are not outages
    backend.close()


def fast_breaker() -> rs.CircuitBreaker:
    """Opens on the first failure; no test here waits for it to close again."""
    return rs.CircuitBreaker(
        f"peek-test-{uuid.uuid4().hex[:6]}",
        failure_threshold=1,
        recovery_timeout=60.0,
        success_threshold=1,
        include=(redis.RedisError, OSError),
    )


@pytest.mark.redis
@pytest.mark.parametrize("policy", ["local", "fail_open", "fail_closed"])
def test_peek_and_reset_while_redis_is_down(
    policy: str, proxy: FaultProxy, redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    prefix = redis_prefix.rstrip(":")
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    try:
        backend = rs.RedisBackend(
            client, prefix=prefix, timeout=1.0, on_error=policy, breaker=fast_breaker()
        )
        # A FakeClock for the in-process fallback; Redis keeps its own clock.
        clock = FakeClock()
        bucket = rs.TokenBucket(SLOW, 3, backend=backend, clock=clock)
        wide = rs.TokenBucket(SLOW, 5, backend=backend, name="wide", clock=clock)
        group = rs.LimitGroup(bucket, wide)
        assert bucket.try_acquire("pre").remaining == 2  # on Redis

        proxy.cut()  # connections refused: an outage that costs no time
        if policy == "local":
            # The in-process buckets answer, and a peek takes nothing from them either.
            assert bucket.peek("pre") == (True, 2, 0.0, 100.0, 3)  # Redis's tokens are not here
            for _ in range(3):
                assert bucket.peek("out") == bucket.try_acquire("out")
            assert bucket.peek("out").retry_after == pytest.approx(100.0)
            assert not bucket.peek("out")
            assert group.peek("g") == group.try_acquire("g")
            # A reset cannot reach Redis, says so, and still refills the local buckets.
            assert bucket.reset("out") is False
            assert bucket.peek("out").remaining == 2
            assert group.reset("g") is False
            assert group.peek("g").remaining == 2
        elif policy == "fail_open":
            assert bucket.peek("pre") == (True, 0, 0.0, 0.0, 3)
            assert group.peek("g") == group.try_acquire("g")
            assert bucket.reset("pre") is False
        else:
            denied = bucket.peek("pre", 2)
            assert (denied.allowed, denied.remaining, denied.limit) == (False, 0, 3)
            assert denied.retry_after >= 200.0  # at least the cost's refill time
            assert not group.peek("g")
            assert bucket.reset("pre") is False
        assert backend.guard.fallbacks > 0

        # Redis kept its own state: the bucket used before the outage, nothing else.
        assert redis_client.exists(layout.bucket_key(prefix, "pre", bucket.name)) == 1
        assert len(list(redis_client.scan_iter(match=f"{prefix}:*"))) == 1
    finally:
        client.close()


@pytest.mark.redis
@asyncio_only
@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["local", "fail_open", "fail_closed"])
async def test_apeek_and_areset_while_redis_is_down(
    policy: str, proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    client = redis.asyncio.Redis.from_url(proxy.url_for(redis_url))
    backend = rs.RedisBackend(
        client,
        prefix=redis_prefix.rstrip(":"),
        timeout=1.0,
        on_error=policy,
        breaker=fast_breaker(),
    )
    try:
        bucket = rs.TokenBucket(SLOW, 3, backend=backend, clock=FakeClock())
        proxy.cut()
        peeked = await bucket.apeek("k")
        expected = {"local": (True, 2), "fail_open": (True, 0), "fail_closed": (False, 0)}
        assert (peeked.allowed, peeked.remaining) == expected[policy]
        assert await bucket.apeek("k") == peeked  # nothing taken, locally either
        if policy == "local":
            assert peeked == await bucket.atry_acquire("k")
        assert await bucket.areset("k") is False
    finally:
        await backend.aclose()
        await client.aclose()


# --- Redis Cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3.start(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def cluster_keys(cluster: RedisCluster3, prefix: str) -> int:
    total = 0
    for node in cluster.nodes:
        with node.client() as c:
            total += len(list(c.scan_iter(match=f"{prefix}:*", count=1000)))
    return total


@pytest.mark.slow
def test_cluster_peek_and_reset(cluster: RedisCluster3) -> None:
    prefix = f"rstest-{uuid.uuid4().hex[:12]}"
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        backend = rs.RedisBackend(client, prefix=prefix, on_error="fail_closed")
        bucket = rs.TokenBucket(SLOW, 3, backend=backend)
        group = rs.LimitGroup(bucket, rs.TokenBucket(SLOW, 5, backend=backend, name="wide"))
        users = [f"user:{i}" for i in range(20)]  # on many slots, so on every node
        for user in users:
            assert (bucket.peek(user).allowed, bucket.peek(user).remaining) == (True, 2)
            assert group.peek(f"g:{user}").remaining == 2
        assert cluster_keys(cluster, prefix) == 0  # peeks wrote nothing, on any node
        for user in users:
            for _ in range(4):
                peeked, decided = group.peek(user), group.try_acquire(user)
                assert peeked[:2] == decided[:2]
            assert not group.peek(user)
        assert cluster_keys(cluster, prefix) == 2 * len(users)
        for user in users:
            assert group.reset(user) is True  # both keys: one slot, one DEL
        assert cluster_keys(cluster, prefix) == 0
        assert group.peek(users[0]).remaining == 2
        assert backend.guard.fallbacks == 0
    finally:
        client.close()


@pytest.mark.slow
@asyncio_only
@pytest.mark.anyio
async def test_async_cluster_peek_and_reset(cluster: RedisCluster3) -> None:
    prefix = f"rstest-{uuid.uuid4().hex[:12]}"
    client = redis.asyncio.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        backend = rs.RedisBackend(client, prefix=prefix, on_error="fail_closed")
        bucket = rs.TokenBucket(SLOW, 3, backend=backend)
        group = rs.LimitGroup(bucket, rs.TokenBucket(SLOW, 5, backend=backend, name="wide"))
        for user in [f"user:{i}" for i in range(10)]:
            assert (await group.apeek(user)).remaining == 2
            assert (await bucket.apeek(user, 3)).allowed
            assert cluster_keys(cluster, prefix) == 0
            assert [(await group.atry_acquire(user)).allowed for _ in range(4)] == [
                True,
                True,
                True,
                False,
            ]
            assert not await group.apeek(user)
            assert await group.areset(user) is True
            assert (await group.apeek(user)).remaining == 2
            assert cluster_keys(cluster, prefix) == 0
        assert backend.guard.fallbacks == 0
    finally:
        await client.aclose()
