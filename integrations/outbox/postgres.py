"""The production outbox store: PostgreSQL through psycopg 3 (extra ``resilience[postgres]``).

A claim is one transaction: a transaction-scoped advisory lock serializes claims (each a
single statement of a few milliseconds), then ``SELECT ... FOR UPDATE SKIP LOCKED`` picks
ready rows without waiting on rows another relay is writing back. The lock is what makes
per-key order safe with several relays: a claim that takes a key's later rows together
with its head must see every earlier claim's leases, which concurrent snapshots would not.
Publishing happens after the claim commits, so no row lock is held while the broker works.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from resilience import clock as _clock
from resilience.integrations.outbox._model import check_identifier
from resilience.integrations.outbox._sql import read_ddl
from resilience.integrations.outbox._store import SqlStore

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresOutboxStore"]


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "PostgresOutboxStore needs psycopg 3: pip install 'resilience[postgres]'"
        ) from error
    return psycopg


# The database's clock unless the store has one (tests): hosts with skewed clocks agree.
_NOW = "COALESCE(%(now)s::float8, extract(epoch FROM statement_timestamp())::float8)"

_SQL = {
    "insert": f"""
        INSERT INTO {{t}} (event_id, topic, key, payload, headers, created, available_at)
        VALUES (%(eid)s, %(topic)s, %(key)s, %(payload)s, %(headers)s, {_NOW},
                {_NOW} + %(delay)s)""",
    # The keys whose head is not claimable, computed once (a correlated check per row is
    # quadratic in a hot key's backlog); then one UPDATE by id, no join over the table.
    "claim": f"""
        WITH clock AS (SELECT {_NOW} AS now),
        blocked AS MATERIALIZED (
            SELECT b.key, min(b.id) AS head FROM {{t}} AS b, clock
            WHERE b.status = 'pending' AND b.key IS NOT NULL
              AND (b.available_at > clock.now OR b.lease_until > clock.now)
            GROUP BY b.key),
        picked AS (
            SELECT o.id FROM {{t}} AS o, clock
            WHERE o.status = 'pending' AND o.available_at <= clock.now
              AND (o.lease_until IS NULL OR o.lease_until <= clock.now)
              AND NOT EXISTS (
                  SELECT 1 FROM blocked WHERE blocked.key = o.key AND blocked.head < o.id)
            ORDER BY o.id LIMIT %(limit)s
            FOR UPDATE OF o SKIP LOCKED)
        UPDATE {{t}} AS r SET lease_owner = %(owner)s, lease_until = clock.now + %(lease)s
        FROM clock WHERE r.id = ANY(ARRAY(SELECT id FROM picked))
        RETURNING r.id, r.event_id::text, r.topic, r.key, r.payload::text, r.headers::text,
                  r.created, r.attempts""",
    "published": f"""
        UPDATE {{t}} SET status = 'published', published_at = {_NOW},
                       lease_owner = NULL, lease_until = NULL
        WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(owner)s""",
    "release": f"""
        UPDATE {{t}} SET lease_owner = NULL, lease_until = NULL,
                       available_at = {_NOW} + %(delay)s
        WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(owner)s""",
    "release_owner": """
        UPDATE {t} SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %(owner)s""",
    "fail": f"""
        UPDATE {{t}} SET attempts = attempts + 1, last_error = %(error)s,
                       status = CASE WHEN %(dead)s THEN 'dead' ELSE 'pending' END,
                       available_at = {_NOW} + %(delay)s, lease_owner = NULL, lease_until = NULL
        WHERE id = %(id)s AND lease_owner = %(owner)s""",
    "replay": f"""
        UPDATE {{t}} SET status = 'pending', attempts = 0, available_at = {_NOW},
                       lease_owner = NULL, lease_until = NULL
        WHERE id IN (
            SELECT id FROM {{t}}
            WHERE status = 'dead'
              AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
              AND (%(topic)s::text IS NULL OR topic = %(topic)s)
              AND (%(key)s::text IS NULL OR key = %(key)s)
              AND (%(error)s::text IS NULL OR strpos(last_error, %(error)s) > 0)
            ORDER BY id LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED)""",
    "dead": """
        SELECT id, event_id::text, topic, key, attempts, last_error, created FROM {t}
        WHERE status = 'dead' AND (%(topic)s::text IS NULL OR topic = %(topic)s)
        ORDER BY id LIMIT %(limit)s""",
    "purge": f"""
        DELETE FROM {{t}} WHERE id IN (
            SELECT id FROM {{t}}
            WHERE (status = 'published' AND published_at < {_NOW} - %(age)s)
               OR (%(dead)s AND status = 'dead' AND created < {_NOW} - %(age)s)
            LIMIT %(batch)s
            FOR UPDATE SKIP LOCKED)""",
    "stats": f"""
        WITH clock AS (SELECT {_NOW} AS now)
        SELECT
            (SELECT count(*) FROM {{t}} WHERE status = 'pending'),
            (SELECT count(*) FROM {{t}}, clock
              WHERE status = 'pending' AND lease_until > clock.now),
            (SELECT count(*) FROM {{t}} WHERE status = 'dead'),
            (SELECT clock.now - min(created) FROM {{t}}, clock
              WHERE status = 'pending' GROUP BY clock.now),
            (SELECT count(*) FROM (
                SELECT key, min(id) AS head FROM {{t}}
                WHERE status = 'pending' AND key IS NOT NULL
                GROUP BY key HAVING count(*) > 1) AS g
             JOIN {{t}} AS h ON h.id = g.head, clock
             WHERE h.attempts > 0 OR h.available_at > clock.now)""",
}


class _PgTx:
    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params, prepare=True).fetchall()

    def execute(self, sql: str, params: dict[str, Any]) -> int:
        return self.conn.execute(sql, params, prepare=True).rowcount

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> int:
        with self.conn.cursor() as cur:
            cur.executemany(sql, params)
            return cur.rowcount


class _DsnPool:
    """Connections to one DSN, made on demand, kept for reuse, dropped when broken."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self._all: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._open()
        try:
            yield conn
        except BaseException:
            if conn.closed or conn.broken:
                self._drop(conn)
                raise
            conn.rollback()
            self._idle.put(conn)
            raise
        conn.commit()
        if self._closed:
            self._drop(conn)
        else:
            self._idle.put(conn)

    def _open(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise RuntimeError("the store is closed")
        # The relay's own writes commit without waiting for the WAL flush: a database
        # crash can undo the last moments of leases and marks, and at-least-once delivery
        # already covers that (the rows are published again). Operator actions opt out.
        conn: psycopg.Connection[Any] = _psycopg().connect(
            self.dsn, autocommit=True, options="-c synchronous_commit=off"
        )
        with self._lock:
            self._all.append(conn)
        return conn

    def _drop(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class PostgresOutboxStore(SqlStore):
    """An outbox in PostgreSQL.

    ``source`` is a DSN (the store keeps a few connections of its own) or a
    ``psycopg_pool.ConnectionPool`` the application already runs. Async methods run the
    same statements in a worker thread, so they work under asyncio and trio alike;
    :meth:`aenqueue` uses the caller's ``psycopg.AsyncConnection`` directly.
    """

    def __init__(
        self,
        source: str | Any,
        *,
        table: str = "resilience_outbox",
        schema: str | None = None,
        clock: _clock.Clock | None = None,
    ) -> None:
        check_identifier("table", table)
        if schema is not None:
            check_identifier("schema", schema)
        super().__init__(table, clock)
        if isinstance(source, str):
            _psycopg()  # a missing extra is named here, not at first use
            self._pool: Any = _DsnPool(source)
            self._owns_pool = True
        elif callable(getattr(source, "connection", None)):
            self._pool = source
            self._owns_pool = False
        else:
            raise TypeError(
                "source must be a DSN string or a psycopg_pool.ConnectionPool, "
                f"got {type(source).__name__}"
            )
        self.schema = schema
        self.qualified = f"{schema}.{table}" if schema else table
        self.channel = f"{schema}_{table}" if schema else table
        self.sql = {name: text.replace("{t}", self.qualified) for name, text in _SQL.items()}
        # One lock id per table, so two outboxes in one database never wait on each other.
        self._lock_id = zlib.crc32(f"resilience.outbox:{self.qualified}".encode()) - 2**31

    def __repr__(self) -> str:
        return f"PostgresOutboxStore(table={self.qualified!r})"

    @contextmanager
    def _transaction(
        self, *, claim: bool = False, read: bool = False, durable: bool = False
    ) -> Iterator[_PgTx]:
        with self._pool.connection() as conn:
            if claim:
                # One round trip for BEGIN, the lock and the claim (the fetch syncs), one for
                # COMMIT. The lock is its own statement, so the claim's snapshot is taken
                # after it is granted and sees every earlier claim's leases.
                with conn.pipeline(), conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
                    # Walk the pending index in id order and stop at the limit. Not knowing
                    # how many rows are due (``now`` is a parameter), the planner would
                    # rather sort the whole backlog: twice the time at 10,000 pending.
                    conn.execute("SET LOCAL enable_sort = off")
                    yield _PgTx(conn)
            elif durable:
                with conn.transaction():
                    conn.execute("SET LOCAL synchronous_commit TO on")
                    yield _PgTx(conn)
            else:
                # Every other operation is one statement: on the store's autocommit
                # connections it commits by itself, in one round trip.
                yield _PgTx(conn)

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection from the store's pool (for LISTEN, tests and tools)."""
        return self._pool.connection()  # type: ignore[no-any-return]

    def create_schema(self) -> None:
        ddl = read_ddl("postgres.sql", table=self.qualified, name=self.table, channel=self.channel)
        with self._pool.connection() as conn, conn.transaction():
            # Two relays starting at once must not race on CREATE ... IF NOT EXISTS.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
            conn.execute(ddl)

    def close(self) -> None:
        """Close the store's own connections (a pool passed in stays the caller's)."""
        if self._owns_pool:
            self._pool.close()

    def _ids(self, ids: Sequence[int]) -> Any:
        return [int(i) for i in ids]

    # -- the application's side ----------------------------------------------------------

    def _insert(self, conn: Any, row: dict[str, Any]) -> None:
        psycopg = _psycopg()
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(
                "conn must be a psycopg.Connection (use aenqueue for an AsyncConnection), "
                f"got {type(conn).__name__}"
            )
        conn.execute(self.sql["insert"], row, prepare=True)

    async def _ainsert(self, conn: Any, row: dict[str, Any]) -> None:
        psycopg = _psycopg()
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError(f"conn must be a psycopg.AsyncConnection, got {type(conn).__name__}")
        await conn.execute(self.sql["insert"], row, prepare=True)
