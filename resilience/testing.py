"""What users need to test their own code against resilience.

- :class:`FakeClock`: pass it as ``clock=`` and move time with :meth:`FakeClock.advance`.
- :func:`disabled`: a context manager that makes every breaker admit every call.
- :func:`no_waits`: retries still happen, but none waits (as stamina's set_testing).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from resilience.breaker import breaker as _breaker
from resilience.breaker.policy import BreakerMode
from resilience.breaker.registry import REGISTRY
from resilience.policies import _retry_core

__all__ = ["FakeClock", "disabled", "no_waits"]


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
    # mode, and for a timed force-open its end on the breaker's clock
    before = {b: (b.mode, _forced_until(b)) for b in REGISTRY.live()}
    _breaker._forced_closed_for_tests = True
    try:
        for b in before:
            b.force_closed()
        yield
    finally:
        _breaker._forced_closed_for_tests = False
        for b in REGISTRY.live():
            mode, until = before.get(b, (BreakerMode.NORMAL, math.inf))
            if mode is BreakerMode.FORCED_OPEN:
                left = until - b._clock.monotonic()
                if until == math.inf:
                    b.force_open()
                elif left > 0:
                    b.force_open(duration=left)
                else:
                    b.half_open()  # its time ran out inside the block: probing now
            elif mode is BreakerMode.DISABLED:
                b.disable()
            elif mode is BreakerMode.NORMAL:
                b.reset()


def _forced_until(b: _breaker.CircuitBreaker) -> float:
    """When ``b``'s force-open ends (monotonic, its clock); inf if untimed or not forced."""
    policy = b._policy
    with b._lock:
        forced = policy.mode is BreakerMode.FORCED_OPEN
        return policy.open_until if forced else math.inf


@contextmanager
def no_waits() -> Iterator[None]:
    """Inside the block every :class:`~resilience.Retry` retries at once: backoff and
    retry_after waits are skipped (the clock is not moved either). Attempts, budgets
    and deadlines still apply. Nests; restores the previous setting on exit."""
    before = _retry_core.waits[0]
    _retry_core.waits[0] = False
    try:
        yield
    finally:
        _retry_core.waits[0] = before
