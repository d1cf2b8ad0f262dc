"""What the sync and async commands share: the budgeted client and dropping dead sockets."""

from __future__ import annotations

from typing import Any

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
