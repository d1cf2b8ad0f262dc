"""The production outbox store: PostgreSQL through psycopg 3 (extra ``resilience[postgres]``).

A claim is one statement, one round trip: a function in the session's temporary schema
takes a transaction-scoped advisory lock that serializes claims (each a few
milliseconds), then walks the pending index from its head and leases ready rows by
their addresses in one UPDATE (a row another relay is writing back meanwhile is taken
only if its new version is still ready). The lock
is what makes per-key order safe with several relays: a claim that takes a key's later
rows together with its head must see every earlier claim's leases, which concurrent
snapshots would not (the walk is a statement of its own inside the function, so its
snapshot is taken once the lock is granted). Publishing happens after the claim commits,
so no row lock is held while the broker works.
"""

from __future__ import annotations

import queue
import threading
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Final

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


# PostgreSQL cuts identifiers at 63 bytes. The longest the DDL derives from the table's
# name adds 12 ("_pending_key", "_ids_created"): a longer name would be cut into another
# index's name (CREATE INDEX IF NOT EXISTS would then skip one silently).
_MAX_NAME: Final = 63
_MAX_TABLE: Final = _MAX_NAME - len("_pending_key")


def check_pg_names(table: object, schema: object) -> None:
    """The table and schema names PostgreSQL can hold with every name derived from them."""
    check_identifier("table", table)
    if schema is not None:
        check_identifier("schema", schema)
    if len(str(table)) > _MAX_TABLE:
        raise ValueError(
            f"table must be at most {_MAX_TABLE} characters on PostgreSQL (its index names "
            f"add up to 12 to it, and PostgreSQL cuts names at 63), got {len(str(table))}"
        )


def pg_channel(table: str, schema: str | None) -> str:
    """The NOTIFY channel of an outbox table: ``<schema>_<table>``, or a name made from its
    hash when that is longer than PostgreSQL's 63 bytes (pg_notify refuses such a channel,
    and the insert trigger would fail every enqueue)."""
    channel = f"{schema}_{table}" if schema else table
    if len(channel) <= _MAX_NAME:
        return channel
    return f"resilience_outbox_{zlib.crc32(channel.encode()):08x}"


# The database's clock unless the store has one (tests): hosts with skewed clocks agree.
_NOW = "COALESCE(%(now)s::float8, extract(epoch FROM statement_timestamp())::float8)"

_SQL = {
    # The row and its id in one statement: a duplicate id fails both (see postgres.sql).
    "insert": f"""
        WITH o AS (
            INSERT INTO {{t}} (event_id, topic, key, payload, headers, created, available_at)
            VALUES (%(eid)s, %(topic)s, %(key)s, %(payload)s, %(headers)s, {_NOW},
                    {_NOW} + %(delay)s)
            RETURNING event_id, created)
        INSERT INTO {{t}}_ids (event_id, created) SELECT event_id, created FROM o""",
    # One walk along the pending index in id order, as far as %(window)s rows: a row is
    # taken when it and every earlier pending row of its key in the walk are ready (the
    # first row of a key that is not ready blocks the key's later rows). The
    # walk stops near the limit, so a deep backlog costs no more than a shallow one (a
    # scan of all pending rows per claim made the relay slower with depth). The last row
    # (id NULL) says how far the walk went and how many rows it passed over, so the store
    # can look further when the window was too short.
    "claim": f"""
        WITH clock AS (SELECT {_NOW} AS now),
        walk AS MATERIALIZED (
            SELECT o.id, o.ctid AS tid, o.key, o.available_at <= clock.now
                   AND (o.lease_until IS NULL OR o.lease_until <= clock.now) AS free,
                   -- taken by this same claim's earlier walk (see _run_claim): no blocker;
                   -- an older lease of the same owner still blocks its key
                   o.id = ANY(%(mine)s::bigint[]) AS mine
            FROM {{t}} AS o, clock WHERE o.status = 'pending'
            ORDER BY o.id LIMIT %(window)s),
        blocked AS MATERIALIZED (
            SELECT w.key, min(w.id) AS head FROM walk AS w
            WHERE NOT (w.free OR w.mine) AND w.key IS NOT NULL GROUP BY w.key),
        verdict AS (
            SELECT w.id, w.tid, w.free AND (b.head IS NULL OR b.head > w.id) AS ok
            FROM walk AS w LEFT JOIN blocked AS b ON b.key = w.key),
        claimed AS (
            -- By the walked versions' addresses: no second index lookup per row, and no
            -- row-lock pass first (a WAL record per row). Claims are serialized by the
            -- advisory lock; a row a write-back changes meanwhile is waited for, then
            -- left to the next claim (its new version has another address) or taken only
            -- if it still passes these conditions, which are rechecked on it.
            UPDATE {{t}} AS r SET lease_owner = %(owner)s, lease_until = clock.now + %(lease)s
            FROM clock
            WHERE r.ctid = ANY(ARRAY(
                    SELECT v.tid FROM verdict AS v WHERE v.ok ORDER BY v.id LIMIT %(limit)s))
              AND r.status = 'pending' AND r.available_at <= clock.now
              AND (r.lease_until IS NULL OR r.lease_until <= clock.now)
            RETURNING r.id, r.event_id::text, r.topic, r.key, r.payload::text,
                      r.headers::text, r.created, r.attempts)
        SELECT * FROM claimed
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, count(*)::float8,
               (count(*) FILTER (WHERE NOT v.ok))::integer
        FROM verdict AS v""",
    # A published row is deleted: no new index entries, where an update to 'published'
    # wrote one in every index (and a deep backlog's grew a level as it drained). Its id
    # stays in {t}_ids, so a duplicate is still refused until purge.
    "published": """
        DELETE FROM {t} WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(owner)s""",
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
    # Forgets the ids of old events whose rows are gone (published), and deletes old dead
    # rows (dead=True) and rows an earlier version marked 'published', with their ids. The
    # count is of ids forgotten. (Every CTE sees one snapshot: the rows deleted here still
    # exist for the NOT EXISTS, so no id is picked twice.)
    "purge": f"""
        WITH clock AS (SELECT {_NOW} - %(age)s AS cutoff),
        old AS (
            DELETE FROM {{t}} WHERE id IN (
                SELECT o.id FROM {{t}} AS o, clock
                WHERE (o.status = 'published' AND o.published_at < clock.cutoff)
                   OR (%(dead)s AND o.status = 'dead' AND o.created < clock.cutoff)
                LIMIT %(batch)s
                FOR UPDATE SKIP LOCKED)
            RETURNING event_id),
        gone AS (
            SELECT k.event_id FROM {{t}}_ids AS k, clock
            WHERE k.created < clock.cutoff
              AND NOT EXISTS (SELECT 1 FROM {{t}} AS o WHERE o.event_id = k.event_id)
            LIMIT %(batch)s
            FOR UPDATE OF k SKIP LOCKED)
        DELETE FROM {{t}}_ids WHERE event_id IN (
            SELECT event_id FROM old UNION ALL SELECT event_id FROM gone)""",
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


# The claim as a function in the session's temporary schema (made on each connection's
# first claim, gone with the session, so there is nothing to migrate): one statement,
# one round trip, the lock and then the claim, each statement with its own snapshot.
_CLAIM_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.{fn}(
    p_owner text, p_limit integer, p_lease float8, p_now float8, p_window integer,
    p_mine bigint[])
RETURNS TABLE (id bigint, event_id text, topic text, key text, payload text,
               headers text, created float8, attempts integer)
LANGUAGE plpgsql VOLATILE SET jit = off AS $claim$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock({lock});
    RETURN QUERY {claim};
END
$claim$"""
_MAX_WINDOW: Final = 2**31 - 1  # the walk's LIMIT is an integer
_CLAIM_CALL = (
    "SELECT * FROM pg_temp.{fn}(%(owner)s::text, %(limit)s::integer, %(lease)s::float8,"
    " %(now)s::float8, %(window)s::integer, %(mine)s::bigint[])"
)


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


class _PgClaimTx(_PgTx):
    """The claim's transaction: BEGIN, the lock, the claim and COMMIT go out together
    and come back in one round trip, the cost of a single statement."""

    __slots__ = ("pipeline",)

    def __init__(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> None:
        super().__init__(conn)
        self.pipeline = pipeline

    def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(sql, params, prepare=True)
        self.conn.execute("COMMIT")
        self.pipeline.sync()
        return cursor.fetchall()


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
        check_pg_names(table, schema)
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
        self.channel = pg_channel(table, schema)
        self.sql = {name: text.replace("{t}", self.qualified) for name, text in _SQL.items()}
        # One lock id per table, so two outboxes in one database never wait on each other.
        self._lock_id = zlib.crc32(f"resilience.outbox:{self.qualified}".encode()) - 2**31
        # Rows the last claim's walk passed over, to size the next walk (see _run_claim).
        self._passed = 0
        fn = f"resilience_claim_{self._lock_id + 2**31:08x}"
        body = self.sql["claim"].strip()
        for name in ("owner", "limit", "lease", "now", "window", "mine"):
            body = body.replace(f"%({name})s", f"p_{name}")
        self._claim_function = _CLAIM_FUNCTION.format(fn=fn, lock=self._lock_id, claim=body)
        self._claim_call = _CLAIM_CALL.format(fn=fn)
        # Connections that have the function; None once the database refused to make it
        # (no TEMP privilege): claims then run as a pipelined transaction.
        self._with_function: weakref.WeakSet[Any] | None = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"PostgresOutboxStore(table={self.qualified!r})"

    @contextmanager
    def _transaction(
        self, *, claim: bool = False, read: bool = False, durable: bool = False
    ) -> Iterator[_PgTx]:
        with self._pool.connection() as conn:
            if claim:
                # The lock is its own statement, so the claim's snapshot is taken after it
                # is granted and sees every earlier claim's leases. An error skips the
                # rest, and the pool rolls the transaction back.
                with conn.pipeline() as pipeline:
                    conn.execute("BEGIN")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
                    # A claim is a few milliseconds of work: compiling it (JIT, which a
                    # deep table's estimates can trigger) costs a hundred times more.
                    conn.execute("SET LOCAL jit = off")
                    yield _PgClaimTx(conn, pipeline)
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

    def _run_claim(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        # The walk covers the limit plus room for twice the rows the last claim passed
        # over (leased by other relays, backing off, blocked behind them). When that was
        # too short and rows are left beyond it, look again, four times as far.
        limit: int = params["limit"]
        window = min(limit + max(16, 2 * self._passed), _MAX_WINDOW)
        rows: list[tuple[Any, ...]] = []
        while True:
            ask = {
                **params,
                "limit": limit - len(rows),
                "window": window,
                "mine": [row[0] for row in rows],
            }
            got = self._claim_once(ask)
            walked = passed = 0
            for row in got:
                if row[0] is None:
                    walked, passed = int(row[6]), int(row[7])
                else:
                    rows.append(row)
            self._passed = passed
            if len(rows) >= limit or walked < window or window >= _MAX_WINDOW:
                return rows
            window = min(window * 4, _MAX_WINDOW)

    def _claim_once(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if self._with_function is not None:
            psycopg = _psycopg()
            with self._pool.connection() as conn:
                rows: list[tuple[Any, ...]] | None = None
                if conn not in self._with_function:
                    try:
                        conn.execute(self._claim_function)
                        self._with_function.add(conn)
                    except psycopg.errors.InsufficientPrivilege:
                        self._with_function = None
                        conn.rollback()
                if self._with_function is not None:
                    try:
                        rows = conn.execute(self._claim_call, params, prepare=True).fetchall()
                    except psycopg.errors.UndefinedFunction:
                        # The session lost its temporary schema (DISCARD ALL): make it again.
                        conn.rollback()
                        conn.execute(self._claim_function)
                        rows = conn.execute(self._claim_call, params, prepare=True).fetchall()
                if rows is not None:
                    return rows
        # Out of the pool's connection first: a pool of one would wait for itself.
        return self._run(lambda tx: tx.fetch(self.sql["claim"], params), claim=True)

    # -- the application's side ----------------------------------------------------------

    def _insert(self, conn: Any, row: dict[str, Any]) -> None:
        psycopg = _psycopg()
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(
                "conn must be a psycopg.Connection (use aenqueue for an AsyncConnection), "
                f"got {type(conn).__name__}"
            )
        try:
            conn.execute(self.sql["insert"], row, prepare=True)
        except psycopg.errors.UndefinedTable as error:
            self._explain(error)
            raise

    async def _ainsert(self, conn: Any, row: dict[str, Any]) -> None:
        psycopg = _psycopg()
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError(f"conn must be a psycopg.AsyncConnection, got {type(conn).__name__}")
        try:
            await conn.execute(self.sql["insert"], row, prepare=True)
        except psycopg.errors.UndefinedTable as error:
            self._explain(error)
            raise

    def _explain(self, error: Exception) -> None:
        # A table made by an earlier version, upgraded without create_schema(): say how.
        if f"{self.table}_ids" in str(error) and hasattr(error, "add_note"):
            error.add_note(
                f"{self.qualified}_ids keeps published events' ids: run store.create_schema()"
                " (or the statements of sqlalchemy.postgres_extras() in a migration)"
            )
