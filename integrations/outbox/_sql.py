"""What the outbox stores build their operations on: a dialect's transactions and SQL
text, the DDL files, and running one transaction here or in a worker thread."""

from __future__ import annotations

import abc
import functools
import importlib.resources
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import anyio.to_thread

from resilience import clock as _clock
from resilience.integrations.outbox._model import OutboxEvent, decode_headers, encode_event
from resilience.integrations.outbox._trace import current_headers

__all__ = ["StoreBase", "Tx", "by_id", "decode_event", "is_sqlalchemy", "read_ddl"]

T = TypeVar("T")


class Tx(Protocol):
    """One open transaction of a dialect."""

    def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]: ...
    def execute(self, sql: str, params: dict[str, Any]) -> int: ...
    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> int: ...


def read_ddl(filename: str, /, **names: str) -> str:
    text = (
        importlib.resources.files("resilience.integrations.outbox")
        .joinpath("sql")
        .joinpath(filename)
        .read_text(encoding="utf-8")
    )
    for placeholder, value in names.items():
        text = text.replace("{" + placeholder + "}", value)
    return text


def decode_event(row: tuple[Any, ...]) -> OutboxEvent:
    return OutboxEvent(
        int(row[0]),
        str(row[1]),
        row[2],
        row[3],
        row[4],
        decode_headers(row[5]),
        float(row[6]),
        int(row[7]),
    )


def by_id(event: OutboxEvent) -> int:
    return event.id


def is_sqlalchemy(conn: object) -> bool:
    """A SQLAlchemy session or connection (or a subclass of one), told without importing
    SQLAlchemy: a process that never imported it cannot have one."""
    return "sqlalchemy" in sys.modules and any(
        cls.__module__.startswith("sqlalchemy.") for cls in type(conn).__mro__
    )


class StoreBase(abc.ABC):
    """State and the dialect's part of a store; the operations are in ``_async_store.py``."""

    #: Statement texts with the table name filled in; see the dialect modules.
    sql: dict[str, str]

    def __init__(self, table: str, clock: _clock.Clock | None) -> None:
        self.table = table
        self._clock = _clock.resolve(clock) if clock is not None else None

    # -- what a dialect provides ---------------------------------------------------------

    @abc.abstractmethod
    def _transaction(
        self, *, claim: bool = False, read: bool = False, durable: bool = False
    ) -> AbstractContextManager[Tx]:
        """A transaction; ``claim=True`` also serializes it against other claims,
        ``read=True`` promises it writes nothing (SQLite then takes no write lock), and
        ``durable=True`` waits for the commit to be on disk (operator actions)."""

    @abc.abstractmethod
    def create_schema(self) -> None:
        """Create the table, its indexes (and on PostgreSQL its NOTIFY trigger); idempotent."""

    async def acreate_schema(self) -> None:
        await anyio.to_thread.run_sync(self.create_schema)

    @abc.abstractmethod
    def close(self) -> None: ...

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    @abc.abstractmethod
    def _insert(self, conn: Any, row: dict[str, Any]) -> None:
        """Run the insert on the caller's connection (checking it is the right kind)."""

    async def _ainsert(self, conn: Any, row: dict[str, Any]) -> None:
        self._insert(conn, row)

    def _insert_sqlalchemy(self, conn: Any, row: dict[str, Any]) -> None:
        """Run the insert on a SQLAlchemy ``Session`` or ``Connection``."""
        from resilience.integrations.outbox import sqlalchemy as sa_outbox

        sa_outbox.insert(self, conn, row)

    async def _ainsert_sqlalchemy(self, conn: Any, row: dict[str, Any]) -> None:
        """Run the insert on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection`` (or a
        sync one)."""
        from resilience.integrations.outbox import sqlalchemy as sa_outbox

        await sa_outbox.ainsert(self, conn, row)

    def _ids(self, ids: Sequence[int]) -> Any:
        """Ids as the dialect binds a list (a JSON array for SQLite, an array for psycopg)."""
        return json.dumps([int(i) for i in ids])

    # -- where a transaction runs: the one difference between sync and async -------------

    def _run(self, work: Callable[[Tx], T], **kind: bool) -> T:
        """``work`` in one transaction, in this thread."""
        with self._transaction(**kind) as tx:
            return work(tx)

    async def _arun(self, work: Callable[[Tx], T], **kind: bool) -> T:
        """``work`` in one transaction, in a worker thread: the drivers are sync, and this
        works under asyncio and trio alike."""
        return await anyio.to_thread.run_sync(functools.partial(self._run, work, **kind))

    def _run_claim(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of one claim, in this thread: one claim transaction (a dialect may
        look further in a second one)."""
        return self._run(lambda tx: tx.fetch(self.sql["claim"], params), claim=True)

    async def _arun_claim(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return await anyio.to_thread.run_sync(self._run_claim, params)

    # -- pure ----------------------------------------------------------------------------

    def _now(self) -> float | None:
        """The time to stamp, or ``None`` for the database's own clock."""
        return self._clock.time() if self._clock is not None else None

    def _row(
        self, topic: object, key: object, payload: object, headers: object, event_id: object,
        delay: object,
    ) -> dict[str, Any]:  # fmt: skip
        # The active span's W3C context travels in the headers, written in this same
        # transaction; headers the caller gives win. None (at once) without OpenTelemetry.
        trace = current_headers()
        if trace is not None:
            if headers is None:
                headers = trace
            elif isinstance(headers, Mapping):
                headers = {**trace, **headers}
        eid, topic_, key_, body, head = encode_event(topic, key, payload, headers, event_id)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
            raise ValueError(f"delay must be a number of seconds >= 0, got {delay!r}")
        return {
            "eid": eid,
            "topic": topic_,
            "key": key_,
            "payload": body,
            "headers": head,
            "now": self._now(),
            "delay": float(delay),
        }
