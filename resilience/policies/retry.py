"""Retry: run a failing call again, with backoff, within a deadline and a budget.

- Retries only ``Exception``s that ``on`` accepts (never cancellation), plus
  rejections by a breaker or limiter (CircuitOpenError, RateLimited).
- An error with a ``retry_after`` (those rejections, or your own exception carrying a
  server's Retry-After) is retried only when that wait fits in the time left (the
  retry's ``deadline``, an enclosing Timeout or cancel scope, or, with no deadline
  anywhere, the backoff's ``maximum``), and then not before it; otherwise the retry
  stops at once. So a retry never hammers an open breaker.
- Never sleeps past a deadline: when the next wait would end after it, the retry
  gives up early. Giving up raises the last error, with ``attempts`` set on it and a
  note saying why; a retried result (``on_result``) is returned as it is.
- A :class:`~resilience.RetryBudget` shared by callers caps retries at a fraction of
  first attempts; a spent budget gives up at once.
- Every wait goes through the clock: a ``FakeClock`` runs a whole schedule instantly,
  and :func:`resilience.testing.no_waits` switches waits off.
"""

from __future__ import annotations

from resilience.policies._async_retry import AsyncRetryOps
from resilience.policies._retry_core import REASONS, RetryEvent
from resilience.policies._sync_retry import SyncRetryOps

__all__ = ["REASONS", "Retry", "RetryEvent"]


class Retry(AsyncRetryOps, SyncRetryOps):
    """``attempts`` tries in all (the first included), waiting ``backoff`` between them.

    ``Retry(attempts=4, backoff=Backoff(0.1, 10.0), on=(ConnectionError, TimeoutError),
    on_result=None, deadline=None, budget=None)``; see the module docstring.
    """
