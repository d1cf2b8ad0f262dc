"""The publisher's rules on the embedded store and the in-memory broker, with a FakeClock:
what the breaker sees, what the rows see, and what listeners hear."""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from resilience import CircuitBreaker, CircuitState, TokenBucket
from resilience.integrations.outbox import (
    Backoff,
    BatchResult,
    Failure,
    HeldBack,
    InMemoryBroker,
    OutboxEvent,
    OutboxPublisher,
    OutboxStats,
    SqliteOutboxStore,
)
from resilience.testing import FakeClock


class Env:
    def __init__(self, path: Path, clock: FakeClock) -> None:
        self.clock = clock
        self.store = SqliteOutboxStore(path, clock=clock)
        self.store.create_schema()
        self.app = sqlite3.connect(path)
        self.broker = InMemoryBroker()
        self.breaker = CircuitBreaker(
            "outbox-test", failure_threshold=2, recovery_timeout=10.0, clock=clock
        )

    def publisher(self, **kwargs: Any) -> OutboxPublisher:
        kwargs.setdefault("broker", self.broker)
        kwargs.setdefault("breaker", self.breaker)
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("random_source", random.Random(7))
        return OutboxPublisher(self.store, **kwargs)

    def enqueue(self, n: int, *, key: str | None = "k", start: int = 0) -> None:
        with self.app:
            for i in range(start, start + n):
                self.store.enqueue(self.app, topic="t", key=key, payload=i)

    def rows(self) -> list[tuple[Any, ...]]:
        return self.app.execute(
            "SELECT payload, status, attempts, lease_owner, available_at, last_error"
            " FROM resilience_outbox ORDER BY id"
        ).fetchall()

    def published(self) -> list[Any]:
        return [e.json() for e in self.broker.messages]


@pytest.fixture
def env(tmp_path: Path, clock: FakeClock) -> Iterator[Env]:
    e = Env(tmp_path / "app.db", clock)
    yield e
    e.app.close()
    e.store.close()


# -- happy path --------------------------------------------------------------------------


def test_run_once_publishes_a_batch_in_order_and_marks_it(env: Env) -> None:
    env.enqueue(5)
    pub = env.publisher(batch_size=3)
    first = pub.run_once()
    assert (first.claimed, first.published, first.released) == (3, 3, 0)
    assert pub.run_once().published == 2
    assert pub.run_once().claimed == 0
    assert env.published() == [0, 1, 2, 3, 4]
    assert {row[1] for row in env.rows()} == {"published"}
    assert {row[3] for row in env.rows()} == {None}


@pytest.mark.anyio
async def test_arun_once_does_the_same(env: Env) -> None:
    env.enqueue(4)
    pub = env.publisher(batch_size=10)
    result = await pub.arun_once()
    assert result.published == 4
    assert env.published() == [0, 1, 2, 3]


def test_an_empty_outbox_is_neither_success_nor_failure_for_the_breaker(env: Env) -> None:
    permit = env.breaker.try_acquire()
    assert permit is not None
    permit.failure()
    pub = env.publisher()
    for _ in range(5):
        assert pub.run_once().claimed == 0
    stats = env.breaker.stats()
    assert (stats.consecutive_failures, stats.probes_in_flight) == (1, 0)
    assert env.broker.contacts == 0


# -- outages -----------------------------------------------------------------------------


def test_an_outage_opens_the_breaker_and_burns_no_attempts(env: Env) -> None:
    env.enqueue(6, key="a")
    env.enqueue(3, key="b", start=100)
    pub = env.publisher(batch_size=4)
    with env.broker.outage():
        assert pub.run_once().outage is not None  # failure 1 of 2: breaker still closed
        second = pub.run_once()
        assert second.outage is not None
        assert env.breaker.state is CircuitState.OPEN
        assert second.retry_after == pytest.approx(10.0)
        contacts = env.broker.contacts
        for _ in range(20):
            rejected = pub.run_once()
            assert rejected.breaker_open
            assert rejected.claimed == 0
            env.clock.advance(0.4)
        assert env.broker.contacts == contacts  # nothing reached the broker while open
        assert {row[2] for row in env.rows()} == {0}
        assert {row[1] for row in env.rows()} == {"pending"}
        assert {row[3] for row in env.rows()} == {None}  # nothing held leased
        # The failed batch waits for the breaker's retry time, not the lease; "a" waits
        # behind it. Only "b", never tried, is there for a relay with a breaker of its own.
        other = pub.store.claim("someone-else", 100, 30.0)
        assert {e.key for e in other} == {"b"}
        pub.store.release("someone-else", [e.id for e in other], 2.0)
        env.clock.advance(2.0)  # 10 s after opening: half-open
        probe = pub.run_once()
        assert (probe.probe, probe.claimed, probe.outage is not None) == (True, 1, True)
        assert env.breaker.state is CircuitState.OPEN
        assert env.broker.contacts == contacts + 1
    env.clock.advance(10.0)
    results = [pub.run_once() for _ in range(6)]
    assert [r.probe for r in results[:2]] == [True, True]
    assert env.breaker.stats().state is CircuitState.CLOSED
    assert sorted(env.published()) == sorted([*range(6), *range(100, 103)])
    by_key = env.broker.by_key()
    assert [e.json() for e in by_key["a"]] == list(range(6))
    assert [e.json() for e in by_key["b"]] == [100, 101, 102]
    assert {row[2] for row in env.rows()} == {0}


def test_a_breaker_opened_elsewhere_stops_claims(env: Env) -> None:
    env.enqueue(2)
    env.breaker.force_open()
    pub = env.publisher()
    result = pub.run_once()
    assert result.breaker_open
    assert env.broker.contacts == 0
    assert {row[3] for row in env.rows()} == {None}


def test_the_publisher_has_a_breaker_of_its_own_by_default(env: Env) -> None:
    pub = OutboxPublisher(env.store, broker=env.broker, name="orders", clock=env.clock)
    assert pub.breaker.name == "outbox:orders"
    env.enqueue(1)
    with env.broker.outage():
        for _ in range(3):
            pub.run_once()
    assert pub.breaker.state is CircuitState.OPEN


# -- poison and unknown ------------------------------------------------------------------


def test_poison_backs_off_with_jitter_and_dies_at_max_attempts(env: Env) -> None:
    env.enqueue(1, key="bad")
    env.enqueue(2, key="good", start=10)
    env.broker.reject(lambda e: e.json() == 0)
    pub = env.publisher(max_attempts=3, backoff=Backoff(base=2.0, factor=2.0, jitter=0.5))
    first = pub.run_once()
    assert (first.published, first.retried, first.dead) == (2, 1, 0)
    assert sorted(env.published()) == [10, 11]  # the neighbours flowed
    _, status, attempts, _, available, error = env.rows()[0]
    assert (status, attempts) == ("pending", 1)
    assert 1.0 <= available - env.clock.time() <= 2.0  # base 2 s, half jitter
    assert error.startswith("poison: EventRejected")
    env.clock.advance(2.0)
    assert pub.run_once().retried == 1
    _, _, attempts, _, available, _ = env.rows()[0]
    assert attempts == 2
    assert 2.0 <= available - env.clock.time() <= 4.0
    env.clock.advance(4.0)
    last = pub.run_once()
    assert last.dead == 1
    assert env.rows()[0][1:3] == ("dead", 3)
    assert env.breaker.stats().state is CircuitState.CLOSED  # poison never feeds the breaker
    assert pub.stats().dead == 1


def test_the_dead_event_log_line_names_the_publisher_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.enqueue(1, key="bad")
    env.broker.reject(lambda e: True)
    pub = env.publisher(max_attempts=1)
    with caplog.at_level(logging.WARNING, "resilience"):
        assert pub.run_once().dead == 1
    lines = [r.getMessage() for r in caplog.records if "dead after" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"outbox publisher {pub.name!r}: 1 event(s) dead after 1 attempts")
    assert "outbox outbox" not in lines[0]


def test_a_poisoned_head_holds_its_key_without_burning_the_followers(env: Env) -> None:
    env.enqueue(3, key="k")
    env.broker.reject(lambda e: e.json() == 0)
    pub = env.publisher(max_attempts=5)
    result = pub.run_once()
    assert (result.retried, result.released, result.published) == (1, 2, 0)
    assert [row[2] for row in env.rows()] == [1, 0, 0]
    assert env.published() == []
    assert pub.stats().blocked_keys == 1
    env.broker.reject(None)
    env.clock.advance(10.0)
    pub.run_once()
    assert env.published() == [0, 1, 2]


class Flaky:
    """A broker whose failures the test scripts."""

    def __init__(self, errors: Sequence[BaseException | None]) -> None:
        self.errors = list(errors)
        self.seen: list[OutboxEvent] = []

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        self.seen.extend(events)
        return [self.errors.pop(0) if self.errors else None for _ in events]

    async def apublish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        return self.publish(events)

    def classify(self, error: BaseException) -> Failure:
        if isinstance(error, ConnectionError):
            return Failure.OUTAGE
        return Failure.POISON if isinstance(error, ValueError) else Failure.UNKNOWN


def test_unknown_failures_count_attempts_but_do_not_feed_the_breaker(env: Env) -> None:
    env.enqueue(1)
    broker = Flaky([RuntimeError("who knows")] * 5)
    pub = env.publisher(broker=broker, max_attempts=2)
    assert pub.run_once().retried == 1
    env.clock.advance(100.0)
    assert pub.run_once().dead == 1
    _, status, attempts, _, _, error = env.rows()[0]
    assert (status, attempts) == ("dead", 2)
    assert error == "unknown: RuntimeError: who knows"
    assert env.breaker.stats().state is CircuitState.CLOSED


def test_held_back_events_go_back_without_an_attempt(env: Env) -> None:
    env.enqueue(2, key="k")
    broker = Flaky([ValueError("bad"), HeldBack("behind")])
    pub = env.publisher(broker=broker)
    result = pub.run_once()
    assert (result.retried, result.released) == (1, 1)
    assert [row[2] for row in env.rows()] == [1, 0]


def test_an_outage_in_part_of_a_batch_releases_those_rows_and_fails_the_call(env: Env) -> None:
    env.enqueue(3, key=None)
    broker = Flaky([None, ConnectionResetError("reset"), None])
    pub = env.publisher(broker=broker)
    result = pub.run_once()
    assert (result.published, result.released) == (2, 1)
    assert isinstance(result.outage, ConnectionResetError)
    assert [row[1:3] for row in env.rows()] == [("published", 0), ("pending", 0), ("published", 0)]


def test_a_broker_that_raises_fails_the_whole_batch_by_its_class(env: Env) -> None:
    env.enqueue(2, key=None)

    class Raising(Flaky):
        def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
            raise ConnectionRefusedError("refused")

    pub = env.publisher(broker=Raising([]))
    result = pub.run_once()
    assert (result.released, result.retried) == (2, 0)
    assert result.outage is not None


def test_an_interrupt_mid_publish_gives_the_rows_back(env: Env) -> None:
    env.enqueue(2, key=None)

    class Interrupted(Flaky):
        def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
            raise KeyboardInterrupt

    pub = env.publisher(broker=Interrupted([]))
    with pytest.raises(KeyboardInterrupt):
        pub.run_once()
    assert {row[3] for row in env.rows()} == {None}
    assert len(env.store.claim("other", 10, 30.0)) == 2


# -- listeners and stats -----------------------------------------------------------------


def test_listeners_hear_every_batch_and_every_stats_read(env: Env) -> None:
    heard: list[object] = []
    pub = env.publisher()
    pub.add_listener(heard.append)
    env.enqueue(2)
    pub.run_once()
    stats = pub.stats()
    assert isinstance(heard[0], BatchResult)
    assert heard[0].published == 2
    assert heard[1] is stats
    assert isinstance(stats, OutboxStats)
    assert stats.breaker_state == "closed"


@pytest.mark.anyio
async def test_async_listeners_and_astats(env: Env) -> None:
    heard: list[object] = []

    async def listen(event: object) -> None:
        heard.append(event)

    pub = env.publisher(listeners=[listen])
    env.enqueue(1)
    await pub.arun_once()
    stats = await pub.astats()
    assert [type(e) for e in heard] == [BatchResult, OutboxStats]
    assert stats.pending == 0


# -- the loop ----------------------------------------------------------------------------


def test_pauses_adapt_to_the_work_found(env: Env) -> None:
    pub = env.publisher(batch_size=2, min_poll=0.1, max_poll=0.8)
    full = BatchResult("x", claimed=2)
    part = BatchResult("x", claimed=1)
    empty = BatchResult("x")
    opened = BatchResult("x", breaker_open=True, retry_after=7.0)
    assert pub._pause(full, 0.4) == (0.0, 0.1)
    assert pub._pause(part, 0.4) == (0.1, 0.1)
    assert pub._pause(empty, 0.1) == (0.1, 0.2)
    assert pub._pause(empty, 0.4) == (0.4, 0.8)
    assert pub._pause(empty, 0.8) == (0.8, 0.8)
    assert pub._pause(opened, 0.8) == (7.0, 0.1)


def test_run_blocking_drains_then_stops(env: Env) -> None:
    env.enqueue(5)
    pub = env.publisher(batch_size=2)
    seen: list[BatchResult] = []

    def listen(event: object) -> None:
        if isinstance(event, BatchResult):
            seen.append(event)
            if event.claimed == 0:
                pub.stop()

    pub.add_listener(listen)
    pub.run_blocking()
    assert env.published() == [0, 1, 2, 3, 4]
    assert [r.claimed for r in seen] == [2, 2, 1, 0]


def test_a_failing_store_warns_once_per_streak_of_failed_stats(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pub = env.publisher(stats_interval=1.0)
    real_stats = env.store.stats
    # Stats reads 1-3 fail, 4 works, 5 fails again.
    failing = iter([True, True, True, False, True])
    rounds = 0

    def stats() -> Any:
        if next(failing):
            raise sqlite3.OperationalError("database is locked")
        return real_stats()

    def listen(event: object) -> None:
        nonlocal rounds
        if isinstance(event, BatchResult):
            rounds += 1
            env.clock.advance(1.0)  # the next round reads the stats again
            if rounds == 5:
                pub.stop()

    monkeypatch.setattr(env.store, "stats", stats)
    pub.add_listener(listen)
    with caplog.at_level(logging.DEBUG, "resilience"):
        pub.run_blocking()
    levels = [r.levelno for r in caplog.records if "stats failed" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]


# -- replay ------------------------------------------------------------------------------


def _one_dead(env: Env, pub: OutboxPublisher, n: int = 1) -> None:
    env.broker.reject(lambda e: True)
    env.enqueue(n, key=None)
    pub.run_once()
    env.broker.reject(None)


def test_replay_brings_dead_rows_back_and_they_publish(env: Env) -> None:
    pub = env.publisher(max_attempts=1)
    _one_dead(env, pub)
    assert pub.replay().replayed == 1
    assert pub.run_once().published == 1
    assert env.published() == [0]


def test_replay_stops_while_the_breaker_is_open(env: Env) -> None:
    pub = env.publisher(max_attempts=1)
    _one_dead(env, pub)
    env.breaker.force_open()
    result = pub.replay()
    assert (result.replayed, result.stopped) == (0, "breaker open")


def test_replay_is_paced_by_a_token_bucket(env: Env) -> None:
    pub = env.publisher(max_attempts=1, batch_size=100)
    _one_dead(env, pub, n=25)
    bucket = TokenBucket(rate=10.0, capacity=10, clock=env.clock)
    start = env.clock.monotonic()
    result = pub.replay(limiter=bucket, chunk=100)
    assert result.replayed == 25
    # Chunks of 10 (the bucket's capacity): one at once, then one a second. The last
    # chunk pays for 10 though it finds 5: the store cannot know how many are left.
    assert env.clock.monotonic() - start == pytest.approx(2.0)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 1.5}, TypeError, "batch_size"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"lease": -1}, ValueError, "lease"),
        ({"min_poll": 0}, ValueError, "min_poll"),
        ({"min_poll": 2.0, "max_poll": 1.0}, ValueError, "max_poll"),
        ({"breaker": object()}, TypeError, "breaker"),
        ({"broker": object()}, TypeError, "broker"),
        ({"backoff": 3}, TypeError, "backoff"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_configuration_names_the_parameter(
    env: Env, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        env.publisher(**kwargs)


def test_a_lease_shorter_than_the_broker_timeout_is_refused(env: Env) -> None:
    class Slow(Flaky):
        timeout = 10.0

    with pytest.raises(ValueError, match="lease"):
        env.publisher(broker=Slow([]), lease=15.0)


def test_a_store_must_be_a_store(env: Env) -> None:
    with pytest.raises(TypeError, match="store"):
        OutboxPublisher(object(), broker=env.broker)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base": 0}, "base"),
        ({"factor": 0.5}, "factor"),
        ({"jitter": 1.5}, "jitter"),
        ({"base": 10.0, "maximum": 1.0}, "maximum"),
    ],
)
def test_backoff_validates(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Backoff(**kwargs)


def test_backoff_grows_caps_and_never_overflows() -> None:
    backoff = Backoff(base=1.0, factor=2.0, maximum=60.0, jitter=0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 7, 8, 10_000)] == [1, 2, 4, 60, 60, 60]
    jittered = Backoff(base=8.0, jitter=0.25)
    rand = random.Random(1)
    assert all(6.0 <= jittered.delay(1, rand) <= 8.0 for _ in range(200))


@pytest.mark.postgres
@pytest.mark.anyio
async def test_an_idle_relay_on_postgres_wakes_on_notify(
    postgres_dsn: str, pg_schema: str, require_asyncio: None
) -> None:
    import anyio
    import psycopg

    from resilience.integrations.outbox import PostgresOutboxStore

    store = PostgresOutboxStore(postgres_dsn, schema=pg_schema)
    store.create_schema()
    broker = InMemoryBroker()
    # Every wait is 30 s: only the NOTIFY can explain a quick delivery.
    pub = OutboxPublisher(store, broker=broker, min_poll=30.0, max_poll=30.0)
    idle, published = anyio.Event(), anyio.Event()

    def listen(event: object) -> None:
        if isinstance(event, BatchResult):
            (published if event.published else idle).set()

    pub.add_listener(listen)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pub.run)
        await idle.wait()  # found nothing: now in its 30 s wait
        await anyio.sleep(0.1)  # let it reach the LISTEN
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            await store.aenqueue(conn, topic="t", payload=1)
        with anyio.fail_after(1.0):  # well inside the 30 s poll
            await published.wait()
        tg.cancel_scope.cancel()
    store.close()
