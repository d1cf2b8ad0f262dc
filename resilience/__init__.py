"""resilience: circuit breakers, rate limiters, two-tier caches and an outbox relay.

import resilience as rs
breaker = rs.CircuitBreaker("payments", failure_threshold=5, recovery_timeout=30.0)
"""

from resilience.breaker import (
    BreakerEvent,
    BreakerMode,
    BreakerStats,
    CallFinished,
    CallRejected,
    CircuitBreaker,
    CircuitState,
    FailureRate,
    Outcome,
    Permit,
    SlowCallRate,
    StateChanged,
)
from resilience.errors import CircuitOpenError, RateLimited, ResilienceError

__version__ = "0.1.0"

__all__ = [
    "BreakerEvent",
    "BreakerMode",
    "BreakerStats",
    "CallFinished",
    "CallRejected",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "FailureRate",
    "Outcome",
    "Permit",
    "RateLimited",
    "ResilienceError",
    "SlowCallRate",
    "StateChanged",
]
