"""What ConcurrencyLimit's sync and async faces share: configuration, the sample
bookkeeping, permits, and the refusal. The waiting is :mod:`._slots` (Bulkhead's); the
arithmetic is :mod:`.limits_math`."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Mapping
from typing import Any, Final

from resilience import _clock
from resilience._cancel import cancelled_types, deadline_expired
from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.errors import BulkheadFull
from resilience.events import Telemetry
from resilience.policies._base import Matcher, Policy, check_name, matcher
from resilience.policies._slots import Partition, Slots, check_wait
from resilience.policies.limits_math import ALGORITHMS, LimitAlgorithm, Window

__all__ = ["DEFAULT_DROP_ON", "LimitCore", "LimitExceeded", "LimitPermit"]

#: Errors that count as a drop (the limit falls) unless ``drop_on`` says otherwise.
DEFAULT_DROP_ON: Final = (TimeoutError, ConnectionError)
#: The defaults of ``initial``, ``min`` and ``max`` (an algorithm object brings its own).
_BOUNDS: Final = (20, 1, 1000)
#: The longest window accepted (seconds).
_MAX_WINDOW: Final = 3600.0

# Only async code can tell a deadline from a caller going away; the twins pass these.
_IN_ASYNC: Final = True
_IN_SYNC: Final = False


class LimitExceeded(BulkheadFull):
    """A :class:`~resilience.ConcurrencyLimit` had no free slot (and no room or time to
    wait). A :class:`~resilience.BulkheadFull`, so code that handles a full bulkhead
    handles this too; ``limit`` (also ``max_concurrent``) is the limit at the time."""

    def __init__(self, name: str, limit: int, waited: float = 0.0) -> None:
        super().__init__(name, limit, waited)
        self.limit = limit

    def __str__(self) -> str:
        how = f" after waiting {self.waited:.3f}s" if self.waited else ""
        return f"concurrency limit {self.name!r} reached ({self.limit} running){how}"


class LimitPermit:
    """One admitted call's slot, from ``acquire()`` / ``await aacquire()``: report how it
    went with exactly one of :meth:`success`, :meth:`drop` (the call timed out or was
    shed downstream: the limit should fall) or :meth:`ignore` (no sample: the call says
    nothing about the dependency), or :meth:`error` to let the limit's ``drop_on``
    decide. Each frees the slot; later calls do nothing."""

    __slots__ = ("_done", "_inflight", "_limit", "_partition", "_start")

    def __init__(
        self, limit: LimitCore, start: float, inflight: int, partition: Partition | None
    ) -> None:
        self._limit = limit
        self._start = start
        self._inflight = inflight
        self._partition = partition
        self._done = False

    def _finish(self, dropped: bool | None) -> None:
        if self._done:
            return
        self._done = True
        self._limit._finish(self._start, self._inflight, dropped, self._partition)

    def success(self) -> None:
        """The call finished: its round-trip time is a sample."""
        self._finish(False)

    def drop(self) -> None:
        """The call was dropped (timed out, or refused for overload downstream)."""
        self._finish(True)

    def ignore(self) -> None:
        """Free the slot without a sample."""
        self._finish(None)

    def error(self, error: BaseException, *, in_async: bool = False) -> None:
        """The call raised ``error``: a drop if ``drop_on`` matches it (or, with
        ``in_async``, if it is the cancellation of an expired deadline), no sample for
        other cancellations, else a sample as for a success."""
        self._finish(self._limit._classify(error, in_async))

    @property
    def done(self) -> bool:
        return self._done


class LimitCore(Slots, Policy):
    """A bulkhead whose limit moves (see :class:`resilience.ConcurrencyLimit`)."""

    def __init__(
        self,
        algorithm: str | LimitAlgorithm = "gradient2",
        *,
        initial: int = 20,
        min: int = 1,
        max: int = 1000,
        max_wait: float | None = 0.0,
        max_queue: int | None = None,
        window: float | None = 1.0,
        min_samples: int = 10,
        drop_on: object = DEFAULT_DROP_ON,
        partitions: Mapping[str, float] | None = None,
        name: str = "concurrency_limit",
        clock: Clock | None = None,
    ) -> None:
        self.name = check_name(name)
        if isinstance(algorithm, str):
            kind = ALGORITHMS.get(algorithm)
            if kind is None:
                raise ValueError(
                    f"algorithm must be one of {sorted(ALGORITHMS)} or an algorithm object, "
                    f"got {algorithm!r}"
                )
            self.algorithm: LimitAlgorithm = kind(initial, min, max)
        elif callable(getattr(algorithm, "update", None)) and hasattr(algorithm, "limit"):
            if (initial, min, max) != _BOUNDS:
                raise TypeError(
                    "initial, min and max: give them to the algorithm object "
                    f"({type(algorithm).__name__}(initial=..., min=..., max=...)), not both"
                )
            self.algorithm = algorithm
        else:
            raise TypeError(
                f"algorithm must be one of {sorted(ALGORITHMS)} or an object with update() "
                f"and limit (see resilience.policies.limits_math), got {algorithm!r}"
            )
        length = 0.0
        if window is not None and window != 0:
            if (
                isinstance(window, bool)
                or not isinstance(window, (int, float))
                or not (math.isfinite(window) and 0 < window <= _MAX_WINDOW)
            ):
                raise ValueError(
                    f"window must be None (every sample counts) or seconds in "
                    f"(0, {_MAX_WINDOW:g}], got {window!r}"
                )
            length = float(window)
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be an int >= 1, got {min_samples!r}")
        self.drop_on: Matcher = matcher("drop_on", drop_on)
        clock = resolve(clock)
        self._monotonic = clock.monotonic
        if clock is SYSTEM_CLOCK:  # the module function: one call less per read
            self._monotonic = _clock.monotonic
        self.window = length or None
        self._window = Window(
            self.algorithm, length, min_samples if length else 1, start=self._monotonic()
        )
        capacity = int(self.algorithm.limit)
        wait, queue = check_wait(max_wait, max_queue)
        self._init_slots(capacity, wait, queue)
        self._partitions = self._make_partitions(partitions, capacity)
        self._drops = 0
        self._entered: contextvars.ContextVar[tuple[LimitPermit, ...]] = contextvars.ContextVar(
            f"resilience_limit_{self.name}", default=()
        )

    @staticmethod
    def _make_partitions(
        partitions: Mapping[str, float] | None, capacity: int
    ) -> dict[str, Partition]:
        if partitions is None:
            return {}
        if not isinstance(partitions, Mapping):
            raise TypeError(f"partitions must map names to shares, got {partitions!r}")
        made: dict[str, Partition] = {}
        total = 0.0
        for name, share in partitions.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"partitions: names must be non-empty strings, got {name!r}")
            if (
                isinstance(share, bool)
                or not isinstance(share, (int, float))
                or not (0 <= share <= 1)
            ):
                raise ValueError(
                    f"partitions: the share of {name!r} must be in [0, 1], got {share!r}"
                )
            total += share
            made[name] = Partition(name, float(share))
            made[name].resize(capacity)
        if total > 1 + 1e-9:
            raise ValueError(f"partitions: the shares must add up to at most 1, got {total:g}")
        return made

    # -- what it shows -------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The current limit: calls allowed to run at once."""
        return self._capacity

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Callers queued for a slot now."""
        return len(self._waiters)

    def partition_of(self, name: str | None) -> Partition | None:
        """The partition called ``name``; None for None and for names not configured
        (they have no guaranteed share, as concurrency-limits' unknown partition)."""
        return None if name is None else self._partitions.get(name)

    # -- samples -------------------------------------------------------------------------

    def _full(self, waited: float) -> BulkheadFull:
        return LimitExceeded(self.name, self._capacity, waited)

    def _classify(self, error: BaseException, in_async: bool) -> bool | None:
        """True: a drop; False: a sample like a success; None: no sample."""
        if isinstance(error, Exception):
            return bool(self.drop_on(error))
        if in_async and isinstance(error, cancelled_types()):
            return True if deadline_expired(error) else None
        return None  # a caller going away, KeyboardInterrupt, ...

    def _resize(self, new: int) -> bool:
        """Under the lock: the limit is ``new`` now; True when it grew."""
        old = self._capacity
        if new == old:
            return False
        self._capacity = new
        for partition in self._partitions.values():
            partition.resize(new)
        return new > old

    def _finish(
        self, start: float, inflight: int, dropped: bool | None, partition: Partition | None = None
    ) -> None:
        """A call ended: count its sample (unless ``dropped`` is None), free its slot."""
        grew = False
        if dropped is not None:
            end = self._monotonic()
            with self._lock:
                if dropped:
                    self._drops += 1
                new = self._window.add(end - start, inflight, dropped, end)
                grew = new is not None and self._resize(new)
        self._release(partition)
        if grew:
            self._fill()

    def _close(self, end: float) -> None:
        """The inline path found the window over: close it (if nobody did meanwhile),
        free the caller's slot, and hand out any room the new limit made."""
        with self._lock:
            window = self._window
            new = window.close(end) if end >= window.until else None
            grew = new is not None and self._resize(new)
        self._release()
        if grew:
            self._fill()

    # -- with blocks ---------------------------------------------------------------------

    def _push(self, permit: LimitPermit) -> LimitPermit:
        self._entered.set((*self._entered.get(), permit))
        return permit

    def _pop(self, error: BaseException | None, in_async: bool) -> None:
        stack = self._entered.get()
        if not stack:
            raise RuntimeError(f"concurrency limit {self.name!r}: exit without a matching enter")
        self._entered.set(stack[:-1])
        permit = stack[-1]
        if error is None:
            permit.success()
        else:
            permit.error(error, in_async=in_async)

    # -- observing -----------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        return Telemetry("concurrency", self.name, self._read)

    def _read(self) -> dict[str, Any]:
        return {
            "limit": self._capacity,
            "in_flight": self._active,
            "waiting": len(self._waiters),
            "admitted": self._admitted.value(),
            "rejected": self._rejected.value(),
            "dropped": self._drops,
            "partitions": {
                name: {"limit": p.limit, "in_flight": p.busy}
                for name, p in self._partitions.items()
            },
        }

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimit({self.algorithm!r}, limit={self._capacity}, "
            f"max_wait={self.max_wait}, name={self.name!r})"
        )
