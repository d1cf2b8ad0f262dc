"""A transactional outbox relayed to a broker through a circuit breaker.

Write events with ``store.enqueue(conn, ...)`` in the same transaction as the business
data; run an :class:`OutboxPublisher` (one or many, threads or processes) to relay them.
SQLite is the embedded default; PostgreSQL needs ``resilience[postgres]``.
"""

from typing import TYPE_CHECKING

from resilience.integrations.outbox._model import (
    Backoff,
    BrokerUnavailable,
    DeadEvent,
    EventRejected,
    EventTooLarge,
    Failure,
    OutboxEvent,
    OutboxStats,
    RowFailure,
    Status,
)
from resilience.integrations.outbox._store import OutboxStore
from resilience.integrations.outbox.brokers import (
    Broker,
    HeldBack,
    InMemoryBroker,
    RedisStreamsBroker,
    classify_with,
)
from resilience.integrations.outbox.inbox import Inbox
from resilience.integrations.outbox.postgres import PostgresOutboxStore
from resilience.integrations.outbox.publisher import BatchResult, OutboxPublisher, ReplayResult
from resilience.integrations.outbox.sqlite import SqliteOutboxStore

if TYPE_CHECKING:
    from resilience.integrations.outbox.nats import NatsJetStreamBroker as NatsJetStreamBroker
    from resilience.integrations.outbox.rabbitmq import RabbitMQBroker as RabbitMQBroker

# The RabbitMQ and NATS adapters import their client libraries (extras), so they load
# only when asked for by name (and stay out of __all__: a star import must not need them).
_LAZY = {
    "RabbitMQBroker": "resilience.integrations.outbox.rabbitmq",
    "NatsJetStreamBroker": "resilience.integrations.outbox.nats",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Backoff",
    "BatchResult",
    "Broker",
    "BrokerUnavailable",
    "DeadEvent",
    "EventRejected",
    "EventTooLarge",
    "Failure",
    "HeldBack",
    "InMemoryBroker",
    "Inbox",
    "OutboxEvent",
    "OutboxPublisher",
    "OutboxStats",
    "OutboxStore",
    "PostgresOutboxStore",
    "RedisStreamsBroker",
    "ReplayResult",
    "RowFailure",
    "SqliteOutboxStore",
    "Status",
    "classify_with",
]
