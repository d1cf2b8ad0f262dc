"""What a breaker reports: its states and modes, how calls end, and the event records.

Plain values only: listeners, metrics and the shared store read these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "BreakerMode",
    "BreakerStats",
    "CallFinished",
    "CallRejected",
    "CircuitState",
    "FleetVerdict",
    "Outcome",
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
    FORCED_OPEN = "forced_open"  # rejects everything until reset(), or for its duration
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
    HALF_OPEN = "half_open"  # half_open(): an operator starts probing now
    # The fleet's verdicts (resilience.breaker.fleet), applied by the same table.
    FLEET_OPEN = "fleet_open"  # a quorum tripped, or a probe elsewhere failed
    FLEET_PROBE = "fleet_probe"  # this instance holds the fleet's probe lease
    FLEET_CLOSE = "fleet_close"  # the fleet's probe succeeded


class FleetVerdict(enum.Enum):
    """What the fleet (resilience.breaker.fleet) tells one instance's state machine."""

    OPEN = "open"  # open for the fleet's time left: a quorum tripped, or its probe failed
    HOLD = "hold"  # the fleet is open: an open breaker waits for the probe lease
    PROBE = "probe"  # this instance holds the probe lease: half-open
    CLOSE = "close"  # the fleet's probe succeeded: closed
    LOCAL = "local"  # the fleet is out of reach: decide alone


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
