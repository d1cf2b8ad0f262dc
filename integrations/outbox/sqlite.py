"""The embedded outbox store: one SQLite file, WAL mode, standard library only.

Writers to SQLite are serialized by the database itself, so a claim is a single short
``BEGIN IMMEDIATE`` transaction: every relay (thread or process) sees the leases of the
claims before it, and no two claims can take the same row.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from resilience import clock as _clock
from resilience.integrations.outbox._model import check_identifier, positive
from resilience.integrations.outbox._sql import read_ddl
from resilience.integrations.outbox._store import SqlStore

__all__ = ["SqliteOutboxStore"]

# The keys whose head is not claimable, computed once: a correlated check per row would
# be quadratic in a hot key's backlog.
_READY = """
    o.status = 'pending' AND o.available_at <= :now
    AND (o.lease_until IS NULL OR o.lease_until <= :now)
    AND NOT EXISTS (
        SELECT 1 FROM blocked WHERE blocked.key = o.key AND blocked.head < o.id)
"""

_BLOCKED = """
    WITH blocked AS MATERIALIZED (
        SELECT b.key AS key, min(b.id) AS head FROM {t} AS b
        WHERE b.status = 'pending' AND b.key IS NOT NULL
          AND (b.available_at > :now OR b.lease_until > :now)
        GROUP BY b.key)
"""

_SQL = {
    "insert": """
        INSERT INTO {t} (event_id, topic, key, payload, headers, created, available_at)
        VALUES (:eid, :topic, :key, :payload, :headers, :now, :now + :delay)""",
    "claim": _BLOCKED
    + """
        UPDATE {t} SET lease_owner = :owner, lease_until = :now + :lease
        WHERE id IN (SELECT o.id FROM {t} AS o WHERE """
    + _READY
    + """ ORDER BY o.id LIMIT :limit)
        RETURNING id, event_id, topic, key, payload, headers, created, attempts""",
    "published": """
        UPDATE {t} SET status = 'published', published_at = :now,
                       lease_owner = NULL, lease_until = NULL
        WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_owner = :owner""",
    "release": """
        UPDATE {t} SET lease_owner = NULL, lease_until = NULL, available_at = :now + :delay
        WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_owner = :owner""",
    "release_owner": """
        UPDATE {t} SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = :owner""",
    "fail": """
        UPDATE {t} SET attempts = attempts + 1, last_error = :error,
                       status = CASE WHEN :dead THEN 'dead' ELSE 'pending' END,
                       available_at = :now + :delay, lease_owner = NULL, lease_until = NULL
        WHERE id = :id AND lease_owner = :owner""",
    "replay": """
        UPDATE {t} SET status = 'pending', attempts = 0, available_at = :now,
                       lease_owner = NULL, lease_until = NULL
        WHERE id IN (
            SELECT id FROM {t}
            WHERE status = 'dead'
              AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
              AND (:topic IS NULL OR topic = :topic)
              AND (:key IS NULL OR key = :key)
              AND (:error IS NULL OR instr(last_error, :error) > 0)
            ORDER BY id LIMIT :limit)""",
    "dead": """
        SELECT id, event_id, topic, key, attempts, last_error, created FROM {t}
        WHERE status = 'dead' AND (:topic IS NULL OR topic = :topic)
        ORDER BY id LIMIT :limit""",
    "purge": """
        DELETE FROM {t} WHERE id IN (
            SELECT id FROM {t}
            WHERE (status = 'published' AND published_at < :now - :age)
               OR (:dead AND status = 'dead' AND created < :now - :age)
            LIMIT :batch)""",
    "stats": """
        SELECT
            (SELECT count(*) FROM {t} WHERE status = 'pending'),
            (SELECT count(*) FROM {t} WHERE status = 'pending' AND lease_until > :now),
            (SELECT count(*) FROM {t} WHERE status = 'dead'),
            (SELECT :now - min(created) FROM {t} WHERE status = 'pending'),
            (SELECT count(*) FROM (
                SELECT key, min(id) AS head FROM {t}
                WHERE status = 'pending' AND key IS NOT NULL
                GROUP BY key HAVING count(*) > 1) AS g
             JOIN {t} AS h ON h.id = g.head
             WHERE h.attempts > 0 OR h.available_at > :now)""",
}


class _SqliteTx:
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: dict[str, Any]) -> int:
        return self.conn.execute(sql, params).rowcount

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> int:
        return self.conn.executemany(sql, params).rowcount


class SqliteOutboxStore(SqlStore):
    """An outbox in a SQLite file (the embedded default).

    ``path`` is the database file the application writes its business data to, so
    :meth:`enqueue` can join the application's transaction. The relay's own connections
    (one per thread) use WAL mode and wait up to ``busy_timeout`` seconds for the write
    lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "resilience_outbox",
        busy_timeout: float = 5.0,
        clock: _clock.Clock | None = None,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        check_identifier("table", table)
        self.busy_timeout = positive("busy_timeout", busy_timeout)
        # SQLite has no clock of its own worth sharing: always stamp from ours.
        super().__init__(table, _clock.resolve(clock))
        self.path = os.fspath(path)
        self.sql = {name: text.replace("{t}", table) for name, text in _SQL.items()}
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteOutboxStore({self.path!r}, table={self.table!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        # Autocommit mode: this module says where every transaction begins and ends.
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    @contextmanager
    def _transaction(
        self, *, claim: bool = False, read: bool = False, durable: bool = False
    ) -> Iterator[_SqliteTx]:
        conn = self._connect()
        # IMMEDIATE takes the write lock up front, so a writer never has to upgrade a read
        # lock (which is where SQLite deadlocks and returns SQLITE_BUSY at once).
        conn.execute("BEGIN" if read else "BEGIN IMMEDIATE")
        try:
            yield _SqliteTx(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def create_schema(self) -> None:
        conn = self._connect()
        conn.executescript(read_ddl("sqlite.sql", table=self.table))

    def close(self) -> None:
        """Close the relay's connections (from any thread)."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- the application's side ----------------------------------------------------------

    def _insert(self, conn: Any, row: dict[str, Any]) -> None:
        if not isinstance(conn, sqlite3.Connection):
            raise TypeError(
                f"conn must be a sqlite3.Connection for {type(self).__name__}, "
                f"got {type(conn).__name__}"
            )
        conn.execute(self.sql["insert"], row)
