"""ConcurrencyLimit: the algorithms against tables worked out by hand from the published
formulas (Netflix concurrency-limits), the window and the latency sketch, and the shell
on threads, asyncio and trio.

Every expected number below was computed by hand from the formula in the class's
docstring (the comments show the arithmetic), not by running the code. The shell's
RTTs come from a FakeClock; waiting for a slot needs real time, so those tests use
tiny waits.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import resilience as rs
from resilience.metrics import Metrics
from resilience.policies.limits_math import (
    AIMD,
    Gradient2,
    LatencySketch,
    Vegas,
    Window,
    log10_root,
    parse_quantile,
)
from resilience.testing import FakeClock

anyio_test = pytest.mark.anyio
_serial = itertools.count()

# (rtt seconds, inflight, dropped) -> expected int limit, and the float estimate after.
Row = tuple[float, int, bool, int, float]


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_serial)}"


def run_table(algorithm: Any, rows: list[Row]) -> None:
    for i, (rtt, inflight, dropped, limit, estimate) in enumerate(rows):
        got = algorithm.update(rtt, inflight, dropped, float(i))
        assert (got, algorithm.limit) == (limit, pytest.approx(estimate, abs=1e-9)), (
            f"row {i}: update({rtt}, {inflight}, {dropped})"
        )


# -- log10_root --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, 1),  # log10(1) = 0 -> at least 1
        (9, 1),  # 0.95 -> 0 -> 1
        (10, 1),
        (99, 1),  # 1.996 -> 1
        (100, 2),
        (999, 2),  # 2.9996 -> 2
        (1000, 31),  # from 1000 on: int(sqrt(1000)) = int(31.62)
        (1024, 32),
        (4000, 63),  # sqrt(4000) = 63.25
    ],
)
def test_log10_root_is_concurrency_limits_function(limit: int, expected: int) -> None:
    assert log10_root(limit) == expected


# -- AIMD --------------------------------------------------------------------------------


def test_aimd_table() -> None:
    """initial 10, min 1, max 12, backoff_ratio 0.9, timeout 5 s."""
    run_table(
        AIMD(10, 1, 12, backoff_ratio=0.9, timeout=5.0),
        [
            (0.010, 5, False, 11, 11.0),  # 5 * 2 >= 10: +1
            (0.010, 5, False, 11, 11.0),  # 5 * 2 = 10 < 11: not busy, unchanged
            (0.010, 6, False, 12, 12.0),  # 12 >= 11: +1
            (0.010, 12, False, 12, 12.0),  # 13, capped at max 12
            (0.010, 1, True, 10, 10.0),  # drop: max(1, min(11, int(12 * 0.9 = 10.8))) = 10
            (6.000, 1, False, 9, 9.0),  # rtt > timeout is a drop: min(9, int(9.0)) = 9
            (0.010, 1, True, 8, 8.0),  # min(8, int(8.1)) = 8
            (0.010, 4, False, 9, 9.0),  # 8 >= 8: +1
        ],
    )


def test_aimd_never_goes_below_one_or_min() -> None:
    run_table(
        AIMD(2, 1, 10),
        [
            (0.010, 1, True, 1, 1.0),  # max(1, min(1, int(1.8) = 1)) = 1
            (0.010, 1, True, 1, 1.0),  # max(1, min(0, int(0.9) = 0)) = 1
        ],
    )
    run_table(
        AIMD(5, 4, 10, backoff_ratio=0.5),
        [
            (0.010, 1, True, 4, 4.0),  # max(1, min(4, int(2.5) = 2)) = 2, raised to min 4
        ],
    )


# -- Vegas -------------------------------------------------------------------------------


def test_vegas_table_below_100() -> None:
    """initial 20, max 1000, smoothing 1; below 100, log10_root is 1: alpha 3, beta 6,
    threshold 1. No probe: 0.75 * 30 * 20 = 450 samples away."""
    run_table(
        Vegas(20, 1, 1000, random=lambda: 0.5),
        [
            (0.010, 10, False, 20, 20.0),  # first sample: rtt_noload = 10 ms, no change
            # queue = ceil(20 * (1 - 10/10)) = 0 <= threshold 1: + beta 6
            (0.010, 10, False, 26, 26.0),
            # queue = ceil(26 * (1 - 10/12)) = ceil(4.33) = 5: in [alpha 3, beta 6]: keep
            (0.012, 13, False, 26, 26.0),
            # queue = ceil(26 * (1 - 10/20)) = 13 > beta 6: - 1
            (0.020, 26, False, 25, 25.0),
            # queue = ceil(25 * (1 - 10/11)) = ceil(2.27) = 3: not < alpha 3, not > 6: keep
            (0.011, 25, False, 25, 25.0),
            # queue = ceil(25 * (1 - 10/10.5)) = ceil(1.19) = 2: > 1, < 3: + 1
            (0.0105, 25, False, 26, 26.0),
            (0.010, 5, True, 25, 25.0),  # a drop: - 1, even though not busy
            (0.010, 12, False, 25, 25.0),  # 12 * 2 = 24 < 25: not busy, unchanged
            (0.008, 25, False, 25, 25.0),  # a new lowest RTT: rtt_noload = 8 ms, no change
            # queue = ceil(25 * (1 - 8/10)) = 5: keep
            (0.010, 25, False, 25, 25.0),
        ],
    )


def test_vegas_thresholds_grow_with_log10_of_the_limit() -> None:
    """At 150, log10_root is 2: alpha 6, beta 12, threshold 2. At 1600, it is
    int(sqrt(1600)) = 40: alpha 120, beta 240, threshold 40."""
    vegas = Vegas(150, 1, 5000, random=lambda: 0.5)
    run_table(
        vegas,
        [
            (0.010, 100, False, 150, 150.0),  # rtt_noload
            # queue = ceil(150 * (1 - 10/10.1)) = ceil(1.485) = 2 <= 2: + beta 12
            (0.0101, 100, False, 162, 162.0),
            # queue = ceil(162 * (1 - 10/10.5)) = ceil(7.71) = 8: in [6, 12]: keep
            (0.0105, 100, False, 162, 162.0),
            # queue = ceil(162 * (1 - 10/11)) = ceil(14.73) = 15 > 12: - 2
            (0.011, 100, False, 160, 160.0),
            # queue = ceil(160 * (1 - 10/10.3)) = ceil(4.66) = 5: > 2, < 6: + 2
            (0.0103, 100, False, 162, 162.0),
        ],
    )
    big = Vegas(1600, 1, 5000, random=lambda: 0.5)
    run_table(
        big,
        [
            (0.010, 1000, False, 1600, 1600.0),
            # queue = ceil(1600 * (1 - 10/10.3)) = ceil(46.6) = 47: > 40, < 120: + 40
            (0.0103, 1000, False, 1640, 1640.0),
            # queue = ceil(1640 * (1 - 10/12)) = ceil(273.3) = 274 > beta 240: - 40
            (0.012, 1000, False, 1600, 1600.0),
        ],
    )


def test_vegas_smoothing_and_bounds() -> None:
    run_table(
        Vegas(20, 1, 24, smoothing=0.5, random=lambda: 0.5),
        [
            (0.010, 10, False, 20, 20.0),
            # + beta 6 = 26, capped at max 24, then 0.5 * 20 + 0.5 * 24 = 22
            (0.010, 20, False, 22, 22.0),
            # 22 + 6 = 28 -> 24; 0.5 * 22 + 0.5 * 24 = 23
            (0.010, 20, False, 23, 23.0),
            # a drop: 23 - 1 = 22; 0.5 * 23 + 0.5 * 22 = 22.5
            (0.010, 20, True, 22, 22.5),
        ],
    )


def test_vegas_probes_for_a_new_noload_rtt() -> None:
    """probe_multiplier 1, jitter 0.5 + 0.5 * 0.5 = 0.75: a probe when
    0.75 * 1 * 4 = 3 <= samples since the last probe."""
    vegas = Vegas(4, 1, 100, probe_multiplier=1, random=lambda: 0.5)
    run_table(
        vegas,
        [
            (0.010, 2, False, 4, 4.0),  # count 1: rtt_noload 10 ms
            # count 2: queue = ceil(4 * (1 - 10/20)) = 2 > threshold 1, < alpha 3: + 1
            (0.020, 2, False, 5, 5.0),
            # count 3 >= 0.75 * 5 = 3.75? no. queue = ceil(5 * (1 - 10/40)) = 4: keep
            (0.040, 3, False, 5, 5.0),
            (0.040, 3, False, 5, 5.0),  # count 4 >= 3.75: a probe: rtt_noload = 40 ms
        ],
    )
    assert vegas.rtt_noload == 0.040
    assert vegas.probe_count == 0


def test_vegas_ignores_a_zero_rtt() -> None:
    vegas = Vegas(20, 1, 100)
    assert vegas.update(0.0, 20, False, 0.0) == 20
    assert vegas.rtt_noload == 0.0
    assert vegas.probe_count == 0


# -- Gradient2 ---------------------------------------------------------------------------


def test_gradient2_table() -> None:
    """initial 20, max 200, smoothing 0.2, queue_size 4; a long average of window 3
    (k = 2 / 4 = 0.5) after a warm-up of 2 samples, so the arithmetic stays short."""
    run_table(
        Gradient2(20, 1, 200, smoothing=0.2, queue_size=4, long_window=3, warmup=2),
        [
            # long = 10 (warm-up mean); gradient = min(1, 10/10) = 1
            # new = 20 * 1 + 4 = 24; 20 * 0.8 + 24 * 0.2 = 20.8
            (0.010, 15, False, 20, 20.8),
            # long = (10 + 20) / 2 = 15; gradient 15/20 = 0.75
            # new = 20.8 * 0.75 + 4 = 19.6; 20.8 * 0.8 + 19.6 * 0.2 = 16.64 + 3.92 = 20.56
            (0.020, 15, False, 20, 20.56),
            # long = 15 * 0.5 + 40 * 0.5 = 27.5; gradient 27.5/40 = 0.6875
            # new = 20.56 * 0.6875 + 4 = 18.135; 16.448 + 3.627 = 20.075
            (0.040, 20, False, 20, 20.075),
            # long = 27.5 * 0.5 + 100 * 0.5 = 63.75; gradient 0.6375
            # new = 20.075 * 0.6375 + 4 = 16.7978125; 16.06 + 3.3595625 = 19.4195625
            (0.100, 20, False, 19, 19.4195625),
            # long = 63.75 * 0.5 + 10 * 0.5 = 36.875; 36.875 / 10 > 2: long *= 0.9 -> 33.1875
            # inflight 5 < 19.42 / 2: not busy, unchanged
            (0.010, 5, False, 19, 19.4195625),
            # long = 33.1875 * 0.5 + 5 = 21.59375 (> 2 x 10: then 19.434375); gradient 1
            # new = 19.4195625 + 4 = 23.4195625; 15.53565 + 4.6839125 = 20.2195625
            (0.010, 19, False, 20, 20.2195625),
            # a drop: gradient 0.5 even though not busy (long = 14.7171875, no decay)
            # new = 20.2195625 * 0.5 + 4 = 14.10978125; 16.17565 + 2.82195625 = 18.99760625
            (0.010, 2, True, 18, 18.99760625),
        ],
    )


def test_gradient2_long_average_with_the_published_defaults() -> None:
    """long_window 600 (k = 2/601), warm-up 10: ten samples of 10 ms make the long
    average 10 ms and grow the limit by 0.8 each (x + 4 at gradient 1, smoothed: +0.8);
    then 30 ms: long = 10 + 20 * 2/601 = 10.0666 ms, gradient 10.0666/30 = 0.336 -> 0.5,
    new = 28 * 0.5 + 4 = 18, 28 * 0.8 + 18 * 0.2 = 26."""
    gradient = Gradient2(20, 1, 1000)
    for _ in range(10):
        gradient.update(0.010, 1000, False, 0.0)
    assert gradient.limit == pytest.approx(28.0)
    assert gradient.long_rtt == pytest.approx(0.010)
    assert gradient.update(0.030, 1000, False, 0.0) == 26
    assert gradient.limit == pytest.approx(26.0)
    assert gradient.long_rtt == pytest.approx(0.010 + 0.020 * 2 / 601)


def test_gradient2_stays_within_bounds() -> None:
    run_table(
        Gradient2(199, 1, 200),
        [
            (0.010, 150, False, 199, 199.8),  # 199 * 0.8 + 203 * 0.2 = 199.8
            (0.010, 150, False, 200, 200.0),  # 159.84 + 40.76 = 200.6, capped at 200
        ],
    )
    low = Gradient2(10, 9, 100, queue_size=0, warmup=1)
    low.update(0.010, 10, False, 0.0)
    # gradient 10/100 -> 0.5: new = 5; 10 * 0.8 + 5 * 0.2 = 9; then 9 * 0.5 = 4.5 ->
    # 9 * 0.8 + 4.5 * 0.2 = 8.1, raised to min 9
    assert low.update(0.100, 10, False, 0.0) == 9
    assert low.update(0.100, 10, False, 0.0) == 9
    assert low.limit == 9.0


def test_gradient2_queue_size_may_depend_on_the_limit() -> None:
    gradient = Gradient2(16, 1, 100, queue_size=lambda limit: math.sqrt(limit), warmup=1)
    # gradient 1: new = 16 + sqrt(16) = 20; 16 * 0.8 + 20 * 0.2 = 16.8
    assert gradient.update(0.010, 16, False, 0.0) == 16
    assert gradient.limit == pytest.approx(16.8)


# -- the window ----------------------------------------------------------------------------


class Recorded:
    """An algorithm that records what it is handed."""

    min, max = 1, 100

    def __init__(self) -> None:
        self.limit = 10.0
        self.seen: list[tuple[float, int, bool, float]] = []

    def update(self, rtt: float, inflight: int, dropped: bool, now: float) -> int:
        self.seen.append((rtt, inflight, dropped, now))
        self.limit += 1
        return int(self.limit)


def test_window_hands_the_algorithm_one_average_sample() -> None:
    algorithm = Recorded()
    window = Window(algorithm, length=1.0, min_samples=3, start=0.0)
    assert window.add(0.010, 4, False, 0.2) is None
    assert window.add(0.030, 9, False, 0.5) is None
    assert window.add(0.020, 2, True, 0.9) is None
    assert window.add(0.040, 5, False, 1.0) == 11  # ends at start + 1.0
    [(rtt, inflight, dropped, now)] = algorithm.seen
    assert rtt == pytest.approx(0.025)
    assert (inflight, dropped, now) == (9, True, 1.0)
    assert window.until == 2.0  # the next window: length after the closing sample


def test_window_with_too_few_samples_is_discarded() -> None:
    algorithm = Recorded()
    window = Window(algorithm, length=1.0, min_samples=3, start=0.0)
    window.add(0.010, 4, True, 0.5)
    assert window.add(0.010, 4, False, 1.5) is None  # two samples: discarded
    assert algorithm.seen == []
    assert (window.count, window.dropped, window.until) == (0, False, 2.5)
    for now in (1.6, 1.7, 1.8):
        window.add(0.010, 1, False, now)
    assert window.add(0.010, 1, False, 2.5) == 11
    [(rtt, inflight, dropped, now)] = algorithm.seen
    assert rtt == pytest.approx(0.010)
    assert (inflight, dropped, now) == (1, False, 2.5)  # the old drop is gone


def test_window_of_zero_length_passes_every_sample() -> None:
    algorithm = Recorded()
    window = Window(algorithm, length=0.0, min_samples=1)
    assert window.add(0.010, 3, False, 5.0) == 11
    assert window.add(0.020, 4, True, 5.0) == 12
    assert algorithm.seen == [(0.010, 3, False, 5.0), (0.020, 4, True, 5.0)]


# -- the latency sketch --------------------------------------------------------------------


def test_sketch_quantiles_by_nearest_rank() -> None:
    sketch = LatencySketch(100, min_samples=5, refresh=1)
    for value in (5, 1, 4, 2, 3):
        assert sketch.quantile(0.5) is None
        sketch.add(value / 1000)
    # sorted 1..5 ms; rank ceil(q * 5)
    assert sketch.quantile(0.5) == 0.003  # rank 3
    assert sketch.quantile(0.95) == 0.005  # rank ceil(4.75) = 5
    assert sketch.quantile(0.2) == 0.001  # rank 1
    assert sketch.quantile(0.21) == 0.002  # rank ceil(1.05) = 2


def test_sketch_keeps_the_last_size_values() -> None:
    sketch = LatencySketch(4, min_samples=4, refresh=1)
    for value in (100, 100, 100, 100, 1, 2, 3):  # the 1, 2, 3 replace three of the 100s
        sketch.add(value)
    assert len(sketch) == 4
    assert sketch.quantile(0.5) == 2  # {1, 2, 3, 100}: rank 2
    assert sketch.quantile(0.99) == 100


def test_sketch_sorts_again_only_after_refresh_samples() -> None:
    sketch = LatencySketch(1000, min_samples=2, refresh=3)
    sketch.add(1.0)
    sketch.add(2.0)
    assert sketch.quantile(0.99) == 2.0
    sketch.add(9.0)
    sketch.add(9.0)
    assert sketch.quantile(0.99) == 2.0  # two new samples: the sorted copy stands
    sketch.add(9.0)
    assert sketch.quantile(0.99) == 9.0  # the third: sorted again


@pytest.mark.parametrize(
    ("text", "q"), [("p95", 0.95), ("p99.9", 0.999), ("P50", 0.5), ("p1", 0.01)]
)
def test_parse_quantile(text: str, q: float) -> None:
    assert parse_quantile(text) == pytest.approx(q)


@pytest.mark.parametrize("text", ["95", "p0", "p100", "p", "pxx", "q95", 0.95, None])
def test_parse_quantile_rejects_nonsense(text: object) -> None:
    with pytest.raises(ValueError, match="quantile"):
        parse_quantile(text)


# -- the shell: the limit moves ------------------------------------------------------------


def test_the_limit_falls_as_latency_grows_and_rises_again(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("vegas", initial=10, max=100, window=None, clock=clock)

    def round_of(n: int, rtt: float) -> None:
        permits = [limit.acquire() for _ in range(n)]
        clock.advance(rtt)
        for permit in permits:
            permit.success()

    round_of(10, 0.010)  # the first sample sets rtt_noload; then no queueing: + 6 each
    grown = limit.limit
    assert grown > 10
    for _ in range(5):
        round_of(min(limit.limit, 20), 0.030)  # latency tripled: queueing, the limit falls
    fallen = limit.limit
    assert fallen < grown
    for _ in range(5):
        round_of(limit.limit, 0.010)
    assert limit.limit > fallen
    assert limit.in_flight == 0


def test_drops_cut_an_aimd_limit(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=10, window=None, clock=clock)

    def times_out() -> None:
        clock.advance(0.01)
        raise rs.TimeoutExceeded(0.01)

    with pytest.raises(rs.TimeoutExceeded):
        limit.call(times_out)
    assert limit.limit == 9  # int(10 * 0.9)
    with pytest.raises(ConnectionError):
        limit.call(functools.partial(raise_, ConnectionError("reset")))
    assert limit.limit == 8  # min(8, int(8.1))
    read = limit.telemetry().read()
    assert read["dropped"] == 2
    assert read["limit"] == 8


def raise_(error: BaseException) -> None:
    raise error


def test_other_errors_are_samples_and_interrupts_are_not(clock: FakeClock) -> None:
    # AIMD at initial 2: a sample with inflight 1 (1 * 2 >= 2) grows it by one.
    limit = rs.ConcurrencyLimit("aimd", initial=2, window=None, clock=clock)
    with pytest.raises(KeyError):
        limit.call(functools.partial(raise_, KeyError("missing")))
    assert limit.limit == 3  # the dependency answered: a sample like a success
    with pytest.raises(KeyboardInterrupt):
        limit.call(functools.partial(raise_, KeyboardInterrupt()))
    assert limit.limit == 3  # no sample
    assert limit.in_flight == 0


def test_drop_on_takes_a_predicate(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit(
        "aimd",
        initial=10,
        window=None,
        clock=clock,
        drop_on=lambda error: getattr(error, "status", 0) == 503,
    )
    error = RuntimeError("busy")
    error.status = 503  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        limit.call(functools.partial(raise_, error))
    assert limit.limit == 9
    with pytest.raises(TimeoutError):  # no longer a drop: a sample, not busy, unchanged
        limit.call(functools.partial(raise_, TimeoutError()))
    assert limit.limit == 9


def test_samples_are_averaged_per_window(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=4, window=1.0, min_samples=2, clock=clock)
    permits = [limit.acquire() for _ in range(3)]  # in flight 1, 2, 3
    for permit in permits:
        permit.success()
    assert limit.limit == 4  # the window is still open
    clock.advance(1.0)
    limit.call(lambda: None)  # ends the window: peak in flight 3, 3 * 2 >= 4: + 1
    assert limit.limit == 5


def test_the_inline_path_matches_the_pure_window(clock: FakeClock) -> None:
    """Nested calls through the decorator (in flight 1..depth), random RTTs: the shell's
    limit equals a pure Window and Gradient2 fed the same samples."""
    rng = random.Random(7)
    limit = rs.ConcurrencyLimit("gradient2", initial=4, window=0.05, min_samples=3, clock=clock)
    twin = Gradient2(4, 1, 1000)
    window = Window(twin, 0.05, 3, start=0.0)
    samples: list[tuple[float, int]] = []

    def nested(depth: int) -> None:
        start = clock.monotonic()
        clock.advance(rng.choice((0.001, 0.002, 0.005, 0.02)))
        if depth > 1:
            limit.call(nested, depth - 1)
        samples.append((clock.monotonic() - start, depth))

    for _ in range(200):
        top = rng.randint(1, min(8, limit.limit))
        before = len(samples)
        limit.call(nested, top)
        end = clock.monotonic()
        # innermost first, each admitted at in flight top - depth + 1
        for rtt, depth in samples[before:]:
            window.add(rtt, top - depth + 1, False, end)
        assert limit.limit == int(twin.limit)
    assert limit.limit != 4  # it moved


# -- the shell: admission ------------------------------------------------------------------


def test_a_full_limit_rejects_with_limit_exceeded(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit(initial=1, name="tight", clock=clock)
    with limit as permit:
        assert isinstance(permit, rs.LimitPermit)
        with pytest.raises(rs.LimitExceeded) as caught:
            limit.call(print, "never")
    error = caught.value
    assert isinstance(error, rs.BulkheadFull)  # a Fallback(on=BulkheadFull) answers it too
    assert (error.name, error.limit, error.max_concurrent, error.waited) == ("tight", 1, 1, 0.0)
    assert "concurrency limit 'tight' reached (1 running)" in str(error)
    read = limit.telemetry().read()
    assert (read["admitted"], read["rejected"], read["in_flight"]) == (1, 1, 0)


def test_a_lower_limit_lets_the_calls_in_flight_finish(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=4, window=None, clock=clock, max_wait=None)
    permits = [limit.acquire() for _ in range(4)]
    permits[0].drop()  # int(4 * 0.9) = 3, so min(3, 3) = 3: three still in flight
    assert (limit.limit, limit.in_flight) == (3, 3)
    queued: list[str] = []
    thread = started(lambda: limit.call(queued.append, "waiter"))
    wait_for(lambda: limit.waiting == 1)
    permits[1].ignore()  # 2 in flight, under the limit of 3: the waiter gets the slot
    thread.join(10)
    assert queued == ["waiter"]
    permits[2].ignore()
    permits[3].ignore()
    assert (limit.in_flight, limit.waiting) == (0, 0)


def test_a_shrunk_limit_does_not_hand_slots_above_it(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=4, window=None, clock=clock, max_wait=None)
    permits = [limit.acquire() for _ in range(4)]
    queued: list[str] = []
    thread = started(lambda: limit.call(queued.append, "waiter"))
    wait_for(lambda: limit.waiting == 1)
    permits[0].drop()  # limit 3 and three in flight: no room yet
    time.sleep(0.05)
    assert queued == []
    assert limit.waiting == 1
    permits[1].ignore()  # two in flight: room for the waiter
    thread.join(10)
    assert queued == ["waiter"]
    for permit in permits[2:]:
        permit.ignore()
    assert limit.in_flight == 0


def test_a_grown_limit_wakes_waiters_at_once(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=2, window=None, clock=clock, max_wait=None)
    first, second = limit.acquire(), limit.acquire()
    ran: list[int] = []
    threads = [started(functools.partial(limit.call, ran.append, i)) for i in range(2)]
    wait_for(lambda: limit.waiting == 2)
    first.success()  # inflight 1 * 2 >= 2: the limit grows to 3; a waiter takes the slot
    wait_for(lambda: len(ran) >= 1)
    second.success()  # inflight 2 * 2 >= 3: 4; the other waiter runs
    for thread in threads:
        thread.join(10)
    assert sorted(ran) == [0, 1]
    assert limit.in_flight == 0


def test_max_wait_bounds_a_waiting_thread() -> None:
    limit = rs.ConcurrencyLimit(initial=1, max_wait=0.05)
    with limit, pytest.raises(rs.LimitExceeded) as caught:
        limit.call(print, "never")
    assert 0.04 <= caught.value.waited < 2.0
    assert "after waiting" in str(caught.value)
    assert (limit.in_flight, limit.waiting) == (0, 0)


def test_max_queue_rejects_at_once() -> None:
    limit = rs.ConcurrencyLimit(initial=1, max_wait=None, max_queue=1)
    order: list[str] = []
    holder = limit.acquire()
    queued = started(lambda: limit.call(order.append, "queued"))
    wait_for(lambda: limit.waiting == 1)
    with pytest.raises(rs.LimitExceeded) as caught:
        limit.call(order.append, "rejected")
    assert caught.value.waited == 0.0
    holder.success()
    queued.join(10)
    assert order == ["queued"]


def test_a_permit_counts_once() -> None:
    limit = rs.ConcurrencyLimit(initial=2)
    permit = limit.acquire()
    assert permit.done is False
    permit.success()
    permit.drop()
    permit.ignore()
    assert limit.acquire().done is False
    assert limit.in_flight == 1  # the second permit's
    assert limit.telemetry().read()["dropped"] == 0


def test_with_blocks_nest_and_release_on_error(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=10, window=None, clock=clock)
    with limit:
        with limit:
            assert limit.in_flight == 2
        assert limit.in_flight == 1
        with pytest.raises(TimeoutError), limit:
            raise TimeoutError
    assert limit.in_flight == 0
    assert limit.limit == 9  # the TimeoutError inside was a drop
    with pytest.raises(RuntimeError, match="without a matching enter"):
        limit.__exit__(None, None, None)


def test_the_decorator_keeps_the_signature_and_counts_threads() -> None:
    limit = rs.ConcurrencyLimit(initial=4, max_wait=None, name=unique("threads"))
    running, peak = [0], [0]
    lock = threading.Lock()

    @limit
    def work(i: int) -> int:
        """Doc."""
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return i

    assert work.__name__ == "work"
    assert work.__doc__ == "Doc."
    threads = [started(functools.partial(work, i)) for i in range(20)]
    for thread in threads:
        thread.join(10)
    assert 1 <= peak[0] <= limit.limit
    assert limit.in_flight == 0
    assert limit.telemetry().read()["admitted"] == 20


def test_partitions_get_their_guaranteed_share(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit(
        initial=10, partitions={"live": 0.5, "batch": 0.2}, clock=clock, name=unique("parts")
    )
    # Shares: live ceil(10 * 0.5) = 5, batch ceil(10 * 0.2) = 2.
    batch = [limit.acquire("batch") for _ in range(10)]  # under the limit: any partition fills
    with pytest.raises(rs.LimitExceeded):
        limit.acquire("batch")  # at the limit, and batch is over its share
    with pytest.raises(rs.LimitExceeded):
        limit.acquire()  # no partition: no guarantee
    with pytest.raises(rs.LimitExceeded):
        limit.acquire("unknown")  # not configured: no guarantee either
    live = [limit.acquire("live") for _ in range(5)]  # live's share, above the limit
    assert limit.in_flight == 15
    with pytest.raises(rs.LimitExceeded):
        limit.acquire("live")
    read = limit.telemetry().read()
    assert read["partitions"] == {
        "live": {"limit": 5, "in_flight": 5},
        "batch": {"limit": 2, "in_flight": 10},
    }
    for permit in live + batch:
        permit.ignore()
    assert limit.in_flight == 0
    assert limit.telemetry().read()["partitions"]["batch"]["in_flight"] == 0


# -- the shell: async ------------------------------------------------------------------------


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling state another thread changes
            await anyio.sleep(0.001)


@anyio_test
async def test_async_calls_and_blocks(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=2, window=None, clock=clock)

    @limit
    async def work(value: int) -> int:
        clock.advance(0.01)
        await anyio.lowlevel.checkpoint()
        return value

    assert await work(5) == 5  # in flight 1 * 2 >= 2: 3
    assert limit.limit == 3
    async with limit as permit:
        assert isinstance(permit, rs.LimitPermit)
        assert limit.in_flight == 1
    with pytest.raises(TimeoutError):
        async with limit:
            raise TimeoutError
    assert limit.limit == 2  # the drop: max(1, min(2, int(2.7))) = 2
    assert limit.in_flight == 0


@anyio_test
async def test_one_limit_bounds_threads_and_tasks_together() -> None:
    limit = rs.ConcurrencyLimit(initial=4, max_wait=None)
    lock = threading.Lock()
    running, peak = [0], [0]

    def enter() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])

    def leave() -> None:
        with lock:
            running[0] -= 1

    def work_sync() -> None:
        enter()
        time.sleep(0.003)
        leave()

    async def work_async() -> None:
        enter()
        await anyio.sleep(0.003)
        leave()

    threads = [started(functools.partial(limit.call, work_sync)) for _ in range(15)]
    async with anyio.create_task_group() as tg:
        for _ in range(15):
            tg.start_soon(limit.acall, work_async)
    for thread in threads:
        await anyio.to_thread.run_sync(thread.join, 10)
    assert 1 <= peak[0] <= max(4, limit.limit)
    assert (limit.in_flight, limit.waiting) == (0, 0)
    assert limit.telemetry().read()["admitted"] == 30


@anyio_test
async def test_a_task_waits_and_a_thread_frees_its_slot() -> None:
    limit = rs.ConcurrencyLimit(initial=1, max_wait=None)
    permit = limit.acquire()
    ran: list[str] = []

    async def waiter() -> None:
        async with limit:
            ran.append("task")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: limit.waiting == 1)
        await anyio.to_thread.run_sync(permit.success)
    assert ran == ["task"]
    assert limit.in_flight == 0


@anyio_test
async def test_max_wait_bounds_a_waiting_task() -> None:
    limit = rs.ConcurrencyLimit(initial=1, max_wait=0.05)
    async with limit:
        with pytest.raises(rs.LimitExceeded) as caught:
            await limit.acall(anyio.lowlevel.checkpoint)
    assert 0.04 <= caught.value.waited < 2.0
    assert (limit.in_flight, limit.waiting) == (0, 0)


@anyio_test
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    limit = rs.ConcurrencyLimit(initial=1, max_wait=None)
    async with limit:
        async with anyio.create_task_group() as tg:
            tg.start_soon(limit.acall, anyio.lowlevel.checkpoint)
            await until(lambda: limit.waiting == 1)
            tg.cancel_scope.cancel()
        assert limit.waiting == 0
    assert limit.in_flight == 0
    assert limit.telemetry().read()["rejected"] == 0


@anyio_test
async def test_cancellation_is_no_sample_but_an_expired_deadline_is_a_drop(
    clock: FakeClock,
) -> None:
    limit = rs.ConcurrencyLimit("aimd", initial=10, window=None, clock=clock)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await limit.acall(anyio.sleep, 1)
    assert limit.limit == 10  # a caller going away says nothing
    with anyio.move_on_after(0.01):
        await limit.acall(anyio.sleep, 1)
    assert limit.limit == 9  # its deadline passed: the call was too slow
    with pytest.raises(rs.TimeoutExceeded):
        await rs.pipeline(limit, rs.Timeout(0.01)).acall(anyio.sleep, 1)
    assert limit.limit == 8
    assert limit.in_flight == 0


@anyio_test
async def test_in_a_pipeline_with_a_fallback(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit(initial=1, clock=clock, name=unique("pipe"))
    policy = rs.pipeline(rs.Fallback("shed", on=rs.LimitExceeded), limit)

    @policy
    async def work() -> str:
        return "ran"

    assert await work() == "ran"
    async with limit:
        assert await work() == "shed"
    assert policy.call(lambda: "sync") == "sync"


# -- metrics and configuration ---------------------------------------------------------------


def test_metrics(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit(initial=3, partitions={"live": 0.5}, clock=clock, name="api")
    registry = CollectorRegistry()
    Metrics(registry).watch(rs.pipeline(limit))
    limit.call(lambda: None)
    with limit, limit, limit, pytest.raises(rs.LimitExceeded):
        limit.call(lambda: None)
    with pytest.raises(TimeoutError):
        limit.call(functools.partial(raise_, TimeoutError()))
    text = generate_latest(registry).decode()
    for series in (
        'resilience_concurrency_limit{policy="api"} 3.0',
        'resilience_concurrency_in_flight{policy="api"} 0.0',
        'resilience_concurrency_queue{policy="api"} 0.0',
        'resilience_concurrency_admitted_total{policy="api"} 5.0',
        'resilience_concurrency_rejected_total{policy="api"} 1.0',
        'resilience_concurrency_dropped_total{policy="api"} 1.0',
        'resilience_concurrency_partition_limit{partition="live",policy="api"} 2.0',
        'resilience_concurrency_partition_in_flight{partition="live",policy="api"} 0.0',
    ):
        assert series in text, series


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"algorithm": "reno"}, "algorithm"),
        ({"algorithm": 3}, "algorithm"),
        ({"algorithm": AIMD(), "initial": 5}, "initial"),
        ({"initial": 0}, "initial"),
        ({"initial": 30, "max": 20}, "initial"),
        ({"min": 0}, "min"),
        ({"max": True}, "max"),
        ({"initial": 2.5}, "initial"),
        ({"window": -1}, "window"),
        ({"window": math.inf}, "window"),
        ({"window": "1"}, "window"),
        ({"min_samples": 0}, "min_samples"),
        ({"max_wait": -1}, "max_wait"),
        ({"max_wait": math.nan}, "max_wait"),
        ({"max_queue": -1}, "max_queue"),
        ({"drop_on": 3}, "drop_on"),
        ({"partitions": ["a"]}, "partitions"),
        ({"partitions": {"a": 1.5}}, "partitions"),
        ({"partitions": {"a": 0.6, "b": 0.6}}, "partitions"),
        ({"partitions": {"": 0.1}}, "partitions"),
        ({"name": ""}, "name"),
        ({"clock": object()}, "clock"),
    ],
)
def test_nonsense_is_refused_at_construction(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises((TypeError, ValueError), match=field):
        rs.ConcurrencyLimit(**kwargs)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: AIMD(backoff_ratio=1.0), "backoff_ratio"),
        (lambda: AIMD(backoff_ratio=0.4), "backoff_ratio"),
        (lambda: AIMD(timeout=0), "timeout"),
        (lambda: Vegas(smoothing=0), "smoothing"),
        (lambda: Vegas(probe_multiplier=0), "probe_multiplier"),
        (lambda: Vegas(random=3), "random"),  # type: ignore[arg-type]
        (lambda: Gradient2(smoothing=1.5), "smoothing"),
        (lambda: Gradient2(queue_size=-1), "queue_size"),
        (lambda: Gradient2(long_window=0), "long_window"),
        (lambda: LatencySketch(0), "size"),
        (lambda: LatencySketch(10, min_samples=11), "min_samples"),
    ],
)
def test_algorithms_refuse_nonsense(make: Callable[[], object], field: str) -> None:
    with pytest.raises((TypeError, ValueError), match=field):
        make()


def test_an_algorithm_object_brings_its_own_bounds(clock: FakeClock) -> None:
    limit = rs.ConcurrencyLimit(Vegas(initial=50, min=10, max=60), clock=clock)
    assert limit.limit == 50
    assert "Vegas" in repr(limit)


# -- helpers --------------------------------------------------------------------------------


def started(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    ends = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < ends, "condition not met in time"
        time.sleep(0.001)
