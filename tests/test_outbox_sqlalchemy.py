"""SQLAlchemy sessions and connections enqueue in the caller's transaction, on SQLite (a
file per test) and PostgreSQL (a schema per test), sync and async; the relay reads the
same table through the existing stores. ``outbox_table()`` agrees with the shipped DDL:
both are created side by side and compared by reflection, and by Alembic's autogenerate.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)
from support.services import create_schema, drop_schema

from resilience.integrations.outbox import (
    InMemoryBroker,
    OutboxPublisher,
    PostgresOutboxStore,
    SqliteOutboxStore,
)
from resilience.integrations.outbox._store import SqlStore
from resilience.integrations.outbox.sqlalchemy import outbox_table, postgres_extras
from resilience.testing import FakeClock

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the drivers need it


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(primary_key=True)
    total: Mapped[float]


@dataclass
class Env:
    kind: str
    store: SqlStore
    engine: sa.Engine  # the application's, with the orders table
    async_url: str
    schema: str | None

    def async_engine(self) -> AsyncEngine:
        engine = create_async_engine(self.async_url)
        if self.schema is not None:
            return engine.execution_options(schema_translate_map={None: self.schema})
        return engine

    def pending(self) -> int:
        return self.store.stats().pending

    def orders(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(sa.select(Order.id).order_by(Order.id)))

    def relay(self) -> InMemoryBroker:
        broker = InMemoryBroker()
        OutboxPublisher(self.store, broker=broker, clock=FakeClock()).run_once()
        return broker


def _pg_url(dsn: str) -> str:
    return "postgresql+psycopg://" + dsn.split("://", 1)[1]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Env]:
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        store: SqlStore = SqliteOutboxStore(path, clock=clock)
        engine = sa.create_engine(f"sqlite:///{path}")
        async_url, schema = f"sqlite+aiosqlite:///{path}", None
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("pg_schema")
        store = PostgresOutboxStore(dsn, schema=schema, clock=clock)
        engine = sa.create_engine(_pg_url(dsn)).execution_options(
            schema_translate_map={None: schema}
        )
        async_url = _pg_url(dsn)
    store.create_schema()
    Base.metadata.create_all(engine)
    try:
        yield Env(request.param, store, engine, async_url, schema)
    finally:
        engine.dispose()
        store.close()


# -- sync: Session and Connection ---------------------------------------------------------


def test_an_orm_object_and_its_event_commit_together_and_the_relay_publishes(env: Env) -> None:
    with Session(env.engine) as session:
        session.add(Order(id="o-1", total=12.5))
        session.flush()
        eid = env.store.enqueue(session, topic="orders", key="o-1", payload={"id": "o-1"})
        assert session.in_transaction()  # joined, not committed
        assert env.pending() == 0  # the relay sees nothing yet
        session.commit()
    assert env.orders() == ["o-1"]
    assert env.pending() == 1
    broker = env.relay()
    assert [(m.event_id, m.topic, m.key, m.json()) for m in broker.messages] == [
        (eid, "orders", "o-1", {"id": "o-1"})
    ]
    assert env.pending() == 0


def test_a_rolled_back_session_takes_its_event_with_it(env: Env) -> None:
    with Session(env.engine) as session:
        session.add(Order(id="o-2", total=1.0))
        env.store.enqueue(session, topic="orders", payload=1)  # before the flush, too
        session.rollback()

    def fail_midway() -> None:
        with Session(env.engine) as session, session.begin():
            session.add(Order(id="o-3", total=1.0))
            env.store.enqueue(session, topic="orders", payload=2)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert env.orders() == []
    assert env.pending() == 0
    assert env.relay().messages == []


def test_a_connection_joins_its_transaction(env: Env) -> None:
    with env.engine.connect() as conn:
        env.store.enqueue(conn, topic="t", payload="rolled back")
        assert conn.in_transaction()
        conn.rollback()
        env.store.enqueue(conn, topic="t", payload="kept", headers={"h": "v"})
        assert env.pending() == 0
        conn.commit()
    with env.engine.begin() as conn:  # engine.begin() commits at the end of the block
        env.store.enqueue(conn, topic="t", payload="begun")
    messages = env.relay().messages
    assert [m.json() for m in messages] == ["kept", "begun"]
    assert dict(messages[0].headers) == {"h": "v"}


def test_a_scoped_session_and_a_sessionmaker_session(env: Env) -> None:
    factory = sessionmaker(env.engine)
    registry = scoped_session(factory)
    try:
        env.store.enqueue(registry, topic="t", payload="scoped")
        registry.commit()
    finally:
        registry.remove()
    with factory.begin() as session:
        env.store.enqueue(session, topic="t", payload="made")
    assert [m.json() for m in env.relay().messages] == ["scoped", "made"]


def test_rows_are_stamped_as_the_stores_own_enqueue_stamps_them(env: Env, clock: FakeClock) -> None:
    clock.advance(100.0)
    with Session(env.engine) as session, session.begin():
        env.store.enqueue(session, topic="t", payload={"a": [1, 2]}, delay=5.0)
    assert env.pending() == 1
    assert env.relay().messages == []  # delayed by 5 s on the store's clock
    with env.engine.connect() as conn:
        table = outbox_table(sa.MetaData(), schema=env.schema)
        created, available, headers = conn.execute(
            sa.select(table.c.created, table.c.available_at, table.c.headers)
        ).one()
    assert (created, available) == (clock.time(), clock.time() + 5.0)
    assert headers in ("{}", {})


def test_a_published_event_s_id_is_still_refused_through_a_session(env: Env) -> None:
    # On PostgreSQL the relay deletes the published row and keeps its id: the session's
    # insert writes both, as the store's own enqueue does.
    eid = str(uuid.uuid4())
    with Session(env.engine) as session, session.begin():
        env.store.enqueue(session, topic="t", payload=1, event_id=eid)
    assert [m.event_id for m in env.relay().messages] == [eid]
    with pytest.raises(sa.exc.IntegrityError), Session(env.engine) as session, session.begin():
        env.store.enqueue(session, topic="t", payload=1, event_id=eid)
    assert env.pending() == 0


# -- async: AsyncSession and AsyncConnection ----------------------------------------------


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_async_session_commit_and_rollback(env: Env) -> None:
    engine = env.async_engine()
    try:
        async with AsyncSession(engine) as session:
            session.add(Order(id="a-1", total=3.0))
            eid = await env.store.aenqueue(session, topic="orders", key="a-1", payload="a-1")
            assert env.pending() == 0
            await session.commit()
        async with AsyncSession(engine) as session:
            session.add(Order(id="a-2", total=4.0))
            await env.store.aenqueue(session, topic="orders", payload="gone")
            await session.rollback()
    finally:
        await engine.dispose()
    assert env.orders() == ["a-1"]
    assert [(m.event_id, m.json()) for m in env.relay().messages] == [(eid, "a-1")]


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_async_connection_commit_and_rollback(env: Env) -> None:
    engine = env.async_engine()
    try:
        async with engine.connect() as conn:
            await env.store.aenqueue(conn, topic="t", payload="rolled back")
            await conn.rollback()
            await env.store.aenqueue(conn, topic="t", payload="kept")
            assert env.pending() == 0
            await conn.commit()
        async with engine.begin() as conn:
            await env.store.aenqueue(conn, topic="t", payload="begun")
    finally:
        await engine.dispose()
    assert [m.json() for m in env.relay().messages] == ["kept", "begun"]


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_aenqueue_takes_a_sync_session_too(env: Env) -> None:
    with Session(env.engine) as session, session.begin():
        await env.store.aenqueue(session, topic="t", payload="sync")
    assert [m.json() for m in env.relay().messages] == ["sync"]


# -- what is refused ----------------------------------------------------------------------


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_an_async_session_needs_aenqueue(env: Env) -> None:
    engine = env.async_engine()
    try:
        async with AsyncSession(engine) as session:
            with pytest.raises(TypeError, match=r"aenqueue\(\) for a SQLAlchemy AsyncSession"):
                env.store.enqueue(session, topic="t", payload=1)
    finally:
        await engine.dispose()


def test_an_engine_has_no_transaction_to_join(env: Env) -> None:
    with pytest.raises(TypeError, match="Engine has no transaction"):
        env.store.enqueue(env.engine, topic="t", payload=1)


def test_bad_input_raises_before_any_sql(env: Env) -> None:
    with Session(env.engine) as session:
        with pytest.raises(ValueError, match="topic"):
            env.store.enqueue(session, topic="", payload=1)
        assert not session.in_transaction()  # nothing ran, so nothing began


def test_a_session_on_another_database_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteOutboxStore(tmp_path / "outbox.db", clock=clock)
    store.create_schema()
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    memory = sa.create_engine("sqlite://")
    try:
        for engine in (other, memory):
            with Session(engine) as session, pytest.raises(ValueError, match="never see"):
                store.enqueue(session, topic="t", payload=1)
    finally:
        other.dispose()
        memory.dispose()
        store.close()


@pytest.mark.postgres
def test_a_sqlite_session_for_a_postgres_store_is_refused(
    postgres_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with Session(engine) as session, pytest.raises(TypeError, match="postgresql session"):
            store.enqueue(session, topic="t", payload=1)
    finally:
        engine.dispose()
        store.close()


def test_the_module_names_its_extra_when_sqlalchemy_is_missing() -> None:
    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "import sqlite3, tempfile, pathlib\n"
        "from resilience.integrations.outbox import SqliteOutboxStore\n"
        "path = pathlib.Path(tempfile.mkdtemp()) / 'o.db'\n"
        "store = SqliteOutboxStore(path); store.create_schema()\n"
        "with sqlite3.connect(path) as conn: store.enqueue(conn, topic='t', payload=1)\n"
        "try:\n"
        "    import resilience.integrations.outbox.sqlalchemy\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'resilience[sqlalchemy]'" in out.stdout


# -- outbox_table() against the shipped DDL -----------------------------------------------


def _shape(engine: sa.Engine, name: str, schema: str | None) -> dict[str, Any]:
    """What reflection sees of a table, with schema names taken out."""
    inspector = sa.inspect(engine)

    def where(options: dict[str, Any]) -> dict[str, str]:
        return {k: str(v) for k, v in options.items()}

    return {
        "columns": [
            (c["name"], str(c["type"]), c["nullable"], c.get("default"), c.get("identity"))
            for c in inspector.get_columns(name, schema)
        ],
        "primary key": inspector.get_pk_constraint(name, schema)["constrained_columns"],
        "unique": sorted(
            (u["name"], tuple(u["column_names"]))
            for u in inspector.get_unique_constraints(name, schema)
        ),
        "checks": sorted(
            (c["name"], c["sqltext"]) for c in inspector.get_check_constraints(name, schema)
        ),
        "indexes": sorted(
            (i["name"], tuple(i["column_names"]), i["unique"], where(i.get("dialect_options", {})))
            for i in inspector.get_indexes(name, schema)
        ),
        "options": inspector.get_table_options(name, schema),
    }


PARTIAL = [f"resilience_outbox_{n}" for n in ("pending", "pending_key", "published", "dead")]


def test_outbox_table_matches_the_sqlite_ddl(tmp_path: Path) -> None:
    ddl, helper = tmp_path / "ddl.db", tmp_path / "helper.db"
    store = SqliteOutboxStore(ddl)
    store.create_schema()
    store.close()
    metadata = sa.MetaData()
    outbox_table(metadata, dialect="sqlite")
    ddl_engine, helper_engine = (
        sa.create_engine(f"sqlite:///{ddl}"),
        sa.create_engine(f"sqlite:///{helper}"),
    )
    try:
        metadata.create_all(helper_engine)
        want = _shape(ddl_engine, "resilience_outbox", None)
        assert want["columns"][0] == ("id", "INTEGER", True, None, None)  # the rowid alias
        assert {i[0] for i in want["indexes"]} == set(PARTIAL)
        assert _shape(helper_engine, "resilience_outbox", None) == want
        with ddl_engine.connect() as conn:  # Alembic autogenerate: nothing to migrate
            assert compare_metadata(_alembic(conn, server_defaults=True), metadata) == []
    finally:
        ddl_engine.dispose()
        helper_engine.dispose()


def _alembic(conn: sa.Connection, *, server_defaults: bool, schema: str | None = None) -> Any:
    opts: dict[str, Any] = {"compare_type": True, "compare_server_default": server_defaults}
    if schema is not None:  # only this test's schema, never anyone else's
        opts["include_schemas"] = True
        opts["include_name"] = lambda name, kind, _: kind != "schema" or name == schema
    return MigrationContext.configure(conn, opts=opts)


@pytest.fixture
def second_schema(postgres_dsn: str) -> Iterator[str]:
    name = create_schema(postgres_dsn)
    try:
        yield name
    finally:
        drop_schema(postgres_dsn, name)


@pytest.mark.postgres
def test_outbox_table_matches_the_postgres_ddl(
    postgres_dsn: str, pg_schema: str, second_schema: str
) -> None:
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    store.create_schema()
    store.close()
    metadata = sa.MetaData()
    table = outbox_table(metadata, schema=second_schema)
    engine = sa.create_engine(_pg_url(postgres_dsn))
    try:
        metadata.create_all(engine)
        want = _shape(engine, "resilience_outbox", pg_schema)
        got = _shape(engine, "resilience_outbox", second_schema)
        assert want["columns"][0][1:3] == ("BIGINT", False)
        assert want["columns"][0][4]["always"] is True  # GENERATED ALWAYS AS IDENTITY
        assert {i[0] for i in want["indexes"]} == {*PARTIAL, "resilience_outbox_event_id_key"}
        assert got == want
        ids = [_shape(engine, "resilience_outbox_ids", s) for s in (pg_schema, second_schema)]
        assert ids[0]["primary key"] == ["event_id"]
        assert [i[0] for i in ids[0]["indexes"]] == ["resilience_outbox_ids_created"]
        assert ids[0] == ids[1]
        with engine.connect() as conn:
            # The parts that are not a table, a column or an index, made by create_all's
            # postgres_extras: the fillfactor and the NOTIFY trigger.
            for schema in (pg_schema, second_schema):
                relation = f"{schema}.resilience_outbox"
                assert conn.execute(
                    sa.text("SELECT reloptions FROM pg_class WHERE oid = CAST(:r AS regclass)"),
                    {"r": relation},
                ).scalar_one() == ["fillfactor=50"]
                triggers = conn.execute(
                    sa.text(
                        "SELECT tgname, tgtype FROM pg_trigger WHERE tgrelid = CAST(:r AS regclass)"
                    ),
                    {"r": relation},
                ).all()
                assert [(name, kind) for name, kind in triggers] == [
                    ("resilience_outbox_notify", 4)  # AFTER INSERT FOR EACH STATEMENT
                ]
            # Alembic, comparing the DDL's table with the helper's: nothing to migrate.
            # (Its server-default comparison cannot compare json defaults on PostgreSQL.)
            ddl_side = sa.MetaData()
            outbox_table(ddl_side, schema=pg_schema)
            ctx = _alembic(conn, server_defaults=False, schema=pg_schema)
            assert compare_metadata(ctx, ddl_side) == []
            for statement in postgres_extras(table):  # idempotent, for a migration
                conn.exec_driver_sql(statement)
            conn.commit()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_relay_runs_on_a_table_that_create_all_made(postgres_dsn: str, pg_schema: str) -> None:
    metadata = sa.MetaData()
    outbox_table(metadata, schema=pg_schema, name="events")
    engine = sa.create_engine(_pg_url(postgres_dsn))
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema, table="events")
    try:
        metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            for i in range(3):
                store.enqueue(session, topic="t", key="k", payload=i)
        broker = InMemoryBroker()
        assert OutboxPublisher(store, broker=broker).run_once().published == 3
        assert [m.json() for m in broker.messages] == [0, 1, 2]
    finally:
        engine.dispose()
        store.close()


def test_the_postgres_shaped_table_also_serves_sqlite(tmp_path: Path) -> None:
    # A PostgreSQL service's tests on SQLite: create_all, then the store as usual.
    path = tmp_path / "app.db"
    metadata = sa.MetaData()
    outbox_table(metadata)
    engine = sa.create_engine(f"sqlite:///{path}")
    store = SqliteOutboxStore(path)
    try:
        metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            store.enqueue(session, topic="t", key="k", payload="x")
        broker = InMemoryBroker()
        OutboxPublisher(store, broker=broker).run_once()
        assert [m.json() for m in broker.messages] == ["x"]
    finally:
        engine.dispose()
        store.close()


def test_outbox_table_refuses_what_the_stores_cannot_use() -> None:
    with pytest.raises(ValueError, match="identifier"):
        outbox_table(sa.MetaData(), name="bad name")
    with pytest.raises(ValueError, match="no schema"):
        outbox_table(sa.MetaData(), schema="s", dialect="sqlite")
    with pytest.raises(ValueError, match="dialect"):
        outbox_table(sa.MetaData(), dialect="mysql")  # type: ignore[arg-type]
