"""Policies composed into one: ``pipeline(fallback, retry, breaker, timeout, bulkhead)``.

The first policy is the outermost: it sees what every later one does. Members are
anything with ``call(fn, *args)`` and ``acall(fn, *args)`` (every policy here, and
:class:`~resilience.CircuitBreaker`), or a plain decorator such as a limiter's
``limiter.limit(key=...)``, applied around the inner part. Decorating builds the chain
once; each call then only runs it, with its data in locals.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from resilience.breaker.breaker import CircuitBreaker
from resilience.events import Observable, Telemetry
from resilience.policies._base import Policy, check_name, is_async

__all__ = ["Pipeline", "pipeline"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _runs_calls(member: object) -> bool:
    return callable(getattr(member, "call", None)) and callable(getattr(member, "acall", None))


class Pipeline(Policy):
    """Policies run outermost first (see the module docstring)."""

    def __init__(self, *policies: Any, name: str = "pipeline") -> None:
        if not policies:
            raise ValueError("policies: a pipeline needs at least one policy, got none")
        for position, member in enumerate(policies, 1):
            if isinstance(member, type):
                raise TypeError(
                    f"policies: member {position} is the class {member.__name__}, not a "
                    f"policy; pass an instance, e.g. {member.__name__}(...)"
                )
            if not (_runs_calls(member) or callable(member)):
                raise TypeError(
                    f"policies: member {position} must be a policy (Retry, Timeout, "
                    "Bulkhead, Fallback, CircuitBreaker, a Pipeline) or a decorator, "
                    f"got {member!r}"
                )
        self.policies = tuple(policies)
        self.name = check_name(name)

    def _chain(self, fn: Any, run_async: bool) -> Any:
        """``fn`` wrapped by every member, innermost first."""
        inner = fn
        for member in reversed(self.policies):
            if isinstance(member, CircuitBreaker):
                # Its own decorator: the lock-free path, where .call takes the full one.
                inner = member(inner)
            elif _runs_calls(member):
                inner = functools.partial(member.acall if run_async else member.call, inner)
            else:
                inner = member(_plain(inner, run_async))
                if not callable(inner):
                    raise TypeError(
                        f"pipeline member {member!r} is not a decorator: it returned "
                        f"{inner!r} for a function"
                    )
        return inner

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._chain(fn, False)(*args, **kwargs)  # type: ignore[no-any-return]

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._chain(fn, True)(*args, **kwargs)  # type: ignore[no-any-return]

    @overload
    def __call__(self, fn: classmethod[T, P, R]) -> classmethod[T, P, R]: ...
    @overload
    def __call__(self, fn: staticmethod[P, R]) -> staticmethod[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Any) -> Any:
        """Decorate a sync or async function or method; the chain is built once."""
        if isinstance(fn, (classmethod, staticmethod)) or not callable(fn):
            return super().__call__(fn)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            return super().__call__(fn)
        run_async = is_async(fn)
        chain = self._chain(fn, run_async)
        if run_async:

            @functools.wraps(fn)
            async def run_async_chain(*args: Any, **kwargs: Any) -> Any:
                return await chain(*args, **kwargs)

            return run_async_chain

        @functools.wraps(fn)
        def run_chain(*args: Any, **kwargs: Any) -> Any:
            return chain(*args, **kwargs)

        return run_chain

    def telemetry(self) -> Telemetry:
        links = tuple(m for m in self.policies if isinstance(m, Observable))
        return Telemetry("pipeline", self.name, dict, links=links)

    def __repr__(self) -> str:
        return f"pipeline({', '.join(map(repr, self.policies))})"


def _plain(inner: Any, run_async: bool) -> Any:
    """``inner`` as a function a decorator can inspect (its name; sync or async): a
    limiter's decorator, say, tells an async function by ``iscoroutinefunction``."""
    if run_async:
        if inspect.iscoroutinefunction(inner):
            return inner

        async def step_async(*args: Any, **kwargs: Any) -> Any:
            return await inner(*args, **kwargs)

        return step_async
    if not isinstance(inner, functools.partial):
        return inner

    def step(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **kwargs)

    return step


def pipeline(*policies: Any, name: str = "pipeline") -> Pipeline:
    """Compose policies, the first outermost: ``pipeline(fallback, retry, breaker,
    timeout, bulkhead)``. The result decorates, and runs calls, like each policy does."""
    return Pipeline(*policies, name=name)
