"""Structured logs: every line the package writes carries its fields as ``extra``
(names in resilience.events.LOG_FIELDS), one line per transition, never per call."""

from __future__ import annotations

import ast
import json
import logging
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.faultproxy import FaultProxy

import resilience as rs
from resilience.events import LOG_FIELDS, key_hash
from resilience.integrations.outbox import InMemoryBroker, OutboxPublisher, SqliteOutboxStore
from resilience.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
LOGGER_NAMES = {"log", "logger", "_log", "breaker_log"}
# Extra names a file carries besides LOG_FIELDS: the fleet's own, which its tests read.
LEGACY = {"resilience/breaker/fleet.py": {"breaker", "fleet", "state", "error_class"}}


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "resilience_event", None) == event]


@pytest.fixture
def logs() -> Iterator[Capture]:
    capture = Capture()
    logger = logging.getLogger("resilience")
    old_level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(old_level)


class JsonFormatter(logging.Formatter):
    """What a JSON log handler (python-json-logger, structlog's bridge) makes of a record."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k.startswith("resilience_")}
        return json.dumps({"level": record.levelname, "message": record.getMessage(), **fields})


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k.startswith("resilience_")}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- every line ----------------------------------------------------------------------------


def _log_calls(path: Path) -> Iterator[ast.Call]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOG_METHODS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in LOGGER_NAMES
        ):
            yield node


def test_every_log_line_carries_known_fields() -> None:
    missing, unknown, calls = [], [], 0
    for base in ("resilience", "integrations"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = set(LOG_FIELDS) | LEGACY.get(rel, set())
            for call in _log_calls(path):
                calls += 1
                extra = next((k.value for k in call.keywords if k.arg == "extra"), None)
                if extra is None:
                    missing.append(f"{rel}:{call.lineno}")
                    continue
                if isinstance(extra, ast.Dict):
                    keys = {str(k.value) for k in extra.keys if isinstance(k, ast.Constant)}
                    if "resilience_event" not in keys or keys - allowed:
                        unknown.append(f"{rel}:{call.lineno}: {sorted(keys)}")
    assert calls > 30
    assert missing == []
    assert unknown == []


def test_the_fields_are_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Logs") :]
    for field in LOG_FIELDS:
        assert f"`{field}`" in section, field


def test_key_hash_is_short_stable_and_not_the_key() -> None:
    assert key_hash("user:42") == key_hash("user:42")
    assert key_hash("user:42") != key_hash("user:43")
    assert len(key_hash("user:42")) == 16
    assert "42" not in key_hash("user:42")


# -- breaker transitions -------------------------------------------------------------------


def test_one_line_per_breaker_transition_never_per_call(logs: Capture, clock: FakeClock) -> None:
    breaker = rs.CircuitBreaker(
        "payments", failure_threshold=2, recovery_timeout=5.0, success_threshold=1, clock=clock
    )
    for _ in range(20):
        breaker.call(lambda: None)
    assert logs.records == []
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
    for _ in range(100):
        with pytest.raises(rs.CircuitOpenError):
            breaker.call(lambda: None)
    [opened] = logs.about("breaker.state_changed")
    assert opened.levelno == logging.WARNING
    assert opened.name == "resilience.breaker"
    assert fields(opened) == {
        "resilience_event": "breaker.state_changed",
        "resilience_name": "payments",
        "resilience_from_state": "closed",
        "resilience_to_state": "open",
        "resilience_reason": "trip",
    }
    clock.advance(5.0)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)  # the probe fails: still the same outage
    clock.advance(5.0)
    breaker.call(lambda: None)  # the probe succeeds
    moves = [
        (r.levelno, r.resilience_from_state, r.resilience_to_state)  # type: ignore[attr-defined]
        for r in logs.about("breaker.state_changed")
    ]
    assert moves == [
        (logging.WARNING, "closed", "open"),
        (logging.DEBUG, "open", "half_open"),
        (logging.DEBUG, "half_open", "open"),
        (logging.DEBUG, "open", "half_open"),
        (logging.INFO, "half_open", "closed"),
    ]
    breaker.force_open()
    last = logs.about("breaker.state_changed")[-1]
    assert (last.levelno, last.resilience_reason) == (logging.INFO, "force_open")  # type: ignore[attr-defined]


def test_a_json_formatter_shows_the_fields(logs: Capture) -> None:
    breaker = rs.CircuitBreaker("json", failure_threshold=1)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    [record] = logs.about("breaker.state_changed")
    line = json.loads(JsonFormatter().format(record))
    assert line == {
        "level": "WARNING",
        "message": "resilience breaker 'json': closed -> open (trip)",
        "resilience_event": "breaker.state_changed",
        "resilience_name": "json",
        "resilience_from_state": "closed",
        "resilience_to_state": "open",
        "resilience_reason": "trip",
    }


# -- the Redis guard -----------------------------------------------------------------------


def guard_breaker(clock: FakeClock) -> rs.CircuitBreaker:
    return rs.CircuitBreaker(
        "guard", failure_threshold=1, recovery_timeout=1.0, success_threshold=1,
        include=(redis.RedisError, OSError), clock=clock,
    )  # fmt: skip


@pytest.mark.redis
def test_redis_guard_down_and_up_once_each(
    logs: Capture, proxy: FaultProxy, redis_url: str, redis_prefix: str, clock: FakeClock
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    backend = rs.RedisBackend(client, prefix=redis_prefix, timeout=1.0, on_error="local",
                              breaker=guard_breaker(clock))  # fmt: skip
    bucket = rs.TokenBucket(rate=100.0, capacity=10, backend=backend)
    try:
        assert bucket.try_acquire("user:42").allowed
        proxy.cut()
        for _ in range(50):
            bucket.try_acquire("user:42")
        clock.advance(1.5)
        bucket.try_acquire("user:42")  # a failed probe: the same outage
        [down] = logs.about("backend.unavailable")
        assert down.levelno == logging.WARNING
        assert fields(down) == {
            "resilience_event": "backend.unavailable",
            "resilience_name": f"redis:{redis_prefix}",
            "resilience_from_state": "available",
            "resilience_to_state": "unavailable",
            "resilience_error_type": fields(down)["resilience_error_type"],
            "resilience_on_error": "local",
        }
        assert fields(down)["resilience_error_type"] in ("ConnectionError", "TimeoutError")
        proxy.restore()
        clock.advance(1.5)
        for _ in range(50):
            bucket.try_acquire("user:42")
        [up] = logs.about("backend.recovered")
        assert fields(up)["resilience_to_state"] == "available"
        assert len(logs.about("backend.unavailable")) == 1
        assert not any("user:42" in r.getMessage() for r in logs.records)
    finally:
        backend.close()
        client.close()


def test_cache_on_an_unreachable_redis_logs_once(logs: Capture, clock: FakeClock) -> None:
    client = redis.Redis(port=closed_port(), socket_connect_timeout=0.2)
    remote = rs.RedisCache(client, prefix="logs-test", timeout=0.2, breaker=guard_breaker(clock))
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=10, ttl=1.0), remote=remote,
                            ttl=5.0, name="pages")  # fmt: skip
    try:
        for i in range(20):
            assert cache.get_or_load(f"user:{i}", lambda: "v") == "v"  # falls through
        [down] = logs.about("backend.unavailable")
        assert fields(down)["resilience_name"] == "redis-cache:logs-test"
        assert fields(down)["resilience_error_type"] == "ConnectionError"
        assert all("user:" not in r.getMessage() for r in logs.records)
        lines = [r for r in logs.records if r.name.startswith("resilience")]
        assert len([r for r in lines if r.levelno >= logging.WARNING]) == 2  # guard + breaker
    finally:
        cache.close()
        client.close()


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    # The subscriber thread reconnects on real time (a pause that grows to 2 s).
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.redis
def test_the_invalidation_channel_lost_and_back_once_each(
    logs: Capture, proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    prefix = redis_prefix.rstrip(":")
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=10, ttl=1.0),
                            remote=rs.RedisCache(client, prefix=prefix), ttl=5.0)  # fmt: skip
    try:
        assert cache.remote is not None
        wait_until(lambda: cache.remote is not None and cache.remote.listening)
        assert logs.about("cache.channel_back") == []  # the first subscribe is no recovery
        proxy.cut()
        wait_until(lambda: logs.about("cache.channel_lost"))
        proxy.restore()
        wait_until(lambda: logs.about("cache.channel_back"))
        [lost] = logs.about("cache.channel_lost")
        [back] = logs.about("cache.channel_back")
        assert fields(lost)["resilience_name"] == prefix
        assert fields(lost)["resilience_error_type"]
        assert (fields(back)["resilience_from_state"], fields(back)["resilience_to_state"]) == (
            "lost",
            "listening",
        )
    finally:
        cache.close()
        client.close()


def test_a_failing_ttl_function_logs_a_key_hash_not_the_key(logs: Capture) -> None:
    cache = rs.TwoTierCache(local=rs.LocalCache(max_entries=10, ttl=1.0), ttl=5.0, name="users")

    def ttl(value: object) -> float:
        raise RuntimeError("bad ttl")

    for i in range(3):
        assert cache.get_or_load(f"email:alice{i}@example.com", lambda: "v", ttl=ttl) == "v"
    records = logs.about("cache.ttl_failed")
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    first = fields(records[0])
    assert first["resilience_name"] == "users"
    assert first["resilience_error_type"] == "RuntimeError"
    assert len(first["resilience_key_hash"]) == 16
    assert first["resilience_key_hash"] in records[0].getMessage()
    assert all("alice" not in r.getMessage() for r in records)


# -- the outbox ----------------------------------------------------------------------------


def test_a_broker_outage_logs_one_line_not_one_per_batch(
    logs: Capture, clock: FakeClock, sqlite_outbox: tuple[SqliteOutboxStore, sqlite3.Connection]
) -> None:
    store, conn = sqlite_outbox
    broker = InMemoryBroker()
    breaker = rs.CircuitBreaker("broker", failure_threshold=2, recovery_timeout=5.0,
                                success_threshold=1, clock=clock)  # fmt: skip
    pub = OutboxPublisher(store, broker=broker, breaker=breaker, name="orders", clock=clock)
    with conn:
        for i in range(10):
            store.enqueue(conn, topic="orders", key=f"order-{i}", payload=i)
    with broker.outage():
        for _ in range(30):
            pub.run_once()
        clock.advance(6.0)
        for _ in range(30):
            pub.run_once()
    warnings = [r for r in logs.records if r.levelno >= logging.WARNING]
    assert [fields(r)["resilience_event"] for r in warnings] == ["breaker.state_changed"]
    assert fields(warnings[0])["resilience_name"] == "broker"
    assert fields(warnings[0])["resilience_to_state"] == "open"
    clock.advance(6.0)
    for _ in range(5):
        pub.run_once()
    last = logs.about("breaker.state_changed")[-1]
    assert (last.levelno, fields(last)["resilience_to_state"]) == (logging.INFO, "closed")
    assert all("order-" not in r.getMessage() for r in logs.records)


def test_dead_events_log_one_line_a_batch_with_fields(
    logs: Capture, clock: FakeClock, sqlite_outbox: tuple[SqliteOutboxStore, sqlite3.Connection]
) -> None:
    store, conn = sqlite_outbox
    broker = InMemoryBroker()
    broker.reject(lambda event: True)
    pub = OutboxPublisher(store, broker=broker, name="orders", clock=clock, max_attempts=1)
    with conn:
        for i in range(3):
            store.enqueue(conn, topic="orders", key=f"k{i}", payload=i)
    pub.run_once()
    [dead] = logs.about("outbox.dead")
    assert fields(dead)["resilience_name"] == "orders"
    assert fields(dead)["resilience_count"] == 3
    assert fields(dead)["resilience_topic"] == "orders"
    assert fields(dead)["resilience_error_type"]


def test_a_failing_listener_logs_its_first_failure_not_every_call(logs: Capture) -> None:
    breaker = rs.CircuitBreaker("noisy")

    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    breaker.add_listener(broken)
    for _ in range(50):
        breaker.call(lambda: None)
    failures = logs.about("listener.failed")
    assert len(failures) == 50  # every failure is there for DEBUG handlers...
    assert [r.levelno for r in failures if r.levelno > logging.DEBUG] == [logging.ERROR]
    assert failures[0].exc_info is not None  # ...and the first one at ERROR, with its cause
