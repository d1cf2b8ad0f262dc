"""A remote backend (Redis) behind a time budget, a circuit breaker and a fallback policy."""

from __future__ import annotations

from resilience.remote._async_guard import AsyncGuard
from resilience.remote._sync_guard import SyncGuard

__all__ = ["RemoteGuard"]


class RemoteGuard(SyncGuard, AsyncGuard):
    """Calls to one remote backend, through a circuit breaker.

    While the remote is healthy, calls go through the breaker's lock-free closed path.
    When a call fails with one of ``errors``, the caller gets ``UNAVAILABLE`` and applies
    its documented policy (``on_error``); once the breaker opens, that answer costs a
    float comparison instead of a socket timeout. Each outage and each recovery is logged
    once and reported to ``listeners`` as a :class:`BackendStateChanged`. ``breaker``
    replaces the default one (3 failures open it for 1 s).
    """
