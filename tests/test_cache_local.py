"""The local tier, the freshness rules and single-flight, without Redis."""

from __future__ import annotations

import math
import threading
from typing import Any

import anyio
import pytest

import resilience as rs
from resilience.cache.policy import MISSING, CachePolicy, Entry, Freshness
from resilience.testing import FakeClock

# -- LocalCache --------------------------------------------------------------------------


def test_local_cache_is_bounded_lru_and_expires() -> None:
    clock = FakeClock()
    local = rs.LocalCache(max_entries=3, ttl=10.0, clock=clock)
    for k in "abc":
        local.set(k, k.upper())
    assert local.get("a") == "A"  # a is now the most recently used
    local.set("d", "D")
    assert local.get("b") is MISSING  # least recently used went first
    assert {k: local.get(k) for k in "acd"} == {"a": "A", "c": "C", "d": "D"}
    assert len(local) == 3
    local.set("short", 1, ttl=2.0)
    clock.advance(2.0)
    assert local.get("short") is MISSING
    local.set("long", 1, ttl=99.0)  # capped by the tier's ttl
    clock.advance(9.9)
    assert local.get("long") == 1
    clock.advance(0.1)
    assert local.get("long") is MISSING


def test_a_fill_that_started_before_an_invalidation_does_not_land() -> None:
    local = rs.LocalCache(clock=FakeClock())
    old = Entry("old", 100.0, 0.0)
    ticket = local.ticket()  # a fill starts: it is about to read the remote tier
    local.invalidate("k")  # another instance wrote the key meanwhile
    assert local.fill("k", old, ticket) is False
    assert local.get("k") is MISSING
    fresh_ticket = local.ticket()  # a fill that starts after the invalidation lands
    assert local.fill("k", Entry("new", 100.0, 0.0), fresh_ticket) is True
    assert local.get("k") == "new"


def test_invalidation_by_alias_stops_fills_of_the_aliased_key() -> None:
    local = rs.LocalCache(clock=FakeClock())
    ticket = local.ticket()
    local.invalidate("ns:1:remote-key")  # the Redis key a notice names
    assert not local.fill(("local", 1), Entry("old", 100.0, 0.0), ticket, "ns:1:remote-key")
    assert local.fill(("local", 1), Entry("v", 100.0, 0.0), local.ticket(), "ns:1:remote-key")
    local.invalidate("ns:1:remote-key")
    assert local.get(("local", 1)) is MISSING  # evicted through its alias


def test_forgotten_invalidations_err_towards_a_miss() -> None:
    local = rs.LocalCache(clock=FakeClock())
    ticket = local.ticket()
    for i in range(5000):  # more than the table of recent invalidations holds
        local.invalidate(f"other:{i}")
    assert not local.fill("k", Entry("v", 100.0, 0.0), ticket)
    local.clear()
    assert local.fill("k", Entry("v", 100.0, 0.0), local.ticket())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_entries": 0}, "max_entries"),
        ({"ttl": 0}, "ttl"),
        ({"max_entries": 1.5}, "max_entries"),
    ],
)
def test_local_cache_rejects_bad_sizes(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rs.LocalCache(**kwargs)


# -- freshness rules ---------------------------------------------------------------------


def test_freshness_windows() -> None:
    policy = CachePolicy(ttl=10, stale_while_revalidate=5, stale_if_error=30)
    entry = Entry("v", fresh_until=100.0, delta=0.5)
    assert policy.freshness(entry, 99.9, 0.5) is Freshness.FRESH
    assert policy.freshness(entry, 100.0, 0.5) is Freshness.STALE
    assert policy.freshness(entry, 105.0, 0.5) is Freshness.EXPIRED
    assert policy.can_serve_on_error(entry, 129.9)
    assert not policy.can_serve_on_error(entry, 130.0)
    assert policy.keep_for == 30


def test_xfetch_probability_grows_near_expiry_and_with_load_time() -> None:
    policy = CachePolicy(early_refresh=1.0)
    slow = Entry("v", fresh_until=100.0, delta=2.0)
    # now - delta * beta * ln(rand) >= expiry  <=>  rand <= exp(-(expiry - now) / delta)
    assert policy.freshness(slow, 98.0, math.exp(-1.0)) is Freshness.REFRESH
    assert policy.freshness(slow, 98.0, math.exp(-1.0) + 0.01) is Freshness.FRESH
    assert policy.freshness(slow, 90.0, 0.01) is Freshness.FRESH  # far: needs rand <= e^-5
    quick = Entry("v", fresh_until=100.0, delta=0.0)
    assert policy.freshness(quick, 99.99, 1e-12) is Freshness.FRESH  # no load time, no rush


def test_ttl_rules() -> None:
    policy = CachePolicy(ttl=100, jitter=0.5, negative_ttl=5)
    assert policy.ttl_for("v", None, 0.0) == 100
    assert policy.ttl_for("v", None, 1.0) == 50
    assert policy.ttl_for("v", 10, 0.5) == 7.5
    assert policy.ttl_for(None, None, 0.0) == 5
    assert CachePolicy().ttl_for(None, None, 0.0) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"early_refresh": 0}, "early_refresh"),
        ({"stale_while_revalidate": -1}, "stale_while_revalidate"),
        ({"negative_ttl": 0}, "negative_ttl"),
    ],
)
def test_cache_policy_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CachePolicy(**kwargs)


def test_two_tier_cache_rejects_bad_parts() -> None:
    with pytest.raises(TypeError, match="local"):
        rs.TwoTierCache(local={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="remote"):
        rs.TwoTierCache(remote="redis://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lock"):
        rs.TwoTierCache(lock=True)
    with pytest.raises(TypeError, match="loader"):
        rs.TwoTierCache().get_or_load("k", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        rs.TwoTierCache().cached(key="static")  # type: ignore[arg-type]


# -- single-flight -----------------------------------------------------------------------


def test_64_threads_missing_one_key_run_the_loader_once() -> None:
    cache = rs.TwoTierCache()
    calls = 0
    release = threading.Event()
    start = threading.Barrier(64, timeout=5)
    results: list[Any] = []

    def loader() -> str:
        nonlocal calls
        calls += 1
        assert release.wait(5)
        return "value"

    def worker() -> None:
        start.wait()
        results.append(cache.get_or_load("cold", loader))

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    while not cache._flights.in_flight("cold"):
        threading.Event().wait(0.001)
    release.set()
    for t in threads:
        t.join(5)
    assert calls == 1
    assert results == ["value"] * 64


@pytest.mark.anyio
async def test_500_tasks_and_16_threads_missing_one_key_run_the_loader_once(
    anyio_backend: str,
) -> None:
    cache = rs.TwoTierCache()
    calls = 0
    results: list[Any] = []
    gate = anyio.Event()

    async def loader() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    async def task() -> None:
        results.append(await cache.aget_or_load("cold", loader))

    def thread() -> None:
        results.append(cache.get("cold", "missing"))  # never loads: just reads

    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(task)
        await anyio.sleep(0.01)
        gate.set()
    for _ in range(16):
        await anyio.to_thread.run_sync(thread)
    assert calls == 1
    assert results == [42] * 516


@pytest.mark.anyio
async def test_a_loader_error_reaches_every_waiter_as_its_own_exception(
    anyio_backend: str,
) -> None:
    cache = rs.TwoTierCache()
    gate = anyio.Event()
    errors: list[BaseException] = []

    async def loader() -> int:
        await gate.wait()
        raise LookupError("no such user")

    async def task() -> None:
        try:
            await cache.aget_or_load("k", loader)
        except LookupError as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(task)
        await anyio.sleep(0.01)
        gate.set()
    assert len(errors) == 50
    assert all(str(e) == "no such user" for e in errors)
    assert len({id(e) for e in errors}) == 50  # tracebacks never pile up on one object
    assert cache.get("k", "not cached") == "not cached"


@pytest.mark.anyio
async def test_a_cancelled_leader_hands_the_load_to_a_waiter(anyio_backend: str) -> None:
    cache = rs.TwoTierCache()
    started = anyio.Event()
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await anyio.sleep_forever()
        return "second try"

    result: list[str] = []
    async with anyio.create_task_group() as tg:
        leader_scope = anyio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await cache.aget_or_load("k", loader)

        async def waiter() -> None:
            result.append(await cache.aget_or_load("k", loader))

        tg.start_soon(leader)
        await started.wait()
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        leader_scope.cancel()
    assert result == ["second try"]
    assert calls == 2


@pytest.mark.anyio
async def test_stale_while_revalidate_serves_others_while_one_refreshes(
    anyio_backend: str,
) -> None:
    clock = FakeClock()
    cache = rs.TwoTierCache(
        rs.LocalCache(clock=clock), ttl=10.0, stale_while_revalidate=30.0, clock=clock
    )
    assert await cache.aget_or_load("k", _value("v1")) == "v1"
    clock.advance(15.0)  # expired, within the stale window
    gate = anyio.Event()
    refreshed: list[str] = []
    others: list[str] = []

    async def slow_refresh() -> str:
        await gate.wait()
        return "v2"

    async def refresher() -> None:
        refreshed.append(await cache.aget_or_load("k", slow_refresh))

    async def reader() -> None:
        others.append(await cache.aget_or_load("k", slow_refresh))

    async with anyio.create_task_group() as tg:
        tg.start_soon(refresher)
        await anyio.sleep(0.01)
        for _ in range(20):
            tg.start_soon(reader)
        await anyio.sleep(0.01)
        assert others == ["v1"] * 20  # served at once, not made to wait
        gate.set()
    assert refreshed == ["v2"]
    assert await cache.aget_or_load("k", _value("v3")) == "v2"
    clock.advance(100.0)  # past the stale window: everyone waits for a load
    assert await cache.aget_or_load("k", _value("v4")) == "v4"


def _value(v: str) -> Any:
    async def loader() -> str:
        return v

    return loader


def test_listener_events_for_hits_misses_and_loads() -> None:
    seen: list[tuple[str, str]] = []
    cache = rs.TwoTierCache(listeners=[lambda e: seen.append((e.kind, e.tier))])
    cache.get_or_load("k", lambda: 1)
    cache.get_or_load("k", lambda: 1)
    assert seen == [("miss", "local"), ("load", ""), ("hit", "local")]


def test_a_layer_over_the_cache_reports_its_lookups_as_the_cache_s_own() -> None:
    cache = rs.TwoTierCache(local=rs.LocalCache(), name="reported")
    seen: list[rs.CacheEvent] = []
    cache.add_listener(seen.append)
    read = cache.telemetry().read
    cache.report("hit", "local", "k")
    cache.report("miss", "")
    cache.report("stale", "local", "k")
    figures = read()
    assert (figures["hits"]["local"], figures["misses"]["local"], figures["stale"]) == (1, 1, 1)
    assert [(e.kind, e.tier) for e in seen] == [("hit", "local"), ("miss", ""), ("stale", "local")]
