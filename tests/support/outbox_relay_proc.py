"""A relay process for tests/test_outbox_relay.py: ``python outbox_relay_proc.py '<json>'``.

The JSON argument says which store (``{"store": "sqlite", "path": ...}`` or
``{"store": "postgres", "dsn": ..., "schema": ...}``), which Redis (``redis_url``,
``stream`` template), ``batch_size``, ``lease`` and ``mode``:

- ``"drain"``: print ``ready``, wait for the Redis key ``go_key`` to exist, then publish
  until no row is pending; print one JSON line ``{"published": n, "batches": m,
  "fenced": f}`` and exit.
- ``"hang"``: claim one batch, XADD the first ``publish_first`` events of it to Redis,
  print ``hung <json list of the claimed row ids>`` and sleep (the test SIGKILLs us).

Only the standard library, redis and resilience are used, so the process starts quickly.

:func:`tracked_redis` is shared with the tests: a client whose connections, including
those of the pool a broker copies from it, are closed on exit whatever the broker does.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from resilience.integrations.outbox import (
    Failure,
    OutboxEvent,
    OutboxPublisher,
    PostgresOutboxStore,
    RedisStreamsBroker,
    SqliteOutboxStore,
)


@contextlib.contextmanager
def tracked_redis(url: str, **kwargs: Any) -> Iterator[redis.Redis]:
    """A client whose connections, and those of every pool copied from it (a broker's),
    are all disconnected on exit."""
    made: list[Any] = []  # redis.Connection, whose methods are untyped

    class TrackedConnection(redis.Connection):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)  # type: ignore[no-untyped-call]
            made.append(self)

    client = redis.Redis.from_url(url, connection_class=TrackedConnection, **kwargs)
    try:
        yield client
    finally:
        client.close()
        for conn in made:
            conn.disconnect()


GO_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0


class HangingBroker:
    """XADDs the first ``publish_first`` events of a batch, says so, then hangs."""

    def __init__(self, inner: RedisStreamsBroker, publish_first: int) -> None:
        self.inner = inner
        self.publish_first = publish_first

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        results = self.inner.publish(events[: self.publish_first])
        if any(r is not None for r in results):
            raise RuntimeError(f"the first events did not reach Redis: {results!r}")
        print("hung " + json.dumps([e.id for e in events]), flush=True)
        threading.Event().wait()  # until the test's SIGKILL: nothing ever sets it
        raise AssertionError("the test should have killed this relay by now")

    async def apublish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        raise NotImplementedError

    def classify(self, error: BaseException) -> Failure:
        return self.inner.classify(error)


def main(argv: Sequence[str]) -> int:
    config: dict[str, Any] = json.loads(argv[1])
    store: SqliteOutboxStore | PostgresOutboxStore
    if config["store"] == "sqlite":
        store = SqliteOutboxStore(config["path"])
    else:
        store = PostgresOutboxStore(config["dsn"], schema=config["schema"])
    with tracked_redis(config["redis_url"]) as client:
        try:
            return run_relay(config, store, client)
        finally:
            store.close()


def run_relay(
    config: dict[str, Any], store: SqliteOutboxStore | PostgresOutboxStore, client: redis.Redis
) -> int:
    streams = RedisStreamsBroker(client, stream=config["stream"], timeout=2.0)
    try:
        if config["mode"] == "hang":
            broker = HangingBroker(streams, int(config["publish_first"]))
            publisher = OutboxPublisher(
                store, broker=broker, batch_size=config["batch_size"], lease=config["lease"]
            )
            publisher.run_once()
            return 1  # not reached: run_once hangs in publish
        publisher = OutboxPublisher(
            store, broker=streams, batch_size=config["batch_size"], lease=config["lease"]
        )
        store.stats()  # connect before the start line
        print("ready", flush=True)
        deadline = time.monotonic() + GO_TIMEOUT
        while not client.exists(config["go_key"]):
            if time.monotonic() > deadline:
                raise TimeoutError("no go signal")
            time.sleep(0.002)
        published = batches = fenced = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            result = publisher.run_once()
            published += result.published
            fenced += result.fenced
            if result.claimed:
                batches += 1
                continue
            if result.outage is not None or result.breaker_open:
                raise RuntimeError(f"unexpected outage: {result!r}")
            if store.stats().pending == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the outbox did not drain")
            time.sleep(0.005)  # the rest is leased to the other relays
        print(json.dumps({"published": published, "batches": batches, "fenced": fenced}))
        return 0
    finally:
        streams.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
