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
    RedisBreakerStore,
    SlowCallRate,
    StateChanged,
)
from resilience.cache import (
    CacheEvent,
    CachePolicy,
    JsonSerializer,
    LocalCache,
    MsgpackSerializer,
    PickleSerializer,
    RedisCache,
    SerializationError,
    TwoTierCache,
)
from resilience.errors import CircuitOpenError, RateLimited, ResilienceError
from resilience.limiter import (
    Decision,
    Limit,
    LimiterDecision,
    LimitGroup,
    MemoryBackend,
    RedisBackend,
    TokenBucket,
)
from resilience.remote import BackendStateChanged, OnError

__version__ = "0.1.0"

__all__ = [
    "BackendStateChanged",
    "BreakerEvent",
    "BreakerMode",
    "BreakerStats",
    "CacheEvent",
    "CachePolicy",
    "CallFinished",
    "CallRejected",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Decision",
    "FailureRate",
    "JsonSerializer",
    "Limit",
    "LimitGroup",
    "LimiterDecision",
    "LocalCache",
    "MemoryBackend",
    "MsgpackSerializer",
    "OnError",
    "Outcome",
    "Permit",
    "PickleSerializer",
    "RateLimited",
    "RedisBackend",
    "RedisBreakerStore",
    "RedisCache",
    "ResilienceError",
    "SerializationError",
    "SlowCallRate",
    "StateChanged",
    "TokenBucket",
    "TwoTierCache",
]
