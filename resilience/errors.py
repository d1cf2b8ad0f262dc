"""Exceptions raised by resilience. All subclass :class:`ResilienceError`."""

from __future__ import annotations

__all__ = [
    "BulkheadFull",
    "CircuitOpenError",
    "RateLimited",
    "ResilienceError",
    "TimeoutExceeded",
]


class ResilienceError(Exception):
    """Base class of every exception this package raises on purpose."""


class CircuitOpenError(ResilienceError):
    """A circuit breaker rejected the call without running it.

    A fresh instance is raised for every rejection, so tracebacks never pile up
    on a shared object while a breaker stays open.
    """

    __slots__ = ("name", "retry_after", "state")

    def __init__(self, name: str, retry_after: float, state: str = "open") -> None:
        # BaseException.__new__ has already stored args; skipping super() keeps rejection cheap.
        self.name = name
        #: Seconds until the breaker lets a probe through (0.0 when probes are busy).
        self.retry_after = retry_after
        #: The breaker's state when it refused: "open", or "half_open" when every probe
        #: slot was taken.
        self.state = state

    def __str__(self) -> str:
        if self.state == "half_open":
            return (
                f"circuit {self.name!r} is half-open and no probe slot is free "
                f"(probes in flight); retry after {self.retry_after:.3f}s"
            )
        return f"circuit {self.name!r} is open; retry after {self.retry_after:.3f}s"


class RateLimited(ResilienceError):
    """A rate limiter refused the call; ``retry_after`` says when enough tokens exist."""

    __slots__ = ("key", "retry_after")

    def __init__(self, retry_after: float, key: str | None = None) -> None:
        super().__init__(retry_after, key)
        self.retry_after = retry_after
        self.key = key

    def __str__(self) -> str:
        where = f" for {self.key!r}" if self.key is not None else ""
        return f"rate limited{where}; retry after {self.retry_after:.3f}s"


class TimeoutExceeded(ResilienceError, TimeoutError):
    """A call ran past its :class:`~resilience.Timeout` (or an enclosing deadline).

    A ``TimeoutError``, so code that catches the built-in one catches this too, and a
    breaker counts it as a failure. ``seconds`` is the limit that was exceeded.
    """

    def __init__(self, seconds: float, name: str = "timeout") -> None:
        super().__init__(seconds, name)
        self.seconds = seconds
        self.name = name

    def __str__(self) -> str:
        return f"{self.name!r}: the call did not finish within {self.seconds:.3f}s"


class BulkheadFull(ResilienceError):
    """A :class:`~resilience.Bulkhead` had no free slot (and no room or time to wait)."""

    def __init__(self, name: str, max_concurrent: int, waited: float = 0.0) -> None:
        super().__init__(name, max_concurrent, waited)
        self.name = name
        self.max_concurrent = max_concurrent
        #: Seconds this caller waited for a slot before giving up (0.0: rejected at once).
        self.waited = waited

    def __str__(self) -> str:
        how = f" after waiting {self.waited:.3f}s" if self.waited else ""
        return f"bulkhead {self.name!r} is full ({self.max_concurrent} running){how}"
