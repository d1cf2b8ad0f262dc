"""The Redis tier: values in an envelope, invalidation and load notices over pub/sub.

A stored value is ``envelope + serializer payload``. The envelope holds a magic byte, a
version, the time (writer's wall clock) until which the value is fresh and how long it
took to load. Redis's own TTL (``ttl`` plus any stale window) is the hard expiry, so
clock skew between hosts can only move the soft, early-refresh decisions. Bytes
without the envelope, or that the serializer rejects, are a miss: counted, never
raised, never executed.

Every write is one script call (``write.lua``, package data) that sets or deletes the
key and publishes it, with the writer's origin so the writer ignores its own notice: on
``{prefix}:invalidate`` on one server; on a Redis Cluster with SPUBLISH on the shard
channel of ``{prefix}:notices`` in the key's own hash slot (Redis >= 7). A background
thread per cache subscribes with connections of its own (on a cluster, one per primary,
to the shard channels of the slots it serves) and evicts those keys from the local
tier. When a connection drops, or a slot moves, the local tier is flushed, and again
once the subscription is back, since notices may have been missed in between. The same
thread relays the load notices (``unlock.lua``: ``{prefix}:loaded``, or the shard
channel of the lock's slot) that wake waiters of the cross-process single-flight lock.
"""

from __future__ import annotations

from resilience.cache._async_redis import AsyncRedisCache
from resilience.cache._redis_base import _Corrupt as _Corrupt  # the cache catches it
from resilience.cache._sync_redis import SyncRedisCache

__all__ = ["RedisCache"]


class RedisCache(SyncRedisCache, AsyncRedisCache):
    """The Redis tier of a :class:`TwoTierCache`.

    ``client`` is a ``redis.Redis`` (sync methods) or ``redis.asyncio.Redis`` (async
    methods), or a RedisCluster of either kind (Redis >= 7: invalidation uses sharded
    pub/sub). Each operation has ``timeout`` seconds; a breaker (by default 3 failures
    open it for 1 s) stops calling a Redis that is down, and the cache then falls
    through to the local tier and the loader. Values are written with ``serializer``
    (JSON by default; pickle only with an HMAC key).
    """
