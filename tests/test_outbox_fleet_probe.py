"""One probe per fleet for the outbox relay (issue 16, part 4).

Four relay processes share a SQLite outbox and publish to Redis Streams through a
FaultProxy; their breakers decide as a fleet (RedisFleet on the shared Redis, own
prefix). Through a broker outage, the connections that reach the proxy are at most the
probes one relay alone would send: one per recovery window, fleet-wide. Nothing is lost.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from support.faultproxy import FaultProxy

import resilience as rs
from resilience.integrations.outbox import (
    InMemoryBroker,
    OutboxPublisher,
    SqliteOutboxStore,
)

SCRIPT = str(Path(__file__).parent / "support" / "outbox_fleet_proc.py")
RELAYS = 4
INTERVAL = 0.1
RECOVERY = 0.5
OUTAGE = 5 * RECOVERY
TOPIC = "orders"


def test_the_publisher_takes_a_fleet_for_its_breaker(tmp_path: Path, redis_url: str) -> None:
    store = SqliteOutboxStore(str(tmp_path / "o.db"))
    with rs.RedisFleet(redis_url, interval=60.0, prefix="rstest:outbox-fleet") as fleet:
        publisher = OutboxPublisher(store, broker=InMemoryBroker(), fleet=fleet)
        assert publisher.breaker.fleet is fleet
        assert publisher.breaker.name == "outbox:outbox"
        with pytest.raises(ValueError, match="fleet"):
            OutboxPublisher(
                store, broker=InMemoryBroker(), breaker=rs.CircuitBreaker("b"), fleet=fleet
            )
        with pytest.raises(TypeError, match="fleet must be a RedisFleet"):
            OutboxPublisher(store, broker=InMemoryBroker(), fleet=object())  # type: ignore[arg-type]
    store.close()


class Relay:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready"):
                self.ready.set()
            elif line.startswith("{"):
                record = json.loads(line)
                if record.get("summary"):
                    self.summary = record
                else:
                    self.events.append(record)

    @property
    def state(self) -> str:
        return self.events[-1]["new"] if self.events else "closed"


@pytest.fixture
def broker_proxy(redis_url: str) -> Iterator[FaultProxy]:
    target = urlsplit(redis_url)
    with FaultProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        yield proxy


def enqueue(store: SqliteOutboxStore, start: int, n: int) -> None:
    conn = sqlite3.connect(store.path)
    try:
        for i in range(start, start + n):
            store.enqueue(conn, topic=TOPIC, key=f"k{i % 5}", payload={"seq": i})
        conn.commit()
    finally:
        conn.close()


def wait(what: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


@pytest.mark.slow
def test_four_relays_probe_the_broker_once_per_window_fleet_wide(
    tmp_path: Path, redis_url: str, redis_prefix: str, broker_proxy: FaultProxy
) -> None:
    path = str(tmp_path / "outbox.db")
    store = SqliteOutboxStore(path)
    store.create_schema()
    enqueue(store, 0, 20)
    stream = f"{redis_prefix}outbox:{{topic}}"
    config = {
        "path": path,
        "stop": str(tmp_path / "stop"),
        "broker_url": broker_proxy.url_for(redis_url),
        "fleet_url": redis_url,
        "prefix": redis_prefix + "fleet",
        "stream": stream,
        "interval": INTERVAL,
        "recovery": RECOVERY,
    }
    relays = [
        Relay(
            subprocess.Popen(
                [sys.executable, SCRIPT, json.dumps(config)], stdout=subprocess.PIPE, text=True
            )
        )
        for _ in range(RELAYS)
    ]
    client = redis.Redis.from_url(redis_url)
    key = stream.format(topic=TOPIC)
    try:
        for r in relays:
            assert r.ready.wait(30.0), "a relay did not start"
        wait(lambda: client.xlen(key) == 20, 10.0, "the first events were not published")
        broker_proxy.cut(refuse=False)  # every connection is accepted and reset at once
        enqueue(store, 20, 40)
        wait(lambda: all(r.state == "open" for r in relays), 5.0, "the relays did not open")
        broker_proxy.reset_stats()
        time.sleep(OUTAGE)
        stats = broker_proxy.stats
        connects = stats.accepted + stats.rejected
        one_relay = OUTAGE / RECOVERY + 1  # what one relay alone would probe, at most
        assert 1 <= connects <= one_relay, stats
        opened = [e for r in relays for e in r.events if e["new"] == "half_open"]
        assert len(opened) <= one_relay  # one holder at a time, one per window
        broker_proxy.restore()
        wait(lambda: client.xlen(key) == 60, 10.0, "not everything arrived after the outage")
        entries: Any = client.xrange(key)
        ids = {fields[b"event_id"] for _, fields in entries}
        assert len(ids) == 60  # nothing lost, nothing twice
    finally:
        (tmp_path / "stop").touch()
        for r in relays:
            try:
                r.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            r.thread.join(5.0)
            if r.proc.stdout is not None:
                r.proc.stdout.close()
        client.close()
        store.close()
