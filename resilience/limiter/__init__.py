"""Token-bucket rate limiting: pure bucket math, in-memory and Redis backends, shells."""

from resilience.limiter.bucket import Decision, Limit
from resilience.limiter.limiter import Backend, LimiterDecision, LimitGroup, TokenBucket
from resilience.limiter.memory import MemoryBackend
from resilience.limiter.redis import RedisBackend

__all__ = [
    "Backend",
    "Decision",
    "Limit",
    "LimitGroup",
    "LimiterDecision",
    "MemoryBackend",
    "RedisBackend",
    "TokenBucket",
]
