"""Fallback: answer a failed call with a value, or with a function of its error."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from resilience._checks import sync_result
from resilience.events import Tally, Telemetry
from resilience.policies._base import Policy, check_name, is_async, matcher

__all__ = ["Fallback"]

P = ParamSpec("P")
R = TypeVar("R")


class Fallback(Policy):
    """When the call raises one of ``on`` (classes or a predicate), return ``handler``:
    called with the exception when it is callable (sync, or async for async calls),
    else returned as it is. Every other error propagates. To fall back to a callable
    object itself, wrap it: ``Fallback(lambda error: the_callable)``.
    """

    def __init__(self, handler: Any, *, on: object = Exception, name: str = "fallback") -> None:
        self.handler = handler
        self.on = matcher("on", on)
        self.name = check_name(name)
        self._call = callable(handler)
        self._async = self._call and is_async(handler)
        self._calls = Tally()
        self._fallbacks = Tally()

    def _answer(self, error: Exception) -> Any:
        self._fallbacks.add()
        return self.handler(error) if self._call else self.handler

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._async:
            raise TypeError(
                f"fallback {self.name!r} has an async handler; a sync call cannot await it"
            )
        self._calls.add()
        try:
            result = fn(*args, **kwargs)
        except Exception as error:
            if not self.on(error):
                raise
            return self._answer(error)  # type: ignore[no-any-return]
        return sync_result(result, "Fallback.call")  # outside the try: no fallback for it

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        self._calls.add()
        try:
            return await fn(*args, **kwargs)
        except Exception as error:
            if not self.on(error):
                raise
            answer = self._answer(error)
        if inspect.isawaitable(answer):
            return await answer  # type: ignore[no-any-return]
        return answer  # type: ignore[no-any-return]

    def telemetry(self) -> Telemetry:
        return Telemetry("fallback", self.name, self._read)

    def _read(self) -> dict[str, int]:
        return {"calls": self._calls.value(), "fallbacks": self._fallbacks.value()}

    def __repr__(self) -> str:
        return f"Fallback({self.handler!r}, name={self.name!r})"
