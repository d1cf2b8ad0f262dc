"""Cache benchmarks: ours against cachetools, functools.lru_cache, aiocache and cashews.

Groups, each measured in this one process with its cases interleaved:

a. sync decorator hit (the value is cached): f(1), g(1, "a") and a method obj.get(1)
b. async decorator hit (asyncio), f(1)
c. Redis-tier hit: the local tier misses on every call, so every read is one Redis GET;
   sync (against a raw redis-py GET) and asyncio (the same, plus cashews and aiocache)
d. cold-key stampede (info): 200 asyncio tasks, and 32 threads, miss one key whose
   loader takes 20 ms; how many loader calls and how much wall time

Redis comes from RESILIENCE_REDIS_URL (default redis://127.0.0.1:6379/0); every key
lives under ``bench:<uuid>:`` (cashews puts its lock keys under ``lock:bench:<uuid>:``)
and is unlinked at the end (SCAN + UNLINK, nothing else is touched). Without Redis,
groups c and d are skipped.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import itertools
import math
import statistics
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import redis
import redis.asyncio

import resilience as rs
from benchmarks._harness import (
    AsyncLoop,
    Group,
    KeyCycle,
    Settings,
    SyncLoop,
    TargetResult,
    check_target,
    event_loop,
    interleave,
    measure_async_in,
    measure_sync,
    print_group,
    print_target,
    settings,
)
from benchmarks._redis import redis_or_reason as _redis_or_reason
from benchmarks._redis import redis_url as _redis_url
from benchmarks._redis import unlink as _unlink
from benchmarks._redis import where as _where
from resilience.cache.policy import MISSING

#: import name -> distribution name
PEERS: Final = {
    "cachetools": "cachetools",
    "aiocache": "aiocache",
    "cashews": "cashews",
    "async_lru": "async-lru",
}
TTL: Final = 60.0  # the decorators' ttl
CACHE_TTL: Final = 300.0  # TwoTierCache default ttl
LOCAL_TTL: Final = 30.0
MAX_ENTRIES: Final = 10_000
#: The small dict of the Redis-tier group (stored in our JSON envelope).
VALUE: Final = {"id": 12345, "name": "alice", "tags": ["a", "b"], "active": True}
STORM_TASKS: Final = 200
STORM_THREADS: Final = 32
LOAD_S: Final = 0.020
STORM_POOL: Final = 50  # aiocache's Redis pool in the stampede (see there)

_clock = time.perf_counter_ns


# -- functions to cache -------------------------------------------------------------------


def one(x: int) -> int:
    return x


def two(x: int, y: str) -> int:
    return x


class Service:
    def get(self, x: int) -> int:
        return x


async def aone(x: int) -> int:
    return x


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


# -- loops --------------------------------------------------------------------------------
# One loop per call shape: f(*args) would add the same star-call cost to every case and
# dilute the differences. The arguments never change, so every call after the first hits.


def loop_1(fn: Callable[[int], object], a: int) -> SyncLoop:
    def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for _ in indices:
            fn(a)
        return _clock() - start

    return loop


def loop_2(fn: Callable[[int, str], object], a: int, b: str) -> SyncLoop:
    def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for _ in indices:
            fn(a, b)
        return _clock() - start

    return loop


def method_loop(obj: Any, a: int) -> SyncLoop:
    """``obj.get(a)``: the attribute lookup and method binding are part of each call."""

    def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for _ in indices:
            obj.get(a)
        return _clock() - start

    return loop


def aloop_1(fn: Callable[[int], Awaitable[object]], a: int) -> AsyncLoop:
    async def loop(n: int) -> int:
        indices = range(n)
        start = _clock()
        for _ in indices:
            await fn(a)
        return _clock() - start

    return loop


class _Misses:
    """Reads that came back empty (None) during the timed loops, per case."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def note(self, group: Group) -> None:
        bad = {name: count for name, count in self.counts.items() if count}
        if bad:
            listed = ", ".join(f"{name} {count}" for name, count in bad.items())
            group.notes.append(
                f"WARNING: reads that returned None (a miss, an error or a timeout): {listed}"
            )


def get_loop(fn: Callable[[Any], object], keys: Sequence[Any], name: str, m: _Misses) -> SyncLoop:
    """``fn(key)`` over ``keys`` in turn; a None result is counted, not timed apart."""
    cycle = KeyCycle(keys)
    m.counts[name] = 0

    def loop(n: int) -> int:
        todo = cycle.take(n)
        misses = 0
        start = _clock()
        for key in todo:
            if fn(key) is None:
                misses += 1
        elapsed = _clock() - start
        m.counts[name] += misses
        return elapsed

    return loop


def aget_loop(
    fn: Callable[[Any], Awaitable[object]], keys: Sequence[Any], name: str, m: _Misses
) -> AsyncLoop:
    cycle = KeyCycle(keys)
    m.counts[name] = 0

    async def loop(n: int) -> int:
        todo = cycle.take(n)
        misses = 0
        start = _clock()
        for key in todo:
            if await fn(key) is None:
                misses += 1
        elapsed = _clock() - start
        m.counts[name] += misses
        return elapsed

    return loop


# -- peers --------------------------------------------------------------------------------


def _load_peers() -> tuple[dict[str, Any], dict[str, str | None]]:
    modules: dict[str, Any] = {}
    versions: dict[str, str | None] = {}
    for name, dist in PEERS.items():
        try:
            modules[name] = importlib.import_module(name)
            versions[dist] = importlib.metadata.version(dist)
        except ImportError:
            versions[dist] = None
    if "cachetools" in modules:
        importlib.import_module("cachetools.func")  # a submodule: not imported by the package
    return modules, versions


def _skipped(peers: dict[str, Any], names: Sequence[str]) -> list[str]:
    return [f"{PEERS[name]} not installed" for name in names if name not in peers]


def _local_only() -> rs.TwoTierCache:
    return rs.TwoTierCache(
        rs.LocalCache(max_entries=MAX_ENTRIES, ttl=LOCAL_TTL), None, ttl=CACHE_TTL
    )


def _sync_decorators(peers: dict[str, Any]) -> dict[str, Decorator]:
    ours = _local_only()
    decorators: dict[str, Decorator] = {"ours": ours.cached(ttl=TTL)}
    if "cachetools" in peers:
        cachetools = peers["cachetools"]
        decorators["cachetools ttl_cache"] = cachetools.func.ttl_cache(maxsize=MAX_ENTRIES, ttl=TTL)

        def cached_ttlcache(fn: Callable[..., Any]) -> Callable[..., Any]:
            cache = cachetools.TTLCache(maxsize=MAX_ENTRIES, ttl=TTL)
            wrapped: Callable[..., Any] = cachetools.cached(cache)(fn)
            return wrapped

        decorators["cachetools cached(TTLCache)"] = cached_ttlcache
    decorators["functools.lru_cache"] = functools.lru_cache(maxsize=MAX_ENTRIES)
    return decorators


_CHECKS = itertools.count(1_000_000)  # an argument no other call uses


def _expect_cached(name: str, decorate: Decorator) -> None:
    """A twin of the measured function, counting its calls: the second call must hit."""
    calls = [0]

    def counted(x: int) -> int:
        calls[0] += 1
        return x

    fn = decorate(counted)
    x = next(_CHECKS)  # decorators of one function may share a store (cashews does)
    if fn(x) != x or fn(x) != x or calls[0] != 1:
        raise RuntimeError(f"{name}: the second call did not come from the cache")


async def _aexpect_cached(name: str, decorate: Decorator) -> None:
    calls = [0]

    async def counted(x: int) -> int:
        calls[0] += 1
        return x

    fn = decorate(counted)
    x = next(_CHECKS)
    if await fn(x) != x or await fn(x) != x or calls[0] != 1:
        raise RuntimeError(f"{name}: the second call did not come from the cache")


# -- a. sync decorator hit ----------------------------------------------------------------

SHAPES: Final = ("f(1)", 'g(1, "a")', "obj.get(1)")


def sync_hit(peers: dict[str, Any], s: Settings, shape: str) -> Group:
    group = Group(f"a. sync decorator hit, {shape}", "ns/op", {}, "bare", "cachetools ttl_cache")
    decorators = _sync_decorators(peers)
    loops: dict[str, SyncLoop] = {}
    if shape == "f(1)":
        loops["bare"] = loop_1(one, 1)
        for name, decorate in decorators.items():
            _expect_cached(name, decorate)
            fn = decorate(one)
            fn(1)  # the miss that fills the cache
            loops[name] = loop_1(fn, 1)
    elif shape == 'g(1, "a")':
        loops["bare"] = loop_2(two, 1, "a")
        for name, decorate in decorators.items():
            fn2 = decorate(two)
            fn2(1, "a")
            loops[name] = loop_2(fn2, 1, "a")
    else:
        loops["bare"] = method_loop(Service(), 1)
        for name, decorate in decorators.items():
            cls = type(f"Service_{len(loops)}", (), {"get": decorate(Service.get)})
            obj = cls()
            obj.get(1)
            loops[name] = method_loop(obj, 1)
    group.skipped = _skipped(peers, ["cachetools"])
    if shape == "f(1)":
        group.notes.append(
            f"ours: TwoTierCache(LocalCache(max_entries={MAX_ENTRIES:,}, ttl={LOCAL_TTL:g}),"
            f" None, ttl={CACHE_TTL:g}) and @cache.cached(ttl={TTL:g}); cachetools:"
            f" func.ttl_cache(maxsize={MAX_ENTRIES:,}, ttl={TTL:g}) (a Condition around the"
            " cache, stampede-safe), cached(TTLCache(...)) with its default hashkey and no"
            f" lock (not thread-safe); functools.lru_cache(maxsize={MAX_ENTRIES:,}), no ttl"
        )
    if shape == "obj.get(1)":
        group.notes.append(
            "ours leaves self out of the key (all instances share entries); the peers key"
            " on (self, 1)"
        )
    group.results = measure_sync(loops, s)
    return group


# -- b. async decorator hit ---------------------------------------------------------------


def async_hit(peers: dict[str, Any], s: Settings) -> Group:
    group = Group(
        "b. async decorator hit (asyncio), f(1)", "ns/op", {}, "bare", "aiocache timeout=None"
    )
    closers: list[Callable[[], Awaitable[object]]] = []
    with event_loop() as loop:
        decorators: dict[str, Decorator] = {"ours": _local_only().cached(ttl=TTL)}
        if "aiocache" in peers:
            cached = peers["aiocache"].cached
            # cached() has no timeout of its own: timeout= goes with its other keyword
            # arguments to the cache it builds (SimpleMemoryCache), whose every operation
            # then runs under asyncio.wait_for(timeout) (a Task per call); None (or 0)
            # turns that off. Its default is 5 s.
            decorators["aiocache timeout=None"] = cached(ttl=None, timeout=None)
            decorators["aiocache (default timeout=5)"] = cached(ttl=None)
            group.notes.append(
                "aiocache: @cached(ttl=None, timeout=None) on its default SimpleMemoryCache;"
                " ttl=None: entries never expire; timeout=None: no asyncio.wait_for around"
                " each cache operation (the default, timeout=5, wraps every get in one,"
                " which is a Task per call on Python < 3.12)"
            )
        if "cashews" in peers:
            cw = peers["cashews"].Cache()
            cw.setup("mem://")
            closers.append(cw.close)
            decorators["cashews"] = cw(ttl="1m")
            decorators["cashews protected=False"] = cw(ttl="1m", protected=False)
            group.notes.append(
                "cashews: its own Cache() with setup('mem://') and @cache(ttl='1m'), whose"
                " default protected=True runs every call, hits too, in a new Task (its"
                " in-process stampede guard); protected=False skips that"
            )
        if "async_lru" in peers:
            decorators["async-lru alru_cache"] = peers["async_lru"].alru_cache(
                maxsize=MAX_ENTRIES, ttl=TTL
            )
        group.skipped = _skipped(peers, ["aiocache", "cashews", "async_lru"])

        loops: dict[str, AsyncLoop] = {"bare": aloop_1(aone, 1)}

        async def prepare() -> None:
            for name, decorate in decorators.items():
                await _aexpect_cached(name, decorate)
                fn = decorate(aone)
                if await fn(1) != 1:
                    raise RuntimeError(f"{name} did not pass the value through")
                loops[name] = aloop_1(fn, 1)

        async def close_all() -> None:
            for close in closers:
                await close()

        try:
            loop.run_until_complete(prepare())
            group.results = measure_async_in(loop, loops, s)
        finally:
            loop.run_until_complete(close_all())
    group.notes.append("all cases run in one event loop kept for the whole group")
    return group


# -- Redis helpers ------------------------------------------------------------------------


def _aiocache_redis_kwargs(url: str) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    db = parts.path.strip("/")
    return {
        "endpoint": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "db": int(db) if db else 0,
        "password": parts.password,
    }


class _OutageWatch:
    """Counts times our Redis tier's breaker reported the backend unavailable."""

    def __init__(self) -> None:
        self.outages = 0

    def __call__(self, event: Any) -> None:
        if not event.available:
            self.outages += 1

    def note(self, group: Group) -> None:
        if self.outages:
            group.notes.append(
                f"WARNING: ours found Redis unavailable {self.outages}x (its breaker opened):"
                " some of its numbers are local fall-throughs, not Redis reads"
            )


def _two_tier(
    client: Any, prefix: str, watch: _OutageWatch, *, max_entries: int, lock: bool = False
) -> rs.TwoTierCache:
    remote = rs.RedisCache(client, prefix=prefix, listeners=[watch])
    local = rs.LocalCache(max_entries=max_entries, ttl=LOCAL_TTL)
    return rs.TwoTierCache(local, remote, ttl=CACHE_TTL, lock=lock)


# -- c. Redis-tier hit --------------------------------------------------------------------


def _how_missed(size: int) -> str:
    return (
        "ours: TwoTierCache(LocalCache(max_entries=1, ttl=30), RedisCache(client,"
        " prefix=...), ttl=300) read with two keys in turn: the local tier holds only the"
        " last key read, so every read misses it and costs exactly one Redis GET (then a"
        " local fill that evicts the other key), no extra command; checked before timing."
        f" Value: {VALUE!r}, JSON in our envelope, {size} bytes in Redis"
    )


def redis_sync(s: Settings, url: str, prefix: str, watch: _OutageWatch) -> Group:
    group = Group(
        "c. Redis-tier hit, sync (local tier misses every time)", "ns/op", {}, None, "raw GET"
    )
    raw = redis.Redis.from_url(url)
    user_client = redis.Redis.from_url(url)
    cache = _two_tier(user_client, f"{prefix}:ours", watch, max_entries=1)
    try:
        cache.set("k1", VALUE)
        cache.set("k2", VALUE)
        rkeys = [cache.remote.key(k) for k in ("k1", "k2")] if cache.remote else []
        blob = raw.get(rkeys[0])
        size = len(blob) if isinstance(blob, bytes) else 0
        for key in ("k1", "k2", "k1"):  # each read misses the local tier, then fills it
            if cache.local.get(key) is not MISSING:
                raise RuntimeError(f"ours: {key} was in the local tier before the read")
            if cache.get(key) != VALUE:
                raise RuntimeError("ours: a Redis-tier read did not return the value")
            if len(cache.local) != 1:
                raise RuntimeError("ours: the local tier holds more than the last key")

        loads = [0]

        @cache.cached(ttl=CACHE_TTL, namespace="bench-profile")
        def profile(uid: int) -> dict[str, Any]:
            loads[0] += 1
            return dict(VALUE)

        profile(1)
        profile(2)  # both now in Redis; the local tier holds only uid 2

        misses = _Misses()
        loops: dict[str, SyncLoop] = {
            "raw GET": get_loop(raw.get, rkeys, "raw GET", misses),
            "ours get()": get_loop(cache.get, ["k1", "k2"], "ours get()", misses),
            "ours @cached": get_loop(profile, [1, 2], "ours @cached", misses),
        }
        group.results = measure_sync(loops, s)
        if loads[0] != 2:
            group.notes.append(f"WARNING: ours @cached ran its loader {loads[0] - 2}x while timed")
        misses.note(group)
    finally:
        cache.close()
        user_client.close()
        raw.close()
    group.notes.append(_how_missed(size))
    group.notes.append(
        "raw GET: redis.Redis.from_url(url).get() of the same two keys (bytes, not decoded);"
        " ours @cached: the decorated function (uid 1 and 2 in turn), which also builds both"
        " keys and reads Redis before joining a single flight (a flight and a plan only"
        " when Redis has no fresh value)"
    )
    watch.note(group)
    return group


def redis_async(
    peers: dict[str, Any], s: Settings, url: str, prefix: str, watch: _OutageWatch
) -> Group:
    group = Group(
        "c. Redis-tier hit, asyncio (local tier misses every time)",
        "ns/op",
        {},
        None,
        "raw GET",
    )
    misses = _Misses()
    with event_loop() as loop:
        raw = redis.asyncio.Redis.from_url(url)
        user_client = redis.asyncio.Redis.from_url(url)
        cache = _two_tier(user_client, f"{prefix}:aours", watch, max_entries=1)
        closers: list[Callable[[], Awaitable[object]]] = [
            cache.aclose,
            user_client.aclose,
            raw.aclose,
        ]
        loops: dict[str, AsyncLoop] = {}

        async def prepare() -> None:
            await cache.aset("k1", VALUE)
            await cache.aset("k2", VALUE)
            assert cache.remote is not None
            rkeys = [cache.remote.key(k) for k in ("k1", "k2")]
            for key in ("k1", "k2", "k1"):
                if cache.local.get(key) is not MISSING:
                    raise RuntimeError(f"ours: {key} was in the local tier before the read")
                if await cache.aget(key) != VALUE:
                    raise RuntimeError("ours: a Redis-tier read did not return the value")
            loops["raw GET"] = aget_loop(raw.get, rkeys, "raw GET", misses)
            loops["ours aget()"] = aget_loop(cache.aget, ["k1", "k2"], "ours aget()", misses)
            if "cashews" in peers:
                cw = peers["cashews"].Cache()
                cw.setup(url)
                closers.append(cw.close)
                ckeys = [f"{prefix}:cashews:k{i}" for i in (1, 2)]
                for key in ckeys:
                    await cw.set(key, VALUE, expire=CACHE_TTL)
                    if await cw.get(key) != VALUE:
                        raise RuntimeError("cashews: the Redis read did not return the value")
                loops["cashews get()"] = aget_loop(cw.get, ckeys, "cashews get()", misses)
            if "aiocache" in peers:
                ac = peers["aiocache"].RedisCache(
                    namespace=f"{prefix}:aiocache", timeout=None, **_aiocache_redis_kwargs(url)
                )
                closers.append(ac.close)
                for key in ("k1", "k2"):
                    await ac.set(key, VALUE, ttl=int(CACHE_TTL))
                    if await ac.get(key) != VALUE:
                        raise RuntimeError("aiocache: the Redis read did not return the value")
                loops["aiocache get()"] = aget_loop(ac.get, ["k1", "k2"], "aiocache get()", misses)

        async def close_all() -> None:
            for close in reversed(closers):
                await close()

        try:
            loop.run_until_complete(prepare())
            group.results = measure_async_in(loop, loops, s)
        finally:
            loop.run_until_complete(close_all())
    misses.note(group)
    group.skipped = _skipped(peers, ["cashews", "aiocache"])
    group.notes.append(
        "ours: the same set-up on a redis.asyncio client, await cache.aget(key); raw GET:"
        " redis.asyncio.Redis.from_url(url).get(); cashews: Cache().setup(url) (redis-py"
        " asyncio, its default pickle serializer), await get(key); aiocache: RedisCache("
        "namespace=..., timeout=None) (JSON serializer), await get(key); one event loop"
    )
    watch.note(group)
    return group


# -- d. cold-key stampede -----------------------------------------------------------------

_KEYS = itertools.count(1)  # every storm misses a key nobody has read before


class _Storms:
    """Loader calls per storm, per case (all rounds, warm-up included)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = {}

    def record(self, name: str, calls: int) -> None:
        self.calls.setdefault(name, []).append(calls)


async def _astorm(fn: Callable[[int], Awaitable[object]], counter: list[int]) -> tuple[int, int]:
    key = next(_KEYS)
    counter[0] = 0
    start = _clock()
    results = await asyncio.gather(*(fn(key) for _ in range(STORM_TASKS)))
    wall = _clock() - start
    if any(result != {"v": key} for result in results):
        raise RuntimeError(f"a stampede call returned a wrong value: {results[:3]!r}")
    return counter[0], wall


def _storm_threads(fn: Callable[[int], object], counter: list[int]) -> tuple[int, int]:
    key = next(_KEYS)
    counter[0] = 0
    barrier = threading.Barrier(STORM_THREADS + 1)
    wrong: list[object] = []

    def worker() -> None:
        barrier.wait()
        result = fn(key)
        if result != {"v": key}:
            wrong.append(result)

    pool = [threading.Thread(target=worker) for _ in range(STORM_THREADS)]
    for thread in pool:
        thread.start()  # thread start-up stays outside the timed part
    barrier.wait()
    start = _clock()
    for thread in pool:
        thread.join()
    wall = _clock() - start
    if wrong:
        raise RuntimeError(f"a stampede call returned a wrong value: {wrong[:3]!r}")
    return counter[0], wall


def _storm_settings(quick: bool) -> Settings:
    return Settings(rounds=3, warmup_rounds=1, loop_ns=0) if quick else Settings(11, 1, 0)


def _storm_group(
    title: str,
    reference: str,
    run: Callable[[str], tuple[int, int]],
    names: Sequence[str],
    s: Settings,
) -> tuple[Group, dict[str, list[int]]]:
    group = Group(title, "ms wall", {}, None, reference)
    storms = _Storms()
    failed: dict[str, str] = {}

    def run_round(order: Sequence[str]) -> dict[str, float]:
        walls: dict[str, float] = {}
        for name in order:
            if name in failed:
                walls[name] = math.nan
                continue
            try:
                calls, wall = run(name)
            except Exception as error:
                if name.startswith("ours"):
                    raise  # our own failure fails the benchmark
                # A peer that crashes in a storm is reported, not allowed to end the run.
                failed[name] = f"{type(error).__name__}: {error}"
                group.notes.append(f"{name}: failed in a storm ({failed[name]})")
                walls[name] = math.nan
                continue
            storms.record(name, calls)
            walls[name] = wall / 1e6
        return walls

    group.results = interleave(list(names), run_round, s)
    measured = {name: calls[s.warmup_rounds :] for name, calls in storms.calls.items()}
    group.notes.append(
        f"ideal: 1 loader call and {LOAD_S * 1000:g} ms plus overhead; a fresh key per storm;"
        f" {s.rounds} rounds (+{s.warmup_rounds} warm-up), interleaved"
    )
    return group, measured


def _async_loader(counter: list[int]) -> Callable[[int], Awaitable[dict[str, int]]]:
    async def load(i: int) -> dict[str, int]:
        counter[0] += 1
        await asyncio.sleep(LOAD_S)
        return {"v": i}

    return load


def storm_async(
    peers: dict[str, Any], quick: bool, url: str, prefix: str, watch: _OutageWatch
) -> tuple[Group, dict[str, list[int]]]:
    s = _storm_settings(quick)
    counters: dict[str, list[int]] = {}
    fns: dict[str, Callable[[int], Awaitable[object]]] = {}
    closers: list[Callable[[], Awaitable[object]]] = []
    notes: list[str] = []
    skipped = _skipped(peers, ["cashews", "aiocache"])

    def add(name: str, decorate: Decorator) -> None:
        counter = counters[name] = [0]
        fns[name] = decorate(_async_loader(counter))

    with event_loop() as loop:

        async def prepare() -> None:
            add("ours local-only", _local_only().cached(ttl=TTL, namespace="storm-local"))
            for name, lock in (("ours two-tier", False), ("ours two-tier lock=True", True)):
                client = redis.asyncio.Redis.from_url(url)
                cache = _two_tier(
                    client,
                    f"{prefix}:a-{name.replace(' ', '-')}",
                    watch,
                    max_entries=MAX_ENTRIES,
                    lock=lock,
                )
                closers.extend([cache.aclose, client.aclose])
                add(name, cache.cached(ttl=TTL, namespace="storm"))
            notes.append(
                "ours: @cached on the local-only cache, and on two-tier caches (redis.asyncio"
                " client); one in-process single flight per key; lock=True adds the"
                " cross-process lock in Redis (SET NX PX, released by script)"
            )
            if "cashews" in peers:
                cashews = peers["cashews"]
                mem = cashews.Cache()
                mem.setup("mem://")
                red = cashews.Cache()
                red.setup(url)
                closers.extend([mem.close, red.close])
                add("cashews mem", mem(ttl="1m"))
                add("cashews mem protected=False", mem(ttl="1m", protected=False))
                add("cashews redis", red(ttl="1m", key=f"{prefix}:cashews:{{i}}"))
                add(
                    "cashews redis lock=True",
                    red(ttl="1m", key=f"{prefix}:cashews-lock:{{i}}", lock=True),
                )
                notes.append(
                    "cashews: @cache(ttl='1m') (protected=True by default: concurrent calls"
                    " with one key in one process share one Task); lock=True also takes a"
                    " lock in the backend (SET NX, then a spin on it) around every call, hits"
                    " included"
                )
            if "aiocache" in peers:
                aiocache = peers["aiocache"]
                redis_kwargs = _aiocache_redis_kwargs(url)
                add("aiocache mem", aiocache.cached(ttl=TTL, timeout=None))
                add(
                    "aiocache mem cached_stampede",
                    aiocache.cached_stampede(lease=2, ttl=TTL, timeout=None),
                )
                add(
                    "aiocache redis cached_stampede",
                    aiocache.cached_stampede(
                        lease=2,
                        ttl=TTL,
                        timeout=None,
                        cache=aiocache.Cache.REDIS,
                        namespace=f"{prefix}:aiocache-storm",
                        # redis-py 8's asyncio pool raises past 100 connections; 200
                        # tasks each take one, so a bounded pool that waits instead.
                        connection_pool_class=redis.asyncio.BlockingConnectionPool,
                        pool_max_size=STORM_POOL,
                        **redis_kwargs,
                    ),
                )
                for name in fns:
                    if name.startswith("aiocache"):
                        wrapper: Any = fns[name]
                        closers.append(wrapper.cache.close)  # the cache its decorator built
                notes.append(
                    "aiocache: @cached(ttl=60, timeout=None) (no stampede control), and"
                    " @cached_stampede(lease=2, ...) (a RedLock: SET NX in the backend, the"
                    " others wait on an in-process Event up to the lease, then re-read);"
                    f" its Redis client on a BlockingConnectionPool({STORM_POOL}): every task"
                    " reads and tries the lock itself, and redis-py 8's default pool raises"
                    " past 100 connections in use"
                )

        async def close_all() -> None:
            for close in reversed(closers):
                await close()

        def run(name: str) -> tuple[int, int]:
            return loop.run_until_complete(_astorm(fns[name], counters[name]))

        try:
            loop.run_until_complete(prepare())
            group, calls = _storm_group(
                f"d. cold-key stampede, asyncio: {STORM_TASKS} tasks, one key,"
                f" {LOAD_S * 1000:g} ms loader",
                "ours local-only",
                run,
                list(fns),
                s,
            )
        finally:
            loop.run_until_complete(close_all())
    group.skipped = skipped
    group.notes.extend(notes)
    watch.note(group)
    return group, calls


def _sync_loader(counter: list[int]) -> Callable[[int], dict[str, int]]:
    lock = threading.Lock()

    def load(i: int) -> dict[str, int]:
        with lock:
            counter[0] += 1
        time.sleep(LOAD_S)  # releases the GIL, like a query would
        return {"v": i}

    return load


def storm_threads(
    peers: dict[str, Any], quick: bool, url: str, prefix: str, watch: _OutageWatch
) -> tuple[Group, dict[str, list[int]]]:
    s = _storm_settings(quick)
    counters: dict[str, list[int]] = {}
    fns: dict[str, Callable[[int], object]] = {}
    caches: list[rs.TwoTierCache] = []
    clients: list[redis.Redis] = []

    def add(name: str, decorate: Decorator) -> None:
        counter = counters[name] = [0]
        fns[name] = decorate(_sync_loader(counter))

    add("ours local-only", _local_only().cached(ttl=TTL, namespace="storm-local"))
    for name, lock in (("ours two-tier", False), ("ours two-tier lock=True", True)):
        client = redis.Redis.from_url(url)
        cache = _two_tier(
            client,
            f"{prefix}:t-{name.replace(' ', '-')}",
            watch,
            max_entries=MAX_ENTRIES,
            lock=lock,
        )
        clients.append(client)
        caches.append(cache)
        add(name, cache.cached(ttl=TTL, namespace="storm"))
    if "cachetools" in peers:
        cachetools = peers["cachetools"]
        add("cachetools ttl_cache", cachetools.func.ttl_cache(maxsize=MAX_ENTRIES, ttl=TTL))

        def locked_ttlcache(fn: Callable[..., Any]) -> Callable[..., Any]:
            cache = cachetools.TTLCache(maxsize=MAX_ENTRIES, ttl=TTL)
            wrapped: Callable[..., Any] = cachetools.cached(cache, lock=threading.Lock())(fn)
            return wrapped

        add("cachetools cached(lock=Lock())", locked_ttlcache)
    add("functools.lru_cache", functools.lru_cache(maxsize=MAX_ENTRIES))

    try:
        group, calls = _storm_group(
            f"d. cold-key stampede, threads: {STORM_THREADS} threads, one key,"
            f" {LOAD_S * 1000:g} ms GIL-releasing loader",
            "ours local-only",
            lambda name: _storm_threads(fns[name], counters[name]),
            list(fns),
            s,
        )
    finally:
        for cache in caches:
            cache.close()
        for client in clients:
            client.close()
    group.skipped = _skipped(peers, ["cachetools"])
    group.notes.append(
        "ours: @cached (sync redis.Redis client for the two-tier ones); cachetools:"
        " func.ttl_cache (a Condition: one loader, the others wait), cached(TTLCache,"
        " lock=Lock()) (the lock guards the cache only, not the load); lru_cache: no"
        " stampede control"
    )
    watch.note(group)
    return group, calls


def print_storms(group: Group, calls: dict[str, list[int]]) -> None:
    """The stampede table: loader calls per storm beside the wall time."""
    print(f"\n## {group.title}")
    headers = ["case", "loader calls (median)", "max", f"{group.unit} (median)", "min"]
    rows = []
    for name, result in group.results.items():
        counts = calls.get(name, [])
        median_calls = f"{statistics.median(counts):g}" if counts else "-"
        max_calls = f"{max(counts)}" if counts else "-"
        rows.append([name, median_calls, max_calls, f"{result.median:.1f}", f"{result.min:.1f}"])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    print(
        "  ".join(
            [headers[0].ljust(widths[0])]
            + [h.rjust(w) for h, w in zip(headers[1:], widths[1:], strict=True)]
        )
    )
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                [row[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )
    for skipped in group.skipped:
        print(f"skipped: {skipped}")
    for note in group.notes:
        print(f"note: {note}")


# -- entry point --------------------------------------------------------------------------


def _target(label: str, group: Group | None, ours: str, peer: str, limit: float) -> TargetResult:
    if group is None or peer not in group.results:
        return TargetResult(label, ours, peer, limit, None)
    return check_target(label, group, ours, peer, limit)


def _ratio_line(label: str, group: Group | None, ours: str, peers: Sequence[str]) -> str | None:
    if group is None:
        return None
    parts = []
    for peer in peers:
        ratio = group.ratio(ours, peer)
        if ratio is None or ratio <= 0:
            continue
        slower = f" ({peer} takes {1 / ratio:.1f}x as long)" if ratio < 1 else ""
        parts.append(f"{ours}/{peer} = {ratio:.2f}{slower}")
    return f"{label}: " + ", ".join(parts) if parts else None


def _groups(
    peers: dict[str, Any], s: Settings, url: str, prefix: str, redis_ok: bool, watch: _OutageWatch
) -> Iterator[tuple[str, Callable[[], Group]]]:
    for i, shape in enumerate(SHAPES):
        yield f"sync_hit_{i + 1}", functools.partial(sync_hit, peers, s, shape)
    yield "async_hit", lambda: async_hit(peers, s)
    if redis_ok:
        yield "redis_sync", lambda: redis_sync(s, url, prefix, watch)
        yield "redis_async", lambda: redis_async(peers, s, url, prefix, watch)


def main(quick: bool) -> dict[str, Any]:
    peers, versions = _load_peers()
    s = settings(quick)
    url = _redis_url()
    prefix = f"bench:{uuid.uuid4().hex}"
    print("# cache")
    print(
        "peers: "
        + ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items())
        + f"; redis-py {importlib.metadata.version('redis')}"
    )
    print(f"measurement: {s.description}; cases interleaved, median and min over rounds")
    print("overhead = median - median of the bare case; ratio = median over rounds of")
    print("case / reference measured in the same round (pairing cancels machine drift)")

    admin, redis_reason = _redis_or_reason(url)
    if admin is None:
        print(f"skipped: groups c and d: {redis_reason}")
    else:
        print(f"redis: {_where(url)}, keys under {prefix}:")

    watch = _OutageWatch()
    groups: dict[str, Group] = {}
    storm_calls: dict[str, dict[str, list[int]]] = {}
    deleted = 0
    try:
        for key, build in _groups(peers, s, url, prefix, admin is not None, watch):
            groups[key] = build()
            print_group(groups[key])  # as each finishes, so a long run shows progress
        if admin is not None:
            for key, storm in (("storm_async", storm_async), ("storm_threads", storm_threads)):
                group, calls = storm(peers, quick, url, prefix, watch)
                groups[key], storm_calls[key] = group, calls
                print_storms(group, calls)
    finally:
        if admin is not None:
            deleted = _unlink(admin, [f"{prefix}:*", f"lock:{prefix}:*"])
            admin.close()
    if admin is not None:
        print(f"\nredis: unlinked {deleted} keys under {prefix}: (and lock:{prefix}:)")

    targets: list[TargetResult] = [
        _target(
            f"sync hit {shape}", groups[f"sync_hit_{i + 1}"], "ours", "cachetools ttl_cache", 0.5
        )
        for i, shape in enumerate(SHAPES)
    ]
    targets += [
        _target("async hit", groups["async_hit"], "ours", "aiocache timeout=None", 0.2),
        _target("redis-tier hit, sync", groups.get("redis_sync"), "ours get()", "raw GET", 1.3),
        _target(
            "redis-tier hit, sync, decorator",
            groups.get("redis_sync"),
            "ours @cached",
            "raw GET",
            1.25,
        ),
        _target(
            "redis-tier hit, asyncio", groups.get("redis_async"), "ours aget()", "raw GET", 1.3
        ),
    ]
    print("\n## targets (paired ratio of raw ns/op, not of overhead)")
    for target in targets:
        print_target(target)
    info = [
        _ratio_line(
            "async hit vs cashews (info; target: far below)",
            groups["async_hit"],
            "ours",
            ["cashews", "cashews protected=False"],
        ),
        _ratio_line(
            "sync hit f(1) vs the rest (info)",
            groups["sync_hit_1"],
            "ours",
            ["cachetools cached(TTLCache)", "functools.lru_cache"],
        ),
        _ratio_line(
            "redis-tier hit, asyncio, peers (info)",
            groups.get("redis_async"),
            "ours aget()",
            ["cashews get()", "aiocache get()"],
        ),
    ]
    for line in info:
        if line is not None:
            print(line)

    return {
        "peers": versions,
        "settings": {
            "rounds": s.rounds,
            "warmup_rounds": s.warmup_rounds,
            "loop_ns": s.loop_ns,
        },
        "redis": {
            "where": _where(url),
            "skipped": redis_reason,
            "prefix": prefix,
            "keys_unlinked": deleted,
        },
        "groups": {key: group.as_dict() for key, group in groups.items()},
        "loader_calls": storm_calls,
        "targets": [target.as_dict() for target in targets],
    }
