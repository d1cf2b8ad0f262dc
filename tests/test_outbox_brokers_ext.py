"""RabbitMQBroker and NatsJetStreamBroker against the real servers.

- What arrives: message id / ``Nats-Msg-Id`` = event id, headers, payload, per-key order.
- Sync ``publish()`` (private loop thread), ``apublish()`` on the connection's loop, from
  another asyncio loop and from trio (both through the adapter's loop).
- Classification by what the servers answer: too large, unroutable, queue or stream
  full, no stream, stream limits; a poison event holds back its key, other keys flow.
- Outages through a FaultProxy (cut, blackhole): outage, within the timeout, and the
  next batch after ``restore()`` goes through on a fresh or the same connection.

Servers: ``RESILIENCE_RABBITMQ_URL`` and ``RESILIENCE_NATS_URL`` (defaults below). When
one is unreachable its tests skip (fail under ``CI=true``). Each test has its own
exchange, queues and streams (uuid names), deleted afterwards; the servers are shared.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import anyio
import anyio.to_thread
import nats
import nats.errors
import nats.js.errors
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from anyio.from_thread import BlockingPortal, start_blocking_portal
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig
from pamqp.commands import Basic
from support.faultproxy import FaultProxy
from support.services import nats_hint, rabbitmq_hint, require_service

from resilience.errors import CircuitOpenError
from resilience.integrations.outbox import (
    Broker,
    BrokerUnavailable,
    EventRejected,
    EventTooLarge,
    Failure,
    HeldBack,
    OutboxEvent,
)
from resilience.integrations.outbox.nats import NatsJetStreamBroker
from resilience.integrations.outbox.rabbitmq import RabbitMQBroker

RABBITMQ_URL_ENV = "RESILIENCE_RABBITMQ_URL"
NATS_URL_ENV = "RESILIENCE_NATS_URL"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
PROBE_TIMEOUT = 1.0
OUTAGE_TIMEOUT = 1.0  # the adapters' timeout where an outage is staged
SLACK = 1.0  # scheduling slack on top of a timeout, for a busy machine

# aio-pika and nats-py run on asyncio only; the *_from_any_loop tests also run on trio,
# which the adapters serve through their own loop thread.
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])


# --- servers ---------------------------------------------------------------------------


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _check_rabbitmq(url: str) -> None:
    # AMQP 0-9-1 protocol header; a broker answers with a method frame (type 1).
    with socket.create_connection(_host_port(url, 5672), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        if sock.recv(1) != b"\x01":
            raise ConnectionError("not an AMQP 0-9-1 broker")


def _check_nats(url: str) -> None:
    with socket.create_connection(_host_port(url, 4222), timeout=PROBE_TIMEOUT) as sock:
        line = sock.makefile("rb").readline()
    if not line.startswith(b"INFO "):
        raise ConnectionError("not a NATS server")
    if not json.loads(line[5:]).get("jetstream"):
        raise ConnectionError("JetStream is off (run nats-server with -js)")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = os.environ.get(RABBITMQ_URL_ENV) or DEFAULT_RABBITMQ_URL
    host, port = _host_port(url, 5672)
    require_service(
        f"RabbitMQ at {host}:{port}", lambda: _check_rabbitmq(url), hint=rabbitmq_hint(url)
    )
    return url


@pytest.fixture(scope="session")
def nats_url() -> str:
    url = os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL
    host, port = _host_port(url, 4222)
    require_service(f"NATS at {host}:{port}", lambda: _check_nats(url), hint=nats_hint(url))
    return url


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    """An asyncio loop thread for the admin connections, usable from any test."""
    with start_blocking_portal("asyncio") as p:
        yield p


class Rabbit:
    """This test's exchange on the shared RabbitMQ, and queues bound to it (exclusive to
    the admin connection, so even a crashed run leaves nothing behind)."""

    def __init__(self, url: str, portal: BlockingPortal) -> None:
        self.url = url
        self.exchange = f"rstest-{uuid.uuid4().hex[:12]}"
        self._portal = portal
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        portal.call(self._start)

    async def _start(self) -> None:
        self._conn = await aio_pika.connect(self.url, timeout=5)
        self._channel = await self._conn.channel()
        await self._ch.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)

    @property
    def _ch(self) -> AbstractChannel:
        assert self._channel is not None
        return self._channel

    def queue(
        self,
        binding: str = "#",
        *,
        name: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        """Declare a queue bound to the exchange (or, with ``name``, a bare queue)."""

        async def run() -> str:
            queue = await self._ch.declare_queue(
                name or f"rstest-{uuid.uuid4().hex[:12]}", exclusive=True, arguments=arguments
            )
            if name is None:
                await queue.bind(self.exchange, binding)
            return str(queue.name)

        return self._portal.call(run)

    def messages(self, queue: str, count: int, wait: float = 5.0) -> list[AbstractIncomingMessage]:
        """The first ``count`` messages (fewer after ``wait`` seconds), then checks none more."""

        async def run() -> list[AbstractIncomingMessage]:
            q = await self._ch.get_queue(queue)
            got: list[AbstractIncomingMessage] = []
            deadline = time.monotonic() + wait
            while len(got) < count and time.monotonic() < deadline:
                message = await q.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                await message.ack()
                got.append(message)
            extra = await q.get(fail=False)
            assert extra is None, f"an unexpected message: {extra!r}"
            return got

        return self._portal.call(run)

    def delete_exchange(self) -> None:
        self._portal.call(self._ch.exchange_delete, self.exchange)

    def close(self) -> None:
        async def run() -> None:
            assert self._conn is not None
            try:
                await self._ch.exchange_delete(self.exchange)
            finally:
                await self._conn.close()  # exclusive queues go with it

        self._portal.call(run)


@pytest.fixture
def rabbit(rabbitmq_url: str, portal: BlockingPortal) -> Iterator[Rabbit]:
    r = Rabbit(rabbitmq_url, portal)
    try:
        yield r
    finally:
        r.close()


class Jet:
    """Streams of this test's own on the shared JetStream, capturing ``<prefix>.>``."""

    def __init__(self, url: str, portal: BlockingPortal) -> None:
        self.url = url
        self.prefix = f"rstest_{uuid.uuid4().hex[:12]}"
        self.subject = f"{self.prefix}.{{topic}}"
        self._portal = portal
        self._streams: list[str] = []
        self._nc: NatsClient | None = None
        portal.call(self._start)

    async def _start(self) -> None:
        self._nc = await nats.connect(self.url, connect_timeout=5)

    @property
    def _js(self) -> JetStreamContext:
        assert self._nc is not None
        js: JetStreamContext = self._nc.jetstream(timeout=5)
        return js

    def stream(self, subject: str | None = None, **config: Any) -> str:
        name = f"{self.prefix}_{len(self._streams)}"
        subjects = [subject or f"{self.prefix}.>"]

        async def run() -> None:
            await self._js.add_stream(StreamConfig(name=name, subjects=subjects, **config))

        self._portal.call(run)
        self._streams.append(name)
        return name

    def messages(self, stream: str) -> list[RawStreamMsg]:
        async def run() -> list[RawStreamMsg]:
            info = await self._js.stream_info(stream)
            first, last = info.state.first_seq, info.state.last_seq
            return [await self._js.get_msg(stream, seq) for seq in range(first, last + 1)]

        return self._portal.call(run)

    def close(self) -> None:
        async def run() -> None:
            assert self._nc is not None
            try:
                for name in self._streams:
                    await self._js.delete_stream(name)
            finally:
                await self._nc.close()

        self._portal.call(run)


@pytest.fixture
def jet(nats_url: str, portal: BlockingPortal) -> Iterator[Jet]:
    j = Jet(nats_url, portal)
    try:
        yield j
    finally:
        j.close()


# --- events ----------------------------------------------------------------------------

_ids = itertools.count(1)


def event(
    key: str | None,
    topic: str = "orders",
    *,
    payload: Any = None,
    headers: dict[str, str] | None = None,
) -> OutboxEvent:
    n = next(_ids)
    return OutboxEvent(
        id=n,
        event_id=str(uuid.uuid4()),
        topic=topic,
        key=key,
        payload=json.dumps({"n": n} if payload is None else payload),
        headers=headers or {},
        created=time.time(),
        attempts=0,
    )


def interleaved(keys: tuple[str | None, ...], rounds: int) -> list[OutboxEvent]:
    return [
        event(key, headers={"trace": f"t{r}", "round": str(r)})
        for r in range(rounds)
        for key in keys
    ]


def kinds(results: list[BaseException | None]) -> list[str | None]:
    return [None if r is None else type(r).__name__ for r in results]


def failure(broker: Broker, result: BaseException | None) -> Failure:
    assert result is not None
    return broker.classify(result)


def adapter_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name in ("RabbitMQBroker", "NatsJetStreamBroker")
    ]


# --- RabbitMQ --------------------------------------------------------------------------


def assert_key_order(order: dict[str | None, list[int]]) -> None:
    """Each key's events arrived in id order (events without a key have none)."""
    for key, ids in order.items():
        if key is not None:
            assert ids == sorted(ids), f"key {key!r} out of order: {ids}"


def check_amqp_messages(messages: list[AbstractIncomingMessage], events: list[OutboxEvent]) -> None:
    by_id = {e.event_id: e for e in events}
    assert sorted(m.message_id or "" for m in messages) == sorted(by_id)
    order: dict[str | None, list[int]] = {}
    for m in messages:
        e = by_id[m.message_id or ""]
        assert m.body == e.payload.encode()
        assert m.content_type == "application/json"
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.routing_key == e.topic
        expected = {**e.headers, "topic": e.topic}
        if e.key is not None:
            expected["key"] = e.key
        assert m.headers == expected
        order.setdefault(e.key, []).append(e.id)
    assert_key_order(order)


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_rabbitmq_delivers_ids_headers_in_key_order(rabbit: Rabbit) -> None:
    queue = rabbit.queue()
    events = interleaved(("a", "b", "c", None), 6)
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    try:
        assert await broker.apublish(events) == [None] * len(events)
    finally:
        await broker.aclose()
    check_amqp_messages(rabbit.messages(queue, len(events)), events)


def test_rabbitmq_sync_publish_runs_on_a_private_loop_thread(rabbit: Rabbit) -> None:
    queue = rabbit.queue("orders")
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    first, second = interleaved(("a", "b"), 3), interleaved(("a", "b"), 3)
    try:
        assert broker.publish(first) == [None] * 6
        assert adapter_threads() == ["RabbitMQBroker"]
        assert broker.publish(second) == [None] * 6
    finally:
        broker.close()
    assert adapter_threads() == []
    check_amqp_messages(rabbit.messages(queue, 12), first + second)


def test_rabbitmq_too_large_is_poison_and_holds_back_its_key(rabbit: Rabbit) -> None:
    queue = rabbit.queue()
    big = event("a", payload="x" * 100)
    events = [event("a"), big, event("a"), event("b"), event("b")]
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange, max_bytes=64)
    try:
        results = broker.publish(events)
    finally:
        broker.close()
    assert kinds(results) == [None, "EventTooLarge", "HeldBack", None, None]
    assert failure(broker, results[1]) is Failure.POISON
    check_amqp_messages(rabbit.messages(queue, 3), [events[0], events[3], events[4]])


def test_rabbitmq_headers_must_fit_one_frame(rabbit: Rabbit) -> None:
    # Headers over frame_max would make RabbitMQ close the whole connection (FRAME_ERROR).
    queue = rabbit.queue()
    events = [
        event("a", headers={"big": "x" * 200_000}),
        event("a"),
        event("b", headers={"n" * 200: "v"}),
        event("c"),
    ]
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    try:
        results = broker.publish(events)
        assert kinds(results) == ["EventTooLarge", "HeldBack", "EventRejected", None]
        failed = [r for r in results if r is not None and not isinstance(r, HeldBack)]
        assert {broker.classify(r) for r in failed} == {Failure.POISON}
        assert broker.publish([event("c")]) == [None]  # the connection survived
    finally:
        broker.close()
    assert len(rabbit.messages(queue, 2)) == 2


def test_rabbitmq_unroutable_is_poison_while_mandatory(rabbit: Rabbit) -> None:
    queue = rabbit.queue("orders")
    events = [event("a", "nowhere"), event("a"), event("b")]
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    lax = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange, mandatory=False)
    try:
        results = broker.publish(events)
        dropped = lax.publish([event("a", "nowhere")])
    finally:
        broker.close()
        lax.close()
    assert kinds(results) == ["PublishError", "HeldBack", None]
    assert isinstance(results[0], aiormq.exceptions.PublishError)
    assert isinstance(results[0].frame, Basic.Return)
    assert results[0].frame.reply_code == 312  # NO_ROUTE
    assert broker.classify(results[0]) is Failure.POISON
    assert dropped == [None]  # without mandatory the broker drops it silently
    check_amqp_messages(rabbit.messages(queue, 1), [events[2]])


def test_rabbitmq_nack_of_a_full_queue_is_outage(rabbit: Rabbit) -> None:
    queue = rabbit.queue("orders", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    events = [event("a"), event("a"), event("a")]
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    try:
        results = broker.publish(events)
    finally:
        broker.close()
    assert kinds(results) == [None, "DeliveryError", "HeldBack"]
    assert isinstance(results[1], aiormq.exceptions.DeliveryError)
    assert isinstance(results[1].frame, Basic.Nack)
    assert broker.classify(results[1]) is Failure.OUTAGE
    check_amqp_messages(rabbit.messages(queue, 1), events[:1])


def test_rabbitmq_deleted_exchange_is_outage_then_declared_again(rabbit: Rabbit) -> None:
    queue = rabbit.queue()
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    try:
        assert broker.publish([event("a")]) == [None]
        rabbit.delete_exchange()  # the queue's binding goes with it
        results = broker.publish([event("a"), event("a"), event("b")])
        assert kinds(results) == ["ChannelNotFoundEntity", "HeldBack", "ChannelNotFoundEntity"]
        assert failure(broker, results[0]) is Failure.OUTAGE
        # The next batch declares the exchange again; the queue lost its binding.
        assert kinds(broker.publish([event("a")])) == ["PublishError"]
    finally:
        broker.close()
    assert len(rabbit.messages(queue, 1)) == 1


def test_rabbitmq_default_exchange_routes_by_queue_name(rabbit: Rabbit) -> None:
    name = f"rstest-{uuid.uuid4().hex[:12]}"
    rabbit.queue(name=name)
    events = [event("a", name), event("a", name)]
    broker = RabbitMQBroker(rabbit.url, exchange="")
    try:
        assert broker.publish(events) == [None, None]
    finally:
        broker.close()
    check_amqp_messages(rabbit.messages(name, 2), events)


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_rabbitmq_connection_of_your_own_is_left_open(rabbit: Rabbit) -> None:
    queue = rabbit.queue()
    conn = await aio_pika.connect(rabbit.url, timeout=5)
    try:
        broker = RabbitMQBroker(conn, exchange=rabbit.exchange)
        assert await broker.apublish([event("a")]) == [None]
        await broker.aclose()
        assert not conn.is_closed
    finally:
        await conn.close()
    assert len(rabbit.messages(queue, 1)) == 1


@pytest.mark.anyio
async def test_rabbitmq_apublish_from_any_loop(anyio_backend_name: str, rabbit: Rabbit) -> None:
    queue = rabbit.queue()
    broker = RabbitMQBroker(rabbit.url, exchange=rabbit.exchange)
    events = interleaved(("a", "b"), 2)
    try:
        assert await broker.apublish(events[:2]) == [None, None]
        if anyio_backend_name == "trio":
            assert adapter_threads() == ["RabbitMQBroker"]  # trio goes through its loop
        else:
            assert adapter_threads() == []  # the connection lives on this loop
            with pytest.raises(RuntimeError, match="deadlock"):
                broker.publish(events[2:])
        # Another loop in another thread: the work runs on the connection's loop.
        other = await anyio.to_thread.run_sync(asyncio.run, broker.apublish(events[2:]))
        assert other == [None, None]
    finally:
        await broker.aclose()
    assert adapter_threads() == []
    check_amqp_messages(rabbit.messages(queue, 4), events)


def outage_story(
    broker: RabbitMQBroker | NatsJetStreamBroker, proxy: FaultProxy
) -> list[OutboxEvent]:
    """Cut, refuse, blackhole and restore the path to a real server; every failure is an
    outage and returns within the timeout. Returns the events the broker confirmed."""
    sent: list[OutboxEvent] = []

    def attempt(events: list[OutboxEvent]) -> list[BaseException | None]:
        start = time.monotonic()
        try:
            results = broker.publish(events)
        except Exception as error:
            results = [error] * len(events)
        assert time.monotonic() - start < OUTAGE_TIMEOUT + SLACK
        return results

    ok = [event("a"), event("b")]
    assert attempt(ok) == [None, None]
    sent += ok

    proxy.cut()  # the open connection is reset
    results = attempt([event("a"), event("a"), event("b")])
    assert all(r is not None for r in results)
    assert {failure(broker, r) for r in results if not isinstance(r, HeldBack)} == {Failure.OUTAGE}

    results = attempt([event("a")])  # refused
    assert isinstance(results[0], BrokerUnavailable)
    assert broker.classify(results[0]) is Failure.OUTAGE

    proxy.blackhole()  # accepted, then silence: the connect times out
    results = attempt([event("a")])
    assert isinstance(results[0], BrokerUnavailable)
    assert broker.classify(results[0]) is Failure.OUTAGE

    proxy.restore()
    ok = [event("a"), event("b")]
    assert attempt(ok) == [None, None]
    sent += ok

    proxy.blackhole()  # an open connection goes silent: no confirm in time
    results = attempt([event("a"), event("a"), event("b")])
    assert kinds(results) == ["TimeoutError", "HeldBack", "TimeoutError"]
    assert failure(broker, results[0]) is Failure.OUTAGE

    proxy.restore()  # the stuck frames flow; the same connection carries on
    ok = [event("a")]
    assert attempt(ok) == [None]
    sent += ok
    return sent


@pytest.mark.slow
def test_rabbitmq_outages_through_a_fault_proxy(rabbit: Rabbit) -> None:
    queue = rabbit.queue()
    host, port = _host_port(rabbit.url, 5672)
    with FaultProxy(host, port) as proxy:
        broker = RabbitMQBroker(
            proxy.url_for(rabbit.url), exchange=rabbit.exchange, timeout=OUTAGE_TIMEOUT
        )
        try:
            sent = outage_story(broker, proxy)
        finally:
            broker.close()
    got = rabbit.messages(queue, len(sent) + 2, wait=1.0)
    # The two that timed out in the blackhole arrive late: at least once, as promised.
    assert {e.event_id for e in sent} <= {m.message_id for m in got}


# --- NATS JetStream --------------------------------------------------------------------


def check_nats_messages(messages: list[RawStreamMsg], events: list[OutboxEvent]) -> None:
    by_id = {e.event_id: e for e in events}
    assert sorted((m.headers or {}).get("Nats-Msg-Id", "") for m in messages) == sorted(by_id)
    order: dict[str | None, list[int]] = {}
    for m in messages:
        e = by_id[(m.headers or {})["Nats-Msg-Id"]]
        assert m.data == e.payload.encode()
        expected = {**e.headers, "topic": e.topic, "Nats-Msg-Id": e.event_id}
        if e.key is not None:
            expected["key"] = e.key
        assert m.headers == expected
        order.setdefault(e.key, []).append(e.id)
    assert_key_order(order)


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_nats_delivers_ids_headers_in_key_order(jet: Jet) -> None:
    stream = jet.stream()
    events = interleaved(("a", "b", "c", None), 6)
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    try:
        assert await broker.apublish(events) == [None] * len(events)
    finally:
        await broker.aclose()
    messages = jet.messages(stream)
    assert {m.subject for m in messages} == {f"{jet.prefix}.orders"}
    check_nats_messages(messages, events)


def test_nats_sync_publish_and_dedupe_by_event_id(jet: Jet) -> None:
    stream = jet.stream()
    events = interleaved(("a", "b"), 3)
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    try:
        assert broker.publish(events) == [None] * 6
        assert adapter_threads() == ["NatsJetStreamBroker"]
        assert broker.publish(events) == [None] * 6  # acked as duplicates, stored once
    finally:
        broker.close()
    assert adapter_threads() == []
    check_nats_messages(jet.messages(stream), events)


def test_nats_too_large_is_poison_and_holds_back_its_key(jet: Jet) -> None:
    stream = jet.stream()
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    assert broker.max_bytes is None  # the server's max_payload
    big = event("a", payload="x" * (1 << 20))
    events = [event("a"), big, event("a"), event("b")]
    try:
        results = broker.publish(events)
        assert kinds(results) == [None, "EventTooLarge", "HeldBack", None]
        assert isinstance(results[1], EventTooLarge)
        assert results[1].limit == 1 << 20  # nats-server's default max_payload
        assert broker.classify(results[1]) is Failure.POISON
        assert broker.publish([event("a")]) == [None]  # the connection survived
    finally:
        broker.close()
    assert len(jet.messages(stream)) == 3


def test_nats_bad_subjects_and_header_names_are_poison(jet: Jet) -> None:
    stream = jet.stream()
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    events = [
        event("a", "has space"),
        event("a"),
        event("b", "*"),
        event("c", "x..y"),
        event("d", headers={"bad name": "v"}),
        event("e", headers={"fine": "v"}),
    ]
    try:
        results = broker.publish(events)
    finally:
        broker.close()
    assert kinds(results) == ["EventRejected", "HeldBack", *["EventRejected"] * 3, None]
    assert failure(broker, results[0]) is Failure.POISON
    check_nats_messages(jet.messages(stream), events[5:])


def test_nats_no_stream_is_outage(jet: Jet) -> None:
    # The server answers "no responders" (503) alike for a subject no stream captures and
    # while JetStream or the stream's leader is unavailable: documented as an outage.
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject, timeout=OUTAGE_TIMEOUT)
    try:
        start = time.monotonic()
        results = broker.publish([event("a"), event("a"), event("b")])
        assert time.monotonic() - start < OUTAGE_TIMEOUT  # an answer, not a timeout
    finally:
        broker.close()
    assert kinds(results) == ["NoStreamResponseError", "HeldBack", "NoStreamResponseError"]
    assert failure(broker, results[0]) is Failure.OUTAGE


def test_nats_full_stream_is_outage(jet: Jet) -> None:
    stream = jet.stream(max_msgs=1, discard="new")
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    try:
        results = broker.publish([event("a"), event("a"), event("a")])
    finally:
        broker.close()
    assert kinds(results) == [None, "ServiceUnavailableError", "HeldBack"]
    error = results[1]
    assert isinstance(error, nats.js.errors.ServiceUnavailableError)
    assert (error.code, error.err_code) == (503, 10077)  # maximum messages exceeded
    assert broker.classify(error) is Failure.OUTAGE
    assert len(jet.messages(stream)) == 1


def test_nats_stream_message_limit_is_poison(jet: Jet) -> None:
    stream = jet.stream(max_msg_size=200)
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    try:
        results = broker.publish([event("a", payload="x" * 300), event("a"), event("b")])
    finally:
        broker.close()
    assert kinds(results) == ["BadRequestError", "HeldBack", None]
    error = results[0]
    assert isinstance(error, nats.js.errors.BadRequestError)
    assert (error.code, error.err_code) == (400, 10054)  # message size exceeds maximum
    assert broker.classify(error) is Failure.POISON
    assert len(jet.messages(stream)) == 1


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_nats_client_of_your_own_is_left_open(jet: Jet) -> None:
    stream = jet.stream()
    nc = await nats.connect(jet.url, connect_timeout=5)
    try:
        broker = NatsJetStreamBroker(nc, subject=jet.subject)
        with pytest.raises(RuntimeError, match="apublish"):
            await anyio.to_thread.run_sync(broker.publish, [event("a")])  # loop not known yet
        assert await broker.apublish([event("a")]) == [None]
        await broker.aclose()
        assert nc.is_connected
    finally:
        await nc.close()
    assert len(jet.messages(stream)) == 1


@pytest.mark.anyio
async def test_nats_apublish_from_any_loop(anyio_backend_name: str, jet: Jet) -> None:
    stream = jet.stream()
    broker = NatsJetStreamBroker(jet.url, subject=jet.subject)
    events = interleaved(("a", "b"), 2)
    try:
        assert await broker.apublish(events[:2]) == [None, None]
        expected = ["NatsJetStreamBroker"] if anyio_backend_name == "trio" else []
        assert adapter_threads() == expected
        other = await anyio.to_thread.run_sync(asyncio.run, broker.apublish(events[2:]))
        assert other == [None, None]
    finally:
        await broker.aclose()
    assert adapter_threads() == []
    check_nats_messages(jet.messages(stream), events)


@pytest.mark.slow
def test_nats_outages_through_a_fault_proxy(jet: Jet) -> None:
    stream = jet.stream()
    host, port = _host_port(jet.url, 4222)
    with FaultProxy(host, port) as proxy:
        broker = NatsJetStreamBroker(
            proxy.url_for(jet.url), subject=jet.subject, timeout=OUTAGE_TIMEOUT
        )
        try:
            sent = outage_story(broker, proxy)
        finally:
            broker.close()
    got = jet.messages(stream)
    assert {e.event_id for e in sent} <= {(m.headers or {}).get("Nats-Msg-Id") for m in got}


# --- no server -------------------------------------------------------------------------


def test_rabbitmq_failure_table() -> None:
    broker = RabbitMQBroker("amqp://127.0.0.1:1/")
    returned = aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError)
    cases: list[tuple[BaseException, Failure]] = [
        (returned, Failure.POISON),
        (aiormq.exceptions.DeliveryError(None, Basic.Nack()), Failure.OUTAGE),
        (aiormq.exceptions.ChannelPreconditionFailed("too big"), Failure.POISON),
        (aiormq.exceptions.ChannelNotFoundEntity("no exchange"), Failure.OUTAGE),
        (aiormq.exceptions.ChannelAccessRefused("no"), Failure.OUTAGE),
        (aiormq.exceptions.ChannelInvalidStateError("closed"), Failure.OUTAGE),
        (aiormq.exceptions.AMQPConnectionError("reset"), Failure.OUTAGE),
        (aiormq.exceptions.ConnectionFrameError("frame"), Failure.OUTAGE),
        (ConnectionRefusedError(), Failure.OUTAGE),
        (asyncio.TimeoutError(), Failure.OUTAGE),
        (BrokerUnavailable("down"), Failure.OUTAGE),
        (CircuitOpenError("outbox", 1.0), Failure.OUTAGE),
        (EventTooLarge(10, 5), Failure.POISON),
        (EventRejected("no"), Failure.POISON),
        (aiormq.exceptions.AMQPError("?"), Failure.UNKNOWN),
        (RuntimeError("?"), Failure.UNKNOWN),
    ]
    for error, expected in cases:
        assert broker.classify(error) is expected, error
    assert RabbitMQBroker.FAILURES is broker.FAILURES


def test_nats_failure_table() -> None:
    broker = NatsJetStreamBroker("nats://127.0.0.1:1")
    cases: list[tuple[BaseException, Failure]] = [
        (nats.js.errors.NoStreamResponseError(), Failure.OUTAGE),
        (nats.js.errors.ServiceUnavailableError(code=503, err_code=10077), Failure.OUTAGE),
        (nats.js.errors.ServerError(code=500), Failure.OUTAGE),
        (nats.js.errors.BadRequestError(code=400, err_code=10054), Failure.POISON),
        (nats.js.errors.NotFoundError(code=404), Failure.POISON),
        (nats.errors.MaxPayloadError(), Failure.POISON),
        (nats.errors.BadHeaderError("x y"), Failure.POISON),
        (nats.errors.TimeoutError(), Failure.OUTAGE),
        (nats.errors.NoRespondersError(), Failure.OUTAGE),
        (nats.errors.ConnectionClosedError(), Failure.OUTAGE),
        (nats.errors.UnexpectedEOF(), Failure.OUTAGE),
        (nats.errors.OutboundBufferLimitError(), Failure.OUTAGE),
        (nats.errors.NoServersError(), Failure.OUTAGE),
        (ConnectionResetError(), Failure.OUTAGE),
        (BrokerUnavailable("down"), Failure.OUTAGE),
        (EventTooLarge(10, 5), Failure.POISON),
        (nats.errors.Error("?"), Failure.UNKNOWN),
        (RuntimeError("?"), Failure.UNKNOWN),
    ]
    for error, expected in cases:
        assert broker.classify(error) is expected, error
    assert NatsJetStreamBroker.FAILURES is broker.FAILURES


@pytest.mark.parametrize(
    ("module", "library", "extra"),
    [
        ("resilience.integrations.outbox.rabbitmq", "aio_pika", "rabbitmq"),
        ("resilience.integrations.outbox.nats", "nats", "nats"),
    ],
)
def test_a_missing_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, library: str, extra: str
) -> None:
    monkeypatch.delitem(sys.modules, module)
    for name in [m for m in sys.modules if m == library or m.startswith(f"{library}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=rf"pip install 'resilience\[{extra}\]'"):
        importlib.import_module(module)


def test_constructors_check_their_arguments() -> None:
    with pytest.raises(TypeError, match="connection"):
        RabbitMQBroker(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        RabbitMQBroker("amqp://127.0.0.1/", timeout=0)
    with pytest.raises(ValueError, match="max_bytes"):
        RabbitMQBroker("amqp://127.0.0.1/", max_bytes=0)
    with pytest.raises(TypeError, match="mandatory"):
        RabbitMQBroker("amqp://127.0.0.1/", mandatory=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="connection"):
        NatsJetStreamBroker(b"nats://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="subject"):
        NatsJetStreamBroker("nats://127.0.0.1", subject="fixed")
    with pytest.raises(ValueError, match="timeout"):
        NatsJetStreamBroker("nats://127.0.0.1", timeout=-1)


def test_close_before_use_is_a_no_op() -> None:
    for broker in (
        RabbitMQBroker("amqp://127.0.0.1:1/"),
        NatsJetStreamBroker("nats://127.0.0.1:1"),
    ):
        broker.close()
        broker.close()
    assert adapter_threads() == []
