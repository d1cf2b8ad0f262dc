"""The breaker's async call paths; the sync twin is generated from this file.

Every path but the decorator's lock-free one marks "inside" in a context variable, so a
call nested in a call of the same breaker passes through (see CircuitBreaker).
"""

# unasync: AsyncBreakerOps -> SyncBreakerOps, _abegin -> _begin, _aenter -> _enter
# unasync: _afinish -> _finish, _aon_error -> _on_error, _aon_result -> _on_result
# unasync: aon_error -> on_error, aon_result -> on_result, _acall -> _call, acall -> call
# unasync: atry_acquire -> try_acquire, _adrain -> _drain, _wrap_async -> _wrap_sync
# unasync: breaker_async -> breaker_sync, _IN_ASYNC -> _IN_SYNC, Awaitable[R] -> R
# unasync: asuccess -> success, async_result -> sync_result

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from resilience._checks import async_result
from resilience._exact import wrapper
from resilience.breaker._core import _IN_ASYNC, _INSIDE, BreakerCore
from resilience.breaker.events import Outcome
from resilience.breaker.permit import Permit
from resilience.breaker.policy import Admission
from resilience.errors import CircuitOpenError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncBreakerOps"]

# The decorator's wrapper, compiled with the function's own parameters where it can be
# (see resilience._exact). Lock-free while closed and quiet: no lock, no clock, no
# context variable; anything else takes the full path.
_WRAPPER = """
async def _rs_wrapper(<PARAMS>):
    _rs_admission = _rs_policy.quiet_free
    if _rs_admission is None:
        return await _rs_full(_rs_fn, <ARGS>, <KWARGS>)
    try:
        _rs_result = await _rs_fn(<CALL>)
    except BaseException as _rs_error:
        await _rs_on_error(_rs_admission, None, _rs_error)
        raise
    if not _rs_policy.quiet:
        await _rs_on_result(_rs_admission, None, _rs_result)
    else:
        _rs_count = _rs_policy.count_ok  # watched: one C-level increment
        if _rs_count is not None:
            _rs_count()
    return _rs_result
"""

P = ParamSpec("P")
R = TypeVar("R")


class AsyncBreakerOps(BreakerCore):
    async def _abegin(self) -> tuple[Admission, float | None]:
        admission = self._policy.free
        if admission is not None:
            return admission, None
        return await self._aenter()

    async def _aenter(self) -> tuple[Admission, float | None]:
        result = self._admit()
        if self._events.queue:
            await self._adrain()
        if result.__class__ is float:
            # The state, read without the lock, only words the message.
            raise CircuitOpenError(self.name, result, self._policy.state._value_)
        return cast("tuple[Admission, float | None]", result)

    async def _afinish(
        self,
        admission: Admission,
        start: float | None,
        outcome: Outcome,
        error: BaseException | None,
    ) -> None:
        self._record(admission, start, outcome, error)
        if self._events.queue:
            await self._adrain()

    async def _aon_error(
        self, admission: Admission, start: float | None, error: BaseException
    ) -> None:
        await self._afinish(admission, start, self._classify(error, _IN_ASYNC), error)

    async def _aon_result(self, admission: Admission, start: float | None, result: object) -> None:
        await self._afinish(admission, start, self._result_outcome(result), None)

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` through the breaker."""
        return async_result(await self._acall(fn, args, kwargs), "CircuitBreaker.acall")

    # The full path of every call shape: nested calls pass through, the rest mark the
    # context while they run.
    async def _acall(self, fn: Callable[..., Awaitable[R]], args: Any, kwargs: Any) -> R:
        stack = self._stack
        if stack.get():
            return await fn(*args, **kwargs)  # inside a call of this breaker: that call counts
        # _begin inlined: a rejection raised here unwinds one frame fewer.
        admission = self._policy.free
        start = None
        if admission is None:
            admission, start = await self._aenter()
        token = stack.set(_INSIDE)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as error:
            stack.reset(token)
            await self._aon_error(admission, start, error)
            raise
        stack.reset(token)
        if not self._policy.quiet:
            await self._aon_result(admission, start, result)
        elif self._policy.count_ok is not None:
            self._policy.count_ok()
        return result

    async def atry_acquire(self) -> Permit | None:
        """Admit one call without raising: a Permit to report on, or None if rejected.

        Inside a call of this breaker the permit reports nothing: the outer call does.
        """
        if self._stack.get():
            return Permit(self, (0, 0, 0), None, nested=True)
        result = self._admit()
        if self._events.queue:
            await self._adrain()
        if result.__class__ is float:
            return None
        admission, start = cast("tuple[Admission, float | None]", result)
        return Permit(self, admission, start)

    # `with b:` keeps its permit in a context variable: the breaker is shared, so the
    # permit of one thread or task must never sit on the object.
    async def __aenter__(self) -> Self:
        stack = self._stack.get()
        if stack:  # nested in a call of this breaker: pass through
            self._stack.set((*stack, None))
            return self
        admission, start = await self._abegin()
        self._stack.set((Permit(self, admission, start),))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._pop_permit()
        if permit is None:
            return
        if exc is None:
            if not self._policy.quiet:
                await permit.asuccess()
            elif self._policy.count_ok is not None:
                self._policy.count_ok()
        else:
            await self._aon_error(permit._admission, permit._start, exc)

    def _wrap_async(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        env = {
            "_rs_policy": self._policy,
            "_rs_full": self._acall,
            "_rs_fn": fn,
            "_rs_on_error": self._aon_error,
            "_rs_on_result": self._aon_result,
        }
        return cast("Callable[P, Awaitable[R]]", functools.wraps(fn)(wrapper(fn, _WRAPPER, env)))
