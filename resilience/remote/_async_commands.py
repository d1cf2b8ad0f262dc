"""The command layer's methods (``_sync_commands.py`` is generated from ``_async_commands.py``).

On our own pool a command goes straight to a pooled connection: redis-py's generic
``execute_command`` path (retry wrapper, hooks) costs about a fifth of a PING round trip,
and our pool has no retries, so it buys nothing. The rules are redis-py's own: a
connection that failed mid-command is disconnected, an error reply leaves it clean, and
it always goes back to the pool. A client that is not ours (a RedisCluster) routes and
retries each command itself.
"""

# unasync: AsyncCommands -> SyncCommands, arun -> run, arun_many -> run_many
# unasync: aevalsha -> evalsha, aclose -> close, _adrop -> _drop, _adrop_idle -> _drop_idle
# unasync: _aread_replies -> _read_replies

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from resilience.remote._clients import OUTAGE_ERRORS
from resilience.remote._connections import CommandsBase, _adrop_idle, _aread_replies
from resilience.remote._script import Script

__all__ = ["AsyncCommands"]


async def _adrop(pool: Any, conn: Any, error: BaseException) -> None:
    """A connection that failed mid-command is out of step: close it (and, after an
    outage, its idle siblings)."""
    await conn.disconnect()
    if isinstance(error, OUTAGE_ERRORS):
        await _adrop_idle(pool)


class AsyncCommands(CommandsBase):
    __slots__ = ()

    async def arun(self, *args: Any, packed: list[bytes] | None = None) -> Any:
        """One command and its reply; ``packed``: the command already packed as RESP."""
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

    async def arun_many(self, packed: bytes, count: int) -> list[Any]:
        """Send ``count`` pre-packed commands in one write and read their replies; an error
        reply takes its place in the list (the connection stays in step). Our pool only."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command([packed], check_health=False)
            return await _aread_replies(conn, count)
        except BaseException as error:
            await _adrop(pool, conn, error)
            raise
        finally:
            await pool.release(conn)

    async def aevalsha(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        packed: list[bytes] | None = None,
    ) -> Any:
        """EVALSHA ``script``; on NOSCRIPT, load it and run it once more.

        ``packed``: the whole command, packed by the caller (a hot path's saving); it is
        sent on our own pool, while a client that is not ours routes by ``keys``."""
        if packed is not None and self.owned:
            command: tuple[Any, ...] = ()
        else:
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.arun(*command, packed=packed)
        except NoScriptError:
            await self.client.script_load(script.text)
            return await self.arun(*command, packed=packed)

    async def aclose(self) -> None:
        """Disconnect our own pool (a client that is not ours stays open)."""
        if self.owned:
            await self.client.connection_pool.disconnect()
