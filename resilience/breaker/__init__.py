"""Circuit breakers: a pure state machine (policy) inside thread- and task-safe shells."""

from resilience.breaker.breaker import BreakerEvent, CircuitBreaker, Permit
from resilience.breaker.policy import (
    FLEET_TRANSITIONS,
    OPERATOR_TRIGGERS,
    TRANSITIONS,
    BreakerMode,
    BreakerStats,
    CallFinished,
    CallRejected,
    CircuitState,
    FailureRate,
    FleetVerdict,
    Outcome,
    SlowCallRate,
    StateChanged,
    Trigger,
)
from resilience.breaker.registry import breakers, get_breaker
from resilience.breaker.store import RedisBreakerStore

# isort: split
# After the names above: the fleet imports resilience.remote, which imports them.
from resilience.breaker.fleet import RedisFleet

__all__ = [
    "FLEET_TRANSITIONS",
    "OPERATOR_TRIGGERS",
    "TRANSITIONS",
    "BreakerEvent",
    "BreakerMode",
    "BreakerStats",
    "CallFinished",
    "CallRejected",
    "CircuitBreaker",
    "CircuitState",
    "FailureRate",
    "FleetVerdict",
    "Outcome",
    "Permit",
    "RedisBreakerStore",
    "RedisFleet",
    "SlowCallRate",
    "StateChanged",
    "Trigger",
    "breakers",
    "get_breaker",
]
