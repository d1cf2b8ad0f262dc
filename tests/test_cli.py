"""The operator CLI against real Redis, PostgreSQL and SQLite, and the shared breaker store
it reads."""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

import resilience as rs
import resilience.__main__ as cli
from resilience.__main__ import _parser, main
from resilience.integrations.outbox import PostgresOutboxStore, RowFailure, SqliteOutboxStore


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
    assert "purged 5 event(s)" in out


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


# -- one line and exit status 2 on every error -------------------------------------------


def _sqlite_store(tmp_path: Path) -> tuple[SqliteOutboxStore, list[str]]:
    path = tmp_path / "shop.db"
    store = SqliteOutboxStore(path)
    store.create_schema()
    return store, ["--sqlite", str(path)]


@pytest.mark.parametrize(
    ("argv", "prog", "says"),
    [
        (["outbox", "purge", "--older-than", "0"], "outbox purge", "argument --older-than"),
        (["outbox", "purge", "--older-than", "nan"], "outbox purge", "argument --older-than"),
        (["outbox", "dead", "--limit", "0"], "outbox dead", "argument --limit"),
        (["outbox", "dead", "--limit", "-1"], "outbox dead", "argument --limit"),
        (["outbox", "replay", "--limit", "0"], "outbox replay", "argument --limit"),
        (["outbox", "replay", "--id", "x"], "outbox replay", "argument --id"),
        (["outbox", "replay", "--older-than", "5"], "outbox replay",
         "unrecognized arguments: --older-than 5"),
        (["outbox", "stats", "--dead"], "outbox stats", "unrecognized arguments: --dead"),
        (["outbox", "stats", "--schema", "s"], "outbox stats", "--schema is for --postgres"),
        (["outbox", "stats", "--table", "no-such;"], "outbox stats",
         "table must be a plain SQL identifier"),
        (["outbox"], "outbox", "required: ACTION"),
    ],
)  # fmt: skip
def test_bad_values_and_options_get_one_line_and_status_2(
    argv: list[str], prog: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, where = _sqlite_store(tmp_path)
    code, out, err = run(capsys, *argv, *(where if len(argv) > 1 else []))
    store.close()
    assert code == 2
    assert out == ""
    assert err.startswith(f"resilience {prog}: error: ")
    assert says in err
    assert len(err.splitlines()) == 1


def test_bad_bucket_values_are_refused_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = _free_port()  # nothing listens: a connection attempt would fail differently
    for option in ("--limit", "--rate", "--capacity"):
        code, _, err = run(capsys, "buckets", "--redis", f"redis://127.0.0.1:{port}/0",
                           option, "0")  # fmt: skip
        assert code == 2
        assert err.startswith(f"resilience buckets: error: argument {option}: ")
        assert len(err.splitlines()) == 1


def test_a_missing_extra_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if resilience[postgres] were absent
    code, _, err = run(capsys, "outbox", "stats", "--postgres",
                       "postgresql://postgres@127.0.0.1:5432/postgres")  # fmt: skip
    assert code == 2
    assert err == (
        "resilience outbox stats: error: psycopg is not installed: "
        "pip install 'resilience[postgres]'\n"
    )


def test_a_missing_sqlite_table_says_to_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    code, _, err = run(capsys, "outbox", "stats", "--sqlite", str(path), "--table", "orders_box")
    assert code == 2
    assert err == (
        "resilience outbox stats: error: the outbox table 'orders_box' does not exist: "
        "create it with SqliteOutboxStore(...).create_schema() (idempotent)\n"
    )


@pytest.mark.postgres
def test_a_missing_postgres_table_says_to_create_it(
    postgres_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "outbox", "dead", "--postgres", postgres_dsn, "--schema", pg_schema)
    assert code == 2
    assert err == (
        f"resilience outbox dead: error: the outbox table '{pg_schema}.resilience_outbox' "
        "does not exist: create it with PostgresOutboxStore(...).create_schema() (idempotent)\n"
    )


# -- force -------------------------------------------------------------------------------


@pytest.mark.redis
def test_force_refuses_a_name_no_instance_reports_unless_anyway(
    store: rs.RedisBreakerStore, redis_client: redis.Redis, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    where = ["--redis", redis_url, "--prefix", store.prefix]
    payments = rs.CircuitBreaker("payments", store=store)
    _wait(lambda: len(store.states()) == 1)

    code, out, err = run(capsys, "force", "paymnets", "open", *where)
    assert code == 2
    assert out == ""
    assert err.startswith(
        f"resilience force: error: no instance reports breaker 'paymnets' "
        f"under prefix {store.prefix!r}"
    )
    assert "--anyway" in err
    assert len(err.splitlines()) == 1
    assert redis_client.exists(store.force_key("paymnets")) == 0  # nothing was set

    code, out, _ = run(capsys, "force", "later", "open", *where, "--anyway")
    assert code == 0
    assert "instances that start later will apply it" in out
    assert redis_client.get(store.force_key("later")) == b"open"
    later = rs.CircuitBreaker("later", store=store)
    _wait(lambda: later.state is rs.CircuitState.OPEN)

    code, out, _ = run(capsys, "force", "later", "auto", *where)
    assert code == 0
    assert "lifted" in out
    assert redis_client.exists(store.force_key("later")) == 0
    _wait(lambda: later.mode.value == "normal")

    code, out, _ = run(capsys, "force", "nobody", "auto", *where)
    assert code == 0
    assert "nothing to lift" in out
    assert payments.state is rs.CircuitState.CLOSED  # never touched by any of it


@pytest.mark.redis
def test_force_open_for_a_while_then_every_instance_probes(
    store: rs.RedisBreakerStore, redis_client: redis.Redis, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    where = ["--redis", redis_url, "--prefix", store.prefix]
    search = rs.CircuitBreaker("search", store=store)
    _wait(lambda: len(store.states()) == 1)

    code, _, err = run(capsys, "force", "search", "closed", "--for", "30", *where)
    assert code == 2
    assert "--for goes with open only" in err
    for bad in ("-1", "0", "nan", "inf", "soon"):
        code, _, err = run(capsys, "force", "search", "open", "--for", bad, *where)
        assert code == 2, bad
        assert "positive number of seconds" in err, (bad, err)

    code, out, _ = run(capsys, "force", "search", "open", "--for", "30", *where)
    assert code == 0
    assert "forced open for 30s on 1 instance(s)" in out
    _wait(lambda: search.state is rs.CircuitState.OPEN)
    row = next(r for r in store.states() if r["name"] == "search")
    assert row["force"] == "open"
    assert row.get("force_until")


# -- outbox replay has no silent cap -----------------------------------------------------


def _kill_all(store: SqliteOutboxStore) -> int:
    events = store.claim("cli-test", 10_000, 30.0)
    return store.fail("cli-test", [RowFailure(e.id, "rejected", 0.0, True) for e in events])


def test_replay_moves_every_match_in_chunks_unless_limited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, where = _sqlite_store(tmp_path)
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        for i in range(250):
            store.enqueue(conn, topic="orders", key=None, payload=i)
    conn.close()
    assert _kill_all(store) == 250
    limits: list[int] = []
    real = SqliteOutboxStore.replay

    def spy(self: SqliteOutboxStore, **kwargs: Any) -> int:
        limits.append(kwargs["limit"])
        return real(self, **kwargs)

    monkeypatch.setattr(SqliteOutboxStore, "replay", spy)
    monkeypatch.setattr(cli, "_REPLAY_CHUNK", 100)

    code, out, _ = run(capsys, "outbox", "replay", "--limit", "120", *where)
    assert code == 0
    assert "replayed 120 dead event(s)" in out
    assert "stopped at --limit 120" in out
    assert limits == [100, 20]
    assert store.stats().dead == 130

    limits.clear()
    code, out, _ = run(capsys, "outbox", "replay", *where)
    assert code == 0
    assert "replayed 130 dead event(s)" in out
    assert "--limit" not in out
    assert limits == [100, 30]
    assert (store.stats().dead, store.stats().pending) == (0, 250)
    store.close()


def test_replay_stops_at_the_dead_count_it_started_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, where = _sqlite_store(tmp_path)
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        _fill(store, conn)
    conn.close()
    _kill_all(store)
    real = SqliteOutboxStore.replay

    def replay_and_die_again(self: SqliteOutboxStore, **kwargs: Any) -> int:
        moved = real(self, **kwargs)
        _kill_all(self)  # a relay that kills every replayed event again at once
        return moved

    monkeypatch.setattr(SqliteOutboxStore, "replay", replay_and_die_again)
    monkeypatch.setattr(cli, "_REPLAY_CHUNK", 2)
    code, out, _ = run(capsys, "outbox", "replay", *where)
    assert code == 0
    assert "replayed 5 dead event(s)" in out  # not a loop over the same five forever
    store.close()


# -- help, version, the docs -------------------------------------------------------------


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def test_every_argument_has_help_and_every_command_a_description() -> None:
    for path, parser in _walk(_parser()):
        assert parser.description, path
        for action in parser._actions:
            assert action.help, (path, action.dest)
            assert action.help != argparse.SUPPRESS, (path, action.dest)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, (path, choice.dest)
        assert parser.format_help()  # a stray % in a help text would raise here


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out == f"resilience {rs.__version__}\n"


ROOT = Path(__file__).resolve().parent.parent


def test_python_m_resilience_runs_from_the_repository_root(tmp_path: Path) -> None:
    store, where = _sqlite_store(tmp_path)
    store.close()
    # From the root, ./resilience shadows the installed link tree that maps integrations.
    version = subprocess.run([sys.executable, "-m", "resilience", "--version"],
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert (version.returncode, version.stdout) == (0, f"resilience {rs.__version__}\n"), (
        version.stderr
    )
    stats = subprocess.run([sys.executable, "-m", "resilience", "outbox", "stats", *where],
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.splitlines()[2].split()[:3] == ["0", "0", "0"]


OPERATIONS = ROOT / "docs" / "operations.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_SPAN = re.compile(r"`([^`]+)`")
_SYNOPSIS = re.compile(r"[\[\]()|]|\.\.\.|\b[A-Z]{2,}\b")  # optional parts, placeholders


def _doc_commands() -> tuple[list[list[str]], list[str]]:
    """The runnable commands and the synopses in docs/operations.md."""
    text = OPERATIONS.read_text()
    runnable: list[list[str]] = []
    for lang, body in _FENCE.findall(text):
        if lang != "sh":
            continue  # ```text blocks show output
        env: dict[str, str] = {}
        for line in body.splitlines():
            tokens = shlex.split(line, comments=True)
            if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
                name, _, value = tokens[0].partition("=")
                env[name] = value
            elif tokens and tokens[0] == "resilience":
                runnable.append([env[t[1:]] if t.startswith("$") else t for t in tokens[1:]])
    synopses = []
    for span in _SPAN.findall(_FENCE.sub("", text)):
        command = " ".join(span.replace("\\|", "|").split())
        if not command.startswith("resilience ") or ": error: " in command:
            continue
        if _SYNOPSIS.search(command):
            synopses.append(command)
        else:
            runnable.append(shlex.split(command)[1:])
    return runnable, synopses


def test_the_commands_in_the_operations_guide_parse_as_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runnable, _ = _doc_commands()
    assert ["force", "payments", "open", "--redis", "redis://127.0.0.1:6379/0"] in runnable
    assert len(runnable) >= 8
    for argv in runnable:
        assert _parse(argv) == 0, (argv, capsys.readouterr().err)


def _parse(argv: list[str]) -> object:
    """The exit status argparse gives ``argv`` (0 when it parses), without running it."""
    try:
        _, extra = _parser().parse_known_args(argv)
    except SystemExit as exit:  # --help and --version exit 0; an error exits 2
        return exit.code
    return 0 if not extra else f"unrecognized: {extra}"


def test_the_command_table_lists_every_command_with_every_option() -> None:
    _, synopses = _doc_commands()
    leaves = {path for path, p in _walk(_parser()) if path and _subparsers(p) is None}
    covered = set()
    for synopsis in synopses:
        parser = _parser()
        path: list[str] = []
        for word in synopsis.split()[1:]:
            sub = _subparsers(parser)
            if sub is None or word not in sub.choices:
                break
            parser, path = sub.choices[word], [*path, word]
        covered.add(tuple(path))
        options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
        assert set(re.findall(r"--[a-z][a-z-]*", synopsis)) == options - {"--help"}, synopsis
    assert covered == leaves
