"""The Redis tier's commands (``_sync_redis.py`` is generated from ``_async_redis.py``)."""

# unasync: AsyncRedisCache -> SyncRedisCache, aget -> get, awrite -> write, alock -> lock
# unasync: aunlock -> unlock, aclose -> close, arun -> run, aevalsha -> evalsha
# unasync: _async_client -> _sync_client

from __future__ import annotations

from resilience.cache._redis_base import UNLOCK, WRITE, RedisCacheBase

__all__ = ["AsyncRedisCache"]


class AsyncRedisCache(RedisCacheBase):
    async def aget(self, key: str) -> bytes | None:
        blob: bytes | None = await self._commands.arun("GET", self.key(key))
        return blob

    async def awrite(self, key: str, blob: bytes, px: int) -> None:
        """SET (or DEL, with an empty blob) and publish the invalidation."""
        keys, args = self._write_args(key, blob, px)
        await self._commands.aevalsha(WRITE, keys, args)

    async def alock(self, key: str, token: str, px: int) -> bool:
        return bool(await self._commands.arun("SET", self.lock_key(key), token, "NX", "PX", px))

    async def aunlock(self, key: str, token: str) -> None:
        """Release the lock if still ours, and announce the value loaded."""
        keys, args = self._unlock_args(key, token)
        await self._commands.aevalsha(UNLOCK, keys, args)

    async def aclose(self) -> None:
        """Stop listening and disconnect this tier's own connections."""
        self._stop_listening()
        if self._async_client:
            await self._commands.aclose()
