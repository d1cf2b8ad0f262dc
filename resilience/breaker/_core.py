"""What the breaker's sync and async call paths share: state, admission, recording.

:mod:`resilience.breaker._async_shell` holds the async call paths, and its generated
twin :mod:`resilience.breaker._sync_shell` the sync ones (scripts/unasync.py);
:class:`~resilience.breaker.breaker.CircuitBreaker` combines them. The same for permits.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from resilience._cancel import cancelled_types, deadline_expired
from resilience._clock import Clock
from resilience.breaker.config import BreakerConfig
from resilience.breaker.events import CallFinished, CallRejected, Outcome, StateChanged
from resilience.breaker.policy import Admission, BreakerPolicy
from resilience.events import Dispatcher

if TYPE_CHECKING:
    from resilience.breaker.breaker import CircuitBreaker
    from resilience.breaker.permit import Permit

__all__ = ["BreakerCore", "PermitCore"]

T = TypeVar("T")
BreakerEvent = StateChanged | CallRejected | CallFinished

_INSIDE: Final[tuple[None]] = (None,)  # the context mark of a call in progress
_INF: Final = math.inf
# Which side classifies an error: only async code can tell a deadline from a caller
# going away (anyio's cancel scopes). unasync renames _IN_ASYNC to _IN_SYNC.
_IN_ASYNC: Final = True
_IN_SYNC: Final = False


class PermitCore:
    """One admitted call's admission, and whether it was reported."""

    __slots__ = ("_admission", "_breaker", "_settled", "_start")

    def __init__(
        self,
        breaker: BreakerCore,
        admission: Admission,
        start: float | None,
        *,
        nested: bool = False,
    ) -> None:
        # Made only by CircuitBreaker's call paths, which live in its mixins.
        self._breaker = cast("CircuitBreaker", breaker)
        self._admission = admission
        self._start = start
        # Nested in a call of the same breaker: the outer call reports, this one never.
        self._settled = nested

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True


class BreakerCore:
    """The state a breaker's call paths share; CircuitBreaker.__init__ sets it."""

    config: BreakerConfig
    _policy: BreakerPolicy
    _lock: threading.Lock
    _clock: Clock
    _events: Dispatcher[BreakerEvent]
    _stack: contextvars.ContextVar[tuple[Permit | None, ...]]
    _include: tuple[type[BaseException], ...]
    _exclude: tuple[type[BaseException], ...]
    _fail_on_result: Callable[[Any], bool] | None
    _quick_rejections: itertools.count[int]
    _quick_reads: int

    @property
    def name(self) -> str:
        return self.config.name

    def _with_policy(self, action: Callable[[BreakerPolicy, float], T]) -> T:
        """Run ``action(policy, now)`` under the lock, then deliver the events it made."""
        now = self._clock.monotonic()
        with self._lock:
            result = action(self._policy, now)
            self._flush()
        self._events.drain()
        return result

    def _quick(self) -> int:
        """Lock-free rejections since reset(). Call with the lock held: a read advances
        the count, so reads are subtracted."""
        count = next(self._quick_rejections) - self._quick_reads
        self._quick_reads += 1
        return count

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
            return policy.forced_retry_after(now) if until == _INF else until - now
        with self._lock:
            result = policy.admit(now)
            self._flush()
        if result.__class__ is float:
            return result
        return cast(Admission, result), (now if policy.timed else None)

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

    def _drain(self) -> None:
        self._events.drain()

    async def _adrain(self) -> None:
        if self._events.has_async:
            await self._events.adrain()
        else:
            self._events.drain()

    def _classify(self, error: BaseException, in_async: bool) -> Outcome:
        if isinstance(error, cancelled_types()):
            # A caller going away is no verdict on the dependency; a deadline is.
            return Outcome.FAILURE if in_async and deadline_expired(error) else Outcome.IGNORED
        if self._exclude and isinstance(error, self._exclude):
            return Outcome.IGNORED
        if isinstance(error, self._include):
            return Outcome.FAILURE
        return Outcome.IGNORED

    def _result_outcome(self, result: object) -> Outcome:
        predicate = self._fail_on_result
        return Outcome.FAILURE if predicate is not None and predicate(result) else Outcome.SUCCESS

    # `with b:` keeps its permit in a context variable: the breaker is shared, so the
    # permit of one thread or task must never sit on the object.
    def _pop_permit(self) -> Permit | None:
        stack = self._stack.get()
        self._stack.set(stack[:-1])
        return stack[-1]
