"""ConcurrencyLimit: a bulkhead whose limit moves with the measured round-trip time.

A fixed bulkhead must be tuned by hand and is wrong as soon as the dependency slows
down. This one finds its limit from what it measures, as Netflix's concurrency-limits
does: every call's round-trip time (RTT), the number in flight when it was admitted,
and whether it was dropped (a timeout, or an error ``drop_on`` matches) are summed for
``window`` seconds; then the algorithm (``"gradient2"``, ``"vegas"`` or ``"aimd"``, see
:mod:`resilience.policies.limits_math`) turns the window into a new limit. Queueing in
the dependency shows as a longer RTT, so the limit falls before the dependency drowns,
and rises again while the RTT stays low.

Everything else is a :class:`~resilience.Bulkhead`'s (the same machinery): one count
for threads and tasks together, a FIFO queue of at most ``max_queue`` callers waiting up
to ``max_wait`` seconds, then :class:`LimitExceeded` (a :class:`~resilience.BulkheadFull`).
A lower limit lets the calls in flight finish and admits no more until the count is
below it; a higher one hands the room to waiters at once. ``partitions`` give named
callers a guaranteed share of the limit (concurrency-limits' partitioned limiter).
"""

from __future__ import annotations

from resilience.policies._async_limit import AsyncLimitOps
from resilience.policies._limit_core import DEFAULT_DROP_ON, LimitExceeded, LimitPermit
from resilience.policies._sync_limit import SyncLimitOps

__all__ = ["DEFAULT_DROP_ON", "ConcurrencyLimit", "LimitExceeded", "LimitPermit"]


class ConcurrencyLimit(AsyncLimitOps, SyncLimitOps):
    """An adaptive concurrency limit; see the module docstring.

    ``ConcurrencyLimit(algorithm="gradient2", *, initial=20, min=1, max=1000,
    max_wait=0.0, max_queue=None, window=1.0, min_samples=10,
    drop_on=(TimeoutError, ConnectionError), partitions=None, name=..., clock=None)``.
    ``algorithm`` may also be an object from :mod:`resilience.policies.limits_math`
    (``Vegas(initial=50, smoothing=0.5)``), which then brings its own bounds.
    ``window=None`` updates the limit on every sample. The clock times the calls.
    """
