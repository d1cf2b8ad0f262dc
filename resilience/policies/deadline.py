"""The deadline a call runs under, carried in a contextvar (deadline propagation).

:class:`~resilience.Timeout` and a :class:`~resilience.Retry` with ``deadline=`` set it for
the code they run; :func:`remaining` reads it, so a callee can hand the time left to its
own client (``httpx.get(url, timeout=rs.remaining())``), as gRPC propagates deadlines.
Nested deadlines keep the earliest. Each deadline is kept with the clock it was set on,
so policies on different clocks still nest correctly.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

__all__ = ["Deadline", "current", "remaining", "tighter"]

#: (absolute deadline, the monotonic clock it is on), or None: no deadline.
Deadline = tuple[float, Callable[[], float]]

DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "resilience_deadline", default=None
)
current = DEADLINE.get


def remaining() -> float | None:
    """Seconds left before the innermost enclosing deadline (never below 0.0), or None
    when no :class:`~resilience.Timeout` or retry ``deadline`` encloses this code."""
    deadline = DEADLINE.get()
    if deadline is None:
        return None
    left = deadline[0] - deadline[1]()
    return left if left > 0.0 else 0.0


def tighter(seconds: float | None, now: float, monotonic: Callable[[], float]) -> float | None:
    """The seconds left of ``seconds`` from ``now`` or of the enclosing deadline,
    whichever ends first (None when neither exists)."""
    outer = DEADLINE.get()
    if outer is None:
        return seconds
    left = outer[0] - (now if outer[1] is monotonic else outer[1]())
    return left if seconds is None or left < seconds else seconds
