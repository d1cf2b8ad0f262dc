"""A load's ``condition`` and ``ttl`` as a function of its result, and failover.

Every shape of cache: local-only and two-tier, sync and async (local async on asyncio
and trio; redis.asyncio runs only on asyncio). Time is a FakeClock: nothing sleeps.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis
import redis.asyncio

import resilience as rs
from resilience.cache.policy import Entry
from resilience.flight import Flight, SingleFlight
from resilience.testing import FakeClock

pytestmark = pytest.mark.anyio

# (cache shape, event loop): sync shapes run once, the local async shape on both loops.
CASES = [
    ("local", "asyncio"),
    ("alocal", "asyncio"),
    ("alocal", "trio"),
    ("two", "asyncio"),
    ("atwo", "asyncio"),
]


@pytest.fixture(params=CASES, ids=[f"{kind}-{loop}" for kind, loop in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind_loop: tuple[str, str] = request.param
    return kind_loop


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


class CountingFlights(SingleFlight):
    """SingleFlight that counts the callers who joined a flight as waiters."""

    __slots__ = ("_joined", "waiters")

    def __init__(self) -> None:
        super().__init__()
        self.waiters = 0
        self._joined = threading.Condition()

    def join(self, key: Hashable) -> tuple[Flight, bool]:
        flight, leader = super().join(key)
        if not leader:
            with self._joined:
                self.waiters += 1
                self._joined.notify_all()
        return flight, leader

    def wait_for_waiters(self, n: int) -> None:
        """Block this thread until ``n`` callers wait on a flight."""
        with self._joined:
            assert self._joined.wait_for(lambda: self.waiters >= n, timeout=10)

    async def await_waiters(self, n: int) -> None:
        while self.waiters < n:
            await anyio.lowlevel.checkpoint()


class Harness:
    """The same calls against a cache's sync or its async methods."""

    def __init__(self, cache: rs.TwoTierCache, is_async: bool, clock: FakeClock, rdb: Any):
        self.cache = cache
        self.is_async = is_async
        self.clock = clock
        self.rdb = rdb  # a sync client for looking at Redis, or None
        self.events: list[rs.CacheEvent] = []
        cache.add_listener(self.events.append)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    async def load(
        self,
        key: str,
        fn: Callable[[], Any],
        *,
        ttl: Any = None,
        condition: Callable[[Any], Any] | None = None,
    ) -> Any:
        if self.is_async:

            async def aloader() -> Any:
                return fn()

            return await self.cache.aget_or_load(key, aloader, ttl=ttl, condition=condition)
        return self.cache.get_or_load(key, fn, ttl=ttl, condition=condition)

    async def get(self, key: str, default: Any = None) -> Any:
        if self.is_async:
            return await self.cache.aget(key, default)
        return self.cache.get(key, default)

    def decorate(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``cache.cached(**options)`` over ``fn`` (made a coroutine function if async)."""
        if not self.is_async:
            return self.cache.cached(**options)(fn)

        async def afn(*args: Any) -> Any:
            return fn(*args)

        afn.__qualname__ = fn.__qualname__ + ".async"
        wrapped = self.cache.cached(**options)(afn)

        async def call(*args: Any) -> Any:
            return await wrapped(*args)

        return call

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        return await result if self.is_async else result

    # -- what the tiers hold --------------------------------------------------------------

    def local_entry(self, key: str) -> Entry | None:
        return self.cache.local.get_entry(key, self.clock.monotonic())

    def pttl(self, key: str) -> int | None:
        """Redis's own expiry of ``key`` in ms; None when there is no remote tier."""
        if self.rdb is None:
            return None
        assert self.cache.remote is not None
        ms: int = self.rdb.pttl(self.cache.remote.key(key))
        return ms

    def stored_nowhere(self, key: str) -> bool:
        return self.local_entry(key) is None and self.pttl(key) in (None, -2)


@pytest.fixture
async def make(
    case: tuple[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Harness]]:
    kind = case[0]
    made: list[tuple[rs.TwoTierCache, Any]] = []
    looker: list[Any] = []

    def factory(clock: FakeClock | None = None, **options: Any) -> Harness:
        clock = clock or FakeClock(wall_start=1_900_000_000.0)
        local = rs.LocalCache(max_entries=100, ttl=30.0, clock=clock)
        if kind in ("local", "alocal"):
            cache = rs.TwoTierCache(local, None, clock=clock, **options)
            made.append((cache, None))
            return Harness(cache, kind == "alocal", clock, None)
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
        client = (redis.asyncio.Redis if kind == "atwo" else redis.Redis).from_url(url)
        cache = rs.TwoTierCache(local, rs.RedisCache(client, prefix=prefix), clock=clock, **options)
        made.append((cache, client))
        if not looker:
            looker.append(redis.Redis.from_url(url))
        return Harness(cache, kind == "atwo", clock, looker[0])

    yield factory
    for cache, client in made:
        if kind == "atwo":
            await cache.aclose()
            await client.aclose()
        else:
            cache.close()
            if client is not None:
                client.close()
    for rdb in looker:
        rdb.close()


def _counter(*values: Any) -> tuple[Callable[[], Any], list[Any]]:
    """A loader returning ``values`` in turn, and the list of what it returned."""
    returned: list[Any] = []
    it = iter(values)

    def load() -> Any:
        returned.append(next(it))
        return returned[-1]

    return load, returned


def _returning(value: Any) -> Callable[[], Any]:
    return lambda: value


def _near(ms: int | None, seconds: float) -> bool:
    """Redis's PTTL (real time, just set) is ``seconds`` less the milliseconds since."""
    assert ms is not None
    return math.ceil(seconds * 1000) - 1000 < ms <= math.ceil(seconds * 1000)


# -- condition -------------------------------------------------------------------------


async def test_a_result_the_condition_refuses_is_returned_and_stored_nowhere(
    make: Callable[..., Harness],
) -> None:
    h = make()
    final = lambda v: v["final"]  # noqa: E731
    load, returned = _counter({"final": False, "n": 1}, {"final": True, "n": 2}, "unused")
    assert await h.load("k", load, condition=final) == {"final": False, "n": 1}
    assert h.stored_nowhere("k")
    assert await h.get("k", "nothing") == "nothing"
    assert await h.load("k", load, condition=final) == {"final": True, "n": 2}
    assert await h.load("k", load, condition=final) == {"final": True, "n": 2}  # a hit
    assert len(returned) == 2
    assert not h.stored_nowhere("k")
    assert "condition_error" not in h.kinds()


async def test_the_condition_is_read_for_truth_and_sees_none_only_when_it_could_be_cached(
    make: Callable[..., Harness],
) -> None:
    h, negative = make(), make(negative_ttl=5.0)
    seen: list[Any] = []

    def truthy(value: Any) -> Any:
        seen.append(value)
        return value  # not a bool: its truth decides

    for i, (value, stored) in enumerate([(1, True), ("yes", True), (0, False), ([], False)]):
        assert await h.load(f"k{i}", _returning(value), condition=truthy) == value
        assert h.stored_nowhere(f"k{i}") is not stored
    assert await h.load("none", lambda: None, condition=truthy) is None
    assert seen == [1, "yes", 0, []]  # None is never cached here: nothing to decide
    assert await negative.load("none", lambda: None, condition=truthy) is None
    assert seen[-1] is None
    assert negative.stored_nowhere("none")


async def test_the_decorator_takes_a_condition(make: Callable[..., Harness]) -> None:
    h = make()
    calls: list[str] = []
    scores = {"new": -1, "rated": 5}

    def score(item: str) -> int:
        calls.append(item)
        return scores[item]

    cached = h.decorate(score, ttl=60, condition=lambda s: s >= 0)
    assert [await h.call(cached, "new") for _ in range(3)] == [-1, -1, -1]
    assert [await h.call(cached, "rated") for _ in range(3)] == [5, 5, 5]
    assert calls == ["new", "new", "new", "rated"]


async def test_a_condition_that_raises_costs_the_caller_nothing(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = make()
    caplog.set_level(logging.DEBUG, logger="resilience")

    def broken(value: Any) -> bool:
        return bool(value["final"])  # a str has no ["final"]

    assert await h.load("k", lambda: "plain", condition=broken) == "plain"
    assert h.stored_nowhere("k")
    [event] = [e for e in h.events if e.kind == "condition_error"]
    assert isinstance(event.error, TypeError)
    assert event.key == "k"
    [record] = [r for r in caplog.records if "condition function failed" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None


# -- ttl as a function of the result ------------------------------------------------------


async def test_a_ttl_function_sets_the_lifetime_in_both_tiers(
    make: Callable[..., Harness],
) -> None:
    h = make(ttl=300.0)  # the local tier's ttl is 30 s
    local_cap = 30.0 if h.cache.remote is not None else math.inf
    by_result = lambda v: 60 if v["final"] else 5  # noqa: E731

    load, returned = _counter({"final": False}, {"final": False, "again": 1}, "unused")
    assert await h.load("draft", load, ttl=by_result) == {"final": False}
    entry = h.local_entry("draft")
    assert entry is not None
    assert entry.fresh_until == h.clock.monotonic() + 5
    assert h.pttl("draft") is None or _near(h.pttl("draft"), 5)
    h.clock.advance(4.9)
    assert await h.load("draft", load, ttl=by_result) == {"final": False}
    h.clock.advance(0.1)
    assert await h.load("draft", load, ttl=by_result) == {"final": False, "again": 1}

    load, returned = _counter({"final": True}, {"final": True, "again": 1}, "unused")
    assert await h.load("done", load, ttl=by_result) == {"final": True}
    entry = h.local_entry("done")
    assert entry is not None
    assert entry.fresh_until == h.clock.monotonic() + min(60, local_cap)
    assert h.pttl("done") is None or _near(h.pttl("done"), 60)
    h.clock.advance(45.0)  # past the local tier's 30 s: a two-tier cache reads Redis
    assert await h.load("done", load, ttl=by_result) == {"final": True}
    assert len(returned) == 1
    h.clock.advance(15.0)
    assert await h.load("done", load, ttl=by_result) == {"final": True, "again": 1}

    # None from the function: the cache's ttl.
    assert await h.load("default", lambda: 1, ttl=lambda v: None) == 1
    entry = h.local_entry("default")
    assert entry is not None
    assert entry.fresh_until == h.clock.monotonic() + min(300, local_cap)
    assert h.pttl("default") is None or _near(h.pttl("default"), 300)


async def test_a_ttl_function_on_the_decorator(make: Callable[..., Harness]) -> None:
    h = make()
    calls: list[int] = []

    def fetch(n: int) -> dict[str, int]:
        calls.append(n)
        return {"n": n, "ttl": n}

    cached = h.decorate(fetch, ttl=lambda v: v["ttl"])
    assert await h.call(cached, 2) == {"n": 2, "ttl": 2}
    assert await h.call(cached, 9) == {"n": 9, "ttl": 9}
    h.clock.advance(2.0)
    assert await h.call(cached, 2) == {"n": 2, "ttl": 2}  # expired: loaded again
    assert await h.call(cached, 9) == {"n": 9, "ttl": 9}  # 7 s to go: a hit
    assert calls == [2, 9, 2]


async def test_a_ttl_function_with_jitter_negative_ttl_and_stale_windows(
    make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(ttl=100.0, jitter=0.5, negative_ttl=4.0, stale_if_error=10.0)
    monkeypatch.setattr("resilience.cache._core._random", lambda: 1.0)  # jitter: full 50%
    asked: list[Any] = []

    def twenty(value: Any) -> float:
        asked.append(value)
        return 20.0

    assert await h.load("k", lambda: "v1", ttl=twenty) == "v1"
    now = h.clock.monotonic()
    entry = h.local_entry("k")
    assert entry is not None
    assert entry.fresh_until == now + 10.0
    if h.cache.remote is None:
        assert entry.keep_until == now + 10.0 + 10.0  # kept for stale_if_error
    else:
        assert _near(h.pttl("k"), 10.0 + 10.0)  # Redis keeps it for the window too

    # A None's lifetime is negative_ttl (with jitter); the function is not asked.
    assert await h.load("none", lambda: None, ttl=twenty) is None
    entry = h.local_entry("none")
    assert entry is not None
    assert entry.fresh_until == h.clock.monotonic() + 2.0
    assert asked == ["v1"]

    # The failover window counts from the function's (jittered) lifetime.
    def down() -> str:
        raise ConnectionError("database down")

    h.clock.advance(15.0)  # expired 5 s ago, within stale_if_error
    assert await h.load("k", down, ttl=twenty) == "v1"
    h.clock.advance(5.0)  # 10 s after expiry: the window is over
    with pytest.raises(ConnectionError):
        await h.load("k", down, ttl=twenty)


BAD_TTLS: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    ("str", lambda v: "60", TypeError, "returned a str"),
    ("bool", lambda v: True, TypeError, "returned a bool"),
    ("list", lambda v: [60], TypeError, "returned a list"),
    ("zero", lambda v: 0, ValueError, "returned 0"),
    ("negative", lambda v: -5, ValueError, "returned -5"),
    ("nan", lambda v: math.nan, ValueError, "returned nan"),
    ("inf", lambda v: math.inf, ValueError, "returned inf"),
    ("raises", lambda v: v["missing"], KeyError, "missing"),
]


async def test_a_bad_ttl_function_returns_the_value_uncached_reported_and_logged(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = make()
    caplog.set_level(logging.DEBUG, logger="resilience")
    for name, bad, error_type, says in BAD_TTLS:
        load, _returned = _counter({"v": name}, {"v": name, "again": 1})
        assert await h.load(name, load, ttl=bad) == {"v": name}
        assert h.stored_nowhere(name), name
        assert await h.load(name, load, ttl=bad) == {"v": name, "again": 1}  # loads again
        errors = [e.error for e in h.events if e.kind == "ttl_error" and e.key == name]
        assert len(errors) == 2, name
        assert all(isinstance(e, error_type) and says in str(e) for e in errors), errors
        if error_type is not KeyError:
            assert "ttl function" in str(errors[0])
    assert "load_error" not in h.kinds()  # the loads themselves went fine
    logged = [r for r in caplog.records if "ttl function failed" in r.getMessage()]
    assert len(logged) == 2 * len(BAD_TTLS)
    assert [r.levelno for r in logged] == [logging.WARNING] + [logging.DEBUG] * (len(logged) - 1)
    assert "later failures are logged at DEBUG" in logged[0].getMessage()


# -- single-flight waiters --------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["condition", "bad ttl"])
async def test_every_waiter_of_a_load_gets_the_value_that_was_not_stored(
    make: Callable[..., Harness], refusal: str
) -> None:
    h = make()
    flights = h.cache._flights = CountingFlights()
    options: dict[str, Any] = (
        {"condition": lambda v: False} if refusal == "condition" else {"ttl": lambda v: "soon"}
    )
    waiters = 20
    calls: list[int] = []
    results: list[Any] = []
    if h.is_async:
        gate = anyio.Event()

        async def aload() -> dict[str, int]:
            calls.append(1)
            await gate.wait()
            return {"n": len(calls)}

        async def caller() -> None:
            results.append(await h.cache.aget_or_load("hot", aload, **options))

        async with anyio.create_task_group() as tg:
            for _ in range(waiters + 1):
                tg.start_soon(caller)
            await flights.await_waiters(waiters)
            gate.set()
    else:
        started, release = threading.Event(), threading.Event()

        def load() -> dict[str, int]:
            calls.append(1)
            started.set()
            release.wait(10)
            return {"n": len(calls)}

        def thread_caller() -> None:
            results.append(h.cache.get_or_load("hot", load, **options))

        threads = [threading.Thread(target=thread_caller) for _ in range(waiters + 1)]
        threads[0].start()
        assert started.wait(10)
        for t in threads[1:]:
            t.start()
        flights.wait_for_waiters(waiters)
        release.set()
        for t in threads:
            t.join(10)
    assert flights.waiters == waiters
    assert calls == [1]
    assert results == [{"n": 1}] * (waiters + 1)
    assert h.stored_nowhere("hot")


# -- failover: stale_if_error -------------------------------------------------------------


async def test_failover_serves_the_last_good_value_to_every_waiter(
    make: Callable[..., Harness],
) -> None:
    h = make(ttl=10.0, stale_if_error=60.0)
    assert await h.load("k", lambda: "v1") == "v1"
    h.clock.advance(30.0)  # expired 20 s ago
    flights = h.cache._flights = CountingFlights()
    calls: list[int] = []
    results: list[Any] = []
    waiters = 10
    if h.is_async:
        gate = anyio.Event()

        async def down() -> str:
            calls.append(1)
            await gate.wait()
            raise ConnectionError("database down")

        async def caller() -> None:
            results.append(await h.cache.aget_or_load("k", down))

        async with anyio.create_task_group() as tg:
            for _ in range(waiters + 1):
                tg.start_soon(caller)
            await flights.await_waiters(waiters)
            gate.set()
    else:
        release = threading.Event()

        def sync_down() -> str:
            calls.append(1)
            release.wait(10)
            raise ConnectionError("database down")

        def thread_caller() -> None:
            results.append(h.cache.get_or_load("k", sync_down))

        threads = [threading.Thread(target=thread_caller) for _ in range(waiters + 1)]
        for t in threads:
            t.start()
        flights.wait_for_waiters(waiters)
        release.set()
        for t in threads:
            t.join(10)
    assert calls == [1]
    assert results == ["v1"] * (waiters + 1)
    [stale] = [e for e in h.events if e.kind == "stale"]
    assert isinstance(stale.error, ConnectionError)
    assert "load_error" not in h.kinds()

    # Served, not stored again: the window still ends 60 s after the value expired.
    def down_again() -> str:
        raise ConnectionError("database down")

    h.clock.advance(39.0)
    assert await h.load("k", down_again) == "v1"
    h.clock.advance(1.0)
    with pytest.raises(ConnectionError):
        await h.load("k", down_again)
    assert await h.load("k", lambda: "v2") == "v2"  # the backend is back


async def test_failover_on_the_decorator_and_for_any_exception_only(
    make: Callable[..., Harness],
) -> None:
    h = make(ttl=10.0, stale_if_error=60.0)
    answers: list[Any] = ["good"]

    class Fatal(BaseException):
        pass

    def price(sku: str) -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    cached = h.decorate(price, ttl=10)
    assert await h.call(cached, "a") == "good"
    h.clock.advance(11.0)
    answers.append(LookupError("any Exception subclass"))
    assert await h.call(cached, "a") == "good"
    answers.append(Fatal("not an Exception: never swallowed"))
    with pytest.raises(Fatal):
        await h.call(cached, "a")


async def test_another_instance_fails_over_to_the_value_kept_in_redis(
    make: Callable[..., Harness],
) -> None:
    clock = FakeClock(wall_start=1_900_000_000.0)
    writer = make(clock, ttl=10.0, stale_if_error=60.0)
    reader = make(clock, ttl=10.0, stale_if_error=60.0)  # no local copy of its own
    assert await writer.load("k", lambda: "v1") == "v1"
    clock.advance(40.0)

    def down() -> str:
        raise ConnectionError("database down")

    if writer.cache.remote is None:  # a local-only cache's last good value is its own
        with pytest.raises(ConnectionError):
            await reader.load("k", down)
        assert await writer.load("k", down) == "v1"
    else:
        assert await reader.load("k", down) == "v1"
        assert "stale" in reader.kinds()


# -- bad input -----------------------------------------------------------------------------


async def test_bad_condition_and_ttl_are_refused_naming_the_parameter(
    make: Callable[..., Harness],
) -> None:
    h = make()
    cache = h.cache
    for bad in (1, "lambda v: True", True):
        with pytest.raises(TypeError, match="condition"):
            cache.cached(condition=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="condition"):
            await h.load("k", lambda: 1, condition=bad)  # type: ignore[arg-type]
    wrong_types: list[Any] = ["60", True, [60]]
    for wrong in wrong_types:
        with pytest.raises(TypeError, match="ttl must be a number of seconds, None or a function"):
            cache.cached(ttl=wrong)
        with pytest.raises(TypeError, match="ttl"):
            await h.load("k", lambda: 1, ttl=wrong)
    for bad_ttl in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="ttl"):
            cache.cached(ttl=bad_ttl)
        with pytest.raises(ValueError, match="ttl"):
            await h.load("k", lambda: 1, ttl=bad_ttl)
    # The cache's own ttl is a number: functions are for loads.
    with pytest.raises(ValueError, match="ttl"):
        rs.TwoTierCache(ttl=lambda v: 5)  # type: ignore[arg-type]
    assert h.events == []  # nothing was loaded


def test_the_functions_type_check_against_the_loaded_type() -> None:
    # mypy checks these: the functions take the loader's result type and may return any
    # truth value (condition) or seconds / None (ttl).
    cache = rs.TwoTierCache(ttl=60.0)
    user = cache.get_or_load(
        "user:1",
        lambda: {"name": "", "role": "admin"},
        ttl=lambda u: 5 if u["role"] == "admin" else None,
        condition=lambda u: u["name"],
    )
    assert user == {"name": "", "role": "admin"}
    assert cache.get("user:1") is None

    @cache.cached(ttl=lambda r: 5 if r else None, condition=lambda r: r)
    def tags(n: int) -> list[str]:
        return ["a"] * n

    assert tags(0) == []
    assert tags(2) == ["a", "a"]


@pytest.mark.parametrize("ttl", [1e17, 4e9])
def test_a_ttl_beyond_a_century_is_refused_at_construction(ttl: float) -> None:
    # Redis's millisecond expiry overflows near 1e16 s: refused here, not per write.
    with pytest.raises(ValueError, match="ttl"):
        rs.TwoTierCache(local=rs.LocalCache(ttl=ttl))
    with pytest.raises(ValueError, match="ttl"):
        rs.TwoTierCache().cached(ttl=ttl)
