"""The transactional outbox end to end: real SQLite files, PostgreSQL and Redis.

What is shown, for the SQLite and the PostgreSQL store wherever it applies:

1. A rolled-back business transaction publishes nothing (sync connections; psycopg's
   AsyncConnection through ``aenqueue``).
2. Concurrent relays publish each row exactly once while leases hold, keys in id order:
   8 threads into an in-memory broker, and 4 processes into Redis Streams.
3. A relay SIGKILLed mid-batch loses nothing: its rows come back when the lease ends, and
   only the events it had already sent arrive twice.
4. Per-key order with four relays and a broker failing batches (outage) and single events
   (poison): first deliveries stay in id order; attempts count poison only.
5. No high-water mark: a row committed (or ready) after a higher id was published is
   published too.
6. An outage through a TCP FaultProxy in front of Redis: the breaker opens after three
   failed batches, then nothing is claimed and Redis is contacted only by one probe per
   recovery timeout; attempts never grow; after restore everything arrives in key order.
7. Poison: an event Redis Streams refuses goes dead after ``max_attempts`` with its error
   while other keys flow; ``replay`` brings it back, paced by a TokenBucket, and refuses
   while the breaker is open.
8. ``run()`` on asyncio and trio and ``run_blocking(stop)`` in a thread: drain, idle, and
   leave no row leased when cancelled or stopped.
9. A relay cancelled during a slow ``apublish`` gives its rows back at once.

Also: ``RedisStreamsBroker.close()`` / ``aclose()`` disconnect the broker's own pool.

Time moves with a FakeClock where the claim allows; the process and kill tests use the
real clock with short leases.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from support.faultproxy import FaultProxy
from support.outbox_relay_proc import tracked_redis

from resilience import CircuitBreaker, CircuitState, TokenBucket
from resilience.integrations.outbox import (
    Backoff,
    BatchResult,
    BrokerUnavailable,
    EventRejected,
    Failure,
    HeldBack,
    InMemoryBroker,
    OutboxEvent,
    OutboxPublisher,
    PostgresOutboxStore,
    RedisStreamsBroker,
    ReplayResult,
    SqliteOutboxStore,
)
from resilience.testing import FakeClock

TOPIC = "orders"
SLOW = "slow"  # the key whose batches the gate brokers hold up
RELAY_SCRIPT = str(Path(__file__).parent / "support" / "outbox_relay_proc.py")
Results = list[BaseException | None]


# --- the outbox under test ---------------------------------------------------------------


@dataclass
class Outbox:
    """One outbox database: its store, and business connections to the same database."""

    kind: str
    store: SqliteOutboxStore | PostgresOutboxStore
    path: str = ""
    dsn: str = ""
    schema: str = ""

    @property
    def table(self) -> str:
        return self.name(self.store.table)

    def name(self, bare: str) -> str:
        """A table name as the business connection spells it."""
        return f"{self.schema}.{bare}" if self.kind == "postgres" else bare

    @contextlib.contextmanager
    def connect(self, timeout: float = 10.0) -> Iterator[Any]:
        """A business connection with transactions the caller commits or rolls back."""
        if self.kind == "sqlite":
            sconn = sqlite3.connect(self.path, timeout=timeout)
            try:
                yield sconn
            finally:
                sconn.close()
        else:
            import psycopg

            pconn = psycopg.connect(self.dsn)
            try:
                yield pconn
            finally:
                pconn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a read-only statement; ``{t}`` stands for the outbox table."""
        with self.connect() as conn:
            rows: list[tuple[Any, ...]] = conn.execute(sql.replace("{t}", self.table)).fetchall()
            conn.rollback()
        return rows

    def scalar(self, sql: str) -> Any:
        return self.query(sql)[0][0]

    def enqueue_many(
        self, keys: Sequence[str | None], *, per_txn: int = 200, start: int = 0
    ) -> list[str]:
        """Enqueue one event per key (payload ``{"seq": n}``), committing every ``per_txn``."""
        ids: list[str] = []
        with self.connect() as conn:
            for n, key in enumerate(keys, start):
                ids.append(self.store.enqueue(conn, topic=TOPIC, key=key, payload={"seq": n}))
                if len(ids) % per_txn == 0:
                    conn.commit()
            conn.commit()
        return ids

    @property
    def seen(self) -> str:
        """Every row the table took: itself on SQLite (published rows stay), on
        PostgreSQL (which deletes them) a copy the test's trigger keeps."""
        return self.table if self.kind == "sqlite" else f"{self.schema}.seen"

    def key_of(self) -> dict[int, str | None]:
        return {int(r[0]): r[1] for r in self.query(f"SELECT id, key FROM {self.seen}")}

    def id_of(self) -> dict[str, int]:
        """Row id by event id."""
        rows = self.query(f"SELECT event_id, id FROM {self.seen}")
        return {str(r[0]): int(r[1]) for r in rows}

    def max_attempts(self) -> int:
        """The most attempts any event took, published or not."""
        most = f"SELECT max(attempts) FROM {self.table}"
        if self.kind == "postgres":
            most = f"SELECT greatest(({most}), (SELECT max(attempts) FROM {self.seen}))"
        return int(self.scalar(most) or 0)

    def taken(self) -> int:
        """Events the outbox holds or remembers (on PostgreSQL, its ``_ids`` table)."""
        table = self.table if self.kind == "sqlite" else f"{self.table}_ids"
        return int(self.scalar(f"SELECT count(*) FROM {table}"))

    def leased(self) -> list[int]:
        rows = self.query("SELECT id FROM {t} WHERE lease_owner IS NOT NULL ORDER BY id")
        return [int(r[0]) for r in rows]

    def unfinished(self) -> int:
        """Rows not published, or still carrying a lease."""
        return int(
            self.scalar(
                "SELECT count(*) FROM {t} WHERE status <> 'published' OR lease_owner IS NOT NULL"
            )
        )

    def relay_config(self) -> dict[str, Any]:
        """The store part of a relay process's configuration."""
        if self.kind == "sqlite":
            return {"store": "sqlite", "path": self.path}
        return {"store": "postgres", "dsn": self.dsn, "schema": self.schema}


MakeOutbox = Callable[..., Outbox]


def _keep_a_copy(dsn: str, schema: str) -> None:
    """A test-side trigger copies each row's id, event id and key: PostgreSQL's store
    deletes published rows, and the tests check key order against what was enqueued."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE TABLE IF NOT EXISTS {schema}.seen (
                id bigint PRIMARY KEY, event_id uuid NOT NULL, key text,
                attempts integer NOT NULL DEFAULT 0);
            CREATE OR REPLACE FUNCTION {schema}.keep_a_copy() RETURNS trigger
            LANGUAGE plpgsql AS $fn$
            BEGIN
                IF TG_OP = 'INSERT' THEN
                    INSERT INTO {schema}.seen VALUES (NEW.id, NEW.event_id, NEW.key);
                ELSE  -- published: the attempts it took, for the tests that count them
                    UPDATE {schema}.seen SET attempts = OLD.attempts WHERE id = OLD.id;
                END IF;
                RETURN NULL;
            END
            $fn$;
            CREATE OR REPLACE TRIGGER keep_a_copy AFTER INSERT OR DELETE
                ON {schema}.resilience_outbox
                FOR EACH ROW EXECUTE FUNCTION {schema}.keep_a_copy();
            """
        )


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def make_outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeOutbox]:
    """``make_outbox(clock=None)``: a store (schema created) on this test's database; every
    call gives a new store object on the same database. Stores are closed afterwards."""
    kind: str = request.param
    dsn = schema = ""
    if kind == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("pg_schema")
    path = str(tmp_path / "app.db")
    stores: list[SqliteOutboxStore | PostgresOutboxStore] = []

    def make(clock: FakeClock | None = None) -> Outbox:
        store: SqliteOutboxStore | PostgresOutboxStore
        if kind == "sqlite":
            store = SqliteOutboxStore(path, clock=clock)
        else:
            store = PostgresOutboxStore(dsn, schema=schema, clock=clock)
        stores.append(store)
        store.create_schema()
        if kind == "postgres":
            _keep_a_copy(dsn, schema)
        return Outbox(kind, store, path=path, dsn=dsn, schema=schema)

    try:
        yield make
    finally:
        for store in stores:
            store.close()


@pytest.fixture
def tracked() -> Iterator[Callable[[str], redis.Redis]]:
    """``tracked(url)``: a Redis client for a broker. Every connection made from it (the
    broker's own pool copies the client's settings) is closed after the test, even if the
    broker left one open: a socket left to the garbage collector would fail whichever
    later test collects it (``test_broker_close_closes_its_own_connections`` checks the
    broker itself)."""
    with contextlib.ExitStack() as stack:
        yield lambda url: stack.enter_context(tracked_redis(url))


# --- helpers -----------------------------------------------------------------------------


def first_deliveries(ids: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    first: list[int] = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            first.append(i)
    return first


def assert_key_order(delivered: Iterable[int], key_of: Mapping[int, str | None]) -> None:
    """For each key, the first delivery of each row comes in id order."""
    per_key: dict[str | None, list[int]] = {}
    for i in first_deliveries(delivered):
        per_key.setdefault(key_of[i], []).append(i)
    for key, ids in per_key.items():
        assert ids == sorted(ids), f"key {key!r} delivered out of id order: {ids}"


def state(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read afresh (mypy would narrow the property)."""
    return breaker.state


def stream_template(prefix: str) -> str:
    return f"{prefix}outbox:{{topic}}"


def stream_event_ids(client: redis.Redis, prefix: str, topic: str = TOPIC) -> list[str]:
    """The ``event_id`` of every entry of a topic's stream, in stream order."""
    entries: Any = client.xrange(stream_template(prefix).replace("{topic}", topic))
    return [fields[b"event_id"].decode() for _, fields in entries]


def drain(pub: OutboxPublisher, *, limit: int = 500) -> list[BatchResult]:
    """run_once until a batch claims nothing (a FakeClock never moves here)."""
    results = []
    for _ in range(limit):
        result = pub.run_once()
        results.append(result)
        if not result.claimed:
            return results
    raise AssertionError(f"no idle batch after {limit} runs")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def until(predicate: Callable[[], bool], seconds: float) -> None:
    with anyio.fail_after(seconds):
        while True:
            if predicate():
                return
            await anyio.sleep(0.005)


def spawn_relay(config: Mapping[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, RELAY_SCRIPT, json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def reap(procs: Iterable[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


class GateBroker:
    """An InMemoryBroker, except that a batch holding a ``SLOW`` event hangs: async until
    cancelled, sync until ``release`` is set. ``entered`` says a slow batch is in hand."""

    def __init__(self) -> None:
        self.inner = InMemoryBroker()
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        if any(e.key == SLOW for e in events):
            self.entered.set()
            if not self.release.wait(10):
                raise AssertionError("the test never released the slow batch")
        return self.inner.publish(events)

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        if any(e.key == SLOW for e in events):
            self.entered.set()
            await anyio.sleep_forever()
        return self.inner.publish(events)

    def classify(self, error: BaseException) -> Failure:
        return self.inner.classify(error)


# --- 1. rolled-back transactions ---------------------------------------------------------


def test_rolled_back_transaction_publishes_nothing(make_outbox: MakeOutbox) -> None:
    ob = make_outbox()
    orders = ob.name("orders")
    with ob.connect() as conn:
        conn.execute(f"CREATE TABLE {orders} (id integer PRIMARY KEY, item text NOT NULL)")
        conn.commit()

        conn.execute(f"INSERT INTO {orders} VALUES (1, 'lost')")
        ob.store.enqueue(conn, topic=TOPIC, key="o1", payload={"order": 1})
        assert ob.scalar("SELECT count(*) FROM {t}") == 0  # not visible before commit
        conn.rollback()

        conn.execute(f"INSERT INTO {orders} VALUES (2, 'kept')")
        kept = ob.store.enqueue(conn, topic=TOPIC, key="o2", payload={"order": 2})
        conn.commit()

        # An error after the enqueue, inside the same transaction, takes both back.
        def place_declined_order() -> None:
            conn.execute(f"INSERT INTO {orders} VALUES (3, 'declined')")
            ob.store.enqueue(conn, topic=TOPIC, key="o3", payload={"order": 3})
            raise RuntimeError("payment declined")

        with pytest.raises(RuntimeError, match="payment declined"):
            place_declined_order()
        conn.rollback()

    assert ob.query(f"SELECT id FROM {orders}") == [(2,)]
    assert ob.store.stats().pending == 1
    broker = InMemoryBroker()
    pub = OutboxPublisher(ob.store, broker=broker)
    results = drain(pub)
    assert [(r.claimed, r.published) for r in results] == [(1, 1), (0, 0)]
    assert [m.event_id for m in broker.messages] == [kept]
    assert broker.messages[0].json() == {"order": 2}
    assert ob.taken() == 1
    assert ob.unfinished() == 0


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's async side needs asyncio
async def test_rolled_back_async_connection_publishes_nothing(
    postgres_dsn: str, pg_schema: str
) -> None:
    import psycopg

    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    try:
        await store.acreate_schema()
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            await store.aenqueue(conn, topic=TOPIC, key="a", payload={"n": 1})
            await conn.rollback()
            kept = await store.aenqueue(conn, topic=TOPIC, key="a", payload={"n": 2})
            await conn.commit()

            async def failing_transaction() -> None:
                async with conn.transaction():
                    await store.aenqueue(conn, topic=TOPIC, key="a", payload={"n": 3})
                    raise ZeroDivisionError

            with pytest.raises(ZeroDivisionError):
                await failing_transaction()
            await conn.commit()
        broker = InMemoryBroker()
        pub = OutboxPublisher(store, broker=broker)
        first = await pub.arun_once()
        second = await pub.arun_once()
        assert (first.claimed, first.published, second.claimed) == (1, 1, 0)
        assert [m.event_id for m in broker.messages] == [kept]
        assert (await store.astats()).pending == 0
    finally:
        await store.aclose()


# --- 2. concurrent relays: exactly once, keys in order -----------------------------------


@pytest.mark.slow
def test_eight_relay_threads_publish_each_row_once_in_key_order(make_outbox: MakeOutbox) -> None:
    ob = make_outbox()
    rng = random.Random(2)
    keys = [f"k{rng.randrange(50)}" for _ in range(2000)]
    enqueued = ob.enqueue_many(keys[:1000])
    broker = InMemoryBroker()
    writer_done = threading.Event()
    deadline = time.monotonic() + 60

    def relay(pub: OutboxPublisher) -> list[BatchResult]:
        results = []
        while True:
            result = pub.run_once()
            results.append(result)
            if result.claimed:
                continue
            if writer_done.is_set() and ob.store.stats().pending == 0:
                return results
            if time.monotonic() > deadline:
                raise TimeoutError("the outbox did not drain")
            time.sleep(0.002)

    pubs = [
        OutboxPublisher(ob.store, broker=broker, batch_size=20, name=f"relay-{i}") for i in range(8)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(pubs)) as pool:
        futures = [pool.submit(relay, pub) for pub in pubs]
        try:
            # The other half arrives while the relays run, 50 events per transaction.
            enqueued += ob.enqueue_many(keys[1000:], per_txn=50, start=1000)
        finally:
            writer_done.set()
        per_relay = [f.result() for f in futures]

    delivered = [m.id for m in broker.messages]
    assert len(delivered) == 2000
    assert len(set(delivered)) == 2000  # exactly once
    assert {m.event_id for m in broker.messages} == set(enqueued)
    assert_key_order(delivered, ob.key_of())
    # No write-back was ever refused: no lease ran out and was taken over.
    assert all(r.fenced == 0 and r.outage is None for rs in per_relay for r in rs)
    assert sum(r.published for rs in per_relay for r in rs) == 2000
    assert sum(1 for rs in per_relay if any(r.published for r in rs)) >= 2
    assert ob.unfinished() == 0
    stats = ob.store.stats()
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)


@pytest.mark.slow
@pytest.mark.redis
def test_four_relay_processes_publish_each_row_once_to_redis_streams(
    make_outbox: MakeOutbox, redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    ob = make_outbox()
    rng = random.Random(4)
    enqueued = ob.enqueue_many([f"k{rng.randrange(50)}" for _ in range(2000)])
    go_key = f"{redis_prefix}go"
    config = {
        **ob.relay_config(),
        "redis_url": redis_url,
        "stream": stream_template(redis_prefix),
        "batch_size": 20,
        "lease": 30.0,
        "mode": "drain",
        "go_key": go_key,
    }
    procs = [spawn_relay(config) for _ in range(4)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        redis_client.set(go_key, 1, ex=60)
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        reap(procs)

    delivered_events = stream_event_ids(redis_client, redis_prefix)
    id_of = ob.id_of()
    delivered = [id_of[e] for e in delivered_events]
    assert len(delivered) == 2000
    assert Counter(delivered_events) == Counter(enqueued)  # exactly once
    assert_key_order(delivered, ob.key_of())
    assert sum(r["published"] for r in reports) == 2000
    assert all(r["fenced"] == 0 for r in reports)
    assert sum(1 for r in reports if r["published"]) >= 2, reports
    assert ob.unfinished() == 0


# --- 3. a relay killed mid-batch ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
def test_relay_killed_mid_batch_loses_nothing(
    make_outbox: MakeOutbox,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    tracked: Callable[[str], redis.Redis],
) -> None:
    ob = make_outbox()
    lease = 3.0
    # Ids 1-10 are keys a and b only; c and d start at 11.
    keys = ["a", "b"] * 5 + ["a", "b", "c", "d"] * 5
    enqueued = ob.enqueue_many(keys)
    key_of = ob.key_of()
    config = {
        **ob.relay_config(),
        "redis_url": redis_url,
        "stream": stream_template(redis_prefix),
        "batch_size": 10,
        "lease": lease,
        "mode": "hang",
        "publish_first": 5,
    }
    proc = spawn_relay(config)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("hung "), line
        claimed: list[int] = json.loads(line.removeprefix("hung "))
        # The relay holds its claim (the lease is running) and has sent half of it.
        assert ob.store.stats().in_flight == 10
        assert ob.leased() == claimed == sorted(key_of)[:10]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        reap([proc])
    sent_before_death = set(claimed[:5])
    assert len(stream_event_ids(redis_client, redis_prefix)) == 5

    broker = RedisStreamsBroker(
        tracked(redis_url), stream=stream_template(redis_prefix), timeout=0.5
    )
    pub = OutboxPublisher(ob.store, broker=broker, batch_size=10, lease=lease)
    try:
        # While the dead relay's lease holds, its keys (a, b) are blocked; c and d flow.
        first = pub.run_once()
        assert first.claimed == 10
        assert first.published == 10
        id_of = ob.id_of()
        fresh = [id_of[e] for e in stream_event_ids(redis_client, redis_prefix)[5:]]
        assert {key_of[i] for i in fresh} == {"c", "d"}
        deadline = time.monotonic() + lease + 5
        while ob.store.stats().pending:
            if not pub.run_once().claimed:
                assert time.monotonic() < deadline, "the dead relay's rows never came back"
                time.sleep(0.05)
    finally:
        broker.close()

    delivered_events = stream_event_ids(redis_client, redis_prefix)
    assert set(delivered_events) == set(enqueued)
    delivered = [id_of[e] for e in delivered_events]
    counts = Counter(delivered)
    # Only what the dead relay sent before dying arrives twice; everything else once.
    assert {i for i, n in counts.items() if n > 1} == sent_before_death
    assert max(counts.values()) == 2
    assert_key_order(delivered, key_of)
    assert ob.unfinished() == 0
    assert ob.max_attempts() == 0


# --- 4. per-key order with failures ------------------------------------------------------


class FlakyBroker:
    """An InMemoryBroker that fails whole batches (outage) and single events (poison) at
    random, and counts what it did."""

    def __init__(self, seed: int, outage_rate: float, poison_rate: float) -> None:
        self.inner = InMemoryBroker()
        self.outage_rate = outage_rate
        self.poison_rate = poison_rate
        self.outages = 0
        self.held = 0
        self.poisoned: Counter[int] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        with self._lock:
            if self._rng.random() < self.outage_rate:
                self.outages += 1
                raise BrokerUnavailable("injected outage")
            doomed = {e.id for e in events if self._rng.random() < self.poison_rate}
            self.inner.reject(lambda e: e.id in doomed)
            try:
                results = self.inner.publish(events)
            finally:
                self.inner.reject(None)
            for event, result in zip(events, results, strict=True):
                if isinstance(result, HeldBack):
                    self.held += 1
                elif isinstance(result, EventRejected):
                    self.poisoned[event.id] += 1
            return results

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        return self.publish(events)

    def classify(self, error: BaseException) -> Failure:
        return self.inner.classify(error)


@pytest.mark.slow
def test_key_order_holds_with_four_relays_and_a_failing_broker(make_outbox: MakeOutbox) -> None:
    ob = make_outbox()
    rng = random.Random(7)
    enqueued = ob.enqueue_many([f"k{rng.randrange(10)}" for _ in range(600)])
    broker = FlakyBroker(seed=11, outage_rate=0.15, poison_rate=0.03)
    deadline = time.monotonic() + 60

    def relay(pub: OutboxPublisher) -> list[BatchResult]:
        results = []
        while True:
            result = pub.run_once()
            results.append(result)
            if result.claimed:
                continue
            if ob.store.stats().pending == 0:
                return results
            if time.monotonic() > deadline:
                raise TimeoutError("the outbox did not drain")
            time.sleep(min(result.retry_after, 0.02) or 0.002)

    pubs = [
        OutboxPublisher(
            ob.store,
            broker=broker,
            breaker=CircuitBreaker(f"flaky-{i}", failure_threshold=3, recovery_timeout=0.02),
            batch_size=20,
            max_attempts=100,
            backoff=Backoff(base=0.002, maximum=0.02),
            name=f"relay-{i}",
        )
        for i in range(4)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(pubs)) as pool:
        per_relay = [f.result() for f in [pool.submit(relay, pub) for pub in pubs]]

    # The failures happened, and held-back events were needed to keep keys in order.
    assert broker.outages > 0
    assert sum(broker.poisoned.values()) > 0
    assert broker.held > 0
    delivered = [m.id for m in broker.inner.messages]
    assert {m.event_id for m in broker.inner.messages} == set(enqueued)
    assert len(delivered) == len(set(delivered)) == 600  # leases held: once each
    assert_key_order(delivered, ob.key_of())
    # Attempts count poison only: outages and held-back events never count.
    attempts = {int(r[0]): int(r[1]) for r in ob.query("SELECT id, attempts FROM {t}")}
    assert attempts == {i: broker.poisoned[i] for i in attempts}
    assert all(r.fenced == 0 for rs in per_relay for r in rs)
    stats = ob.store.stats()
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)
    assert ob.unfinished() == 0


# --- 5. no high-water mark ---------------------------------------------------------------


def test_row_committed_after_a_higher_id_is_published(make_outbox: MakeOutbox) -> None:
    ob = make_outbox()
    broker = InMemoryBroker()
    pub = OutboxPublisher(ob.store, broker=broker)
    if ob.kind == "sqlite":
        # SQLite serializes writers: a transaction holding the lower id keeps every later
        # writer out until it ends, so commits cannot come out of id order. Show that.
        with ob.connect() as a, ob.connect(timeout=0.05) as b:
            ob.store.enqueue(a, topic=TOPIC, key="a", payload={"txn": "A"})
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                ob.store.enqueue(b, topic=TOPIC, key="b", payload={"txn": "B"})
            b.rollback()
            a.commit()
            ob.store.enqueue(b, topic=TOPIC, key="b", payload={"txn": "B"})
            b.commit()
        drain(pub)
        assert [m.json() for m in broker.messages] == [{"txn": "A"}, {"txn": "B"}]
        return

    with ob.connect() as a, ob.connect() as b:
        eid_a = ob.store.enqueue(a, topic=TOPIC, key="a", payload={"txn": "A"})
        eid_b = ob.store.enqueue(b, topic=TOPIC, key="b", payload={"txn": "B"})
        b.commit()
        assert [(r.claimed, r.published) for r in drain(pub)] == [(1, 1), (0, 0)]
        assert [m.event_id for m in broker.messages] == [eid_b]
        a.commit()
    assert [(r.claimed, r.published) for r in drain(pub)] == [(1, 1), (0, 0)]
    assert [m.event_id for m in broker.messages] == [eid_b, eid_a]
    assert broker.messages[1].id < broker.messages[0].id  # A holds the lower id
    assert ob.unfinished() == 0


def test_row_ready_after_a_higher_id_was_published_is_published(
    make_outbox: MakeOutbox, clock: FakeClock
) -> None:
    # The analogue that works on both stores: a delayed event holds the lower id.
    ob = make_outbox(clock=clock)
    broker = InMemoryBroker()
    pub = OutboxPublisher(ob.store, broker=broker, clock=clock)
    with ob.connect() as conn:
        late = ob.store.enqueue(conn, topic=TOPIC, key="late", payload={}, delay=60)
        early = ob.store.enqueue(conn, topic=TOPIC, key="early", payload={})
        conn.commit()
    drain(pub)
    assert [m.event_id for m in broker.messages] == [early]
    clock.advance(60)
    drain(pub)
    assert [m.event_id for m in broker.messages] == [early, late]
    assert ob.unfinished() == 0


# --- 6. an outage through a fault proxy --------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("fault", ["reset", pytest.param("blackhole", marks=pytest.mark.slow)])
def test_outage_opens_the_breaker_and_stops_contacting_redis(
    fault: str,
    make_outbox: MakeOutbox,
    clock: FakeClock,
    proxy: FaultProxy,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    tracked: Callable[[str], redis.Redis],
) -> None:
    ob = make_outbox(clock=clock)
    enqueued = ob.enqueue_many([f"k{i % 4}" for i in range(40)])
    key_of = ob.key_of()
    client = tracked(proxy.url_for(redis_url))
    broker = RedisStreamsBroker(client, stream=stream_template(redis_prefix), timeout=0.5)
    breaker = CircuitBreaker(
        f"outbox-outage-{fault}", failure_threshold=3, recovery_timeout=10, clock=clock
    )
    pub = OutboxPublisher(ob.store, broker=broker, breaker=breaker, batch_size=5, clock=clock)

    def connection_attempts() -> int:
        stats = proxy.stats
        return stats.accepted + stats.rejected

    try:
        assert [pub.run_once().published for _ in range(2)] == [5, 5]
        if fault == "reset":
            proxy.cut(refuse=False)  # connections are accepted and reset: countable
        else:
            proxy.blackhole()
        proxy.reset_stats()

        tripping = [pub.run_once() for _ in range(3)]
        assert [(r.claimed, r.published, r.released) for r in tripping] == [(5, 0, 5)] * 3
        assert all(r.outage is not None for r in tripping)
        assert state(breaker) is CircuitState.OPEN
        assert connection_attempts() <= 3

        proxy.reset_stats()
        open_phase = []
        for _ in range(35 if fault == "reset" else 25):
            clock.advance(1.0)
            open_phase.append(pub.run_once())
        probes = [r for r in open_phase if r.probe]
        assert len(probes) == (3 if fault == "reset" else 2)  # one per recovery timeout
        assert all((r.claimed, r.released) == (1, 1) and r.outage is not None for r in probes)
        rejected = [r for r in open_phase if not r.probe]
        assert all(r.breaker_open and r.claimed == 0 for r in rejected)
        assert connection_attempts() == len(probes)  # nothing but the probes reached out
        assert ob.max_attempts() == 0
        stats = ob.store.stats()
        assert (stats.pending, stats.in_flight, stats.dead) == (30, 0, 0)
        assert len(stream_event_ids(redis_client, redis_prefix)) == 10

        proxy.restore()
        for _ in range(200):
            result = pub.run_once()
            assert result.outage is None
            if result.breaker_open:
                clock.advance(max(result.retry_after, 0.1))
            elif not result.claimed and not ob.store.stats().pending:
                break
        else:
            raise AssertionError("the backlog did not drain after restore")
        assert state(breaker) is CircuitState.CLOSED
    finally:
        broker.close()

    delivered_events = stream_event_ids(redis_client, redis_prefix)
    assert set(delivered_events) == set(enqueued)
    if fault == "reset":
        # The reset batches never reached Redis: exactly once.
        assert Counter(delivered_events) == Counter(enqueued)
    id_of = ob.id_of()
    assert_key_order([id_of[e] for e in delivered_events], key_of)
    assert ob.unfinished() == 0
    assert ob.max_attempts() == 0


# --- 7. poison and replay ----------------------------------------------------------------


@pytest.mark.redis
def test_poison_goes_dead_while_other_keys_flow_and_replay_brings_it_back(
    make_outbox: MakeOutbox,
    clock: FakeClock,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    tracked: Callable[[str], redis.Redis],
) -> None:
    ob = make_outbox(clock=clock)
    client = tracked(redis_url)
    template = stream_template(redis_prefix)
    with ob.connect() as conn:
        eids: dict[str, str] = {}
        for name, key, payload in [
            ("a1", "a", {"n": 1}),
            ("big1", "big", {"blob": "x" * 2000}),
            ("a2", "a", {"n": 2}),
            ("big2", "big", {"n": 2}),
            ("b1", "b", {"n": 1}),
            ("big3", "big", {"n": 3}),
        ]:
            eids[name] = ob.store.enqueue(conn, topic=TOPIC, key=key, payload=payload)
        conn.commit()
    id_of = ob.id_of()
    big1 = id_of[eids["big1"]]
    small = RedisStreamsBroker(client, stream=template, max_bytes=600, timeout=0.5)
    breaker = CircuitBreaker("outbox-poison", failure_threshold=3, clock=clock)
    pub = OutboxPublisher(
        ob.store,
        broker=small,
        breaker=breaker,
        max_attempts=3,
        backoff=Backoff(base=5.0, factor=2.0, maximum=60.0, jitter=0.0),
        clock=clock,
    )

    def delivered() -> list[str]:
        names = {v: k for k, v in eids.items()}
        return [names[e] for e in stream_event_ids(redis_client, redis_prefix)]

    def big1_row() -> tuple[Any, ...]:
        return ob.query(f"SELECT status, attempts, last_error FROM {{t}} WHERE id = {big1}")[0]

    try:
        first = pub.run_once()
        assert (first.claimed, first.published, first.retried, first.released) == (6, 3, 1, 2)
        assert delivered() == ["a1", "a2", "b1"]
        status, attempts, error = big1_row()
        assert (status, attempts) == ("pending", 1)
        assert error.startswith("poison: EventTooLarge: event is ")
        assert error.endswith("bytes; the broker accepts at most 600")
        assert ob.store.stats().blocked_keys == 1
        # Backing off, big1 blocks its key, but not the others.
        with ob.connect() as conn:
            eids["a3"] = ob.store.enqueue(conn, topic=TOPIC, key="a", payload={"n": 3})
            conn.commit()
        assert [(r.claimed, r.published) for r in drain(pub)] == [(1, 1), (0, 0)]
        assert delivered() == ["a1", "a2", "b1", "a3"]

        clock.advance(5.0)  # the first backoff
        second = pub.run_once()
        assert (second.claimed, second.retried, second.released) == (3, 1, 2)
        assert big1_row()[:2] == ("pending", 2)
        clock.advance(9.0)
        assert pub.run_once().claimed == 0  # the second backoff (10 s) still runs
        clock.advance(1.0)
        third = pub.run_once()
        assert (third.claimed, third.dead, third.released) == (3, 1, 2)
        # Dead rows do not block their key: big2 and big3 go now.
        assert [(r.claimed, r.published) for r in drain(pub)] == [(2, 2), (0, 0)]
        assert delivered() == ["a1", "a2", "b1", "a3", "big2", "big3"]
        (dead,) = ob.store.dead()
        assert (dead.id, dead.key, dead.attempts) == (big1, "big", 3)
        assert dead.last_error is not None
        assert dead.last_error.startswith("poison: EventTooLarge")
        stats = pub.stats()
        assert (stats.pending, stats.dead, stats.breaker_state) == (0, 1, "closed")

        assert pub.replay(key="big") == ReplayResult(1, None)
        status, attempts, error = big1_row()
        assert (status, attempts) == ("pending", 0)
        assert error.startswith("poison: EventTooLarge")  # kept for the record
    finally:
        small.close()

    roomy = RedisStreamsBroker(client, stream=template, timeout=0.5)
    try:
        fixed = OutboxPublisher(ob.store, broker=roomy, clock=clock)
        assert [(r.claimed, r.published) for r in drain(fixed)] == [(1, 1), (0, 0)]
    finally:
        roomy.close()
    assert delivered() == ["a1", "a2", "b1", "a3", "big2", "big3", "big1"]
    assert ob.unfinished() == 0


def test_replay_is_paced_by_a_token_bucket_and_refused_while_the_breaker_is_open(
    make_outbox: MakeOutbox, clock: FakeClock
) -> None:
    ob = make_outbox(clock=clock)
    broker = InMemoryBroker()
    breaker = CircuitBreaker(
        "outbox-replay", failure_threshold=1, recovery_timeout=10, success_threshold=1, clock=clock
    )
    pub = OutboxPublisher(ob.store, broker=broker, breaker=breaker, max_attempts=1, clock=clock)
    broker.reject(lambda e: e.key != "x")
    ob.enqueue_many([f"d{i}" for i in range(6)])
    burial = pub.run_once()
    # Six write-backs in one executemany, all counted: none reported as fenced.
    assert (burial.claimed, burial.dead, burial.fenced) == (6, 6, 0)
    broker.reject(None)

    # An outage opens the breaker (threshold 1); replay then moves nothing.
    ob.enqueue_many(["x"])
    with broker.outage():
        assert pub.run_once().outage is not None
    assert state(breaker) is CircuitState.OPEN
    assert pub.replay() == ReplayResult(0, "breaker open")
    assert ob.store.stats().dead == 6

    clock.advance(10)
    probe = pub.run_once()
    assert (probe.probe, probe.published) == (True, 1)
    assert state(breaker) is CircuitState.CLOSED

    limiter = TokenBucket(rate=1.0, capacity=2.0, clock=clock)
    start, wall = clock.monotonic(), clock.time()
    assert pub.replay(limiter=limiter) == ReplayResult(6, None)
    # Chunks of `capacity` rows, one per two seconds: 2 at once, 2 at +2 s, 2 at +4 s, and
    # the last (empty) chunk at +6 s.
    assert clock.monotonic() - start == pytest.approx(6.0)
    times = [
        float(r[0]) - wall
        for r in ob.query("SELECT available_at FROM {t} WHERE key LIKE 'd%' ORDER BY id")
    ]
    assert times == pytest.approx([0.0, 0.0, 2.0, 2.0, 4.0, 4.0])
    assert ob.store.stats().dead == 0
    drain(pub)
    assert sorted(m.key or "" for m in broker.messages) == ["d0", "d1", "d2", "d3", "d4", "d5", "x"]
    assert ob.unfinished() == 0


def connected_as(client: redis.Redis, name: str, *, expect: int) -> int:
    """How many connections Redis has under ``name``, waiting briefly for ``expect``
    (the server sees a client's close a moment after the client made it)."""
    deadline = time.monotonic() + 1.0
    while True:
        count = sum(1 for c in client.client_list() if c.get("name") == name)
        if count == expect or time.monotonic() > deadline:
            return count
        time.sleep(0.01)


def an_event() -> OutboxEvent:
    return OutboxEvent(1, str(uuid.uuid4()), TOPIC, "k", "{}", {}, 0.0, 0)


@pytest.mark.redis
def test_broker_close_closes_its_own_connections(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    # The broker publishes on a pool of its own (built from the client's settings, so
    # the connection carries the client's name); close() must disconnect that pool.
    name = f"{redis_prefix.replace(':', '-')}broker"
    with tracked_redis(redis_url, client_name=name) as client:
        broker = RedisStreamsBroker(client, stream=stream_template(redis_prefix), timeout=1.0)
        assert broker.publish([an_event()]) == [None]
        assert connected_as(redis_client, name, expect=1) == 1
        broker.close()
        assert connected_as(redis_client, name, expect=0) == 0


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio needs asyncio
async def test_broker_aclose_closes_its_own_connections(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    import redis.asyncio

    name = f"{redis_prefix.replace(':', '-')}abroker"
    made: list[Any] = []

    class TrackedConnection(redis.asyncio.Connection):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            made.append(self)

    client = redis.asyncio.Redis.from_url(
        redis_url, client_name=name, connection_class=TrackedConnection
    )
    try:
        broker = RedisStreamsBroker(client, stream=stream_template(redis_prefix), timeout=1.0)
        assert await broker.apublish([an_event()]) == [None]
        assert connected_as(redis_client, name, expect=1) == 1
        await broker.aclose()
        assert connected_as(redis_client, name, expect=0) == 0
    finally:
        await client.aclose()
        for conn in made:  # whatever the broker left open
            await conn.disconnect()


# --- 8. the loops ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_run_drains_idles_and_gives_back_its_claim_when_cancelled(
    make_outbox: MakeOutbox,
) -> None:
    ob = make_outbox()
    ob.enqueue_many([f"k{i % 3}" for i in range(30)])
    broker = GateBroker()
    results: list[BatchResult] = []
    pub = OutboxPublisher(
        ob.store,
        broker=broker,
        batch_size=10,
        min_poll=0.01,
        max_poll=0.1,
        listeners=[results.append],
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pub.run)
        # Drained: every event sent, and the relay has found nothing left to claim.
        await until(lambda: len(broker.inner.messages) == 30 and results[-1].claimed == 0, 10)
        drained = len(results)
        await anyio.sleep(0.3)
        idle = results[drained:]
        assert idle, "the relay stopped polling"
        assert [r.claimed for r in idle] == [0] * len(idle)
        assert len(idle) <= 12  # backs off towards max_poll instead of polling every 10 ms
        assert_key_order([m.id for m in broker.inner.messages], ob.key_of())

        ob.enqueue_many([SLOW] * 3, start=30)
        await until(broker.entered.is_set, 10)
        assert ob.store.stats().in_flight == 3
        tg.cancel_scope.cancel()

    assert len(broker.inner.messages) == 30
    rows = ob.query("SELECT status, lease_owner, lease_until FROM {t} WHERE key = 'slow'")
    assert rows == [("pending", None, None)] * 3
    assert ob.leased() == []
    assert ob.store.stats().in_flight == 0


@pytest.mark.slow
def test_run_blocking_stops_after_the_batch_in_hand(make_outbox: MakeOutbox) -> None:
    ob = make_outbox()
    ob.enqueue_many([f"k{i % 3}" for i in range(20)])
    broker = GateBroker()
    pub = OutboxPublisher(ob.store, broker=broker, batch_size=10, min_poll=0.01, max_poll=0.05)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loop = pool.submit(pub.run_blocking, stop)
        try:
            wait_until(lambda: len(broker.inner.messages) == 20, 10, "the backlog to drain")
            time.sleep(0.1)  # idle polling
            assert not loop.done()
            ob.enqueue_many([SLOW] * 3, start=20)
            assert broker.entered.wait(10)
            stop.set()
            ob.enqueue_many(["late"] * 2, start=23)  # arrives after the stop
        finally:
            stop.set()
            broker.release.set()
        loop.result(timeout=10)

    # The batch in hand was finished, nothing was claimed after the stop.
    assert [m.key for m in broker.inner.messages[20:]] == [SLOW] * 3
    assert (
        ob.query("SELECT status, lease_owner FROM {t} WHERE key = 'late'")
        == [("pending", None)] * 2
    )
    assert ob.leased() == []


# --- 9. cancelled during a slow publish -----------------------------------------------


@pytest.mark.anyio
async def test_relay_cancelled_in_a_slow_publish_releases_its_rows_at_once(
    make_outbox: MakeOutbox, clock: FakeClock
) -> None:
    ob = make_outbox(clock=clock)
    ob.enqueue_many([SLOW] * 5)
    broker = GateBroker()
    breaker = CircuitBreaker("outbox-cancel", clock=clock)
    pub = OutboxPublisher(ob.store, broker=broker, breaker=breaker, lease=30, clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pub.arun_once)
        await until(broker.entered.is_set, 10)
        assert (await ob.store.astats()).in_flight == 5
        tg.cancel_scope.cancel()

    assert ob.leased() == []
    assert (await ob.store.astats()).in_flight == 0
    assert state(breaker) is CircuitState.CLOSED
    stats = breaker.stats()
    assert (stats.consecutive_failures, stats.trips) == (0, 0)  # cancelling is no failure
    # Claimable at once: the fake clock has not moved, so no lease could have run out.
    other = InMemoryBroker()
    second = OutboxPublisher(ob.store, broker=other, clock=clock)
    result = await second.arun_once()
    assert (result.claimed, result.published) == (5, 5)
    assert [m.key for m in other.messages] == [SLOW] * 5
    assert ob.unfinished() == 0
