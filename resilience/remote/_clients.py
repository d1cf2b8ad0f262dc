"""Which Redis clients the remote tier takes, and a client on a time budget of its own."""

from __future__ import annotations

import logging
from typing import Any, Final

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from resilience._checks import positive_seconds

__all__ = [
    "ASYNC_CLIENTS",
    "CLUSTERS",
    "MAX_TIMEOUT",
    "OUTAGE_ERRORS",
    "SYNC_CLIENTS",
    "budgeted",
    "check_client",
    "check_timeout",
]

log = logging.getLogger("resilience")

ASYNC_CLIENTS: Final = (redis.asyncio.Redis, redis.asyncio.RedisCluster)
SYNC_CLIENTS: Final = (redis.Redis, redis.RedisCluster)
CLUSTERS: Final = (redis.RedisCluster, redis.asyncio.RedisCluster)
#: What a backend that is down or out of reach raises. Cluster routing errors are not
#: RedisErrors; they follow the outage policy too.
OUTAGE_ERRORS: Final = (redis.RedisError, RedisClusterException, OSError)

#: A budget for one Redis command; past this, a socket timeout overflows or means "hang".
MAX_TIMEOUT: Final = 3600.0


def check_client(client: object) -> bool:
    """Validate a client argument; True when it is an asyncio client."""
    if not isinstance(client, SYNC_CLIENTS + ASYNC_CLIENTS):
        raise TypeError(
            "client must be a redis.Redis, redis.asyncio.Redis or a RedisCluster, "
            f"got {type(client).__name__}"
        )
    return isinstance(client, ASYNC_CLIENTS)


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds for one command: positive, finite, at most MAX_TIMEOUT."""
    return positive_seconds("timeout", timeout, maximum=MAX_TIMEOUT)


def budgeted(client: Any, timeout: float) -> Any:
    """A client on a pool of its own, built from ``client``'s settings, with ``timeout`` as
    its socket timeouts and no retries (redis-py 8 retries a dead connection 10 times by
    default). A RedisCluster keeps its own settings and is returned as it is."""
    if isinstance(client, CLUSTERS):
        log.info(
            "resilience: %s keeps its own timeouts and retries",
            type(client).__name__,
            extra={"resilience_event": "client.kept", "resilience_backend": type(client).__name__},
        )
        return client
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    is_async = isinstance(client, ASYNC_CLIENTS)
    retry_cls = redis.asyncio.retry.Retry if is_async else Retry
    kwargs["retry"] = retry_cls(NoBackoff(), 0)
    new_pool = type(pool)(connection_class=pool.connection_class, **kwargs)
    cls = redis.asyncio.Redis if is_async else redis.Redis
    return cls(connection_pool=new_pool)
