"""One contract for every bucket backend: memory and Redis, sync and async calls.

Memory runs on a FakeClock. Redis runs on Redis's own clock, so these tests use rates
slow enough that refill during a test is negligible, or short real waits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio

import resilience as rs
from resilience.testing import FakeClock

pytestmark = pytest.mark.anyio

SLOW = 0.01  # tokens per second: one token per 100 s, so no refill during a test


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs only on asyncio; the async twins on trio: test_limiter_memory.py.
    return "asyncio"


class Harness:
    """Calls the sync or async API, per backend kind, with one signature."""

    def __init__(self, kind: str, backend: Any, clock: FakeClock | None) -> None:
        self.kind = kind
        self.backend = backend
        self.clock = clock
        self.is_async = kind in ("amemory", "aredis")

    def bucket(self, rate: float, capacity: float, name: str | None = None) -> rs.TokenBucket:
        return rs.TokenBucket(rate, capacity, backend=self.backend, name=name, clock=self.clock)

    async def try_acquire(self, lim: Any, key: str, cost: float = 1) -> rs.Decision:
        if self.is_async:
            return await lim.atry_acquire(key, cost)  # type: ignore[no-any-return]
        return lim.try_acquire(key, cost)  # type: ignore[no-any-return]

    async def acquire(
        self, lim: Any, key: str, cost: float = 1, wait: float | None = None
    ) -> rs.Decision:
        if self.is_async:
            return await lim.aacquire(key, cost, wait)  # type: ignore[no-any-return]
        return lim.acquire(key, cost, wait)  # type: ignore[no-any-return]

    async def many(self, lim: Any, items: list[Any]) -> list[rs.Decision]:
        if self.is_async:
            return await lim.atry_acquire_many(items)  # type: ignore[no-any-return]
        return lim.try_acquire_many(items)  # type: ignore[no-any-return]

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await anyio.sleep(seconds)

    def approx_time(self, value: float) -> Any:
        # Redis reports microseconds and runs on real time; memory is exact.
        return pytest.approx(value, abs=1e-9 if self.clock is not None else 0.05)


@pytest.fixture(params=["memory", "amemory", "redis", "aredis"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind = request.param
    if kind in ("memory", "amemory"):
        yield Harness(kind, rs.MemoryBackend(), FakeClock())
        return
    redis_url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    if kind == "redis":
        client = redis.Redis.from_url(redis_url)
        backend = rs.RedisBackend(client, prefix=prefix)
        yield Harness(kind, backend, None)
        backend.close()
        client.close()
    else:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        backend = rs.RedisBackend(aclient, prefix=prefix)
        yield Harness(kind, backend, None)
        await backend.aclose()
        await aclient.aclose()


async def test_burst_up_to_capacity_then_deny_with_retry_after(h: Harness) -> None:
    lim = h.bucket(SLOW, 5)
    decisions = [await h.try_acquire(lim, "k") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[-1].retry_after == h.approx_time(100.0)
    assert decisions[-1].reset_after == h.approx_time(500.0)
    assert {d.limit for d in decisions} == {5}


async def test_weighted_cost(h: Harness) -> None:
    lim = h.bucket(SLOW, 10)
    first = await h.try_acquire(lim, "k", 7)
    assert (first.allowed, first.remaining) == (True, 3)
    second = await h.try_acquire(lim, "k", 4)
    assert not second.allowed
    assert second.retry_after == h.approx_time(100.0)
    assert (await h.try_acquire(lim, "k", 3)).allowed


async def test_keys_are_independent_and_names_separate_limits(h: Harness) -> None:
    lim = h.bucket(SLOW, 1)
    other = h.bucket(SLOW, 1, name="other")
    assert (await h.try_acquire(lim, "a")).allowed
    assert not (await h.try_acquire(lim, "a")).allowed
    assert (await h.try_acquire(lim, "b")).allowed
    assert (await h.try_acquire(other, "a")).allowed


async def test_tokens_refill_over_time(h: Harness) -> None:
    lim = h.bucket(20.0, 2)
    assert (await h.try_acquire(lim, "k", 2)).allowed
    denied = await h.try_acquire(lim, "k")
    assert not denied.allowed
    await h.advance(denied.retry_after + 0.01)
    assert (await h.try_acquire(lim, "k")).allowed


async def test_limit_group_is_all_or_none(h: Harness) -> None:
    per_second = h.bucket(SLOW, 3, name="sec")
    per_hour = h.bucket(SLOW / 10, 5, name="hour")
    group = rs.LimitGroup(per_second, per_hour)
    assert [(await h.try_acquire(group, "u")).allowed for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    # The hour limit gave 3 of its 5; the denied fourth took nothing from it.
    assert (await h.try_acquire(per_hour, "u")).remaining == 1
    # 2 tokens: the hour limit has 1 left, the second limit 0: nothing is consumed.
    assert not (await h.try_acquire(group, "u", 2)).allowed
    assert (await h.try_acquire(per_hour, "u")).allowed


async def test_many_decisions_in_one_call(h: Harness) -> None:
    lim = h.bucket(SLOW, 3)
    decisions = await h.many(lim, ["k", "k", ("k", 1), "k", "other", ("big", 3)])
    assert [d.allowed for d in decisions] == [True, True, True, False, True, True]
    assert decisions[-1].remaining == 0


async def test_acquire_waits_for_tokens(h: Harness) -> None:
    lim = h.bucket(20.0, 1)
    await h.acquire(lim, "k")
    before = h.clock.monotonic() if h.clock else None
    decision = await h.acquire(lim, "k", wait=1.0)
    assert decision.allowed
    if h.clock is not None and before is not None:
        assert h.clock.monotonic() - before == pytest.approx(0.05)  # slept exactly retry_after


async def test_acquire_raises_at_once_when_the_wait_exceeds_the_timeout(h: Harness) -> None:
    lim = h.bucket(SLOW, 1)
    await h.acquire(lim, "k")
    start = h.clock.monotonic() if h.clock else 0.0
    with pytest.raises(rs.RateLimited) as info:
        await h.acquire(lim, "k", wait=5.0)
    assert info.value.retry_after == h.approx_time(100.0)
    assert info.value.key == "k"
    if h.clock is not None:
        assert h.clock.monotonic() == start  # no pointless sleep


async def test_limit_decorator(h: Harness) -> None:
    lim = h.bucket(SLOW, 2)
    if h.is_async:

        @lim.limit(key=lambda user, **kw: f"user:{user}")
        async def handler(user: int, *, verbose: bool = False) -> str:
            return f"hello {user}"

        assert await handler(1) == "hello 1"
        assert await handler(1, verbose=True) == "hello 1"
        with pytest.raises(rs.RateLimited):
            await handler(1)
        assert await handler(2) == "hello 2"
    else:

        @lim.limit(key=lambda user, **kw: f"user:{user}")
        def shandler(user: int, *, verbose: bool = False) -> str:
            return f"hello {user}"

        assert shandler(1) == "hello 1"
        assert shandler(1, verbose=True) == "hello 1"
        with pytest.raises(rs.RateLimited):
            shandler(1)
        assert shandler(2) == "hello 2"


@pytest.mark.parametrize(
    ("key", "cost", "error", "message"),
    [
        ("", 1, ValueError, "key"),
        (5, 1, TypeError, "key"),
        (None, 1, TypeError, "key"),
        ("k", 0, ValueError, "cost"),
        ("k", -1, ValueError, "cost"),
        ("k", float("nan"), ValueError, "cost"),
        ("k", 6, ValueError, "above capacity"),
        ("k", "1", TypeError, "cost"),
    ],
)
async def test_bad_input(
    h: Harness, key: Any, cost: Any, error: type[Exception], message: str
) -> None:
    lim = h.bucket(SLOW, 5)
    with pytest.raises(error, match=message):
        await h.try_acquire(lim, key, cost)
