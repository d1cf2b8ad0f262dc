"""The Redis Streams round trip, written once: ``_sync_streams.py`` is generated from it."""

# unasync: AsyncStreamsOps -> SyncStreamsOps, _asend -> _send, arun_many -> run_many

from __future__ import annotations

from collections.abc import Sequence

from resilience.integrations.outbox._model import OutboxEvent, Results, encode_batch
from resilience.integrations.outbox._streams import StreamsBase

__all__ = ["AsyncStreamsOps"]


class AsyncStreamsOps(StreamsBase):
    async def _asend(self, events: Sequence[OutboxEvent]) -> Results:
        """XADD the batch in one round trip: pre-packed on the broker's own pool, or
        through a pipeline on a cluster's client."""
        ready, results = encode_batch(events, self._encode)
        sent = [index for index, _ in ready]
        if not sent:
            return results
        if self._packed:
            packed = b"".join(cmd for _, cmd in ready)
            replies = await self._commands.arun_many(packed, len(sent))
        else:
            async with self._pipeline(events, sent) as pipe:
                replies = await pipe.execute(raise_on_error=False)
        return self._merge(results, sent, replies)
