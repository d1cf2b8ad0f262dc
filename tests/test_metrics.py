"""Metrics are scraped as text after real operations and parsed with prometheus-client's own
parser; every test has a fresh registry."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.faultproxy import FaultProxy

import resilience as rs
from resilience.integrations.outbox import InMemoryBroker, OutboxPublisher, SqliteOutboxStore
from resilience.metrics import Metrics
from resilience.testing import FakeClock

OUTAGE = {"class": "outage"}
POISON = {"class": "poison"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, through the text format and back."""
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples[("resilience_" + name, tuple(sorted(labels.items())))]


def test_importing_registers_nothing() -> None:
    code = (
        "import prometheus_client, resilience, resilience.metrics;"
        "from prometheus_client import REGISTRY, generate_latest;"
        "print(b'resilience_' in generate_latest(REGISTRY))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_name_follows_prometheus_conventions(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.watch(rs.CircuitBreaker("b"), rs.TokenBucket(rate=1.0, capacity=1))
    text = generate_latest(registry).decode()
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith("resilience_"), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            if family.type == "histogram":
                assert family.name.endswith("_seconds"), family.name


def test_breaker_state_is_there_from_the_start_and_follows_the_breaker(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    breaker = rs.CircuitBreaker("payments", failure_threshold=2, recovery_timeout=5.0, clock=clock)
    Metrics(registry, histograms=True).watch(breaker)  # latency histograms are opt-in
    samples = scrape(registry)
    assert value(samples, "breaker_state", breaker="payments", state="closed") == 1
    assert value(samples, "breaker_state", breaker="payments", state="open") == 0

    @breaker
    def call(fail: bool) -> str:
        clock.advance(0.02)
        if fail:
            raise ConnectionError("down")
        return "ok"

    call(False)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            call(True)
    for _ in range(3):
        with pytest.raises(rs.CircuitOpenError):
            call(False)
    samples = scrape(registry)
    assert value(samples, "breaker_state", breaker="payments", state="open") == 1
    assert value(samples, "breaker_state", breaker="payments", state="closed") == 0
    assert value(samples, "breaker_calls_total", breaker="payments", outcome="success") == 1
    assert value(samples, "breaker_calls_total", breaker="payments", outcome="failure") == 2
    assert value(samples, "breaker_rejected_total", breaker="payments") == 3
    transitions = {"breaker": "payments", "from_state": "closed", "to_state": "open"}
    assert value(samples, "breaker_transitions_total", **transitions) == 1
    assert value(samples, "breaker_call_duration_seconds_count", breaker="payments") == 3
    assert (
        value(samples, "breaker_call_duration_seconds_bucket", breaker="payments", le="0.025") == 3
    )


def test_limiter_decisions_are_counted_by_limiter_never_by_key(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    limiter = rs.TokenBucket(rate=1.0, capacity=3, name="api", clock=clock)
    Metrics(registry).watch(limiter)
    for user in range(50):
        limiter.try_acquire(f"user:{user % 2}")
    samples = scrape(registry)
    assert value(samples, "limiter_decisions_total", limiter="api", decision="allowed") == 6
    assert value(samples, "limiter_decisions_total", limiter="api", decision="denied") == 44
    assert not any("user:" in str(labels) for _, labels in samples)


@pytest.mark.anyio
async def test_async_and_batched_decisions_count_too(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    shared = rs.MemoryBackend()
    group = rs.LimitGroup(
        rs.TokenBucket(rate=1.0, capacity=2, name="second", backend=shared, clock=clock),
        rs.TokenBucket(rate=1.0, capacity=100, name="hour", backend=shared, clock=clock),
    )
    Metrics(registry).watch(group)
    await group.atry_acquire("k")
    group.try_acquire_many(["k", "k"])
    samples = scrape(registry)
    labels = {"limiter": "second+hour"}
    assert value(samples, "limiter_decisions_total", decision="allowed", **labels) == 2
    assert value(samples, "limiter_decisions_total", decision="denied", **labels) == 1


def test_a_watched_limiter_keeps_deciding_the_same(clock: FakeClock) -> None:
    plain = rs.TokenBucket(rate=2.0, capacity=5, clock=clock)
    watched = rs.TokenBucket(rate=2.0, capacity=5, clock=clock)
    Metrics(CollectorRegistry()).watch(watched)
    for step in range(40):
        clock.advance(0.13 * (step % 3))
        assert plain.try_acquire("k") == watched.try_acquire("k")


@pytest.mark.redis
def test_a_redis_backend_outage_shows_in_the_metrics(
    registry: CollectorRegistry, proxy: FaultProxy, redis_prefix: str
) -> None:
    client = redis.Redis(host=proxy.host, port=proxy.port)
    backend = rs.RedisBackend(client, prefix=redis_prefix, timeout=0.2, on_error="fail_open")
    limiter = rs.TokenBucket(rate=10.0, capacity=10, backend=backend, name="edge")
    Metrics(registry).watch(limiter)
    name = f"redis:{redis_prefix}"
    assert limiter.try_acquire("k").allowed
    assert value(scrape(registry), "backend_available", backend=name,
                 on_error="fail_open") == 1  # fmt: skip
    proxy.cut()
    for _ in range(10):
        assert limiter.try_acquire("k").allowed  # fail open
    samples = scrape(registry)
    assert value(samples, "backend_available", backend=name, on_error="fail_open") == 0
    assert value(samples, "backend_outages_total", backend=name) == 1
    assert value(samples, "backend_errors_total", backend=name) == 3
    assert value(samples, "backend_fallbacks_total", backend=name) == 10
    breaker = f"backend:{name}"
    assert value(samples, "breaker_state", breaker=breaker, state="open") == 1
    backend.close()
    client.close()


def test_cache_hits_misses_and_loads_by_tier(registry: CollectorRegistry) -> None:
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=100, ttl=30.0), ttl=60.0, name="users")
    Metrics(registry, histograms=True).watch(cache)
    loads = 0

    def load() -> str:
        nonlocal loads
        loads += 1
        return "v"

    for _ in range(5):
        cache.get_or_load("a", load)
    cache.get_or_load("b", load)

    def broken() -> str:
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        cache.get_or_load("c", broken)
    samples = scrape(registry)
    assert value(samples, "cache_hits_total", cache="users", tier="local") == 4
    assert value(samples, "cache_misses_total", cache="users", tier="local") == 3
    assert value(samples, "cache_loads_total", cache="users") == 3
    assert value(samples, "cache_load_errors_total", cache="users") == 1
    assert value(samples, "cache_load_duration_seconds_count", cache="users") == 2
    assert loads == 2


def test_outbox_figures_through_an_outage(
    registry: CollectorRegistry,
    clock: FakeClock,
    sqlite_outbox: tuple[SqliteOutboxStore, sqlite3.Connection],
) -> None:
    store, conn = sqlite_outbox
    broker = InMemoryBroker()
    breaker = rs.CircuitBreaker("broker", failure_threshold=2, recovery_timeout=5.0, clock=clock)
    pub = OutboxPublisher(store, broker=broker, breaker=breaker, name="orders", clock=clock,
                          batch_size=10)  # fmt: skip
    Metrics(registry).watch(pub)
    with conn:
        for i in range(6):
            store.enqueue(conn, topic="t", key=f"k{i % 2}", payload=i)
    with broker.outage():
        for _ in range(4):
            pub.run_once()
        clock.advance(3.0)
        pub.stats()
        samples = scrape(registry)
    assert value(samples, "outbox_pending", outbox="orders") == 6
    assert value(samples, "outbox_oldest_pending_age_seconds", outbox="orders") == 3.0
    assert value(samples, "outbox_blocked_keys", outbox="orders") == 2
    assert value(samples, "outbox_failures_total", outbox="orders", **OUTAGE) == 12
    assert value(samples, "outbox_breaker_open_polls_total", outbox="orders") == 2
    assert value(samples, "breaker_state", breaker="broker", state="open") == 1
    clock.advance(5.0)
    for _ in range(4):
        pub.run_once()
    pub.stats()
    samples = scrape(registry)
    assert value(samples, "outbox_published_total", outbox="orders") == 6
    assert value(samples, "outbox_pending", outbox="orders") == 0
    assert value(samples, "breaker_state", breaker="broker", state="closed") == 1
    broker.reject(lambda e: True)
    with conn:
        store.enqueue(conn, topic="t", payload="bad")
    pub.max_attempts = 1
    pub.run_once()
    pub.stats()
    samples = scrape(registry)
    assert value(samples, "outbox_died_total", outbox="orders") == 1
    assert value(samples, "outbox_dead", outbox="orders") == 1
    assert value(samples, "outbox_failures_total", outbox="orders", **POISON) == 1


def test_watch_refuses_what_it_cannot_watch(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match="watch"):
        Metrics(registry).watch(object())
    with pytest.raises(TypeError, match="registry"):
        Metrics(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace"):
        Metrics(CollectorRegistry(), namespace="no spaces")


def test_watching_twice_is_harmless(registry: CollectorRegistry) -> None:
    breaker = rs.CircuitBreaker("b")
    metrics = Metrics(registry)
    metrics.watch(breaker, breaker)
    metrics.watch(breaker)
    breaker.call(lambda: None)
    assert value(scrape(registry), "breaker_calls_total", breaker="b", outcome="success") == 1


def test_the_grafana_dashboard_queries_metrics_that_exist(
    registry: CollectorRegistry, tmp_path: Path, clock: FakeClock
) -> None:
    import json
    import re

    store = SqliteOutboxStore(tmp_path / "a.db", clock=clock)
    store.create_schema()
    pub = OutboxPublisher(store, broker=InMemoryBroker(), clock=clock)
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=10, ttl=1.0), ttl=1.0)
    # Built, never called: watching it needs no server.
    backend = rs.RedisBackend(redis.Redis(port=1), prefix="unused")
    Metrics(registry).watch(pub, cache, rs.TokenBucket(rate=1.0, capacity=1, backend=backend))
    pub.stats()
    exposed = {name for name, _ in scrape(registry)}
    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs/grafana-dashboard.json").read_text()
    )
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"resilience_[a-z_]+", target["expr"])
    }
    assert queried
    assert queried - exposed == set()
    store.close()
    backend.close()


def test_watching_keeps_the_lock_free_paths_and_times_nothing(registry: CollectorRegistry) -> None:
    breaker = rs.CircuitBreaker("fast")
    Metrics(registry).watch(breaker)
    policy = breaker._policy
    assert policy.quiet_free is not None  # the decorator's lock-free path stays open
    assert (policy.observed, policy.timed) == (False, False)  # no listener, no clock reads
    breaker.call(lambda: None)
    assert value(scrape(registry), "breaker_calls_total", breaker="fast", outcome="success") == 1
    assert value(scrape(registry), "breaker_call_duration_seconds_count", breaker="fast") == 0


def test_histograms_opted_in_time_every_call(registry: CollectorRegistry, clock: FakeClock) -> None:
    breaker = rs.CircuitBreaker("timed", clock=clock)
    Metrics(registry, histograms=True).watch(breaker)

    def slow() -> None:
        clock.advance(0.3)

    breaker.call(slow)
    samples = scrape(registry)
    assert value(samples, "breaker_call_duration_seconds_count", breaker="timed") == 1
    assert value(samples, "breaker_call_duration_seconds_bucket", breaker="timed", le="0.25") == 0


def test_anything_with_telemetry_can_be_watched(registry: CollectorRegistry) -> None:
    # Metrics knows the protocol, not the types: a user's own primitive reports the same way.
    from resilience.events import Telemetry

    class Mine:
        def telemetry(self) -> Telemetry:
            return Telemetry("limiter", "mine", lambda: {"allowed": 7, "denied": 2})

    Metrics(registry).watch(Mine())
    samples = scrape(registry)
    assert value(samples, "limiter_decisions_total", limiter="mine", decision="allowed") == 7
    assert value(samples, "limiter_decisions_total", limiter="mine", decision="denied") == 2


def test_counters_never_go_back_when_a_breaker_is_reset(registry: CollectorRegistry) -> None:
    breaker = rs.CircuitBreaker("r", failure_threshold=1)
    Metrics(registry).watch(breaker)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    for _ in range(2):
        with pytest.raises(rs.CircuitOpenError):
            breaker.call(lambda: None)
    breaker.reset()
    samples = scrape(registry)
    assert value(samples, "breaker_rejected_total", breaker="r") == 2
    assert value(samples, "breaker_calls_total", breaker="r", outcome="failure") == 1


def test_links_made_after_watch_are_exported_once(registry: CollectorRegistry) -> None:
    # Like an httpx transport's per-host breakers: made on first use, after watch().
    from resilience.events import Telemetry

    class Grows:
        def __init__(self) -> None:
            self.breakers: list[rs.CircuitBreaker] = []

        def telemetry(self) -> Telemetry:
            return Telemetry("pipeline", "grows", dict, links=tuple(self.breakers))

    grows = Grows()
    metrics = Metrics(registry)
    metrics.watch(grows)
    assert not any(name.startswith("resilience_breaker") for name, _ in scrape(registry))
    grows.breakers.append(rs.CircuitBreaker("host-a"))
    with pytest.raises(ZeroDivisionError):
        grows.breakers[0].call(lambda: 1 / 0)
    samples = scrape(registry)  # found now; its failure was counted from the start
    assert value(samples, "breaker_calls_total", breaker="host-a", outcome="failure") == 1
    grows.breakers[0].call(lambda: None)  # successes count from the scrape that found it
    samples = scrape(registry)
    assert value(samples, "breaker_calls_total", breaker="host-a", outcome="success") == 1
    grows.breakers.append(rs.CircuitBreaker("host-b"))
    for _ in range(3):
        samples = scrape(registry)
    assert value(samples, "breaker_state", breaker="host-b", state="closed") == 1
    assert len(metrics._watched) == 3  # no growth per scrape: each object once
    states = [key for key in samples if key[0] == "resilience_breaker_state"]
    assert len(states) == 2 * 3  # two breakers, three states each
