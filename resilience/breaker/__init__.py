"""Circuit breakers: a pure state machine (policy) inside thread- and task-safe shells."""

from resilience.breaker.breaker import BreakerEvent, CircuitBreaker, Permit
from resilience.breaker.policy import (
    OPERATOR_TRIGGERS,
    TRANSITIONS,
    BreakerMode,
    BreakerStats,
    CallFinished,
    CallRejected,
    CircuitState,
    FailureRate,
    Outcome,
    SlowCallRate,
    StateChanged,
    Trigger,
)
from resilience.breaker.registry import breakers, get_breaker
from resilience.breaker.store import RedisBreakerStore

__all__ = [
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
    "Outcome",
    "Permit",
    "RedisBreakerStore",
    "SlowCallRate",
    "StateChanged",
    "Trigger",
    "breakers",
    "get_breaker",
]
