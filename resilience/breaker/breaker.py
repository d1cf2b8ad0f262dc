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
import math
import threading
import types
import weakref
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

import wrapt

from resilience._cancel import cancelled_types, deadline_expired
from resilience._clock import Clock, resolve
from resilience.breaker.policy import (
    Admission,
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
    StateChanged,
)
from resilience.errors import CircuitOpenError
from resilience.events import Dispatcher, Listener

__all__ = ["BreakerEvent", "CircuitBreaker", "Permit"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
ExcTypes = type[BaseException] | tuple[type[BaseException], ...]
BreakerEvent = StateChanged | CallRejected | CallFinished

_DEFAULT_THRESHOLD: Final = 5
_INSIDE: Final[tuple[None]] = (None,)  # the context mark of a call in progress
_UNSET: Any = object()
_INF: Final = math.inf

# Every breaker, so resilience.testing can switch them all off; weak, so it never keeps one.
_ALL: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_forced_closed_for_tests = False


def _exc_types(field: str, value: object) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{field} must be exception classes, got {item!r}")
    return tuple(cast("Iterable[type[BaseException]]", items))


class Permit:
    """One admitted call, for callers that decide before they act.

    Report exactly one outcome; later reports are ignored. A permit that is never
    reported holds a half-open probe slot only until its lease runs out.
    """

    __slots__ = ("_admission", "_breaker", "_settled", "_start")

    def __init__(
        self,
        breaker: CircuitBreaker,
        admission: Admission,
        start: float | None,
        *,
        nested: bool = False,
    ) -> None:
        self._breaker = breaker
        self._admission = admission
        self._start = start
        # Nested in a call of the same breaker: the outer call reports, this one never.
        self._settled = nested

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    def success(self) -> None:
        if self._settle():
            self._breaker._finish(self._admission, self._start, Outcome.SUCCESS, None)

    def failure(self, error: BaseException | None = None) -> None:
        if self._settle():
            self._breaker._finish(self._admission, self._start, Outcome.FAILURE, error)

    def ignore(self) -> None:
        if self._settle():
            self._breaker._finish(self._admission, self._start, Outcome.IGNORED, None)

    def error(self, error: BaseException) -> None:
        """Report an exception from the work, classified as the decorator would classify it
        (``include`` / ``exclude``, cancellation, deadlines)."""
        if self._settle():
            self._breaker._on_error(self._admission, self._start, error)

    async def aerror(self, error: BaseException) -> None:
        if self._settle():
            await self._breaker._aon_error(self._admission, self._start, error)

    async def asuccess(self) -> None:
        if self._settle():
            await self._breaker._afinish(self._admission, self._start, Outcome.SUCCESS, None)

    async def afailure(self, error: BaseException | None = None) -> None:
        if self._settle():
            await self._breaker._afinish(self._admission, self._start, Outcome.FAILURE, error)

    async def aignore(self) -> None:
        if self._settle():
            await self._breaker._afinish(self._admission, self._start, Outcome.IGNORED, None)


class CircuitBreaker:
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
    ) -> None:
        if store is not None and not callable(getattr(store, "attach", None)):
            raise TypeError(f"store must be a RedisBreakerStore, got {type(store).__name__}")
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
        self._policy = BreakerPolicy(self.config)
        self._events: Dispatcher[BreakerEvent] = Dispatcher(listeners)
        # Non-empty while a call of this breaker is in progress in this context: the
        # `with` blocks' permits (None for a block nested in another call), or _INSIDE.
        self._stack: contextvars.ContextVar[tuple[Permit | None, ...]] = contextvars.ContextVar(
            f"resilience.breaker.{name}", default=()
        )
        self._observe()
        _ALL.add(self)
        if _forced_closed_for_tests:
            self.force_closed()
        self.store = store
        if store is not None:
            store.attach(self)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._policy.state.value})"

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

    def _with_policy(self, action: Callable[[BreakerPolicy, float], T]) -> T:
        """Run ``action(policy, now)`` under the lock, then deliver the events it made."""
        now = self._clock.monotonic()
        with self._lock:
            result = action(self._policy, now)
            self._flush()
        self._events.drain()
        return result

    @property
    def state(self) -> CircuitState:
        """The state now; an open breaker whose recovery time passed reads half-open."""
        return self._with_policy(BreakerPolicy.current_state)

    @property
    def mode(self) -> BreakerMode:
        return self._policy.mode

    @property
    def retry_after(self) -> float:
        """Seconds until an open breaker admits a probe; 0.0 when it is not open."""
        return self.stats().retry_after

    def stats(self) -> BreakerStats:
        def read(policy: BreakerPolicy, now: float) -> BreakerStats:
            quick = next(self._quick_rejections) - self._quick_reads
            self._quick_reads += 1
            stats = policy.stats(now)
            return dataclasses.replace(stats, rejected=stats.rejected + quick)

        return self._with_policy(read)

    # -- operator controls ---------------------------------------------------------------

    def _control(self, action: Callable[[BreakerPolicy, float], None]) -> None:
        self._with_policy(action)

    def force_open(self) -> None:
        """Reject every call until reset() or force_closed()."""
        self._control(BreakerPolicy.force_open)

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
            self._quick_rejections = itertools.count()
            self._quick_reads = 0

    # -- the core steps, shared by every call shape --------------------------------------

    def _flush(self) -> None:
        """Move the policy's events to the dispatcher's queue. Call with the lock held."""
        events = self._policy.events
        if events:
            self._events.queue.extend(events)
            events.clear()

    def _admit(self) -> tuple[Admission, float | None] | float:
        policy = self._policy
        now = self._clock.monotonic()
        until = policy.reject_until
        if now < until:  # open: decided without the lock or the policy
            next(self._quick_rejections)  # atomic, unlike `+= 1`
            return policy.forced_retry_after() if until == _INF else until - now
        with self._lock:
            result = policy.admit(now)
            self._flush()
        if result.__class__ is float:
            return result
        return cast(Admission, result), (now if policy.timed else None)

    def _begin(self) -> tuple[Admission, float | None]:
        """Admit one call: lock-free when closed and untimed, else through _enter."""
        admission = self._policy.free
        if admission is not None:
            return admission, None
        return self._enter()

    async def _abegin(self) -> tuple[Admission, float | None]:
        admission = self._policy.free
        if admission is not None:
            return admission, None
        return await self._aenter()

    def _enter(self) -> tuple[Admission, float | None]:
        result = self._admit()
        if self._events.queue:
            self._events.drain()
        if result.__class__ is float:
            # The state, read without the lock, only words the message.
            raise CircuitOpenError(self.name, result, self._policy.state._value_)
        return cast("tuple[Admission, float | None]", result)

    async def _aenter(self) -> tuple[Admission, float | None]:
        result = self._admit()
        if self._events.queue:
            await self._adrain()
        if result.__class__ is float:
            raise CircuitOpenError(self.name, result, self._policy.state._value_)
        return cast("tuple[Admission, float | None]", result)

    def _record(
        self,
        admission: Admission,
        start: float | None,
        outcome: Outcome,
        error: BaseException | None,
    ) -> None:
        now = self._clock.monotonic()
        duration = None if start is None else now - start
        with self._lock:
            self._policy.record(admission, outcome, now, duration, error)
            self._flush()

    def _finish(
        self,
        admission: Admission,
        start: float | None,
        outcome: Outcome,
        error: BaseException | None,
    ) -> None:
        self._record(admission, start, outcome, error)
        if self._events.queue:
            self._events.drain()

    async def _afinish(
        self,
        admission: Admission,
        start: float | None,
        outcome: Outcome,
        error: BaseException | None,
    ) -> None:
        self._record(admission, start, outcome, error)
        if self._events.queue:
            await self._adrain()

    async def _adrain(self) -> None:
        if self._events.has_async:
            await self._events.adrain()
        else:
            self._events.drain()

    def _classify(self, error: BaseException, in_async: bool) -> Outcome:
        if isinstance(error, cancelled_types()):
            # A caller going away is no verdict on the dependency; a deadline is.
            return Outcome.FAILURE if in_async and deadline_expired() else Outcome.IGNORED
        if self._exclude and isinstance(error, self._exclude):
            return Outcome.IGNORED
        if isinstance(error, self._include):
            return Outcome.FAILURE
        return Outcome.IGNORED

    def _result_outcome(self, result: object) -> Outcome:
        predicate = self._fail_on_result
        return Outcome.FAILURE if predicate is not None and predicate(result) else Outcome.SUCCESS

    def _on_error(self, admission: Admission, start: float | None, error: BaseException) -> None:
        self._finish(admission, start, self._classify(error, False), error)

    async def _aon_error(
        self, admission: Admission, start: float | None, error: BaseException
    ) -> None:
        await self._afinish(admission, start, self._classify(error, True), error)

    def _on_result(self, admission: Admission, start: float | None, result: object) -> None:
        self._finish(admission, start, self._result_outcome(result), None)

    async def _aon_result(self, admission: Admission, start: float | None, result: object) -> None:
        await self._afinish(admission, start, self._result_outcome(result), None)

    # -- calling -------------------------------------------------------------------------

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` through the breaker."""
        return self._call(fn, args, kwargs)

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker."""
        return await self._acall(fn, args, kwargs)

    # The full path of every call shape: nested calls pass through, the rest mark the
    # context while they run.
    def _call(self, fn: Callable[..., R], args: Any, kwargs: Any) -> R:
        stack = self._stack
        if stack.get():
            return fn(*args, **kwargs)  # inside a call of this breaker: that call counts
        # _begin inlined: a rejection raised here unwinds one frame fewer.
        admission = self._policy.free
        start = None
        if admission is None:
            admission, start = self._enter()
        token = stack.set(_INSIDE)
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            stack.reset(token)
            self._on_error(admission, start, error)
            raise
        stack.reset(token)
        if not self._policy.quiet:
            self._on_result(admission, start, result)
        return result

    async def _acall(self, fn: Callable[..., Awaitable[R]], args: Any, kwargs: Any) -> R:
        stack = self._stack
        if stack.get():
            return await fn(*args, **kwargs)
        admission = self._policy.free
        start = None
        if admission is None:
            admission, start = await self._aenter()
        token = stack.set(_INSIDE)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as error:
            stack.reset(token)
            await self._aon_error(admission, start, error)
            raise
        stack.reset(token)
        if not self._policy.quiet:
            await self._aon_result(admission, start, result)
        return result

    def try_acquire(self) -> Permit | None:
        """Admit one call without raising: a Permit to report on, or None if rejected.

        Inside a call of this breaker the permit reports nothing: the outer call does.
        """
        if self._stack.get():
            return Permit(self, (0, 0, 0), None, nested=True)
        result = self._admit()
        if self._events.queue:
            self._events.drain()
        if result.__class__ is float:
            return None
        admission, start = cast("tuple[Admission, float | None]", result)
        return Permit(self, admission, start)

    async def atry_acquire(self) -> Permit | None:
        if self._stack.get():
            return Permit(self, (0, 0, 0), None, nested=True)
        result = self._admit()
        if self._events.queue:
            await self._adrain()
        if result.__class__ is float:
            return None
        admission, start = cast("tuple[Admission, float | None]", result)
        return Permit(self, admission, start)

    # `with b:` keeps its permit in a context variable: the breaker is shared, so the
    # permit of one thread or task must never sit on the object.
    def _pop_permit(self) -> Permit | None:
        stack = self._stack.get()
        self._stack.set(stack[:-1])
        return stack[-1]

    def __enter__(self) -> CircuitBreaker:
        stack = self._stack.get()
        if stack:  # nested in a call of this breaker: pass through
            self._stack.set((*stack, None))
            return self
        admission, start = self._begin()
        self._stack.set((Permit(self, admission, start),))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._pop_permit()
        if permit is None:
            return
        if exc is None:
            if not self._policy.quiet:
                permit.success()
        else:
            self._on_error(permit._admission, permit._start, exc)

    async def __aenter__(self) -> CircuitBreaker:
        stack = self._stack.get()
        if stack:
            self._stack.set((*stack, None))
            return self
        admission, start = await self._abegin()
        self._stack.set((Permit(self, admission, start),))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._pop_permit()
        if permit is None:
            return
        if exc is None:
            if not self._policy.quiet:
                await permit.asuccess()
        else:
            await self._aon_error(permit._admission, permit._start, exc)

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

    def _wrap_sync(self, fn: Callable[P, R]) -> Callable[P, R]:
        policy, on_error, on_result, full = (
            self._policy,
            self._on_error,
            self._on_result,
            self._call,
        )

        @functools.wraps(fn)
        def breaker_sync(*args: P.args, **kwargs: P.kwargs) -> R:
            admission = policy.quiet_free
            if admission is None:  # not closed-and-quiet: the full path
                return full(fn, args, kwargs)
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:
                on_error(admission, None, error)
                raise
            if not policy.quiet:
                on_result(admission, None, result)
            return result

        return breaker_sync

    def _wrap_async(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        policy, full = self._policy, self._acall
        aon_error, aon_result = self._aon_error, self._aon_result

        @functools.wraps(fn)
        async def breaker_async(*args: P.args, **kwargs: P.kwargs) -> R:
            admission = policy.quiet_free
            if admission is None:
                return await full(fn, args, kwargs)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as error:
                await aon_error(admission, None, error)
                raise
            if not policy.quiet:
                await aon_result(admission, None, result)
            return result

        return breaker_async

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
