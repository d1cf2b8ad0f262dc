"""The store protocol and operations, written once: ``_sync_store.py`` is generated from
this file. Each operation checks its input and builds its parameters in the caller, then
runs one transaction: the async methods in a worker thread (the drivers are sync), the
sync ones in the caller's thread. The rules a claim follows are in ``_store.py``."""

# unasync: AsyncOutboxStore -> SyncOutboxStore, AsyncStoreOps -> SyncStoreOps, _arun -> _run
# unasync: aenqueue -> enqueue, _ainsert -> _insert, aclaim -> claim, afail -> fail
# unasync: _ainsert_sqlalchemy -> _insert_sqlalchemy, _arun_claim -> _run_claim
# unasync: amark_published -> mark_published, arelease -> release, arelease_owner -> release_owner
# unasync: areplay -> replay, adead -> dead, apurge -> purge, astats -> stats

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from resilience.integrations.outbox._model import (
    DeadEvent,
    OutboxEvent,
    OutboxStats,
    RowFailure,
    positive,
    positive_int,
)
from resilience.integrations.outbox._sql import StoreBase, by_id, decode_event, is_sqlalchemy

__all__ = ["AsyncOutboxStore", "AsyncStoreOps"]


class AsyncOutboxStore(Protocol):
    """What a publisher needs from a store, one half of :class:`OutboxStore`."""

    async def aclaim(self, owner: str, limit: int, lease: float) -> list[OutboxEvent]: ...
    async def amark_published(self, owner: str, ids: Sequence[int]) -> int: ...
    async def arelease(self, owner: str, ids: Sequence[int], delay: float = 0.0) -> int: ...
    async def afail(self, owner: str, failures: Sequence[RowFailure]) -> int: ...
    async def astats(self) -> OutboxStats: ...
    async def areplay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limit: int = 1000,
    ) -> int: ...


class AsyncStoreOps(StoreBase):
    # -- the application's side ----------------------------------------------------------

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
        """Insert an event on the caller's connection, inside the caller's transaction.

        Never commits: the event becomes visible to relays when the caller commits, and
        vanishes with a rollback. Bad input raises before any SQL runs. Returns the event
        id (a UUID string). The async form takes the driver's async connection where it
        has one (``psycopg.AsyncConnection``). ``conn`` may also be a SQLAlchemy
        ``Session`` or ``Connection`` (``AsyncSession`` or ``AsyncConnection`` for the
        async form) on the store's database: the event joins its transaction.

        When OpenTelemetry is in use and a span is active, its W3C ``traceparent`` (and
        ``tracestate``) go into the headers, unless ``headers`` names them itself.
        """
        row = self._row(topic, key, payload, headers, event_id, delay)
        if is_sqlalchemy(conn):
            await self._ainsert_sqlalchemy(conn, row)
        else:
            await self._ainsert(conn, row)
        return str(row["eid"])

    # -- the relay's side ----------------------------------------------------------------

    async def aclaim(self, owner: str, limit: int, lease: float) -> list[OutboxEvent]:
        """Lease up to ``limit`` ready rows to ``owner`` for ``lease`` seconds, in id order."""
        positive_int("limit", limit)
        positive("lease", lease)
        params = {"owner": owner, "limit": limit, "lease": float(lease), "now": self._now()}
        rows = await self._arun_claim(params)
        events = [decode_event(row) for row in rows]
        events.sort(key=by_id)
        return events

    async def amark_published(self, owner: str, ids: Sequence[int]) -> int:
        """Mark rows published (PostgreSQL deletes them and keeps their ids), if ``owner``
        still holds them; returns how many it did."""
        if not ids:
            return 0
        params = {"owner": owner, "ids": self._ids(ids), "now": self._now()}
        return await self._arun(lambda tx: tx.execute(self.sql["published"], params))

    async def arelease(self, owner: str, ids: Sequence[int], delay: float = 0.0) -> int:
        """Give rows back untouched (attempts unchanged), ready again after ``delay`` s."""
        if not ids:
            return 0
        params = {"owner": owner, "ids": self._ids(ids), "delay": delay, "now": self._now()}
        return await self._arun(lambda tx: tx.execute(self.sql["release"], params))

    async def arelease_owner(self, owner: str) -> int:
        """Give back every row ``owner`` holds (graceful shutdown)."""
        params = {"owner": owner}
        return await self._arun(lambda tx: tx.execute(self.sql["release_owner"], params))

    async def afail(self, owner: str, failures: Sequence[RowFailure]) -> int:
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
        return await self._arun(lambda tx: tx.execute_many(self.sql["fail"], params))

    # -- operations ----------------------------------------------------------------------

    async def areplay(
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
        return await self._arun(lambda tx: tx.execute(self.sql["replay"], params), durable=True)

    async def adead(self, *, topic: str | None = None, limit: int = 100) -> list[DeadEvent]:
        """Dead rows, oldest first."""
        positive_int("limit", limit)
        params = {"topic": topic, "limit": limit}
        rows = await self._arun(lambda tx: tx.fetch(self.sql["dead"], params), read=True)
        return [
            DeadEvent(int(r[0]), str(r[1]), r[2], r[3], int(r[4]), r[5], float(r[6])) for r in rows
        ]

    async def apurge(self, older_than: float, *, batch: int = 1000, dead: bool = False) -> int:
        """Forget published events (and dead ones with ``dead=True``) older than
        ``older_than`` seconds, ``batch`` per transaction so no lock is held long: their
        rows, or on PostgreSQL the ids it keeps. Returns how many it forgot."""
        positive("older_than", older_than)
        positive_int("batch", batch)
        params = {"age": float(older_than), "batch": batch, "dead": dead, "now": self._now()}
        total = 0
        while True:
            deleted = await self._arun(lambda tx: tx.execute(self.sql["purge"], params))
            total += deleted
            if deleted < batch:
                return total

    async def astats(self) -> OutboxStats:
        """Pending, in flight, dead, oldest pending age and blocked keys, in one read."""
        params = {"now": self._now()}
        rows = await self._arun(lambda tx: tx.fetch(self.sql["stats"], params), read=True)
        row = rows[0]
        return OutboxStats(
            pending=int(row[0] or 0),
            in_flight=int(row[1] or 0),
            dead=int(row[2] or 0),
            oldest_pending_age=None if row[3] is None else max(0.0, float(row[3])),
            blocked_keys=int(row[4] or 0),
        )
