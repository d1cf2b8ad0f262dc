"""Adaptive concurrency limits and a latency sketch: the arithmetic, pure.

Nothing here reads a clock, sleeps, locks or does I/O: every sample arrives as numbers
(``rtt`` seconds, the ``inflight`` count when the call was admitted, whether it was
``dropped``) with ``now``, and every method returns the new limit. The shell
(:class:`resilience.ConcurrencyLimit`) keeps the in-flight count and the lock.

The three algorithms follow Netflix's concurrency-limits (Java, Apache-2.0),
``com.netflix.concurrency.limits.limit``; each class's docstring gives the formula, and
``tests/test_concurrency_limit.py`` checks them against tables worked out by hand.

- :class:`AIMD`: loss based. +1 while busy, x ``backoff_ratio`` on a drop or timeout.
- :class:`Vegas`: TCP Vegas. The queue estimate ``limit * (1 - rtt_noload / rtt)`` against
  thresholds that grow as ``log10(limit)``.
- :class:`Gradient2`: the gradient between a long-term RTT average (an exponential
  moving average) and the current RTT, smoothed.

:class:`Window` is concurrency-limits' ``WindowedLimit`` with its average sample window:
samples are summed for a window of ``length`` seconds, and at its end the algorithm sees
one sample (the average RTT, the highest in-flight count, any drop), if the window held
at least ``min_samples``; a window with fewer is discarded.

:class:`LatencySketch` keeps the last ``size`` latencies and answers quantiles, for
:class:`resilience.Hedge`'s ``delay="p95"``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Final, Protocol

__all__ = [
    "AIMD",
    "ALGORITHMS",
    "Gradient2",
    "LatencySketch",
    "LimitAlgorithm",
    "Vegas",
    "Window",
    "log10_root",
    "parse_quantile",
]


class LimitAlgorithm(Protocol):
    """What the shell needs of an algorithm: its bounds, its current estimate, and
    ``update``, which takes one sample and returns the new limit (an int)."""

    min: int
    max: int
    #: The current estimate; the limit is ``int(limit)``.
    limit: float

    def update(self, rtt: float, inflight: int, dropped: bool, now: float) -> int: ...


def _bounds(initial: object, low: object, high: object) -> tuple[int, int, int]:
    initial, low, high = (
        _count(field, value) for field, value in (("initial", initial), ("min", low), ("max", high))
    )
    if not low <= initial <= high:
        raise ValueError(f"initial must be within [min, max], got {initial} not in [{low}, {high}]")
    return initial, low, high


def _fraction(field: str, value: object, *, low: float, high: float, open_low: bool) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and value <= high
    )
    if not ok:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"{field} must be a number in {bounds}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _count(field: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field} must be an int >= {low}, got {value!r}")
    return value


def log10_root(limit: int) -> int:
    """concurrency-limits' ``Log10RootFunction``: ``max(1, int(log10(limit)))`` below
    1000, ``int(sqrt(limit))`` from there on (so thresholds keep growing)."""
    if limit < 1000:
        return max(1, int(math.log10(limit))) if limit > 0 else 1
    return int(math.sqrt(limit))


class AIMD:
    """Additive increase, multiplicative decrease (concurrency-limits' ``AIMDLimit``)::

        if dropped or rtt > timeout:
            limit = max(1, min(limit - 1, int(limit * backoff_ratio)))
        elif inflight * 2 >= limit:
            limit = limit + 1
        (else unchanged: the caller is not using half the limit)
        limit = min(max, max(min, limit))

    The limit is a whole number throughout; ``backoff_ratio`` is in [0.5, 1).
    """

    __slots__ = ("backoff_ratio", "limit", "max", "min", "timeout")

    def __init__(
        self,
        initial: int = 20,
        min: int = 1,
        max: int = 1000,
        *,
        backoff_ratio: float = 0.9,
        timeout: float = 5.0,
    ) -> None:
        initial, self.min, self.max = _bounds(initial, min, max)
        ratio = _fraction("backoff_ratio", backoff_ratio, low=0.5, high=1.0, open_low=False)
        if ratio >= 1.0:
            raise ValueError(f"backoff_ratio must be in [0.5, 1), got {backoff_ratio!r}")
        self.backoff_ratio = ratio
        self.timeout = _fraction("timeout", timeout, low=0.0, high=1e9, open_low=True)
        self.limit = float(initial)

    def update(self, rtt: float, inflight: int, dropped: bool, now: float) -> int:
        current = int(self.limit)
        if dropped or rtt > self.timeout:
            new = builtin_max(1, builtin_min(current - 1, int(current * self.backoff_ratio)))
        elif inflight * 2 >= current:
            new = current + 1
        else:
            return current
        new = builtin_min(self.max, builtin_max(self.min, new))
        self.limit = float(new)
        return new

    def __repr__(self) -> str:
        return f"AIMD(limit={self.limit:g}, min={self.min}, max={self.max})"


class Vegas:
    """TCP Vegas for concurrency (concurrency-limits' ``VegasLimit``).

    ``rtt_noload`` is the lowest RTT seen; every ``probe_multiplier * limit`` samples
    (times a jitter in [0.5, 1)) it is reset to the current sample, so it can move up.
    Then, with ``f = log10_root(int(limit))``::

        queue = ceil(limit * (1 - rtt_noload / rtt))
        alpha, beta, threshold = 3 * f, 6 * f, f
        if dropped:               new = limit - f
        elif inflight * 2 < limit: unchanged (not busy enough to tell)
        elif queue <= threshold:  new = limit + beta      (no queueing: grow fast)
        elif queue < alpha:       new = limit + f         (little queueing: grow)
        elif queue > beta:        new = limit - f         (queueing: shrink)
        else:                     unchanged               (the sweet spot)
        new = min(max, max(min, new))
        limit = (1 - smoothing) * limit + smoothing * new

    A sample that sets a new ``rtt_noload`` (or probes) leaves the limit as it is.
    ``random`` returns numbers in [0, 1) for the probe jitter (pass your own for tests).
    """

    __slots__ = (
        "_random",
        "limit",
        "max",
        "min",
        "probe_count",
        "probe_jitter",
        "probe_multiplier",
        "rtt_noload",
        "smoothing",
    )

    def __init__(
        self,
        initial: int = 20,
        min: int = 1,
        max: int = 1000,
        *,
        smoothing: float = 1.0,
        probe_multiplier: int = 30,
        random: Callable[[], float] | None = None,
    ) -> None:
        initial, self.min, self.max = _bounds(initial, min, max)
        self.smoothing = _fraction("smoothing", smoothing, low=0.0, high=1.0, open_low=True)
        self.probe_multiplier = _count("probe_multiplier", probe_multiplier)
        if random is not None and not callable(random):
            raise TypeError(f"random must return numbers in [0, 1), got {random!r}")
        self._random = random if random is not None else _random.random
        self.limit = float(initial)
        self.rtt_noload = 0.0
        self.probe_count = 0
        self.probe_jitter = self._jitter()

    def _jitter(self) -> float:
        return 0.5 + 0.5 * self._random()

    def update(self, rtt: float, inflight: int, dropped: bool, now: float) -> int:
        if not rtt > 0:  # concurrency-limits requires rtt > 0; a zero sample says nothing
            return int(self.limit)
        self.probe_count += 1
        if self.probe_jitter * self.probe_multiplier * self.limit <= self.probe_count:
            self.probe_jitter = self._jitter()
            self.probe_count = 0
            self.rtt_noload = rtt
            return int(self.limit)
        if self.rtt_noload == 0 or rtt < self.rtt_noload:
            self.rtt_noload = rtt
            return int(self.limit)
        limit = self.limit
        queue = math.ceil(limit * (1 - self.rtt_noload / rtt))
        f = log10_root(int(limit))
        if dropped:
            new = limit - f
        elif inflight * 2 < limit:
            return int(limit)
        elif queue <= f:
            new = limit + 6 * f
        elif queue < 3 * f:
            new = limit + f
        elif queue > 6 * f:
            new = limit - f
        else:
            return int(limit)
        new = builtin_min(float(self.max), builtin_max(float(self.min), new))
        self.limit = (1 - self.smoothing) * limit + self.smoothing * new
        return int(self.limit)

    def __repr__(self) -> str:
        return f"Vegas(limit={self.limit:g}, min={self.min}, max={self.max})"


class Gradient2:
    """The gradient of RTTs (concurrency-limits' ``Gradient2Limit``)::

        short = rtt                                   (the current sample)
        long  = long_ema.add(rtt)                     (see below)
        if long / short > 2: long_ema *= 0.9          (recovering: let the average fall)
        if not dropped and inflight < limit / 2: unchanged
        gradient = max(0.5, min(1.0, long / short))   (0.5 when dropped: see below)
        new = limit * gradient + queue_size
        new = limit * (1 - smoothing) + new * smoothing
        limit = min(max, max(min, new))

    ``long_ema`` is concurrency-limits' ``ExpAvgMeasurement(long_window, warmup)``: the
    plain mean of the first ``warmup`` samples, then ``value * (1 - k) + rtt * k`` with
    ``k = 2 / (long_window + 1)``. The gradient uses the average from before the 0.9
    decay, as the original does.

    One addition: the original ignores drops, which reach it only as slow RTTs. Here a
    dropped sample (a timeout, or an error the shell counts as one) takes the gradient's
    floor, 0.5, even when the caller is not busy: the largest cut the formula allows.
    """

    __slots__ = (
        "_long",
        "_long_count",
        "_long_factor",
        "_long_sum",
        "limit",
        "long_window",
        "max",
        "min",
        "queue_size",
        "smoothing",
        "warmup",
    )

    def __init__(
        self,
        initial: int = 20,
        min: int = 1,
        max: int = 1000,
        *,
        smoothing: float = 0.2,
        queue_size: int | Callable[[int], float] = 4,
        long_window: int = 600,
        warmup: int = 10,
    ) -> None:
        initial, self.min, self.max = _bounds(initial, min, max)
        self.smoothing = _fraction("smoothing", smoothing, low=0.0, high=1.0, open_low=True)
        if not callable(queue_size):
            size = _count("queue_size", queue_size, low=0)
            self.queue_size: Callable[[int], float] = lambda limit: size
        else:
            self.queue_size = queue_size
        self.long_window = _count("long_window", long_window)
        self.warmup = _count("warmup", warmup, low=0)
        self._long_factor = 2.0 / (self.long_window + 1)
        self._long = 0.0
        self._long_sum = 0.0
        self._long_count = 0
        self.limit = float(initial)

    @property
    def long_rtt(self) -> float:
        """The long-term RTT average (0.0 before the first sample)."""
        return self._long

    def _add_long(self, rtt: float) -> float:
        if self._long_count < self.warmup:
            self._long_count += 1
            self._long_sum += rtt
            self._long = self._long_sum / self._long_count
        else:
            k = self._long_factor
            self._long = self._long * (1 - k) + rtt * k
        return self._long

    def update(self, rtt: float, inflight: int, dropped: bool, now: float) -> int:
        if not rtt > 0:  # a zero sample has no gradient
            return int(self.limit)
        limit = self.limit
        queue = self.queue_size(int(limit))
        short = rtt
        long = self._add_long(rtt)
        if long / short > 2:
            self._long *= 0.9
        if not dropped and inflight < limit / 2:
            return int(limit)
        gradient = 0.5 if dropped else builtin_max(0.5, builtin_min(1.0, long / short))
        new = limit * gradient + queue
        new = limit * (1 - self.smoothing) + new * self.smoothing
        self.limit = builtin_max(float(self.min), builtin_min(float(self.max), new))
        return int(self.limit)

    def __repr__(self) -> str:
        return f"Gradient2(limit={self.limit:g}, min={self.min}, max={self.max})"


#: The algorithms by the names ``ConcurrencyLimit(algorithm=...)`` takes.
ALGORITHMS: Final[dict[str, type[AIMD] | type[Vegas] | type[Gradient2]]] = {
    "aimd": AIMD,
    "gradient2": Gradient2,
    "vegas": Vegas,
}


class Window:
    """Samples gathered for ``length`` seconds, handed to ``algorithm`` as one
    (concurrency-limits' ``WindowedLimit`` with ``AverageSampleWindow``).

    A window ends at the first sample at or after ``until``; the algorithm then sees the
    window's average RTT, its highest in-flight count and whether any sample was
    dropped, provided it holds ``min_samples`` samples, and the next window ends
    ``length`` seconds later. With ``length`` 0 every sample is its own window.

    The fields are public so a shell can add a sample inline (what :meth:`add` does)
    and call :meth:`close` only when ``now >= until``.
    """

    __slots__ = ("algorithm", "count", "dropped", "length", "min_samples", "peak", "total", "until")

    def __init__(
        self, algorithm: LimitAlgorithm, length: float, min_samples: int, start: float = 0.0
    ) -> None:
        self.algorithm = algorithm
        self.length = float(length)
        self.min_samples = min_samples
        self.total = 0.0
        self.count = 0
        self.peak = 0
        self.dropped = False
        self.until = start + self.length if self.length > 0 else -math.inf

    def add(self, rtt: float, inflight: int, dropped: bool, now: float) -> int | None:
        """Count one sample; the new limit when this sample ended the window, else None."""
        self.total += rtt
        self.count += 1
        if inflight > self.peak:
            self.peak = inflight
        if dropped:
            self.dropped = True
        if now < self.until:
            return None
        return self.close(now)

    def close(self, now: float) -> int | None:
        """End the window at ``now``: the algorithm's new limit, or None when the window
        had too few samples (they are discarded, as concurrency-limits does)."""
        count, total, peak, dropped = self.count, self.total, self.peak, self.dropped
        self.total, self.count, self.peak, self.dropped = 0.0, 0, 0, False
        if self.length > 0:
            self.until = now + self.length
        if count < self.min_samples or count == 0:
            return None
        return self.algorithm.update(total / count, peak, dropped, now)


def parse_quantile(text: object) -> float:
    """``"p95"`` -> 0.95, ``"p99.9"`` -> 0.999; ValueError for anything else."""
    if isinstance(text, str) and text[:1] in ("p", "P"):
        try:
            percent = float(text[1:])
        except ValueError:
            percent = math.nan
        if 0 < percent < 100:
            return percent / 100
    raise ValueError(f"a quantile must look like 'p95' or 'p99.9' (0 < p < 100), got {text!r}")


class LatencySketch:
    """The last ``size`` latencies, and their quantiles.

    A ring buffer; :meth:`quantile` sorts a copy when ``refresh`` samples arrived since
    the last sort, so asking costs a lookup nearly every time. Quantiles are by nearest
    rank: the smallest value with at least ``q`` of the samples at or below it. None
    until ``min_samples`` samples are in.
    """

    __slots__ = ("_fresh", "_next", "_sorted", "_values", "min_samples", "refresh", "size")

    def __init__(self, size: int = 1000, *, min_samples: int = 20, refresh: int = 20) -> None:
        self.size = _count("size", size)
        self.min_samples = _count("min_samples", min_samples)
        if self.min_samples > self.size:
            raise ValueError(f"min_samples must be at most size ({size}), got {min_samples!r}")
        self.refresh = _count("refresh", refresh)
        self._values: list[float] = []
        self._next = 0
        self._sorted: list[float] = []
        self._fresh = 0  # samples added since the last sort

    def __len__(self) -> int:
        return len(self._values)

    def add(self, seconds: float) -> None:
        if len(self._values) < self.size:
            self._values.append(seconds)
        else:
            self._values[self._next] = seconds
            self._next = (self._next + 1) % self.size
        self._fresh += 1

    def quantile(self, q: float) -> float | None:
        values = self._values
        if len(values) < self.min_samples:
            return None
        if self._fresh >= self.refresh or not self._sorted:
            self._sorted = sorted(values)
            self._fresh = 0
        ranked = self._sorted
        rank = math.ceil(q * len(ranked))
        return ranked[builtin_min(len(ranked), builtin_max(1, rank)) - 1]


# The classes above take parameters named min and max, as the public API does.
builtin_min = min
builtin_max = max
_random = random.Random()
