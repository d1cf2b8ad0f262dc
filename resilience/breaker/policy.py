"""The circuit breaker's pure state machine.

Everything that changes a breaker's state lives in this file. Nothing here reads a
clock, takes a lock or does I/O: every method takes ``now`` (monotonic seconds) and
the shells in :mod:`resilience.breaker.breaker` call it under their lock. Events are
appended to ``self.events`` in transition order; the shell hands them to listeners
after it releases the lock.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import math
from dataclasses import dataclass
from typing import Final

__all__ = [
    "TRANSITIONS",
    "BreakerConfig",
    "BreakerMode",
    "BreakerPolicy",
    "BreakerStats",
    "CallFinished",
    "CallRejected",
    "CircuitState",
    "FailureRate",
    "Outcome",
    "SlowCallRate",
    "StateChanged",
    "Trigger",
]


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerMode(enum.Enum):
    """How an operator has set the breaker. ``NORMAL`` follows the state machine."""

    NORMAL = "normal"
    FORCED_OPEN = "forced_open"  # rejects everything until reset()
    FORCED_CLOSED = "forced_closed"  # admits everything, counts nothing
    DISABLED = "disabled"  # admits everything, still counts (metrics only)


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class Trigger(enum.Enum):
    TRIP = "trip"
    RECOVERY_ELAPSED = "recovery_elapsed"
    PROBE_FAILED = "probe_failed"
    PROBES_SUCCEEDED = "probes_succeeded"
    FORCE_OPEN = "force_open"
    FORCE_CLOSED = "force_closed"
    DISABLE = "disable"
    RESET = "reset"


_C, _O, _H = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

#: Every state change a breaker can make: (state, trigger) -> new state.
#: The operator triggers apply from every state. docs/design.md is drawn from this table.
TRANSITIONS: Final[dict[tuple[CircuitState, Trigger], CircuitState]] = {
    (_C, Trigger.TRIP): _O,
    (_O, Trigger.RECOVERY_ELAPSED): _H,
    (_H, Trigger.PROBE_FAILED): _O,
    (_H, Trigger.PROBES_SUCCEEDED): _C,
    **{(s, Trigger.FORCE_OPEN): _O for s in CircuitState},
    **{(s, Trigger.FORCE_CLOSED): _C for s in CircuitState},
    **{(s, Trigger.DISABLE): _C for s in CircuitState},
    **{(s, Trigger.RESET): _C for s in CircuitState},
}

_MODE_AFTER: Final[dict[Trigger, BreakerMode]] = {
    Trigger.FORCE_OPEN: BreakerMode.FORCED_OPEN,
    Trigger.FORCE_CLOSED: BreakerMode.FORCED_CLOSED,
    Trigger.DISABLE: BreakerMode.DISABLED,
    Trigger.RESET: BreakerMode.NORMAL,
}


# -- configuration --------------------------------------------------------------------


def _check_window(
    owner: str, window: int, minimum_calls: int, window_seconds: float | None
) -> None:
    if isinstance(minimum_calls, bool) or not isinstance(minimum_calls, int):
        raise TypeError(f"{owner}: minimum_calls must be an int, got {minimum_calls!r}")
    if minimum_calls < 1:
        raise ValueError(f"{owner}: minimum_calls must be >= 1, got {minimum_calls}")
    if window_seconds is None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{owner}: window must be an int number of calls, got {window!r}")
        if window < minimum_calls:
            raise ValueError(
                f"{owner}: window ({window} calls) must be >= minimum_calls ({minimum_calls})"
            )
    elif not _positive(window_seconds):
        raise ValueError(
            f"{owner}: window_seconds must be a positive number, got {window_seconds!r}"
        )


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_rate(owner: str, threshold: float) -> None:
    if not _positive(threshold) or threshold > 1:
        raise ValueError(f"{owner}: threshold must be in (0, 1], got {threshold!r}")


@dataclass(frozen=True, slots=True)
class FailureRate:
    """Trip when the share of failed calls in a sliding window reaches ``threshold``.

    The window holds the last ``window`` calls, or, when ``window_seconds`` is given,
    the calls of the last ``window_seconds`` seconds. It is judged only once it holds
    ``minimum_calls`` calls.
    """

    threshold: float
    window: int = 100
    minimum_calls: int = 20
    window_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_rate("FailureRate", self.threshold)
        _check_window("FailureRate", self.window, self.minimum_calls, self.window_seconds)


@dataclass(frozen=True, slots=True)
class SlowCallRate:
    """Trip when the share of calls slower than ``duration`` seconds reaches ``threshold``.

    In half-open, a slow probe counts as a failed probe.
    """

    threshold: float
    duration: float
    window: int = 100
    minimum_calls: int = 20
    window_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_rate("SlowCallRate", self.threshold)
        if not _positive(self.duration):
            raise ValueError(
                f"SlowCallRate: duration must be a positive number, got {self.duration!r}"
            )
        _check_window("SlowCallRate", self.window, self.minimum_calls, self.window_seconds)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    name: str
    failure_threshold: int | None = 5
    recovery_timeout: float = 30.0
    success_threshold: int = 2
    half_open_max_calls: int = 1
    failure_rate: FailureRate | None = None
    slow_call_rate: SlowCallRate | None = None
    recovery_backoff: float = 1.0
    max_recovery_timeout: float | None = None
    probe_lease: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for field in ("success_threshold", "half_open_max_calls"):
            _check_count(field, getattr(self, field))
        if self.failure_threshold is not None:
            _check_count("failure_threshold", self.failure_threshold)
        if (
            self.failure_threshold is None
            and self.failure_rate is None
            and self.slow_call_rate is None
        ):
            raise ValueError(
                "failure_threshold=None needs failure_rate or slow_call_rate, "
                "or the breaker could never open"
            )
        for field in ("recovery_timeout",):
            if not _positive(getattr(self, field)):
                raise ValueError(
                    f"{field} must be a positive number of seconds, got {getattr(self, field)!r}"
                )
        if not _positive(self.recovery_backoff) or self.recovery_backoff < 1:
            raise ValueError(
                f"recovery_backoff must be a number >= 1, got {self.recovery_backoff!r}"
            )
        if self.max_recovery_timeout is not None and (
            not _positive(self.max_recovery_timeout)
            or self.max_recovery_timeout < self.recovery_timeout
        ):
            raise ValueError(
                "max_recovery_timeout must be a number >= recovery_timeout, got "
                f"{self.max_recovery_timeout!r}"
            )
        if self.probe_lease is not None and not _positive(self.probe_lease):
            raise ValueError(
                f"probe_lease must be a positive number of seconds, got {self.probe_lease!r}"
            )
        if self.failure_rate is not None and not isinstance(self.failure_rate, FailureRate):
            raise TypeError(
                f"failure_rate must be a FailureRate, got {type(self.failure_rate).__name__}"
            )
        # Ints are valid input; store floats so every retry_after the policy returns is one.
        for field in (
            "recovery_timeout",
            "recovery_backoff",
            "max_recovery_timeout",
            "probe_lease",
        ):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, float(value))
        if self.slow_call_rate is not None and not isinstance(self.slow_call_rate, SlowCallRate):
            raise TypeError(
                f"slow_call_rate must be a SlowCallRate, got {type(self.slow_call_rate).__name__}"
            )

    @property
    def lease(self) -> float:
        return self.probe_lease if self.probe_lease is not None else self.recovery_timeout

    def recovery_for(self, trips: int) -> float:
        """Open duration after the ``trips``-th consecutive trip (1-based)."""
        if self.recovery_backoff == 1.0:
            return self.recovery_timeout
        # Cap the exponent so a long outage cannot overflow the float.
        t = self.recovery_timeout * self.recovery_backoff ** min(trips - 1, 64)
        cap = self.max_recovery_timeout
        return t if cap is None else min(t, cap)


def _check_count(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{field} must be >= 1, got {value}")


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    breaker: str
    old: CircuitState
    new: CircuitState
    trigger: Trigger
    mode: BreakerMode
    at: float


@dataclass(frozen=True, slots=True)
class CallRejected:
    breaker: str
    state: CircuitState
    retry_after: float
    at: float


@dataclass(frozen=True, slots=True)
class CallFinished:
    breaker: str
    outcome: Outcome
    #: Seconds the call took; None when nothing asked for timing.
    duration: float | None
    #: True when the call started before the last state change, so it did not count.
    stale: bool
    state: CircuitState
    error: BaseException | None


Event = StateChanged | CallRejected | CallFinished


@dataclass(frozen=True, slots=True)
class BreakerStats:
    state: CircuitState
    mode: BreakerMode
    consecutive_failures: int
    window_calls: int
    window_failures: int
    window_slow_calls: int
    half_open_successes: int
    probes_in_flight: int
    trips: int
    rejected: int
    retry_after: float


# -- sliding windows ----------------------------------------------------------------------


class _CountWindow:
    """The last ``size`` calls, as a ring of flags with running totals."""

    __slots__ = ("failures", "filled", "pos", "ring", "slow")

    def __init__(self, size: int) -> None:
        self.ring = bytearray(size)
        self.pos = self.filled = self.failures = self.slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> None:
        ring, pos = self.ring, self.pos
        if self.filled == len(ring):
            old = ring[pos]
            self.failures -= old & 1
            self.slow -= old >> 1
        else:
            self.filled += 1
        ring[pos] = failed | (slow << 1)
        self.failures += failed
        self.slow += slow
        self.pos = (pos + 1) % len(ring)

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.filled, self.failures, self.slow


class _TimeWindow:
    """Calls of the last ``seconds``, in ``_BUCKETS`` buckets that expire as time moves."""

    _BUCKETS = 20
    __slots__ = (
        "calls",
        "epoch",
        "fails",
        "last",
        "slows",
        "t_calls",
        "t_fails",
        "t_slow",
        "width",
    )

    def __init__(self, seconds: float) -> None:
        n = self._BUCKETS
        self.width = seconds / n
        self.epoch = [-1] * n
        self.calls = [0] * n
        self.fails = [0] * n
        self.slows = [0] * n
        self.last = -1
        self.t_calls = self.t_fails = self.t_slow = 0

    def _advance(self, now: float) -> int:
        cur = int(now // self.width)
        n = self._BUCKETS
        if cur > self.last:
            # Clear every bucket whose epoch fell out of the window; at most n of them.
            start = max(self.last + 1, cur - n + 1)
            for e in range(start, cur + 1):
                i = e % n
                self.t_calls -= self.calls[i]
                self.t_fails -= self.fails[i]
                self.t_slow -= self.slows[i]
                self.calls[i] = self.fails[i] = self.slows[i] = 0
                self.epoch[i] = e
            self.last = cur
        return cur

    def record(self, failed: bool, slow: bool, now: float) -> None:
        cur = self._advance(now)
        if cur < self.last - self._BUCKETS + 1:
            return  # older than the window (a clock that went backwards)
        i = cur % self._BUCKETS
        self.calls[i] += 1
        self.fails[i] += failed
        self.slows[i] += slow
        self.t_calls += 1
        self.t_fails += failed
        self.t_slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        self._advance(now)
        return self.t_calls, self.t_fails, self.t_slow


_Window = _CountWindow | _TimeWindow


def _make_window(rule: FailureRate | SlowCallRate) -> _Window:
    if rule.window_seconds is not None:
        return _TimeWindow(rule.window_seconds)
    return _CountWindow(rule.window)


# -- the state machine ------------------------------------------------------------------

#: What ``admit`` returns for an admitted call: (generation, probe token; 0 if not a
#: probe, failures counted so far). The last part lets a call tell whether an exception
#: reaching it was already counted by a call nested inside it (see ``record``).
Admission = tuple[int, int, int]

_uids = itertools.count(1)


class BreakerPolicy:
    """State, counts and decisions of one breaker. Not thread-safe: the shell locks."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = CircuitState.CLOSED
        self.mode = BreakerMode.NORMAL
        self.gen = 0
        self.open_until = 0.0
        self.trips = 0  # consecutive trips without a close, for recovery backoff
        self.total_trips = 0
        self.rejected = 0
        self.failures = 0  # consecutive failed calls (probes included)
        self.counted = 0  # failures ever counted: a serial for Admission and error marks
        # Each counted exception carries this attribute with the serial that counted it.
        self._mark = f"_resilience_counted_{next(_uids)}"
        self.half_open_successes = 0
        self.probes: dict[int, float] = {}  # token -> lease deadline
        self._next_probe = 1
        self.events: list[Event] = []
        self._failure_window = (
            _make_window(config.failure_rate) if config.failure_rate is not None else None
        )
        self._slow_window = (
            _make_window(config.slow_call_rate) if config.slow_call_rate is not None else None
        )
        #: The shell sets these: listeners want events; every success must be recorded.
        self.observed = False
        self.record_successes = False
        #: True when calls must be timed (slow-call rate, time windows, listeners).
        self.timed = config.slow_call_rate is not None or (
            config.failure_rate is not None and config.failure_rate.window_seconds is not None
        )
        # Fast-path flags, read without the lock by the shell (see _refresh).
        self.quiet = True
        self.free: Admission | None = (0, 0, 0)
        self.quiet_free: Admission | None = (0, 0, 0)
        self.reject_until = -math.inf
        self._refresh()

    # The shell reads free, quiet_free, quiet and reject_until without its lock. Each is
    # one reference, so a reader sees either the old or the new value; both are safe
    # linearization points.
    def _refresh(self) -> None:
        mode = self.mode
        admit_freely = (self.state is _C and mode is not BreakerMode.FORCED_OPEN) and not self.timed
        # Rejections before this monotonic time need no decision; unobserved only, since
        # observed rejections emit events in order under the lock.
        if mode is BreakerMode.FORCED_OPEN:
            self.reject_until = math.inf
        elif self.state is _O and mode is BreakerMode.NORMAL and not self.observed:
            self.reject_until = self.open_until
        else:
            self.reject_until = -math.inf
        self.quiet = (
            self.state is _C
            and (
                mode is BreakerMode.FORCED_CLOSED
                or (
                    self.failures == 0
                    and self._failure_window is None
                    and self._slow_window is None
                )
            )
            and not self.record_successes
            and not self.observed
        )
        # The admissions of the lock-free paths, built once per change, not per call.
        self.free = (self.gen, 0, self.counted) if admit_freely else None
        self.quiet_free = self.free if self.quiet else None

    def set_observation(self, observed: bool, timed: bool, record_successes: bool) -> None:
        self.observed = observed
        self.record_successes = record_successes
        cfg = self.config
        self.timed = (
            timed
            or cfg.slow_call_rate is not None
            or (cfg.failure_rate is not None and cfg.failure_rate.window_seconds is not None)
        )
        self._refresh()

    # -- transitions ---------------------------------------------------------------------

    def _transition(self, trigger: Trigger, now: float) -> None:
        old = self.state
        new = TRANSITIONS[(old, trigger)]
        self.mode = _MODE_AFTER.get(trigger, self.mode)
        self.state = new
        self.gen += 1
        self.probes.clear()
        self.half_open_successes = 0
        if new is _O:
            if trigger is Trigger.FORCE_OPEN:
                self.open_until = math.inf
            else:
                self.trips += 1
                self.total_trips += 1
                self.open_until = now + self.config.recovery_for(self.trips)
        elif new is _C:
            self.failures = 0
            self.trips = 0
            self._clear_windows()
        self.events.append(StateChanged(self.config.name, old, new, trigger, self.mode, now))
        self._refresh()

    def _clear_windows(self) -> None:
        if self._failure_window is not None:
            self._failure_window = _make_window(self.config.failure_rate)  # type: ignore[arg-type]
        if self._slow_window is not None:
            self._slow_window = _make_window(self.config.slow_call_rate)  # type: ignore[arg-type]

    def force_open(self, now: float) -> None:
        self._transition(Trigger.FORCE_OPEN, now)

    def force_closed(self, now: float) -> None:
        self._transition(Trigger.FORCE_CLOSED, now)

    def disable(self, now: float) -> None:
        self._transition(Trigger.DISABLE, now)

    def reset(self, now: float) -> None:
        self._transition(Trigger.RESET, now)
        self.rejected = 0
        self.total_trips = 0

    def _catch_up(self, now: float) -> None:
        """Move an open breaker to half-open once its recovery time has passed."""
        if self.state is _O and self.mode is BreakerMode.NORMAL and now >= self.open_until:
            self._transition(Trigger.RECOVERY_ELAPSED, now)

    # -- admission -----------------------------------------------------------------------

    def admit(self, now: float) -> Admission | float:
        """Admit a call (returns its admission) or reject it (returns retry_after seconds)."""
        mode = self.mode
        if mode is BreakerMode.FORCED_OPEN:
            return self._reject(self.config.recovery_timeout, now)
        if mode is not BreakerMode.NORMAL:
            return (self.gen, 0, self.counted)
        self._catch_up(now)
        state = self.state
        if state is _C:
            return (self.gen, 0, self.counted)
        if state is _O:
            return self._reject(self.open_until - now, now)
        probes = self.probes
        if len(probes) >= self.config.half_open_max_calls:
            # A probe whose lease ran out (hung, or its caller vanished) gives its slot back.
            for token in [t for t, deadline in probes.items() if deadline <= now]:
                del probes[token]
            if len(probes) >= self.config.half_open_max_calls:
                return self._reject(0.0, now)
        token = self._next_probe
        self._next_probe = token + 1
        probes[token] = now + self.config.lease
        return (self.gen, token, self.counted)

    def _reject(self, retry_after: float, now: float) -> float:
        self.rejected += 1
        if self.observed:
            self.events.append(CallRejected(self.config.name, self.state, retry_after, now))
        return retry_after

    # -- outcomes ------------------------------------------------------------------------

    def record(
        self,
        admission: Admission,
        outcome: Outcome,
        now: float,
        duration: float | None,
        error: BaseException | None = None,
    ) -> None:
        """Record how an admitted call ended. Calls from an earlier generation are ignored.

        A failure whose exception was already counted by a call nested inside this one
        (same breaker, counted after this call was admitted) is not counted again.
        """
        gen, probe, counted = admission
        if outcome is Outcome.FAILURE and error is not None and self._counted_since(error, counted):
            outcome = Outcome.IGNORED
        stale = gen != self.gen
        if probe and not stale:
            # A probe counts only if it reports before its lease ends.
            deadline = self.probes.pop(probe, None)
            stale = deadline is None or deadline <= now
        if self.observed:
            self.events.append(
                CallFinished(self.config.name, outcome, duration, stale, self.state, error)
            )
        if stale or outcome is Outcome.IGNORED or self.mode is BreakerMode.FORCED_CLOSED:
            return
        slow_rule = self.config.slow_call_rate
        slow = slow_rule is not None and duration is not None and duration >= slow_rule.duration
        failed = outcome is Outcome.FAILURE
        if failed:
            self._count(error)
        if self.state is _H:
            if failed or slow:
                self.failures += failed  # a failed probe is one more failure in a row
                self._transition(Trigger.PROBE_FAILED, now)
            else:
                self.failures = 0
                self.half_open_successes += 1
                if self.half_open_successes >= self.config.success_threshold:
                    self._transition(Trigger.PROBES_SUCCEEDED, now)
            return
        # Closed (normal or disabled).
        if failed:
            self.failures += 1
        elif self.failures:
            self.failures = 0
        if self._failure_window is not None:
            self._failure_window.record(failed, slow, now)
        if self._slow_window is not None:
            self._slow_window.record(failed, slow, now)
        if self.mode is BreakerMode.NORMAL and self._should_trip(now):
            self._transition(Trigger.TRIP, now)
        else:
            self._refresh()

    def _counted_since(self, error: BaseException, serial: int) -> bool:
        try:
            mark = error.__dict__.get(self._mark)
        except AttributeError:  # no __dict__: nothing was marked
            return False
        return mark is not None and mark > serial

    def _count(self, error: BaseException | None) -> None:
        self.counted += 1
        if error is not None:
            # An int keyed by this policy: pickling or copying the error stays cheap.
            # Unmarkable errors (no __dict__) may then count twice when nested.
            with contextlib.suppress(AttributeError, TypeError):
                error.__dict__[self._mark] = self.counted

    def _should_trip(self, now: float) -> bool:
        cfg = self.config
        if cfg.failure_threshold is not None and self.failures >= cfg.failure_threshold:
            return True
        if self._failure_window is not None:
            rule = cfg.failure_rate
            assert rule is not None
            calls, fails, _ = self._failure_window.totals(now)
            if calls >= rule.minimum_calls and fails >= rule.threshold * calls:
                return True
        if self._slow_window is not None:
            srule = cfg.slow_call_rate
            assert srule is not None
            calls, _, slow = self._slow_window.totals(now)
            if calls >= srule.minimum_calls and slow >= srule.threshold * calls:
                return True
        return False

    # -- reading -------------------------------------------------------------------------

    def current_state(self, now: float) -> CircuitState:
        self._catch_up(now)
        return self.state

    def retry_after(self, now: float) -> float:
        self._catch_up(now)
        if self.state is _O:
            if self.mode is BreakerMode.FORCED_OPEN:
                return self.config.recovery_timeout
            return max(0.0, self.open_until - now)
        return 0.0

    def stats(self, now: float) -> BreakerStats:
        retry_after = self.retry_after(now)
        w = self._failure_window or self._slow_window
        calls, fails, slow = w.totals(now) if w is not None else (0, 0, 0)
        if self._slow_window is not None:
            slow = self._slow_window.totals(now)[2]
        return BreakerStats(
            state=self.state,
            mode=self.mode,
            consecutive_failures=self.failures,
            window_calls=calls,
            window_failures=fails,
            window_slow_calls=slow,
            half_open_successes=self.half_open_successes,
            probes_in_flight=len(self.probes),
            trips=self.total_trips,
            rejected=self.rejected,
            retry_after=retry_after,
        )
