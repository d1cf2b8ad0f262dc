"""What the relay's sync and async sides share: its results, its settings and state,
every decision that needs no I/O, and the two ways of waiting between polls. The batch,
the loop and the operations are in ``_async_publisher.py`` (the sync twin is generated)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio

from resilience import clock as _clock
from resilience.breaker import CircuitBreaker, CircuitState, RedisFleet
from resilience.events import Dispatcher, Listener, Telemetry
from resilience.integrations.outbox._model import (
    Backoff,
    Failure,
    HeldBack,
    OutboxEvent,
    OutboxStats,
    RowFailure,
    positive,
    positive_int,
)
from resilience.integrations.outbox._store import OutboxStore
from resilience.integrations.outbox.brokers import Broker
from resilience.limiter import TokenBucket

__all__ = [
    "BatchResult",
    "Delivered",
    "Plan",
    "PublisherBase",
    "ReplayResult",
    "Sleeper",
    "Waker",
    "log",
    "shielded",
    "unshielded",
]

log = logging.getLogger("resilience.outbox")


_TOTALS: Final = ("published", "outage", "poison", "unknown", "died", "breaker_open_polls")


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one :meth:`OutboxPublisher.run_once` did. Also the listener event per batch."""

    publisher: str
    claimed: int = 0
    published: int = 0
    released: int = 0
    retried: int = 0
    dead: int = 0
    probe: bool = False
    #: The breaker was open: nothing claimed; ``retry_after`` says when it admits a probe.
    breaker_open: bool = False
    retry_after: float = 0.0
    #: The outage error that failed the batch, if any.
    outage: BaseException | None = None
    #: Rows the store no longer let this relay write back (its lease had run out).
    fenced: int = 0
    #: Failures by class: rows that met an outage, poison, or an unknown error.
    outages: int = 0
    poison: int = 0
    unknown: int = 0


@dataclass(frozen=True, slots=True)
class Delivered:
    """How long the events one batch published took from enqueue to the broker.

    ``delays`` holds a ``(topic, seconds)`` pair per published event: the broker's
    acknowledgement minus the row's ``created`` stamp (the insert, a moment before its
    transaction commits; on PostgreSQL the database's clock), so an event's ``delay=``,
    its backoffs and outages count. Only listeners that ask for it by type
    (``add_listener(fn, only=(Delivered,))``) get it, and only then is it measured.
    """

    publisher: str
    delays: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int
    #: Why the replay stopped before running out of dead rows, or None.
    stopped: str | None = None


@dataclass(slots=True)
class Plan:
    published: list[int] = dataclasses.field(default_factory=list)
    released: list[int] = dataclasses.field(default_factory=list)
    held: list[int] = dataclasses.field(default_factory=list)
    failures: list[RowFailure] = dataclasses.field(default_factory=list)
    outage: BaseException | None = None
    poison: int = 0
    #: (topic, seconds since created) per published event, when a listener wants them.
    delays: tuple[tuple[str, float], ...] = ()


_HOST: Final = socket.gethostname()


class PublisherBase:
    """The relay's settings, state and pure decisions (see :class:`OutboxPublisher`)."""

    def __init__(
        self,
        store: OutboxStore,
        *,
        broker: Broker,
        breaker: CircuitBreaker | None = None,
        fleet: RedisFleet | None = None,
        batch_size: int = 100,
        max_attempts: int = 10,
        backoff: Backoff | None = None,
        lease: float = 30.0,
        min_poll: float = 0.05,
        max_poll: float = 2.0,
        stats_interval: float | None = 15.0,
        name: str = "outbox",
        listeners: Iterable[Listener[Any]] = (),
        clock: _clock.Clock | None = None,
        random_source: random.Random | None = None,
    ) -> None:
        if not isinstance(store, OutboxStore):
            raise TypeError(f"store must be an outbox store, got {type(store).__name__}")
        if not isinstance(broker, Broker):
            raise TypeError(
                "broker must have publish(), apublish() and classify(), "
                f"got {type(broker).__name__}"
            )
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        if fleet is not None and not isinstance(fleet, RedisFleet):
            raise TypeError(f"fleet must be a RedisFleet, got {type(fleet).__name__}")
        if fleet is not None and breaker is not None:
            raise ValueError("fleet: pass it to your breaker (CircuitBreaker(..., fleet=...))")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a Backoff, got {type(backoff).__name__}")
        self.store = store
        self.broker = broker
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_attempts = positive_int("max_attempts", max_attempts)
        self.backoff = backoff or Backoff()
        self.lease = positive("lease", lease)
        broker_timeout = getattr(broker, "timeout", None)
        if isinstance(broker_timeout, int | float) and self.lease <= 2 * broker_timeout:
            raise ValueError(
                f"lease ({self.lease:g}s) must be more than twice the broker's timeout "
                f"({broker_timeout:g}s), or a slow publish could outlive its lease"
            )
        self.min_poll = positive("min_poll", min_poll)
        self.max_poll = positive("max_poll", max_poll)
        if self.max_poll < self.min_poll:
            raise ValueError("max_poll must be >= min_poll")
        self.stats_interval = (
            None if stats_interval is None else positive("stats_interval", stats_interval)
        )
        self._clock = _clock.resolve(clock)
        self.breaker = breaker or CircuitBreaker(
            f"outbox:{name}", failure_threshold=3, recovery_timeout=5.0, clock=clock, fleet=fleet
        )
        self._random = random_source or random.Random()
        self._events: Dispatcher[Any] = Dispatcher(listeners)
        # Delivered goes to its own listeners only, so measuring it costs nothing unless
        # someone asked, and listeners of every event keep hearing what they always did.
        self._deliveries: Dispatcher[Delivered] = Dispatcher()
        # Totals for metrics, read at scrape time: a few integers per batch, not per row.
        self._totals = dict.fromkeys(_TOTALS, 0)
        self._totals_lock = threading.Lock()
        self._last_stats: OutboxStats | None = None
        self._watched = False
        self._owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._claims = itertools.count(1)
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"OutboxPublisher({self.name!r}, store={self.store!r}, broker={self.broker!r})"

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads (resilience.events). Asking for it makes run()
        read the store's figures every ``stats_interval``, as a listener would."""
        self._watched = True
        return Telemetry(
            "outbox",
            self.name,
            self._read,
            listen=self.add_listener,
            timed=(Delivered,),
            links=(self.breaker,),
        )

    def _read(self) -> dict[str, Any]:
        with self._totals_lock:
            totals = dict(self._totals)
        failures = {kind: totals.pop(kind) for kind in ("outage", "poison", "unknown")}
        return {**totals, "failures": failures, "stats": self._last_stats}

    @property
    def _wants_stats(self) -> bool:
        return self._watched or bool(self._events)

    def _tally(self, event: object) -> None:
        if isinstance(event, BatchResult):
            with self._totals_lock:
                totals = self._totals
                totals["published"] += event.published
                totals["outage"] += event.outages
                totals["poison"] += event.poison
                totals["unknown"] += event.unknown
                totals["died"] += event.dead
                totals["breaker_open_polls"] += event.breaker_open
        elif isinstance(event, OutboxStats):
            self._last_stats = event

    def add_listener(
        self, listener: Listener[Any], *, only: tuple[type, ...] | None = None
    ) -> None:
        """Receive a :class:`BatchResult` per batch and :class:`OutboxStats` per stats read;
        with ``only=(Delivered,)``, a :class:`Delivered` per batch that published."""
        if only is not None and any(isinstance(t, type) and issubclass(Delivered, t) for t in only):
            self._deliveries.add(listener, (Delivered,))
            only = tuple(t for t in only if t is not Delivered)
            if not only:
                return
        self._events.add(listener, only)

    @property
    def owner(self) -> str:
        """The lease owner prefix this relay writes into the rows it claims."""
        return self._owner

    # -- one batch -----------------------------------------------------------------------

    def _token(self) -> str:
        return f"{self._owner}:{next(self._claims)}"

    def _limit(self) -> tuple[int, bool]:
        probe = self.breaker.state is CircuitState.HALF_OPEN
        return (1 if probe else self.batch_size), probe

    def _rejected(self) -> BatchResult:
        return BatchResult(self.name, breaker_open=True, retry_after=self.breaker.retry_after)

    def _plan(self, events: Sequence[OutboxEvent], results: Sequence[BaseException | None]) -> Plan:
        plan = Plan()
        for event, error in zip(events, results, strict=True):
            if error is None:
                plan.published.append(event.id)
                continue
            if isinstance(error, HeldBack):
                plan.held.append(event.id)
                continue
            kind = self.broker.classify(error)
            if kind is Failure.OUTAGE:
                plan.released.append(event.id)
                plan.outage = plan.outage or error
                continue
            plan.poison += kind is Failure.POISON
            attempts = event.attempts + 1
            dead = attempts >= self.max_attempts
            text = f"{kind.value}: {type(error).__name__}: {error}"
            delay = 0.0 if dead else self.backoff.delay(attempts, self._random)
            plan.failures.append(RowFailure(event.id, text, delay, dead))
        if self._deliveries and plan.published:
            plan.delays = self._delays(events, results)
        dead_rows = [f for f in plan.failures if f.dead]
        if dead_rows:
            # One line a batch: a poisoned topic must not flood the log.
            log.warning(
                "outbox publisher %r: %d event(s) dead after %d attempts; row %d: %s",
                self.name,
                len(dead_rows),
                self.max_attempts,
                dead_rows[0].id,
                dead_rows[0].error,
                extra={
                    "resilience_event": "outbox.dead",
                    "resilience_name": self.name,
                    "resilience_count": len(dead_rows),
                    "resilience_topic": next(e.topic for e in events if e.id == dead_rows[0].id),
                    "resilience_error_type": dead_rows[0].error.split(": ")[1],
                },
            )
        return plan

    def _delays(
        self, events: Sequence[OutboxEvent], results: Sequence[BaseException | None]
    ) -> tuple[tuple[str, float], ...]:
        now = self._clock.time()
        return tuple(
            (event.topic, max(0.0, now - event.created))
            for event, error in zip(events, results, strict=True)
            if error is None
        )

    def _result(
        self, events: Sequence[OutboxEvent], plan: Plan, probe: bool, written: int
    ) -> BatchResult:
        expected = len(plan.published) + len(plan.released) + len(plan.held) + len(plan.failures)
        return BatchResult(
            self.name,
            claimed=len(events),
            published=len(plan.published),
            released=len(plan.released) + len(plan.held),
            retried=sum(1 for f in plan.failures if not f.dead),
            dead=sum(1 for f in plan.failures if f.dead),
            probe=probe,
            outage=plan.outage,
            retry_after=self.breaker.retry_after if plan.outage is not None else 0.0,
            fenced=expected - written,
            outages=len(plan.released),
            poison=plan.poison,
            unknown=len(plan.failures) - plan.poison,
        )

    def _outage_delay(self, plan: Plan) -> float:
        # The breaker's retry time, so the rows come back when a probe may go out.
        return self.breaker.retry_after if plan.outage is not None else 0.0

    # -- the loop ------------------------------------------------------------------------

    def _pause(self, result: BatchResult, idle: float) -> tuple[float, float]:
        """Seconds to wait after ``result``, and the next idle interval."""
        if result.breaker_open:
            return max(result.retry_after, self.min_poll), self.min_poll
        if result.outage is not None:
            return max(result.retry_after, self.min_poll), self.min_poll
        if result.claimed >= (1 if result.probe else self.batch_size):
            return 0.0, self.min_poll
        if result.claimed:
            return self.min_poll, self.min_poll
        return idle, min(idle * 2, self.max_poll)

    # -- operations ----------------------------------------------------------------------

    def _replay_chunk(self, limiter: TokenBucket | None, chunk: int) -> int:
        positive_int("chunk", chunk)
        if limiter is None:
            return chunk
        return max(1, min(chunk, int(limiter.capacity)))


_NOT_SHIELDED: Final = contextlib.nullcontext()


def shielded() -> anyio.CancelScope:
    """Async side: what follows finishes even when the task is cancelled."""
    return anyio.CancelScope(shield=True)


def unshielded() -> contextlib.nullcontext[None]:
    """Sync side of :func:`shielded`: nothing to shield from."""
    return _NOT_SHIELDED


class Sleeper:
    """Waits between polls of ``run_blocking()``: on the stop event (or an injected
    clock), and says when to stop."""

    def __init__(self, stop: threading.Event, clock: _clock.Clock) -> None:
        self._stop = stop
        self._clock = clock

    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> None:
        if self._clock is _clock.SYSTEM_CLOCK:
            self._stop.wait(seconds)
            return
        sleep = getattr(self._clock, "sleep", None)
        if sleep is not None:
            sleep(seconds)


class Waker:
    """Waits between polls of ``run()``. On PostgreSQL under asyncio, a NOTIFY from an
    insert ends the wait early; the poll still runs, so a lost notification only costs
    latency."""

    def __init__(self, dsn: str | None, channel: str | None, clock: _clock.Clock) -> None:
        self._dsn = dsn
        self._channel = channel
        self._clock = clock
        self._conn: Any = None

    @classmethod
    def for_store(cls, store: object, clock: _clock.Clock) -> Waker:
        dsn = getattr(getattr(store, "_pool", None), "dsn", None)
        channel = getattr(store, "channel", None)
        if clock is not _clock.SYSTEM_CLOCK or not isinstance(dsn, str):
            return cls(None, None, clock)
        return cls(dsn, channel, clock)

    async def _listening(self) -> Any:
        if self._conn is None and self._dsn is not None:
            try:
                from resilience.flight import current_async_library

                if current_async_library() != "asyncio":
                    self._dsn = None  # psycopg's async connections need asyncio
                    return None
                import psycopg

                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
                await conn.execute(f'LISTEN "{self._channel}"')
                self._conn = conn
            except Exception as error:
                log.info(
                    "outbox: no LISTEN wake-ups (%s); polling only",
                    error,
                    extra={
                        "resilience_event": "outbox.listen_unavailable",
                        "resilience_error_type": type(error).__name__,
                    },
                )
                self._dsn = None
        return self._conn

    def stopped(self) -> bool:
        return False  # run() ends by cancellation

    async def wait(self, seconds: float) -> None:
        conn = await self._listening()
        if conn is None:
            sleep = getattr(self._clock, "asleep", None)
            await (sleep or anyio.sleep)(seconds)
            return
        try:
            async for _ in conn.notifies(timeout=seconds, stop_after=1):
                pass
        except Exception as error:
            log.info(
                "outbox: LISTEN connection lost (%s); polling only",
                error,
                extra={
                    "resilience_event": "outbox.listen_lost",
                    "resilience_error_type": type(error).__name__,
                },
            )
            await self.aclose()
            self._dsn = None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
