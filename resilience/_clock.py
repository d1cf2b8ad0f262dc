"""The one place that reads time.

Everything that needs "now" takes a :class:`Clock`; tests pass
:class:`resilience.testing.FakeClock`. Module attributes are looked up at call
time so freezegun's patches of :mod:`time` are honoured too.
"""

from __future__ import annotations

import time as _time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "monotonic"]


@runtime_checkable
class Clock(Protocol):
    """A source of time. ``monotonic`` is for intervals, ``time`` for wall-clock stamps."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The process clocks: :func:`time.monotonic` and :func:`time.time`."""

    __slots__ = ()

    def monotonic(self) -> float:
        return _time.monotonic()

    def time(self) -> float:
        return _time.time()

    def sleep(self, seconds: float) -> None:
        _time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        import anyio

        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()

#: ``time.monotonic`` itself, for hot paths that use the system clock. Import it as a
#: module attribute: freezegun patches module attributes bound to the real function, so
#: it still moves under freeze_time.
monotonic = _time.monotonic


def resolve(clock: Clock | None) -> Clock:
    """Return ``clock`` or the system clock, rejecting objects that are not clocks."""
    if clock is None:
        return SYSTEM_CLOCK
    if not isinstance(clock, Clock):
        raise TypeError(
            f"clock must have monotonic() and time() methods, got {type(clock).__name__}"
        )
    return clock
