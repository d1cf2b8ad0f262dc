# mypy: disable-error-code="no-untyped-def, no-untyped-call, call-arg"
"""The breaker's decorator takes the function's own parameters (resilience._exact): every
parameter kind and default passes through as a direct call would pass it, on the
lock-free path and on the full one, sync and async."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import resilience as rs
from resilience._exact import exact
from resilience.testing import FakeClock

SHARED: list[int] = []  # a mutable default: the wrapper must pass this very object


def plain(a, b, c=3):
    return ("plain", a, b, c)


def positional_only(a, b=SHARED, /, c=5):
    return ("positional_only", a, b is SHARED, c)


def star(a, *rest, k=1, **extra):
    return ("star", a, rest, k, extra)


def keyword_only(*, x, y=SHARED):
    return ("keyword_only", x, y is SHARED)


def nothing():
    return ("nothing",)


def our_names(_admission, admission, result, error, count, fn, policy, full):
    # Names the wrapper's own code once used: none may be shadowed.
    return ("our_names", _admission, admission, result, error, count, fn, policy, full)


CALLS: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    (plain, (1, 2), {}),
    (plain, (1,), {"b": 2, "c": 9}),
    (plain, (), {"c": 1, "b": 2, "a": 3}),
    (positional_only, (1,), {}),
    (positional_only, (1, [], 7), {}),
    (positional_only, (1,), {"c": 8}),
    (star, (1, 2, 3), {"k": 4, "z": 5}),
    (star, (1,), {}),
    (star, (), {"a": 1, "q": 2}),
    (keyword_only, (), {"x": 1}),
    (keyword_only, (), {"y": 2, "x": 1}),
    (nothing, (), {}),
    (our_names, (1, 2, 3, 4, 5, 6, 7, 8), {}),
    (our_names, (), {n: n for n in inspect.signature(our_names).parameters}),
]


async def aplain(a, b, c=3):
    return plain(a, b, c)


async def apositional_only(a, b=SHARED, /, c=5):
    return positional_only(a, b, c)


async def astar(a, *rest, k=1, **extra):
    return star(a, *rest, k=k, **extra)


async def akeyword_only(*, x, y=SHARED):
    return keyword_only(x=x, y=y)


async def anothing():
    return nothing()


async def aour_names(_admission, admission, result, error, count, fn, policy, full):
    return our_names(_admission, admission, result, error, count, fn, policy, full)


ASYNC: dict[Callable[..., Any], Callable[..., Any]] = {
    plain: aplain,
    positional_only: apositional_only,
    star: astar,
    keyword_only: akeyword_only,
    nothing: anothing,
    our_names: aour_names,
}


def _breaker() -> rs.CircuitBreaker:
    return rs.CircuitBreaker("exact", failure_threshold=5, clock=FakeClock())


def _not_quiet(b: rs.CircuitBreaker) -> None:
    # One failure leaves the breaker closed but no longer quiet: the full path runs.
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)


@pytest.mark.parametrize("full", [False, True], ids=["lock-free", "full path"])
@pytest.mark.parametrize(("fn", "args", "kwargs"), CALLS)
def test_sync_calls_pass_through_as_direct_calls(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], full: bool
) -> None:
    b = _breaker()
    wrapped = b(fn)
    assert wrapped.__code__ is not getattr(fn, "__code__", None)
    assert wrapped.__code__.co_name == fn.__name__
    assert inspect.signature(wrapped) == inspect.signature(fn)
    if full:
        _not_quiet(b)
    assert wrapped(*args, **kwargs) == fn(*args, **kwargs)
    assert b.stats().consecutive_failures == 0


@pytest.mark.parametrize("full", [False, True], ids=["lock-free", "full path"])
@pytest.mark.parametrize(("fn", "args", "kwargs"), CALLS)
def test_async_calls_pass_through_as_direct_calls(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], full: bool
) -> None:
    afn = ASYNC[fn]
    b = _breaker()
    wrapped = b(afn)
    assert inspect.iscoroutinefunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(afn)
    if full:
        _not_quiet(b)

    async def both() -> tuple[Any, Any]:
        return await wrapped(*args, **kwargs), await afn(*args, **kwargs)

    mine, theirs = asyncio.run(both())
    assert mine == theirs == fn(*args, **kwargs)


def test_a_wrong_call_names_the_function_and_is_no_failure() -> None:
    b = _breaker()
    wrapped = b(plain)
    with pytest.raises(TypeError, match=r"plain\(\) missing 1 required positional argument: 'b'"):
        wrapped(1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'd'"):
        wrapped(1, 2, d=4)
    assert b.stats().consecutive_failures == 0  # the caller's mistake, not the dependency's


def test_what_cannot_be_spelled_out_keeps_the_generic_wrapper() -> None:
    def own_names(_rs_x):
        return _rs_x

    def claimed(*args):
        return args

    claimed.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("q", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    )

    class Callable_:
        def __call__(self, x: int) -> int:
            return x

    template = "def _rs_wrapper(<PARAMS>):\n    return _rs_fn(<CALL>)\n"
    assert exact(own_names, template, {"_rs_fn": own_names}) is None
    assert exact(claimed, template, {"_rs_fn": claimed}) is None
    assert exact(Callable_(), template, {}) is None
    b = _breaker()
    assert b(own_names)(3) == 3
    assert b(claimed)(1, 2) == (1, 2)
    assert b(Callable_())(4) == 4


def test_a_failure_on_the_lock_free_path_still_trips() -> None:
    b = rs.CircuitBreaker("exact-trip", failure_threshold=2, clock=FakeClock())

    @b
    def div(a: int, d: int = 0) -> float:
        return a / d

    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            div(1)
    with pytest.raises(rs.CircuitOpenError):
        div(1, d=1)


def test_the_generic_wrapper_takes_both_paths_sync_and_async() -> None:
    def own_names(_rs_x, *rest, **extra):
        return (_rs_x, rest, extra)

    async def aown_names(_rs_x, *rest, **extra):
        return (_rs_x, rest, extra)

    b = _breaker()
    sync, coro = b(own_names), b(aown_names)
    assert sync.__code__.co_varnames[:1] == ("_rs_args",)  # the generic one
    assert inspect.iscoroutinefunction(coro)
    for full in (False, True):
        if full:
            _not_quiet(b)
        assert sync(1, 2, k=3) == (1, (2,), {"k": 3})
        if full:
            _not_quiet(b)
        assert asyncio.run(coro(1, 2, k=3)) == (1, (2,), {"k": 3})
