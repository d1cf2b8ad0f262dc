"""The PostgreSQL claim's bounded walk of the pending index: rows found behind a deep
layer of rows it must pass over, a hot key's blocking kept across the longer walks, per-key
order under two concurrent owners, the session function made again after ``DISCARD``, and
the pipelined transaction a database without the TEMP privilege falls back to."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from psycopg import sql
from test_outbox_store import Kit, _postgres_kit

from resilience.integrations.outbox import OutboxEvent, PostgresOutboxStore, RowFailure
from resilience.testing import FakeClock

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg(postgres_dsn: str, pg_schema: str, clock: FakeClock) -> Iterator[Kit]:
    yield from _postgres_kit(postgres_dsn, pg_schema, clock)


def fill(kit: Kit, rows: Sequence[tuple[str | None, int]], *, delay: float = 0.0) -> list[str]:
    """Enqueue (key, n) rows in one transaction, pipelined (thousands in well under 1 s)."""
    with kit.begin() as conn, conn.pipeline():
        return [
            kit.store.enqueue(conn, topic="t", key=key, payload={"n": n}, delay=delay)
            for key, n in rows
        ]


def seen(events: list[OutboxEvent]) -> list[tuple[str | None, int]]:
    return [(e.key, e.json()["n"]) for e in events]


def temp_functions(conn: psycopg.Connection[Any]) -> list[str]:
    return [
        row[0]
        for row in conn.execute(
            "SELECT p.proname FROM pg_proc AS p WHERE p.pronamespace = pg_my_temp_schema()"
            " AND p.proname LIKE 'resilience_claim_%'"
        ).fetchall()
    ]


# -- the walk reaches past rows it must pass over -----------------------------------------


def _bury(kit: Kit) -> tuple[list[str], list[int]]:
    """100 rows backing off after a poison failure, 100 with a future available time (each
    its own key), one follower of a poisoned key, then 15 ready rows: returns the ready
    rows' event ids and the poisoned rows' ids."""
    fill(kit, [(f"p{i}", i) for i in range(100)])
    poisoned = kit.store.claim("a", 100, 30.0)
    assert len(poisoned) == 100
    failures = [RowFailure(e.id, "poison: bad", 60.0, False) for e in poisoned]
    assert kit.store.fail("a", failures) == 100
    fill(kit, [(f"d{i}", i) for i in range(100)], delay=60.0)
    fill(kit, [("p0", 100)])  # behind its backing-off head: never claimed
    ready = fill(kit, [(f"r{i}" if i % 3 else None, i) for i in range(15)])
    return ready, [e.id for e in poisoned]


def test_a_claim_finds_ready_rows_behind_hundreds_it_must_pass_over(
    pg: Kit, clock: FakeClock
) -> None:
    ready, poisoned = _bury(pg)
    first = pg.store.claim("b", 10, 30.0)
    assert pg.store.mark_published("b", [e.id for e in first]) == 10
    # The first walk (limit + 16 rows) sees only rows backing off: the full batch proves
    # the store walked further, and in id order.
    assert [e.event_id for e in first] == ready[:10]
    rest = pg.store.claim("c", 10, 30.0)
    assert [e.event_id for e in rest] == ready[10:]
    assert pg.store.mark_published("c", [e.id for e in rest]) == 5
    assert pg.store.claim("c", 10, 30.0) == []
    # Passing over a row does not touch it: each poisoned row still has one attempt.
    attempts = dict(pg.query("SELECT id, attempts FROM resilience_outbox WHERE key LIKE 'p%'"))
    assert [attempts[i] for i in poisoned] == [1] * 100
    clock.advance(60.0)
    # Once due, the heads come back before their followers, in id order.
    again = pg.store.claim("d", 500, 30.0)
    assert len(again) == 201
    assert [e.key for e in again[:100]] == [f"p{i}" for i in range(100)]
    assert seen(again)[-1] == ("p0", 100)


@pytest.mark.anyio
async def test_aclaim_finds_ready_rows_behind_hundreds_it_must_pass_over(pg: Kit) -> None:
    ready, _ = _bury(pg)
    assert [e.event_id for e in await pg.store.aclaim("b", 10, 30.0)] == ready[:10]
    assert [e.event_id for e in await pg.store.aclaim("b", 10, 30.0)] == ready[10:]


# -- a hot key stays blocked through the longer walks --------------------------------------


def _hot(kit: Kit) -> None:
    """Key hot: 300 rows, its head leased by owner a, with 5 rows of key x after the head;
    then 15 more of x and 10 rows of other keys, all beyond the first walk."""
    fill(kit, [("hot", 0)])
    (head,) = kit.store.claim("a", 1, 30.0)
    assert seen([head]) == [("hot", 0)]
    fill(kit, [("x", n) for n in range(5)])
    fill(kit, [("hot", n) for n in range(1, 300)])
    fill(kit, [("x", n) for n in range(5, 20)])
    fill(kit, [(f"o{n}", n) for n in range(10)])


def test_a_hot_key_with_a_leased_head_gives_way_to_other_keys_behind_it(
    pg: Kit, clock: FakeClock
) -> None:
    _hot(pg)
    claimed = pg.store.claim("b", 30, 30.0)
    # x's first rows come from the first walk, its later ones from a longer walk that
    # must not count b's own new leases as blockers; no row of hot at all.
    assert seen(claimed) == [("x", n) for n in range(20)] + [(f"o{n}", n) for n in range(10)]
    assert pg.store.claim("c", 30, 30.0) == []
    assert pg.store.stats().blocked_keys == 0  # a lease is not a back-off
    # a publishes the head: the key flows again, in order, from its second event.
    (head_id,) = [r[0] for r in pg.query("SELECT id FROM resilience_outbox WHERE lease_owner='a'")]
    assert pg.store.mark_published("a", [head_id]) == 1
    assert seen(pg.store.claim("c", 10, 30.0)) == [("hot", n) for n in range(1, 11)]
    # c holds hot 1..10 now: d gets nothing of hot, not even rows far behind.
    assert pg.store.claim("d", 300, 30.0) == []
    clock.advance(31.0)  # every lease ran out: hot's rows all come back, in order
    again = seen(pg.store.claim("d", 400, 30.0))
    assert len(again) == 329
    assert [s for s in again if s[0] == "hot"] == [("hot", n) for n in range(1, 300)]


@pytest.mark.anyio
async def test_aclaim_keeps_a_hot_key_blocked(pg: Kit) -> None:
    _hot(pg)
    claimed = await pg.store.aclaim("b", 30, 30.0)
    assert seen(claimed) == [("x", n) for n in range(20)] + [(f"o{n}", n) for n in range(10)]
    assert await pg.store.aclaim("c", 30, 30.0) == []


def test_a_head_leased_by_the_same_owner_still_blocks_its_key(pg: Kit) -> None:
    fill(pg, [("k", 0)])
    assert seen(pg.store.claim("a", 1, 30.0)) == [("k", 0)]
    fill(pg, [("k", 1), ("k", 2), ("other", 0)])
    assert seen(pg.store.claim("a", 10, 30.0)) == [("other", 0)]


# -- two owners at once on a deep table -----------------------------------------------------


def test_two_owners_drain_a_deep_table_once_each_in_per_key_order(pg: Kit) -> None:
    keys, per_key = 50, 100
    fill(pg, [(f"k{i % keys}", i // keys) for i in range(keys * per_key)])
    lock = threading.Lock()
    published: set[tuple[str, int]] = set()  # added just before the write-back is sent
    owner_of: dict[str, str] = {}
    next_n = dict.fromkeys((f"k{i}" for i in range(keys)), 0)
    errors: list[str] = []
    claims = [0, 0]

    def drain(index: int) -> None:
        owner = f"owner-{index}"
        empty = 0
        while empty < 3 and not errors:
            batch = pg.store.claim(owner, 20, 30.0)
            if not batch:
                empty += 1
                continue
            empty = 0
            with lock:
                claims[index] += 1
                for event in batch:
                    key, n = event.key or "", event.json()["n"]
                    if event.event_id in owner_of:
                        errors.append(
                            f"{key}:{n} claimed by {owner_of[event.event_id]} and {owner}"
                        )
                    owner_of[event.event_id] = owner
                    # In claim order, a key's events come one after the other, and each
                    # earlier one was published or is ahead of it in this same batch.
                    if n != next_n[key]:
                        errors.append(f"{owner} claimed {key}:{n}, expected {key}:{next_n[key]}")
                    earlier = {(e.key, e.json()["n"]) for e in batch if e.id < event.id}
                    if n and (key, n - 1) not in published | earlier:
                        errors.append(f"{owner} claimed {key}:{n} before {key}:{n - 1} was out")
                    next_n[key] = n + 1
                published.update((e.key or "", e.json()["n"]) for e in batch)
            written = pg.store.mark_published(owner, [e.id for e in batch])
            if written != len(batch):
                errors.append(f"{owner} marked {written} of {len(batch)} rows it holds")

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
    assert errors == []
    assert len(owner_of) == keys * per_key
    assert set(next_n.values()) == {per_key}
    assert min(claims) > 10, claims  # both owners did real work, interleaved
    assert pg.query("SELECT count(*) FROM resilience_outbox") == [(0,)]  # all published
    assert pg.query("SELECT count(*) FROM resilience_outbox_ids") == [(keys * per_key,)]


# -- a write-back in flight when a claim reaches its row ------------------------------------

# What a late owner's write-back leaves: the row published (deleted; or marked, as an
# earlier version did), released to later, or as it was.
ENDINGS = {
    "published": "DELETE FROM {t} WHERE id = %s",
    "marked published": "UPDATE {t} SET status = 'published', published_at = 0,"
    " lease_owner = NULL, lease_until = NULL WHERE id = %s",
    "released": "UPDATE {t} SET lease_owner = NULL, lease_until = NULL,"
    " available_at = 1e12 WHERE id = %s",
    "rolled back": "UPDATE {t} SET status = 'published' WHERE id = %s",
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_claim_waits_for_a_write_back_in_flight_and_takes_the_row_only_if_still_ready(
    pg: Kit, postgres_dsn: str, clock: FakeClock, ending: str
) -> None:
    # Owner a's lease ran out while it published; its write-back holds the row (not yet
    # committed) as b's claim reaches it. b waits, then takes the row only if what a left
    # is still ready: never a published row, never one released to later.
    fill(pg, [("k", 0), ("other", 0)])
    late = next(e for e in pg.store.claim("a", 10, 30.0) if e.key == "k")
    clock.advance(31.0)
    store = pg.store
    assert isinstance(store, PostgresOutboxStore)
    got: list[list[OutboxEvent]] = []
    with psycopg.connect(postgres_dsn) as writer, psycopg.connect(postgres_dsn) as watcher:
        writer.execute(ENDINGS[ending].format(t=store.qualified), (late.id,))
        claimer = threading.Thread(target=lambda: got.append(store.claim("b", 10, 30.0)))
        claimer.start()
        blocked = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        for _ in range(500):  # until b's claim waits on the writer (or is done)
            if not claimer.is_alive():
                break
            row = watcher.execute(blocked, (writer.info.backend_pid,)).fetchone()
            if row and row[0]:
                break
            threading.Event().wait(0.01)
        assert claimer.is_alive(), "the claim did not wait for the write-back in flight"
        if ending == "rolled back":
            writer.rollback()
        else:
            writer.commit()
        claimer.join(10.0)
    assert not claimer.is_alive()
    taken = {e.key for e in got[0]}
    assert taken == ({"k", "other"} if ending == "rolled back" else {"other"})
    status = {"published": [], "marked published": [("published",)]}.get(ending, [("pending",)])
    assert pg.query(f"SELECT status FROM resilience_outbox WHERE id = {late.id}") == status


# -- the session function: made again after DISCARD, a transaction without it ------------


@pytest.mark.parametrize("discard", ["DISCARD ALL", "DISCARD TEMP"])
def test_the_claim_survives_a_discard_on_its_connection(pg: Kit, discard: str) -> None:
    store = pg.store
    assert isinstance(store, PostgresOutboxStore)
    ids = fill(pg, [(None, n) for n in range(6)])
    assert [e.event_id for e in store.claim("a", 2, 30.0)] == ids[:2]
    with store.connection() as conn:  # a single-threaded store has one connection
        assert len(temp_functions(conn)) == 1
        conn.execute(discard)
        assert temp_functions(conn) == []
    assert [e.event_id for e in store.claim("a", 2, 30.0)] == ids[2:4]
    with store.connection() as conn:
        assert len(temp_functions(conn)) == 1  # made again, not a fallback
        conn.execute(discard)
    assert [e.event_id for e in store.claim("a", 5, 30.0)] == ids[4:]
    assert store._with_function is not None


@pytest.mark.parametrize(
    "discard",
    [
        "DISCARD TEMP",
        pytest.param(
            "DISCARD ALL",
            marks=pytest.mark.xfail(
                strict=True,
                raises=psycopg.errors.InvalidSqlStatementName,
                reason="BUG: psycopg (3.3.9) forgets its prepared statements only on a "
                "DISCARD ALL it has not counted yet; a pool's reset repeats it, so from the "
                "second reset on the store's prepare=True statements name prepared "
                "statements the server dropped, and _claim_once catches only "
                "UndefinedFunction",
            ),
        ),
    ],
)
def test_the_claim_survives_a_pool_that_discards_on_every_return(
    postgres_dsn: str, pg_schema: str, clock: FakeClock, discard: str
) -> None:
    from psycopg_pool import ConnectionPool

    def reset(conn: psycopg.Connection[Any]) -> None:
        conn.execute(discard)

    # One connection, reset whenever it goes back: every claim finds the function gone.
    with ConnectionPool(
        postgres_dsn, min_size=1, max_size=1, open=True, kwargs={"autocommit": True}, reset=reset
    ) as pool:
        store = PostgresOutboxStore(pool, schema=pg_schema, clock=clock)
        store.create_schema()
        with pool.connection() as conn:
            eids = [store.enqueue(conn, topic="t", key=None, payload=n) for n in range(5)]
        with pool.connection() as conn:
            eids += [store.enqueue(conn, topic="t", key="k", payload=n) for n in (5, 6)]
        got = [e.event_id for i in range(7) for e in store.claim(f"a{i}", 1, 30.0)]
        assert got == eids[:6]  # the last one waits behind k's leased head
        assert store._with_function is not None  # made again each time, not a fallback
        with pool.connection() as conn:
            assert temp_functions(conn) == []  # the reset did run
        store.close()


@pytest.fixture
def no_temp_dsn(postgres_dsn: str) -> Iterator[str]:
    """A DSN for a role without the TEMP privilege, in a database of this test's own
    (revoking TEMP from PUBLIC is database-wide: never on the shared database)."""
    suffix = uuid.uuid4().hex[:10]
    db, role = f"resilience_walk_{suffix}", f"resilience_walk_{suffix}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    target = psycopg.conninfo.make_conninfo(postgres_dsn, dbname=db)
    try:
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db))
            )
            conn.execute(
                sql.SQL("CREATE SCHEMA walk AUTHORIZATION {}").format(sql.Identifier(role))
            )
        yield psycopg.conninfo.make_conninfo(target, user=role)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _scenario(kit: Kit) -> list[list[tuple[str | None, int]]]:
    """The walks of the tests above in one run: what each claim returned."""
    out: list[list[tuple[str | None, int]]] = []
    fill(kit, [(f"p{i}", i) for i in range(60)])
    poisoned = kit.store.claim("a", 60, 30.0)
    kit.store.fail("a", [RowFailure(e.id, "poison", 60.0, False) for e in poisoned])
    fill(kit, [(f"d{i}", i) for i in range(60)], delay=60.0)
    fill(kit, [("hot", 0)])
    out.append(seen(kit.store.claim("a", 1, 30.0)))
    fill(kit, [("hot", n) for n in range(1, 100)] + [("p0", 60)])
    fill(kit, [(f"o{n % 4}" if n % 2 else None, n) for n in range(12)])
    out.append(seen(kit.store.claim("b", 8, 30.0)))
    out.append(seen(kit.store.claim("c", 8, 30.0)))
    out.append(seen(kit.store.claim("d", 8, 30.0)))
    return out


def test_without_temp_privilege_the_claim_falls_back_and_returns_the_same_rows(
    no_temp_dsn: str, pg: Kit, clock: FakeClock
) -> None:
    expected = _scenario(pg)
    assert expected[0] == [("hot", 0)]
    assert expected[1] == [(None if n % 2 == 0 else f"o{n % 4}", n) for n in range(8)]
    assert expected[2] == [(None, 8), (None, 10)]  # o1 and o3 wait behind b's leases
    assert expected[3] == []
    assert isinstance(pg.store, PostgresOutboxStore)
    assert pg.store._with_function is not None

    with (
        psycopg.connect(no_temp_dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    store = PostgresOutboxStore(no_temp_dsn, schema="walk", clock=clock)
    try:
        store.create_schema()

        def query(text: str) -> list[tuple[Any, ...]]:
            with psycopg.connect(no_temp_dsn, autocommit=True) as conn:
                conn.execute("SET search_path TO walk")
                return conn.execute(text).fetchall()

        def begin() -> Any:
            return psycopg.connect(no_temp_dsn)

        assert _scenario(Kit(store, begin, query, "postgres")) == expected
        assert store._with_function is None  # every claim ran as the pipelined transaction
    finally:
        store.close()
