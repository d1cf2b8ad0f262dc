"""A transactional outbox relayed to a broker through a circuit breaker.

Write events with ``store.enqueue(conn, ...)`` in the same transaction as the business
data; run an :class:`OutboxPublisher` (one or many, threads or processes) to relay them.
SQLite is the embedded default; PostgreSQL needs ``resilience[postgres]``. ``enqueue`` also
takes a SQLAlchemy session or connection (``resilience[sqlalchemy]``; the table for
Alembic is ``outbox_table`` in ``resilience.integrations.outbox.sqlalchemy``), and stamps
the active OpenTelemetry span's W3C trace context into the event's headers.
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
from resilience.integrations.outbox.publisher import (
    BatchResult,
    Delivered,
    OutboxPublisher,
    ReplayResult,
)
from resilience.integrations.outbox.sqlite import SqliteOutboxStore

if TYPE_CHECKING:
    from resilience.integrations.outbox.kafka import KafkaBroker as KafkaBroker
    from resilience.integrations.outbox.nats import NatsJetStreamBroker as NatsJetStreamBroker
    from resilience.integrations.outbox.rabbitmq import RabbitMQBroker as RabbitMQBroker
    from resilience.integrations.outbox.sqlalchemy import outbox_table as outbox_table

# The RabbitMQ and NATS adapters import their client libraries (extras), so they load
# only when asked for by name (and stay out of __all__: a star import must not need them).
_LAZY = {
    "KafkaBroker": "resilience.integrations.outbox.kafka",
    "RabbitMQBroker": "resilience.integrations.outbox.rabbitmq",
    "NatsJetStreamBroker": "resilience.integrations.outbox.nats",
    "outbox_table": "resilience.integrations.outbox.sqlalchemy",  # SQLAlchemy, likewise
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
    "Delivered",
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
