"""Consumer-side dedupe for at-least-once delivery: an inbox table keyed by event id.

The outbox may deliver an event more than once (a relay that published and then lost its
lease, a broker that timed out after taking the message). A consumer records each event id
in the same transaction as the work the event causes; a second delivery finds the id and
is skipped, and a rolled-back attempt leaves no record, so the retry runs the work.

>>> with conn:                                        # the consumer's transaction
...     if inbox.first_time(conn, message["event_id"]):
...         apply(message)

``inbox.consume(conn, event_id, headers)`` does the same inside an OpenTelemetry consumer
span that continues the trace the producer's ``enqueue`` stamped into the headers.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

from resilience import clock as _clock
from resilience.integrations.outbox._model import check_identifier, positive
from resilience.integrations.outbox._sql import read_ddl
from resilience.integrations.outbox._trace import consumer_span

__all__ = ["Inbox"]


class Inbox:
    """Remembers which event ids a ``consumer`` has handled, per database connection.

    Works on ``sqlite3`` and ``psycopg`` connections (sync), and ``psycopg``
    async connections through the ``a``-prefixed methods. Never commits.
    ``tracer_provider`` is the OpenTelemetry provider for :meth:`consume`'s spans (the
    global one by default).
    """

    def __init__(
        self,
        *,
        consumer: str = "default",
        table: str = "resilience_inbox",
        schema: str | None = None,
        clock: _clock.Clock | None = None,
        tracer_provider: Any = None,
    ) -> None:
        if not isinstance(consumer, str) or not consumer:
            raise ValueError(f"consumer must be a non-empty str, got {consumer!r}")
        check_identifier("table", table)
        if schema is not None:
            check_identifier("schema", schema)
        self.consumer = consumer
        self.table = table
        self.qualified = f"{schema}.{table}" if schema else table
        self._clock = _clock.resolve(clock)
        self.tracer_provider = tracer_provider

    def __repr__(self) -> str:
        return f"Inbox(consumer={self.consumer!r}, table={self.qualified!r})"

    def _dialect(self, conn: object) -> str:
        if isinstance(conn, sqlite3.Connection):
            return "sqlite"
        module = type(conn).__module__
        if module.startswith("psycopg"):
            return "postgres"
        raise TypeError(f"conn must be a sqlite3 or psycopg connection, got {type(conn).__name__}")

    def _ddl(self, conn: object) -> str:
        dialect = self._dialect(conn)
        name = "sqlite_inbox.sql" if dialect == "sqlite" else "postgres_inbox.sql"
        return read_ddl(name, table=self.qualified, name=self.table)

    # Each operation is one statement: the helpers check the connection and build it, so
    # the sync and async methods only run it on the caller's connection.

    def _record(self, conn: object, event_id: str) -> tuple[str, tuple[Any, ...]]:
        mark = "?" if self._dialect(conn) == "sqlite" else "%s"
        sql = (
            f"INSERT INTO {self.qualified} (consumer, event_id, received) "
            f"VALUES ({mark}, {mark}, {mark}) ON CONFLICT DO NOTHING"
        )
        return sql, (self.consumer, str(event_id), self._clock.time())

    def _forget(self, conn: object, older_than: float) -> tuple[str, tuple[Any, ...]]:
        mark = "?" if self._dialect(conn) == "sqlite" else "%s"
        sql = f"DELETE FROM {self.qualified} WHERE consumer = {mark} AND received < {mark}"
        cutoff = self._clock.time() - positive("older_than", older_than)
        return sql, (self.consumer, cutoff)

    def create_schema(self, conn: Any) -> None:
        """Create the inbox table on ``conn`` (committed by the caller, or by sqlite3's
        executescript, which commits first)."""
        ddl = self._ddl(conn)
        if isinstance(conn, sqlite3.Connection):
            conn.executescript(ddl)
        else:
            conn.execute(ddl)

    async def acreate_schema(self, conn: Any) -> None:
        ddl = self._ddl(conn)
        await conn.execute(ddl)

    def first_time(self, conn: Any, event_id: str) -> bool:
        """Record ``event_id``; True if this consumer had not seen it before."""
        sql, params = self._record(conn, event_id)
        return bool(conn.execute(sql, params).rowcount == 1)

    async def afirst_time(self, conn: Any, event_id: str) -> bool:
        sql, params = self._record(conn, event_id)
        cursor = await conn.execute(sql, params)
        return bool(cursor.rowcount == 1)

    @contextlib.contextmanager
    def consume(
        self, conn: Any, event_id: str, headers: object = None, *, topic: str | None = None
    ) -> Iterator[bool]:
        """:meth:`first_time` for the block's work, inside a consumer span when
        OpenTelemetry is in use: a child of the producer's span (from ``traceparent`` in
        ``headers``) or, within a span of your own, a link to it. ``headers`` are the
        delivered message's, in its broker's form (see ``trace_carrier``). Yields True
        the first time; an exception in the block is recorded on the span.

        >>> with conn, inbox.consume(conn, msg.event_id, msg.headers, topic=msg.topic) as first:
        ...     if first:
        ...         apply(msg)
        """
        with consumer_span(
            headers,
            consumer=self.consumer,
            event_id=str(event_id),
            topic=topic,
            tracer_provider=self.tracer_provider,
        ) as span:
            first = self.first_time(conn, event_id)
            if span is not None:
                span.set_attribute("resilience.inbox.duplicate", not first)
            yield first

    @contextlib.asynccontextmanager
    async def aconsume(
        self, conn: Any, event_id: str, headers: object = None, *, topic: str | None = None
    ) -> AsyncIterator[bool]:
        with consumer_span(
            headers,
            consumer=self.consumer,
            event_id=str(event_id),
            topic=topic,
            tracer_provider=self.tracer_provider,
        ) as span:
            first = await self.afirst_time(conn, event_id)
            if span is not None:
                span.set_attribute("resilience.inbox.duplicate", not first)
            yield first

    def purge(self, conn: Any, older_than: float) -> int:
        """Forget ids recorded more than ``older_than`` seconds ago (longer than any
        redelivery can take: the outbox lease plus the broker's own redelivery window)."""
        sql, params = self._forget(conn, older_than)
        return int(conn.execute(sql, params).rowcount)

    async def apurge(self, conn: Any, older_than: float) -> int:
        sql, params = self._forget(conn, older_than)
        cursor = await conn.execute(sql, params)
        return int(cursor.rowcount)
