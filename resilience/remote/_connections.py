"""What the sync and async commands share: the budgeted client and dropping dead sockets."""

from __future__ import annotations

import functools
from typing import Any, Final

import anyio
import redis.exceptions

from resilience.remote._clients import budgeted

__all__ = ["CommandsBase"]


class CommandsBase:
    """A budgeted client (see :func:`budgeted`), and whether it is our own."""

    __slots__ = ("client", "owned")

    def __init__(self, user_client: Any, timeout: float) -> None:
        self.client: Any = budgeted(user_client, timeout)
        #: True when the client is ours (a pool of its own): commands go straight to a
        #: connection of it. False for a RedisCluster, which routes each command itself.
        self.owned = self.client is not user_client


# After an outage the idle connections of the pool are dead too: drop them, so that
# recovery starts on fresh ones. One name for both sides (scripts/unasync.py).


def _drop_idle(pool: Any) -> None:
    pool.disconnect(inuse_connections=False)


async def _adrop_idle(pool: Any) -> None:
    # pool.disconnect() awaits between connections while another task may take one of
    # them: take every idle one out first (no await), then close them.
    for idle in _take_idle(pool):
        await idle.disconnect()


def _take_idle(pool: Any) -> list[Any]:
    """Remove the idle connections from an asyncio pool in one step (no task can interleave).

    The pool counts only connections in use against its limit, so this is safe."""
    idle = getattr(pool, "_available_connections", None)
    if not isinstance(idle, list):
        return []
    taken = list(idle)
    idle.clear()
    return taken


# -- reading a batch's replies -------------------------------------------------------------
# One name for both sides (scripts/unasync.py). An error reply takes its place in the list.

_GROUP: Final = 64  # replies read under one socket timeout, on the async side


def _read_replies(conn: Any, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(conn.read_response(disable_decoding=True))
        except redis.exceptions.ResponseError as error:
            replies.append(error)
    return replies


async def _aread_replies(conn: Any, count: int) -> list[Any]:
    # redis.asyncio's read_response enters a timeout context for every reply: 3.6 ms for
    # 500 XADD replies here. Its parser read directly (the call read_response makes; it
    # still hands push messages to their handlers), one timeout per _GROUP replies: 1.4 ms.
    read = getattr(conn, "_read_response_from_parser", None)
    if read is None:  # another redis-py: its public path
        read = functools.partial(_aread_public, conn)
    replies: list[Any] = []
    try:
        while len(replies) < count:
            with anyio.fail_after(conn.socket_timeout):
                for _ in range(min(_GROUP, count - len(replies))):
                    replies.append(await read(disable_decoding=True))
    # What read_response raises for the same failures (TimeoutError is an OSError).
    except TimeoutError as error:
        raise redis.exceptions.TimeoutError(f"Timeout reading from {_where(conn)}") from error
    except OSError as error:
        raise redis.exceptions.ConnectionError(
            f"Error while reading from {_where(conn)}: {error}"
        ) from error
    return replies


async def _aread_public(conn: Any, disable_decoding: bool) -> Any:
    try:
        return await conn.read_response(disable_decoding=disable_decoding)
    except redis.exceptions.ResponseError as error:
        return error


def _where(conn: Any) -> str:
    return f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
