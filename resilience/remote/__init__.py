"""The one Redis layer: every part of resilience that talks to Redis goes through it.

The limiter's and the cache's Redis tiers, the breaker store and the Redis Streams broker
use these names, and nothing below them:

- :func:`check_client` (True for an asyncio client), :func:`check_timeout`, and
  :func:`budgeted`: a client on a pool of its own with the time budget as socket timeouts
  and no retries. ``OUTAGE_ERRORS`` is what a backend that is down raises; ``CLUSTERS``
  the RedisCluster classes.
- :class:`Commands`: ``run``/``arun`` one command straight to a pooled connection,
  ``run_many``/``arun_many`` a pre-packed batch in one write, ``evalsha``/``aevalsha`` a
  :class:`Script` (a ``.lua`` package file, loaded again on NOSCRIPT).
- :class:`RemoteGuard`: the circuit breaker around a backend; a call returns
  ``UNAVAILABLE`` instead of raising while it is down, and the caller applies its
  :class:`OnError` policy. Each outage and recovery is one :class:`BackendStateChanged`.
- :class:`Subscriber`: pub/sub on connections of its own, sharded on a Redis Cluster
  (:func:`shard_channel` names the channel in a key's hash slot).
"""

from resilience.remote._clients import (
    CLUSTERS,
    OUTAGE_ERRORS,
    budgeted,
    check_client,
    check_timeout,
)
from resilience.remote._commands import Commands
from resilience.remote._guard import RemoteGuard
from resilience.remote._guard_base import UNAVAILABLE, BackendStateChanged, OnError
from resilience.remote._pubsub import Subscriber, shard_channel
from resilience.remote._script import Script

__all__ = [
    "CLUSTERS",
    "OUTAGE_ERRORS",
    "UNAVAILABLE",
    "BackendStateChanged",
    "Commands",
    "OnError",
    "RemoteGuard",
    "Script",
    "Subscriber",
    "budgeted",
    "check_client",
    "check_timeout",
    "shard_channel",
]
