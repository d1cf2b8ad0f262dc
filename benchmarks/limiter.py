"""Rate limiter benchmarks: ours against limits, pyrate-limiter and aiolimiter.

Groups, each measured in this one process with its cases interleaved:

a. in-memory, sync: one hot key, then 10,000 keys in turn
b. in-memory, asyncio, one hot key
c. Redis, sync, one round trip per decision, against a bare PING
d. Redis, pipelined batches (try_acquire_many) against single calls, sync and asyncio

Every limit is generous (1e9 per second, burst 1e9), so every decision is an allowed
one: the common case, and the one each library must do in full. Redis comes from
RESILIENCE_REDIS_URL (default redis://127.0.0.1:6379/0); every key lives under
``bench:<uuid>:`` and is unlinked at the end (SCAN + UNLINK, nothing else is touched).
Without Redis, groups c and d are skipped.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

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
    measure_async_in,
    measure_sync,
    print_group,
    print_target,
    settings,
)
from benchmarks._redis import redis_or_reason as _redis_or_reason
from benchmarks._redis import redis_url as _redis_url
from benchmarks._redis import unlink_prefix as _unlink_prefix
from benchmarks._redis import where as _where
from resilience.metrics import Metrics

#: import name -> distribution name
PEERS: Final = {"limits": "limits", "pyrate_limiter": "pyrate-limiter", "aiolimiter": "aiolimiter"}
RATE: Final = 1e9  # tokens per second
CAPACITY: Final = 1e9
PER_SECOND: Final = 10**9  # the same limit for the peers, which take whole numbers
HOT: Final = "hot"
KEY_COUNT: Final = 10_000
KEYS: Final = tuple(f"k{i}" for i in range(KEY_COUNT))
BATCH_SIZES: Final = (10, 100, 1000)
TARGET_BATCH: Final = 100
WATCHED: Final = "ours, watched"
#: A script that does nothing: what one EVALSHA costs before any limiter logic.
EVALSHA_FLOOR: Final = "return 1"

_clock = time.perf_counter_ns


# -- the bare baseline --------------------------------------------------------------------


class BareBucket:
    """The least a thread-safe token bucket can do: a dict, a lock, a clock, a bool."""

    def __init__(self, rate: float, capacity: float) -> None:
        self._rate = rate
        self._capacity = capacity
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def try_acquire(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return True
            self._state[key] = (tokens, now)
            return False


# -- loops --------------------------------------------------------------------------------


def key_loop(fn: Callable[[str], object], keys: Sequence[str]) -> SyncLoop:
    """``fn(key)`` n times; the key list is built before the clock starts."""
    cycle = KeyCycle(keys)

    def loop(n: int) -> int:
        todo = cycle.take(n)
        start = _clock()
        for key in todo:
            fn(key)
        return _clock() - start

    return loop


def akey_loop(fn: Callable[[str], Awaitable[object]], keys: Sequence[str]) -> AsyncLoop:
    cycle = KeyCycle(keys)

    async def loop(n: int) -> int:
        todo = cycle.take(n)
        start = _clock()
        for key in todo:
            await fn(key)
        return _clock() - start

    return loop


def _batches(cycle: KeyCycle, n: int, size: int) -> list[list[str]]:
    return [cycle.take(size) for _ in range(max(1, -(-n // size)))]


def batch_loop(fn: Callable[[list[str]], object], keys: Sequence[str], size: int) -> SyncLoop:
    """n decisions as whole batches of ``size``; the time is scaled to exactly n."""
    cycle = KeyCycle(keys)

    def loop(n: int) -> int:
        batches = _batches(cycle, n, size)
        start = _clock()
        for batch in batches:
            fn(batch)
        elapsed = _clock() - start
        return elapsed * n // (len(batches) * size)

    return loop


def abatch_loop(
    fn: Callable[[list[str]], Awaitable[object]], keys: Sequence[str], size: int
) -> AsyncLoop:
    cycle = KeyCycle(keys)

    async def loop(n: int) -> int:
        batches = _batches(cycle, n, size)
        start = _clock()
        for batch in batches:
            await fn(batch)
        elapsed = _clock() - start
        return elapsed * n // (len(batches) * size)

    return loop


def _after(loop: SyncLoop, settle: Callable[[], None]) -> SyncLoop:
    """Run ``settle()`` after each timed loop, outside its timed part."""

    def run(n: int) -> int:
        elapsed = loop(n)
        settle()
        return elapsed

    return run


# -- checks -------------------------------------------------------------------------------


def _expect_allowed(name: str, result: object) -> None:
    allowed = all(result) if isinstance(result, list) else bool(result)
    if not allowed:
        raise RuntimeError(f"{name}: the limiter denied a request under a generous limit")


def _check_sync(fns: dict[str, Callable[[str], object]], key: str) -> None:
    for name, fn in fns.items():
        _expect_allowed(name, fn(key))


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
    return modules, versions


def _skipped(peers: dict[str, Any], names: Sequence[str]) -> list[str]:
    return [f"{PEERS[name]} not installed" for name in names if name not in peers]


class _Closer:
    """Things to shut down at the end (pyrate-limiter's leak threads, Redis clients)."""

    def __init__(self) -> None:
        self.sync: list[Callable[[], object]] = []

    def add(self, close: Callable[[], object]) -> None:
        self.sync.append(close)

    def close_all(self) -> None:
        for close in reversed(self.sync):
            close()
        self.sync.clear()


def _limits_item(limits: Any) -> Any:
    return limits.RateLimitItemPerSecond(PER_SECOND)


def _pyrate_rate(pl: Any) -> Any:
    return pl.Rate(PER_SECOND, pl.Duration.SECOND)


def _pyrate_keyed(pl: Any, make_bucket: Callable[[], Any]) -> Any:
    """A Limiter with a bucket per key.

    pyrate's ``Limiter(bucket)`` puts every name into that one bucket (the name is only
    a label), so per-key limits need a BucketFactory: the routing its docs leave to users.
    """

    class PerKey(pl.BucketFactory):  # type: ignore[misc]
        def __init__(self) -> None:
            self.clock = pl.MonotonicClock()
            self.by_key: dict[str, Any] = {}

        def wrap_item(self, name: str, weight: int = 1) -> Any:
            return pl.RateItem(name, self.clock.now(), weight=weight)

        def get(self, item: Any) -> Any:
            bucket = self.by_key.get(item.name)
            if bucket is None:
                bucket = self.by_key[item.name] = make_bucket()
                self.schedule_leak(bucket)
            return bucket

    return pl.Limiter(PerKey())


def _join_expiry_timer(storage: Any) -> None:
    storage.timer.join()


def _pyrate_try(limiter: Any) -> Callable[[str], object]:
    # blocking=False: answer at once instead of sleeping until the item fits.
    return functools.partial(limiter.try_acquire, blocking=False)


# -- a. in-memory, sync -------------------------------------------------------------------


def memory_sync(peers: dict[str, Any], s: Settings, closer: _Closer, many: bool) -> Group:
    keys: Sequence[str] = KEYS if many else (HOT,)
    which = f"{KEY_COUNT:,} keys in turn" if many else "one hot key"
    group = Group(f"a. in-memory, sync, {which}", "ns/op", {}, "bare", "limits FixedWindow")
    ours = rs.TokenBucket(RATE, CAPACITY)
    watched = rs.TokenBucket(RATE, CAPACITY, name="watched")
    Metrics(CollectorRegistry()).watch(watched)  # as production runs it
    fns: dict[str, Callable[[str], object]] = {
        "bare": BareBucket(RATE, CAPACITY).try_acquire,
        "ours": ours.try_acquire,
        WATCHED: watched.try_acquire,
    }
    settles: dict[str, Callable[[], None]] = {}
    if "limits" in peers:
        limits = peers["limits"]
        storage_mod = importlib.import_module("limits.storage")
        strategies = importlib.import_module("limits.strategies")
        item = _limits_item(limits)
        kinds = ["FixedWindow", "SlidingWindowCounter"] + (["MovingWindow"] if many else [])
        for kind in kinds:
            storage = storage_mod.MemoryStorage()
            limiter = getattr(strategies, f"{kind}RateLimiter")(storage)
            name = f"limits {kind}"
            fns[name] = functools.partial(limiter.hit, item)
            # MemoryStorage expires keys on a threading.Timer it re-arms 10 ms after a
            # hit; wait for it after the loop so its work does not land in the next case.
            settles[name] = functools.partial(_join_expiry_timer, storage)
        if not many:
            group.notes.append(
                "limits MovingWindow on MemoryStorage keeps one entry per hit in a per-key"
                " list and inserts at its front (O(hits in the window) per hit): on a hot"
                " key with a generous limit its cost grows with the hit rate, so it is"
                " measured on the 10,000-key case only"
            )
        group.notes.append(
            "limits MemoryStorage: one storage per strategy; its expiry timer is joined"
            " after each loop, outside the timed part"
        )
    if "pyrate_limiter" in peers:
        pl = peers["pyrate_limiter"]
        rate = _pyrate_rate(pl)
        makers: dict[str, Callable[[], Any]] = {
            "pyrate InMemoryBucket": lambda: pl.InMemoryBucket([rate]),
            "pyrate StateBucket TokenBucket": lambda: pl.StateBucket(
                [rate], algorithm=pl.TokenBucket()
            ),
        }
        for name, make in makers.items():
            limiter = _pyrate_keyed(pl, make) if many else pl.Limiter(make())
            closer.add(limiter.close)
            fns[name] = _pyrate_try(limiter)
        group.notes.append(
            "pyrate: Limiter.try_acquire(key, blocking=False); InMemoryBucket is its default"
            " (sliding-window log, one item per hit), StateBucket(TokenBucket()) is its"
            " constant-state token bucket"
            + (
                "; one bucket per key through a BucketFactory (Limiter(bucket) ignores keys)"
                if many
                else ""
            )
        )
    group.skipped = _skipped(peers, ["limits", "pyrate_limiter"])
    _check_sync(fns, keys[0])
    loops: dict[str, SyncLoop] = {}
    for name, fn in fns.items():
        loop = key_loop(fn, keys)
        loops[name] = _after(loop, settles[name]) if name in settles else loop
    group.results = measure_sync(loops, s)
    return group


# -- b. in-memory, async ------------------------------------------------------------------


def memory_async(peers: dict[str, Any], s: Settings, closer: _Closer) -> Group:
    group = Group("b. in-memory, asyncio, one hot key", "ns/op", {}, "bare", "limits FixedWindow")
    bare = BareBucket(RATE, CAPACITY)

    async def bare_async(key: str) -> bool:
        return bare.try_acquire(key)

    ours = rs.TokenBucket(RATE, CAPACITY)
    fns: dict[str, Callable[[str], Awaitable[object]]] = {
        "bare": bare_async,
        "ours": ours.atry_acquire,
    }
    if "limits" in peers:
        storage = importlib.import_module("limits.aio.storage").MemoryStorage()
        strategies = importlib.import_module("limits.aio.strategies")
        limiter = strategies.FixedWindowRateLimiter(storage)
        fns["limits FixedWindow"] = functools.partial(limiter.hit, _limits_item(peers["limits"]))
        group.notes.append("limits: limits.aio FixedWindowRateLimiter on aio MemoryStorage")
    if "aiolimiter" in peers:
        aio = peers["aiolimiter"].AsyncLimiter(PER_SECOND, 1)

        async def aiolimiter_try(key: str) -> bool:
            if aio.has_capacity():
                await aio.acquire()  # has capacity: returns without suspending
                return True
            return False

        fns["aiolimiter"] = aiolimiter_try
        group.notes.append(
            "aiolimiter: one unkeyed AsyncLimiter (it has no keys); the non-blocking try is"
            " has_capacity() then await acquire(), which then never waits (it re-checks"
            " the level, adds 1, re-arms its waker)"
        )
    if "pyrate_limiter" in peers:
        pl = peers["pyrate_limiter"]
        limiter = pl.Limiter(pl.InMemoryBucket([_pyrate_rate(pl)]))
        closer.add(limiter.close)
        fns["pyrate InMemoryBucket"] = functools.partial(limiter.try_acquire_async, blocking=False)
        group.notes.append("pyrate: await Limiter.try_acquire_async(key, blocking=False)")
    group.skipped = _skipped(peers, ["limits", "aiolimiter", "pyrate_limiter"])
    group.notes.append("all cases run in one event loop kept for the whole group")

    with event_loop() as loop:

        async def check_all() -> None:
            for name, fn in fns.items():
                _expect_allowed(name, await fn(HOT))

        loop.run_until_complete(check_all())
        loops = {name: akey_loop(fn, (HOT,)) for name, fn in fns.items()}
        group.results = measure_async_in(loop, loops, s)
    return group


# -- Redis helpers ------------------------------------------------------------------------


class _FallbackWatch:
    """Flags decisions our RedisBackend made locally instead of in Redis (an outage)."""

    def __init__(self) -> None:
        self.unavailable = 0

    def __call__(self, event: Any) -> None:
        if not event.available:
            self.unavailable += 1

    def note(self, backend: rs.RedisBackend) -> str | None:
        # Every decision the backend did not get from Redis is a fallback of its guard.
        fallbacks = backend.guard.fallbacks
        if self.unavailable or fallbacks:
            return (
                f"WARNING: ours fell back to local decisions (backend unavailable"
                f" {self.unavailable}x, {fallbacks} fallbacks): its numbers are not Redis's"
            )
        return None


def _ours_redis(
    client: Any, prefix: str, watch: _FallbackWatch
) -> tuple[rs.TokenBucket, rs.RedisBackend]:
    backend = rs.RedisBackend(client, prefix=prefix, listeners=[watch])
    return rs.TokenBucket(RATE, CAPACITY, backend=backend), backend


# -- c. Redis, sync, one round trip -------------------------------------------------------


def redis_sync(peers: dict[str, Any], s: Settings, closer: _Closer, url: str, prefix: str) -> Group:
    group = Group(
        "c. Redis, sync, one round trip per decision, one hot key", "ns/op", {}, "PING", "PING"
    )
    ping_client = redis.Redis.from_url(url)
    closer.add(ping_client.close)
    timed_client = redis.Redis.from_url(url, socket_timeout=0.1, socket_connect_timeout=0.1)
    closer.add(timed_client.close)
    ours_client = redis.Redis.from_url(url)
    closer.add(ours_client.close)
    watch = _FallbackWatch()
    ours, backend = _ours_redis(ours_client, f"{prefix}:ours", watch)
    closer.add(backend.close)
    floor_sha = ping_client.script_load(EVALSHA_FLOOR)
    fns: dict[str, Callable[[str], object]] = {
        "PING": lambda _key: ping_client.ping(),
        "PING, 0.1 s socket timeouts": lambda _key: timed_client.ping(),
        "EVALSHA floor (return 1)": lambda _key: ping_client.evalsha(floor_sha, 0),
        "ours": ours.try_acquire,
    }
    group.notes.append(
        "PING: redis.Redis.from_url() defaults; 'PING, 0.1 s socket timeouts' uses the"
        " socket settings ours gives its own pool (timeout=0.1, no retries); 'EVALSHA"
        " floor' runs a script that only returns 1: the least a Lua-script limiter pays"
    )
    if "limits" in peers:
        storage_from_string = importlib.import_module("limits.storage").storage_from_string
        strategies = importlib.import_module("limits.strategies")
        item = _limits_item(peers["limits"])
        for kind in ("FixedWindow", "MovingWindow", "SlidingWindowCounter"):
            # One storage (and key prefix) per strategy: they would share key names.
            storage = storage_from_string(url, key_prefix=f"{prefix}:limits-{kind}")
            closer.add(storage.storage.close)
            limiter = getattr(strategies, f"{kind}RateLimiter")(storage)
            fns[f"limits {kind}"] = functools.partial(limiter.hit, item)
        group.notes.append(
            "limits: storage_from_string(url, key_prefix=...) (RedisStorage), one per"
            " strategy; each hit is one EVALSHA of its registered script"
        )
    if "pyrate_limiter" in peers:
        pl = peers["pyrate_limiter"]
        rate = _pyrate_rate(pl)
        pyrate_client = redis.Redis.from_url(url)
        closer.add(pyrate_client.close)
        log_bucket = pl.RedisBucket.init([rate], pyrate_client, f"{prefix}:pyrate-log")
        state_bucket = pl.StateBucket(
            [rate],
            algorithm=pl.TokenBucket(),
            store=pl.RedisStateStore(pyrate_client, key=f"{prefix}:pyrate-tb"),
        )
        for name, bucket in (
            ("pyrate RedisBucket", log_bucket),
            ("pyrate StateBucket TokenBucket", state_bucket),
        ):
            limiter = pl.Limiter(bucket)
            closer.add(limiter.close)
            fns[name] = _pyrate_try(limiter)
        group.notes.append(
            "pyrate: Limiter(bucket).try_acquire(key, blocking=False); RedisBucket.init()"
            " is its sorted-set log (ZADD per hit, local clock), StateBucket(TokenBucket(),"
            " RedisStateStore) its one-hash GCRA; the key is the bucket's, not the name's"
        )
    group.skipped = _skipped(peers, ["limits", "pyrate_limiter"])
    _check_sync(fns, HOT)
    group.results = measure_sync({name: key_loop(fn, (HOT,)) for name, fn in fns.items()}, s)
    if (warning := watch.note(backend)) is not None:
        group.notes.append(warning)
    return group


# -- d. Redis, pipelined batches ----------------------------------------------------------


def _rates_note(group: Group) -> None:
    rates = ", ".join(
        f"{name} {1e9 / result.median:,.0f}" for name, result in group.results.items()
    )
    group.notes.append(f"decisions/s (from the medians): {rates}")


def redis_batch_sync(s: Settings, closer: _Closer, url: str, prefix: str) -> Group:
    group = Group(
        f"d. Redis batches, sync, {KEY_COUNT:,} keys in turn",
        "ns/decision",
        {},
        None,
        "single",
    )
    client = redis.Redis.from_url(url)
    closer.add(client.close)
    watch = _FallbackWatch()
    ours, backend = _ours_redis(client, f"{prefix}:ours-batch", watch)
    closer.add(backend.close)
    _expect_allowed("single", ours.try_acquire(KEYS[0]))
    loops: dict[str, SyncLoop] = {"single": key_loop(ours.try_acquire, KEYS)}
    for size in BATCH_SIZES:
        _expect_allowed(f"batch {size}", ours.try_acquire_many(list(KEYS[:size])))
        loops[f"batch {size}"] = batch_loop(ours.try_acquire_many, KEYS, size)
    group.notes.append("single: try_acquire(key); batch N: try_acquire_many(N keys)")
    group.results = measure_sync(loops, s)
    _rates_note(group)
    if (warning := watch.note(backend)) is not None:
        group.notes.append(warning)
    return group


def redis_batch_async(s: Settings, url: str, prefix: str) -> Group:
    group = Group(
        f"d. Redis batches, asyncio, {KEY_COUNT:,} keys in turn",
        "ns/decision",
        {},
        None,
        "single",
    )
    with event_loop() as loop:
        ping_client = redis.asyncio.Redis.from_url(url)
        ours_client = redis.asyncio.Redis.from_url(url)
        watch = _FallbackWatch()
        ours, backend = _ours_redis(ours_client, f"{prefix}:ours-abatch", watch)

        async def ping(_key: str) -> object:
            return await ping_client.ping()

        loops: dict[str, AsyncLoop] = {
            "PING": akey_loop(ping, KEYS),
            "single": akey_loop(ours.atry_acquire, KEYS),
        }
        for size in BATCH_SIZES:
            loops[f"batch {size}"] = abatch_loop(ours.atry_acquire_many, KEYS, size)

        async def check_all() -> None:
            _expect_allowed("PING", await ping(HOT))
            _expect_allowed("single", await ours.atry_acquire(KEYS[0]))
            for size in BATCH_SIZES:
                _expect_allowed(f"batch {size}", await ours.atry_acquire_many(list(KEYS[:size])))

        async def close_all() -> None:
            await ping_client.aclose()
            await ours_client.aclose()
            await backend.aclose()  # the pool it built for itself

        try:
            loop.run_until_complete(check_all())
            group.results = measure_async_in(loop, loops, s)
        finally:
            loop.run_until_complete(close_all())
    group.notes.append(
        "redis.asyncio clients; await atry_acquire(key) / atry_acquire_many(N keys);"
        " one event loop for the whole group; PING (async) for scale"
    )
    _rates_note(group)
    if (warning := watch.note(backend)) is not None:
        group.notes.append(warning)
    return group


# -- entry point --------------------------------------------------------------------------


def _target(
    label: str,
    group: Group | None,
    ours: str,
    peer: str,
    limit: float,
    peer_label: str | None = None,
) -> TargetResult:
    if group is None:
        return TargetResult(label, ours, peer_label or peer, limit, None)
    return check_target(label, group, ours, peer, limit, peer_label=peer_label)


def _groups(
    peers: dict[str, Any], s: Settings, closer: _Closer, url: str, prefix: str, redis_ok: bool
) -> Iterator[tuple[str, Callable[[], Group]]]:
    yield "memory_hot", lambda: memory_sync(peers, s, closer, many=False)
    yield "memory_keys", lambda: memory_sync(peers, s, closer, many=True)
    yield "memory_async", lambda: memory_async(peers, s, closer)
    if redis_ok:
        yield "redis_sync", lambda: redis_sync(peers, s, closer, url, prefix)
        yield "redis_batch_sync", lambda: redis_batch_sync(s, closer, url, prefix)
        yield "redis_batch_async", lambda: redis_batch_async(s, url, prefix)


def main(quick: bool) -> dict[str, Any]:
    peers, versions = _load_peers()
    s = settings(quick)
    url = _redis_url()
    prefix = f"bench:{uuid.uuid4().hex}"
    print("# limiter")
    print(
        "peers: "
        + ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items())
    )
    print(f"measurement: {s.description}; cases interleaved, median and min over rounds")
    print("overhead = median - median of the bare case; ratio = median over rounds of")
    print("case / reference measured in the same round (pairing cancels machine drift)")
    print(f"limits: {CAPACITY:g} tokens, {RATE:g}/s (peers: {PER_SECOND:,} per second)")

    admin, redis_reason = _redis_or_reason(url)
    if admin is None:
        print(f"skipped: groups c and d: {redis_reason}")
    else:
        print(f"redis: {_where(url)}, keys under {prefix}:")

    groups: dict[str, Group] = {}
    closer = _Closer()
    deleted = 0
    try:
        for key, build in _groups(peers, s, closer, url, prefix, admin is not None):
            groups[key] = build()
            print_group(groups[key])  # as each finishes, so a long run shows progress
    finally:
        closer.close_all()
        if admin is not None:
            deleted = _unlink_prefix(admin, prefix)
            admin.close()
    if admin is not None:
        print(f"\nredis: unlinked {deleted} keys under {prefix}:")

    hot, keyed = groups["memory_hot"], groups["memory_keys"]
    redis_one = groups.get("redis_sync")
    targets: list[TargetResult] = [
        _target("in-memory hot key", hot, "ours", "limits FixedWindow", 0.2),
        _target("in-memory hot key", hot, "ours", "bare", 2.5, "bare lock bucket"),
        _target("in-memory 10k keys", keyed, "ours", "limits FixedWindow", 0.2),
        _target("in-memory 10k keys", keyed, "ours", "bare", 2.5, "bare lock bucket"),
        _target("in-memory hot key, watched", hot, WATCHED, "ours", 1.5),
        _target("in-memory 10k keys, watched", keyed, WATCHED, "ours", 1.5),
        # A decision costs no more than a bare EVALSHA returning 1 does (1.02-1.19 x PING).
        _target("redis one round trip", redis_one, "ours", "PING", 1.15),
    ]
    for key, kind in (("redis_batch_sync", "sync"), ("redis_batch_async", "asyncio")):
        targets.append(
            _target(
                f"redis batch, {kind} (ns/decision; <= 0.25 is >= 4x the decision rate)",
                groups.get(key),
                f"batch {TARGET_BATCH}",
                "single",
                0.25,
            )
        )
    print("\n## targets (paired ratio of raw ns/op, not of overhead)")
    for target in targets:
        print_target(target)
    if redis_one is not None:
        peer_ratios = [
            f"{name} {ratio:.2f}x"
            for name in redis_one.results
            if name != "PING" and (ratio := redis_one.ratio(name, "PING")) is not None
        ]
        print("redis one round trip vs PING: " + ", ".join(peer_ratios))

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
        "targets": [target.as_dict() for target in targets],
    }
