"""SQLAlchemy for the outbox (extra ``resilience[sqlalchemy]``).

``store.enqueue(session, ...)`` takes a SQLAlchemy ``Session`` or ``Connection`` (and
``await store.aenqueue(...)`` an ``AsyncSession`` or ``AsyncConnection``) on the store's
database, SQLite or PostgreSQL, and runs the insert in the transaction it has open (or
begins one, as SQLAlchemy does on first use). It never commits: the event is there when
the caller commits and gone when it rolls back, with the ORM work of the same
transaction. The relay keeps reading the table through its
:class:`~resilience.integrations.outbox.SqliteOutboxStore` or
:class:`~resilience.integrations.outbox.PostgresOutboxStore`.

:func:`outbox_table` gives the table as a ``sqlalchemy.Table`` of the same shape as the
DDL the stores ship (``sql/*.sql``), so Alembic can autogenerate its migration;
:func:`postgres_extras` is the part of that DDL that is not a table, column or index
(the fillfactor and the NOTIFY trigger), for ``op.execute`` in the migration.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final, Literal

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.orm import Session, scoped_session
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "resilience.integrations.outbox.sqlalchemy needs SQLAlchemy 2: "
        "pip install 'resilience[sqlalchemy]'"
    ) from error

from resilience.integrations.outbox._model import check_identifier
from resilience.integrations.outbox._sql import read_ddl
from resilience.integrations.outbox.postgres import (
    PostgresOutboxStore,
    check_pg_names,
    pg_channel,
)
from resilience.integrations.outbox.sqlite import SqliteOutboxStore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = ["ainsert", "insert", "outbox_table", "postgres_extras"]

# -- the table -------------------------------------------------------------------------

_STATUS_CHECK: Final = "status IN ('pending', 'published', 'dead')"
_PENDING: Final = "status = 'pending'"


def outbox_table(
    metadata: sa.MetaData,
    *,
    name: str = "resilience_outbox",
    schema: str | None = None,
    dialect: Literal["postgresql", "sqlite"] = "postgresql",
) -> sa.Table:
    """The outbox table in ``metadata``, shaped like the stores' own DDL: the same
    columns and types, defaults, check, unique event id and partial indexes (with the
    DDL's index names), on PostgreSQL and on SQLite. For PostgreSQL it also adds the
    ``{name}_ids`` table of event ids that the store keeps until purge.

    ``dialect`` is the database your migrations are compared against. It decides only
    the id column: PostgreSQL's DDL makes it a ``bigint`` identity; SQLite's is
    ``INTEGER PRIMARY KEY AUTOINCREMENT``, with no identity and no ``NOT NULL``, where
    Alembic would otherwise report both as changes. Either table can be created on
    either database (a PostgreSQL service's tests on SQLite, say). Give the store the
    same names (``table=name``, ``schema=schema``).
    On PostgreSQL, ``metadata.create_all()`` also runs :func:`postgres_extras`; a
    migration tool does not, so add them to the migration.
    """
    check_identifier("name", name)
    if dialect not in ("postgresql", "sqlite"):
        raise ValueError(f"dialect must be 'postgresql' or 'sqlite', got {dialect!r}")
    if dialect == "postgresql":
        try:
            check_pg_names(name, schema)
        except ValueError as error:
            raise ValueError(str(error).replace("table", "name", 1)) from None
    if schema is not None:
        check_identifier("schema", schema)
        if dialect == "sqlite":
            raise ValueError("SqliteOutboxStore has no schema: leave schema=None on SQLite")
    seconds: sa.types.TypeEngine[float] = sa.REAL().with_variant(
        postgresql.DOUBLE_PRECISION(), "postgresql"
    )
    json_text: sa.types.TypeEngine[Any] = sa.Text().with_variant(postgresql.JSON(), "postgresql")
    pending = sa.text(_PENDING)
    table = sa.Table(
        name,
        metadata,
        sa.Column(
            "id",
            # SQLite's INTEGER PRIMARY KEY AUTOINCREMENT; PostgreSQL's bigint identity.
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            *([sa.Identity(always=True)] if dialect == "postgresql" else []),
            primary_key=True,
            # As the DDL says it: SQLite reports its rowid alias as nullable, and a NULL
            # inserted there takes the next id anyway.
            nullable=dialect == "sqlite",
        ),
        sa.Column(
            "event_id",
            sa.Text().with_variant(postgresql.UUID(as_uuid=False), "postgresql"),
            nullable=False,
            unique=True,
        ),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text()),
        sa.Column("payload", json_text, nullable=False),
        sa.Column("headers", json_text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("created", seconds, nullable=False),
        sa.Column("available_at", seconds, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text()),
        sa.Column(
            "status",
            sa.Text(),
            sa.CheckConstraint(_STATUS_CHECK),
            nullable=False,
            server_default=sa.text("'pending'"),
        ),
        sa.Column("lease_owner", sa.Text()),
        sa.Column("lease_until", seconds),
        sa.Column("published_at", seconds),
        # The claim scans pending rows in id order and checks each key's earlier rows;
        # retention deletes published rows oldest first; operators list dead rows.
        sa.Index(f"{name}_pending", "id", sqlite_where=pending, postgresql_where=pending),
        sa.Index(
            f"{name}_pending_key", "key", "id", sqlite_where=pending, postgresql_where=pending
        ),
        sa.Index(
            f"{name}_published",
            "published_at",
            sqlite_where=sa.text("status = 'published'"),
            postgresql_where=sa.text("status = 'published'"),
        ),
        sa.Index(
            f"{name}_dead",
            "id",
            sqlite_where=sa.text("status = 'dead'"),
            postgresql_where=sa.text("status = 'dead'"),
        ),
        schema=schema,
        sqlite_autoincrement=True,
    )
    if dialect == "postgresql":
        # PostgresOutboxStore deletes a published row and keeps its id here until purge,
        # so a duplicate is still refused (see sql/postgres.sql).
        sa.Table(
            f"{name}_ids",
            metadata,
            sa.Column("event_id", postgresql.UUID(as_uuid=False), primary_key=True),
            sa.Column("created", seconds, nullable=False),
            sa.Index(f"{name}_ids_created", "created", postgresql_using="brin"),
            schema=schema,
        )
    # The backfill is for a migration of a table that has rows; a new one has none.
    extras = postgres_extras(table)[:-1]

    def create_extras(target: sa.Table, connection: sa.Connection, **_: Any) -> None:
        if connection.dialect.name == "postgresql":
            for statement in extras:
                connection.exec_driver_sql(statement)

    sa.event.listen(table, "after_create", create_extras)
    return table


def postgres_extras(table: sa.Table) -> list[str]:
    """The statements of the PostgreSQL DDL beyond the tables and their indexes: the
    fillfactor that lets a claim write its lease in place, the statement trigger whose
    NOTIFY wakes idle relays, and (last) the copy of the rows' event ids into the
    ``_ids`` table, for a table that had rows before it. Idempotent; for
    ``op.execute`` in a migration, after the tables are made."""
    qualified = f"{table.schema}.{table.name}" if table.schema else table.name
    channel = pg_channel(table.name, table.schema)
    ddl = read_ddl("postgres.sql", table=qualified, name=table.name, channel=channel)
    fillfactor = f"ALTER TABLE {qualified} SET (fillfactor = 50)"
    if fillfactor not in ddl:  # pragma: no cover - the shipped DDL changed
        raise RuntimeError("postgres.sql no longer sets the fillfactor as expected")
    start = ddl.index("CREATE OR REPLACE FUNCTION")
    function, trigger = ddl[start:].split("$fn$;", 1)
    backfill = (
        f"INSERT INTO {qualified}_ids (event_id, created)"
        f" SELECT event_id, created FROM {qualified} ON CONFLICT DO NOTHING"
    )
    return [fillfactor, function + "$fn$", *_statements(trigger), backfill]


def _statements(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# -- enqueue ---------------------------------------------------------------------------

# One statement per (dialect, table): text() clauses are cached by SQLAlchemy per text.
_STATEMENTS: dict[tuple[str, str], sa.TextClause] = {}
_SQLITE_FILES: dict[tuple[str, str], bool] = {}


def _statement(store: SqliteOutboxStore | PostgresOutboxStore, dialect: str) -> sa.TextClause:
    table = store.qualified if isinstance(store, PostgresOutboxStore) else store.table
    statement = _STATEMENTS.get((dialect, table))
    if statement is None:
        if dialect == "sqlite":
            now = ":now"
        else:  # the database's clock unless the store has one, as PostgresOutboxStore does
            now = (
                "COALESCE(CAST(:now AS double precision),"
                " extract(epoch FROM statement_timestamp())::float8)"
            )
        cast = "CAST({} AS {})" if dialect == "postgresql" else "{}"
        text = (
            f"INSERT INTO {table} (event_id, topic, key, payload, headers, created, available_at)"
            f" VALUES ({cast.format(':eid', 'uuid')}, :topic, :key,"
            f" {cast.format(':payload', 'json')}, {cast.format(':headers', 'json')},"
            f" {now}, {now} + :delay)"
        )
        if dialect == "postgresql":  # the row and its id, as PostgresOutboxStore writes them
            text = (
                f"WITH o AS ({text} RETURNING event_id, created)"
                f" INSERT INTO {table}_ids (event_id, created) SELECT event_id, created FROM o"
            )
        statement = _STATEMENTS[(dialect, table)] = sa.text(text)
    return statement


def _check(store: object, conn: sa.Connection | AsyncConnection) -> sa.TextClause:
    """The insert statement for ``store``, once ``conn`` is known to be on its database."""
    dialect = conn.dialect.name
    if isinstance(store, SqliteOutboxStore):
        expected = "sqlite"
    elif isinstance(store, PostgresOutboxStore):
        expected = "postgresql"
    else:
        raise TypeError(f"{type(store).__name__} cannot enqueue through SQLAlchemy")
    if dialect != expected:
        raise TypeError(
            f"{type(store).__name__} needs a {expected} session or connection, got one on {dialect}"
        )
    if isinstance(store, SqliteOutboxStore):
        _same_sqlite_file(store, str(conn.engine.url.database or ""))
    return _statement(store, dialect)


def _same_sqlite_file(store: SqliteOutboxStore, database: str) -> None:
    # An event written to another file would never be relayed: refuse it, once per pair.
    path = store.path
    known = _SQLITE_FILES.get((path, database))
    if known is None:
        same = bool(database) and database != ":memory:"
        if same:
            try:
                same = os.path.samefile(path, database)
            except OSError:
                same = os.path.realpath(path) == os.path.realpath(database)
        known = _SQLITE_FILES[(path, database)] = same
    if not known:
        raise ValueError(
            f"the session's SQLite database {database!r} is not the store's file {path!r}; "
            "the relay would never see the event"
        )


def _async_types() -> tuple[type, ...]:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    return AsyncSession, AsyncConnection, async_scoped_session


def insert(store: object, conn: Any, row: dict[str, Any]) -> None:
    """``store.enqueue``'s insert on a ``Session`` or ``Connection``, in its transaction."""
    if isinstance(conn, scoped_session):
        conn = conn()
    if isinstance(conn, Session):
        conn = conn.connection()  # the session's transaction, begun if need be
    if not isinstance(conn, sa.Connection):
        if isinstance(conn, _async_types()):
            raise TypeError(f"use aenqueue() for a SQLAlchemy {type(conn).__name__}")
        raise TypeError(
            "conn must be a SQLAlchemy Session or Connection (an Engine has no transaction "
            f"to join), got {type(conn).__name__}"
        )
    conn.execute(_check(store, conn), row)


async def ainsert(
    store: object, conn: AsyncSession | AsyncConnection | Any, row: dict[str, Any]
) -> None:
    """``store.aenqueue``'s insert on an ``AsyncSession`` or ``AsyncConnection`` (a sync
    ``Session`` or ``Connection`` runs as :func:`insert` does)."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    if isinstance(conn, async_scoped_session):
        conn = conn()
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if not isinstance(conn, AsyncConnection):
        insert(store, conn, row)
        return
    await conn.execute(_check(store, conn), row)
