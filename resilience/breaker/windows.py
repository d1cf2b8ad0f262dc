"""Sliding windows of recent calls (by count or by time) for the rate rules. Pure."""

from __future__ import annotations

from resilience.breaker.config import FailureRate, SlowCallRate

__all__ = ["make_window"]


class _CountWindow:
    """The last ``size`` calls, as a ring of flags with running totals."""

    __slots__ = ("failures", "filled", "pos", "ring", "slow")

    def __init__(self, size: int) -> None:
        self.ring = bytearray(size)
        self.pos = self.filled = self.failures = self.slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> None:
        ring, pos = self.ring, self.pos
        if self.filled == len(ring):
            old = ring[pos]
            self.failures -= old & 1
            self.slow -= old >> 1
        else:
            self.filled += 1
        ring[pos] = failed | (slow << 1)
        self.failures += failed
        self.slow += slow
        self.pos = (pos + 1) % len(ring)

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.filled, self.failures, self.slow


class _TimeWindow:
    """Calls of the last ``seconds``, in ``_BUCKETS`` buckets that expire as time moves."""

    _BUCKETS = 20
    __slots__ = (
        "calls",
        "epoch",
        "fails",
        "last",
        "slows",
        "t_calls",
        "t_fails",
        "t_slow",
        "width",
    )

    def __init__(self, seconds: float) -> None:
        n = self._BUCKETS
        self.width = seconds / n
        self.epoch = [-1] * n
        self.calls = [0] * n
        self.fails = [0] * n
        self.slows = [0] * n
        self.last = -1
        self.t_calls = self.t_fails = self.t_slow = 0

    def _advance(self, now: float) -> int:
        cur = int(now // self.width)
        n = self._BUCKETS
        if cur > self.last:
            # Clear every bucket whose epoch fell out of the window; at most n of them.
            start = max(self.last + 1, cur - n + 1)
            for e in range(start, cur + 1):
                i = e % n
                self.t_calls -= self.calls[i]
                self.t_fails -= self.fails[i]
                self.t_slow -= self.slows[i]
                self.calls[i] = self.fails[i] = self.slows[i] = 0
                self.epoch[i] = e
            self.last = cur
        return cur

    def record(self, failed: bool, slow: bool, now: float) -> None:
        cur = self._advance(now)
        if cur < self.last - self._BUCKETS + 1:
            return  # older than the window (a clock that went backwards)
        i = cur % self._BUCKETS
        self.calls[i] += 1
        self.fails[i] += failed
        self.slows[i] += slow
        self.t_calls += 1
        self.t_fails += failed
        self.t_slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        self._advance(now)
        return self.t_calls, self.t_fails, self.t_slow


_Window = _CountWindow | _TimeWindow


def make_window(rule: FailureRate | SlowCallRate) -> _Window:
    if rule.window_seconds is not None:
        return _TimeWindow(rule.window_seconds)
    return _CountWindow(rule.window)
