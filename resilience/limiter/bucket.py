"""Token-bucket math, pure: no clock, no lock, no I/O.

A bucket of ``capacity`` tokens refills at ``rate`` tokens per second. Its whole state
is one number, ``full_at``: the time at which it will be full again (the GCRA
"theoretical arrival time"). Tokens available at ``now`` are
``capacity - max(0, full_at - now) * rate``. A bucket with ``full_at <= now`` is full and
carries no information, so forgetting it (eviction, key expiry) is exact.

The Redis script (``token_bucket.lua``) implements the same rules; the contract tests
run both against the same cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = ["Decision", "Limit", "combine", "decide", "from_wait"]

# Floating-point slack when comparing times (seconds). Far below any real rate's
# token interval, so it cannot admit a whole extra token.
EPSILON: Final = 1e-9


class Decision(NamedTuple):
    """The answer to one request for tokens. Truthy exactly when ``allowed``."""

    allowed: bool
    #: Whole tokens left after this decision.
    remaining: int
    #: Seconds until the request would be allowed (0.0 when allowed).
    retry_after: float
    #: Seconds until the bucket is full again.
    reset_after: float
    #: The bucket's capacity.
    limit: int

    def __bool__(self) -> bool:
        return self.allowed


#: The longest an empty bucket may take to fill, in seconds: 2^53 microseconds.
MAX_FILL_TIME: Final = 2.0**53 / 1e6

# Building the tuple directly skips NamedTuple's keyword-handling __new__ (half the cost).
_new_decision = tuple.__new__


def _positive_number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Limit:
    """``capacity`` tokens, refilled at ``rate`` tokens per second."""

    rate: float
    capacity: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", _positive_number("rate", self.rate))
        object.__setattr__(self, "capacity", _positive_number("capacity", self.capacity))
        # Every wait is at most the fill time; in microseconds it must stay an exact
        # integer for Redis (2^53), and finite at all (a rate of 5e-324 overflows).
        if not self.capacity / self.rate <= MAX_FILL_TIME:
            raise ValueError(
                f"rate {self.rate!r} is too slow for capacity {self.capacity:g}: an empty "
                f"bucket would take {self.capacity / self.rate:g} s to fill "
                f"(at most {MAX_FILL_TIME:g} s, about 285 years)"
            )

    @property
    def fill_time(self) -> float:
        """Seconds an empty bucket takes to fill."""
        return self.capacity / self.rate

    def check_cost(self, cost: object) -> float:
        c = _positive_number("cost", cost)
        if c > self.capacity:
            raise ValueError(
                f"cost {cost!r} is above capacity {self.capacity:g}: it could never be allowed"
            )
        return c

    def __str__(self) -> str:
        return f"{self.capacity:g}@{self.rate:g}/s"


def decide(
    full_at: float | None, now: float, cost: float, rate: float, capacity: float
) -> tuple[Decision, float | None]:
    """Decide one request. Returns the decision and the new ``full_at`` (None: unchanged)."""
    base = now if full_at is None or full_at < now else full_at
    after = base + cost / rate
    fill_time = capacity / rate
    if after - now <= fill_time + EPSILON:
        left = capacity - (after - now) * rate
        return _new_decision(
            Decision, (True, int(left + EPSILON), 0.0, after - now, int(capacity))
        ), after
    left = capacity - (base - now) * rate
    return _new_decision(
        Decision,
        (False, int(left + EPSILON), after - now - fill_time, base - now, int(capacity)),
    ), None


def from_wait(wait: float, cost: float, rate: float, capacity: float, taken: bool) -> Decision:
    """The decision for a bucket that needed ``wait`` seconds to be full before the request.

    This is what the Redis script reports; ``taken`` says whether the tokens were taken.
    """
    after = wait + cost / rate
    if taken:
        return _new_decision(
            Decision, (True, int(capacity - after * rate + EPSILON), 0.0, after, int(capacity))
        )
    return _new_decision(
        Decision,
        (
            False,
            int(capacity - wait * rate + EPSILON),
            max(0.0, after - capacity / rate),
            wait,
            int(capacity),
        ),
    )


def combine(decisions: list[Decision]) -> Decision:
    """One decision for several limits checked together: the most restrictive wins.

    When denied, nothing was consumed, so only the limits that denied are described.
    """
    if len(decisions) == 1:
        return decisions[0]
    allowed = all(d.allowed for d in decisions)
    if not allowed:
        decisions = [d for d in decisions if not d.allowed]
    tightest = min(decisions, key=lambda d: d.remaining)
    return _new_decision(
        Decision,
        (
            allowed,
            tightest.remaining,
            0.0 if allowed else max(d.retry_after for d in decisions),
            max(d.reset_after for d in decisions),
            tightest.limit,
        ),
    )
