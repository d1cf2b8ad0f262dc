"""The relay: claim a batch, publish it through the breaker, write the outcome back.

One batch is one breaker call. The breaker is asked first, so while it is open nothing is
claimed and the broker is not contacted; half-open, the batch is a single event (the
probe). How each event's outcome is written back:

=========  ===============================  ==================  ================
outcome    row                              attempts            breaker
=========  ===============================  ==================  ================
published  published                        unchanged           success
outage     released until the retry time    unchanged           failure
held back  released, ready at once          unchanged           (no outcome)
poison     backs off, dead at max_attempts  +1, error kept      success
unknown    backs off, dead at max_attempts  +1, error kept      success
=========  ===============================  ==================  ================
"""

from __future__ import annotations

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
from typing import Any, Final, TypeVar

import anyio

from resilience import clock as _clock
from resilience.breaker import CircuitBreaker, CircuitState, Permit
from resilience.events import Dispatcher, Listener
from resilience.integrations.outbox._model import (
    Backoff,
    Failure,
    OutboxEvent,
    OutboxStats,
    RowFailure,
    positive,
    positive_int,
)
from resilience.integrations.outbox._store import OutboxStore
from resilience.integrations.outbox.brokers import Broker, HeldBack
from resilience.limiter import TokenBucket

__all__ = ["BatchResult", "OutboxPublisher", "ReplayResult"]

log = logging.getLogger("resilience.outbox")
Ev = TypeVar("Ev")


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
class ReplayResult:
    replayed: int
    #: Why the replay stopped before running out of dead rows, or None.
    stopped: str | None = None


@dataclass(slots=True)
class _Plan:
    published: list[int] = dataclasses.field(default_factory=list)
    released: list[int] = dataclasses.field(default_factory=list)
    held: list[int] = dataclasses.field(default_factory=list)
    failures: list[RowFailure] = dataclasses.field(default_factory=list)
    outage: BaseException | None = None
    poison: int = 0


_HOST: Final = socket.gethostname()


class OutboxPublisher:
    """Relays outbox rows to a broker, guarded by a circuit breaker.

    ``batch_size`` rows per claim, leased for ``lease`` seconds (keep it well above the
    broker's timeout). A poison or unknown failure backs off by ``backoff`` and goes dead
    on the ``max_attempts``-th failure. ``run()`` polls every ``min_poll`` seconds while
    there is work and backs off to ``max_poll`` when idle; with listeners, it reads
    :meth:`stats` every ``stats_interval`` seconds for them.
    """

    def __init__(
        self,
        store: OutboxStore,
        *,
        broker: Broker,
        breaker: CircuitBreaker | None = None,
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
            f"outbox:{name}", failure_threshold=3, recovery_timeout=5.0, clock=clock
        )
        self._random = random_source or random.Random()
        self._events: Dispatcher[Any] = Dispatcher(listeners)
        self._owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._claims = itertools.count(1)
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"OutboxPublisher({self.name!r}, store={self.store!r}, broker={self.broker!r})"

    def add_listener(
        self, listener: Listener[Any], *, only: tuple[type, ...] | None = None
    ) -> None:
        """Receive a :class:`BatchResult` per batch and :class:`OutboxStats` per stats read."""
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

    def _plan(
        self, events: Sequence[OutboxEvent], results: Sequence[BaseException | None]
    ) -> _Plan:
        plan = _Plan()
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
            )
        return plan

    def _result(
        self, events: Sequence[OutboxEvent], plan: _Plan, probe: bool, written: int
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

    def _outage_delay(self, plan: _Plan) -> float:
        # The breaker's retry time, so the rows come back when a probe may go out.
        return self.breaker.retry_after if plan.outage is not None else 0.0

    def run_once(self) -> BatchResult:
        """Claim and publish one batch (one event while the breaker is half-open)."""
        permit = self.breaker.try_acquire()
        if permit is None:
            return self._emit(self._rejected())
        limit, probe = self._limit()
        token = self._token()
        try:
            events = self.store.claim(token, limit, self.lease)
        except BaseException:
            permit.ignore()  # the store failed, not the broker
            raise
        if not events:
            permit.ignore()
            return self._emit(BatchResult(self.name, probe=probe))
        try:
            try:
                results: Sequence[BaseException | None] = self.broker.publish(events)
            except Exception as error:
                results = [error] * len(events)
            plan = self._plan(events, results)
        except BaseException:
            permit.ignore()
            self.store.release(token, [e.id for e in events])
            raise
        self._settle(permit, plan)
        written = self.store.mark_published(token, plan.published)
        written += self.store.release(token, plan.released, self._outage_delay(plan))
        written += self.store.release(token, plan.held)
        written += self.store.fail(token, plan.failures)
        return self._emit(self._result(events, plan, probe, written))

    async def arun_once(self) -> BatchResult:
        """:meth:`run_once` for async code."""
        permit = await self.breaker.atry_acquire()
        if permit is None:
            return await self._aemit(self._rejected())
        limit, probe = self._limit()
        token = self._token()
        try:
            events = await self.store.aclaim(token, limit, self.lease)
        except BaseException:
            await _shielded_ignore(permit)
            raise
        if not events:
            await permit.aignore()
            return await self._aemit(BatchResult(self.name, probe=probe))
        try:
            try:
                results: Sequence[BaseException | None] = await self.broker.apublish(events)
            except Exception as error:
                results = [error] * len(events)
            plan = self._plan(events, results)
        except BaseException:
            # Cancelled mid-publish: give the rows back now rather than after the lease.
            with anyio.CancelScope(shield=True):
                await permit.aignore()
                await self.store.arelease(token, [e.id for e in events])
            raise
        with anyio.CancelScope(shield=True):
            await self._asettle(permit, plan)
            written = await self.store.amark_published(token, plan.published)
            written += await self.store.arelease(token, plan.released, self._outage_delay(plan))
            written += await self.store.arelease(token, plan.held)
            written += await self.store.afail(token, plan.failures)
        return await self._aemit(self._result(events, plan, probe, written))

    def _settle(self, permit: Permit, plan: _Plan) -> None:
        if plan.outage is not None:
            permit.failure(plan.outage)
        elif plan.published or plan.failures:
            permit.success()
        else:
            permit.ignore()

    async def _asettle(self, permit: Permit, plan: _Plan) -> None:
        if plan.outage is not None:
            await permit.afailure(plan.outage)
        elif plan.published or plan.failures:
            await permit.asuccess()
        else:
            await permit.aignore()

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

    async def run(self) -> None:
        """Publish until cancelled. On cancellation the batch in hand is given back."""
        idle = self.min_poll
        waker = _Waker.for_store(self.store, self._clock)
        next_stats = self._clock.monotonic()
        try:
            while True:
                if self._events and self.stats_interval and self._clock.monotonic() >= next_stats:
                    next_stats = self._clock.monotonic() + self.stats_interval
                    try:
                        await self.astats()
                    except Exception as error:  # figures are best effort; the relay goes on
                        log.warning("outbox %s: stats failed: %s", self.name, error)
                result = await self.arun_once()
                pause, idle = self._pause(result, idle)
                if pause > 0:
                    await waker.wait(pause)
        finally:
            with anyio.CancelScope(shield=True):
                await waker.aclose()

    def run_blocking(self, stop: threading.Event | None = None) -> None:
        """Publish from this thread until ``stop`` (or :meth:`stop`) is set."""
        stop_event = stop or self._stop
        idle = self.min_poll
        next_stats = self._clock.monotonic()
        while not stop_event.is_set():
            if self._events and self.stats_interval and self._clock.monotonic() >= next_stats:
                next_stats = self._clock.monotonic() + self.stats_interval
                try:
                    self.stats()
                except Exception as error:  # figures are best effort; the relay goes on
                    log.warning("outbox %s: stats failed: %s", self.name, error)
            result = self.run_once()
            pause, idle = self._pause(result, idle)
            if pause > 0:
                if self._clock is _clock.SYSTEM_CLOCK:
                    stop_event.wait(pause)
                else:
                    _sleep(self._clock, pause)

    def stop(self) -> None:
        """Ask :meth:`run_blocking` to return after the batch in hand."""
        self._stop.set()

    # -- operations ----------------------------------------------------------------------

    def stats(self) -> OutboxStats:
        """The store's figures plus the breaker state; also sent to listeners."""
        stats = dataclasses.replace(self.store.stats(), breaker_state=self.breaker.state.value)
        return self._emit(stats)

    async def astats(self) -> OutboxStats:
        stats = await self.store.astats()
        stats = dataclasses.replace(stats, breaker_state=self.breaker.state.value)
        return await self._aemit(stats)

    def _replay_chunk(self, limiter: TokenBucket | None, chunk: int) -> int:
        if limiter is None:
            return chunk
        return max(1, min(chunk, int(limiter.capacity)))

    def replay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limiter: TokenBucket | None = None,
        chunk: int = 100,
    ) -> ReplayResult:
        """Move matching dead rows back to pending, ``chunk`` at a time.

        Each chunk waits for ``limiter`` tokens (one per row), and the replay stops while
        the breaker is open, so a mass replay cannot re-trip a broker that just came back.
        """
        size = self._replay_chunk(limiter, positive_int("chunk", chunk))
        total = 0
        while True:
            if self.breaker.state is CircuitState.OPEN:
                return ReplayResult(total, "breaker open")
            if limiter is not None:
                limiter.acquire(f"outbox-replay:{self.name}", cost=size)
            moved = self.store.replay(ids=ids, topic=topic, key=key, error=error, limit=size)
            total += moved
            if moved < size:
                return ReplayResult(total)

    async def areplay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limiter: TokenBucket | None = None,
        chunk: int = 100,
    ) -> ReplayResult:
        size = self._replay_chunk(limiter, positive_int("chunk", chunk))
        total = 0
        while True:
            if self.breaker.state is CircuitState.OPEN:
                return ReplayResult(total, "breaker open")
            if limiter is not None:
                await limiter.aacquire(f"outbox-replay:{self.name}", cost=size)
            moved = await self.store.areplay(ids=ids, topic=topic, key=key, error=error, limit=size)
            total += moved
            if moved < size:
                return ReplayResult(total)

    # -- events --------------------------------------------------------------------------

    def _emit(self, event: Ev) -> Ev:
        if self._events:
            self._events.queue.append(event)
            self._events.drain()
        return event

    async def _aemit(self, event: Ev) -> Ev:
        if self._events:
            self._events.queue.append(event)
            await self._events.adrain()
        return event


async def _shielded_ignore(permit: Permit) -> None:
    with anyio.CancelScope(shield=True):
        await permit.aignore()


class _Waker:
    """Waits between polls. On PostgreSQL under asyncio, a NOTIFY from an insert ends the
    wait early; the poll still runs, so a lost notification only costs latency."""

    def __init__(self, dsn: str | None, channel: str | None, clock: _clock.Clock) -> None:
        self._dsn = dsn
        self._channel = channel
        self._clock = clock
        self._conn: Any = None

    @classmethod
    def for_store(cls, store: object, clock: _clock.Clock) -> _Waker:
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
                log.info("outbox: no LISTEN wake-ups (%s); polling only", error)
                self._dsn = None
        return self._conn

    async def wait(self, seconds: float) -> None:
        conn = await self._listening()
        if conn is None:
            await _asleep(self._clock, seconds)
            return
        try:
            async for _ in conn.notifies(timeout=seconds, stop_after=1):
                pass
        except Exception as error:
            log.info("outbox: LISTEN connection lost (%s); polling only", error)
            await self.aclose()
            self._dsn = None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


async def _asleep(clock: _clock.Clock, seconds: float) -> None:
    sleep = getattr(clock, "asleep", None)
    if sleep is not None:
        await sleep(seconds)
    else:
        await anyio.sleep(seconds)


def _sleep(clock: _clock.Clock, seconds: float) -> None:
    sleep = getattr(clock, "sleep", None)
    if sleep is not None:
        sleep(seconds)
