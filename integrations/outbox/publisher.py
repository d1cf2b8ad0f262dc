"""The relay: claim a batch, publish it through the breaker, write the outcome back.

One batch is one breaker call. The breaker is asked first, so while it is open nothing is
claimed and the broker is not contacted; half-open, the batch is a single event (the
probe). How each event's outcome is written back:

=========  ===============================  ==================  ================
outcome    row                              attempts            breaker
=========  ===============================  ==================  ================
published  published                        unchanged           success
outage     released until the retry time    unchanged           failure
held back  released, ready at once          unchanged           (no outcome)
poison     backs off, dead at max_attempts  +1, error kept      success
unknown    backs off, dead at max_attempts  +1, error kept      success
=========  ===============================  ==================  ================
"""

from __future__ import annotations

import threading

from resilience.integrations.outbox._async_publisher import AsyncPublisherOps
from resilience.integrations.outbox._relay import (
    BatchResult,
    Delivered,
    ReplayResult,
    Sleeper,
    Waker,
    shielded,
)
from resilience.integrations.outbox._sync_publisher import SyncPublisherOps

__all__ = ["BatchResult", "Delivered", "OutboxPublisher", "ReplayResult"]


class OutboxPublisher(SyncPublisherOps, AsyncPublisherOps):
    """Relays outbox rows to a broker, guarded by a circuit breaker.

    ``batch_size`` rows per claim, leased for ``lease`` seconds (keep it well above the
    broker's timeout). A poison or unknown failure backs off by ``backoff`` and goes dead
    on the ``max_attempts``-th failure. ``run()`` polls every ``min_poll`` seconds while
    there is work and backs off to ``max_poll`` when idle; with listeners, it reads
    :meth:`stats` every ``stats_interval`` seconds for them.
    """

    async def run(self) -> None:
        """Publish until cancelled. On cancellation the batch in hand is given back."""
        waker = Waker.for_store(self.store, self._clock)
        try:
            await self._arelay(waker)
        finally:
            with shielded():
                await waker.aclose()

    def run_blocking(self, stop: threading.Event | None = None) -> None:
        """Publish from this thread until ``stop`` (or :meth:`stop`) is set."""
        self._relay(Sleeper(stop or self._stop, self._clock))

    def stop(self) -> None:
        """Ask :meth:`run_blocking` to return after the batch in hand."""
        self._stop.set()
