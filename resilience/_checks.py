"""Construction-time checks shared by the primitives: fail loudly, naming the parameter."""

from __future__ import annotations

import math

__all__ = ["a", "positive_seconds"]


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
