"""What Retry's sync and async loops share: configuration, and every decision that does
no I/O (whether to retry, how long to wait, when to give up)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio

from resilience import _clock
from resilience._checks import positive_seconds
from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.errors import CircuitOpenError, RateLimited
from resilience.events import Dispatcher, Listener, Tally, Telemetry
from resilience.policies import deadline as _deadline
from resilience.policies._base import Matcher, Policy, check_name, matcher
from resilience.policies.backoff import Backoff
from resilience.policies.budget import RetryBudget

__all__ = ["REASONS", "RetryCore", "RetryEvent", "waits"]

#: Why a retry policy stopped retrying and let the error (or result) through.
REASONS: Final = ("attempts", "deadline", "budget", "rejected")

#: ``[True]`` normally; resilience.testing turns waits off for tests.
waits: list[bool] = [True]

_REJECTIONS: Final = (CircuitOpenError, RateLimited)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A retry about to happen: ``attempt`` failed, the next starts after ``delay``."""

    policy: str
    attempt: int
    delay: float
    error: BaseException | None


def _retry_after(error: BaseException | None) -> float | None:
    """When the error says to come back (a breaker, a limiter, a server's Retry-After)."""
    value = getattr(error, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value) if value > 0 else 0.0


class RetryCore(Policy):
    """Retry a failing call (see :class:`resilience.Retry`)."""

    def __init__(
        self,
        attempts: int = 3,
        backoff: Backoff | None = None,
        *,
        on: object = Exception,
        on_result: Callable[[Any], object] | None = None,
        deadline: float | None = None,
        budget: RetryBudget | None = None,
        name: str = "retry",
        clock: Clock | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(
                f"attempts must be an int >= 1 (the first try included), got {attempts!r}"
            )
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a resilience.Backoff, got {type(backoff).__name__}")
        if on_result is not None and not callable(on_result):
            raise TypeError(
                f"on_result must be None or a predicate on the result, got {on_result!r}"
            )
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a resilience.RetryBudget, got {type(budget).__name__}")
        self.attempts = attempts
        self.backoff = backoff if backoff is not None else Backoff()
        self.on: Matcher = matcher("on", on)
        self.on_result = on_result
        self.deadline = None if deadline is None else positive_seconds("deadline", deadline)
        self.budget = budget
        self.name = check_name(name)
        clock = resolve(clock)
        self._clock = clock
        self._monotonic: Callable[[], float] = (
            _clock.monotonic if clock is SYSTEM_CLOCK else clock.monotonic
        )
        self._sleep: Callable[[float], None] = getattr(clock, "sleep", SYSTEM_CLOCK.sleep)
        self._asleep: Callable[[float], Awaitable[None]] = getattr(clock, "asleep", anyio.sleep)
        # The common call needs none of the loop's machinery (see acall).
        self._plain = self.deadline is None and budget is None and on_result is None
        self._events: Dispatcher[RetryEvent] = Dispatcher()
        self._calls = Tally()
        self._retries = Tally()
        self._gave_up = {reason: Tally() for reason in REASONS}

    # -- decisions (no I/O) ----------------------------------------------------------------

    def _retryable(self, error: BaseException) -> bool:
        # A rejection by a breaker or limiter says when to come back: always a candidate.
        return isinstance(error, _REJECTIONS) or self.on(error)

    def _outer(self) -> float | None:
        """Seconds left of the enclosing deadline (Timeout, an outer retry), if any."""
        return _deadline.remaining()

    def _aouter(self) -> float | None:
        """As _outer, and an enclosing anyio/trio cancel-scope deadline too."""
        left = _deadline.remaining()
        try:
            ends = anyio.current_effective_deadline()
            if ends == math.inf:  # no cancel scope with a deadline encloses us
                return left
            scope = ends - anyio.current_time()
        except Exception:  # not under an anyio-supported loop
            return left
        return scope if left is None or scope < left else left

    def _plan(
        self,
        attempt: int,
        error: BaseException | None,
        previous: float,
        ends: float | None,
        outer: float | None,
    ) -> tuple[float, str | None]:
        """(delay before the next attempt, None) or (0.0, why we stop).

        ``ends``: this policy's own deadline (monotonic), ``outer``: seconds left of the
        enclosing one."""
        if attempt >= self.attempts:
            return 0.0, "attempts"
        delay = self.backoff.delay(attempt, previous)
        left = outer
        if ends is not None:
            own = ends - self._monotonic()
            left = own if left is None or own < left else left
        wait = _retry_after(error)
        if wait is not None:
            # Come back when told to, if that fits in the time left (or, with no
            # deadline anywhere, within the longest wait the backoff would make).
            fits = wait <= self.backoff.maximum if left is None else wait < left
            if not fits:
                return 0.0, "rejected"
            # Not before it; and when the backoff would outlive the deadline, the wait
            # we were told fits: take that.
            delay = wait if delay < wait or (left is not None and delay >= left) else delay
        if left is not None and delay >= left:
            return 0.0, "deadline"
        if self.budget is not None and not self.budget.try_withdraw():
            return 0.0, "budget"
        return delay, None

    def _give_up(self, reason: str, attempt: int, error: BaseException | None) -> None:
        self._gave_up[reason].add()
        if error is None:
            return
        with contextlib.suppress(AttributeError, TypeError):  # slots, read-only attributes
            error.attempts = attempt  # type: ignore[attr-defined]
        note = f"resilience: {self.name!r} gave up after {attempt} attempt(s) ({reason})"
        add_note = getattr(error, "add_note", None)
        if add_note is not None:  # Python >= 3.11
            add_note(note)

    def _retrying(self, attempt: int, delay: float, error: BaseException | None) -> bool:
        """Count a retry; whether to wait (resilience.testing can switch waits off)."""
        self._retries.add()
        if self._events:
            self._events.queue.append(RetryEvent(self.name, attempt, delay, error))
            self._events.drain()
        return waits[0] and delay > 0

    # -- observing ---------------------------------------------------------------------------

    def add_listener(self, listener: Listener[RetryEvent]) -> None:
        """Call ``listener(RetryEvent)`` before every retry."""
        self._events.add(listener)

    def remove_listener(self, listener: Listener[RetryEvent]) -> None:
        self._events.remove(listener)

    def telemetry(self) -> Telemetry:
        links = (self.budget,) if self.budget is not None else ()
        return Telemetry("retry", self.name, self._read, links=links)

    def _read(self) -> dict[str, Any]:
        return {
            "calls": self._calls.value(),
            "retries": self._retries.value(),
            "gave_up": {reason: tally.value() for reason, tally in self._gave_up.items()},
        }

    def __repr__(self) -> str:
        return f"Retry(attempts={self.attempts}, backoff={self.backoff!r}, name={self.name!r})"
