"""Hedge: when a call is slow, start another attempt; the first success wins.

A few slow calls set a service's tail latency. Hedging (Dean and Barroso, "The Tail at
Scale"; Polly v8's and failsafe-go's hedging) sends a second attempt when the first
has not answered within ``delay`` seconds, and a third after another ``delay``, up to
``max_extra``; the first attempt to succeed is the call's result, and the others are
cancelled. ``delay="p95"`` takes the 95th percentile of recent first attempts (a
:class:`~resilience.policies.limits_math.LatencySketch`), so only about one call in
twenty is hedged, whatever the dependency's speed.

- **Async only.** The losers must be cancelled, and a sync call cannot be: a sync call
  (or decorating a sync function) raises TypeError. Attempts run in an anyio task group,
  on asyncio or trio.
- **Errors.** An attempt that fails while another still runs leaves the race to it;
  the call raises only when every attempt started has failed (the last error), and a
  failure starts no new attempt: retrying errors is :class:`~resilience.Retry`'s job.
  Cancellation from outside cancels every attempt and propagates.
- **Budget.** With ``budget=`` (a :class:`~resilience.RetryBudget`, shareable with
  retries) each call deposits a first attempt and each hedge withdraws one token; a
  spent budget starts no hedge, so during an outage hedging cannot double the load.
- **Idempotence.** Attempts may overlap, so hedge only calls that are safe to repeat.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

import anyio
import anyio.abc

from resilience.events import Tally, Telemetry
from resilience.policies._base import Policy, check_name, is_async
from resilience.policies.budget import RetryBudget
from resilience.policies.limits_math import LatencySketch, parse_quantile

__all__ = ["Hedge"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: The most extra attempts a hedge may start per call.
MAX_EXTRA = 10


class _Race:
    """One hedged call's attempts, touched only from the call's own event loop."""

    __slots__ = ("changed", "errors", "running", "scope", "value", "won")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.won = False
        self.value: Any = None
        self.errors: list[Exception] = []
        self.running = 0
        self.changed = anyio.Event()


class Hedge(Policy):
    """Hedged async calls; see the module docstring.

    ``Hedge(delay=0.05, max_extra=1, *, budget=None, history=1000, min_samples=20,
    name="hedge")``: ``delay`` is seconds (0: every attempt at once) or a quantile of
    recent first attempts such as ``"p95"`` or ``"p99.9"``; with a quantile, calls are not
    hedged until ``min_samples`` of the last ``history`` first attempts are known.
    """

    def __init__(
        self,
        delay: float | str = 0.05,
        max_extra: int = 1,
        *,
        budget: RetryBudget | None = None,
        history: int = 1000,
        min_samples: int = 20,
        name: str = "hedge",
    ) -> None:
        self.name = check_name(name)
        self.quantile: float | None = None
        self.delay: float | None = None
        if isinstance(delay, str):
            self.quantile = parse_quantile(delay)
        elif (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or not (math.isfinite(delay) and delay >= 0)
        ):
            raise ValueError(
                f"delay must be seconds >= 0 or a quantile such as 'p95', got {delay!r}"
            )
        else:
            self.delay = float(delay)
        if (
            isinstance(max_extra, bool)
            or not isinstance(max_extra, int)
            or not 0 <= max_extra <= MAX_EXTRA
        ):
            raise ValueError(f"max_extra must be an int in [0, {MAX_EXTRA}], got {max_extra!r}")
        if budget is not None and not (
            callable(getattr(budget, "deposit", None))
            and callable(getattr(budget, "try_withdraw", None))
        ):
            raise TypeError(f"budget must be a RetryBudget, got {type(budget).__name__}")
        self.max_extra = max_extra
        self.budget = budget
        self._sketch = LatencySketch(history, min_samples=min_samples)
        self._sketch_lock = threading.Lock()
        self._calls = Tally()
        self._hedges = Tally()
        self._wins = Tally()
        self._refused = Tally()

    # -- when to hedge -------------------------------------------------------------------

    def current_delay(self) -> float | None:
        """Seconds after which the next call's first hedge would start; None while a
        quantile delay has too few samples (calls are then not hedged)."""
        if self.quantile is None:
            return self.delay
        with self._sketch_lock:
            return self._sketch.quantile(self.quantile)

    def _observe(self, seconds: float) -> None:
        if self.quantile is not None:
            with self._sketch_lock:
                self._sketch.add(seconds)

    # -- calling -------------------------------------------------------------------------

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        raise TypeError(
            f"hedge {self.name!r} runs async calls only: a sync call cannot be cancelled, "
            "so a hedged one would leave its losing attempts running; use acall() on an "
            "async function"
        )

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        self._calls.add()
        if self.budget is not None:
            self.budget.deposit()
        delay = self.current_delay()
        if delay is None or self.max_extra == 0:
            started = anyio.current_time()
            try:
                result = await fn(*args, **kwargs)
            except Exception:
                self._observe(anyio.current_time() - started)
                raise
            self._observe(anyio.current_time() - started)
            return result
        return await self._race(fn, args, kwargs, delay)  # type: ignore[no-any-return]

    async def _race(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: float,
    ) -> Any:
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            race = _Race(tg.cancel_scope)
            race.running = 1
            tg.start_soon(self._attempt, race, fn, args, kwargs, 0, started)
            extra = 0
            hedging = True
            while race.running and not race.won:
                changed = race.changed = anyio.Event()
                if not (hedging and extra < self.max_extra):
                    await changed.wait()
                    continue
                with anyio.move_on_at(started + delay * (extra + 1)):
                    await changed.wait()
                if changed.is_set():  # an attempt failed: look again
                    continue
                if self.budget is not None and not self.budget.try_withdraw():
                    self._refused.add()
                    hedging = False
                    continue
                extra += 1
                self._hedges.add()
                race.running += 1
                tg.start_soon(self._attempt, race, fn, args, kwargs, extra, anyio.current_time())
        if race.won:
            return race.value
        raise race.errors[-1]

    async def _attempt(
        self,
        race: _Race,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        index: int,
        started: float,
    ) -> None:
        try:
            value = await fn(*args, **kwargs)
        except Exception as error:
            if index == 0:
                self._observe(anyio.current_time() - started)
            race.errors.append(error)
            race.running -= 1
            race.changed.set()
            return
        except BaseException:
            # Lost to a faster attempt: at least this slow, which is what a quantile
            # needs to know. A caller going away tells nothing.
            if index == 0 and race.won:
                self._observe(anyio.current_time() - started)
            raise
        if index == 0:
            self._observe(anyio.current_time() - started)
        if race.won:
            return
        race.won = True
        race.value = value
        if index:
            self._wins.add()
        race.scope.cancel()

    @overload
    def __call__(self, fn: classmethod[T, P, R]) -> classmethod[T, P, R]: ...
    @overload
    def __call__(self, fn: staticmethod[P, R]) -> staticmethod[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Any) -> Any:
        """Decorate an async function or method (a sync one is a TypeError)."""
        if (
            callable(fn)
            and not isinstance(fn, (classmethod, staticmethod, type))
            and not is_async(fn)
        ):
            raise TypeError(
                f"hedge {self.name!r} decorates async functions only: a sync call cannot "
                f"be cancelled, so the losing attempts would run on (got {fn!r})"
            )
        return super().__call__(fn)

    # -- observing -----------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        links = (self.budget,) if self.budget is not None else ()
        return Telemetry("hedge", self.name, self._read, links=links)

    def _read(self) -> dict[str, float]:
        return {
            "calls": self._calls.value(),
            "hedges": self._hedges.value(),
            "wins": self._wins.value(),
            "refused": self._refused.value(),
        }

    def __repr__(self) -> str:
        delay = self.delay if self.quantile is None else f"p{self.quantile * 100:g}"
        return f"Hedge(delay={delay!r}, max_extra={self.max_extra}, name={self.name!r})"
