"""One contract for both outbox stores: SQLite (a file per test) and PostgreSQL (a schema
per test). Time is a FakeClock the store stamps rows with."""

from __future__ import annotations

import importlib.resources
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from resilience.integrations.outbox import (
    Inbox,
    OutboxStore,
    PostgresOutboxStore,
    RowFailure,
    SqliteOutboxStore,
)
from resilience.integrations.outbox._store import SqlStore
from resilience.testing import FakeClock


@dataclass
class Kit:
    """A store under test, and how the application side talks to its database."""

    store: SqlStore
    begin: Callable[[], AbstractContextManager[Any]]
    query: Callable[[str], list[tuple[Any, ...]]]
    kind: str

    def enqueue(self, n: int = 1, *, key: str | None = "k", topic: str = "t") -> list[str]:
        with self.begin() as conn:
            return [
                self.store.enqueue(conn, topic=topic, key=key, payload={"n": i}) for i in range(n)
            ]

    def column(self, name: str) -> list[Any]:
        return [row[0] for row in self.query(f"SELECT {name} FROM resilience_outbox ORDER BY id")]


def _sqlite_kit(tmp_path: Path, clock: FakeClock) -> Iterator[Kit]:
    path = tmp_path / "app.db"
    store = SqliteOutboxStore(path, clock=clock)
    store.create_schema()
    app = sqlite3.connect(path)

    @contextmanager
    def begin() -> Iterator[sqlite3.Connection]:
        with app:
            yield app

    def query(sql: str) -> list[tuple[Any, ...]]:
        return app.execute(sql).fetchall()

    yield Kit(store, begin, query, "sqlite")
    app.close()
    store.close()


def _postgres_kit(dsn: str, schema: str, clock: FakeClock) -> Iterator[Kit]:
    store = PostgresOutboxStore(dsn, schema=schema, clock=clock)
    store.create_schema()

    @contextmanager
    def begin() -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(dsn) as conn:
            yield conn

    def query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema}")
            return conn.execute(sql).fetchall()

    yield Kit(store, begin, query, "postgres")
    store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kit(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Kit]:
    if request.param == "sqlite":
        yield from _sqlite_kit(tmp_path, clock)
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("pg_schema")
        yield from _postgres_kit(dsn, schema, clock)


# -- schema and enqueue ------------------------------------------------------------------


def test_ddl_ships_as_package_files() -> None:
    sql = importlib.resources.files("resilience.integrations.outbox").joinpath("sql")
    names = {entry.name for entry in sql.iterdir()}
    assert {"sqlite.sql", "postgres.sql", "sqlite_inbox.sql", "postgres_inbox.sql"} <= names
    for column in ("event_id", "available_at", "attempts", "last_error", "lease_owner"):
        assert column in sql.joinpath("postgres.sql").read_text()
        assert column in sql.joinpath("sqlite.sql").read_text()


def test_stores_meet_the_protocol(kit: Kit) -> None:
    assert isinstance(kit.store, OutboxStore)


def test_create_schema_is_idempotent(kit: Kit) -> None:
    kit.enqueue(2)
    kit.store.create_schema()
    assert kit.store.stats().pending == 2


def test_enqueue_stores_the_row_as_given(kit: Kit, clock: FakeClock) -> None:
    with kit.begin() as conn:
        eid = kit.store.enqueue(
            conn, topic="orders", key="o-1", payload={"total": 12.5}, headers={"trace": "abc"}
        )
    assert str(uuid.UUID(eid)) == eid
    row = kit.query(
        "SELECT event_id, topic, key, payload, headers, created, available_at, attempts,"
        " status, lease_owner, last_error FROM resilience_outbox"
    )[0]
    assert str(row[0]) == eid
    assert row[1:3] == ("orders", "o-1")
    payload = row[3] if isinstance(row[3], dict) else __import__("json").loads(row[3])
    headers = row[4] if isinstance(row[4], dict) else __import__("json").loads(row[4])
    assert payload == {"total": 12.5}
    assert headers == {"trace": "abc"}
    assert row[5] == row[6] == clock.time()
    assert row[7:] == (0, "pending", None, None)


def test_enqueue_accepts_a_given_event_id_and_refuses_a_duplicate(kit: Kit) -> None:
    eid = str(uuid.uuid4())
    with kit.begin() as conn:
        assert kit.store.enqueue(conn, topic="t", payload=1, event_id=eid) == eid
    with (
        pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)),
        kit.begin() as conn,
    ):
        kit.store.enqueue(conn, topic="t", payload=1, event_id=eid)
    assert kit.store.stats().pending == 1


def test_a_published_event_s_id_is_refused_until_purge_forgets_it(
    kit: Kit, clock: FakeClock
) -> None:
    # PostgreSQL deletes a published row and keeps its id; SQLite keeps the row. Either
    # way a retried producer is refused until purge, and welcome after.
    eid = str(uuid.uuid4())
    with kit.begin() as conn:
        kit.store.enqueue(conn, topic="t", payload=1, event_id=eid)
    (event,) = kit.store.claim("a", 5, 30.0)
    assert kit.store.mark_published("a", [event.id]) == 1
    with (
        pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)),
        kit.begin() as conn,
    ):
        kit.store.enqueue(conn, topic="t", payload=1, event_id=eid)
    clock.advance(10.0)
    assert kit.store.purge(20.0) == 0  # not old enough
    assert kit.store.purge(5.0) == 1
    with kit.begin() as conn:
        assert kit.store.enqueue(conn, topic="t", payload=2, event_id=eid) == eid
    assert [e.json() for e in kit.store.claim("a", 5, 30.0)] == [2]


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"topic": "", "payload": 1}, ValueError, "topic"),
        ({"topic": 3, "payload": 1}, ValueError, "topic"),
        ({"topic": "t", "key": 5, "payload": 1}, TypeError, "key"),
        ({"topic": "t", "payload": {1, 2}}, TypeError, "payload"),
        ({"topic": "t", "payload": float("nan")}, TypeError, "payload"),
        ({"topic": "t", "payload": 1, "headers": {"a": 1}}, TypeError, "headers"),
        ({"topic": "t", "payload": 1, "event_id": "nope"}, ValueError, "event_id"),
        ({"topic": "t", "payload": 1, "delay": -1}, ValueError, "delay"),
    ],
)
def test_enqueue_rejects_bad_input_before_touching_the_database(
    kit: Kit, kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    with kit.begin() as conn:
        with pytest.raises(error, match=names):
            kit.store.enqueue(conn, **kwargs)
        # The transaction is still usable: nothing was sent.
        kit.store.enqueue(conn, topic="t", payload="ok")
    assert kit.store.stats().pending == 1


def test_enqueue_refuses_another_driver_s_connection(kit: Kit, tmp_path: Path) -> None:
    other: Any = sqlite3.connect(tmp_path / "x.db") if kit.kind == "postgres" else object()
    with pytest.raises(TypeError, match="conn must be"):
        kit.store.enqueue(other, topic="t", payload=1)
    if isinstance(other, sqlite3.Connection):
        other.close()


def test_enqueue_joins_the_caller_s_transaction_and_never_commits(kit: Kit) -> None:
    with kit.begin() as conn:
        kit.store.enqueue(conn, topic="t", payload=1)
        assert kit.store.stats().pending == 0  # not visible before the caller commits
        if kit.kind == "postgres":  # SQLite has one writer: a claim would wait for us
            assert kit.store.claim("relay", 10, 30.0) == []
    assert kit.store.stats().pending == 1


def test_a_rolled_back_transaction_leaves_no_event(kit: Kit) -> None:
    def order() -> None:
        with kit.begin() as conn:
            kit.store.enqueue(conn, topic="t", payload=1)
            raise RuntimeError("business logic failed")

    with pytest.raises(RuntimeError):
        order()
    assert kit.store.claim("relay", 10, 30.0) == []
    assert kit.store.stats().pending == 0


def test_enqueue_with_delay_is_claimable_only_later(kit: Kit, clock: FakeClock) -> None:
    with kit.begin() as conn:
        kit.store.enqueue(conn, topic="t", payload=1, delay=5.0)
    assert kit.store.claim("a", 10, 30.0) == []
    clock.advance(5.0)
    assert len(kit.store.claim("a", 10, 30.0)) == 1


# -- claims and leases -------------------------------------------------------------------


def test_claim_takes_rows_in_id_order_up_to_the_limit(kit: Kit) -> None:
    ids = kit.enqueue(5, key=None)
    first = kit.store.claim("a", 3, 30.0)
    assert [e.event_id for e in first] == ids[:3]
    assert [e.json() for e in first] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [e.event_id for e in kit.store.claim("b", 10, 30.0)] == ids[3:]
    assert kit.store.claim("c", 10, 30.0) == []


def test_a_lease_keeps_a_row_from_other_relays_until_it_expires(kit: Kit, clock: FakeClock) -> None:
    kit.enqueue(1)
    (event,) = kit.store.claim("a", 10, 30.0)
    assert kit.store.stats().in_flight == 1
    clock.advance(29.9)
    assert kit.store.claim("b", 10, 30.0) == []
    clock.advance(0.2)
    (again,) = kit.store.claim("b", 10, 30.0)
    assert again.id == event.id
    # a's lease ran out and b holds the row: a's write-backs change nothing.
    assert kit.store.mark_published("a", [event.id]) == 0
    assert kit.store.release("a", [event.id], 100.0) == 0
    assert kit.store.fail("a", [RowFailure(event.id, "x", 1.0, True)]) == 0
    assert kit.column("status") == ["pending"]
    assert kit.store.mark_published("b", [event.id]) == 1
    # PostgreSQL deletes a published row (its id stays in the _ids table); SQLite marks it.
    assert kit.column("status") == ([] if kit.kind == "postgres" else ["published"])


def test_a_key_s_later_rows_come_with_their_head_in_one_claim(kit: Kit) -> None:
    kit.enqueue(3, key="k")
    claimed = kit.store.claim("a", 10, 30.0)
    assert [e.json()["n"] for e in claimed] == [0, 1, 2]


def test_a_leased_head_blocks_its_key_but_not_other_keys(kit: Kit) -> None:
    kit.enqueue(1, key="k")
    kit.store.claim("a", 1, 30.0)
    kit.enqueue(2, key="k")
    kit.enqueue(1, key="other")
    kit.enqueue(1, key=None)
    claimed = kit.store.claim("b", 10, 30.0)
    assert [(e.key, e.json()["n"]) for e in claimed] == [("other", 0), (None, 0)]


def test_a_head_backing_off_blocks_its_key_without_touching_the_followers(
    kit: Kit, clock: FakeClock
) -> None:
    kit.enqueue(3, key="k")
    head, *rest = kit.store.claim("a", 10, 30.0)
    kit.store.release("a", [e.id for e in rest])
    assert kit.store.fail("a", [RowFailure(head.id, "poison: nope", 10.0, False)]) == 1
    assert kit.store.claim("b", 10, 30.0) == []
    assert kit.store.stats().blocked_keys == 1
    assert kit.column("attempts") == [1, 0, 0]
    clock.advance(10.0)
    assert [e.id for e in kit.store.claim("b", 10, 30.0)] == [head.id] + [e.id for e in rest]


def test_a_dead_head_does_not_block_its_key(kit: Kit) -> None:
    kit.enqueue(2, key="k")
    head, follower = kit.store.claim("a", 10, 30.0)
    kit.store.fail("a", [RowFailure(head.id, "poison: nope", 0.0, True)])
    kit.store.release("a", [follower.id])
    assert [e.id for e in kit.store.claim("b", 10, 30.0)] == [follower.id]


def test_a_released_row_keeps_its_attempts_and_waits_out_the_delay(
    kit: Kit, clock: FakeClock
) -> None:
    kit.enqueue(1)
    (event,) = kit.store.claim("a", 10, 30.0)
    assert kit.store.release("a", [event.id], 7.0) == 1
    assert kit.column("attempts") == [0]
    assert kit.column("lease_owner") == [None]
    assert kit.store.claim("b", 10, 30.0) == []
    clock.advance(7.0)
    (again,) = kit.store.claim("b", 10, 30.0)
    assert again.attempts == 0


def test_fail_counts_attempts_keeps_the_error_and_can_kill(kit: Kit, clock: FakeClock) -> None:
    kit.enqueue(1)
    (event,) = kit.store.claim("a", 10, 30.0)
    kit.store.fail("a", [RowFailure(event.id, "poison: too big", 3.0, False)])
    clock.advance(3.0)
    (event,) = kit.store.claim("a", 10, 30.0)
    assert event.attempts == 1
    kit.store.fail("a", [RowFailure(event.id, "poison: still too big", 3.0, True)])
    assert kit.column("status") == ["dead"]
    assert kit.column("attempts") == [2]
    (dead,) = kit.store.dead()
    assert (dead.id, dead.attempts, dead.last_error) == (event.id, 2, "poison: still too big")


def test_release_owner_gives_back_everything_an_owner_holds(kit: Kit) -> None:
    kit.enqueue(3, key=None)
    kit.store.claim("a", 2, 30.0)
    kit.store.claim("b", 1, 30.0)
    assert kit.store.release_owner("a") == 2
    assert len(kit.store.claim("c", 10, 30.0)) == 2


def test_claim_rejects_nonsense(kit: Kit) -> None:
    with pytest.raises(ValueError, match="limit"):
        kit.store.claim("a", 0, 30.0)
    with pytest.raises(ValueError, match="lease"):
        kit.store.claim("a", 1, 0.0)


# -- operations --------------------------------------------------------------------------


def _kill_all(kit: Kit) -> list[int]:
    events = kit.store.claim("a", 100, 30.0)
    kit.store.fail("a", [RowFailure(e.id, f"poison: {e.topic}", 0.0, True) for e in events])
    return [e.id for e in events]


def test_replay_filters_and_resets_attempts(kit: Kit) -> None:
    kit.enqueue(2, topic="orders", key="a")
    kit.enqueue(2, topic="orders", key="b")
    kit.enqueue(2, topic="users", key=None)
    ids = _kill_all(kit)
    assert kit.store.stats().dead == 6
    assert kit.store.replay(topic="users") == 2
    assert kit.store.replay(key="a", limit=1) == 1
    assert kit.store.replay(ids=[ids[1]]) == 1
    assert kit.store.replay(error="no such error") == 0
    assert kit.store.replay(error="poison: orders") == 2
    assert kit.store.stats().dead == 0
    assert set(kit.column("attempts")) == {0}
    assert len(kit.store.claim("c", 100, 30.0)) == 6


def test_dead_lists_oldest_first_by_topic(kit: Kit) -> None:
    kit.enqueue(2, topic="x", key=None)
    kit.enqueue(1, topic="y", key=None)
    ids = _kill_all(kit)
    assert [d.id for d in kit.store.dead()] == ids
    assert [d.id for d in kit.store.dead(topic="y")] == ids[2:]
    assert [d.id for d in kit.store.dead(limit=1)] == ids[:1]


def test_purge_deletes_old_published_rows_in_batches(kit: Kit, clock: FakeClock) -> None:
    kit.enqueue(7, key=None)
    events = kit.store.claim("a", 5, 30.0)
    kit.store.mark_published("a", [e.id for e in events])
    _kill_all(kit)  # the other two
    clock.advance(100.0)
    assert kit.store.purge(200.0) == 0
    assert kit.store.purge(50.0, batch=2) == 5
    assert kit.column("status") == ["dead", "dead"]
    assert kit.store.purge(50.0, dead=True) == 2
    assert kit.column("id") == []


def test_purge_never_touches_pending_rows(kit: Kit, clock: FakeClock) -> None:
    kit.enqueue(3)
    clock.advance(1000.0)
    assert kit.store.purge(1.0, dead=True) == 0
    assert kit.store.stats().pending == 3


def test_stats_report_the_backlog(kit: Kit, clock: FakeClock) -> None:
    assert kit.store.stats().oldest_pending_age is None
    kit.enqueue(2, key="k")
    clock.advance(4.0)
    kit.enqueue(1, key=None)
    clock.advance(1.0)
    kit.store.claim("a", 1, 30.0)
    stats = kit.store.stats()
    assert (stats.pending, stats.in_flight, stats.dead) == (3, 1, 0)
    assert stats.oldest_pending_age == pytest.approx(5.0)
    assert stats.breaker_state is None


@pytest.mark.anyio
async def test_async_twins_do_the_same(kit: Kit, clock: FakeClock) -> None:
    kit.enqueue(3, key=None)
    store = kit.store
    events = await store.aclaim("a", 2, 30.0)
    assert len(events) == 2
    assert await store.amark_published("a", [events[0].id]) == 1
    assert await store.arelease("a", [events[1].id], 0.0) == 1
    (one, _) = await store.aclaim("b", 5, 30.0)
    assert await store.afail("b", [RowFailure(one.id, "poison", 0.0, True)]) == 1
    assert await store.arelease_owner("b") == 1
    assert [d.id for d in await store.adead()] == [one.id]
    assert await store.areplay(ids=[one.id]) == 1
    stats = await store.astats()
    assert (stats.pending, stats.dead) == (2, 0)
    clock.advance(10.0)
    assert await store.apurge(1.0) == 1
    await store.acreate_schema()


# -- store-specific ----------------------------------------------------------------------


def test_sqlite_uses_wal_and_refuses_work_after_close(tmp_path: Path) -> None:
    store = SqliteOutboxStore(tmp_path / "a.db")
    store.create_schema()
    with sqlite3.connect(tmp_path / "a.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.stats()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"table": "bad-name"}, ValueError),
        ({"table": "x; DROP TABLE y"}, ValueError),
        ({"busy_timeout": 0}, ValueError),
    ],
)
def test_sqlite_store_rejects_bad_config(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        SqliteOutboxStore(tmp_path / "a.db", **kwargs)


def test_sqlite_store_rejects_a_non_path() -> None:
    with pytest.raises(TypeError, match="path"):
        SqliteOutboxStore(3)  # type: ignore[arg-type]


def test_postgres_store_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresOutboxStore("postgresql://x", schema="a.b")
    with pytest.raises(TypeError, match="source"):
        PostgresOutboxStore(42)


@pytest.mark.postgres
def test_postgres_uses_the_database_clock_without_one(postgres_dsn: str, pg_schema: str) -> None:
    import time

    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    store.create_schema()
    with psycopg.connect(postgres_dsn) as conn:
        store.enqueue(conn, topic="t", payload=1)
    (event,) = store.claim("a", 1, 30.0)
    assert abs(event.created - time.time()) < 60.0
    store.close()


@pytest.mark.postgres
def test_postgres_store_on_the_application_s_pool(postgres_dsn: str, pg_schema: str) -> None:
    from psycopg_pool import ConnectionPool

    with ConnectionPool(postgres_dsn, min_size=1, max_size=2, open=True) as pool:
        store = PostgresOutboxStore(pool, schema=pg_schema)
        store.create_schema()
        with pool.connection() as conn:
            store.enqueue(conn, topic="t", payload=1)
        assert len(store.claim("a", 5, 30.0)) == 1
        store.close()  # the pool is the caller's: still usable
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_postgres_aenqueue_joins_an_async_transaction(
    postgres_dsn: str, pg_schema: str, require_asyncio: None
) -> None:
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    await store.acreate_schema()
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await store.aenqueue(conn, topic="t", payload=1)
        await conn.rollback()
        await store.aenqueue(conn, topic="t", payload=2)
    assert [e.json() for e in await store.aclaim("a", 5, 30.0)] == [2]
    with pytest.raises(TypeError, match="AsyncConnection"):
        await store.aenqueue(object(), topic="t", payload=1)
    await store.aclose()


# -- inbox -------------------------------------------------------------------------------


def test_inbox_on_sqlite_dedupes_within_the_consumer_s_transaction(
    tmp_path: Path, clock: FakeClock
) -> None:
    conn = sqlite3.connect(tmp_path / "consumer.db")
    inbox = Inbox(consumer="billing", clock=clock)
    inbox.create_schema(conn)
    eid = str(uuid.uuid4())

    def handle() -> None:
        with conn:
            assert inbox.first_time(conn, eid)
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        handle()
    with conn:
        assert inbox.first_time(conn, eid)  # the failed attempt left no record
    with conn:
        assert not inbox.first_time(conn, eid)
    other = Inbox(consumer="search", clock=clock)
    with conn:
        assert other.first_time(conn, eid)  # consumers are independent
    clock.advance(100.0)
    with conn:
        assert inbox.purge(conn, 50.0) == 1
        assert inbox.first_time(conn, eid)
    conn.close()
    with pytest.raises(TypeError, match="conn"):
        inbox.first_time(object(), eid)
    with pytest.raises(ValueError, match="consumer"):
        Inbox(consumer="")


@pytest.mark.postgres
def test_inbox_on_postgres(pg_conn: psycopg.Connection[Any]) -> None:
    inbox = Inbox()
    inbox.create_schema(pg_conn)
    pg_conn.commit()
    eid = str(uuid.uuid4())
    assert inbox.first_time(pg_conn, eid)
    assert not inbox.first_time(pg_conn, eid)
    pg_conn.rollback()
    assert inbox.first_time(pg_conn, eid)
    pg_conn.commit()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_inbox_on_postgres_async(
    postgres_dsn: str, pg_schema: str, require_asyncio: None
) -> None:
    inbox = Inbox(schema=pg_schema)
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await inbox.acreate_schema(conn)
        eid = str(uuid.uuid4())
        assert await inbox.afirst_time(conn, eid)
        assert not await inbox.afirst_time(conn, eid)
        assert await inbox.apurge(conn, 1e9) == 0
