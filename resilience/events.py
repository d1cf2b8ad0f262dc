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
threads and tasks without anyone waiting on a listener. A listener wrapped in
:func:`in_context` is delivered by the producer itself, in the context of the code
that produced each event (its current span, for span events), before that code's
drain returns.

**Logs.** The sink writes one log line per breaker state change it carries (logger
``resilience.breaker``), with its fields as ``extra``: see :data:`LOG_FIELDS`.

**Event-time hooks.** A :class:`Tally` may have hooks (:meth:`Tally.hook`), called on
every ``add()`` in the caller's thread and context; a Tally without any keeps ``add``
one C-level call. :func:`tallies` finds a primitive's tallies by the convention that
the Tally read as ``key`` lives in the attribute ``_key``.

**Watching.** :class:`Watchlist` is what a consumer watches: targets and the links they
report through, re-read at every scrape so links made later (an httpx transport's
per-host breakers) are found without being handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import itertools
import logging
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar, runtime_checkable

__all__ = [
    "DELAY_BUCKETS",
    "FAILURE_CLASSES",
    "KINDS",
    "LATENCY_BUCKETS",
    "LOG_FIELDS",
    "MAX_OUTBOX_TOPICS",
    "TIERS",
    "Dispatcher",
    "Listener",
    "Observable",
    "Tally",
    "Telemetry",
    "Watched",
    "Watchlist",
    "in_context",
    "key_hash",
    "tallies",
]

log = logging.getLogger("resilience")

# The vocabulary both metrics consumers (resilience.metrics, resilience.integrations.otel)
# label and bucket with, so Prometheus and OpenTelemetry say the same things.
TIERS: Final = ("local", "remote")
FAILURE_CLASSES: Final = ("outage", "poison", "unknown")
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# An outbox delivery takes a poll interval when all is well, and an outage when not.
DELAY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip
#: Topics with series of their own per outbox; later ones share the topic "_other".
MAX_OUTBOX_TOPICS: Final = 50

breaker_log = logging.getLogger("resilience.breaker")

#: The ``extra`` fields the package's log lines carry (each line those that apply), so
#: JSON handlers and structlog's stdlib bridge show them as fields. Stable names.
LOG_FIELDS: Final = (
    "resilience_event",  # what happened, a stable dotted name: "breaker.state_changed", ...
    "resilience_name",  # the breaker's, backend's, cache's, publisher's or policy's name
    "resilience_from_state",  # a transition's old state ("closed", "available", ...)
    "resilience_to_state",  # and its new one
    "resilience_reason",  # why: a breaker's trigger ("trip", "probe_failed", ...)
    "resilience_error_type",  # the error's class name, never its arguments
    "resilience_key_hash",  # key_hash(key): a key is never logged as it is
    "resilience_backend",  # what the line's primitive talks to (a Redis prefix, a broker)
    "resilience_on_error",  # a backend's policy while it is away ("local", "fail_open", ...)
    "resilience_topic",  # an outbox topic
    "resilience_count",  # how many (events, rows) the line is about
)

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
    too, so reads are subtracted, under a lock of their own.

    :meth:`hook` makes ``add()`` call functions too (in the caller's thread and context:
    span events); only a hooked Tally pays for it."""

    __slots__ = ("_count", "_hooks", "_lock", "_reads", "add")

    def __init__(self) -> None:
        self._count = itertools.count()
        self._reads = 0
        self._lock = threading.Lock()
        self._hooks: tuple[Callable[[], object], ...] = ()
        self.add: Callable[[], int] = self._count.__next__

    def value(self) -> int:
        with self._lock:
            n = next(self._count) - self._reads
            self._reads += 1
            return n

    def hook(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` after every ``add()``. A hook that raises is logged, not raised."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        with self._lock:
            self._hooks = (*self._hooks, fn)
            self._route()

    def unhook(self, fn: Callable[[], object]) -> None:
        with self._lock:
            if fn not in self._hooks:
                raise ValueError(f"hook {fn!r} is not installed")
            hooks = list(self._hooks)
            hooks.remove(fn)
            self._hooks = tuple(hooks)
            self._route()

    def _route(self) -> None:
        bump, hooks = self._count.__next__, self._hooks
        if not hooks:
            self.add = bump  # back to one C-level call
            return

        failed: set[int] = set()

        def add() -> int:
            n = bump()
            for fn in hooks:
                try:
                    fn()
                except Exception:  # the first failure of each hook at ERROR, then DEBUG
                    level = logging.DEBUG if id(fn) in failed else logging.ERROR
                    failed.add(id(fn))
                    log.log(level, "resilience tally hook %r failed", fn, exc_info=True,
                            extra=_LISTENER_FAILED)  # fmt: skip
            return n

        self.add = add  # one attribute store: adders switch over atomically


@dataclass(frozen=True, slots=True)
class Watched:
    """One watched primitive: the object, its telemetry, and when watching began."""

    target: object
    telemetry: Telemetry
    since: float


class Watchlist:
    """What a consumer watches: the targets it was given and, transitively, the
    primitives they report through (``Telemetry.links``), each once (by identity).

    :meth:`refresh` asks every watched object for its telemetry again and adds links
    that appeared since (an httpx transport makes a breaker per host when it first
    calls it), so a scrape finds them without ``on_new_breaker``. It costs one
    ``telemetry()`` per watched object per scrape, and nothing is added twice.
    """

    def __init__(self, on_new: Callable[[Watched], None], *, now: Callable[[], float]) -> None:
        self._on_new = on_new
        self._now = now
        self._entries: dict[int, Watched] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Watched]:
        return iter(list(self._entries.values()))

    def add(self, *targets: object) -> None:
        """Watch ``targets`` and their links; TypeError for what has no telemetry."""
        for target in targets:
            self._add(target, strict=True)

    def refresh(self) -> list[Watched]:
        """Re-read every watched object's links, watch the new ones; then all entries."""
        with self._lock:
            for entry in list(self._entries.values()):
                try:
                    links = _describe(entry.target).links
                except Exception:  # a scrape goes on without what one object cannot say
                    continue
                for link in links:
                    if id(link) not in self._entries:
                        self._add(link, strict=False)
            return list(self._entries.values())

    def _add(self, target: object, *, strict: bool) -> None:
        with self._lock:
            todo = [target]
            while todo:
                item = todo.pop()
                if id(item) in self._entries:
                    continue
                try:
                    telemetry = _describe(item)
                except TypeError:
                    if strict:
                        raise
                    continue
                entry = Watched(item, telemetry, self._now())
                self._entries[id(item)] = entry
                self._on_new(entry)
                todo.extend(reversed(telemetry.links))


def _describe(target: object) -> Telemetry:
    describe = getattr(target, "telemetry", None)
    telemetry = describe() if callable(describe) else None
    if not isinstance(telemetry, Telemetry) or telemetry.kind not in KINDS:
        raise TypeError(
            "watch() takes breakers, limiters, caches, outbox publishers, Redis "
            f"backends and policies, got {type(target).__name__}"
        )
    return telemetry


def tallies(target: object) -> dict[str, Tally]:
    """``target``'s tallies by the key its telemetry reads them as: by convention the
    Tally read as ``"rejected"`` lives in ``target._rejected``. For event-time hooks
    (span events) on primitives whose events are not otherwise delivered."""
    found: dict[str, Tally] = {}
    names: set[str] = set(getattr(target, "__dict__", {}))
    for cls in type(target).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    for attr in sorted(names):
        if attr.startswith("_") and not attr.startswith("__"):
            value = getattr(target, attr, None)
            if isinstance(value, Tally):
                found[attr[1:]] = value
    return found


def key_hash(key: object) -> str:
    """A short stable digest of a key, for logs: the key itself may be personal data."""
    return hashlib.sha256(str(key).encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _Queue(deque[Any]):
    """A dispatcher's queue. ``append``/``extend`` are per-instance attributes, so a
    dispatcher with an :func:`in_context` listener can also note each event, with the
    producer's context, in the producing thread's own list (``own``), and one without
    keeps deque's own methods, pre-bound."""

    __slots__ = ("append", "extend", "own")

    def __init__(self) -> None:
        super().__init__()
        self.plain()

    def plain(self) -> None:
        self.__class__ = _Queue
        self.own: threading.local | None = None
        self.append = super().append  # type: ignore[method-assign]
        self.extend = super().extend  # type: ignore[method-assign]

    def stamped(self) -> None:
        push, push_all, context = deque.append, deque.extend, contextvars.copy_context
        own = self.own = threading.local()

        def mine() -> list[tuple[object, contextvars.Context]]:
            try:
                pending: list[tuple[object, contextvars.Context]] = own.pending
            except AttributeError:
                pending = own.pending = []
            return pending

        def append(event: object) -> None:
            push(self, event)
            mine().append((event, context()))

        def extend(events: Iterable[object]) -> None:
            events = list(events)
            push_all(self, events)
            now = context()
            mine().extend((event, now) for event in events)

        self.append = append  # type: ignore[method-assign]
        self.extend = extend  # type: ignore[method-assign]
        self.__class__ = _StampedQueue


class _StampedQueue(_Queue):
    """The queue while an :func:`in_context` listener is registered: it is true while
    the calling thread has events of its own to deliver, even when another thread's
    drain has taken the shared queue, so the producer's ``if queue: drain()`` still
    runs and delivers them itself (before its call returns, while its span is open)."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return deque.__len__(self) > 0 or bool(getattr(self.own, "pending", None))


class in_context:
    """Wrap a sync listener so it runs in the thread and context of the code whose call
    produced each event (its contextvars: the current span), before that call returns:
    the producer delivers its own events to these listeners, so a span has its events
    before it ends even while another thread holds the dispatcher's turn. Order holds
    per producer, not across threads. Events are noted only while such a listener is
    registered."""

    __slots__ = ("listener",)

    def __init__(self, listener: Callable[[Any], object]) -> None:
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        if _is_async(listener):
            raise TypeError("in_context takes a sync listener")
        self.listener = listener

    def __call__(self, event: Any) -> None:
        self.listener(event)

    def __repr__(self) -> str:
        return f"in_context({self.listener!r})"


class Dispatcher(Generic[E]):
    __slots__ = (
        "_background", "_failed", "_filters", "_listeners", "_turn", "has_async", "queue",
    )  # fmt: skip

    def __init__(self, listeners: Iterable[Listener[E]] = ()) -> None:
        self.queue: deque[E] = _Queue()
        self._turn = threading.Lock()
        self._listeners: tuple[Listener[E], ...] = ()
        # Per listener: the event types it wants, or None for all.
        self._filters: dict[int, tuple[type, ...] | None] = {}
        self._background: set[Any] = set()
        # Listeners that have raised (by id; held in _listeners, so ids are stable).
        self._failed: set[int] = set()
        self.has_async = False
        if not _WRITERS:
            _load_writers()
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
        if isinstance(listener, in_context):
            self._stamp()

    def remove(self, listener: Listener[E]) -> None:
        # Found by equality, removed by identity: `obj.method` is a new bound method
        # object each time it is written, equal to the registered one but not it.
        registered = next((x for x in self._listeners if x == listener), None)
        if registered is None:
            raise ValueError(f"listener {listener!r} is not registered")
        self._listeners = tuple(x for x in self._listeners if x is not registered)
        del self._filters[id(registered)]
        self._failed.discard(id(registered))
        self.has_async = any(_is_async(x) for x in self._listeners)
        self._stamp()

    def _stamp(self) -> None:
        queue = self.queue
        assert isinstance(queue, _Queue)
        if any(isinstance(x, in_context) for x in self._listeners):
            queue.stamped()
        else:
            queue.plain()

    def _takes(self, listener: Listener[E], event: E) -> bool:
        only = self._filters[id(listener)]
        return only is None or isinstance(event, only)

    def _deliver(self) -> Generator[tuple[Listener[E], Awaitable[None]], None, None]:
        """Deliver queued events in order, holding the turn; yield each async listener's
        awaitable for the driver to await (:meth:`adrain`) or schedule (:meth:`drain`)."""
        queue, turn = self.queue, self._turn
        own = queue.own  # type: ignore[attr-defined]
        if own is not None:
            self._deliver_own(own)
        size = deque.__len__  # the shared queue, not a stamped queue's own events
        while size(queue):
            if not turn.acquire(blocking=False):
                return  # the one holding the turn delivers our events too
            try:
                while size(queue):
                    event = queue.popleft()
                    write = _WRITERS.get(event.__class__)
                    if write is not None:
                        write(event)
                    for listener in self._listeners:
                        if listener.__class__ is in_context or not self._takes(listener, event):
                            continue  # in_context listeners: the producer delivers
                        result = self._call(listener, event)
                        if result is not None:
                            yield listener, result
            finally:
                turn.release()

    def _deliver_own(self, own: threading.local) -> None:
        """Deliver this thread's own noted events to the in_context listeners, each in
        the context that produced it."""
        pending = getattr(own, "pending", None)
        while pending:
            own.pending = []  # events a listener produces go to the next round
            for event, context in pending:
                for listener in self._listeners:
                    if listener.__class__ is in_context and self._takes(listener, event):
                        context.run(self._call, listener, event)
            pending = own.pending

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
                    self._failure(listener)

    def _call(self, listener: Callable[[Any], Any], event: object) -> Any:
        try:
            result = listener(event)
        except Exception:
            self._failure(listener)
            return None
        return result if inspect.isawaitable(result) else None

    def _failure(self, listener: object) -> None:
        """Log a listener's exception: its first at ERROR, with the traceback; later ones
        at DEBUG, so a listener that fails on every event does not log every call."""
        first = id(listener) not in self._failed
        self._failed.add(id(listener))
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "resilience listener %r failed%s",
            listener,
            " (later failures of it are logged at DEBUG)" if first else "",
            exc_info=True,
            extra=_LISTENER_FAILED,
        )

    def _schedule(self, listener: object, awaitable: Awaitable[None]) -> None:
        """Run an async listener's awaitable that a sync caller produced, without blocking."""

        async def guarded() -> None:
            try:
                await awaitable
            except Exception:
                self._failure(listener)

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
            extra={"resilience_event": "listener.no_loop"},
        )


_LISTENER_FAILED: Final = {"resilience_event": "listener.failed"}

# -- the log lines the sink writes -------------------------------------------------------

#: Event type -> the function that logs it; filled on the first Dispatcher.
_WRITERS: dict[type, Callable[[Any], None]] = {}
#: Triggers an operator (or the code, deliberately) pulls: always INFO.
_DELIBERATE: Final = frozenset({"force_open", "force_closed", "disable", "reset", "half_open"})


def _load_writers() -> None:
    # Lazily: the breaker's modules import this one.
    from resilience.breaker.events import StateChanged

    _WRITERS[StateChanged] = _log_state_change


def _log_state_change(event: Any) -> None:
    """One line per breaker transition. A trip is a WARNING and a recovery INFO; the
    probing between (open -> half-open -> open while the dependency stays down) is
    DEBUG, so a long outage does not flood the log."""
    old, new, trigger = event.old.value, event.new.value, event.trigger.value
    if trigger in _DELIBERATE or new == "closed":
        level = logging.INFO
    elif new == "open" and old == "closed":
        level = logging.WARNING
    elif new in ("open", "half_open") and old in ("open", "half_open"):
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not breaker_log.isEnabledFor(level):
        return
    breaker_log.log(
        level,
        "resilience breaker %r: %s -> %s (%s)",
        event.breaker,
        old,
        new,
        trigger,
        extra={
            "resilience_event": "breaker.state_changed",
            "resilience_name": event.breaker,
            "resilience_from_state": old,
            "resilience_to_state": new,
            "resilience_reason": trigger,
        },
    )


def _is_async(listener: object) -> bool:
    return inspect.iscoroutinefunction(listener) or inspect.iscoroutinefunction(
        getattr(listener, "__call__", None)  # noqa: B004 - an object's async __call__
    )


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
