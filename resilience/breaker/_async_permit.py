"""A permit's reports, async; the sync twin is generated from this file."""

# unasync: AsyncPermitOps -> SyncPermitOps, aerror -> error, asuccess -> success
# unasync: afailure -> failure, aignore -> ignore, _aon_error -> _on_error
# unasync: _afinish -> _finish

from __future__ import annotations

from resilience.breaker._core import PermitCore
from resilience.breaker.events import Outcome

__all__ = ["AsyncPermitOps"]


class AsyncPermitOps(PermitCore):
    __slots__ = ()

    async def aerror(self, error: BaseException) -> None:
        """Report an exception from the work, classified as the decorator would classify it
        (``include`` / ``exclude``, cancellation, deadlines)."""
        if self._settle():
            await self._breaker._aon_error(self._admission, self._start, error)

    async def asuccess(self) -> None:
        if self._settle():
            await self._breaker._afinish(self._admission, self._start, Outcome.SUCCESS, None)

    async def afailure(self, error: BaseException | None = None) -> None:
        if self._settle():
            await self._breaker._afinish(self._admission, self._start, Outcome.FAILURE, error)

    async def aignore(self) -> None:
        if self._settle():
            await self._breaker._afinish(self._admission, self._start, Outcome.IGNORED, None)
