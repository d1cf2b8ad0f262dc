"""Token-bucket math: exact, pure, and never over the limit."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.limiter.bucket import Decision, Limit, combine, decide


def run(
    limit: Limit, requests: Sequence[tuple[float, float]]
) -> list[tuple[float, float, Decision]]:
    """Feed (time, cost) requests through decide(); return (time, cost, decision)."""
    full_at: float | None = None
    out = []
    for now, cost in requests:
        d, new = decide(full_at, now, cost, limit.rate, limit.capacity)
        if new is not None:
            full_at = new
        out.append((now, cost, d))
    return out


def test_a_full_bucket_allows_capacity_then_denies_with_exact_retry_after() -> None:
    limit = Limit(rate=10.0, capacity=5)
    decisions = [d for _, _, d in run(limit, [(0.0, 1)] * 6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    denied = decisions[-1]
    assert denied.retry_after == pytest.approx(0.1)  # one token at 10/s
    assert denied.reset_after == pytest.approx(0.5)  # five tokens to refill
    assert not denied
    assert decisions[0]


def test_refill_is_linear_and_capped_at_capacity() -> None:
    limit = Limit(rate=2.0, capacity=4)
    out = run(limit, [(0.0, 4), (0.5, 1), (0.5, 1), (100.0, 4), (100.0, 1)])
    assert [d.allowed for _, _, d in out] == [True, True, False, True, False]
    assert out[2][2].retry_after == pytest.approx(0.5)


def test_weighted_cost_waits_for_enough_tokens() -> None:
    limit = Limit(rate=1.0, capacity=10)
    out = run(limit, [(0.0, 8), (0.0, 5), (3.0, 5)])
    assert [d.allowed for _, _, d in out] == [True, False, True]
    assert out[1][2].retry_after == pytest.approx(3.0)
    assert out[2][2].remaining == 0


def test_fractional_rates_and_capacities() -> None:
    limit = Limit(rate=0.5, capacity=1.5)
    out = run(limit, [(0.0, 1), (0.0, 1), (1.0, 1)])
    assert [d.allowed for _, _, d in out] == [True, False, True]
    assert out[1][2].retry_after == pytest.approx(1.0)


def test_denied_decisions_do_not_consume() -> None:
    limit = Limit(rate=1.0, capacity=2)
    out = run(limit, [(0.0, 2)] + [(0.0, 1)] * 50 + [(1.0, 1)])
    assert out[-1][2].allowed  # 50 denials took nothing


def test_combine_takes_the_most_restrictive_and_describes_only_deniers() -> None:
    ok = Decision(True, 7, 0.0, 0.3, 10)
    tight = Decision(True, 2, 0.0, 9.0, 1000)
    no = Decision(False, 0, 4.0, 5.0, 5)
    assert combine([ok, tight]) == Decision(True, 2, 0.0, 9.0, 1000)
    assert combine([ok, no, tight]) == Decision(False, 0, 4.0, 5.0, 5)
    assert combine([ok]) is ok


@pytest.mark.parametrize(
    ("rate", "capacity", "message"),
    [
        (0, 1, "rate"),
        (-1, 1, "rate"),
        (float("nan"), 1, "rate"),
        (float("inf"), 1, "rate"),
        (True, 1, "rate"),
        ("10", 1, "rate"),
        (1, 0, "capacity"),
        (1, -5, "capacity"),
        (1, float("nan"), "capacity"),
    ],
)
def test_bad_limits_name_the_parameter(rate: object, capacity: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Limit(rate, capacity)  # type: ignore[arg-type]


def test_bad_costs() -> None:
    limit = Limit(1, 5)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cost"):
            limit.check_cost(bad)
    with pytest.raises(ValueError, match="above capacity"):
        limit.check_cost(6)
    with pytest.raises(TypeError, match="cost"):
        limit.check_cost("1")


requests = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=2, allow_nan=False),  # time since last request
        st.sampled_from([1, 1, 1, 2, 3, 0.5]),
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 250.0]),
    capacity=st.sampled_from([1, 3, 5, 10.5, 100]),
    gaps=requests,
)
def test_never_admits_more_than_capacity_plus_rate_times_elapsed(
    rate: float, capacity: float, gaps: list[tuple[float, float]]
) -> None:
    limit = Limit(rate, capacity)
    now, timeline = 0.0, []
    for gap, cost in gaps:
        now += gap
        timeline.append((now, min(cost, capacity)))
    out = run(limit, timeline)
    admitted = [(t, c) for t, c, d in out if d.allowed]
    # Over every window [t_i, t_j] of admitted requests, the bound holds.
    for i in range(len(admitted)):
        total = 0.0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            elapsed = admitted[j][0] - admitted[i][0]
            assert total <= capacity + rate * elapsed + 1e-6


@settings(max_examples=300, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    capacity=st.sampled_from([1, 2, 5, 10]),
    gaps=requests,
)
def test_matches_a_naive_token_counter(
    rate: float, capacity: float, gaps: list[tuple[float, float]]
) -> None:
    """Admit exactly when a plain token counter has the tokens; retry_after is exact."""
    tokens, last, now = float(capacity), 0.0, 0.0
    full_at: float | None = None
    for gap, raw_cost in gaps:
        cost = min(raw_cost, capacity)
        now += gap
        tokens = min(capacity, tokens + (now - last) * rate)
        last = now
        d, new = decide(full_at, now, cost, rate, capacity)
        if new is not None:
            full_at = new
        if abs(tokens - cost) >= 1e-6:  # on the boundary, rounding may go either way
            assert d.allowed == (tokens >= cost)
        if d.allowed:
            tokens -= cost
            assert d.remaining == math.floor(tokens + 1e-9)
        else:
            assert d.retry_after == pytest.approx((cost - tokens) / rate, abs=1e-6)
            tokens_then = tokens + d.retry_after * rate
            assert tokens_then == pytest.approx(cost, abs=1e-6)
        assert d.reset_after == pytest.approx((capacity - tokens) / rate, abs=1e-6)
