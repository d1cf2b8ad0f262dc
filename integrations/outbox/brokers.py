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
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import anyio.to_thread

from resilience.integrations.outbox._async_streams import AsyncStreamsOps
from resilience.integrations.outbox._model import (
    BrokerUnavailable,
    EventRejected,
    EventTooLarge,
    Failure,
    HeldBack,
    OutboxEvent,
    Results,
    classify_with,
    encode_batch,
    positive_int,
)
from resilience.integrations.outbox._sync_streams import SyncStreamsOps

__all__ = [
    "Broker",
    "HeldBack",
    "InMemoryBroker",
    "RedisStreamsBroker",
    "classify_with",
]


@runtime_checkable
class Broker(Protocol):
    def publish(self, events: Sequence[OutboxEvent]) -> Results: ...
    async def apublish(self, events: Sequence[OutboxEvent]) -> Results: ...
    def classify(self, error: BaseException) -> Failure: ...


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


class RedisStreamsBroker(SyncStreamsOps, AsyncStreamsOps):
    """Publishes with ``XADD`` to one stream per topic, one pipelined round trip a batch.

    Each entry carries ``event_id`` (for consumer dedupe), ``topic``, ``key`` (when set),
    ``payload`` (the JSON text), ``headers`` (JSON, when any) and ``created``. A topic's
    entries keep the relay's order, so per-key order holds within the stream.

    Failure table: connection errors, timeouts and the busy replies (``OOM``,
    ``READONLY``, ``LOADING``, ``MASTERDOWN``, ``BUSY``, ``TRYAGAIN``, ``CLUSTERDOWN``,
    ``NOREPLICAS``, ``MISCONF``) are outages; other error replies (``WRONGTYPE`` on the
    stream key, say), events over ``max_bytes`` and encoding errors are poison.
    """

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        if self._is_async:
            raise TypeError("publish() needs a sync redis client; use apublish()")
        return self._send(events)

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        if not self._is_async:
            return await anyio.to_thread.run_sync(self.publish, events)
        return await self._asend(events)

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
