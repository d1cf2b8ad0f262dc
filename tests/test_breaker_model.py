"""Hypothesis drives a real breaker and a small reference model side by side."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import resilience as rs
from resilience.testing import FakeClock


@dataclass
class Model:
    """The breaker as the docs describe it, written the obvious way."""

    threshold: int
    timeout: float
    needed: int
    max_probes: int
    lease: float
    state: str = "closed"
    failures: int = 0
    successes: int = 0
    open_until: float = 0.0
    gen: int = 0
    next_token: int = 1
    probes: dict[int, float] = field(default_factory=dict)

    def move(self, state: str, now: float) -> None:
        self.state, self.gen, self.probes, self.successes = state, self.gen + 1, {}, 0
        if state == "open":
            self.open_until = now + self.timeout
        if state == "closed":
            self.failures = 0

    def catch_up(self, now: float) -> None:
        if self.state == "open" and now >= self.open_until:
            self.move("half_open", now)

    def admit(self, now: float) -> tuple[int, int] | None:
        self.catch_up(now)
        if self.state == "closed":
            return (self.gen, 0)
        if self.state == "open":
            return None
        self.probes = {t: d for t, d in self.probes.items() if d > now}
        if len(self.probes) >= self.max_probes:
            return None
        token, self.next_token = self.next_token, self.next_token + 1
        self.probes[token] = now + self.lease
        return (self.gen, token)

    def record(self, permit: tuple[int, int], outcome: str, now: float) -> None:
        gen, token = permit
        if gen != self.gen:
            return
        if token:
            deadline = self.probes.pop(token, None)
            if deadline is None or deadline <= now:
                return  # reported after its lease ended
        if outcome == "ignore":
            return
        if self.state == "half_open":
            if outcome == "failure":
                self.failures += 1  # a failed probe is one more failure in a row
                self.move("open", now)
            else:
                self.failures = 0
                self.successes += 1
                if self.successes >= self.needed:
                    self.move("closed", now)
        elif outcome == "failure":
            self.failures += 1
            if self.failures >= self.threshold:
                self.move("open", now)
        else:
            self.failures = 0


class BreakerMachine(RuleBasedStateMachine):
    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = Model(threshold=3, timeout=10.0, needed=2, max_probes=2, lease=4.0)
        self.breaker = rs.CircuitBreaker(
            "model",
            failure_threshold=3,
            recovery_timeout=10.0,
            success_threshold=2,
            half_open_max_calls=2,
            probe_lease=4.0,
            clock=self.clock,
        )

    @rule(target=permits)
    def acquire(self) -> object:
        now = self.clock.monotonic()
        expected = self.model.admit(now)
        permit = self.breaker.try_acquire()
        assert (permit is None) == (expected is None)
        return (permit, expected)

    @rule(pair=consumes(permits), outcome=st.sampled_from(["success", "failure", "ignore"]))
    def finish(self, pair: tuple[rs.Permit | None, tuple[int, int] | None], outcome: str) -> None:
        permit, expected = pair
        if permit is None or expected is None:
            return
        self.model.record(expected, outcome, self.clock.monotonic())
        getattr(permit, outcome)()

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 4.0, 10.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def same_state(self) -> None:
        self.model.catch_up(self.clock.monotonic())
        assert self.breaker.state.value == self.model.state
        stats = self.breaker.stats()
        assert stats.probes_in_flight <= 2
        assert stats.consecutive_failures == self.model.failures


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestBreakerAgainstModel = BreakerMachine.TestCase
