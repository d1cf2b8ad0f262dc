"""What every policy shares: the decorator, the name check, and matching errors."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

__all__ = ["Matcher", "Policy", "check_name", "is_async", "matcher"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: A test on an exception: should the policy act on it?
Matcher = Callable[[BaseException], bool]


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return name


def is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - objects with an async __call__
    )


def matcher(field: str, on: object) -> Matcher:
    """``on`` as a test: an exception class, a tuple of them, or a predicate."""
    if isinstance(on, type) and issubclass(on, BaseException):
        classes: tuple[type[BaseException], ...] = (on,)
    elif isinstance(on, tuple) and on:
        for each in on:
            if not (isinstance(each, type) and issubclass(each, BaseException)):
                raise TypeError(f"{field} must hold exception classes, got {each!r}")
        classes = on
    elif callable(on) and not isinstance(on, type):
        predicate: Callable[[BaseException], object] = on

        def test(error: BaseException) -> bool:
            return bool(predicate(error))

        return test
    else:
        raise TypeError(
            f"{field} must be an exception class, a non-empty tuple of them, or a "
            f"predicate on the exception; got {on!r}"
        )

    def isinstance_of(error: BaseException) -> bool:
        return isinstance(error, classes)

    return isinstance_of


class Policy:
    """A policy runs a call: ``call(fn, *args)`` for sync functions, ``await acall(fn,
    *args)`` for async ones; and decorates functions and methods, keeping their
    signature. Subclasses define ``call`` and ``acall``."""

    name: str

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        raise NotImplementedError

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        raise NotImplementedError

    @overload
    def __call__(self, fn: classmethod[T, P, R]) -> classmethod[T, P, R]: ...
    @overload
    def __call__(self, fn: staticmethod[P, R]) -> staticmethod[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Any) -> Any:
        """Decorate a sync or async function or method."""
        if isinstance(fn, classmethod):
            return classmethod(self(fn.__func__))
        if isinstance(fn, staticmethod):
            return staticmethod(self(fn.__func__))
        if not callable(fn):
            raise TypeError(f"{type(self).__name__} decorates callables, got {type(fn).__name__}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"{type(self).__name__} cannot decorate a generator: a retry or a timeout "
                "cannot replay what it already yielded"
            )
        return wrap(self.call, self.acall, fn)


def wrap(call: Callable[..., Any], acall: Callable[..., Any], fn: Any) -> Any:
    """``fn`` run through ``call`` (sync) or ``acall`` (async), its signature kept."""
    if is_async(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            return await acall(fn, *args, **kwargs)

        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return call(fn, *args, **kwargs)

    return run
