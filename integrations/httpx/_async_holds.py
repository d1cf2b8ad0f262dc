"""The Redis store's calls (``_sync_holds.py`` is generated from ``_async_holds.py``)."""

# unasync: AsyncRedisHoldsOps -> SyncRedisHoldsOps, atake -> take, aobserve -> observe
# unasync: aevalsha -> evalsha, acall -> call, aclose -> close, aclear -> clear
# unasync: arun -> run, _aeval -> _eval, _async_client -> _sync_client

from __future__ import annotations

from typing import Any

from resilience.integrations.httpx._holds_base import OBSERVE, TAKE, RedisHoldsBase, Ticket
from resilience.integrations.httpx.limits import ServerLimits
from resilience.remote import UNAVAILABLE, Script

__all__ = ["AsyncRedisHoldsOps"]


class AsyncRedisHoldsOps(RedisHoldsBase):
    async def _aeval(self, script: Script, key: str, args: list[str]) -> Any:
        return await self._commands.aevalsha(script, self.keys(key), args)

    async def atake(self, key: str) -> float | Ticket | None:
        """Seconds to wait (held), the request's Ticket, or None (Redis unavailable and
        ``on_error="fail_open"``): one script call."""
        if not self._async_client:
            raise self._wrong_client("atake")
        now = self._monotonic()
        reply = await self.guard.acall(self._aeval, TAKE, key, [self._default_ms])
        if reply is UNAVAILABLE:
            return self._fallback(key)
        return self._ticket(reply, now)

    async def aobserve(self, key: str, ticket: Ticket | None, limits: ServerLimits) -> None:
        """Apply what a response said; one script call, only when it changes something."""
        if not self._async_client:
            raise self._wrong_client("aobserve")
        # Holds and policies go to the in-process fallback too, for an outage; a ticket
        # the fallback issued (during one) reports there only.
        local = ticket is not None and ticket.window[:1] == "m"
        self._local.observe(key, ticket if local else None, limits)
        args = self._observe_args(key, None if local else ticket, limits, self._monotonic())
        if args is None:
            return
        await self.guard.acall(self._aeval, OBSERVE, key, args)

    async def aclear(self, key: str) -> bool:
        """Forget what servers said about ``key`` (every process sharing the store).
        False when Redis could not be reached."""
        if not self._async_client:
            raise self._wrong_client("aclear")
        self._local.clear(key)
        done = await self.guard.acall(self._commands.arun, "DEL", *self.keys(key))
        return done is not UNAVAILABLE

    async def aclose(self) -> None:
        """Disconnect the store's own connection pool (the client you passed stays open)."""
        if not self._async_client:
            raise self._wrong_client("aclose")
        await self._commands.aclose()
