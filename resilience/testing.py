"""What users need to test their own code against resilience.

- :class:`FakeClock`: pass it as ``clock=`` and move time with :meth:`FakeClock.advance`.
- :func:`disabled`: a context manager that makes every breaker admit every call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from resilience.breaker import breaker as _breaker
from resilience.breaker.policy import BreakerMode

__all__ = ["FakeClock", "disabled"]


class FakeClock:
    """A clock that only moves when told to. Thread-safe.

    ``monotonic()`` starts at ``start``; ``time()`` is ``wall_start`` plus the same offset.
    """

    __slots__ = ("_lock", "_now", "_wall_offset")

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"start must be a finite number, got {start!r}")
        self._lock = threading.Lock()
        self._now = float(start)
        self._wall_offset = wall_start - start

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0) and return the new monotonic time."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def sleep(self, seconds: float) -> None:
        """Sleeping on a fake clock moves it; nothing waits."""
        self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        import anyio

        self.advance(seconds)
        await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self._now})"


@contextmanager
def disabled() -> Iterator[None]:
    """Every breaker (existing or created inside the block) admits every call.

    On exit each existing breaker goes back to its mode from before; breakers that
    were normal come back reset (closed, counts cleared).
    """
    before = {b: b.mode for b in list(_breaker._ALL)}
    _breaker._forced_closed_for_tests = True
    try:
        for b in before:
            b.force_closed()
        yield
    finally:
        _breaker._forced_closed_for_tests = False
        for b in list(_breaker._ALL):
            mode = before.get(b, BreakerMode.NORMAL)
            if mode is BreakerMode.FORCED_OPEN:
                b.force_open()
            elif mode is BreakerMode.DISABLED:
                b.disable()
            elif mode is BreakerMode.NORMAL:
                b.reset()
