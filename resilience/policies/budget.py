"""A retry budget: retries capped at a fraction of recent first attempts.

Finagle's RetryBudget and gRPC's retry throttling: every first attempt deposits
``ratio`` of a token, every retry withdraws a whole one, and ``min_per_second`` tokens
per second are always there (so a quiet service can still retry). Deposits and
withdrawals older than ``window`` seconds expire. While a dependency is down every
caller fails, first attempts keep coming at the usual rate, and so retries add at most
``ratio`` * that load (plus the floor) instead of multiplying it by the attempt count.

:class:`BudgetWindow` is the arithmetic (pure: it is handed ``now``); :class:`RetryBudget`
is the thread-safe object one or many :class:`~resilience.Retry` policies share.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from resilience import _clock
from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.events import Tally, Telemetry

__all__ = ["MIN_WINDOW", "SLOTS", "BudgetWindow", "RetryBudget"]

#: The window is kept as this many slots, each window / SLOTS seconds wide.
SLOTS = 10
#: The shortest window accepted (seconds).
MIN_WINDOW = 0.001


class BudgetWindow:
    """Deposits and withdrawals in the last ``window`` seconds, in :data:`SLOTS` slots.

    Not thread-safe on its own: :class:`RetryBudget` holds a lock around it.
    """

    __slots__ = ("_deposits", "_epochs", "_width", "_withdrawals", "floor", "ratio", "window")

    def __init__(self, ratio: float, min_per_second: float, window: float) -> None:
        self.ratio = ratio
        self.window = window
        #: Tokens always there: min_per_second over the whole window.
        self.floor = min_per_second * window
        self._width = window / SLOTS
        self._epochs = [-1] * SLOTS
        self._deposits = [0] * SLOTS
        self._withdrawals = [0] * SLOTS

    def _slot(self, now: float) -> int:
        epoch = int(now // self._width)
        index = epoch % SLOTS
        if self._epochs[index] != epoch:  # a slot from a window ago: start it afresh
            self._epochs[index] = epoch
            self._deposits[index] = 0
            self._withdrawals[index] = 0
        return index

    def deposit(self, now: float, n: int = 1) -> None:
        self._deposits[self._slot(now)] += n

    def counts(self, now: float) -> tuple[int, int]:
        """(deposits, withdrawals) within the window ending at ``now``."""
        epoch = int(now // self._width)
        deposits = withdrawals = 0
        for index in range(SLOTS):
            if epoch - SLOTS < self._epochs[index] <= epoch:
                deposits += self._deposits[index]
                withdrawals += self._withdrawals[index]
        return deposits, withdrawals

    def balance(self, now: float) -> float:
        deposits, withdrawals = self.counts(now)
        return self.floor + self.ratio * deposits - withdrawals

    def try_withdraw(self, now: float) -> bool:
        # 1e-9 of slack: ratio * deposits is a float product (0.7 * 90 is 62.99999...),
        # and 90 first attempts at 0.7 must allow 63 retries, not 62.
        if self.balance(now) < 1.0 - 1e-9:
            return False
        self._withdrawals[self._slot(now)] += 1
        return True


def _number(field: str, value: object, *, low: float, high: float, open_low: bool) -> float:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    ok = (
        number is not None
        and math.isfinite(number)
        and (number > low if open_low else number >= low)
        and number <= high
    )
    if not ok or number is None:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"{field} must be a number in {bounds}, got {value!r}")
    return float(number)


class RetryBudget:
    """Retries allowed: ``min_per_second`` * ``window`` plus ``ratio`` * the first
    attempts of the last ``window`` seconds, minus the retries already made in it.

    Share one budget between every policy that calls the same dependency. An exhausted
    budget makes :class:`~resilience.Retry` give up at once, raising the call's error.
    """

    def __init__(
        self,
        ratio: float = 0.1,
        min_per_second: float = 10.0,
        *,
        window: float = 10.0,
        name: str = "retry_budget",
        clock: Clock | None = None,
    ) -> None:
        ratio = _number("ratio", ratio, low=0.0, high=1.0, open_low=True)
        floor = _number("min_per_second", min_per_second, low=0.0, high=1e9, open_low=False)
        window = _number("window", window, low=0.0, high=86_400.0, open_low=True)
        if window < MIN_WINDOW:  # slots a hair wide: now // width overflows, every call fails
            raise ValueError(f"window must be at least {MIN_WINDOW:g} seconds, got {window!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.ratio, self.min_per_second, self.window = ratio, floor, window
        self._state = BudgetWindow(ratio, floor, window)
        self._lock = threading.Lock()
        clock = resolve(clock)
        self._monotonic: Callable[[], float] = clock.monotonic
        if clock is SYSTEM_CLOCK:  # the module function: one call less per read
            self._monotonic = _clock.monotonic
        self._deposits = Tally()
        self._withdrawals = Tally()
        self._exhausted = Tally()

    def deposit(self) -> None:
        """Count one first attempt."""
        now = self._monotonic()
        with self._lock:
            self._state.deposit(now)
        self._deposits.add()

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        now = self._monotonic()
        with self._lock:
            ok = self._state.try_withdraw(now)
        (self._withdrawals if ok else self._exhausted).add()
        return ok

    def balance(self) -> float:
        """Retries the budget would allow now (may be fractional)."""
        now = self._monotonic()
        with self._lock:
            return self._state.balance(now)

    def telemetry(self) -> Telemetry:
        return Telemetry("budget", self.name, self._read)

    def _read(self) -> dict[str, float]:
        return {
            "deposits": self._deposits.value(),
            "withdrawals": self._withdrawals.value(),
            "exhausted": self._exhausted.value(),
            "balance": self.balance(),
        }

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window}, name={self.name!r})"
        )
