"""A remote backend (Redis) behind a time budget, a circuit breaker and a fallback policy.

While the remote is healthy, calls go through the breaker's lock-free closed path. When
it fails, the caller gets ``UNAVAILABLE`` and applies its documented policy; once the
breaker opens, that answer costs a float comparison instead of a socket timeout. Each
transition is logged once and reported to listeners.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from resilience.breaker import CircuitBreaker, StateChanged
from resilience.breaker.policy import CircuitState
from resilience.errors import CircuitOpenError
from resilience.events import Listener

__all__ = ["UNAVAILABLE", "BackendStateChanged", "OnError", "RemoteGuard"]

log = logging.getLogger("resilience")
T = TypeVar("T")


class OnError(enum.Enum):
    """What a limiter or cache does while its remote backend is unavailable."""

    FAIL_OPEN = "fail_open"  # allow / treat as a miss
    FAIL_CLOSED = "fail_closed"  # deny
    LOCAL = "local"  # decide in process memory with the same parameters

    @classmethod
    def parse(cls, value: object, field: str = "on_error") -> OnError:
        try:
            return cls(value.value if isinstance(value, OnError) else value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{field} must be one of {choices}, got {value!r}") from None


class _Unavailable(enum.Enum):
    UNAVAILABLE = "unavailable"


#: What RemoteGuard returns instead of a result when the backend could not answer.
UNAVAILABLE: Final = _Unavailable.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class BackendStateChanged:
    backend: str
    available: bool
    on_error: OnError
    error: BaseException | None


class RemoteGuard:
    def __init__(
        self,
        name: str,
        *,
        errors: tuple[type[BaseException], ...],
        on_error: OnError,
        breaker: CircuitBreaker | None,
        listeners: list[Listener[BackendStateChanged]],
    ) -> None:
        self.name = name
        self.on_error = on_error
        self._errors = errors
        self._unavailable: tuple[type[BaseException], ...] = (CircuitOpenError, *errors)
        self._listeners = listeners
        self._last_error: BaseException | None = None
        self._reported_available = True
        # Plain counters for metrics, read at scrape time. A lost increment under a race
        # costs one count in a figure that only ever grows during outages.
        self.errors = 0
        self.fallbacks = 0
        self.breaker = breaker or CircuitBreaker(
            f"backend:{name}",
            failure_threshold=3,
            recovery_timeout=1.0,
            success_threshold=1,
            include=errors,
        )
        if not isinstance(self.breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        # State changes only: the breaker keeps its lock-free path for healthy calls.
        self.breaker.add_listener(self._on_breaker_event, only=(StateChanged,))

    def add_listener(self, listener: Listener[BackendStateChanged]) -> None:
        """Hear of every outage and recovery (one event each)."""
        self._listeners.append(listener)

    @property
    def available(self) -> bool:
        return self.breaker.state is not CircuitState.OPEN

    def _on_breaker_event(self, event: object) -> None:
        # One report per outage: a failed half-open probe reopens the breaker, but the
        # backend was never back, so that is not a new outage.
        if not isinstance(event, StateChanged):
            return
        if event.new is CircuitState.OPEN and self._reported_available:
            self._reported_available = False
            error = self._last_error
            log.warning(
                "resilience backend %r unavailable (%s); %s until it recovers",
                self.name,
                _describe(error),
                self.on_error.value,
            )
            change = BackendStateChanged(self.name, False, self.on_error, error)
        elif event.new is CircuitState.CLOSED and not self._reported_available:
            self._reported_available = True
            log.warning("resilience backend %r recovered", self.name)
            change = BackendStateChanged(self.name, True, self.on_error, None)
        else:
            return
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("resilience listener %r failed", listener)

    # The error is noted inside the breaker's call, before a trip it causes is reported.
    def _noting(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self._errors as error:
            self._last_error = error
            self.errors += 1
            raise

    async def _anoting(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await fn(*args)
        except self._errors as error:
            self._last_error = error
            self.errors += 1
            raise

    def call(self, fn: Callable[..., T], *args: Any) -> T | Literal[_Unavailable.UNAVAILABLE]:
        try:
            return self.breaker.call(self._noting, fn, *args)
        except self._unavailable:
            self.fallbacks += 1
            return UNAVAILABLE

    async def acall(
        self, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> T | Literal[_Unavailable.UNAVAILABLE]:
        try:
            return await self.breaker.acall(self._anoting, fn, *args)
        except self._unavailable:
            self.fallbacks += 1
            return UNAVAILABLE


def _describe(error: BaseException | None) -> str:
    """The error's type and message, and its cause's (redis-py wraps socket errors)."""
    if error is None:
        return "no error recorded"
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text
