"""Redis plumbing shared by the limiter and the cache.

- ``budgeted``: a client on a pool of its own, built from the user's client settings,
  with the time budget as socket timeouts and no retries (redis-py 8 retries a dead
  connection 10 times by default). Cluster clients keep their own settings.
- ``Commands``: send a command straight to a pooled connection of that pool. redis-py's
  generic ``execute_command`` path (retry wrapper, hooks) costs about a fifth of a PING
  round trip; our pool has no retries, so it buys nothing. The rules are redis-py's
  own: a connection that failed mid-command is disconnected, an error reply leaves it
  clean, and it always goes back to the pool.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, ResponseError
from redis.retry import Retry

from resilience._checks import positive_seconds

__all__ = ["ASYNC_CLIENTS", "CLUSTERS", "OUTAGE_ERRORS", "SYNC_CLIENTS", "Commands", "budgeted"]

log = logging.getLogger("resilience")

ASYNC_CLIENTS: Final = (redis.asyncio.Redis, redis.asyncio.RedisCluster)
SYNC_CLIENTS: Final = (redis.Redis, redis.RedisCluster)
CLUSTERS: Final = (redis.RedisCluster, redis.asyncio.RedisCluster)
# Cluster routing errors are not RedisErrors; they follow the outage policy too.
OUTAGE_ERRORS: Final = (redis.RedisError, RedisClusterException, OSError)


def check_client(client: object) -> bool:
    """Validate a client argument; True when it is an asyncio client."""
    if not isinstance(client, SYNC_CLIENTS + ASYNC_CLIENTS):
        raise TypeError(
            "client must be a redis.Redis, redis.asyncio.Redis or a RedisCluster, "
            f"got {type(client).__name__}"
        )
    return isinstance(client, ASYNC_CLIENTS)


#: A budget for one Redis command; past this, a socket timeout overflows or means "hang".
MAX_TIMEOUT = 3600.0


def check_timeout(timeout: object) -> float:
    return positive_seconds("timeout", timeout, maximum=MAX_TIMEOUT)


def budgeted(client: Any, timeout: float) -> Any:
    """A client on a pool of its own with ``timeout`` socket timeouts and no retries."""
    if isinstance(client, CLUSTERS):
        log.info("resilience: %s keeps its own timeouts and retries", type(client).__name__)
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


def _take_idle(pool: Any) -> list[Any]:
    """Remove the idle connections from an asyncio pool in one step (no task can interleave).

    The pool counts only connections in use against its limit, so this is safe."""
    idle = getattr(pool, "_available_connections", None)
    if not isinstance(idle, list):
        return []
    taken = list(idle)
    idle.clear()
    return taken


def _drop(pool: Any, conn: Any, error: BaseException) -> None:
    """A connection that failed mid-command is out of step: close it. After an outage its
    idle siblings are dead too: drop them so recovery starts on fresh ones."""
    conn.disconnect()
    if isinstance(error, OUTAGE_ERRORS):
        pool.disconnect(inuse_connections=False)


async def _adrop(pool: Any, conn: Any, error: BaseException) -> None:
    await conn.disconnect()
    if isinstance(error, OUTAGE_ERRORS):
        # pool.disconnect() awaits between connections while another task may take one of
        # them: take every idle one out first (no await), then close them.
        for idle in _take_idle(pool):
            await idle.disconnect()


class Commands:
    """Commands on a budgeted client: straight to its pool unless it is the user's own."""

    __slots__ = ("client", "owned")

    def __init__(self, user_client: Any, timeout: float) -> None:
        self.client = budgeted(user_client, timeout)
        self.owned = self.client is not user_client

    def run(self, *args: Any, packed: list[bytes] | None = None) -> Any:
        if not self.owned:
            return self.client.execute_command(*args)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(packed or conn.pack_command(*args), check_health=False)
            return conn.read_response()
        except ResponseError:
            raise
        except BaseException as error:
            _drop(pool, conn, error)
            raise
        finally:
            pool.release(conn)

    async def arun(self, *args: Any, packed: list[bytes] | None = None) -> Any:
        if not self.owned:
            return await self.client.execute_command(*args)
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(packed or conn.pack_command(*args), check_health=False)
            return await conn.read_response()
        except ResponseError:
            raise
        except BaseException as error:
            await _adrop(pool, conn, error)
            raise
        finally:
            await pool.release(conn)

    def run_many(self, packed: bytes, count: int) -> list[Any]:
        """Send ``count`` pre-packed commands in one write and read their replies; an error
        reply takes its place in the list (the connection stays in step)."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed], check_health=False)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(conn.read_response(disable_decoding=True))
                except ResponseError as error:
                    replies.append(error)
            return replies
        except BaseException as error:
            _drop(pool, conn, error)
            raise
        finally:
            pool.release(conn)

    async def arun_many(self, packed: bytes, count: int) -> list[Any]:
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command([packed], check_health=False)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response(disable_decoding=True))
                except ResponseError as error:
                    replies.append(error)
            return replies
        except BaseException as error:
            await _adrop(pool, conn, error)
            raise
        finally:
            await pool.release(conn)

    def close(self) -> None:
        if self.owned:
            self.client.connection_pool.disconnect()

    async def aclose(self) -> None:
        if self.owned:
            await self.client.connection_pool.disconnect()
