"""A breaker's configuration: frozen, checked once at construction, naming the parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BreakerConfig", "FailureRate", "SlowCallRate"]


def _check_window(
    owner: str, window: int, minimum_calls: int, window_seconds: float | None
) -> None:
    if isinstance(minimum_calls, bool) or not isinstance(minimum_calls, int):
        raise TypeError(f"{owner}: minimum_calls must be an int, got {minimum_calls!r}")
    if minimum_calls < 1:
        raise ValueError(f"{owner}: minimum_calls must be >= 1, got {minimum_calls}")
    if window_seconds is None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{owner}: window must be an int number of calls, got {window!r}")
        if window < minimum_calls:
            raise ValueError(
                f"{owner}: window ({window} calls) must be >= minimum_calls ({minimum_calls})"
            )
    elif not _positive(window_seconds):
        raise ValueError(
            f"{owner}: window_seconds must be a positive number, got {window_seconds!r}"
        )


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_rate(owner: str, threshold: float) -> None:
    if not _positive(threshold) or threshold > 1:
        raise ValueError(f"{owner}: threshold must be in (0, 1], got {threshold!r}")


@dataclass(frozen=True, slots=True)
class FailureRate:
    """Trip when the share of failed calls in a sliding window reaches ``threshold``.

    The window holds the last ``window`` calls, or, when ``window_seconds`` is given,
    the calls of the last ``window_seconds`` seconds. It is judged only once it holds
    ``minimum_calls`` calls.
    """

    threshold: float
    window: int = 100
    minimum_calls: int = 20
    window_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_rate("FailureRate", self.threshold)
        _check_window("FailureRate", self.window, self.minimum_calls, self.window_seconds)


@dataclass(frozen=True, slots=True)
class SlowCallRate:
    """Trip when the share of calls slower than ``duration`` seconds reaches ``threshold``.

    In half-open, a slow probe counts as a failed probe.
    """

    threshold: float
    duration: float
    window: int = 100
    minimum_calls: int = 20
    window_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_rate("SlowCallRate", self.threshold)
        if not _positive(self.duration):
            raise ValueError(
                f"SlowCallRate: duration must be a positive number, got {self.duration!r}"
            )
        _check_window("SlowCallRate", self.window, self.minimum_calls, self.window_seconds)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    name: str
    failure_threshold: int | None = 5
    recovery_timeout: float = 30.0
    success_threshold: int = 2
    half_open_max_calls: int = 1
    failure_rate: FailureRate | None = None
    slow_call_rate: SlowCallRate | None = None
    recovery_backoff: float = 1.0
    max_recovery_timeout: float | None = None
    probe_lease: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for field in ("success_threshold", "half_open_max_calls"):
            _check_count(field, getattr(self, field))
        if self.failure_threshold is not None:
            _check_count("failure_threshold", self.failure_threshold)
        if (
            self.failure_threshold is None
            and self.failure_rate is None
            and self.slow_call_rate is None
        ):
            raise ValueError(
                "failure_threshold=None needs failure_rate or slow_call_rate, "
                "or the breaker could never open"
            )
        for field in ("recovery_timeout",):
            if not _positive(getattr(self, field)):
                raise ValueError(
                    f"{field} must be a positive number of seconds, got {getattr(self, field)!r}"
                )
        if not _positive(self.recovery_backoff) or self.recovery_backoff < 1:
            raise ValueError(
                f"recovery_backoff must be a number >= 1, got {self.recovery_backoff!r}"
            )
        if self.max_recovery_timeout is not None and (
            not _positive(self.max_recovery_timeout)
            or self.max_recovery_timeout < self.recovery_timeout
        ):
            raise ValueError(
                "max_recovery_timeout must be a number >= recovery_timeout, got "
                f"{self.max_recovery_timeout!r}"
            )
        if self.probe_lease is not None and not _positive(self.probe_lease):
            raise ValueError(
                f"probe_lease must be a positive number of seconds, got {self.probe_lease!r}"
            )
        if self.failure_rate is not None and not isinstance(self.failure_rate, FailureRate):
            raise TypeError(
                f"failure_rate must be a FailureRate, got {type(self.failure_rate).__name__}"
            )
        # Ints are valid input; store floats so every retry_after the policy returns is one.
        for field in (
            "recovery_timeout",
            "recovery_backoff",
            "max_recovery_timeout",
            "probe_lease",
        ):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, float(value))
        if self.slow_call_rate is not None and not isinstance(self.slow_call_rate, SlowCallRate):
            raise TypeError(
                f"slow_call_rate must be a SlowCallRate, got {type(self.slow_call_rate).__name__}"
            )

    @property
    def lease(self) -> float:
        return self.probe_lease if self.probe_lease is not None else self.recovery_timeout

    def recovery_for(self, trips: int) -> float:
        """Open duration after the ``trips``-th consecutive trip (1-based)."""
        if self.recovery_backoff == 1.0:
            return self.recovery_timeout
        # Cap the exponent so a long outage cannot overflow the float.
        t = self.recovery_timeout * self.recovery_backoff ** min(trips - 1, 64)
        cap = self.max_recovery_timeout
        return t if cap is None else min(t, cap)


def _check_count(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{field} must be >= 1, got {value}")
