"""Stores for the limits servers publish: in process memory (the default) or in Redis.

See :mod:`resilience.integrations.httpx._holds_base` for the record kept per host key
and how responses update it.
"""

from __future__ import annotations

from resilience.integrations.httpx._async_holds import AsyncRedisHoldsOps
from resilience.integrations.httpx._holds_base import HOLD_SLACK, MemoryHolds, Ticket
from resilience.integrations.httpx._sync_holds import SyncRedisHoldsOps

__all__ = ["HOLD_SLACK", "Holds", "MemoryHolds", "RedisHolds", "Ticket"]


class RedisHolds(SyncRedisHoldsOps, AsyncRedisHoldsOps):
    """The records shared by every process and host that uses the same Redis and
    ``prefix``, so a whole fleet stops when a server says so.

    ``client`` is a ``redis.Redis`` (for ``ResilientTransport``) or a
    ``redis.asyncio.Redis`` (for ``AsyncResilientTransport``). Each request costs one
    script call (``take``); a response costs another only when it changes the record.
    Keys are ``{prefix}:{<host key>}:w|h|p`` (one hash slot per host, so Redis Cluster
    works) and expire with their window, hold or policy. Every Redis call has
    ``timeout`` seconds; while Redis is unavailable ``on_error`` decides: ``"local"``
    (default) keeps records in this process, ``"fail_open"`` lets requests go,
    ``"fail_closed"`` holds them until the guard's breaker tries Redis again.
    """


Holds = MemoryHolds | RedisHolds
