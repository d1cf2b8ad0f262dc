"""Resilient outbound HTTP for httpx (extra: ``resilience[httpx]``).

``ResilientTransport`` (``httpx.Client``) and ``AsyncResilientTransport``
(``httpx.AsyncClient``) wrap an inner transport with per-host circuit breakers made
from a template, retries of idempotent requests that honour ``Retry-After``, the limits
the server publishes (RateLimit, X-RateLimit-*, Retry-After: kept in memory or shared
through Redis with :class:`RedisHolds`), an optional client-side limiter, and an
optional private HTTP cache (``cache=`` a TwoTierCache; RFC 9111's private rules).
"""

try:
    import httpx as _httpx  # noqa: F401 - the extra's check
except ImportError as error:  # pragma: no cover - exercised by scripts/check_install.py
    raise ImportError(
        "resilience.integrations.httpx needs httpx: pip install 'resilience[httpx]'"
    ) from error

from resilience.integrations.httpx._cache import CACHE_EXTENSION
from resilience.integrations.httpx._core import (
    FAILURE_STATUS,
    IDEMPOTENT_METHODS,
    RETRY_STATUS,
    RETRYABLE_ERRORS,
    RetryableResponse,
    host_key,
)
from resilience.integrations.httpx.holds import MemoryHolds, RedisHolds, Ticket
from resilience.integrations.httpx.limits import ServerLimits, read_limits
from resilience.integrations.httpx.transport import AsyncResilientTransport, ResilientTransport

__all__ = [
    "CACHE_EXTENSION",
    "FAILURE_STATUS",
    "IDEMPOTENT_METHODS",
    "RETRYABLE_ERRORS",
    "RETRY_STATUS",
    "AsyncResilientTransport",
    "MemoryHolds",
    "RedisHolds",
    "ResilientTransport",
    "RetryableResponse",
    "ServerLimits",
    "Ticket",
    "host_key",
    "read_limits",
]
