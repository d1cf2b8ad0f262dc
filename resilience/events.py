"""What primitives report, and how: the telemetry protocol, and event delivery.

**Telemetry.** Every primitive (breaker, limiter, cache, Redis backend, outbox
publisher) has ``telemetry()``, which returns a :class:`Telemetry`: its kind, its name,
a ``read()`` of plain numbers kept on the primitive (counters and gauges, read when a
consumer scrapes, so watching costs the primitive next to nothing), the event types a
consumer may listen to for histograms (opt-in: listening takes the fast path away), and
the primitives it reports through (a limiter's backend, a backend's breaker). Consumers
(:mod:`resilience.metrics`, the OpenTelemetry integration) know this protocol and no
concrete type.

**Events.**
The owner (a breaker, later a limiter or cache) appends events to ``queue`` while it
holds its own lock, so the queue order is the order of its transitions. After
releasing that lock, whoever produced events calls :meth:`Dispatcher.drain` (or
:meth:`adrain`). One drainer at a time delivers; others return at once and their
events are delivered by the drainer that holds the turn, so order holds across
threads and tasks without anyone waiting on a listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

__all__ = ["KINDS", "Dispatcher", "Listener", "Observable", "Tally", "Telemetry"]

log = logging.getLogger("resilience")

E = TypeVar("E")
#: A listener takes one event and returns None, or an awaitable for async listeners.
Listener = Callable[[E], "Awaitable[None] | None"]


#: The kinds of primitive a consumer may meet, and what each ``read()`` holds:
#: ``breaker``: state (a CircuitState), calls {outcome value: n}, rejected, transitions
#: {(from value, to value): n}; ``limiter``: allowed, denied; ``backend``: available,
#: on_error (a value), outages, errors, fallbacks; ``cache``: hits and misses {tier: n},
#: loads, load_errors, stale, invalidated, errors {tier: n}; ``outbox``: published,
#: failures {class: n}, died, breaker_open_polls, and the last stats (OutboxStats or None);
#: ``retry``: calls, retries, gave_up {reason: n}; ``budget``: deposits, withdrawals,
#: exhausted, balance; ``timeout``: calls, timeouts, overruns; ``bulkhead``: admitted,
#: rejected, active, waiting, max_concurrent; ``fallback``: calls, fallbacks;
#: ``pipeline``: nothing of its own (its members are its links); ``concurrency`` (an
#: adaptive limit): limit, in_flight, waiting, admitted, rejected, dropped, partitions
#: {name: {limit, in_flight}}; ``hedge``: calls, hedges, wins, refused.
KINDS = (
    "breaker", "limiter", "backend", "cache", "outbox",
    "retry", "budget", "timeout", "bulkhead", "fallback", "pipeline",
    "concurrency", "hedge",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Telemetry:
    """How one primitive shows itself to a metrics consumer (see the module docstring)."""

    kind: str
    name: str
    read: Callable[[], Mapping[str, Any]]
    #: ``add_listener(listener, only=...)`` for the timed events below, or None.
    listen: Callable[..., None] | None = None
    #: Event types that carry a duration (``CallFinished``, ``CacheEvent``), for histograms.
    timed: tuple[type, ...] = ()
    links: tuple[Observable, ...] = ()


@runtime_checkable
class Observable(Protocol):
    def telemetry(self) -> Telemetry: ...


class Tally:
    """A monotonic count that threads may bump without a lock: ``add()`` is one C-level
    ``next()`` on an ``itertools.count`` (atomic in CPython, unlike ``+= 1``), which is
    what a hot path can afford. ``value()`` is for scrapes: a read advances the count
    too, so reads are subtracted, under a lock of their own."""

    __slots__ = ("_count", "_lock", "_reads", "add")

    def __init__(self) -> None:
        self._count = itertools.count()
        self._reads = 0
        self._lock = threading.Lock()
        self.add = self._count.__next__

    def value(self) -> int:
        with self._lock:
            n = next(self._count) - self._reads
            self._reads += 1
            return n


class Dispatcher(Generic[E]):
    __slots__ = ("_background", "_filters", "_listeners", "_turn", "has_async", "queue")

    def __init__(self, listeners: Iterable[Listener[E]] = ()) -> None:
        self.queue: deque[E] = deque()
        self._turn = threading.Lock()
        self._listeners: tuple[Listener[E], ...] = ()
        # Per listener: the event types it wants, or None for all.
        self._filters: dict[int, tuple[type, ...] | None] = {}
        self._background: set[Any] = set()
        self.has_async = False
        for listener in listeners:
            self.add(listener)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def wants(self, event_type: type) -> bool:
        """Does any listener take events of this type?"""
        return any(only is None or issubclass(event_type, only) for only in self._filters.values())

    def add(self, listener: Listener[E], only: tuple[type, ...] | None = None) -> None:
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        if only is not None and not all(isinstance(t, type) for t in only):
            raise TypeError(f"only must be a tuple of event types, got {only!r}")
        self._listeners = (*self._listeners, listener)
        self._filters[id(listener)] = only
        self.has_async = self.has_async or _is_async(listener)

    def remove(self, listener: Listener[E]) -> None:
        # Found by equality, removed by identity: `obj.method` is a new bound method
        # object each time it is written, equal to the registered one but not it.
        registered = next((x for x in self._listeners if x == listener), None)
        if registered is None:
            raise ValueError(f"listener {listener!r} is not registered")
        self._listeners = tuple(x for x in self._listeners if x is not registered)
        del self._filters[id(registered)]
        self.has_async = any(_is_async(x) for x in self._listeners)

    def _takes(self, listener: Listener[E], event: E) -> bool:
        only = self._filters[id(listener)]
        return only is None or isinstance(event, only)

    def _deliver(self) -> Generator[tuple[Listener[E], Awaitable[None]], None, None]:
        """Deliver queued events in order, holding the turn; yield each async listener's
        awaitable for the driver to await (:meth:`adrain`) or schedule (:meth:`drain`)."""
        queue, turn = self.queue, self._turn
        while queue:
            if not turn.acquire(blocking=False):
                return  # the one holding the turn delivers our events too
            try:
                while queue:
                    event = queue.popleft()
                    for listener in self._listeners:
                        if not self._takes(listener, event):
                            continue
                        result = _call(listener, event)
                        if result is not None:
                            yield listener, result
            finally:
                turn.release()

    def drain(self) -> None:
        """Deliver queued events from sync code. Async listeners are scheduled, not awaited."""
        with contextlib.closing(self._deliver()) as deliveries:
            for listener, awaitable in deliveries:
                self._schedule(listener, awaitable)

    async def adrain(self) -> None:
        """Deliver queued events from async code, awaiting async listeners in order."""
        # closing(): a cancelled await must give the turn back now, not when collected.
        with contextlib.closing(self._deliver()) as deliveries:
            for listener, awaitable in deliveries:
                try:
                    await awaitable
                except Exception:
                    log.exception("resilience listener %r failed", listener)

    def _schedule(self, listener: object, awaitable: Awaitable[None]) -> None:
        """Run an async listener's awaitable that a sync caller produced, without blocking."""

        async def guarded() -> None:
            try:
                await awaitable
            except Exception:
                log.exception("resilience listener %r failed", listener)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = loop.create_task(guarded())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                trio.lowlevel.spawn_system_task(guarded)
                return
            except RuntimeError:
                pass
        _close(awaitable)
        log.error(
            "resilience async listener %r got an event from a thread with no event loop; "
            "register a sync listener to observe sync callers",
            listener,
        )


def _call(listener: Callable[[Any], Any], event: object) -> Any:
    try:
        result = listener(event)
    except Exception:
        log.exception("resilience listener %r failed", listener)
        return None
    return result if inspect.isawaitable(result) else None


def _is_async(listener: object) -> bool:
    return inspect.iscoroutinefunction(listener) or inspect.iscoroutinefunction(
        getattr(listener, "__call__", None)  # noqa: B004 - an object's async __call__
    )


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
