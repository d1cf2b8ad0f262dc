"""Trace context across the outbox, with OpenTelemetry's SDK and its in-memory exporter.

- ``enqueue`` stamps the active span's ``traceparent``/``tracestate`` into the headers in
  the caller's transaction (sqlite3, psycopg sync and async, SQLAlchemy); nothing without
  a span, or when OpenTelemetry was never imported; the caller's own headers win.
- Every broker carries them: in-memory, Redis Streams, RabbitMQ and NATS (the real
  servers), and the headers reach ``publish()`` as a mapping of str a Kafka adapter turns
  into record headers.
- The inbox continues the trace: a CONSUMER span, child of the producer's span (or of the
  consumer's own, linked to the producer's), from headers in each broker's form.
- The commit-to-broker histogram per topic, opt-in, with its topic cap.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import nats
import psycopg
import pytest
import redis
import sqlalchemy as sa
from nats.js.api import StreamConfig
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session
from support.services import nats_hint, rabbitmq_hint, require_service

from resilience.integrations.outbox import (
    Delivered,
    Inbox,
    InMemoryBroker,
    OutboxEvent,
    OutboxPublisher,
    PostgresOutboxStore,
    RedisStreamsBroker,
    SqliteOutboxStore,
)
from resilience.integrations.outbox._model import Results
from resilience.integrations.outbox._trace import current_headers, trace_carrier
from resilience.integrations.outbox.nats import NatsJetStreamBroker
from resilience.integrations.outbox.rabbitmq import RabbitMQBroker
from resilience.metrics import MAX_OUTBOX_TOPICS, Metrics
from resilience.testing import FakeClock

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    # A provider of the test's own: the global one is set once per process, if ever.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def tracer(provider: TracerProvider) -> trace.Tracer:
    return provider.get_tracer("test")


class Env:
    """A SQLite outbox with the application's connection, a relay and an inbox."""

    def __init__(self, path: Path, clock: FakeClock, provider: TracerProvider) -> None:
        self.path = path
        self.clock = clock
        self.store = SqliteOutboxStore(path, clock=clock)
        self.store.create_schema()
        self.app = sqlite3.connect(path)
        self.inbox = Inbox(consumer="billing", tracer_provider=provider)
        self.consumer_db = sqlite3.connect(path.with_name("consumer.db"))
        self.inbox.create_schema(self.consumer_db)

    def enqueue(self, topic: str = "orders", **kwargs: Any) -> str:
        with self.app:
            return self.store.enqueue(
                self.app, topic=topic, payload=kwargs.pop("payload", 1), **kwargs
            )

    def claimed(self) -> list[OutboxEvent]:
        return self.store.claim("test", 100, 30.0)

    def publisher(self, broker: Any, **kwargs: Any) -> OutboxPublisher:
        return OutboxPublisher(self.store, broker=broker, clock=self.clock, **kwargs)

    def close(self) -> None:
        self.app.close()
        self.consumer_db.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path, clock: FakeClock, provider: TracerProvider) -> Iterator[Env]:
    e = Env(tmp_path / "app.db", clock, provider)
    yield e
    e.close()


def traceparent(span: trace.Span | ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


# -- the stamp ----------------------------------------------------------------------------


def test_enqueue_stamps_the_active_span(env: Env, tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("place order", kind=SpanKind.PRODUCER) as span:
        env.enqueue()
    (event,) = env.claimed()
    assert dict(event.headers) == {"traceparent": traceparent(span)}
    assert int(event.headers["traceparent"][-2:], 16) & 1  # sampled
    # The very text OpenTelemetry's own W3C propagator writes for this span.
    carrier: dict[str, str] = {}
    with trace.use_span(span):
        TraceContextTextMapPropagator().inject(carrier)
    assert carrier == dict(event.headers)


def test_the_tracestate_travels_too(env: Env, tracer: trace.Tracer) -> None:
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]),
    )
    with trace.use_span(NonRecordingSpan(remote)):
        env.enqueue(payload="remote parent")  # the upstream context, propagated as is
        with tracer.start_as_current_span("child") as child:
            env.enqueue(payload="child")
    first, second = env.claimed()
    assert dict(first.headers) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    }
    assert second.headers["traceparent"] == traceparent(child)
    assert second.headers["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


OTHER = "00-" + "1" * 32 + "-" + "2" * 16 + "-00"


def test_no_span_no_stamp_and_the_callers_headers_win(env: Env, tracer: trace.Tracer) -> None:
    env.enqueue(payload="no span")
    with trace.use_span(trace.INVALID_SPAN):
        env.enqueue(payload="invalid span")
    with tracer.start_as_current_span("op") as span:
        env.enqueue(payload="merged", headers={"tenant": "t1"})
        env.enqueue(payload="own", headers={"traceparent": OTHER})
    plain, invalid, merged, own = env.claimed()
    assert dict(plain.headers) == {} == dict(invalid.headers)
    assert dict(merged.headers) == {"traceparent": traceparent(span), "tenant": "t1"}
    assert dict(own.headers) == {"traceparent": OTHER}


def test_bad_headers_still_fail_as_before_inside_a_span(env: Env, tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("op"), pytest.raises(TypeError, match="headers"):
        env.enqueue(headers={"n": 1})
    with tracer.start_as_current_span("op"), pytest.raises(TypeError, match="headers"):
        env.enqueue(headers=[("a", "b")])


def test_the_stamp_rolls_back_with_the_transaction(env: Env, tracer: trace.Tracer) -> None:
    def fail() -> None:
        with tracer.start_as_current_span("op"), env.app:
            env.store.enqueue(env.app, topic="t", payload=1)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        fail()
    assert env.claimed() == []


def test_without_opentelemetry_imported_nothing_is_looked_up(
    env: Env, tracer: trace.Tracer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tracer.start_as_current_span("op"):
        monkeypatch.delitem(sys.modules, "opentelemetry.trace")
        assert current_headers() is None
        env.enqueue()
    (event,) = env.claimed()
    assert dict(event.headers) == {}


def test_enqueue_and_consume_need_neither_opentelemetry_nor_sqlalchemy(tmp_path: Path) -> None:
    # As if neither were installed: importing them raises. (redis-py imports OpenTelemetry
    # when it is installed, so "imported" is the usual case in a traced service.)
    db = str(tmp_path / "o.db")
    code = (
        "import sys; sys.modules['opentelemetry'] = sys.modules['sqlalchemy'] = None\n"
        "import sqlite3\n"
        "from resilience.integrations.outbox import SqliteOutboxStore, Inbox\n"
        f"store = SqliteOutboxStore({db!r}); store.create_schema()\n"
        f"conn = sqlite3.connect({db!r})\n"
        "with conn: store.enqueue(conn, topic='t', payload=1)\n"
        "(event,) = store.claim('x', 1, 30.0)\n"
        "inbox = Inbox(); inbox.create_schema(conn)\n"
        "with conn, inbox.consume(conn, event.event_id, event.headers) as first:\n"
        "    print(first, dict(event.headers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True {}"


def test_sqlalchemy_sessions_are_stamped_too(env: Env, tracer: trace.Tracer) -> None:
    engine = sa.create_engine(f"sqlite:///{env.path}")
    try:
        with tracer.start_as_current_span("op") as span, Session(engine) as session:
            env.store.enqueue(session, topic="t", payload=1)
            session.commit()
    finally:
        engine.dispose()
    (event,) = env.claimed()
    assert event.headers["traceparent"] == traceparent(span)


@pytest.mark.postgres
@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_psycopg_enqueue_and_aenqueue_are_stamped(
    postgres_dsn: str, pg_schema: str, tracer: trace.Tracer
) -> None:
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    store.create_schema()
    try:
        with tracer.start_as_current_span("sync") as sync_span, psycopg.connect(postgres_dsn) as c:
            store.enqueue(c, topic="t", payload="sync")
        with tracer.start_as_current_span("async") as async_span:
            async with await psycopg.AsyncConnection.connect(postgres_dsn) as aconn:
                await store.aenqueue(aconn, topic="t", payload="async")
        events = store.claim("x", 10, 30.0)
    finally:
        store.close()
    assert [(e.json(), e.headers["traceparent"]) for e in events] == [
        ("sync", traceparent(sync_span)),
        ("async", traceparent(async_span)),
    ]


# -- every broker carries it --------------------------------------------------------------


def test_the_in_memory_broker_and_a_kafka_style_adapter_get_the_headers(
    env: Env, tracer: trace.Tracer
) -> None:
    class KafkaStyle(InMemoryBroker):
        """Turns headers into Kafka record headers, as a Kafka adapter does."""

        records: list[list[tuple[str, bytes]]]

        def publish(self, events: Sequence[OutboxEvent]) -> Results:
            self.records = [
                [("event_id", e.event_id.encode())]
                + [(name, value.encode()) for name, value in e.headers.items()]
                for e in events
            ]
            return super().publish(events)

    with tracer.start_as_current_span("op") as span:
        env.enqueue()
    broker = KafkaStyle()
    env.publisher(broker).run_once()
    (message,) = broker.messages
    assert message.headers["traceparent"] == traceparent(span)
    (record,) = broker.records
    assert ("traceparent", traceparent(span).encode()) in record
    assert trace_carrier(record) == {"traceparent": traceparent(span)}


@pytest.mark.redis
def test_redis_streams_carries_it_and_the_inbox_reads_the_entry(
    env: Env,
    tracer: trace.Tracer,
    exporter: InMemorySpanExporter,
    redis_client: redis.Redis,
    redis_prefix: str,
) -> None:
    with tracer.start_as_current_span("place order") as span:
        eid = env.enqueue(key="o-1")
    broker = RedisStreamsBroker(redis_client, stream=f"{redis_prefix}outbox:{{topic}}")
    try:
        assert env.publisher(broker).run_once().published == 1
    finally:
        broker.close()
    entries: list[tuple[bytes, dict[bytes, bytes]]] = redis_client.xrange(  # type: ignore[assignment]
        f"{redis_prefix}outbox:orders"
    )
    ((_, fields),) = entries
    assert json.loads(fields[b"headers"]) == {"traceparent": traceparent(span)}
    with env.consumer_db, env.inbox.consume(env.consumer_db, eid, fields, topic="orders"):
        pass
    (consumer,) = finished(exporter, "process orders")
    assert consumer.parent is not None
    assert consumer.parent.span_id == span.get_span_context().span_id


def _tcp(url: str, port: int) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or port


@pytest.fixture
def rabbitmq_url() -> str:
    url = os.environ.get("RESILIENCE_RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672/"
    require_service(
        "RabbitMQ", lambda: socket.create_connection(_tcp(url, 5672), 1.0).close(),
        hint=rabbitmq_hint(url),
    )  # fmt: skip
    return url


@pytest.fixture
def nats_url() -> str:
    url = os.environ.get("RESILIENCE_NATS_URL") or "nats://127.0.0.1:4222"
    require_service(
        "NATS", lambda: socket.create_connection(_tcp(url, 4222), 1.0).close(),
        hint=nats_hint(url),
    )  # fmt: skip
    return url


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_rabbitmq_carries_it(env: Env, tracer: trace.Tracer, rabbitmq_url: str) -> None:
    exchange_name = f"rstest-{uuid.uuid4().hex[:12]}"
    conn = await aio_pika.connect(rabbitmq_url, timeout=5)
    broker = RabbitMQBroker(rabbitmq_url, exchange=exchange_name, timeout=5.0)
    try:
        channel = await conn.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        with tracer.start_as_current_span("op") as span:
            env.enqueue()
        assert (await env.publisher(broker).arun_once()).published == 1
        message = await queue.get(timeout=5)
        await message.ack()
        assert message.headers["traceparent"] == traceparent(span)
        assert trace_carrier(message.headers) == {"traceparent": traceparent(span)}
        await channel.exchange_delete(exchange_name)
    finally:
        await broker.aclose()
        await conn.close()


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_nats_carries_it(env: Env, tracer: trace.Tracer, nats_url: str) -> None:
    prefix = f"rstest_{uuid.uuid4().hex[:12]}"
    nc = await nats.connect(nats_url, connect_timeout=5)
    js = nc.jetstream(timeout=5)
    broker = NatsJetStreamBroker(nats_url, subject=f"{prefix}.{{topic}}", timeout=5.0)
    try:
        await js.add_stream(StreamConfig(name=prefix, subjects=[f"{prefix}.>"]))
        try:
            with tracer.start_as_current_span("op") as span:
                env.enqueue()
            assert (await env.publisher(broker).arun_once()).published == 1
            message = await js.get_msg(prefix, 1)
            assert message.headers is not None
            assert message.headers["traceparent"] == traceparent(span)
            assert trace_carrier(message.headers) == {"traceparent": traceparent(span)}
        finally:
            await js.delete_stream(prefix)
    finally:
        await broker.aclose()
        await nc.close()


def test_the_carrier_reads_every_brokers_form() -> None:
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    want = {"traceparent": tp, "tracestate": "k=v"}
    forms: list[object] = [
        {"traceparent": tp, "tracestate": "k=v", "topic": "t"},  # RabbitMQ, NATS, events
        {"TraceParent": tp.encode(), "tracestate": b"k=v"},  # bytes, any case
        [("event_id", b"x"), ("traceparent", tp.encode()), ("tracestate", b"k=v")],  # Kafka
        json.dumps(want),  # a Redis entry's headers field
        {b"event_id": b"x", b"headers": json.dumps(want).encode()},  # the whole entry
    ]
    for form in forms:
        assert trace_carrier(form) == want, form
    for junk in (None, b"\xff", "not json", 42, [1, 2], {"traceparent": 5}):
        assert trace_carrier(junk) == {}


# -- the inbox continues the trace --------------------------------------------------------


def test_the_consumer_span_continues_the_producers_trace(
    env: Env, tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("place order", kind=SpanKind.PRODUCER) as producer:
        env.enqueue(key="o-1")
    broker = InMemoryBroker()
    env.publisher(broker).run_once()
    (message,) = broker.messages
    handled = []
    for _ in range(2):  # delivered twice: handled once, both spans in the trace
        with (
            env.consumer_db,
            env.inbox.consume(
                env.consumer_db, message.event_id, message.headers, topic=message.topic
            ) as first,
        ):
            if first:
                handled.append(trace.get_current_span().get_span_context().trace_id)
    first_span, duplicate = finished(exporter, "process orders")
    pctx = producer.get_span_context()
    assert handled == [pctx.trace_id]  # the handler ran inside the consumer span
    for span in (first_span, duplicate):
        assert span.kind is SpanKind.CONSUMER
        assert span.context is not None
        assert span.context.trace_id == pctx.trace_id
        assert span.parent is not None
        assert span.parent.span_id == pctx.span_id
        assert [link.context.span_id for link in span.links] == [pctx.span_id]
        assert span.attributes is not None
        assert span.attributes["messaging.message.id"] == message.event_id
        assert span.attributes["messaging.consumer.group.name"] == "billing"
        assert span.attributes["messaging.destination.name"] == "orders"
    assert first_span.attributes is not None
    assert duplicate.attributes is not None
    assert first_span.attributes["resilience.inbox.duplicate"] is False
    assert duplicate.attributes["resilience.inbox.duplicate"] is True


def test_inside_the_consumers_own_span_it_links_instead(
    env: Env, tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("place order") as producer:
        eid = env.enqueue()
    (event,) = env.claimed()
    with (
        tracer.start_as_current_span("poll batch") as batch,
        env.consumer_db,
        env.inbox.consume(env.consumer_db, eid, event.headers, topic="orders"),
    ):
        pass
    (span,) = finished(exporter, "process orders")
    assert span.parent is not None
    assert span.parent.span_id == batch.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == batch.get_span_context().trace_id
    assert [link.context.span_id for link in span.links] == [producer.get_span_context().span_id]


def test_no_trace_headers_make_a_root_span_and_errors_are_recorded(
    env: Env, exporter: InMemorySpanExporter
) -> None:
    eid = str(uuid.uuid4())

    def handle() -> None:
        with env.consumer_db, env.inbox.consume(env.consumer_db, eid, {"topic": "t"}) as first:
            assert first
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler"):
        handle()
    (span,) = finished(exporter, "process billing")  # no topic given: the consumer's name
    assert span.parent is None
    assert list(span.links) == []
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    with env.consumer_db, env.inbox.consume(env.consumer_db, eid) as first:
        assert first  # rolled back with the handler: the redelivery runs it again


def test_without_opentelemetry_consume_is_first_time(
    env: Env, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    eid = str(uuid.uuid4())
    results = []
    for _ in range(2):
        with env.consumer_db, env.inbox.consume(env.consumer_db, eid) as first:
            results.append(first)
    assert results == [True, False]
    assert exporter.get_finished_spans() == ()


@pytest.mark.postgres
@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_aconsume_on_a_psycopg_async_connection(
    postgres_dsn: str, pg_schema: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    inbox = Inbox(consumer="billing", schema=pg_schema, tracer_provider=provider)
    with tracer.start_as_current_span("place order") as producer:
        headers = current_headers()
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await inbox.acreate_schema(conn)
        await conn.commit()
        eid = str(uuid.uuid4())
        seen = []
        for _ in range(2):
            async with conn.transaction(), inbox.aconsume(conn, eid, headers, topic="t") as first:
                seen.append(first)
    assert seen == [True, False]
    spans = finished(exporter, "process t")
    assert [s.parent.span_id if s.parent else None for s in spans] == [
        producer.get_span_context().span_id
    ] * 2


# -- the delivery histogram ----------------------------------------------------------------


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == f"resilience_{name}"
    }


def test_delivery_delay_per_topic_is_opt_in(env: Env, clock: FakeClock) -> None:
    registry = CollectorRegistry()
    broker = InMemoryBroker()
    pub = env.publisher(broker, name="orders")
    Metrics(registry, histograms=True).watch(pub)
    env.enqueue("a")
    clock.advance(1.0)
    env.enqueue("a")
    env.enqueue("b")
    clock.advance(2.0)
    assert pub.run_once().published == 3
    count = _samples(registry, "outbox_delivery_delay_seconds_count")
    total = _samples(registry, "outbox_delivery_delay_seconds_sum")
    a, b = (("outbox", "orders"), ("topic", "a")), (("outbox", "orders"), ("topic", "b"))
    assert count == {a: 2.0, b: 1.0}
    assert total == {a: 5.0, b: 2.0}  # 3 s and 2 s for a, 2 s for b
    buckets = _samples(registry, "outbox_delivery_delay_seconds_bucket")
    assert buckets[(("le", "2.5"), a[0], a[1])] == 1.0
    assert buckets[(("le", "5.0"), a[0], a[1])] == 2.0

    plain = CollectorRegistry()
    quiet = env.publisher(InMemoryBroker(), name="quiet")
    Metrics(plain).watch(quiet)  # not opted in: nothing measured, no series
    assert not quiet._deliveries
    env.enqueue("a")
    quiet.run_once()
    assert _samples(plain, "outbox_delivery_delay_seconds_count") == {}


def test_topics_beyond_the_cap_share_one_series(env: Env) -> None:
    registry = CollectorRegistry()
    pub = env.publisher(InMemoryBroker(), name="wide", batch_size=200)
    Metrics(registry, histograms=True).watch(pub)
    for i in range(MAX_OUTBOX_TOPICS + 5):
        env.enqueue(f"topic-{i}")
    env.enqueue("topic-0")  # an early topic keeps its own series
    pub.run_once()
    count = _samples(registry, "outbox_delivery_delay_seconds_count")
    assert len(count) == MAX_OUTBOX_TOPICS + 1
    assert count[(("outbox", "wide"), ("topic", "_other"))] == 5.0
    assert count[(("outbox", "wide"), ("topic", "topic-0"))] == 2.0


@pytest.mark.anyio
async def test_delivered_goes_only_to_listeners_that_ask_for_it(env: Env, clock: FakeClock) -> None:
    broker = InMemoryBroker()
    everything: list[object] = []
    delivered: list[Delivered] = []

    async def on_delivered(event: Delivered) -> None:
        delivered.append(event)

    pub = env.publisher(broker, listeners=[everything.append])
    pub.add_listener(on_delivered, only=(Delivered,))
    env.enqueue("a")
    env.enqueue("b")
    clock.advance(0.5)
    await pub.arun_once()
    assert [type(e).__name__ for e in everything] == ["BatchResult"]
    assert delivered == [Delivered(pub.name, (("a", 0.5), ("b", 0.5)))]
    with broker.outage():  # nothing published, nothing delivered
        env.enqueue("a")
        await pub.arun_once()
    assert len(delivered) == 1
