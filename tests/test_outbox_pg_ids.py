"""PostgreSQL's outbox deletes a published row and keeps its event id in ``<table>_ids``
until purge: the drain writes no index entries, and duplicates are still refused."""

from __future__ import annotations

import importlib.resources
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from resilience.integrations.outbox import InMemoryBroker, OutboxPublisher, PostgresOutboxStore
from resilience.testing import FakeClock

pytestmark = pytest.mark.postgres


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000.0)


@pytest.fixture
def store(postgres_dsn: str, pg_schema: str, clock: FakeClock) -> Iterator[PostgresOutboxStore]:
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema, clock=clock)
    store.create_schema()
    yield store
    store.close()


def _one(dsn: str, sql: str, *args: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]


def _enqueue(store: PostgresOutboxStore, dsn: str, n: int, **kw: Any) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [store.enqueue(conn, topic="t", key=f"k{i % 7}", payload=i, **kw) for i in range(n)]


def test_marking_published_writes_no_index_entries(
    store: PostgresOutboxStore, postgres_dsn: str
) -> None:
    # The reason for deleting: a mark by UPDATE put a new entry in every index per row
    # (and a deep backlog's indexes grew a level as it drained).
    _enqueue(store, postgres_dsn, 3000)
    events = store.claim("a", 3000, 30.0)
    assert len(events) == 3000
    sizes = (
        "SELECT sum(pg_relation_size(indexrelid)) FROM pg_index"
        " WHERE indrelid = CAST(%s AS regclass)"
    )
    before = _one(postgres_dsn, sizes, store.qualified)
    for start in range(0, 3000, 500):
        assert store.mark_published("a", [e.id for e in events[start : start + 500]]) == 500
    assert _one(postgres_dsn, sizes, store.qualified) == before
    assert _one(postgres_dsn, f"SELECT count(*) FROM {store.qualified}") == 0
    assert _one(postgres_dsn, f"SELECT count(*) FROM {store.qualified}_ids") == 3000


def test_purge_forgets_old_ids_of_published_events_only(
    store: PostgresOutboxStore, postgres_dsn: str, clock: FakeClock
) -> None:
    _enqueue(store, postgres_dsn, 6)
    events = store.claim("a", 4, 30.0)
    assert store.mark_published("a", [e.id for e in events]) == 4  # 2 stay pending
    clock.advance(100.0)
    _enqueue(store, postgres_dsn, 1)  # published, but young
    (young,) = [e for e in store.claim("b", 10, 30.0) if e.created == clock.time()]
    store.mark_published("b", [young.id])
    assert store.purge(50.0, batch=3) == 4  # two transactions: 3, then 1
    ids = _one(postgres_dsn, f"SELECT count(*) FROM {store.qualified}_ids")
    assert ids == 3  # the two pending events' and the young one's
    assert store.stats().pending == 2
    clock.advance(1000.0)
    assert store.purge(50.0, dead=True) == 1  # pending ids are never forgotten


def test_retried_producers_racing_the_relay_get_each_event_in_once(
    store: PostgresOutboxStore, postgres_dsn: str
) -> None:
    # Eight producers enqueue the same 150 ids, one transaction each, while a relay
    # publishes and deletes rows: every id goes in once and out once.
    ids = [str(uuid.uuid4()) for _ in range(150)]
    broker = InMemoryBroker()
    publisher = OutboxPublisher(store, broker=broker, batch_size=20)
    accepted = [0] * 8
    refused = [0] * 8
    done = threading.Event()
    start = threading.Barrier(9)

    def produce(n: int) -> None:
        with psycopg.connect(postgres_dsn) as conn:
            start.wait()
            for eid in ids[n % 3 :] + ids[: n % 3]:
                try:
                    with conn.transaction():
                        store.enqueue(conn, topic="t", key=eid[:1], payload=n, event_id=eid)
                    accepted[n] += 1
                except psycopg.errors.UniqueViolation:
                    refused[n] += 1

    def relay() -> None:
        start.wait()
        while not done.is_set():
            publisher.run_once()

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
    relay_thread = threading.Thread(target=relay)
    for t in [*threads, relay_thread]:
        t.start()
    for t in threads:
        t.join(60.0)
    done.set()
    relay_thread.join(60.0)
    while publisher.run_once().claimed:
        pass
    assert sum(accepted) == len(ids)
    assert sum(refused) == 7 * len(ids)
    assert sorted(m.event_id for m in broker.messages) == sorted(ids)


def _old_ddl(pg_schema: str) -> str:
    """The DDL as it was before the ``_ids`` table: this file's text without that part."""
    text = (
        importlib.resources.files("resilience.integrations.outbox")
        .joinpath("sql")
        .joinpath("postgres.sql")
        .read_text(encoding="utf-8")
    )
    start = text.index("-- Every event id the outbox has taken")
    end = text.index("USING brin (created);") + len("USING brin (created);")
    text = text[:start] + text[end:]
    table = f"{pg_schema}.resilience_outbox"
    names = {"table": table, "name": "resilience_outbox", "channel": f"{pg_schema}_x"}
    for placeholder, value in names.items():
        text = text.replace("{" + placeholder + "}", value)
    return text


def test_a_table_made_before_the_ids_table_gets_its_rows_ids(
    postgres_dsn: str, pg_schema: str, clock: FakeClock
) -> None:
    table = f"{pg_schema}.resilience_outbox"
    old = [str(uuid.uuid4()) for _ in range(3)]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(_old_ddl(pg_schema))
        for n, eid in enumerate(old):  # one published as the old relay marked it, two pending
            conn.execute(
                f"INSERT INTO {table} (event_id, topic, key, payload, created, available_at,"
                " status, published_at) VALUES (%s, 't', 'k', %s, 900, 900, %s, %s)",
                (eid, str(n), "published" if n == 0 else "pending", 900.0 if n == 0 else None),
            )
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema, clock=clock)
    try:
        store.create_schema()
        store.create_schema()  # idempotent: the copy runs once
        assert _one(postgres_dsn, f"SELECT count(*) FROM {table}_ids") == 3
        for eid in old:  # the old published one included
            with pytest.raises(psycopg.errors.UniqueViolation), psycopg.connect(postgres_dsn) as c:
                store.enqueue(c, topic="t", payload=0, event_id=eid)
        broker = InMemoryBroker()
        assert OutboxPublisher(store, broker=broker).run_once().published == 2
        assert [m.event_id for m in broker.messages] == old[1:]
        # Purge takes the old 'published' row with its id, and the two newer ids.
        assert store.purge(50.0) == 3
        assert _one(postgres_dsn, f"SELECT count(*) FROM {table}") == 0
        assert _one(postgres_dsn, f"SELECT count(*) FROM {table}_ids") == 0
    finally:
        store.close()


# -- names PostgreSQL cuts at 63 bytes -----------------------------------------------------


def test_a_table_name_whose_index_names_would_be_cut_is_refused() -> None:
    sa = pytest.importorskip("sqlalchemy")
    from resilience.integrations.outbox.sqlalchemy import outbox_table

    with pytest.raises(ValueError, match="table must be at most 51"):
        PostgresOutboxStore("postgresql://x", table="t" * 52)
    with pytest.raises(ValueError, match="name must be at most 51"):
        outbox_table(sa.MetaData(), name="t" * 52)
    outbox_table(sa.MetaData(), name="t" * 52, dialect="sqlite")  # SQLite cuts nothing


def test_a_long_schema_and_table_get_a_channel_pg_notify_takes(
    postgres_dsn: str, pg_schema: str
) -> None:
    # schema_table is longer than 63 bytes: pg_notify refused it, and its trigger failed
    # every enqueue. The channel is now a hash-based name, the same in the DDL and LISTEN.
    long_schema = pg_schema + "_" + "s" * 30
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {long_schema}")
    store = PostgresOutboxStore(postgres_dsn, schema=long_schema, table="t" * 51)
    try:
        assert len(store.channel) <= 63
        assert store.channel.startswith("resilience_outbox_")
        store.create_schema()
        with psycopg.connect(postgres_dsn, autocommit=True) as listener:
            listener.execute(f'LISTEN "{store.channel}"')
            with psycopg.connect(postgres_dsn) as conn:
                store.enqueue(conn, topic="t", payload=1)
            assert [n.channel for n in listener.notifies(timeout=5.0, stop_after=1)] == [
                store.channel
            ]
        broker = InMemoryBroker()
        assert OutboxPublisher(store, broker=broker).run_once().published == 1
    finally:
        store.close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {long_schema} CASCADE")


def test_an_upgrade_without_create_schema_is_told_what_to_run(
    postgres_dsn: str, pg_schema: str
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(_old_ddl(pg_schema))
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    try:
        with (
            pytest.raises(psycopg.errors.UndefinedTable) as caught,
            psycopg.connect(postgres_dsn) as conn,
        ):
            store.enqueue(conn, topic="t", payload=1)
        notes = getattr(caught.value, "__notes__", None)
        if notes is not None:  # Python 3.11 and later
            assert "create_schema()" in notes[0]
    finally:
        store.close()
