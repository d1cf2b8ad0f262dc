"""Brokers behind one small protocol, each with its failure classification table.

``publish(events)`` sends a batch and returns one entry per event: ``None`` when the broker
took it, else the exception. Raising instead means the whole batch failed. ``classify``
turns an exception into a :class:`Failure`; the publisher does the rest.

Every adapter encodes the whole batch before sending any of it. An event that fails to
encode (or is too large) is reported, and the later events of its key in the batch are not
sent but reported as :class:`HeldBack`, so they cannot overtake it.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import anyio.to_thread
import redis
import redis.asyncio
from redis.exceptions import ResponseError

from resilience import _redis
from resilience.errors import CircuitOpenError
from resilience.integrations.outbox._model import (
    BrokerUnavailable,
    EventRejected,
    EventTooLarge,
    Failure,
    OutboxEvent,
    positive_int,
)

__all__ = [
    "Broker",
    "HeldBack",
    "InMemoryBroker",
    "RedisStreamsBroker",
    "classify_with",
]

E = TypeVar("E")
Results = list[BaseException | None]
FailureTable = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], Failure]]


class HeldBack(Exception):
    """Not sent: an earlier event of the same key in this batch failed before sending.
    The publisher gives the row back without counting an attempt."""


@runtime_checkable
class Broker(Protocol):
    def publish(self, events: Sequence[OutboxEvent]) -> Results: ...
    async def apublish(self, events: Sequence[OutboxEvent]) -> Results: ...
    def classify(self, error: BaseException) -> Failure: ...


#: Failures every adapter shares, checked after the adapter's own rows.
COMMON_FAILURES: Final[FailureTable] = (
    (CircuitOpenError, Failure.OUTAGE),
    (BrokerUnavailable, Failure.OUTAGE),
    ((ConnectionError, TimeoutError), Failure.OUTAGE),
    (EventRejected, Failure.POISON),
    ((TypeError, ValueError, UnicodeError, OverflowError), Failure.POISON),
    (OSError, Failure.OUTAGE),
)


def classify_with(table: FailureTable, error: BaseException) -> Failure:
    """The first row of ``table`` (then the common rows) that matches ``error``."""
    for types, failure in (*table, *COMMON_FAILURES):
        if isinstance(error, types):
            return failure
    return Failure.UNKNOWN


def encode_batch(
    events: Sequence[OutboxEvent], encode: Callable[[OutboxEvent], E]
) -> tuple[list[tuple[int, E]], Results]:
    """Encode every event up front: (index, encoded) pairs to send, and the results so far.

    A failed encoding holds back the later events of its key."""
    results: Results = [None] * len(events)
    ready: list[tuple[int, E]] = []
    failed_keys: set[str] = set()
    for index, event in enumerate(events):
        if event.key is not None and event.key in failed_keys:
            results[index] = HeldBack(f"held back behind a failed event of key {event.key!r}")
            continue
        try:
            ready.append((index, encode(event)))
        except Exception as error:
            results[index] = error
            if event.key is not None:
                failed_keys.add(event.key)
    return ready, results


class InMemoryBroker:
    """A broker in a list, for the demo and for tests of code that publishes.

    ``down`` makes every publish fail as an outage; ``reject`` makes matching events fail
    as poison. ``contacts`` counts publish calls that reached the broker.
    """

    def __init__(self, *, max_bytes: int | None = None) -> None:
        self.max_bytes = None if max_bytes is None else positive_int("max_bytes", max_bytes)
        self.messages: list[OutboxEvent] = []
        self.down = False
        self.contacts = 0
        self._reject: Callable[[OutboxEvent], bool] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"InMemoryBroker(messages={len(self.messages)}, down={self.down})"

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Be down for the duration of the block."""
        self.down = True
        try:
            yield
        finally:
            self.down = False

    def reject(self, predicate: Callable[[OutboxEvent], bool] | None) -> None:
        """Refuse events for which ``predicate`` is true (``None`` accepts all again)."""
        self._reject = predicate

    def _encode(self, event: OutboxEvent) -> OutboxEvent:
        if self.max_bytes is not None and len(event.payload) > self.max_bytes:
            raise EventTooLarge(len(event.payload), self.max_bytes)
        if self._reject is not None and self._reject(event):
            raise EventRejected(f"rejected by the in-memory broker: {event.event_id}")
        return event

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        with self._lock:
            self.contacts += 1
            if self.down:
                raise BrokerUnavailable("the in-memory broker is down")
            ready, results = encode_batch(events, self._encode)
            self.messages.extend(event for _, event in ready)
        return results

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        return self.publish(events)

    def classify(self, error: BaseException) -> Failure:
        return classify_with((), error)

    def by_key(self) -> dict[str | None, list[OutboxEvent]]:
        """Published events grouped by key, in publish order."""
        grouped: dict[str | None, list[OutboxEvent]] = {}
        for event in list(self.messages):
            grouped.setdefault(event.key, []).append(event)
        return grouped


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


_XADD_FORMAT: Final = (
    b"*%d\r\n$4\r\nXADD\r\n%s%s$1\r\n*\r\n"
    b"$8\r\nevent_id\r\n$%d\r\n%s\r\n$5\r\ntopic\r\n$%d\r\n%s\r\n"
    b"$7\r\npayload\r\n$%d\r\n%s\r\n$7\r\ncreated\r\n$%d\r\n%s\r\n%s"
)


# Error replies that mean "the server cannot take writes right now", not "this event".
_REDIS_BUSY: Final = (
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
)


def _redis_reply_failure(error: ResponseError) -> Failure:
    code = str(error).split(" ", 1)[0].upper()
    return Failure.OUTAGE if code in _REDIS_BUSY else Failure.POISON


class RedisStreamsBroker:
    """Publishes with ``XADD`` to one stream per topic, one pipelined round trip a batch.

    Each entry carries ``event_id`` (for consumer dedupe), ``topic``, ``key`` (when set),
    ``payload`` (the JSON text), ``headers`` (JSON, when any) and ``created``. A topic's
    entries keep the relay's order, so per-key order holds within the stream.

    Failure table: connection errors, timeouts and the busy replies (``OOM``,
    ``READONLY``, ``LOADING``, ``MASTERDOWN``, ``BUSY``, ``TRYAGAIN``, ``CLUSTERDOWN``,
    ``NOREPLICAS``, ``MISCONF``) are outages; other error replies (``WRONGTYPE`` on the
    stream key, say), events over ``max_bytes`` and encoding errors are poison.
    """

    FAILURES: Final[FailureTable] = (
        (redis.exceptions.BusyLoadingError, Failure.OUTAGE),
        ((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError), Failure.OUTAGE),
        (redis.exceptions.DataError, Failure.POISON),
    )

    def __init__(
        self,
        client: redis.Redis | redis.asyncio.Redis,
        *,
        stream: str = "outbox:{topic}",
        maxlen: int | None = None,
        max_bytes: int | None = 1_048_576,
        timeout: float = 5.0,
    ) -> None:
        self._is_async = _redis.check_client(client)
        if not isinstance(stream, str) or "{topic}" not in stream:
            raise ValueError(f"stream must be a str containing '{{topic}}', got {stream!r}")
        self.stream = stream
        self.maxlen = None if maxlen is None else positive_int("maxlen", maxlen)
        self.max_bytes = None if max_bytes is None else positive_int("max_bytes", max_bytes)
        self.timeout = _redis.check_timeout(timeout)
        # Our own pool with the timeout and no retries: a blackholed broker costs one
        # timeout per batch, and the breaker takes it from there.
        self._commands = _redis.Commands(client, self.timeout)
        self._client = self._commands.client
        # Cluster streams live in different slots: those batches go through a pipeline.
        self._packed = self._commands.owned
        trim = (
            b""
            if self.maxlen is None
            else _bulk(b"MAXLEN") + _bulk(b"~") + _bulk(str(self.maxlen).encode())
        )
        self._trim_args = 0 if self.maxlen is None else 3
        self._trim = trim
        self._names: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"RedisStreamsBroker(stream={self.stream!r})"

    def stream_name(self, topic: str) -> str:
        return self.stream.replace("{topic}", topic)

    def _name(self, topic: str) -> bytes:
        name = self._names.get(topic)
        if name is None:
            name = self._names[topic] = _bulk(self.stream_name(topic).encode())
        return name

    def _encode(self, event: OutboxEvent) -> bytes:
        """The XADD command as RESP bytes. One format operation per event: redis-py's
        generic packer costs five times as much, and this measures the size on the way."""
        payload = event.payload.encode()
        eid = event.event_id.encode()
        topic = event.topic.encode()
        created = repr(event.created).encode()
        argc = 11 + self._trim_args
        extra = b""
        size = len(payload) + len(eid) + len(topic) + len(created) + 26
        if event.key is not None:
            key = event.key.encode()
            extra = b"$3\r\nkey\r\n$%d\r\n%s\r\n" % (len(key), key)
            argc += 2
            size += len(key) + 3
        if event.headers:
            headers = json.dumps(dict(event.headers), separators=(",", ":")).encode()
            extra += b"$7\r\nheaders\r\n$%d\r\n%s\r\n" % (len(headers), headers)
            argc += 2
            size += len(headers) + 7
        if self.max_bytes is not None and size > self.max_bytes:
            raise EventTooLarge(size, self.max_bytes)
        return _XADD_FORMAT % (
            argc, self._name(event.topic), self._trim,
            len(eid), eid, len(topic), topic, len(payload), payload, len(created), created,
            extra,
        )  # fmt: skip

    def _fields(self, event: OutboxEvent) -> dict[str, str]:
        fields = {
            "event_id": event.event_id,
            "topic": event.topic,
            "payload": event.payload,
            "created": repr(event.created),
        }
        if event.key is not None:
            fields["key"] = event.key
        if event.headers:
            fields["headers"] = json.dumps(dict(event.headers), separators=(",", ":"))
        return fields

    def _pipeline(self, events: Sequence[OutboxEvent], sent: list[int]) -> Any:
        pipe = self._client.pipeline(transaction=False)
        for index in sent:
            event = events[index]
            pipe.xadd(
                self.stream_name(event.topic),
                self._fields(event),
                maxlen=self.maxlen,
                approximate=True,
            )
        return pipe

    @staticmethod
    def _merge(results: Results, sent: list[int], replies: list[Any]) -> Results:
        for index, reply in zip(sent, replies, strict=True):
            if isinstance(reply, BaseException):
                results[index] = reply
        return results

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        if self._is_async:
            raise TypeError("publish() needs a sync redis client; use apublish()")
        ready, results = encode_batch(events, self._encode)
        sent = [index for index, _ in ready]
        if not sent:
            return results
        if self._packed:
            replies = self._commands.run_many(b"".join(cmd for _, cmd in ready), len(sent))
        else:
            with self._pipeline(events, sent) as pipe:
                replies = pipe.execute(raise_on_error=False)
        return self._merge(results, sent, replies)

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        if not self._is_async:
            return await anyio.to_thread.run_sync(self.publish, events)
        ready, results = encode_batch(events, self._encode)
        sent = [index for index, _ in ready]
        if not sent:
            return results
        if self._packed:
            packed = b"".join(cmd for _, cmd in ready)
            replies = await self._commands.arun_many(packed, len(sent))
        else:
            async with self._pipeline(events, sent) as pipe:
                replies = await pipe.execute(raise_on_error=False)
        return self._merge(results, sent, replies)

    def classify(self, error: BaseException) -> Failure:
        if isinstance(error, ResponseError) and not isinstance(
            error, redis.exceptions.BusyLoadingError
        ):
            return _redis_reply_failure(error)
        return classify_with(self.FAILURES, error)

    def close(self) -> None:
        """Disconnect the broker's own pool (the client you passed stays open)."""
        if self._is_async:
            raise TypeError("close() cannot close an asyncio client's pool; use aclose()")
        self._commands.close()

    async def aclose(self) -> None:
        if self._is_async:
            await self._commands.aclose()
        else:
            self.close()
