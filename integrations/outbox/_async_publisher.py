"""The relay's batch, loop and operations, written once: ``_sync_publisher.py`` is
generated from this file. Where the two sides really differ, ``_relay.py`` gives each its
own name for the same idea: the scope around a write-back (async code shields it from
cancellation; sync code has nothing to shield from), and what waits between polls
(LISTEN/NOTIFY wake-ups or a sleep for ``run()``, the stop event for ``run_blocking()``)."""

# unasync: AsyncPublisherOps -> SyncPublisherOps, arun_once -> run_once, astats -> stats
# unasync: areplay -> replay, _aemit -> _emit, _asettle -> _settle, _arelay -> _relay
# unasync: atry_acquire -> try_acquire, aignore -> ignore, afailure -> failure
# unasync: asuccess -> success, aclaim -> claim, arelease -> release, afail -> fail
# unasync: amark_published -> mark_published, apublish -> publish, aacquire -> acquire
# unasync: adrain -> drain, shielded -> unshielded, Waker -> Sleeper, _adeliver -> _deliver

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TypeVar

from resilience.breaker import CircuitState, Permit
from resilience.integrations.outbox._model import OutboxStats
from resilience.integrations.outbox._relay import (
    BatchResult,
    Delivered,
    Plan,
    PublisherBase,
    ReplayResult,
    Waker,
    log,
    shielded,
)
from resilience.limiter import TokenBucket

__all__ = ["AsyncPublisherOps"]

Ev = TypeVar("Ev")


class AsyncPublisherOps(PublisherBase):
    # -- one batch -----------------------------------------------------------------------

    async def arun_once(self) -> BatchResult:
        """Claim and publish one batch (one event while the breaker is half-open)."""
        permit = await self.breaker.atry_acquire()
        if permit is None:
            return await self._aemit(self._rejected())
        limit, probe = self._limit()
        token = self._token()
        try:
            events = await self.store.aclaim(token, limit, self.lease)
        except BaseException:
            with shielded():
                await permit.aignore()  # the store failed, not the broker
            raise
        if not events:
            await permit.aignore()
            return await self._aemit(BatchResult(self.name, probe=probe))
        try:
            try:
                results: Sequence[BaseException | None] = await self.broker.apublish(events)
            except Exception as error:
                results = [error] * len(events)
            plan = self._plan(events, results)
        except BaseException:
            # Cancelled or interrupted mid-publish: give the rows back now, not after the lease.
            with shielded():
                await permit.aignore()
                await self.store.arelease(token, [e.id for e in events])
            raise
        with shielded():
            await self._asettle(permit, plan)
            written = await self.store.amark_published(token, plan.published)
            written += await self.store.arelease(token, plan.released, self._outage_delay(plan))
            written += await self.store.arelease(token, plan.held)
            written += await self.store.afail(token, plan.failures)
        if plan.delays:
            await self._adeliver(plan.delays)
        return await self._aemit(self._result(events, plan, probe, written))

    async def _asettle(self, permit: Permit, plan: Plan) -> None:
        if plan.outage is not None:
            await permit.afailure(plan.outage)
        elif plan.published or plan.failures:
            await permit.asuccess()
        else:
            await permit.aignore()

    # -- the loop ------------------------------------------------------------------------

    async def _arelay(self, waiter: Waker) -> None:
        """Publish batch after batch until ``waiter`` says stop (or the task is cancelled)."""
        idle = self.min_poll
        next_stats = self._clock.monotonic()
        stats_failing = False  # a failing store warns once, not once per interval
        while not waiter.stopped():
            if self._wants_stats and self.stats_interval and self._clock.monotonic() >= next_stats:
                next_stats = self._clock.monotonic() + self.stats_interval
                try:
                    await self.astats()
                    stats_failing = False
                except Exception as error:  # figures are best effort; the relay goes on
                    log.log(
                        logging.DEBUG if stats_failing else logging.WARNING,
                        "outbox %s: stats failed: %s",
                        self.name,
                        error,
                        extra={
                            "resilience_event": "outbox.stats_failed",
                            "resilience_name": self.name,
                            "resilience_error_type": type(error).__name__,
                        },
                    )
                    stats_failing = True
            result = await self.arun_once()
            pause, idle = self._pause(result, idle)
            if pause > 0:
                await waiter.wait(pause)

    # -- operations ----------------------------------------------------------------------

    async def astats(self) -> OutboxStats:
        """The store's figures plus the breaker state; also sent to listeners."""
        stats = await self.store.astats()
        stats = dataclasses.replace(stats, breaker_state=self.breaker.state.value)
        return await self._aemit(stats)

    async def areplay(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        error: str | None = None,
        limiter: TokenBucket | None = None,
        chunk: int = 100,
    ) -> ReplayResult:
        """Move matching dead rows back to pending, ``chunk`` at a time.

        Each chunk waits for ``limiter`` tokens (one per row), and the replay stops while
        the breaker is open, so a mass replay cannot re-trip a broker that just came back.
        """
        size = self._replay_chunk(limiter, chunk)
        total = 0
        while True:
            if self.breaker.state is CircuitState.OPEN:
                return ReplayResult(total, "breaker open")
            if limiter is not None:
                await limiter.aacquire(f"outbox-replay:{self.name}", cost=size)
            moved = await self.store.areplay(ids=ids, topic=topic, key=key, error=error, limit=size)
            total += moved
            if moved < size:
                return ReplayResult(total)

    # -- events --------------------------------------------------------------------------

    async def _adeliver(self, delays: tuple[tuple[str, float], ...]) -> None:
        self._deliveries.queue.append(Delivered(self.name, delays))
        await self._deliveries.adrain()

    async def _aemit(self, event: Ev) -> Ev:
        self._tally(event)
        if self._events:
            self._events.queue.append(event)
            await self._events.adrain()
        return event
