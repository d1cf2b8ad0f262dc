"""The circuit breaker's pure state machine.

Everything that changes a breaker's state lives in this file: the transition table and
the one class that applies it. Nothing here reads a clock, takes a lock or does I/O:
every method takes ``now`` (monotonic seconds) and the shells in
:mod:`resilience.breaker.breaker` call it under their lock. Events are appended to
``self.events`` in transition order; the shell hands them to listeners after it
releases the lock. Configuration, windows and event records live in their own modules
and are re-exported here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from typing import Final

from resilience.breaker.config import BreakerConfig, FailureRate, SlowCallRate
from resilience.breaker.events import (
    BreakerMode,
    BreakerStats,
    CallFinished,
    CallRejected,
    CircuitState,
    Event,
    FleetVerdict,
    Outcome,
    StateChanged,
    Trigger,
)
from resilience.breaker.windows import make_window

__all__ = [
    "FLEET_TRANSITIONS",
    "OPERATOR_TRIGGERS",
    "TRANSITIONS",
    "BreakerConfig",
    "BreakerMode",
    "BreakerPolicy",
    "BreakerStats",
    "CallFinished",
    "CallRejected",
    "CircuitState",
    "FailureRate",
    "FleetVerdict",
    "Outcome",
    "SlowCallRate",
    "StateChanged",
    "Trigger",
]

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
    **{(s, Trigger.HALF_OPEN): _H for s in CircuitState},
}

#: The triggers an operator pulls (a method call), applicable from every state.
OPERATOR_TRIGGERS: Final = frozenset(
    {Trigger.FORCE_OPEN, Trigger.FORCE_CLOSED, Trigger.DISABLE, Trigger.RESET, Trigger.HALF_OPEN}
)

#: The fleet's verdicts (see ``BreakerPolicy.fleet_verdict``): what a decision shared
#: through Redis does to this instance. A verdict that finds no entry changes nothing
#: (a fleet that opens finds this instance open already). Kept beside TRANSITIONS, whose
#: diagram is the one in the design notes.
FLEET_TRANSITIONS: Final[dict[tuple[CircuitState, Trigger], CircuitState]] = {
    (_C, Trigger.FLEET_OPEN): _O,
    (_H, Trigger.FLEET_OPEN): _O,
    (_O, Trigger.FLEET_PROBE): _H,
    (_O, Trigger.FLEET_CLOSE): _C,
    (_H, Trigger.FLEET_CLOSE): _C,
}
_TABLE: Final = {**TRANSITIONS, **FLEET_TRANSITIONS}

_MODE_AFTER: Final[dict[Trigger, BreakerMode]] = {
    Trigger.FORCE_OPEN: BreakerMode.FORCED_OPEN,
    Trigger.FORCE_CLOSED: BreakerMode.FORCED_CLOSED,
    Trigger.DISABLE: BreakerMode.DISABLED,
    Trigger.RESET: BreakerMode.NORMAL,
    Trigger.HALF_OPEN: BreakerMode.NORMAL,
    # A timed force-open ends like a recovery period: half-open, under the state machine.
    Trigger.RECOVERY_ELAPSED: BreakerMode.NORMAL,
}


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
        # Monotonic totals for telemetry: reset() clears the figures above, never these.
        self.rejections_total = 0
        self.outcomes_total = dict.fromkeys(Outcome, 0)
        self.transitions_total: dict[tuple[CircuitState, CircuitState], int] = {}
        #: Set by the shell while watched: counts successes of the lock-free path.
        self.count_ok: Callable[[], object] | None = None
        self.failures = 0  # consecutive failed calls (probes included)
        self.counted = 0  # failures ever counted: a serial for Admission and error marks
        # Each counted exception carries this attribute with the serial that counted it.
        self._mark = f"_resilience_counted_{next(_uids)}"
        self.half_open_successes = 0
        self.probes: dict[int, float] = {}  # token -> lease deadline
        self._next_probe = 1
        self.events: list[Event] = []
        #: Set by the fleet's verdicts: while the fleet is open, an open breaker whose
        #: time is up waits for the probe lease instead of going half-open by itself,
        #: and tells callers to ask again in ``fleet_wait`` seconds.
        self.fleet_hold = False
        self.fleet_wait = 0.0
        self._failure_window = (
            make_window(config.failure_rate) if config.failure_rate is not None else None
        )
        self._slow_window = (
            make_window(config.slow_call_rate) if config.slow_call_rate is not None else None
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
        # observed rejections emit events in order under the lock. Open (normal or
        # forced) rejects lock-free until open_until: the end of the recovery time, or of
        # a timed force (inf when untimed). The first call after it takes the lock and
        # moves the breaker to half-open.
        if self.state is _O and not self.observed:
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

    def _transition(self, trigger: Trigger, now: float, forced_for: float | None = None) -> None:
        old = self.state
        new = _TABLE[(old, trigger)]
        self.mode = _MODE_AFTER.get(trigger, self.mode)
        self.state = new
        self.gen += 1
        self.probes.clear()
        self.half_open_successes = 0
        if new is _O:
            if trigger is Trigger.FORCE_OPEN:
                # Untimed: until an operator says otherwise. Timed: then half-open.
                self.open_until = math.inf if forced_for is None else now + forced_for
            elif trigger is Trigger.FLEET_OPEN:
                self.trips += 1
                self.total_trips += 1
                self.open_until = now + (forced_for or 0.0)  # the fleet's time left
            else:
                self.trips += 1
                self.total_trips += 1
                self.open_until = now + self.config.recovery_for(self.trips)
        elif new is _C:
            self.failures = 0
            self.trips = 0
            self._clear_windows()
        self.events.append(StateChanged(self.config.name, old, new, trigger, self.mode, now))
        pair = (old, new)
        self.transitions_total[pair] = self.transitions_total.get(pair, 0) + 1
        self._refresh()

    def _clear_windows(self) -> None:
        if self._failure_window is not None:
            self._failure_window = make_window(self.config.failure_rate)  # type: ignore[arg-type]
        if self._slow_window is not None:
            self._slow_window = make_window(self.config.slow_call_rate)  # type: ignore[arg-type]

    def force_open(self, now: float, duration: float | None = None) -> None:
        """Reject every call: until another operator action, or for ``duration`` seconds
        (checked by the shell), after which the breaker is half-open and probes."""
        self._transition(Trigger.FORCE_OPEN, now, duration)

    def half_open(self, now: float) -> None:
        """Half-open now, under the state machine: the next calls are probes."""
        self._transition(Trigger.HALF_OPEN, now)

    def force_closed(self, now: float) -> None:
        self._transition(Trigger.FORCE_CLOSED, now)

    def disable(self, now: float) -> None:
        self._transition(Trigger.DISABLE, now)

    def reset(self, now: float) -> None:
        self._transition(Trigger.RESET, now)
        self.rejected = 0
        self.total_trips = 0

    def _catch_up(self, now: float) -> None:
        """Move an open breaker to half-open once its recovery time (or the duration of
        a timed force-open) has passed. Open means normal or forced open, and an
        untimed force never ends: its ``open_until`` is infinite."""
        if (
            self.state is _O
            and now >= self.open_until
            and not (self.fleet_hold and self.mode is BreakerMode.NORMAL)
        ):
            self._transition(Trigger.RECOVERY_ELAPSED, now)

    def fleet_verdict(self, verdict: FleetVerdict, now: float, retry_after: float = 0.0) -> None:
        """Apply what the fleet decided (FLEET_TRANSITIONS). ``retry_after``: for OPEN and
        HOLD, the seconds left of the fleet's open period. Forced and disabled modes keep
        their state: an operator outranks the fleet."""
        self.fleet_hold = verdict is not FleetVerdict.CLOSE and verdict is not FleetVerdict.LOCAL
        state = self.state
        if self.mode is BreakerMode.NORMAL and verdict is not FleetVerdict.LOCAL:
            if verdict is FleetVerdict.OPEN and state is not _O:
                self._transition(Trigger.FLEET_OPEN, now, retry_after)
            elif verdict is FleetVerdict.OPEN or (verdict is FleetVerdict.HOLD and state is _O):
                self.open_until = now + retry_after  # the fleet's period, not ours
            elif verdict is FleetVerdict.PROBE and state is _O:
                self._transition(Trigger.FLEET_PROBE, now)
            elif verdict is FleetVerdict.CLOSE and state is not _C:
                self._transition(Trigger.FLEET_CLOSE, now)
        self._refresh()

    # -- admission -----------------------------------------------------------------------

    def admit(self, now: float) -> Admission | float:
        """Admit a call (returns its admission) or reject it (returns retry_after seconds)."""
        mode = self.mode
        if mode is BreakerMode.FORCED_OPEN:
            if now < self.open_until:
                return self._reject(self.forced_retry_after(now), now)
        elif mode is not BreakerMode.NORMAL:
            return (self.gen, 0, self.counted)
        self._catch_up(now)
        state = self.state
        if state is _C:
            return (self.gen, 0, self.counted)
        if state is _O:
            left = self.open_until - now
            # Past its time only while the fleet holds it: the lease goes out at a flush.
            return self._reject(left if left > 0 else self.fleet_wait, now)
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

    def forced_retry_after(self, now: float) -> float:
        """What a forced-open breaker tells callers to wait. Timed: the time left of the
        force. Untimed: it never reopens by itself, so there is no real time to give;
        one recovery period is when to ask again."""
        until = self.open_until
        if until == math.inf:
            return self.config.recovery_timeout
        return max(0.0, until - now)

    def _reject(self, retry_after: float, now: float) -> float:
        self.rejected += 1
        self.rejections_total += 1
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
        self.outcomes_total[outcome] += 1
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

    def current_mode(self, now: float) -> BreakerMode:
        self._catch_up(now)  # a timed force-open that ended is normal again
        return self.mode

    def retry_after(self, now: float) -> float:
        self._catch_up(now)
        if self.state is _O:
            if self.mode is BreakerMode.FORCED_OPEN:
                return self.forced_retry_after(now)
            left = self.open_until - now
            return left if left > 0 else self.fleet_wait
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
