"""TwoTierCache against real Redis servers: what only a real server (and a real network) shows.

- Cross-instance invalidation over pub/sub, RESP2 and RESP3, sync and async; a writer
  keeps its own local value.
- The invalidation race made deterministic: a fill that read Redis before another
  instance's write was announced never lands (get and get_or_load, sync and async).
- The invalidation channel dropping (FaultProxy cut, server-side CLIENT KILL), the flush
  on loss and on resubscribe, and the staleness bound while the channel is silently dead.
- Foreign, corrupt and malicious bytes in Redis: a counted miss, never an exception, never
  unpickled.
- Redis outages through a FaultProxy (cut and blackhole): the loader answers, the breaker
  stops contacting the dead server, recovery goes back to Redis.
- Cross-process single-flight (``lock=True``) in four processes, with the Redis commands
  of each waiter counted on a throwaway server (MONITOR + INFO commandstats); a crashed
  lock holder; SCRIPT FLUSH between writes.
- 64 threads / 500 tasks missing one key: one load, one error for all, nothing cached.
- Sync calls on an asyncio-client cache (and the reverse) are refused with a TypeError.
- Redis Cluster (a real 3-node cluster started here): writes and deletes on one instance
  evict the other's local copies over sharded pub/sub on the key's slot, sync and async;
  a load notice wakes a waiter; a slot that moves flushes and resubscribes.

The shared Redis gets only keys under this test's ``redis_prefix``; everything destructive
(SCRIPT FLUSH, CLIENT KILL, CONFIG RESETSTAT, MONITOR, moving slots) runs on redis-servers
started here.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import inspect
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
import redis.asyncio
from redis.crc import key_slot
from support.faultproxy import FaultProxy
from support.redis_servers import RedisCluster3, RedisServer
from support.services import new_redis_prefix

import resilience as rs
from resilience.cache import Serializer
from resilience.remote import shard_channel
from resilience.testing import FakeClock

pytestmark = pytest.mark.redis


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs only on asyncio; trio coverage of the cache: test_cache_local.py.
    return "asyncio"


SAFE = 1.0  # Redis timeout where no outage is staged: a busy shared Redis must not fail a test
WAIT = 5.0  # the longest any test waits for an event that must come
RECOVERY = 0.2  # the fast breaker's recovery_timeout, seconds
HANDFUL = 3  # connection attempts allowed while the breaker guards a dead server
PROBES = 10  # half-open probes a recovery may take (each has the 0.05 s budget)

# The envelope RedisCache writes before the serializer's bytes (resilience/cache/_redis_base.py):
# magic 0xC5, version 1, fresh-until (epoch seconds), load time (seconds).
ENVELOPE = struct.Struct("<BBdd")


# --- helpers ---------------------------------------------------------------------------


class EventLog:
    """A cache listener that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[rs.CacheEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: rs.CacheEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def count(self, kind: str, key: str | None = None) -> int:
        with self._cond:
            return sum(1 for e in self.events if e.kind == kind and (key is None or e.key == key))

    def keys(self, kind: str) -> list[str | None]:
        with self._cond:
            return [e.key for e in self.events if e.kind == kind]

    def seen(self, kind: str, key: str | None = None, count: int = 1, timeout: float = 0) -> bool:
        """Whether ``count`` events of ``kind`` (for ``key``) arrive within ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count(kind, key) >= count, timeout=timeout)

    def wait_for(self, kind: str, key: str | None = None, count: int = 1) -> None:
        """Until ``count`` events of ``kind`` (for ``key``) have been seen; fail after WAIT s."""
        if not self.seen(kind, key, count, timeout=WAIT):
            shown = [(e.kind, e.key) for e in self.events]
            raise AssertionError(f"no {count} x {kind!r} for {key!r} within {WAIT} s: {shown}")

    def _count(self, kind: str, key: str | None) -> int:
        return sum(1 for e in self.events if e.kind == kind and (key is None or e.key == key))

    async def await_for(self, kind: str, key: str | None = None, count: int = 1) -> None:
        await anyio.to_thread.run_sync(functools.partial(self.wait_for, kind, key, count))


@dataclasses.dataclass
class Node:
    """One cache instance (think: one process of a service) and what it saw."""

    cache: rs.TwoTierCache
    log: EventLog
    client: Any

    @property
    def remote(self) -> rs.RedisCache:
        assert self.cache.remote is not None
        return self.cache.remote


def fast_breaker(clock: FakeClock | None = None) -> rs.CircuitBreaker:
    """Opens on the first failure, probes again after RECOVERY seconds (of ``clock``)."""
    return rs.CircuitBreaker(
        f"cache-test-{uuid.uuid4().hex[:6]}",
        failure_threshold=1,
        recovery_timeout=RECOVERY,
        success_threshold=1,
        include=(redis.RedisError, OSError),
        clock=clock,
    )


def envelope(fresh_for: float = 300.0, *, version: int = 1, magic: int = 0xC5) -> bytes:
    return ENVELOPE.pack(magic, version, time.time() + fresh_for, 0.0)


class BugReproduced(AssertionError):
    """Raised by the checks that reproduced bugs this file found (all fixed since), so a
    regression reads as the bug it is, not as a failure of some set-up step."""


def bug_if(shown: bool, what: str) -> None:
    if shown:
        raise BugReproduced(what)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a cheap condition every 10 ms, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def raw_get(client: redis.Redis, key: str) -> bytes | None:
    value = client.get(key)
    assert value is None or isinstance(value, bytes)
    return value


def available(node: Node) -> bool:
    return node.remote.guard.available


def sync_channel(writer: Node, reader: Node) -> None:
    """Until a notice ``writer`` publishes now reaches ``reader``: its channel is up, and
    whatever it does on (re)subscribing (the flush) is done.

    Counting subscribers (PUBSUB NUMSUB) is not enough: when a subscriber connection
    drops, redis-py reconnects and resubscribes it once before raising (its retry calls
    the reconnecting error handler even with no retries left), and the cache then closes
    that connection; for a moment Redis counts a subscriber that will never read.
    """
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        before = reader.log.count("invalidated", "sentinel")
        writer.cache.set("sentinel", before)
        if reader.log.seen("invalidated", "sentinel", before + 1, timeout=0.1):
            return
    raise AssertionError("the reader's invalidation channel did not come back")


def subscribers(client: redis.Redis, channel: str) -> int:
    ((_, count),) = client.pubsub_numsub(channel)
    return int(count)


def await_subscribed(url: str, remote: rs.RedisCache, made: list[Node]) -> None:
    """Until Redis has every listening cache of ``made`` on this cache's channel.

    The cache returns from its constructor once SUBSCRIBE is sent, not once Redis has it,
    so a write right after construction could go unseen (see the resubscribe xfail below).
    """
    listening = sum(1 for n in made if n.remote.listening or n.remote is remote)
    with redis.Redis.from_url(url) as admin:
        wait_until(
            lambda: subscribers(admin, remote.invalidate_channel) >= listening,
            "the new cache's subscription",
        )


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """This test's prefix on the shared Redis, as a RedisCache prefix (no trailing ':')."""
    return redis_prefix.rstrip(":")


@pytest.fixture
def make(redis_url: str, prefix: str) -> Iterator[Callable[..., Node]]:
    """Build sync two-tier caches on this test's prefix; all are closed afterwards."""
    made: list[Node] = []

    def factory(
        url: str | None = None,
        *,
        client_kwargs: dict[str, Any] | None = None,
        timeout: float = SAFE,
        breaker: rs.CircuitBreaker | None = None,
        serializer: Serializer | None = None,
        local: rs.LocalCache | None = None,
        **options: Any,
    ) -> Node:
        client = redis.Redis.from_url(url or redis_url, **(client_kwargs or {}))
        log = EventLog()
        remote = rs.RedisCache(
            client, prefix=prefix, timeout=timeout, breaker=breaker, serializer=serializer
        )
        cache = rs.TwoTierCache(
            local if local is not None else rs.LocalCache(max_entries=1000, ttl=30.0),
            remote,
            listeners=[log],
            **options,
        )
        node = Node(cache, log, client)
        made.append(node)
        if options.get("invalidation", True):
            await_subscribed(url or redis_url, remote, made)
        return node

    yield factory
    for node in made:
        node.cache.close()
        node.client.close()


@pytest.fixture
async def amake(
    require_asyncio: None, redis_url: str, prefix: str
) -> AsyncIterator[Callable[..., Node]]:
    """Like ``make``, with redis.asyncio clients."""
    made: list[Node] = []

    def factory(
        url: str | None = None,
        *,
        client_kwargs: dict[str, Any] | None = None,
        timeout: float = SAFE,
        breaker: rs.CircuitBreaker | None = None,
        **options: Any,
    ) -> Node:
        client = redis.asyncio.Redis.from_url(url or redis_url, **(client_kwargs or {}))
        log = EventLog()
        remote = rs.RedisCache(client, prefix=prefix, timeout=timeout, breaker=breaker)
        cache = rs.TwoTierCache(
            rs.LocalCache(max_entries=1000, ttl=30.0), remote, listeners=[log], **options
        )
        node = Node(cache, log, client)
        made.append(node)
        if options.get("invalidation", True):
            await_subscribed(url or redis_url, remote, made)
        return node

    yield factory
    for node in made:
        await node.cache.aclose()
        await node.client.aclose()


# --- 1. cross-instance invalidation ----------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_writes_evict_other_instances_local_tier(make: Callable[..., Node], protocol: int) -> None:
    kw = {"protocol": protocol}
    a, b = make(client_kwargs=kw), make(client_kwargs=kw)
    a.cache.set("user:1", {"name": "old"})
    # A fill whose ticket predates a notice is dropped, even when its read already saw the
    # write: wait for the notice so that B's read below stays in B's local tier.
    b.log.wait_for("invalidated", "user:1")
    assert b.cache.get("user:1") == {"name": "old"}
    assert b.cache.local.get("user:1") == {"name": "old"}  # B now serves it locally

    a.cache.set("user:1", {"name": "new"})
    b.log.wait_for("invalidated", "user:1", count=2)
    assert b.cache.get("user:1") == {"name": "new"}  # not B's old local copy

    a.cache.delete("user:1")
    b.log.wait_for("invalidated", "user:1", count=3)
    assert b.cache.get("user:1", "gone") == "gone"

    # A's own notices are ignored by A: a later write by B reaches A, A's never did.
    a.cache.set("user:2", "mine")
    b.cache.set("sentinel", 1)  # published after A's notice: A sees it after A's own
    a.log.wait_for("invalidated", "sentinel")
    assert a.log.keys("invalidated") == ["sentinel"]
    assert a.cache.local.get("user:2") == "mine"  # A's write kept A's local value


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
async def test_writes_evict_other_instances_local_tier_async(
    amake: Callable[..., Node], protocol: int
) -> None:
    kw = {"protocol": protocol}
    a, b = amake(client_kwargs=kw), amake(client_kwargs=kw)
    await a.cache.aset("user:1", {"name": "old"})
    await b.log.await_for("invalidated", "user:1")
    assert await b.cache.aget("user:1") == {"name": "old"}
    assert b.cache.local.get("user:1") == {"name": "old"}

    await a.cache.aset("user:1", {"name": "new"})
    await b.log.await_for("invalidated", "user:1", count=2)
    assert await b.cache.aget("user:1") == {"name": "new"}

    await a.cache.adelete("user:1")
    await b.log.await_for("invalidated", "user:1", count=3)
    assert await b.cache.aget("user:1", "gone") == "gone"

    await a.cache.aset("user:2", "mine")
    await b.cache.aset("sentinel", 1)
    await a.log.await_for("invalidated", "sentinel")
    assert a.log.keys("invalidated") == ["sentinel"]
    assert a.cache.local.get("user:2") == "mine"


def test_a_loaded_value_evicts_other_instances_copies(
    make: Callable[..., Node], redis_client: redis.Redis, prefix: str
) -> None:
    """A value a loader stores is announced like a set: B's local copy of the key goes."""
    a, b = make(), make()
    a.cache.set("k", "v1")
    b.log.wait_for("invalidated", "k")
    assert b.cache.get("k") == "v1"
    assert b.cache.local.get("k") == "v1"
    redis_client.delete(f"{prefix}:k")  # gone from Redis without a notice (say, evicted)
    assert a.cache.local.get("k") == "v1"
    a.cache.local.invalidate("k")
    assert a.cache.get_or_load("k", lambda: "v2") == "v2"
    b.log.wait_for("invalidated", "k", count=2)
    assert b.cache.get("k") == "v2"


# --- 2. the invalidation race, deterministic -------------------------------------------


class Gate:
    """Holds a Redis read of B's after it returned, until the test lets it go."""

    def __init__(self) -> None:
        self.read = threading.Event()
        self.go = threading.Event()
        self.armed = True


def gate_get(monkeypatch: pytest.MonkeyPatch, node: Node, key: str) -> Gate:
    gate = Gate()
    real = node.remote.get

    def held(k: str) -> bytes | None:
        blob = real(k)
        if k == key and gate.armed:
            gate.armed = False
            gate.read.set()
            assert gate.go.wait(WAIT)
        return blob

    monkeypatch.setattr(node.remote, "get", held)
    return gate


def agate_get(monkeypatch: pytest.MonkeyPatch, node: Node, key: str) -> Gate:
    gate = Gate()
    real = node.remote.aget

    async def held(k: str) -> bytes | None:
        blob = await real(k)
        if k == key and gate.armed:
            gate.armed = False
            gate.read.set()
            assert await anyio.to_thread.run_sync(gate.go.wait, WAIT)
        return blob

    monkeypatch.setattr(node.remote, "aget", held)
    return gate


@pytest.mark.parametrize("via", ["get", "get_or_load"])
def test_fill_that_read_before_an_invalidation_does_not_land(
    make: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    a, b = make(), make()
    a.cache.set("k", "old")
    b.log.wait_for("invalidated", "k")  # that notice is done with before B's ticket
    gate = gate_get(monkeypatch, b, "k")
    got: list[Any] = []

    def not_called() -> str:
        raise AssertionError("the value was in Redis: no load")

    def reader() -> None:
        if via == "get":
            got.append(b.cache.get("k"))
        else:
            got.append(b.cache.get_or_load("k", not_called))

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert gate.read.wait(WAIT)  # B has read "old" from Redis and not yet filled
        a.cache.set("k", "new")
        b.log.wait_for("invalidated", "k", count=2)  # ...and the invalidation reached B
    finally:
        gate.go.set()
        t.join(WAIT)
    assert got == ["old"]  # the read itself happened before the write: fine
    assert b.cache.local.get("k") != "old"  # but the fill was dropped
    assert b.log.count("hit", "k") == 1  # the remote hit; no local hit on "old"
    if via == "get":
        assert b.cache.get("k") == "new"
    else:
        assert b.cache.get_or_load("k", not_called) == "new"
    assert b.cache.local.get("k") == "new"


@pytest.mark.anyio
@pytest.mark.parametrize("via", ["aget", "aget_or_load"])
async def test_fill_that_read_before_an_invalidation_does_not_land_async(
    amake: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    a, b = amake(), amake()
    await a.cache.aset("k", "old")
    await b.log.await_for("invalidated", "k")
    gate = agate_get(monkeypatch, b, "k")
    got: list[Any] = []

    async def not_called() -> str:
        raise AssertionError("the value was in Redis: no load")

    async def reader() -> None:
        if via == "aget":
            got.append(await b.cache.aget("k"))
        else:
            got.append(await b.cache.aget_or_load("k", not_called))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        try:
            assert await anyio.to_thread.run_sync(gate.read.wait, WAIT)
            await a.cache.aset("k", "new")
            await b.log.await_for("invalidated", "k", count=2)
        finally:
            gate.go.set()
    assert got == ["old"]
    assert b.cache.local.get("k") != "old"
    if via == "aget":
        assert await b.cache.aget("k") == "new"
    else:
        assert await b.cache.aget_or_load("k", not_called) == "new"


@pytest.mark.parametrize("write", ["set", "delete"])
def test_load_that_started_before_a_write_does_not_overwrite_it(
    make: Callable[..., Node], redis_client: redis.Redis, prefix: str, write: str
) -> None:
    a, b = make(), make()
    started, release = threading.Event(), threading.Event()

    def load_from_db() -> str:
        started.set()  # the loader read the database before A's update...
        assert release.wait(WAIT)
        return "old-from-db"  # ...and returns that older value after it

    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(b.cache.get_or_load("k", load_from_db)))
    t.start()
    try:
        assert started.wait(WAIT)
        if write == "set":
            a.cache.set("k", "new")
        else:
            a.cache.delete("k")
        b.log.wait_for("invalidated", "k")  # B knows its load may be stale
    finally:
        release.set()
        t.join(WAIT)
    assert got == ["old-from-db"]
    assert b.cache.local.get("k") != "old-from-db"  # the local fill was dropped
    raw = raw_get(redis_client, f"{prefix}:k")
    stored = None if raw is None else a.remote.decode(raw)
    held = None if stored is None else stored.value
    # Today Redis holds "old-from-db" (for the cache ttl, 300 s), over A's newer write.
    bug_if(held != ("new" if write == "set" else None), f"Redis holds {held!r}")
    a.cache.local.invalidate("k")
    assert a.cache.get("k") == ("new" if write == "set" else None)


# --- 3. the invalidation channel drops -------------------------------------------------


def test_channel_cut_flushes_and_resubscribes(
    proxy: FaultProxy, make: Callable[..., Node], redis_url: str, redis_client: redis.Redis
) -> None:
    a = make()
    b = make(proxy.url_for(redis_url))
    channel = a.remote.invalidate_channel
    assert b.log.count("flushed") == 1  # on the first subscribe
    a.cache.set("k", "v1")
    b.log.wait_for("invalidated", "k")
    assert b.cache.get("k") == "v1"
    b.cache.set("other", "mine")
    assert len(b.cache.local) == 2

    proxy.cut()  # B's subscriber (and its command connections) are reset
    b.log.wait_for("flushed", count=2)
    assert len(b.cache.local) == 0  # notices may be lost from now on: nothing is kept
    wait_until(lambda: not b.remote.listening, "B to report the channel down")
    a.cache.set("k", "v2")  # a notice B cannot get
    assert b.cache.get("k", "unknown") == "unknown"  # nothing stale: Redis is out of reach

    proxy.restore()
    b.log.wait_for("flushed", count=3)  # resubscribed: flushed again
    sync_channel(a, b)
    assert subscribers(redis_client, channel) == 2
    wait_until(lambda: b.remote.listening, "B to report the channel up")
    assert b.cache.get("k") == "v2"

    a.cache.set("k", "v3")  # invalidations work again
    b.log.wait_for("invalidated", "k", count=2)
    assert b.cache.get("k") == "v3"


def test_staleness_bound_while_the_channel_is_silently_dead(
    proxy: FaultProxy, make: Callable[..., Node], redis_url: str
) -> None:
    """A channel that dies without a reset (blackhole: a dead NAT entry, a hung host) is
    not noticed, so nothing is flushed; a local value is then served until the LocalCache
    ttl runs out, and not a moment longer."""
    clock = FakeClock(wall_start=time.time())
    a = make(clock=clock)
    b = make(
        proxy.url_for(redis_url),
        timeout=0.25,
        local=rs.LocalCache(max_entries=100, ttl=10.0, clock=clock),
        clock=clock,
    )
    a.cache.set("k", "v1")
    b.log.wait_for("invalidated", "k")
    assert b.cache.get("k") == "v1"

    proxy.blackhole()
    a.cache.set("k", "v2")  # the notice waits at the proxy
    assert b.log.count("flushed") == 1  # only the first subscribe: the drop went unnoticed
    assert b.cache.get("k") == "v1"  # stale, from the local tier
    clock.advance(9.5)
    assert b.cache.get("k") == "v1"  # still within the LocalCache ttl
    clock.advance(0.5)
    # Past the local ttl the old value is gone; Redis is unreachable, so: the default.
    assert b.cache.get("k", "unknown") == "unknown"
    assert b.cache.local.get("k") != "v1"

    proxy.restore()  # the held notice arrives; Redis answers again
    b.log.wait_for("invalidated", "k", count=2)
    assert b.cache.get("k") == "v2"


def _no_handshake() -> dict[str, Any]:
    """Client options for a connection that sends nothing before its first command (RESP2,
    no CLIENT SETINFO), so that a subscriber's SUBSCRIBE is the first thing it sends."""
    if "driver_info" in inspect.signature(redis.connection.AbstractConnection).parameters:
        return {"protocol": 2, "driver_info": None}
    return {"protocol": 2, "lib_name": None, "lib_version": None}


NO_HANDSHAKE = _no_handshake()


def test_resubscribe_flush_comes_after_the_subscription_is_active(
    proxy: FaultProxy,
    make: Callable[..., Node],
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = make()
    b = make(proxy.url_for(redis_url), client_kwargs=NO_HANDSHAKE)
    channel = a.remote.invalidate_channel
    a.cache.set("k", "v1")
    # B reads Redis directly, so only its subscriber connection is slow (below).
    direct = b.remote
    monkeypatch.setattr(direct, "get", lambda key: raw_get(redis_client, direct.key(key)))

    proxy.cut()
    b.log.wait_for("flushed", count=2)
    proxy.delay(0.25)  # B's SUBSCRIBE reaches Redis 0.25 s after B sends it
    proxy.restore()
    b.log.wait_for("flushed", count=3)  # B says it is back (and has flushed)...
    assert b.cache.get("k") == "v1"  # a read after the flush...
    active = subscribers(redis_client, channel)  # today 1: B's SUBSCRIBE is still on its way
    a.cache.set("k", "v2")  # ...so this notice never reaches B
    sync_channel(a, b)  # B's subscription is active now
    served = b.cache.get("k")
    bug_if(served != "v2", f"B serves {served!r} (subscribers at its flush: {active})")


def _kill_and_write(
    server: RedisServer, client_name: str, key: str, blob: bytes, notice: str, channel: str
) -> None:
    """Kill the named client's subscriber connection and write + announce ``key``, atomically:
    the notice is published while that subscriber is gone."""
    with server.client() as admin:
        (sub_id,) = [
            c["id"]
            for c in admin.client_list()
            if c.get("name") == client_name and "P" in c.get("flags", "")
        ]
        with admin.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_id=sub_id)
            pipe.set(key, blob, px=300_000)
            pipe.publish(channel, notice)
            pipe.execute()


@pytest.mark.parametrize(
    "client_kwargs",
    [
        pytest.param({}, id="default-client"),
        pytest.param(
            {"retry_on_error": [redis.ConnectionError]},
            id="retry_on_error",
        ),
    ],
)
def test_server_side_kill_of_the_subscriber(
    make: Callable[..., Node], throwaway: RedisServer, client_kwargs: dict[str, Any]
) -> None:
    a = make(throwaway.url)
    b = make(throwaway.url, client_kwargs={"client_name": "cache-b", **client_kwargs})
    a.cache.set("k", "v1")
    b.log.wait_for("invalidated", "k")
    assert b.cache.get("k") == "v1"
    assert b.cache.local.get("k") == "v1"
    blob = a.remote.encode("v2", time.time() + 300, 0.0)
    channel = a.remote.invalidate_channel
    _kill_and_write(throwaway, "cache-b", a.remote.key("k"), blob, f"{a.remote.origin} k", channel)
    sync_channel(a, b)
    served = b.cache.get("k")
    bug_if(served != "v2", f"B serves {served!r}; flushed {b.log.count('flushed')} time(s)")
    assert b.log.count("flushed") >= 3  # on subscribing, on the kill, on resubscribing


def settle(cache: rs.TwoTierCache) -> None:
    """Until the cache's subscriber thread sits in its blocking read, where it spends
    nearly all its life. (Closed in the instant between subscribing and that read, it
    leaves cleanly, so the bug below would not show.)"""
    wait_until(lambda: cache.remote is not None and cache.remote.listening, "listening")
    time.sleep(0.05)


CLOSE_RECONNECTS = (
    "BUG: close() makes the subscriber open a new connection and resubscribe before it "
    "stops: stop() shuts the socket down, and redis-py's PubSub answers the read error by "
    "reconnecting (its retry calls the reconnecting handler even with no retries left); "
    "with RESP3 (redis-py 8's default) on an unresponsive network close() then blocks for "
    "the subscriber's 2 s socket timeout"
)


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_close_does_not_connect_again(throwaway: RedisServer, protocol: int) -> None:
    client = redis.Redis.from_url(throwaway.url, protocol=protocol)
    with throwaway.client() as admin:
        try:
            cache = rs.TwoTierCache(
                rs.LocalCache(), rs.RedisCache(client, prefix=new_redis_prefix().rstrip(":"))
            )
            settle(cache)
            before = admin.info("stats")["total_connections_received"]
            cache.close()
            # Redis may count a new connection a moment after close() returns (RESP2 sends
            # nothing that waits for a reply): look for 0.2 s.
            deadline = time.monotonic() + 0.2
            after = before
            while after == before and time.monotonic() < deadline:
                time.sleep(0.01)
                after = admin.info("stats")["total_connections_received"]
        finally:
            client.close()
    bug_if(after != before, f"close() opened {after - before} new connection(s)")


def test_close_is_prompt_when_redis_does_not_answer(
    proxy: FaultProxy, redis_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url), protocol=3)
    try:
        cache = rs.TwoTierCache(rs.LocalCache(), rs.RedisCache(client, prefix=prefix))
        settle(cache)
        proxy.blackhole()
        started = time.monotonic()
        cache.close()
        took = time.monotonic() - started
    finally:
        client.close()
    bug_if(took > 0.5, f"close() took {took:.2f} s")


# --- 4. corrupt and foreign bytes ------------------------------------------------------


def _json(text: bytes) -> bytes:
    return bytes((0xF5, 1)) + text


CORRUPT: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"definitely not a cache entry",
    "empty": lambda: b"",
    "truncated-envelope": lambda: envelope()[:11],
    "envelope-only": lambda: envelope(),
    "envelope-non-json": lambda: envelope() + _json(b"{not json"),
    "envelope-json-trailing": lambda: envelope() + _json(b'{"a": 1} trailing'),
    "envelope-bare-json": lambda: envelope() + b'{"a": 1}',
    "envelope-version-2": lambda: envelope(version=2) + _json(b'{"a": 1}'),
    "wrong-magic": lambda: envelope(magic=0x00) + _json(b'{"a": 1}'),
    "envelope-pickle-for-json": lambda: envelope() + bytes((0xF7, 1)) + b"\x00" * 40,
    "envelope-bad-tag": lambda: envelope() + _json(b'{"__rs__": "exec", "v": "x"}'),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_bytes_are_a_counted_miss(
    make: Callable[..., Node], redis_client: redis.Redis, prefix: str, name: str
) -> None:
    node = make()
    good = node.remote.encode({"a": 1}, time.time() + 300, 0.0)
    assert good.startswith(ENVELOPE.pack(0xC5, 1, *ENVELOPE.unpack_from(good)[2:]))
    blob = CORRUPT[name]()
    redis_client.set(f"{prefix}:read", blob, px=60_000)
    redis_client.set(f"{prefix}:load", blob, px=60_000)

    assert node.cache.get("read", "dflt") == "dflt"
    assert node.log.count("corrupt", "read") == 1
    calls: list[int] = []

    def loader() -> dict[str, int]:
        calls.append(1)
        return {"fresh": 1}

    assert node.cache.get_or_load("load", loader) == {"fresh": 1}
    assert node.log.count("corrupt", "load") == 1
    assert calls == [1]
    raw = raw_get(redis_client, f"{prefix}:load")  # replaced by a readable entry
    assert raw is not None
    entry = node.remote.decode(raw)
    assert entry is not None
    assert entry.value == {"fresh": 1}
    node.cache.local.invalidate("load")
    assert node.cache.get_or_load("load", loader) == {"fresh": 1}
    assert calls == [1]


# --- 5. malicious pickle ---------------------------------------------------------------

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
PWNED: list[str] = []


def _pwn(tag: str) -> None:
    PWNED.append(tag)


class Exploit:
    """Unpickling this calls _pwn: it would run any code the writer chose."""

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _pwn, ("pwned",)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def _exploit_payload() -> bytes:
    payload = pickle.dumps(Exploit(), protocol=5)
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert PWNED == ["pwned"]
    PWNED.clear()
    return payload


MALICIOUS: dict[str, Callable[[bytes], bytes]] = {
    "no-mac": lambda p: bytes((0xF7, 1)) + p,
    "zero-mac": lambda p: bytes((0xF7, 1)) + b"\x00" * 32 + p,
    "no-header": lambda p: p,
    "other-key": lambda p: rs.PickleSerializer(hmac_key=OTHER_KEY).dumps(Exploit()),
    "mac-of-payload-only": lambda p: bytes((0xF7, 1)) + hmac.digest(KEY, p, "sha256") + p,
}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_unsigned_or_foreign_pickles_are_never_unpickled(
    make: Callable[..., Node], redis_client: redis.Redis, prefix: str, name: str
) -> None:
    node = make(serializer=rs.PickleSerializer(hmac_key=KEY))
    blob = envelope() + MALICIOUS[name](_exploit_payload())
    redis_client.set(f"{prefix}:read", blob, px=60_000)
    redis_client.set(f"{prefix}:load", blob, px=60_000)
    try:
        assert node.cache.get("read", "dflt") == "dflt"
        assert node.cache.get_or_load("load", lambda: "from-loader") == "from-loader"
        assert PWNED == []
        assert node.log.count("corrupt") == 2
    finally:
        PWNED.clear()


def test_signed_pickles_round_trip_and_rotate(make: Callable[..., Node]) -> None:
    writer = make(serializer=rs.PickleSerializer(hmac_key=KEY))
    reader = make(serializer=rs.PickleSerializer(hmac_key=KEY))
    rotated = make(serializer=rs.PickleSerializer(hmac_key=OTHER_KEY, previous_keys=[KEY]))
    stranger = make(serializer=rs.PickleSerializer(hmac_key=OTHER_KEY))
    value = {Point(1, 2): [Point(3, 4)], "frozen": frozenset({1})}
    writer.cache.set("p", value)
    assert reader.cache.get("p") == value
    assert rotated.cache.get("p") == value  # old key still accepted while rotating
    assert stranger.cache.get("p", "dflt") == "dflt"  # signed with another key
    assert stranger.log.count("corrupt", "p") == 1


# --- 6. Redis outages ------------------------------------------------------------------


def until_in_redis(
    load: Callable[[str], str], client: redis.Redis, prefix: str, name: str, clock: FakeClock
) -> str:
    """Load ``name-0``, ``name-1``, ... until one reaches Redis; return that key.

    A call on a busy host can miss the 0.05 s budget (connecting, the handshake), which
    opens the one-failure breaker; the fake clock then lets the next call probe."""
    for attempt in range(PROBES):
        key = f"{name}-{attempt}"
        assert load(key) == f"value-of-{key}"
        if client.exists(f"{prefix}:{key}"):
            return key
        clock.advance(RECOVERY)
    raise AssertionError(f"Redis not used after {PROBES} probes")


class Loader:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def for_key(self, key: str) -> Callable[[], str]:
        def load() -> str:
            self.calls.append(key)
            return f"value-of-{key}"

        return load


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_outage_falls_through_to_the_loader(
    proxy: FaultProxy,
    make: Callable[..., Node],
    redis_url: str,
    redis_client: redis.Redis,
    prefix: str,
    fault: str,
) -> None:
    clock = FakeClock()
    # invalidation=False: only the command path talks to Redis, so the proxy counts it alone.
    node = make(
        proxy.url_for(redis_url), timeout=0.05, breaker=fast_breaker(clock), invalidation=False
    )
    cache, loader = node.cache, Loader()

    def load(key: str) -> str:
        return cache.get_or_load(key, loader.for_key(key))

    warm = until_in_redis(load, redis_client, prefix, "warm", clock)

    if fault == "cut":
        proxy.cut(refuse=False)  # connections accepted and reset: attempts are counted
    else:
        proxy.blackhole()
    before = proxy.stats
    started = time.monotonic()
    assert cache.get_or_load("k0", loader.for_key("k0")) == "value-of-k0"
    assert time.monotonic() - started < 0.5  # the 0.05 s budget, not redis-py's seconds
    assert not available(node)  # the breaker opened on the first failure
    results = [cache.get_or_load(f"k{i % 20}", loader.for_key(f"k{i % 20}")) for i in range(200)]
    after = proxy.stats
    assert results == [f"value-of-k{i % 20}" for i in range(200)]
    assert sorted(c for c in loader.calls if c[0] == "k") == sorted(f"k{i}" for i in range(20))
    calls = len(loader.calls)
    assert load(warm) == f"value-of-{warm}"  # from the local tier
    assert len(loader.calls) == calls
    assert after.upstream_connects == before.upstream_connects
    if fault == "cut":
        assert 1 <= after.rejected - before.rejected <= HANDFUL
    else:
        assert after.accepted - before.accepted <= HANDFUL
    assert redis_client.exists(f"{prefix}:k0") == 0  # nothing reached Redis

    proxy.restore()
    clock.advance(RECOVERY)  # the breaker lets a probe through
    until_in_redis(load, redis_client, prefix, "after", clock)  # Redis is used again
    assert available(node)
    assert proxy.stats.upstream_connects > after.upstream_connects
    redis_client.set(f"{prefix}:remote-only", node.remote.encode("r", time.time() + 60, 0.0))
    assert cache.get("remote-only") == "r"


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_outage_falls_through_to_the_loader_async(
    proxy: FaultProxy,
    amake: Callable[..., Node],
    redis_url: str,
    redis_client: redis.Redis,
    prefix: str,
    fault: str,
) -> None:
    clock = FakeClock()
    node = amake(
        proxy.url_for(redis_url), timeout=0.05, breaker=fast_breaker(clock), invalidation=False
    )
    cache, calls = node.cache, []

    def loader(key: str) -> Callable[[], Any]:
        async def load() -> str:
            calls.append(key)
            return f"value-of-{key}"

        return load

    async def load(key: str) -> str:
        value: str = await cache.aget_or_load(key, loader(key))
        return value

    for attempt in range(PROBES):
        key = f"warm-{attempt}"
        assert await load(key) == f"value-of-{key}"
        if redis_client.exists(f"{prefix}:{key}"):
            break
        clock.advance(RECOVERY)
    if fault == "cut":
        proxy.cut(refuse=False)
    else:
        proxy.blackhole()
    before = proxy.stats
    results = [await load(f"k{i % 20}") for i in range(201)]
    after = proxy.stats
    assert results == [f"value-of-k{i % 20}" for i in range(201)]
    assert sorted(c for c in calls if c[0] == "k") == sorted(f"k{i}" for i in range(20))
    assert after.upstream_connects == before.upstream_connects
    assert max(after.rejected - before.rejected, after.accepted - before.accepted) <= HANDFUL

    proxy.restore()
    for attempt in range(PROBES):
        clock.advance(RECOVERY)
        key = f"after-{attempt}"
        assert await load(key) == f"value-of-{key}"
        if redis_client.exists(f"{prefix}:{key}"):
            break
    else:
        raise AssertionError(f"Redis not used again after {PROBES} probes")
    assert redis_client.exists(f"{prefix}:k0") == 0


# --- 7. cross-process single-flight ----------------------------------------------------

SINGLE_FLIGHT_CHILD = r"""
import json, sys, time

import redis

import resilience as rs

url, prefix, name = sys.argv[1:4]
client = redis.Redis.from_url(url, client_name=name)
counter = redis.Redis.from_url(url, client_name=name)
cache = rs.TwoTierCache(
    rs.LocalCache(100, 30.0),
    rs.RedisCache(client, prefix=prefix, timeout=2.0),
    lock=True,
)
ran = 0


def loader():
    global ran
    ran += 1
    time.sleep(0.3)
    counter.incr(prefix + ":loads")
    return {"report": 1234}


# Connect, subscribe and load both scripts before the measured part.
cache.get_or_load("warm:" + name, lambda: 0)
counter.ping()
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
value = cache.get_or_load("cold", loader)
took = time.monotonic() - start
print(json.dumps({"value": value, "ran": ran, "took": took}), flush=True)
sys.stdin.readline()
cache.close()
client.close()
counter.close()
"""


def _monitor(server: RedisServer, ready: threading.Event, sentinel: str, out: list[Any]) -> None:
    """Collect every command the server runs until it runs ``ECHO sentinel``."""
    with redis.Redis.from_url(server.url) as client, client.monitor() as monitor:
        ready.set()
        while True:
            command = monitor.next_command()
            if command["command"] == f"ECHO {sentinel}":
                return
            out.append(command)


@pytest.mark.slow
def _calls(stats: dict[str, Any]) -> dict[str, int]:
    skip = {"cmdstat_config|resetstat", "cmdstat_info", "cmdstat_echo"}
    return {
        k[8:]: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_") and k not in skip
    }


def test_lock_loads_once_across_processes_and_waiters_are_woken(throwaway: RedisServer) -> None:
    prefix = new_redis_prefix().rstrip(":")
    names = [f"proc-{i}" for i in range(4)]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SINGLE_FLIGHT_CHILD, throwaway.url, prefix, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in names
    ]
    commands: list[Any] = []
    sentinel = uuid.uuid4().hex
    admin = throwaway.client()
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        assert subscribers(admin, f"{prefix}:loaded") == 4
        addr_of = {c["addr"]: c["name"] for c in admin.client_list() if c.get("name")}
        ready = threading.Event()
        watcher = threading.Thread(target=_monitor, args=(throwaway, ready, sentinel, commands))
        watcher.start()
        assert ready.wait(WAIT)
        admin.config_resetstat()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
        measured = _calls(admin.info("commandstats"))  # the four get_or_load calls, all done
        admin.echo(sentinel)
        watcher.join(WAIT)
        loads = admin.get(f"{prefix}:loads")
        admin.config_resetstat()
        for p in procs:
            p.communicate("exit\n", timeout=20)
            assert p.returncode == 0
        closing = _calls(admin.info("commandstats"))  # what closing the four caches sent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
        admin.close()

    assert loads == "1"  # the loader ran once across the four processes
    assert [r["value"] for r in results] == [{"report": 1234}] * 4
    assert sorted(r["ran"] for r in results) == [0, 0, 0, 1]
    leader = names[[r["ran"] for r in results].index(1)]
    per_process: dict[str, list[str]] = {name: [] for name in names}
    for c in commands:
        name = addr_of.get(f"{c['client_address']}:{c['client_port']}")
        if name in per_process:
            per_process[name].append(c["command"].split(" ", 1)[0].upper())
    # Shown with -s / -rP: the numbers behind the bounds below.
    print(f"\ncommands per process, MONITOR (leader {leader}):")
    for name, cmds in per_process.items():
        took = results[names.index(name)]["took"]
        print(f"  {name}: {len(cmds)} {cmds}, took {took * 1000:.0f} ms")
    print(f"INFO commandstats, the get_or_load calls (Lua-internal included): {measured}")
    print(f"INFO commandstats, closing the four caches: {closing}")
    for name, cmds in per_process.items():
        took = results[names.index(name)]["took"]
        if name == leader:
            continue
        assert len(cmds) <= 8, f"{name} sent {cmds}"
        assert "PING" not in cmds
        assert "SUBSCRIBE" not in cmds
        # Woken by the leader's notice (~0.3 s), not by the 10 s lease running out.
        assert took < 2.0
    # No polling and no reconnecting anywhere while waiting: four SET NX, one loader INCR.
    assert not {"ping", "subscribe", "hello", "client|setname"} & set(measured)
    assert measured.get("incrby") == 1
    assert sum(len(c) for n, c in per_process.items() if n != leader) <= 3 * 8


def test_waiter_loads_after_a_crashed_holders_lease(
    make: Callable[..., Node], redis_client: redis.Redis, prefix: str
) -> None:
    node = make(lock=0.3)
    # A holder that took the lock and died: it never releases it or announces a value.
    assert redis_client.set(node.remote.lock_key("k"), "dead-holder", nx=True, px=300)
    calls: list[int] = []

    def load() -> str:
        calls.append(1)
        return "loaded"

    started = time.monotonic()
    assert node.cache.get_or_load("k", load) == "loaded"
    took = time.monotonic() - started
    assert calls == [1]
    assert 0.25 <= took < 1.5  # waited for the lease, not forever (nor not at all)
    raw = raw_get(redis_client, node.remote.key("k"))
    assert raw is not None
    entry = node.remote.decode(raw)
    assert entry is not None
    assert entry.value == "loaded"


@pytest.mark.anyio
async def test_waiter_loads_after_a_crashed_holders_lease_async(
    amake: Callable[..., Node], redis_client: redis.Redis
) -> None:
    node = amake(lock=0.3)
    assert redis_client.set(node.remote.lock_key("k"), "dead-holder", nx=True, px=300)
    calls: list[int] = []

    async def load() -> str:
        calls.append(1)
        return "loaded"

    started = time.monotonic()
    assert await node.cache.aget_or_load("k", load) == "loaded"
    assert 0.25 <= time.monotonic() - started < 1.5
    assert calls == [1]


# --- 9. SCRIPT FLUSH between writes ----------------------------------------------------


def test_script_flush_between_writes(make: Callable[..., Node], throwaway: RedisServer) -> None:
    a = make(throwaway.url, lock=True)
    b = make(throwaway.url)
    raw = redis.Redis.from_url(throwaway.url)
    try:
        a.cache.set("k", 1)
        b.log.wait_for("invalidated", "k")
        assert b.cache.get("k") == 1
        raw.script_flush()
        a.cache.set("k", 2)  # NOSCRIPT -> SCRIPT LOAD, EVALSHA: still a SET and a PUBLISH
        b.log.wait_for("invalidated", "k", count=2)
        assert b.cache.get("k") == 2
        raw.script_flush()
        a.cache.delete("k")
        b.log.wait_for("invalidated", "k", count=3)
        assert raw.exists(a.remote.key("k")) == 0
        assert b.cache.get("k") is None
        raw.script_flush()
        assert a.cache.get_or_load("locked", lambda: "v") == "v"  # the unlock script too
        assert raw.exists(a.remote.lock_key("locked")) == 0
        assert a.remote.guard.breaker.state is rs.CircuitState.CLOSED
    finally:
        raw.close()


@pytest.mark.anyio
async def test_script_flush_between_writes_async(
    amake: Callable[..., Node], throwaway: RedisServer
) -> None:
    a = amake(throwaway.url, lock=True)
    raw = redis.Redis.from_url(throwaway.url)
    try:
        raw.script_flush()
        await a.cache.aset("k", 1)
        raw.script_flush()
        await a.cache.adelete("k")
        assert raw.exists(a.remote.key("k")) == 0
        raw.script_flush()

        async def load() -> str:
            return "v"

        assert await a.cache.aget_or_load("locked", load) == "v"
        assert raw.exists(a.remote.lock_key("locked")) == 0
        assert a.remote.guard.breaker.state is rs.CircuitState.CLOSED
    finally:
        raw.close()


# --- 10. many threads and tasks on one cold key ---------------------------------------


class SlowLoader:
    """Counts its calls; in threads, it waits for every caller to arrive, then 0.2 s more
    (ample for them to join the load in progress), so no caller comes after it ended."""

    def __init__(self, error: str | None = None, callers: int = 0) -> None:
        self.calls = 0
        self._cond = threading.Condition()
        self._callers = callers
        self._arrived = 0
        self.error = error

    def arrived(self) -> None:
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()

    def __call__(self) -> dict[str, int]:
        with self._cond:
            self.calls += 1
            assert self._cond.wait_for(lambda: self._arrived >= self._callers, timeout=WAIT)
        time.sleep(0.2)
        if self.error is not None:
            raise ValueError(self.error)
        return {"answer": 42}

    async def aload(self) -> dict[str, int]:
        with self._cond:
            self.calls += 1
        await anyio.sleep(0.2)
        if self.error is not None:
            raise ValueError(self.error)
        return {"answer": 42}


def _run_threads(n: int, fn: Callable[[], Any], loader: SlowLoader) -> list[Any]:
    gate = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        gate.wait()
        loader.arrived()
        try:
            out[i] = fn()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    return out


def test_64_threads_one_load(
    make: Callable[..., Node], redis_client: redis.Redis, prefix: str
) -> None:
    node = make()
    loader = SlowLoader(callers=64)
    results = _run_threads(64, lambda: node.cache.get_or_load("hot", loader), loader)
    assert loader.calls == 1
    assert results == [{"answer": 42}] * 64
    assert redis_client.exists(f"{prefix}:hot") == 1

    failing = SlowLoader(error="db says no (42)", callers=64)
    errors = _run_threads(64, lambda: node.cache.get_or_load("bad", failing), failing)
    assert failing.calls == 1
    assert all(type(e) is ValueError and str(e) == "db says no (42)" for e in errors), errors
    assert len({id(e) for e in errors}) == 64  # each waiter its own exception object
    assert redis_client.exists(f"{prefix}:bad") == 0  # not cached
    with pytest.raises(ValueError):
        node.cache.get_or_load("bad", failing)
    assert failing.calls == 2


@pytest.mark.anyio
async def test_500_tasks_one_load(
    amake: Callable[..., Node], redis_client: redis.Redis, prefix: str
) -> None:
    node = amake()
    loader = SlowLoader()
    results: list[Any] = []

    async def call(key: str, load: Callable[[], Any]) -> None:
        try:
            results.append(await node.cache.aget_or_load(key, load))
        except Exception as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(call, "hot", loader.aload)
    assert loader.calls == 1
    assert results == [{"answer": 42}] * 500
    assert redis_client.exists(f"{prefix}:hot") == 1

    failing = SlowLoader(error="db says no")
    results.clear()
    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(call, "bad", failing.aload)
    assert failing.calls == 1
    assert len(results) == 500
    assert all(type(e) is ValueError and str(e) == "db says no" for e in results)
    assert redis_client.exists(f"{prefix}:bad") == 0
    with pytest.raises(ValueError):
        await node.cache.aget_or_load("bad", failing.aload)
    assert failing.calls == 2


# --- 11. sync/async parity on the Redis tier -------------------------------------------


@pytest.mark.anyio
async def test_sync_calls_on_an_async_client_cache_are_refused(
    amake: Callable[..., Node],
) -> None:
    node = amake()
    await node.cache.aset("k", "v")  # in the local tier: even a hit must be refused
    cache = node.cache
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("aget", lambda: cache.get("k")),
        ("aget", lambda: cache.get("cold")),
        ("aset", lambda: cache.set("k", 1)),
        ("adelete", lambda: cache.delete("k")),
        ("aget_or_load", lambda: cache.get_or_load("cold", lambda: 1)),
        ("aclose", cache.close),
    ]
    for twin, call in calls:
        with pytest.raises(TypeError, match=rf"redis\.asyncio.*call {twin}\(\)"):
            call()
    with pytest.raises(TypeError, match="cached: a sync function"):
        cache.cached(ttl=1)(lambda: 1)
    assert node.remote.guard.breaker.state is rs.CircuitState.CLOSED
    assert await cache.aget("k") == "v"  # nothing changed


@pytest.mark.anyio
async def test_async_calls_on_a_sync_client_cache_are_refused(
    make: Callable[..., Node],
) -> None:
    node = make()
    node.cache.set("k", "v")
    cache = node.cache

    async def one() -> int:
        return 1

    with pytest.raises(TypeError, match=r"sync redis.*call get\(\)"):
        await cache.aget("k")
    with pytest.raises(TypeError, match=r"call set\(\)"):
        await cache.aset("k", 1)
    with pytest.raises(TypeError, match=r"call delete\(\)"):
        await cache.adelete("k")
    with pytest.raises(TypeError, match=r"call get_or_load\(\)"):
        await cache.aget_or_load("cold", one)
    with pytest.raises(TypeError, match="cached: an async function"):
        cache.cached(ttl=1)(one)
    assert node.remote.guard.breaker.state is rs.CircuitState.CLOSED
    assert cache.get("k") == "v"


# --- 12. Redis Cluster: sharded invalidation -------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3.start(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def wait_listening(node: Node) -> None:
    wait_until(lambda: node.remote.listening, "every shard subscription confirmed")


@pytest.fixture
def cmake(cluster: RedisCluster3) -> Iterator[Callable[..., Node]]:
    """Sync two-tier caches on RedisCluster clients, each seeded with another node."""
    made: list[Node] = []
    prefix = new_redis_prefix().rstrip(":")

    def factory(**options: Any) -> Node:
        port = cluster.ports[len(made) % len(cluster.ports)]
        client = redis.RedisCluster(host="127.0.0.1", port=port)
        log = EventLog()
        remote = rs.RedisCache(client, prefix=prefix, timeout=SAFE)
        cache = rs.TwoTierCache(
            rs.LocalCache(max_entries=1000, ttl=30.0), remote, listeners=[log], **options
        )
        node = Node(cache, log, client)
        made.append(node)
        wait_listening(node)
        return node

    yield factory
    for node in made:
        node.cache.close()
        node.client.close()


@pytest.fixture
async def acmake(
    require_asyncio: None, cluster: RedisCluster3
) -> AsyncIterator[Callable[..., Node]]:
    """Like ``cmake``, with redis.asyncio.RedisCluster clients."""
    made: list[Node] = []
    prefix = new_redis_prefix().rstrip(":")

    def factory(**options: Any) -> Node:
        port = cluster.ports[len(made) % len(cluster.ports)]
        client = redis.asyncio.RedisCluster(host="127.0.0.1", port=port)
        log = EventLog()
        remote = rs.RedisCache(client, prefix=prefix, timeout=SAFE)
        cache = rs.TwoTierCache(
            rs.LocalCache(max_entries=1000, ttl=30.0), remote, listeners=[log], **options
        )
        node = Node(cache, log, client)
        made.append(node)
        wait_listening(node)
        return node

    yield factory
    for node in made:
        await node.cache.aclose()
        await node.client.aclose()


def spread_keys(cluster: RedisCluster3, remote: rs.RedisCache, count: int) -> list[str]:
    """``count`` keys whose Redis keys live on every node of the cluster."""
    keys = [f"user:{i}" for i in range(count)]
    owners = {cluster.node_of(key_slot(remote.key(k).encode())).port for k in keys}
    assert owners == set(cluster.ports)
    return keys


def shard_subscribers(cluster: RedisCluster3, remote: rs.RedisCache, key: str) -> list[int]:
    """Per node: subscribers of the shard channel that carries ``key``'s notices."""
    channel = shard_channel(remote.notice_channel, remote.key(key))
    counts = []
    for node in cluster.nodes:
        with node.client() as c:
            ((_, count),) = c.execute_command("PUBSUB SHARDNUMSUB", channel)
            counts.append(int(count))
    return counts


@pytest.mark.slow
def test_cluster_writes_and_deletes_evict_other_instances_local_tier(
    cluster: RedisCluster3, cmake: Callable[..., Node]
) -> None:
    a, b = cmake(), cmake()
    keys = spread_keys(cluster, a.remote, 12)
    for key in keys:
        a.cache.set(key, "old")
        b.log.wait_for("invalidated", key)
        assert b.cache.get(key) == "old"
        assert b.cache.local.get(key) == "old"  # B serves it locally now
    # Each notice went to the shard of the key's slot, where both caches listen.
    owner = cluster.nodes.index(cluster.node_of(key_slot(a.remote.key(keys[0]).encode())))
    counts = shard_subscribers(cluster, a.remote, keys[0])
    assert counts[owner] == 2
    assert sum(counts) == 2

    for key in keys:
        a.cache.set(key, "new")  # a write on A ...
    for key in keys:
        b.log.wait_for("invalidated", key, count=2)
        assert b.cache.get(key) == "new"  # ... evicts B's local copy
    for key in keys:
        a.cache.delete(key)  # and so does a delete
    for key in keys:
        b.log.wait_for("invalidated", key, count=3)
        assert b.cache.get(key, "gone") == "gone"

    b.cache.set("sentinel", 1)  # and the other way round; A ignored its own notices
    a.log.wait_for("invalidated", "sentinel")
    assert a.log.keys("invalidated") == ["sentinel"]
    assert a.log.count("flushed") == b.log.count("flushed") == 1  # on subscribing only
    assert a.remote.guard.errors == b.remote.guard.errors == 0


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_writes_and_deletes_evict_other_instances_local_tier_async(
    cluster: RedisCluster3, acmake: Callable[..., Node]
) -> None:
    a, b = acmake(), acmake()
    keys = spread_keys(cluster, a.remote, 12)
    for key in keys:
        await a.cache.aset(key, "old")
        await b.log.await_for("invalidated", key)
        assert await b.cache.aget(key) == "old"
        assert b.cache.local.get(key) == "old"
    for key in keys:
        await a.cache.aset(key, "new")
    for key in keys:
        await b.log.await_for("invalidated", key, count=2)
        assert await b.cache.aget(key) == "new"
    for key in keys:
        await a.cache.adelete(key)
    for key in keys:
        await b.log.await_for("invalidated", key, count=3)
        assert await b.cache.aget(key, "gone") == "gone"
    assert a.log.count("invalidated") == 0
    assert a.remote.guard.errors == b.remote.guard.errors == 0


@pytest.mark.slow
def test_cluster_load_notice_wakes_a_waiter(cmake: Callable[..., Node]) -> None:
    """The unlock script publishes on the lock key's shard channel: a waiter in another
    process wakes on it, well before the lease ends, and never loads."""
    a, b = cmake(), cmake(lock=10.0)
    assert a.remote.lock("k", "holder", 10_000)  # A is loading "k"
    calls: list[int] = []
    got: list[Any] = []

    def load() -> str:
        calls.append(1)
        return "from-b"

    waiter = threading.Thread(target=lambda: got.append(b.cache.get_or_load("k", load)))
    started = time.monotonic()
    waiter.start()
    b.log.wait_for("miss", "k")
    time.sleep(0.1)  # B finds the lock taken and waits
    a.cache.set("k", "from-a")
    a.remote.unlock("k", "holder")
    waiter.join(WAIT)
    assert got == ["from-a"]
    assert calls == []
    assert time.monotonic() - started < 5.0  # woken, not at the lease's end
    assert a.remote.guard.errors == b.remote.guard.errors == 0


@pytest.mark.slow
def test_cluster_slot_move_flushes_and_resubscribes(
    cluster: RedisCluster3, cmake: Callable[..., Node]
) -> None:
    """When a slot moves, its old node unsubscribes the slot's shard channel; the cache
    flushes (notices may be lost), subscribes on the new owner, and flushes again."""
    a, b = cmake(), cmake()
    key = "moving"
    slot = key_slot(a.remote.key(key).encode())
    a.cache.set(key, "v1")
    b.log.wait_for("invalidated", key)
    assert b.cache.get(key) == "v1"
    flushed = b.log.count("flushed")

    source = cluster.node_of(slot)
    target = next(n for n in cluster.nodes if n is not source)
    cluster.move_slot(slot, target)
    b.log.wait_for("flushed", count=flushed + 2)  # lost, then subscribed again
    wait_listening(b)
    assert shard_subscribers(cluster, a.remote, key)[cluster.nodes.index(target)] == 2

    a.cache.set(key, "v2")  # A's client follows the MOVED reply to the new owner
    b.log.wait_for("invalidated", key, count=2)
    assert b.cache.get(key) == "v2"
    cluster.move_slot(slot, source)
