"""OpenTelemetry: real primitives read through the SDK's in-memory metric reader and span
exporter; every test has its own meter and tracer provider."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import resilience as rs
from resilience.integrations.otel import INSTRUMENTS, SPAN_EVENTS, OTelMetrics
from resilience.integrations.outbox import InMemoryBroker, OutboxPublisher, SqliteOutboxStore
from resilience.metrics import Metrics
from resilience.testing import FakeClock

Points = dict[tuple[str, frozenset[tuple[str, Any]]], Any]


class Reader:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self) -> Points:
        """Every data point as {(instrument, attributes): value (or the histogram point)}."""
        found: Points = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = (metric.name, frozenset((point.attributes or {}).items()))
                        found[key] = getattr(point, "value", point)
        return found


def at(points: Points, instrument: str, **attributes: Any) -> Any:
    shown = {f"resilience.{k}": v for k, v in attributes.items()}
    return points[(instrument, frozenset(shown.items()))]


@pytest.fixture
def otel() -> Iterator[Reader]:
    reader = Reader()
    yield reader
    reader.provider.shutdown()


class Spans:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def events(self, span_name: str) -> list[tuple[str, dict[str, Any]]]:
        [span] = [s for s in self.exporter.get_finished_spans() if s.name == span_name]
        return [(e.name, dict(e.attributes or {})) for e in span.events]


@pytest.fixture
def spans() -> Iterator[Spans]:
    made = Spans()
    yield made
    made.provider.shutdown()


def test_importing_registers_nothing_and_a_missing_api_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import resilience, resilience.metrics\n"
        "try:\n"
        "    import resilience.integrations.otel\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'resilience[otel]'" in out.stdout
    code = (
        "from opentelemetry import metrics\n"
        "import resilience.integrations.otel\n"
        "print(type(metrics.get_meter_provider()).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("ProxyMeterProvider")  # no provider set at import


def test_names_follow_the_otel_conventions() -> None:
    names = [spec.name for spec in INSTRUMENTS]
    assert len(names) == len(set(names))
    for spec in INSTRUMENTS:
        assert spec.name.startswith("resilience."), spec.name
        assert spec.name == spec.name.lower()
        assert " " not in spec.name
        assert not spec.name.endswith(("_total", ".total", "_seconds")), spec.name
        assert spec.instrument in ("counter", "updown", "gauge")
    documented = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for name in [*names, *SPAN_EVENTS]:
        assert f"`{name}`" in documented, name


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(TypeError, match="meter_provider"):
        OTelMetrics(object())
    with pytest.raises(TypeError, match="histograms"):
        OTelMetrics(histograms=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="span_events"):
        OTelMetrics(span_events="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="watch"):
        OTelMetrics().watch(object())


def test_breaker_instruments(otel: Reader, clock: FakeClock) -> None:
    breaker = rs.CircuitBreaker("payments", failure_threshold=2, recovery_timeout=5.0, clock=clock)
    OTelMetrics(otel.provider).watch(breaker)
    points = otel.points()
    assert at(points, "resilience.breaker.state", name="payments", state="closed") == 1
    assert at(points, "resilience.breaker.state", name="payments", state="open") == 0
    breaker.call(lambda: None)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
    for _ in range(3):
        with pytest.raises(rs.CircuitOpenError):
            breaker.call(lambda: None)
    points = otel.points()
    assert at(points, "resilience.breaker.state", name="payments", state="open") == 1
    assert at(points, "resilience.breaker.state", name="payments", state="closed") == 0
    assert at(points, "resilience.breaker.calls", name="payments", outcome="success") == 1
    assert at(points, "resilience.breaker.calls", name="payments", outcome="failure") == 2
    assert at(points, "resilience.breaker.rejections", name="payments") == 3
    moved = {"name": "payments", "from_state": "closed", "to_state": "open"}
    assert at(points, "resilience.breaker.transitions", **moved) == 1
    assert (
        "resilience.breaker.call.duration",
        frozenset({("resilience.name", "payments")}),
    ) not in points


def test_watching_keeps_the_lock_free_paths(otel: Reader) -> None:
    breaker = rs.CircuitBreaker("fast")
    OTelMetrics(otel.provider).watch(breaker)
    policy = breaker._policy
    assert policy.quiet_free is not None
    assert (policy.observed, policy.timed) == (False, False)  # no listener, no clock reads
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=10, ttl=30.0), ttl=60.0)
    OTelMetrics(otel.provider).watch(cache)
    assert cache._hot


def test_limiter_decisions_never_by_key(otel: Reader, clock: FakeClock) -> None:
    limiter = rs.TokenBucket(rate=1.0, capacity=3, name="api", clock=clock)
    OTelMetrics(otel.provider).watch(limiter)
    for user in range(50):
        limiter.try_acquire(f"user:{user % 2}")
    points = otel.points()
    assert at(points, "resilience.limiter.decisions", name="api", decision="allowed") == 6
    assert at(points, "resilience.limiter.decisions", name="api", decision="denied") == 44
    assert not any("user:" in str(attributes) for _, attributes in points)


def test_cache_requests_by_tier_and_result(otel: Reader) -> None:
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=100, ttl=30.0), ttl=60.0, name="users")
    OTelMetrics(otel.provider, histograms=True).watch(cache)
    for _ in range(5):
        cache.get_or_load("a", lambda: "v")
    cache.get_or_load("b", lambda: "v")
    with pytest.raises(RuntimeError):
        cache.get_or_load("c", lambda: (_ for _ in ()).throw(RuntimeError("db down")))
    points = otel.points()
    hits = {"name": "users", "tier": "local", "result": "hit"}
    assert at(points, "resilience.cache.requests", **hits) == 4
    assert at(points, "resilience.cache.requests", **{**hits, "result": "miss"}) == 3
    assert at(points, "resilience.cache.loads", name="users", outcome="success") == 2
    assert at(points, "resilience.cache.loads", name="users", outcome="error") == 1
    assert at(points, "resilience.cache.load.duration", name="users").count == 2


def test_retry_attempts(otel: Reader) -> None:
    retry = rs.Retry(
        attempts=3, backoff=rs.Backoff(0.0, 0.0, 1.0, jitter="none"), on=ConnectionError,
        name="pay",
    )  # fmt: skip
    OTelMetrics(otel.provider).watch(retry)
    failures = iter([ConnectionError("1"), ConnectionError("2")])

    def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    assert retry.call(flaky) == "ok"
    with pytest.raises(ValueError):
        retry.call(lambda: (_ for _ in ()).throw(ValueError("no")))
    points = otel.points()
    assert at(points, "resilience.retry.calls", name="pay") == 2
    assert at(points, "resilience.retry.retries", name="pay") == 2
    assert at(points, "resilience.retry.attempts", name="pay") == 4


def test_bulkhead_and_concurrency_limit(otel: Reader, clock: FakeClock) -> None:
    bulkhead = rs.Bulkhead(1, name="db")
    limit = rs.ConcurrencyLimit(initial=1, name="tight", clock=clock)
    OTelMetrics(otel.provider).watch(bulkhead, limit)
    with bulkhead:
        with pytest.raises(rs.BulkheadFull):
            bulkhead.call(print, "never")
        points = otel.points()
        assert at(points, "resilience.bulkhead.active", name="db") == 1
    with limit, pytest.raises(rs.LimitExceeded):
        limit.call(print, "never")
    points = otel.points()
    assert at(points, "resilience.bulkhead.admitted", name="db") == 1
    assert at(points, "resilience.bulkhead.rejected", name="db") == 1
    assert at(points, "resilience.bulkhead.active", name="db") == 0
    assert at(points, "resilience.bulkhead.max_concurrent", name="db") == 1
    assert at(points, "resilience.concurrency.admitted", name="tight") == 1
    assert at(points, "resilience.concurrency.rejected", name="tight") == 1
    assert at(points, "resilience.concurrency.limit", name="tight") == 1


def test_outbox_publisher(
    otel: Reader, clock: FakeClock, sqlite_outbox: tuple[SqliteOutboxStore, sqlite3.Connection]
) -> None:
    store, conn = sqlite_outbox
    broker = InMemoryBroker()
    breaker = rs.CircuitBreaker("broker", failure_threshold=2, recovery_timeout=5.0, clock=clock)
    pub = OutboxPublisher(store, broker=broker, breaker=breaker, name="orders", clock=clock)
    OTelMetrics(otel.provider, histograms=True).watch(pub)
    with conn:
        for i in range(4):
            store.enqueue(conn, topic="t", key=f"k{i % 2}", payload=i)
    with broker.outage():
        pub.run_once()
        clock.advance(2.0)
        pub.stats()
        points = otel.points()
    assert at(points, "resilience.outbox.pending", name="orders") == 4
    assert at(points, "resilience.outbox.oldest_pending_age", name="orders") == 2.0
    assert at(points, "resilience.outbox.failures", name="orders", failure_class="outage") > 0
    pub.run_once()
    pub.stats()
    points = otel.points()
    assert at(points, "resilience.outbox.published", name="orders") == 4
    assert at(points, "resilience.outbox.pending", name="orders") == 0
    assert at(points, "resilience.breaker.state", name="broker", state="closed") == 1  # linked
    delay = at(points, "resilience.outbox.delivery.delay", name="orders", topic="t")
    assert delay.count == 4


def test_prometheus_and_otel_watch_the_same_primitives(otel: Reader, clock: FakeClock) -> None:
    breaker = rs.CircuitBreaker("both", failure_threshold=1, clock=clock)
    limiter = rs.TokenBucket(rate=1.0, capacity=2, name="both", clock=clock)
    registry = CollectorRegistry()
    Metrics(registry).watch(breaker, limiter)
    OTelMetrics(otel.provider).watch(breaker, limiter)
    breaker.call(lambda: None)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    with pytest.raises(rs.CircuitOpenError):
        breaker.call(lambda: None)
    for _ in range(5):
        limiter.try_acquire("k")
    for _ in range(2):  # reading one never takes from the other
        text = generate_latest(registry).decode()
        prom = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        points = otel.points()
        for outcome, n in (("success", 1), ("failure", 1)):
            assert prom[("resilience_breaker_calls_total",
                         (("breaker", "both"), ("outcome", outcome)))] == n  # fmt: skip
            assert at(points, "resilience.breaker.calls", name="both", outcome=outcome) == n
        assert prom[("resilience_breaker_rejected_total", (("breaker", "both"),))] == 1
        assert at(points, "resilience.breaker.rejections", name="both") == 1
        assert prom[("resilience_limiter_decisions_total",
                     (("decision", "denied"), ("limiter", "both")))] == 3  # fmt: skip
        assert at(points, "resilience.limiter.decisions", name="both", decision="denied") == 3


def test_links_made_after_watch_are_collected_once(otel: Reader) -> None:
    from resilience.events import Telemetry

    class Grows:
        def __init__(self) -> None:
            self.breakers: list[rs.CircuitBreaker] = []

        def telemetry(self) -> Telemetry:
            return Telemetry("pipeline", "grows", dict, links=tuple(self.breakers))

    grows = Grows()
    metrics = OTelMetrics(otel.provider)
    metrics.watch(grows)
    assert not any(name.startswith("resilience.breaker") for name, _ in otel.points())
    grows.breakers.append(rs.CircuitBreaker("host-a"))
    assert at(otel.points(), "resilience.breaker.state", name="host-a", state="closed") == 1
    for _ in range(3):
        otel.points()
    assert len(metrics._watched) == 2


# -- span events ---------------------------------------------------------------------------


def test_span_events_for_rejections_retries_timeouts_cache_and_outbox(
    otel: Reader,
    spans: Spans,
    clock: FakeClock,
    sqlite_outbox: tuple[SqliteOutboxStore, sqlite3.Connection],
) -> None:
    metrics = OTelMetrics(otel.provider, span_events=True)
    breaker = rs.CircuitBreaker("dep", failure_threshold=1, recovery_timeout=5.0, clock=clock)
    limiter = rs.TokenBucket(rate=1.0, capacity=1, name="api", clock=clock)
    retry = rs.Retry(attempts=2, backoff=rs.Backoff(0.0, 0.0, 1.0, jitter="none"), name="r")
    timeout = rs.Timeout(0.1, name="slow", clock=clock)
    bulkhead = rs.Bulkhead(1, name="db")
    limit = rs.ConcurrencyLimit(initial=1, name="tight", clock=clock)
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=10, ttl=30.0), ttl=60.0, name="c")
    store, conn = sqlite_outbox
    pub = OutboxPublisher(store, broker=InMemoryBroker(), name="orders", clock=clock)
    metrics.watch(breaker, limiter, retry, timeout, bulkhead, limit, cache, pub)
    with conn:
        store.enqueue(conn, topic="t", key="secret-key", payload=1)

    with spans.tracer.start_as_current_span("request"):
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
        with pytest.raises(rs.CircuitOpenError):
            breaker.call(lambda: None)
        assert limiter.try_acquire("user:42").allowed
        assert not limiter.try_acquire("user:42").allowed
        tries = iter([ConnectionError("once")])

        def flaky() -> None:
            error = next(tries, None)
            if error is not None:
                raise error

        retry.call(flaky)
        with pytest.raises(rs.TimeoutExceeded):
            timeout.call(clock.advance, 0.5)
        with bulkhead, pytest.raises(rs.BulkheadFull):
            bulkhead.call(print, "never")
        with limit, pytest.raises(rs.LimitExceeded):
            limit.call(print, "never")
        cache.get_or_load("user:42", lambda: "v")
        cache.get_or_load("user:42", lambda: "v")
        pub.run_once()
    events = spans.events("request")
    names = [name for name, _ in events]
    assert names == [
        "resilience.breaker.rejected",
        "resilience.rate_limited",
        "resilience.retry",
        "resilience.timeout",
        "resilience.bulkhead.rejected",
        "resilience.concurrency.rejected",
        "resilience.cache.miss",
        "resilience.cache.hit",
        "resilience.outbox.published",
    ]
    by_name = dict(events)
    assert by_name["resilience.breaker.rejected"]["resilience.name"] == "dep"
    assert by_name["resilience.breaker.rejected"]["resilience.state"] == "open"
    assert by_name["resilience.breaker.rejected"]["resilience.retry_after"] == 5.0
    assert by_name["resilience.rate_limited"]["resilience.retry_after"] == pytest.approx(1.0)
    assert by_name["resilience.retry"]["error.type"] == "ConnectionError"
    assert by_name["resilience.retry"]["resilience.attempt"] == 1
    assert by_name["resilience.timeout"]["resilience.reason"] == "overrun"
    assert by_name["resilience.cache.hit"]["resilience.tier"] == "local"
    assert by_name["resilience.outbox.published"]["resilience.count"] == 1
    assert "user:42" not in str(events)  # keys are never shown
    assert "secret-key" not in str(events)


def test_no_span_no_event_and_no_error(otel: Reader) -> None:
    breaker = rs.CircuitBreaker("quiet", failure_threshold=1)
    OTelMetrics(otel.provider, span_events=True).watch(breaker)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    with pytest.raises(rs.CircuitOpenError):
        breaker.call(lambda: None)  # no current span: nothing to add to, nothing raised
    assert at(otel.points(), "resilience.breaker.rejections", name="quiet") == 1


def test_span_events_land_on_the_callers_span_across_many_threads(
    otel: Reader, spans: Spans
) -> None:
    # One thread may deliver another's event (the dispatcher's turn): it must still go
    # to the span of the thread whose call was rejected.
    breaker = rs.CircuitBreaker("shared", failure_threshold=1, recovery_timeout=60.0)
    OTelMetrics(otel.provider, span_events=True).watch(breaker)
    breaker.force_open()
    threads, per_thread = 16, 50
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        with spans.tracer.start_as_current_span(f"t{index}"):
            for _ in range(per_thread):
                with pytest.raises(rs.CircuitOpenError):
                    breaker.call(lambda: None)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for index in range(threads):
        events = spans.events(f"t{index}")
        assert len(events) == per_thread, index
        assert {name for name, _ in events} == {"resilience.breaker.rejected"}


@pytest.mark.anyio
async def test_span_events_from_async_code(otel: Reader, spans: Spans) -> None:
    limit = rs.Bulkhead(1, name="async")
    timeout = rs.Timeout(0.01, name="t")
    OTelMetrics(otel.provider, span_events=True).watch(limit, timeout)

    async def slow() -> None:
        await anyio.sleep(5)

    with spans.tracer.start_as_current_span("task"):
        with pytest.raises(rs.TimeoutExceeded):
            await timeout.acall(slow)
        async with limit:
            with pytest.raises(rs.BulkheadFull):
                await limit.acall(anyio.sleep, 0)
    names = [name for name, _ in spans.events("task")]
    assert names == ["resilience.timeout", "resilience.bulkhead.rejected"]


# -- the event sink's seams that span events use ------------------------------------------


def test_in_context_listeners_run_in_the_producers_context() -> None:
    # Thread A holds the dispatcher's turn (its plain listener is stuck) when thread B's
    # event arrives. B returns at once, having delivered its own event to the in_context
    # listener in B's context (its span must not end first); A delivers B's event to the
    # plain listener later, in order.
    import contextvars

    from resilience.events import Dispatcher, in_context

    who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    seen: list[tuple[object, str]] = []
    plain: list[object] = []
    holding, go_on = threading.Event(), threading.Event()

    def stuck(event: object) -> None:
        if event == "a":
            holding.set()
            go_on.wait(5)
        plain.append(event)

    def listener(event: object) -> None:
        seen.append((event, who.get()))

    dispatcher: Dispatcher[str] = Dispatcher([stuck, in_context(listener)])

    def produce(name: str) -> None:
        who.set(name)
        dispatcher.queue.append(name)
        dispatcher.drain()

    a = threading.Thread(target=produce, args=("a",))
    a.start()
    assert holding.wait(5)
    assert seen == [("a", "a")]  # A's own, before its plain listener got stuck
    b = threading.Thread(target=produce, args=("b",))
    b.start()
    b.join(5)
    assert not b.is_alive()
    assert seen == [("a", "a"), ("b", "b")]  # B's, delivered by B before it returned
    assert plain == []
    go_on.set()
    a.join(5)
    assert plain == ["a", "b"]  # the turn's holder delivered B's to the plain listener
    assert seen == [("a", "a"), ("b", "b")]  # once each
    dispatcher.remove(dispatcher._listeners[1])
    dispatcher.queue.append("c")
    assert not getattr(dispatcher.queue, "own", None)  # nothing noted without one
    assert list(dispatcher.queue) == ["c"]


def test_a_producer_whose_event_another_thread_drained_still_delivers_its_own() -> None:
    # The breaker's shell drains only `if queue:`. When another thread has taken the
    # shared queue, the producer's own noted events must still make the queue true.
    from resilience.events import Dispatcher, in_context

    seen: list[object] = []
    dispatcher: Dispatcher[str] = Dispatcher([in_context(seen.append)])
    dispatcher.queue.append("mine")
    taken = threading.Thread(target=lambda: dispatcher.queue.popleft())
    taken.start()
    taken.join(5)
    assert dispatcher.queue  # the shared part is empty; this thread's own is not
    dispatcher.drain()
    assert seen == ["mine"]
    assert not dispatcher.queue


def test_tally_hooks_run_per_add_and_unhooked_tallies_stay_c_level() -> None:
    from resilience.events import Tally

    tally = Tally()
    plain_add = tally.add
    calls: list[int] = []

    def hook() -> None:
        calls.append(1)

    tally.hook(hook)
    for _ in range(5):
        tally.add()
    assert (tally.value(), len(calls)) == (5, 5)
    tally.unhook(hook)
    assert type(tally.add) is type(plain_add)  # a builtin method again, not a function
    tally.add()
    assert (tally.value(), len(calls)) == (6, 5)
    with pytest.raises(ValueError, match="not installed"):
        tally.unhook(hook)
    with pytest.raises(TypeError, match="fn"):
        tally.hook("no")  # type: ignore[arg-type]


def test_hooked_tallies_count_exactly_under_many_threads() -> None:
    from resilience.events import Tally

    tally, seen = Tally(), Tally()
    tally.hook(seen.add)
    threads = [threading.Thread(target=lambda: [tally.add() for _ in range(2000)])
               for _ in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tally.value() == seen.value() == 16_000
