"""Construction-time checks shared by the primitives: fail loudly, naming the parameter."""

from __future__ import annotations

import math
from types import CoroutineType
from typing import TypeVar

__all__ = ["a", "async_result", "positive_seconds", "sync_result"]

R = TypeVar("R")


def positive_seconds(field: str, value: object, *, maximum: float | None = None) -> float:
    """``value`` as a float of seconds: a real number, finite, above 0 (and at most
    ``maximum``); otherwise ValueError naming ``field``. Infinity is refused because
    it overflows deadlines and socket timeouts later, far from the mistake."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{field} must be a positive number of seconds, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field} must be at most {maximum:g} seconds, got {value!r}")
    return float(value)


def a(noun: str) -> str:
    """``noun`` with its indefinite article, for messages: "a dict", "an object"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def sync_result(result: R, api: str) -> R:
    """``result`` of a sync call API (``call()``, a sync decorator), unless it is a
    coroutine: an async function run there would come back unguarded, to run outside the
    policy (unretried, unlimited, untimed) wherever it is awaited. TypeError instead."""
    if result.__class__ is CoroutineType:
        result.close()  # type: ignore[attr-defined]
        raise TypeError(
            f"{api}() got a coroutine: the function is async, so it needs "
            f"{api.rpartition('.')[0]}.a{api.rpartition('.')[2]}() (await it) or the decorator"
        )
    return result


def async_result(result: R, api: str) -> R:
    """The async side of :func:`sync_result` (the sync twins are generated from async
    sources): an awaited result is whatever the function returns."""
    return result
