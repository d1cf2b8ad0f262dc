"""The guard's calls (``_sync_guard.py`` is generated from ``_async_guard.py``)."""

# unasync: AsyncGuard -> SyncGuard, acall -> call, _anoting -> _noting
# unasync: collections.abc.Awaitable[T] -> T

from __future__ import annotations

# Qualified names: the twin keeps the import in use once Awaitable[T] becomes T.
import collections.abc
from typing import Any, Literal, TypeVar

from resilience.remote._guard_base import UNAVAILABLE, GuardBase, Unavailable

__all__ = ["AsyncGuard"]

T = TypeVar("T")


class AsyncGuard(GuardBase):
    # The error is noted inside the breaker's call, before a trip it causes is reported.
    async def _anoting(
        self, fn: collections.abc.Callable[..., collections.abc.Awaitable[T]], *args: Any
    ) -> T:
        try:
            return await fn(*args)
        except self._errors as error:
            self._last_error = error
            self.errors += 1
            raise

    async def acall(
        self, fn: collections.abc.Callable[..., collections.abc.Awaitable[T]], *args: Any
    ) -> T | Literal[Unavailable.UNAVAILABLE]:
        """``fn(*args)`` through the breaker; UNAVAILABLE when the backend cannot answer."""
        try:
            return await self.breaker.acall(self._anoting, fn, *args)
        except self._unavailable:
            self.fallbacks += 1
            return UNAVAILABLE
