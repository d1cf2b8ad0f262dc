"""What a limiter's sync and async methods share: its limits, tables, clock, listeners
and every check that does no I/O (see limiter.py for the classes built on it)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import anyio

from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.errors import RateLimited
from resilience.events import Dispatcher, Listener, Tally, Telemetry
from resilience.limiter.bucket import Decision, Limit
from resilience.limiter.memory import MemoryBackend, MemoryTable

__all__ = ["UNIT", "LimiterCore", "LimiterDecision", "bad_key", "check_timeout"]

#: A cost of exactly 1 (CPython keeps one object per small int, so ``cost is UNIT``
#: tells an int 1 from 1.0 or True in one step; any other int 1 just takes the long way).
UNIT: Final[float] = 1


@dataclass(frozen=True, slots=True)
class LimiterDecision:
    """One decision, for listeners (metrics). ``limiter`` is the limiter's name."""

    limiter: str
    key: str
    cost: float
    decision: Decision


def bad_key(key: object) -> NoReturn:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    raise ValueError("key must be a non-empty string")


def check_timeout(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {value!r}")
    return float(value)


class LimiterCore:
    """What TokenBucket and LimitGroup share: validation, listeners, waiting rules."""

    def __init__(
        self, limits: Sequence[Limit], tables: Sequence[Any], backend: Any, clock: Clock | None
    ) -> None:
        self.limits = tuple(limits)
        self.backend = backend
        self._tables = tuple(tables)
        self._clock = resolve(clock)
        self._sleep: Callable[[float], None] = getattr(self._clock, "sleep", time.sleep)
        self._asleep: Callable[[float], Awaitable[None]] = getattr(
            self._clock, "asleep", anyio.sleep
        )
        # The system clock is read through a module global (see _clock.monotonic).
        self._now: Callable[[], float] | None = (
            None if self._clock is SYSTEM_CLOCK else self._clock.monotonic
        )
        # A cost of exactly 1 needs no check when every capacity holds a whole token.
        self._unit_ok = min(limit.capacity for limit in limits) >= 1
        # One in-memory limit: call its table directly (the hot path). Listeners take the
        # general path, so a limiter nobody listens to pays nothing for the hook.
        self._fast: MemoryTable | None = (
            self._tables[0] if len(tables) == 1 and isinstance(backend, MemoryBackend) else None
        )
        self._single: MemoryTable | None = self._fast
        self._events: Dispatcher[LimiterDecision] = Dispatcher()
        # Decisions by answer, counted only once a metrics consumer asks for telemetry.
        self._allowed: Tally | None = None
        self._denied: Tally | None = None
        self.name = ""

    def _route(self) -> None:
        """Choose the paths calls take, after a change of listeners (see _Limiter)."""

    def add_listener(self, listener: Listener[LimiterDecision]) -> None:
        """Call ``listener(LimiterDecision)`` after every decision."""
        self._events.add(listener)
        self._single = None
        self._route()

    def remove_listener(self, listener: Listener[LimiterDecision]) -> None:
        self._events.remove(listener)
        if not self._events:
            self._single = self._fast
        self._route()

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads (resilience.events). Asking for it turns on two
        lock-free counters (allowed, denied); the hot path stays the hot path."""
        if self._allowed is None:
            self._denied = Tally()
            self._allowed = Tally()
            self._route()
        backend = self.backend
        links = (backend,) if callable(getattr(backend, "telemetry", None)) else ()
        return Telemetry("limiter", self.name, self._read, links=links)

    def _read(self) -> dict[str, int]:
        allowed, denied = self._allowed, self._denied
        assert allowed is not None
        assert denied is not None
        return {"allowed": allowed.value(), "denied": denied.value()}

    def _tally(self, decision: Decision) -> None:
        counter = self._allowed if decision.allowed else self._denied
        assert counter is not None
        counter.add()

    def _cost(self, cost: float) -> float:
        for limit in self.limits:
            limit.check_cost(cost)
        return float(cost)

    def _check_wait(self, decision: Decision, key: str, deadline: float | None) -> None:
        if deadline is not None and self._clock.monotonic() + decision.retry_after > deadline:
            raise RateLimited(decision.retry_after, key)

    def _items(self, items: Iterable[str | tuple[str, float]]) -> list[tuple[str, float]]:
        out = []
        for item in items:
            key, cost = (item, 1) if isinstance(item, str) else item
            if key.__class__ is not str or not key:
                bad_key(key)
            out.append((key, self._cost(cost)))
        return out
