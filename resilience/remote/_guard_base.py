"""What a guarded remote backend reports, and the guard's state (shared by sync and async)."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Final

from resilience.breaker import CircuitBreaker, StateChanged
from resilience.breaker.policy import CircuitState
from resilience.errors import CircuitOpenError
from resilience.events import Listener, Telemetry

__all__ = ["UNAVAILABLE", "BackendStateChanged", "GuardBase", "OnError", "Unavailable"]

log = logging.getLogger("resilience")


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


class Unavailable(enum.Enum):
    UNAVAILABLE = "unavailable"


#: What RemoteGuard returns instead of a result when the backend could not answer.
UNAVAILABLE: Final = Unavailable.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class BackendStateChanged:
    """A remote backend went away (``available`` False) or came back."""

    backend: str
    available: bool
    on_error: OnError
    error: BaseException | None


class GuardBase:
    """The breaker around one backend, its counters, and one report per transition."""

    def __init__(
        self,
        name: str,
        *,
        errors: tuple[type[BaseException], ...],
        on_error: OnError,
        breaker: CircuitBreaker | None,
        listeners: list[Listener[BackendStateChanged]],
        timeout: float | None = None,
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
        self.outages = 0
        self.breaker = breaker or CircuitBreaker(
            f"backend:{name}",
            failure_threshold=3,
            recovery_timeout=1.0,
            success_threshold=1,
            # A probe that reports after its lease is ignored: let it last a reconnect
            # (connect, handshake, the command: each up to ``timeout``), or a Redis that
            # answers slowly but surely would keep the breaker half-open for good.
            probe_lease=None if timeout is None else max(1.0, 5 * timeout),
            include=errors,
        )
        if not isinstance(self.breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        # State changes only: the breaker keeps its lock-free path for healthy calls.
        self.breaker.add_listener(self._on_breaker_event, only=(StateChanged,))

    def add_listener(self, listener: Listener[BackendStateChanged]) -> None:
        """Hear of every outage and recovery (one event each)."""
        self._listeners.append(listener)

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads for the backend this guard protects: plain
        counters, and availability as last reported (one change per outage)."""
        return Telemetry("backend", self.name, self._read, links=(self.breaker,))

    def _read(self) -> dict[str, object]:
        return {
            "available": self._reported_available,
            "on_error": self.on_error.value,
            "outages": self.outages,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
        }

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
            self.outages += 1
            error = self._last_error
            log.warning(
                "resilience backend %r unavailable (%s); %s until it recovers",
                self.name,
                _describe(error),
                self.on_error.value,
                extra={
                    "resilience_event": "backend.unavailable",
                    "resilience_name": self.name,
                    "resilience_from_state": "available",
                    "resilience_to_state": "unavailable",
                    "resilience_error_type": type(error).__name__ if error else None,
                    "resilience_on_error": self.on_error.value,
                },
            )
            change = BackendStateChanged(self.name, False, self.on_error, error)
        elif event.new is CircuitState.CLOSED and not self._reported_available:
            self._reported_available = True
            log.warning(
                "resilience backend %r recovered",
                self.name,
                extra={
                    "resilience_event": "backend.recovered",
                    "resilience_name": self.name,
                    "resilience_from_state": "unavailable",
                    "resilience_to_state": "available",
                    "resilience_on_error": self.on_error.value,
                },
            )
            change = BackendStateChanged(self.name, True, self.on_error, None)
        else:
            return
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception(
                    "resilience listener %r failed",
                    listener,
                    extra={"resilience_event": "listener.failed", "resilience_name": self.name},
                )


def _describe(error: BaseException | None) -> str:
    """The error's type and message, and its cause's (redis-py wraps socket errors)."""
    if error is None:
        return "no error recorded"
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text
