"""The in-memory backend: bounded memory, exact under contention, async twins on trio."""

from __future__ import annotations

import threading

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resilience as rs
from resilience.limiter.bucket import Limit, decide
from resilience.testing import FakeClock


def test_a_million_distinct_keys_stay_bounded_and_the_hot_key_stays_limited() -> None:
    clock = FakeClock()
    lim = rs.TokenBucket(1.0, 10, clock=clock)  # a key refills in at most 10 s
    table = lim._tables[0]
    for _ in range(10):
        assert lim.try_acquire("hot")
    peak = 0
    for i in range(1_000_000):
        lim.try_acquire(f"cold:{i}")  # each cold key refills 1 s after its one use
        if i % 1000 == 0:
            clock.advance(0.009)  # 1,000 keys per 9 ms: ~111k keys active at any time
            peak = max(peak, len(table))
            # The hot key is never evicted while its bucket is not full.
            assert table.peek("hot", clock.monotonic()) == 10.0
    now = clock.monotonic()
    assert 8.9 < now < 10.0
    assert peak <= 2 * 112_000 + 1024  # bounded by the keys active within one fill time
    assert lim.try_acquire("hot").remaining == int(now) - 1  # refilled from t=0 as promised
    clock.advance(10.0)
    assert lim.try_acquire("hot").remaining == 9


def test_threads_never_lose_or_invent_tokens() -> None:
    clock = FakeClock()
    lim = rs.TokenBucket(1.0, 1000, clock=clock)
    admitted = [0] * 16
    start = threading.Barrier(16, timeout=5)

    def worker(i: int) -> None:
        start.wait()
        for _ in range(200):
            if lim.try_acquire("shared"):
                admitted[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 1000  # 3,200 tries, exactly capacity admitted, time frozen


@pytest.mark.anyio
async def test_async_twins_on_every_backend(anyio_backend: str) -> None:
    clock = FakeClock()
    lim = rs.TokenBucket(10.0, 2, clock=clock)
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        if await lim.atry_acquire("k"):
            admitted += 1

    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(one)
    assert admitted == 2
    decision = await lim.aacquire("k", timeout=1.0)  # waits on the fake clock
    assert decision.allowed
    assert clock.monotonic() == pytest.approx(0.1)
    with pytest.raises(rs.RateLimited):
        await lim.aacquire("k", timeout=0.01)

    @lim.limit(key="static", wait=True)
    async def handler() -> int:
        return 1

    assert [await handler() for _ in range(4)] == [1, 1, 1, 1]
    assert clock.monotonic() == pytest.approx(0.3)
    assert [d.allowed for d in await lim.atry_acquire_many(["x", "x", "x"])] == [
        True,
        True,
        False,
    ]


def test_construction_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="rate"):
        rs.TokenBucket(0, 10)
    with pytest.raises(ValueError, match="capacity"):
        rs.TokenBucket(1, -1)
    with pytest.raises(ValueError, match="name"):
        rs.TokenBucket(1, 1, name="")
    with pytest.raises(TypeError, match="backend"):
        rs.TokenBucket(1, 1, backend=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        rs.TokenBucket(1, 1).acquire("k", timeout=-1)
    with pytest.raises(TypeError, match="key"):
        rs.TokenBucket(1, 1).limit(key=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        rs.LimitGroup()
    a, b = rs.TokenBucket(1, 1), rs.TokenBucket(1, 2)
    with pytest.raises(ValueError, match="share one backend"):
        rs.LimitGroup(a, b)
    shared = rs.MemoryBackend()
    with pytest.raises(ValueError, match="distinct names"):
        rs.LimitGroup(
            rs.TokenBucket(1, 1, backend=shared, name="x"),
            rs.TokenBucket(2, 2, backend=shared, name="x"),
        )
    with pytest.raises(TypeError, match="client"):
        rs.RedisBackend(object())
    with pytest.raises(ValueError, match="on_error"):
        rs.RedisBackend(__import__("redis").Redis(), on_error="retry")
    with pytest.raises(ValueError, match="prefix"):
        rs.RedisBackend(__import__("redis").Redis(), prefix="a{b}")


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.3, 1.0, 7.0, 1000.0]),
    capacity=st.sampled_from([1, 2.5, 10, 64]),
    steps=st.lists(
        st.tuples(st.floats(0, 3, allow_nan=False), st.sampled_from([0.5, 1, 2])),
        max_size=60,
    ),
)
def test_the_inlined_hot_path_agrees_with_the_pure_math(
    rate: float, capacity: float, steps: list[tuple[float, float]]
) -> None:
    limit = Limit(rate, capacity)
    table = rs.MemoryBackend().table("t", limit)
    full_at: float | None = None
    now = 0.0
    for gap, cost in steps:
        now += gap
        if cost > capacity:
            continue
        expected, new = decide(full_at, now, cost, rate, capacity)
        if new is not None:
            full_at = new
        got = table.decide("k", cost, now)
        assert got.allowed == expected.allowed
        assert got.remaining == expected.remaining
        assert got.retry_after == pytest.approx(expected.retry_after, abs=1e-9)
        assert got.reset_after == pytest.approx(expected.reset_after, abs=1e-9)


def test_system_clock_limiters_follow_freezegun() -> None:
    import freezegun

    lim = rs.TokenBucket(1.0, 2)  # built before time is frozen
    with freezegun.freeze_time("2026-01-01") as frozen:
        assert lim.try_acquire("k")
        assert lim.try_acquire("k")
        denied = lim.try_acquire("k")
        assert not denied
        assert denied.retry_after == pytest.approx(1.0)
        frozen.tick(1.0)
        assert lim.try_acquire("k")


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.3, 1.0, 7.0, 1000.0, 1e9]),
    capacity=st.sampled_from([1, 2.5, 10, 64]),
    gaps=st.lists(st.floats(0, 3, allow_nan=False), max_size=60),
)
def test_a_limiters_one_call_path_agrees_with_the_table_and_the_pure_math(
    rate: float, capacity: float, gaps: list[float]
) -> None:
    # try_acquire(key) on a lone in-memory limit is the table's hot path (one call).
    clock = FakeClock()
    lim = rs.TokenBucket(rate, capacity, clock=clock)
    assert "try_acquire" in vars(lim)
    table = rs.MemoryBackend().table("t", Limit(rate, capacity))
    full_at: float | None = None
    for gap in gaps:
        clock.advance(gap)
        now = clock.monotonic()
        expected, new = decide(full_at, now, 1, rate, capacity)
        if new is not None:
            full_at = new
        got = lim.try_acquire("k")
        assert got == table.decide("k", 1, now)  # the same floats as the table's decide
        assert got.allowed == expected.allowed
        assert got.remaining == expected.remaining
        assert got.retry_after == pytest.approx(expected.retry_after, abs=1e-9)
        assert got.reset_after == pytest.approx(expected.reset_after, abs=1e-9)


def test_the_one_call_path_is_taken_only_while_it_is_exact() -> None:
    clock = FakeClock()
    lim = rs.TokenBucket(1.0, 3, clock=clock)
    assert lim.try_acquire("k", 2).remaining == 1  # other costs: the general path
    assert not lim.try_acquire("k", 1.5)
    with pytest.raises(TypeError, match="cost"):
        lim.try_acquire("k", True)
    with pytest.raises(TypeError, match="key"):
        lim.try_acquire(b"k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        lim.try_acquire("")
    seen: list[rs.LimiterDecision] = []

    def listen(event: rs.LimiterDecision) -> None:
        seen.append(event)

    lim.add_listener(listen)  # listeners are told of every decision
    assert "try_acquire" not in vars(lim)
    assert lim.try_acquire("k")
    assert [e.decision.allowed for e in seen] == [True]
    lim.remove_listener(listen)
    assert "try_acquire" in vars(lim)
    assert not lim.try_acquire("k")
    assert len(seen) == 1
    # Fractional capacity (a cost of 1 may not fit) and groups never take it.
    assert "try_acquire" not in vars(rs.TokenBucket(1.0, 0.5))
    shared = rs.MemoryBackend()
    group = rs.LimitGroup(
        rs.TokenBucket(1.0, 3, name="a", backend=shared),
        rs.TokenBucket(1.0, 5, name="b", backend=shared),
    )
    assert "try_acquire" not in vars(group)
