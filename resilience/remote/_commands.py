"""The public class of the command layer: sync and async methods on one object."""

from __future__ import annotations

from resilience.remote._async_commands import AsyncCommands
from resilience.remote._sync_commands import SyncCommands

__all__ = ["Commands"]


class Commands(SyncCommands, AsyncCommands):
    """Commands on a budgeted client: straight to its own pool, unless the client is the
    user's own (a RedisCluster, which routes them).

    ``run``/``arun`` one command, ``run_many``/``arun_many`` a pre-packed batch in one
    write, ``evalsha``/``aevalsha`` a :class:`Script` (loaded again on NOSCRIPT),
    ``close``/``aclose`` the pool. The sync methods need a sync client, the async ones an
    asyncio client; ``client`` is the budgeted client itself.
    """

    __slots__ = ()
