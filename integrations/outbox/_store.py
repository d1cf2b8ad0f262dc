"""What both outbox stores share: the protocol, the operations, and the rules of a claim.

A dialect supplies its SQL text and a way to run statements in one transaction; every
operation is written once, here. The rules, in SQL terms:

* A row is *ready* when it is pending, its ``available_at`` has come and no live lease
  holds it.
* A claim takes ready rows in id order whose earlier pending rows of the same key are all
  ready too (so they are in the same claim, ahead of it). A key whose head is leased,
  backing off or released after an outage therefore blocks its later rows, which wait
  without touching their attempts. Dead rows do not block their key.
* There is no high-water mark: a claim looks at every pending row, so a row that commits
  after rows with higher ids is claimed like any other.
* Every write-back names the claim's owner token; a relay whose lease ran out and was
  taken over changes nothing.
"""

from __future__ import annotations

import abc
import importlib.resources
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio.to_thread

from resilience import clock as _clock
from resilience.integrations.outbox._model import (
    DeadEvent,
    OutboxEvent,
    OutboxStats,
    RowFailure,
    decode_headers,
    encode_event,
    positive,
    positive_int,
)

__all__ = ["OutboxStore"]

T = TypeVar("T")


@runtime_checkable
class OutboxStore(Protocol):
    """What a publisher needs from a store. Both stores also offer ``enqueue``."""

    def claim(self, owner: str, limit: int, lease: float) -> list[OutboxEvent]: ...
    async def aclaim(self, owner: str, limit: int, lease: float) -> list[OutboxEvent]: ...
    def mark_published(self, owner: str, ids: Sequence[int]) -> int: ...
    async def amark_published(self, owner: str, ids: Sequence[int]) -> int: ...
    def release(self, owner: str, ids: Sequence[int], delay: float = 0.0) -> int: ...
    async def arelease(self, owner: str, ids: Sequence[int], delay: float = 0.0) -> int: ...
    def fail(self, owner: str, failures: Sequence[RowFailure]) -> int: ...
    async def afail(self, owner: str, failures: Sequence[RowFailure]) -> int: ...
    def stats(self) -> OutboxStats: ...
    async def astats(self) -> OutboxStats: ...
    def replay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limit: int = 1000,
    ) -> int: ...
    async def areplay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limit: int = 1000,
    ) -> int: ...


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


def _event(row: tuple[Any, ...]) -> OutboxEvent:
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


class SqlStore(abc.ABC):
    """The operations of an outbox store over a dialect's SQL."""

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

    def _now(self) -> float | None:
        """The time to stamp, or ``None`` for the database's own clock."""
        return self._clock.time() if self._clock is not None else None

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn)

    @abc.abstractmethod
    def create_schema(self) -> None:
        """Create the table, its indexes (and on PostgreSQL its NOTIFY trigger); idempotent."""

    async def acreate_schema(self) -> None:
        await self._in_thread(self.create_schema)

    @abc.abstractmethod
    def close(self) -> None: ...

    async def aclose(self) -> None:
        await self._in_thread(self.close)

    # -- the application's side ----------------------------------------------------------

    def enqueue(
        self,
        conn: Any,
        *,
        topic: str,
        key: str | None = None,
        payload: object,
        headers: dict[str, str] | None = None,
        event_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Insert an event on the caller's connection, inside the caller's transaction.

        Never commits: the event becomes visible to relays when the caller commits, and
        vanishes with a rollback. Bad input raises before any SQL runs. Returns the event
        id (a UUID string).
        """
        row = self._row(topic, key, payload, headers, event_id, delay)
        self._insert(conn, row)
        return str(row["eid"])

    async def aenqueue(
        self,
        conn: Any,
        *,
        topic: str,
        key: str | None = None,
        payload: object,
        headers: dict[str, str] | None = None,
        event_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """:meth:`enqueue` on an async connection (``psycopg.AsyncConnection``)."""
        row = self._row(topic, key, payload, headers, event_id, delay)
        await self._ainsert(conn, row)
        return str(row["eid"])

    def _row(
        self, topic: object, key: object, payload: object, headers: object, event_id: object,
        delay: object,
    ) -> dict[str, Any]:  # fmt: skip
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

    @abc.abstractmethod
    def _insert(self, conn: Any, row: dict[str, Any]) -> None:
        """Run the insert on the caller's connection (checking it is the right kind)."""

    async def _ainsert(self, conn: Any, row: dict[str, Any]) -> None:
        self._insert(conn, row)

    # -- the relay's side ----------------------------------------------------------------

    def claim(self, owner: str, limit: int, lease: float) -> list[OutboxEvent]:
        """Lease up to ``limit`` ready rows to ``owner`` for ``lease`` seconds, in id order."""
        positive_int("limit", limit)
        positive("lease", lease)
        params = {"owner": owner, "limit": limit, "lease": float(lease), "now": self._now()}
        with self._transaction(claim=True) as tx:
            rows = tx.fetch(self.sql["claim"], params)
        events = [_event(row) for row in rows]
        events.sort(key=_by_id)
        return events

    async def aclaim(self, owner: str, limit: int, lease: float) -> list[OutboxEvent]:
        return await self._in_thread(lambda: self.claim(owner, limit, lease))

    def mark_published(self, owner: str, ids: Sequence[int]) -> int:
        """Mark rows published, if ``owner`` still holds them; returns how many it did."""
        if not ids:
            return 0
        params = {"owner": owner, "ids": self._ids(ids), "now": self._now()}
        with self._transaction() as tx:
            return tx.execute(self.sql["published"], params)

    async def amark_published(self, owner: str, ids: Sequence[int]) -> int:
        if not ids:
            return 0  # no thread hop for nothing
        return await self._in_thread(lambda: self.mark_published(owner, ids))

    def release(self, owner: str, ids: Sequence[int], delay: float = 0.0) -> int:
        """Give rows back untouched (attempts unchanged), ready again after ``delay`` s."""
        if not ids:
            return 0
        params = {"owner": owner, "ids": self._ids(ids), "delay": delay, "now": self._now()}
        with self._transaction() as tx:
            return tx.execute(self.sql["release"], params)

    async def arelease(self, owner: str, ids: Sequence[int], delay: float = 0.0) -> int:
        if not ids:
            return 0
        return await self._in_thread(lambda: self.release(owner, ids, delay))

    def release_owner(self, owner: str) -> int:
        """Give back every row ``owner`` holds (graceful shutdown)."""
        with self._transaction() as tx:
            return tx.execute(self.sql["release_owner"], {"owner": owner})

    async def arelease_owner(self, owner: str) -> int:
        return await self._in_thread(lambda: self.release_owner(owner))

    def fail(self, owner: str, failures: Sequence[RowFailure]) -> int:
        """Count one attempt on each row, keep the error, back off or mark it dead."""
        if not failures:
            return 0
        now = self._now()
        params = [
            {
                "owner": owner,
                "id": f.id,
                "error": f.error[:2000],
                "delay": f.delay,
                "dead": f.dead,
                "now": now,
            }
            for f in failures
        ]
        with self._transaction() as tx:
            return tx.execute_many(self.sql["fail"], params)

    async def afail(self, owner: str, failures: Sequence[RowFailure]) -> int:
        if not failures:
            return 0
        return await self._in_thread(lambda: self.fail(owner, failures))

    # -- operations ----------------------------------------------------------------------

    def replay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limit: int = 1000,
    ) -> int:
        """Move up to ``limit`` dead rows matching every given filter back to pending, with
        their attempts reset. Returns how many moved."""
        positive_int("limit", limit)
        params = {
            "ids": None if ids is None else self._ids(ids),
            "topic": topic,
            "key": key,
            "error": error,
            "limit": limit,
            "now": self._now(),
        }
        with self._transaction(durable=True) as tx:
            return tx.execute(self.sql["replay"], params)

    async def areplay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limit: int = 1000,
    ) -> int:
        return await self._in_thread(
            lambda: self.replay(ids=ids, topic=topic, key=key, error=error, limit=limit)
        )

    def dead(self, *, topic: str | None = None, limit: int = 100) -> list[DeadEvent]:
        """Dead rows, oldest first."""
        positive_int("limit", limit)
        with self._transaction(read=True) as tx:
            rows = tx.fetch(self.sql["dead"], {"topic": topic, "limit": limit})
        return [
            DeadEvent(int(r[0]), str(r[1]), r[2], r[3], int(r[4]), r[5], float(r[6])) for r in rows
        ]

    async def adead(self, *, topic: str | None = None, limit: int = 100) -> list[DeadEvent]:
        return await self._in_thread(lambda: self.dead(topic=topic, limit=limit))

    def purge(self, older_than: float, *, batch: int = 1000, dead: bool = False) -> int:
        """Delete published rows (and dead ones with ``dead=True``) older than
        ``older_than`` seconds, ``batch`` rows per transaction so no lock is held long."""
        positive("older_than", older_than)
        positive_int("batch", batch)
        total = 0
        while True:
            params = {"age": float(older_than), "batch": batch, "dead": dead, "now": self._now()}
            with self._transaction() as tx:
                deleted = tx.execute(self.sql["purge"], params)
            total += deleted
            if deleted < batch:
                return total

    async def apurge(self, older_than: float, *, batch: int = 1000, dead: bool = False) -> int:
        return await self._in_thread(lambda: self.purge(older_than, batch=batch, dead=dead))

    def stats(self) -> OutboxStats:
        """Pending, in flight, dead, oldest pending age and blocked keys, in one read."""
        with self._transaction(read=True) as tx:
            row = tx.fetch(self.sql["stats"], {"now": self._now()})[0]
        return OutboxStats(
            pending=int(row[0] or 0),
            in_flight=int(row[1] or 0),
            dead=int(row[2] or 0),
            oldest_pending_age=None if row[3] is None else max(0.0, float(row[3])),
            blocked_keys=int(row[4] or 0),
        )

    async def astats(self) -> OutboxStats:
        return await self._in_thread(self.stats)

    def _ids(self, ids: Sequence[int]) -> Any:
        """Ids as the dialect binds a list (a JSON array for SQLite, an array for psycopg)."""
        return json.dumps([int(i) for i in ids])


def _by_id(event: OutboxEvent) -> int:
    return event.id
