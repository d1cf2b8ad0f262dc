"""How long to wait before each retry: exponential backoff with jitter. Pure: no clock."""

from __future__ import annotations

import math
import random
from typing import Final

__all__ = ["JITTERS", "Backoff"]

#: ``full``: uniform in [0, d]; ``equal``: d/2 plus uniform in [0, d/2]; ``decorrelated``:
#: uniform in [initial, 3 * the previous delay, or 3 * initial for the first retry] (AWS's
#: "decorrelated jitter"), capped at maximum;
#: ``none``: exactly d. d = min(maximum, initial * multiplier^(retry - 1)).
JITTERS: Final = ("full", "equal", "decorrelated", "none")


#: The longest wait a backoff may ask for: a year. Past it ``time.sleep`` overflows,
#: far from the mistake that asked for it.
MAX_WAIT: Final = 365 * 86_400.0


def _seconds(field: str, value: object, *, zero: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        what = "a number of seconds >= 0" if zero else "a positive number of seconds"
        raise ValueError(f"{field} must be {what}, got {value!r}")
    if value > MAX_WAIT:
        raise ValueError(f"{field} must be at most {MAX_WAIT:g} seconds (a year), got {value!r}")
    return float(value)


class Backoff:
    """Exponential backoff: ``initial`` seconds before the first retry, times
    ``multiplier`` for each one after, never above ``maximum``, spread by ``jitter``
    (one of :data:`JITTERS`) so that many callers do not retry in step.

    ``rng`` is the random source (a ``random.Random``; pass a seeded one in tests).
    """

    __slots__ = ("_rng", "initial", "jitter", "maximum", "multiplier")

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 10.0,
        multiplier: float = 2.0,
        jitter: str = "full",
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = _seconds("initial", initial, zero=True)
        self.maximum = _seconds("maximum", maximum, zero=True)
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({maximum!r}) must be >= initial ({initial!r})")
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, (int, float))
            or not (math.isfinite(multiplier) and multiplier >= 1)
        ):
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        self.multiplier = float(multiplier)
        if jitter not in JITTERS:
            raise ValueError(f"jitter must be one of {', '.join(JITTERS)}; got {jitter!r}")
        self.jitter = jitter
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        self._rng = rng if rng is not None else random.Random()

    def ceiling(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1 = the first retry), before jitter."""
        if self.initial == 0.0:  # 0 times any power, even one too big for a float
            return 0.0
        try:
            delay = self.initial * self.multiplier ** (retry - 1)
        except OverflowError:
            return self.maximum
        return delay if delay < self.maximum else self.maximum

    def delay(self, retry: int, previous: float = 0.0) -> float:
        """The wait before retry number ``retry``; ``previous`` is the last wait (for
        decorrelated jitter)."""
        jitter = self.jitter
        if jitter == "decorrelated":
            # The first retry draws from [initial, 3 * initial] too (AWS starts its
            # "previous sleep" at the base), or every caller's first retry is in step.
            low = self.initial
            high = 3.0 * (previous if previous > low else low)
            return min(self.maximum, self._rng.uniform(low, high))
        ceiling = self.ceiling(retry)
        if jitter == "full":
            return self._rng.uniform(0.0, ceiling)
        if jitter == "equal":
            return ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)
        return ceiling

    def schedule(self, retries: int) -> list[float]:
        """The waits before ``retries`` retries in a row (draws from ``rng``)."""
        out: list[float] = []
        previous = 0.0
        for retry in range(1, retries + 1):
            previous = self.delay(retry, previous)
            out.append(previous)
        return out

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, maximum={self.maximum}, "
            f"multiplier={self.multiplier}, jitter={self.jitter!r})"
        )
