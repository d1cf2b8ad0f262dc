"""One contract for every cache shape: local-only and two-tier, sync and async."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio

import resilience as rs
from resilience.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs only on asyncio; trio runs in test_cache_local.py.
    return "asyncio"


class Harness:
    """The same calls against sync or async methods."""

    def __init__(self, cache: rs.TwoTierCache, is_async: bool, clock: FakeClock) -> None:
        self.cache = cache
        self.is_async = is_async
        self.clock = clock

    async def get(self, key: str, default: Any = None) -> Any:
        if self.is_async:
            return await self.cache.aget(key, default)
        return self.cache.get(key, default)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        if self.is_async:
            await self.cache.aset(key, value, ttl=ttl)
        else:
            self.cache.set(key, value, ttl=ttl)

    async def delete(self, key: str) -> None:
        if self.is_async:
            await self.cache.adelete(key)
        else:
            self.cache.delete(key)

    async def load(self, key: str, fn: Callable[[], Any], ttl: float | None = None) -> Any:
        if self.is_async:

            async def aloader() -> Any:
                return fn()

            return await self.cache.aget_or_load(key, aloader, ttl=ttl)
        return self.cache.get_or_load(key, fn, ttl=ttl)


def _build(
    kind: str, request: pytest.FixtureRequest, clock: FakeClock, **options: Any
) -> tuple[rs.TwoTierCache, Any]:
    local = rs.LocalCache(max_entries=100, ttl=30.0, clock=clock)
    if kind in ("local", "alocal"):
        return rs.TwoTierCache(local, None, clock=clock, **options), None
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    client = (redis.asyncio.Redis if kind == "atwo" else redis.Redis).from_url(url)
    remote = rs.RedisCache(client, prefix=prefix)
    return rs.TwoTierCache(local, remote, clock=clock, **options), client


@pytest.fixture(params=["local", "alocal", "two", "atwo"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Harness]]:
    made: list[tuple[rs.TwoTierCache, Any]] = []

    def factory(**options: Any) -> Harness:
        clock = FakeClock(wall_start=1_900_000_000.0)
        cache, client = _build(request.param, request, clock, **options)
        made.append((cache, client))
        return Harness(cache, request.param.startswith("a"), clock)

    yield factory
    for cache, client in made:
        if request.param == "atwo":
            await cache.aclose()
            await client.aclose()
        else:
            cache.close()
            if client is not None:
                client.close()


async def test_set_get_delete_round_trip_common_types(make: Callable[..., Harness]) -> None:
    h = make()
    value = {
        "id": 7,
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc),
        "price": Decimal("9.99"),
        "token": uuid.UUID(int=5),
        "raw": b"\x00\x01",
        "tags": ("a", "b"),
    }
    assert await h.get("k") is None
    assert await h.get("k", "dflt") == "dflt"
    await h.set("k", value)
    assert await h.get("k") == value
    await h.delete("k")
    assert await h.get("k") is None


async def test_a_value_set_by_one_instance_is_read_by_a_fresh_one(
    make: Callable[..., Harness],
) -> None:
    a, b = make(), make()
    await a.set("shared", [1, 2, 3])
    expected = None if a.cache.remote is None else [1, 2, 3]
    assert await b.get("shared") == expected


async def test_get_or_load_loads_once_then_hits(make: Callable[..., Harness]) -> None:
    h = make()
    calls: list[int] = []

    def loader() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    assert await h.load("k", loader) == {"n": 1}
    assert await h.load("k", loader) == {"n": 1}
    assert len(calls) == 1


async def test_loader_errors_reach_the_caller_and_are_not_cached(
    make: Callable[..., Harness],
) -> None:
    h = make()
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("backend down")
        return "ok"

    with pytest.raises(ConnectionError, match="backend down"):
        await h.load("k", flaky)
    assert await h.load("k", flaky) == "ok"
    assert len(attempts) == 2


async def test_values_expire_after_their_ttl(make: Callable[..., Harness]) -> None:
    h = make(ttl=10.0)
    counter = iter(range(100))
    assert await h.load("k", lambda: next(counter)) == 0
    h.clock.advance(9.0)
    assert await h.load("k", lambda: next(counter)) == 0
    h.clock.advance(1.5)
    assert await h.load("k", lambda: next(counter)) == 1
    assert await h.load("short", lambda: next(counter), ttl=1.0) == 2
    h.clock.advance(1.0)
    assert await h.load("short", lambda: next(counter), ttl=1.0) == 3


async def test_none_is_cached_only_with_negative_ttl(make: Callable[..., Harness]) -> None:
    plain, negative = make(), make(negative_ttl=2.0)
    calls: list[str] = []

    def missing() -> None:
        calls.append("x")

    for h in (plain, negative):
        calls.clear()
        assert await h.load("user:404", missing) is None
        assert await h.load("user:404", missing) is None
        assert len(calls) == (2 if h is plain else 1)
    negative.clock.advance(2.0)
    assert await negative.load("user:404", missing) is None
    assert len(calls) == 2  # the negative entry expired after negative_ttl


async def test_stale_if_error_serves_the_old_value_when_the_loader_fails(
    make: Callable[..., Harness],
) -> None:
    h = make(ttl=10.0, stale_if_error=60.0)
    assert await h.load("k", lambda: "v1") == "v1"
    h.clock.advance(20.0)

    def broken() -> str:
        raise TimeoutError("slow backend")

    assert await h.load("k", broken) == "v1"
    h.clock.advance(60.0)
    with pytest.raises(TimeoutError):
        await h.load("k", broken)


async def test_early_refresh_reloads_before_expiry(
    make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(ttl=10.0, early_refresh=1.0)
    values = iter(["v1", "v2"])

    def slow() -> str:
        h.clock.advance(2.0)  # the load took 2 s: XFetch refreshes it early
        return next(values)

    assert await h.load("k", slow) == "v1"
    h.clock.advance(5.0)  # fresh for 3 more seconds
    # rand near 1: ln(rand) ~ 0, no early refresh; rand tiny: refresh now.
    monkeypatch.setattr("resilience.cache._core._random", lambda: 0.0)
    assert await h.load("k", slow) == "v1"
    monkeypatch.setattr("resilience.cache._core._random", lambda: 1.0 - 1e-9)
    assert await h.load("k", slow) == "v2"


async def test_jitter_shortens_ttls_within_the_fraction(
    make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(ttl=100.0, jitter=0.2)
    monkeypatch.setattr("resilience.cache._core._random", lambda: 1.0)
    assert await h.load("k", lambda: 1) == 1
    h.clock.advance(79.0)
    assert await h.load("k", lambda: 2) == 1
    h.clock.advance(1.0)  # 100 * (1 - 0.2 * 1.0) = 80 s
    assert await h.load("k", lambda: 3) == 3


async def test_bad_input_is_rejected_with_named_parameters(make: Callable[..., Harness]) -> None:
    h = make()
    with pytest.raises(TypeError, match="key"):
        await h.get(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        await h.set("", 1)
    with pytest.raises(ValueError, match="ttl"):
        await h.set("k", 1, ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        await h.set("k", 1, ttl=float("nan"))
    if h.cache.remote is not None:
        with pytest.raises(TypeError, match="object"):
            await h.set("k", object())


async def test_decorator_keys_by_bound_arguments(make: Callable[..., Harness]) -> None:
    h = make()
    calls: list[tuple[Any, ...]] = []
    if h.is_async:

        @h.cache.cached(ttl=60)
        async def profile(user_id: Any, lang: str = "en") -> str:
            calls.append((user_id, lang))
            return f"{user_id}/{lang}"

        results = [
            await profile(1),
            await profile(user_id=1),
            await profile(1, "en"),
            await profile(1.0),
            await profile("1"),
        ]
    else:

        @h.cache.cached(ttl=60)
        def sprofile(user_id: Any, lang: str = "en") -> str:
            calls.append((user_id, lang))
            return f"{user_id}/{lang}"

        results = [
            sprofile(1),
            sprofile(user_id=1),
            sprofile(1, "en"),
            sprofile(1.0),
            sprofile("1"),
        ]
    assert results == ["1/en", "1/en", "1/en", "1.0/en", "1/en"]
    assert calls == [(1, "en"), (1.0, "en"), ("1", "en")]


async def test_the_wrong_flavour_of_call_names_the_right_one(make: Callable[..., Harness]) -> None:
    h = make()
    cache = h.cache
    if cache.remote is None:
        cache.get("k")  # local-only caches take both flavours
        await cache.aget("k")
        return
    if h.is_async:
        with pytest.raises(TypeError, match=r"get\(\) cannot use .*redis.asyncio.*call aget\(\)"):
            cache.get("k")
        with pytest.raises(TypeError, match="a sync function"):
            cache.cached()(lambda: 1)
    else:
        with pytest.raises(TypeError, match=r"aget\(\) cannot use .*sync redis.*call get\(\)"):
            await cache.aget("k")

        async def coro() -> int:
            return 1

        with pytest.raises(TypeError, match="an async function"):
            cache.cached()(coro)


# -- the Redis tier's read before the single flight ------------------------------------


class _NoFlights:
    """Stands in for a cache's single-flight table: any flight fails the test."""

    def in_flight(self, key: object) -> bool:
        return False

    def join(self, key: object) -> Any:
        raise AssertionError(f"a flight was built for {key!r}, which Redis holds")


@pytest.fixture
async def atwo(request: pytest.FixtureRequest) -> AsyncIterator[rs.TwoTierCache]:
    cache, client = _build("atwo", request, FakeClock(wall_start=1_900_000_000.0))
    yield cache
    await cache.aclose()
    await client.aclose()


async def test_a_value_in_redis_is_served_without_a_flight(
    atwo: rs.TwoTierCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    @atwo.cached(ttl=60)
    async def profile(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    await atwo.aset("k", "v")
    assert await profile(1) == {"id": 1}  # loaded once (through a flight), now in Redis
    atwo.local.clear()  # as if another instance had filled Redis
    monkeypatch.setattr(atwo, "_flights", _NoFlights())

    async def not_called() -> str:
        raise AssertionError("the value was in Redis: no load")

    assert await atwo.aget_or_load("k", not_called) == "v"
    assert await profile(1) == {"id": 1}
    assert calls == [1]


async def test_a_read_made_before_another_load_landed_is_not_reused(
    atwo: rs.TwoTierCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first caller's read before joining the flight comes back empty, but only after
    # a second caller has led a load and stored its value: that empty read is stale, so
    # the first caller must read again (and find the value), not load a second time.
    assert atwo.remote is not None
    real_aget = atwo.remote.aget
    read, go = anyio.Event(), anyio.Event()
    first = [True]

    async def held_aget(key: str) -> bytes | None:
        if first[0]:
            first[0] = False
            read.set()
            await go.wait()
            return None  # what Redis held when this read was made
        return await real_aget(key)

    monkeypatch.setattr(atwo.remote, "aget", held_aget)
    calls: list[int] = []

    async def loader() -> str:
        calls.append(1)
        return "loaded"

    results: list[str] = []

    async def call() -> None:
        results.append(await atwo.aget_or_load("k", loader))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await read.wait()  # the first caller's read is out
        await call()  # the second leads a flight: it reads, loads and stores
        go.set()
    assert results == ["loaded", "loaded"]
    assert calls == [1]
