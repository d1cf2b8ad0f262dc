"""The Redis backend's calls (``_sync_redis.py`` is generated from ``_async_redis.py``)."""

# unasync: AsyncRedisBackend -> SyncRedisBackend, aclose -> close, aevalsha -> evalsha
# unasync: _aeval_one -> _eval_one, _arun -> _run, adecide -> decide, _adecide -> _decide
# unasync: adecide_many -> decide_many, acall -> call, _async_client -> _sync_client
# unasync: atry_acquire -> try_acquire, atry_acquire_many -> try_acquire_many
# unasync: apeek -> peek, areset -> reset, arun -> run

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from resilience.limiter._redis_base import (
    ONE,
    SCRIPT,
    RedisBackendBase,
    RedisTable,
    _pack_one,
    key_head,
)
from resilience.limiter.bucket import Decision
from resilience.remote import UNAVAILABLE

__all__ = ["AsyncRedisBackend"]


class AsyncRedisBackend(RedisBackendBase):
    async def aclose(self) -> None:
        """Disconnect the backend's own connection pool (the client you passed stays open)."""
        if not self._async_client:
            raise self._wrong_client("aclose")
        await self._commands.aclose()

    async def _aeval_one(self, key: str, cost_us: str, fill_us: str) -> Any:
        packed = _pack_one(key, cost_us, fill_us)
        return await self._commands.aevalsha(ONE, (key,), (cost_us, fill_us), packed=packed)

    async def _arun(
        self,
        tables: Sequence[RedisTable],
        items: Sequence[tuple[str, float]],
        take: bool = True,
    ) -> list[Decision]:
        out: list[Decision | None] = [None] * len(items)
        for keys, args, indexes in self._plan(tables, items, take):
            reply = await self._commands.aevalsha(SCRIPT, keys, args)
            self._read(tables, items, (keys, args, indexes), reply, out)
        return out  # type: ignore[return-value]  # every index is filled by its call

    async def adecide(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        if not self._async_client:
            raise self._wrong_client("atry_acquire")
        if len(tables) == 1:
            table = tables[0]
            cost_us = table.unit_arg if cost == 1 else repr(cost * table.per_token_us)
            bucket = key_head(self.prefix, key) + table.suffix
            reply = await self.guard.acall(self._aeval_one, bucket, cost_us, table.fill_arg)
            if reply is UNAVAILABLE:
                return self._fallback(tables, key, cost, now)
            return table.one_decision(reply, cost)
        decisions = await self._adecide(tables, [(key, cost)], now)
        return decisions[0]

    async def adecide_many(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        if not self._async_client:
            raise self._wrong_client("atry_acquire_many")
        return await self._adecide(tables, items, now)

    async def _adecide(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        decisions = await self.guard.acall(self._arun, tables, items)
        if decisions is UNAVAILABLE:
            return [self._fallback(tables, k, c, now) for k, c in items]
        return decisions

    async def apeek(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        """What :meth:`adecide` would answer now, taking nothing and writing no key: one
        call of ``token_bucket.lua`` told to only read, on Redis's clock. While Redis is
        unavailable, what ``on_error`` would answer: the in-process bucket's answer
        (``local``, also taking nothing), allowed (``fail_open``) or denied
        (``fail_closed``)."""
        if not self._async_client:
            raise self._wrong_client("apeek")
        decisions = await self.guard.acall(self._arun, tables, [(key, cost)], False)
        if decisions is UNAVAILABLE:
            return self._peek_fallback(tables, key, cost, now)
        return decisions[0]

    async def areset(self, tables: Sequence[RedisTable], key: str) -> bool:
        """Make the key's buckets full again: DEL their keys (one hash slot, one call), and
        drop the in-process fallback's entries. False when Redis could not be reached, so
        its keys stay until they expire (the fallback's entries are dropped anyway)."""
        if not self._async_client:
            raise self._wrong_client("areset")
        self._local.reset([t.local for t in tables], key)
        done = await self.guard.acall(self._commands.arun, "DEL", *self._keys(tables, key))
        return done is not UNAVAILABLE
