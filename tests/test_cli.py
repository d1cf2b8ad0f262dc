"""The operator CLI against real Redis, PostgreSQL and SQLite, and the shared breaker store
it reads."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from resilience.integrations.outbox import PostgresOutboxStore, RowFailure, SqliteOutboxStore

import resilience as rs
from resilience.__main__ import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the shared breaker store ------------------------------------------------------------


@pytest.fixture
def store(redis_client: redis.Redis, redis_prefix: str) -> Iterator[rs.RedisBreakerStore]:
    s = rs.RedisBreakerStore(redis_client, prefix=f"{redis_prefix}:breaker", interval=0.05)
    yield s
    s.close()


def _wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.redis
def test_breakers_publish_their_state_and_obey_an_override(
    store: rs.RedisBreakerStore, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    payments = rs.CircuitBreaker("payments", failure_threshold=1, store=store)
    search = rs.CircuitBreaker("search:eu", store=store)
    _wait(lambda: len(store.states()) == 2)
    code, out, _ = run(capsys, "breakers", "--redis", redis_url, "--prefix", store.prefix)
    assert code == 0
    assert "payments" in out
    assert "search:eu" in out
    assert "closed" in out

    with pytest.raises(ConnectionError):
        payments.call(_boom)
    _wait(lambda: any(r.get("state") == "open" for r in store.states()))

    code, out, _ = run(capsys, "force", "search:eu", "open", "--redis", redis_url,
                       "--prefix", store.prefix)  # fmt: skip
    assert code == 0
    assert "forced open" in out
    _wait(lambda: search.state is rs.CircuitState.OPEN)
    with pytest.raises(rs.CircuitOpenError):
        search.call(lambda: None)
    _, out, _ = run(capsys, "breakers", "--redis", redis_url, "--prefix", store.prefix)
    search_row = next(line for line in out.splitlines() if line.startswith("search:eu"))
    assert search_row.split()[-1] == "open"  # the forced column

    run(capsys, "force", "search:eu", "closed", "--redis", redis_url, "--prefix", store.prefix)
    _wait(lambda: search.state is rs.CircuitState.CLOSED and search.mode.value != "normal")
    run(capsys, "force", "search:eu", "auto", "--redis", redis_url, "--prefix", store.prefix)
    _wait(lambda: search.mode.value == "normal")
    assert search.call(lambda: 7) == 7


def _boom() -> None:
    raise ConnectionError("down")


@pytest.mark.redis
def test_a_breaker_store_outage_never_touches_the_calls(
    proxy: object, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis(host=proxy.host, port=proxy.port)  # type: ignore[attr-defined]
    store = rs.RedisBreakerStore(client, prefix=redis_prefix, interval=0.05, timeout=0.1)
    breaker = rs.CircuitBreaker("b", store=store)
    _wait(lambda: bool(store.states()))
    proxy.cut()  # type: ignore[attr-defined]
    for _ in range(100):
        assert breaker.call(lambda: 1) == 1
    _wait(lambda: "breaker store unavailable" in caplog.text)
    proxy.restore()  # type: ignore[attr-defined]
    _wait(lambda: "breaker store recovered" in caplog.text)
    assert caplog.text.count("breaker store unavailable") == 1
    store.close()
    client.close()


def test_the_breaker_store_needs_a_sync_client() -> None:
    import redis.asyncio

    with pytest.raises(TypeError, match="client"):
        rs.RedisBreakerStore(redis.asyncio.Redis())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="store"):
        rs.CircuitBreaker("x", store=object())


# -- buckets -----------------------------------------------------------------------------


@pytest.mark.redis
def test_buckets_shows_levels_from_redis(
    redis_client: redis.Redis, redis_prefix: str, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    backend = rs.RedisBackend(redis_client, prefix=redis_prefix)
    default_name = rs.TokenBucket(rate=1.0, capacity=10, backend=backend)
    custom = rs.TokenBucket(rate=2.0, capacity=4, backend=backend, name="api")
    for _ in range(4):
        default_name.try_acquire("user:1")
    custom.try_acquire("user:2", cost=3)
    code, out, _ = run(capsys, "buckets", "--redis", redis_url, "--prefix", redis_prefix)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("user:1"))
    assert row.split()[1] == "10@1/s"
    tokens = float(row.split()[2].split("/")[0])
    assert 5.9 <= tokens <= 6.5  # 4 of 10 taken, a little refilled since
    api = next(line for line in out.splitlines() if line.startswith("user:2"))
    assert api.split()[2] == "-"  # a custom name does not say its rate
    _, out, _ = run(capsys, "buckets", "--redis", redis_url, "--prefix", redis_prefix,
                    "--match", "user:2", "--rate", "2", "--capacity", "4")  # fmt: skip
    assert "user:1" not in out
    assert float(out.splitlines()[2].split()[2].split("/")[0]) == pytest.approx(1.0, abs=0.3)
    backend.close()


# -- errors ------------------------------------------------------------------------------


def test_bad_urls_and_missing_servers_get_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "breakers", "--redis", "http://x")
    assert code == 2
    assert "--redis must be a redis:// URL" in err
    port = _free_port()
    code, _, err = run(capsys, "buckets", "--redis", f"redis://127.0.0.1:{port}/0")
    assert code == 2
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in err
    code, _, err = run(capsys, "outbox", "stats", "--sqlite", str(tmp_path / "nope.db"))
    assert code == 2
    assert "no such file" in err
    code, _, err = run(capsys, "outbox", "stats", "--postgres", "mysql://x")
    assert code == 2
    assert "--postgres must be" in err
    code, _, err = run(capsys, "outbox", "stats", "--postgres",
                       f"postgresql://postgres@127.0.0.1:{port}/postgres")  # fmt: skip
    assert code == 2
    assert "cannot use the outbox store" in err
    assert "Traceback" not in err


def test_the_console_script_is_installed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "resilience", "--help"],
        capture_output=True, text=True, check=True, cwd="/",
    )  # fmt: skip
    for command in ("demo", "breakers", "force", "buckets", "outbox"):
        assert command in out.stdout


# -- outbox ------------------------------------------------------------------------------


def _fill(store: SqliteOutboxStore | PostgresOutboxStore, conn: object) -> None:
    for i in range(5):
        store.enqueue(conn, topic="orders" if i < 3 else "users", key=f"k{i}", payload=i)


def _kill_two(store: SqliteOutboxStore | PostgresOutboxStore) -> list[int]:
    events = store.claim("cli-test", 2, 30.0)
    store.fail("cli-test", [RowFailure(e.id, "poison: too large", 0.0, True) for e in events])
    return [e.id for e in events]


def _outbox_story(capsys: pytest.CaptureFixture[str], where: list[str],
                  store: SqliteOutboxStore | PostgresOutboxStore) -> None:  # fmt: skip
    ids = _kill_two(store)
    code, out, _ = run(capsys, "outbox", "stats", *where)
    assert code == 0
    assert out.splitlines()[2].split()[:3] == ["3", "0", "2"]
    _, out, _ = run(capsys, "outbox", "dead", *where)
    assert [int(line.split()[0]) for line in out.splitlines()[2:]] == ids
    assert "poison: too large" in out
    _, out, _ = run(capsys, "outbox", "replay", "--id", str(ids[0]), *where)
    assert "replayed 1 dead event(s)" in out
    _, out, _ = run(capsys, "outbox", "replay", "--topic", "orders", *where)
    assert "replayed 1 dead event(s)" in out
    _, out, _ = run(capsys, "outbox", "dead", *where)
    assert "no dead events" in out
    events = store.claim("cli-test", 10, 30.0)
    store.mark_published("cli-test", [e.id for e in events])
    _, out, _ = run(capsys, "outbox", "purge", "--older-than", "0.000001", *where)
    assert "purged 5 row(s)" in out


def test_outbox_commands_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shop.db"
    store = SqliteOutboxStore(path)
    store.create_schema()
    with sqlite3.connect(path) as conn:
        _fill(store, conn)
    conn.close()
    _outbox_story(capsys, ["--sqlite", str(path)], store)
    store.close()


@pytest.mark.postgres
def test_outbox_commands_on_postgres(
    postgres_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    store.create_schema()
    with psycopg.connect(postgres_dsn) as conn:
        _fill(store, conn)
    _outbox_story(capsys, ["--postgres", postgres_dsn, "--schema", pg_schema], store)
    store.close()
