"""The pure breaker policy: decisions as a function of outcomes and ``now``."""

from __future__ import annotations

import math

import pytest

from resilience.breaker.policy import (
    TRANSITIONS,
    BreakerConfig,
    BreakerMode,
    BreakerPolicy,
    CallFinished,
    CallRejected,
    CircuitState,
    FailureRate,
    Outcome,
    SlowCallRate,
    StateChanged,
    Trigger,
)

C, O, H = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN  # noqa: E741
OK, FAIL, IGN = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED


def policy(**kw: object) -> BreakerPolicy:
    kw.setdefault("name", "p")
    return BreakerPolicy(BreakerConfig(**kw))  # type: ignore[arg-type]


def call(p: BreakerPolicy, outcome: Outcome, now: float, duration: float | None = None) -> None:
    admission = p.admit(now)
    assert isinstance(admission, tuple), f"rejected at {now}"
    p.record(admission, outcome, now, duration)


def trip(p: BreakerPolicy, now: float = 0.0) -> None:
    while p.state is C:
        call(p, FAIL, now)


def test_consecutive_failures_trip_and_success_resets_the_count() -> None:
    p = policy(failure_threshold=3)
    call(p, FAIL, 0)
    call(p, FAIL, 0)
    call(p, OK, 0)
    call(p, FAIL, 0)
    call(p, FAIL, 0)
    assert p.state is C
    call(p, FAIL, 0)
    assert p.state is O


def test_open_rejects_with_exact_retry_after_then_half_opens() -> None:
    p = policy(failure_threshold=1, recovery_timeout=10.0)
    trip(p, now=100.0)
    assert p.admit(103.5) == pytest.approx(6.5)
    assert p.retry_after(104.0) == pytest.approx(6.0)
    admission = p.admit(110.0)
    assert isinstance(admission, tuple)
    assert p.state is H


def test_half_open_admits_only_max_calls_and_rejects_the_rest() -> None:
    p = policy(failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=3)
    trip(p)
    admitted = [p.admit(1.0) for _ in range(10)]
    assert sum(isinstance(a, tuple) for a in admitted) == 3
    assert all(a == 0.0 for a in admitted[3:])


def test_success_threshold_closes_and_one_failure_reopens() -> None:
    p = policy(failure_threshold=1, recovery_timeout=1.0, success_threshold=2)
    trip(p)
    call(p, OK, 1.0)
    assert p.state is H
    call(p, OK, 1.0)
    assert p.state is C
    trip(p, now=2.0)
    call(p, OK, 3.0)
    call(p, FAIL, 3.0)
    assert p.state is O
    assert p.open_until == pytest.approx(4.0)


def test_ignored_probe_frees_its_slot_without_counting() -> None:
    p = policy(failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=1)
    trip(p)
    a = p.admit(1.0)
    assert isinstance(a, tuple)
    assert p.admit(1.0) == 0.0
    p.record(a, IGN, 1.0, None)
    assert p.state is H
    assert p.half_open_successes == 0
    assert isinstance(p.admit(1.0), tuple)


def test_hung_probe_lease_expires_and_its_late_result_is_ignored() -> None:
    p = policy(failure_threshold=1, recovery_timeout=1.0, probe_lease=5.0, success_threshold=1)
    trip(p)
    hung = p.admit(1.0)
    assert isinstance(hung, tuple)
    assert p.admit(5.9) == 0.0  # lease still held
    fresh = p.admit(6.0)  # lease ran out: the slot is given back
    assert isinstance(fresh, tuple)
    p.record(hung, FAIL, 7.0, None)  # the hung probe finally fails: too late to count
    assert p.state is H
    p.record(fresh, OK, 7.0, None)
    assert p.state is C


def test_call_from_before_a_trip_cannot_close_or_reopen() -> None:
    p = policy(failure_threshold=2, recovery_timeout=1.0, success_threshold=1)
    slow_call = p.admit(0.0)
    assert isinstance(slow_call, tuple)
    trip(p)
    probe = p.admit(1.0)
    assert isinstance(probe, tuple)
    p.record(slow_call, OK, 1.0, None)  # started while closed: stale
    assert p.state is H
    p.record(slow_call, FAIL, 1.0, None)
    assert p.state is H
    p.record(probe, OK, 1.0, None)
    assert p.state is C


def test_failure_rate_over_a_count_window_needs_minimum_calls() -> None:
    p = policy(failure_rate=FailureRate(0.5, window=10, minimum_calls=6), failure_threshold=None)
    for _ in range(4):
        call(p, FAIL, 0)
    assert p.state is C  # 4 of 4 failed, but fewer than minimum_calls
    call(p, OK, 0)
    assert p.state is C
    call(p, OK, 0)  # 4 of 6 >= 50%
    assert p.state is O


def test_count_window_slides() -> None:
    p = policy(failure_rate=FailureRate(0.5, window=4, minimum_calls=4), failure_threshold=None)
    for outcome in (FAIL, OK, OK, OK, OK, FAIL, OK):
        call(p, outcome, 0)
    assert p.state is C  # last four: OK OK FAIL OK = 25%
    call(p, FAIL, 0)  # last four: OK FAIL OK FAIL = 50%
    assert p.state is O


def test_time_window_forgets_old_calls() -> None:
    rule = FailureRate(0.5, minimum_calls=4, window_seconds=10.0)
    p = policy(failure_rate=rule, failure_threshold=None)
    for _ in range(3):
        call(p, FAIL, 0.0)
    for _ in range(4):
        call(p, OK, 11.0)  # the failures at t=0 left the window
    call(p, FAIL, 11.0)
    assert p.state is C  # 1 of 5
    call(p, FAIL, 12.0)
    call(p, FAIL, 12.0)
    assert p.state is C  # 3 of 7
    call(p, FAIL, 12.0)
    assert p.state is O  # 4 of 8


def test_slow_call_rate_trips_and_a_slow_probe_reopens() -> None:
    rule = SlowCallRate(0.5, duration=2.0, window=4, minimum_calls=4)
    p = policy(slow_call_rate=rule, failure_threshold=None, recovery_timeout=1.0)
    call(p, OK, 0, duration=0.1)
    call(p, OK, 0, duration=0.1)
    call(p, OK, 0, duration=2.5)
    assert p.state is C
    call(p, OK, 0, duration=3.0)
    assert p.state is O
    call(p, OK, 1.0, duration=5.0)  # a slow probe counts as a failed probe
    assert p.state is O


def test_recovery_timeout_grows_exponentially_up_to_the_cap() -> None:
    p = policy(
        failure_threshold=1, recovery_timeout=1.0, recovery_backoff=2.0, max_recovery_timeout=5.0
    )
    now = 0.0
    trip(p, now)
    waits = []
    for _ in range(5):
        waits.append(p.open_until - now)
        now = p.open_until
        call(p, FAIL, now)  # the probe fails: open again, for longer
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    call(p, OK, p.open_until)
    call(p, OK, p.open_until)
    assert p.state is C
    trip(p, now=100.0)
    assert p.open_until == pytest.approx(101.0)  # closing resets the backoff


def test_operator_modes() -> None:
    p = policy(failure_threshold=1)
    p.force_open(0.0)
    assert (p.state, p.mode) == (O, BreakerMode.FORCED_OPEN)
    assert p.admit(1e9) == pytest.approx(p.config.recovery_timeout)  # never half-opens
    p.force_closed(0.0)
    for _ in range(10):
        call(p, FAIL, 0)
    assert (p.state, p.failures) == (C, 0)
    p.disable(0.0)
    for _ in range(10):
        call(p, FAIL, 0)
    assert (p.state, p.failures) == (C, 10)  # counted, never tripped
    p.reset(0.0)
    assert (p.state, p.mode, p.failures, p.rejected) == (C, BreakerMode.NORMAL, 0, 0)
    call(p, FAIL, 0)
    assert p.state is O


def test_events_come_in_transition_order() -> None:
    p = policy(failure_threshold=1, recovery_timeout=1.0, success_threshold=1)
    p.set_observation(observed=True, timed=True, record_successes=False)
    call(p, FAIL, 0.0, 0.1)
    p.admit(0.5)
    call(p, OK, 1.0, 0.1)
    kinds = [
        (type(e).__name__, getattr(e, "new", None) or getattr(e, "outcome", None)) for e in p.events
    ]
    assert kinds == [
        ("CallFinished", FAIL),
        ("StateChanged", O),
        ("CallRejected", None),
        ("StateChanged", H),
        ("CallFinished", OK),
        ("StateChanged", C),
    ]
    assert isinstance(p.events[2], CallRejected)
    assert p.events[2].retry_after == pytest.approx(0.5)
    assert isinstance(p.events[0], CallFinished)
    assert isinstance(p.events[1], StateChanged)
    assert p.events[1].trigger is Trigger.TRIP


def test_transition_table_covers_every_operator_trigger_from_every_state() -> None:
    for state in CircuitState:
        for trigger in (Trigger.FORCE_OPEN, Trigger.FORCE_CLOSED, Trigger.DISABLE, Trigger.RESET):
            assert (state, trigger) in TRANSITIONS
    assert TRANSITIONS[(C, Trigger.TRIP)] is O
    assert (O, Trigger.TRIP) not in TRANSITIONS


def test_fast_path_flags_follow_state() -> None:
    p = policy(failure_threshold=2, recovery_timeout=1.0)
    assert (p.free, p.quiet, p.reject_until) == ((0, 0, 0), True, -math.inf)
    call(p, FAIL, 0)
    assert p.quiet is False  # a success must now reset the count
    call(p, FAIL, 0)
    assert (p.free, p.reject_until) == (None, 1.0)
    p.set_observation(observed=True, timed=True, record_successes=False)
    assert p.reject_until == -math.inf  # observed rejections go through the lock


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": -1}, "failure_threshold"),
        ({"failure_threshold": 2.5}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"recovery_timeout": 0}, "recovery_timeout"),
        ({"recovery_timeout": float("nan")}, "recovery_timeout"),
        ({"recovery_timeout": -3}, "recovery_timeout"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"recovery_backoff": 0.5}, "recovery_backoff"),
        ({"max_recovery_timeout": 1.0, "recovery_timeout": 5.0}, "max_recovery_timeout"),
        ({"probe_lease": 0}, "probe_lease"),
        ({"name": ""}, "name"),
        ({"failure_threshold": None}, "failure_threshold=None"),
        ({"failure_rate": 0.5}, "failure_rate"),
    ],
)
def test_bad_config_names_the_parameter(kwargs: dict[str, object], message: str) -> None:
    kwargs.setdefault("name", "p")
    with pytest.raises((ValueError, TypeError), match=message):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: FailureRate(1.5), "threshold"),
        (lambda: FailureRate(0), "threshold"),
        (lambda: FailureRate(float("nan")), "threshold"),
        (lambda: FailureRate(0.5, window=10, minimum_calls=20), "window"),
        (lambda: FailureRate(0.5, minimum_calls=0), "minimum_calls"),
        (lambda: FailureRate(0.5, window_seconds=-1), "window_seconds"),
        (lambda: SlowCallRate(0.5, duration=0), "duration"),
        (lambda: SlowCallRate(2, duration=1), "threshold"),
    ],
)
def test_bad_rate_rules_name_the_parameter(factory: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        factory()  # type: ignore[operator]
