"""A relay of tests/test_outbox_fleet_probe.py: ``python outbox_fleet_proc.py '<json>'``.

An :class:`OutboxPublisher` on a SQLite file shared with the other relays, publishing to
Redis Streams (``broker_url``, the test's fault proxy) with a fleet breaker
(``fleet_url``: Redis directly). It prints ``ready``, then every state change of its
breaker as a JSON line (``{"t", "old", "new", "trigger"}``), and runs ``run_blocking``
until the file ``stop`` exists; then one JSON summary line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

import resilience as rs
from resilience.integrations.outbox import OutboxPublisher, RedisStreamsBroker, SqliteOutboxStore


def main(argv: list[str]) -> int:
    config: dict[str, Any] = json.loads(argv[1])
    stop_file = Path(config["stop"])
    store = SqliteOutboxStore(config["path"])
    client = redis.Redis.from_url(config["broker_url"])
    broker = RedisStreamsBroker(client, stream=config["stream"], timeout=0.3)
    fleet = rs.RedisFleet(
        config["fleet_url"], quorum=0.5, interval=config["interval"], prefix=config["prefix"]
    )
    breaker = rs.CircuitBreaker(
        "outbox:fleet",
        failure_threshold=3,
        recovery_timeout=config["recovery"],
        success_threshold=1,
        fleet=fleet,
    )

    def changed(event: rs.BreakerEvent) -> None:
        if isinstance(event, rs.StateChanged):
            line = {"t": time.time(), "old": event.old.value, "new": event.new.value}
            print(json.dumps({**line, "trigger": event.trigger.value}), flush=True)

    breaker.add_listener(changed, only=(rs.StateChanged,))
    publisher = OutboxPublisher(
        store, broker=broker, breaker=breaker, batch_size=20, lease=5.0, max_poll=0.05
    )
    stop = threading.Event()
    relay = threading.Thread(target=publisher.run_blocking, args=(stop,), daemon=True)
    fleet.flush()
    store.stats()
    print("ready", flush=True)
    relay.start()
    while not stop_file.exists():
        time.sleep(0.01)
    stop.set()
    relay.join(10.0)
    totals = publisher._read()
    print(json.dumps({"summary": True, "published": totals["published"]}), flush=True)
    fleet.close()
    broker.close()
    store.close()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
