"""CircuitBreaker: the thread- and task-safe shell around :class:`BreakerPolicy`.

One breaker serves any mix of threads and async tasks (asyncio or trio). A
``threading.Lock`` guards the pure policy and is held only around its decisions,
never across the protected call, so async tasks may take it too: it is never held
long enough to stall an event loop.

The closed-state path of the default configuration takes no lock: admission reads
``policy.quiet_free`` and success reads ``policy.quiet``; both are single references
written under the lock (see ``BreakerPolicy._refresh``).

A call made inside a call of the same breaker (same thread or task: a decorated
function called through ``b.call``, or inside ``with b:``) passes through: it takes no
permit and what it raises is counted once. Every path but the lock-free one marks
"inside" in a context variable; on the lock-free path the policy recognises an
exception that a nested call already counted (``BreakerPolicy.record``), which keeps
that path free of context-variable writes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import itertools
import threading
import types
from collections.abc import (
    AsyncGenerator,
    Callable,
    Generator,
    Iterable,
    Sequence,
)
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

import wrapt

from resilience._checks import positive_seconds
from resilience._clock import Clock, resolve
from resilience.breaker._async_shell import AsyncBreakerOps
from resilience.breaker._core import BreakerEvent
from resilience.breaker._sync_shell import SyncBreakerOps
from resilience.breaker.permit import Permit
from resilience.breaker.policy import (
    BreakerConfig,
    BreakerMode,
    BreakerPolicy,
    BreakerStats,
    CallFinished,
    CallRejected,
    CircuitState,
    FailureRate,
    Outcome,
    SlowCallRate,
)
from resilience.breaker.registry import REGISTRY
from resilience.events import Dispatcher, Listener, Tally, Telemetry

__all__ = ["BreakerEvent", "CircuitBreaker", "Permit"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
ExcTypes = type[BaseException] | tuple[type[BaseException], ...]

_DEFAULT_THRESHOLD: Final = 5
_UNSET: Any = object()

# Every breaker is in resilience.breaker.registry (weak): for rs.breakers() and
# rs.get_breaker(), and so resilience.testing can switch them all off.
_forced_closed_for_tests = False


def _exc_types(field: str, value: object) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{field} must be exception classes, got {item!r}")
    return tuple(cast("Iterable[type[BaseException]]", items))


class CircuitBreaker(SyncBreakerOps, AsyncBreakerOps):
    """A circuit breaker for sync and async callers alike.

    >>> b = CircuitBreaker("payments", failure_threshold=5, recovery_timeout=30.0)
    >>> @b
    ... def charge(amount: int) -> str: ...

    See docs/breaker.md for every option.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = _UNSET,
        recovery_timeout: float = 30.0,
        success_threshold: int = 2,
        half_open_max_calls: int = 1,
        failure_rate: FailureRate | None = None,
        slow_call_rate: SlowCallRate | None = None,
        recovery_backoff: float = 1.0,
        max_recovery_timeout: float | None = None,
        probe_lease: float | None = None,
        include: ExcTypes | Sequence[type[BaseException]] = (Exception,),
        exclude: ExcTypes | Sequence[type[BaseException]] = (),
        fail_on_result: Callable[[Any], bool] | None = None,
        listeners: Iterable[Listener[BreakerEvent]] = (),
        clock: Clock | None = None,
        store: Any = None,
        fleet: Any = None,
    ) -> None:
        if store is not None and not callable(getattr(store, "attach", None)):
            raise TypeError(f"store must be a RedisBreakerStore, got {type(store).__name__}")
        if fleet is not None and not callable(getattr(fleet, "attach", None)):
            raise TypeError(f"fleet must be a RedisFleet, got {type(fleet).__name__}")
        if failure_threshold is _UNSET:
            # A rate rule replaces the consecutive count unless both are asked for.
            rates = failure_rate is not None or slow_call_rate is not None
            failure_threshold = None if rates else _DEFAULT_THRESHOLD
        self.config = BreakerConfig(
            name=name,
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            failure_rate=failure_rate,
            slow_call_rate=slow_call_rate,
            recovery_backoff=recovery_backoff,
            max_recovery_timeout=max_recovery_timeout,
            probe_lease=probe_lease,
        )
        if fail_on_result is not None and not callable(fail_on_result):
            raise TypeError(f"fail_on_result must be callable, got {type(fail_on_result).__name__}")
        self._include = _exc_types("include", include)
        self._exclude = _exc_types("exclude", exclude)
        self._fail_on_result = fail_on_result
        self._clock = resolve(clock)
        self._lock = threading.Lock()
        # Rejections counted without the lock: next() on a count is atomic. Reading it
        # advances it too, so reads are subtracted (see stats).
        self._quick_rejections = itertools.count()
        self._quick_reads = 0
        self._quick_carry = 0
        self._ok: Tally | None = None  # successes on the lock-free path, while watched
        self._policy = BreakerPolicy(self.config)
        self._events: Dispatcher[BreakerEvent] = Dispatcher(listeners)
        # Non-empty while a call of this breaker is in progress in this context: the
        # `with` blocks' permits (None for a block nested in another call), or _INSIDE.
        self._stack: contextvars.ContextVar[tuple[Permit | None, ...]] = contextvars.ContextVar(
            f"resilience.breaker.{name}", default=()
        )
        self._observe()
        REGISTRY.add(self)
        if _forced_closed_for_tests:
            self.force_closed()
        self.store = store
        if store is not None:
            store.attach(self)
        #: The RedisFleet this breaker decides with, or None (see resilience.breaker.fleet).
        self.fleet = fleet
        if fleet is not None:
            fleet.attach(self)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._policy.state.value})"

    def copy(self, name: str) -> CircuitBreaker:
        """A new breaker called ``name``, configured like this one: the same thresholds,
        timeouts, rate rules, ``include``/``exclude``, ``fail_on_result``, clock, store and
        fleet (both share the copy's state under its own name). It starts closed, with no
        counts, in the normal mode; listeners are not copied (add them to the copy)."""
        settings = {
            field.name: getattr(self.config, field.name)
            for field in dataclasses.fields(self.config)
            if field.name != "name"
        }
        return CircuitBreaker(
            name,
            **settings,
            include=self._include,
            exclude=self._exclude,
            fail_on_result=self._fail_on_result,
            clock=self._clock,
            store=self.store,
            fleet=self.fleet,
        )

    # -- listeners -----------------------------------------------------------------------

    def add_listener(
        self,
        listener: Listener[BreakerEvent],
        *,
        only: tuple[type[BreakerEvent], ...] | None = None,
    ) -> None:
        """Call ``listener(event)`` for every StateChanged, CallRejected and CallFinished.

        ``only=(rs.StateChanged,)`` limits it to those types. A breaker whose listeners
        all take state changes only keeps its lock-free fast path and times no call.
        """
        self._events.add(listener, only)
        self._observe()

    def remove_listener(self, listener: Listener[BreakerEvent]) -> None:
        self._events.remove(listener)
        self._observe()

    def _observe(self) -> None:
        events = self._events
        observed = events.wants(CallFinished) or events.wants(CallRejected)
        with self._lock:
            self._policy.set_observation(
                observed=observed, timed=observed, record_successes=self._fail_on_result is not None
            )

    # -- reading -------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The state now; an open breaker whose recovery time passed reads half-open."""
        return self._with_policy(BreakerPolicy.current_state)

    @property
    def mode(self) -> BreakerMode:
        """How an operator set it; a timed force-open whose time is up reads normal."""
        return self._with_policy(BreakerPolicy.current_mode)

    @property
    def retry_after(self) -> float:
        """Seconds until an open breaker admits a probe; 0.0 when it is not open. For a
        timed force-open, the time left of it; untimed, one ``recovery_timeout``."""
        return self.stats().retry_after

    def stats(self) -> BreakerStats:
        def read(policy: BreakerPolicy, now: float) -> BreakerStats:
            stats = policy.stats(now)
            return dataclasses.replace(stats, rejected=stats.rejected + self._quick())

        return self._with_policy(read)

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads (resilience.events). Asking for it turns on the
        one counter the lock-free path lacks: successes, a C-level increment per call."""
        with self._lock:
            if self._ok is None:
                self._ok = Tally()
                self._policy.count_ok = self._ok.add
        return Telemetry(
            "breaker",
            self.name,
            self._read,
            listen=self.add_listener,
            timed=(CallFinished,),
            # A fleet's guard around Redis: its outages and fallbacks, as a backend's.
            links=() if self.fleet is None else (self.fleet.guard,),
        )

    def _read(self) -> dict[str, Any]:
        def read(policy: BreakerPolicy, now: float) -> dict[str, Any]:
            calls = {o.value: n for o, n in policy.outcomes_total.items()}
            if self._ok is not None:
                calls[Outcome.SUCCESS.value] += self._ok.value()
            return {
                "state": policy.current_state(now),
                "calls": calls,
                "rejected": policy.rejections_total + self._quick_carry + self._quick(),
                "transitions": {
                    (old.value, new.value): n for (old, new), n in policy.transitions_total.items()
                },
            }

        return self._with_policy(read)

    # -- operator controls ---------------------------------------------------------------

    def _control(self, action: Callable[[BreakerPolicy, float], None]) -> None:
        self._with_policy(action)

    def force_open(self, duration: float | None = None) -> None:
        """Reject every call until reset(), force_closed(), disable() or half_open().

        With ``duration`` (seconds, on the breaker's clock), only that long: then the
        breaker is half-open and probes, under the normal state machine again. Rejected
        calls meanwhile get the time left as ``CircuitOpenError.retry_after``.
        """
        if duration is None:
            self._control(BreakerPolicy.force_open)
            return
        seconds = positive_seconds("duration", duration)
        self._control(lambda policy, now: policy.force_open(now, seconds))

    def half_open(self) -> None:
        """Half-open now, from any state or mode: the next calls are probes.

        Up to ``half_open_max_calls`` probes run at once, ``success_threshold``
        successes close the breaker and one failure opens it again. Calls that started
        before do not count. Like reset(), it ends any forced or disabled mode.
        """
        self._control(BreakerPolicy.half_open)

    def force_closed(self) -> None:
        """Admit every call and count nothing until reset()."""
        self._control(BreakerPolicy.force_closed)

    def disable(self) -> None:
        """Admit every call, keep counting and reporting, never trip (metrics only)."""
        self._control(BreakerPolicy.disable)

    def reset(self) -> None:
        """Back to a fresh closed breaker under the normal state machine."""
        self._control(BreakerPolicy.reset)
        with self._lock:
            self._quick_carry += self._quick()  # telemetry's total never goes back
            self._quick_rejections = itertools.count()
            self._quick_reads = 0

    # -- the core steps, shared by every call shape --------------------------------------

    # -- calling -------------------------------------------------------------------------

    # -- decorating ----------------------------------------------------------------------

    @overload
    def __call__(self, fn: classmethod[T, P, R]) -> classmethod[T, P, R]: ...
    @overload
    def __call__(self, fn: staticmethod[P, R]) -> staticmethod[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Any) -> Any:
        """Decorate a function, method, generator or async generator (sync or async)."""
        if isinstance(fn, classmethod):
            return classmethod(self(fn.__func__))
        if isinstance(fn, staticmethod):
            return staticmethod(self(fn.__func__))
        if not callable(fn):
            raise TypeError(f"CircuitBreaker decorates callables, got {type(fn).__name__}")
        if inspect.isasyncgenfunction(fn):
            return self._wrap_async_gen(fn)
        if inspect.isgeneratorfunction(fn):
            return self._wrap_gen(fn)
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - objects with an async __call__
        ):
            return self._wrap_async(fn)
        return self._wrap_sync(fn)

    def _wrap_gen(self, fn: Callable[P, Generator[T, Any, R]]) -> Callable[P, Generator[T, Any, R]]:
        @functools.wraps(fn)
        def breaker_gen(*args: P.args, **kwargs: P.kwargs) -> Generator[T, Any, R]:
            admission, start = self._enter()  # runs at the first next(), with the body
            try:
                result = yield from fn(*args, **kwargs)
            except BaseException as error:
                self._on_error(admission, start, error)
                raise
            self._on_result(admission, start, result)
            return result

        return breaker_gen

    def _wrap_async_gen(
        self, fn: Callable[P, AsyncGenerator[T, Any]]
    ) -> Callable[P, AsyncGenerator[T, Any]]:
        @functools.wraps(fn)
        async def breaker_agen(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[T, Any]:
            admission, start = await self._aenter()
            agen = fn(*args, **kwargs)
            try:
                sent: Any = None
                thrown: BaseException | None = None
                while True:
                    try:
                        if thrown is None:
                            item = await agen.asend(sent)
                        else:
                            item = await agen.athrow(thrown)
                    except StopAsyncIteration:
                        break
                    thrown = None
                    try:
                        sent = yield item
                    except GeneratorExit:
                        await agen.aclose()
                        raise
                    except BaseException as error:  # delegated into the inner generator
                        thrown, sent = error, None
            except BaseException as error:
                await self._aon_error(admission, start, error)
                raise
            await self._aon_result(admission, start, None)

        return breaker_agen

    # -- guarding an existing object -----------------------------------------------------

    def guard(self, target: T, *, methods: Iterable[str]) -> T:
        """A transparent proxy of ``target`` whose named methods go through this breaker.

        Everything else (attributes, other methods, isinstance checks) passes through.
        """
        names = [methods] if isinstance(methods, str) else list(methods)
        if not names:
            raise ValueError("methods must name at least one method of the target")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"methods must be strings, got {name!r}")
            if not callable(getattr(target, name, None)):
                raise ValueError(
                    f"methods: {type(target).__name__} has no callable attribute {name!r}"
                )
        return cast(T, _Guarded(target, self, frozenset(names)))


class _Guarded(wrapt.ObjectProxy[T]):
    """wrapt proxy whose guarded methods are wrapped once per bound method object."""

    def __init__(self, wrapped: T, breaker: CircuitBreaker, methods: frozenset[str]) -> None:
        super().__init__(wrapped)
        self._self_breaker = breaker
        self._self_methods = methods
        self._self_cache: dict[str, tuple[object, Callable[..., Any]]] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__wrapped__, name)
        if name not in self._self_methods:
            return value
        # Bound methods are fresh objects on every access: wrap the function once and
        # bind the wrapper, so iscoroutinefunction and __name__ keep working.
        func = getattr(value, "__func__", value)
        cached = self._self_cache.get(name)
        if cached is None or cached[0] is not func:
            cached = (func, self._self_breaker(func))
            self._self_cache[name] = cached
        owner = getattr(value, "__self__", None)
        return cached[1] if owner is None else types.MethodType(cached[1], owner)

    def __repr__(self) -> str:
        return f"<guarded by {self._self_breaker.name!r}: {self.__wrapped__!r}>"
