"""Bulkhead: at most ``max_concurrent`` calls at once, threads and tasks together.

A caller that finds every slot taken waits up to ``max_wait`` seconds (0: not at all)
in a FIFO queue of at most ``max_queue`` waiters, then gets
:class:`~resilience.BulkheadFull`. A freed slot passes straight to the oldest waiter, so
nobody barges past the queue. Threads wait on a lock; tasks (asyncio or trio) on their
own loop, woken thread-safely, so a thread can free a slot a task waits for. A waiter
that is cancelled or times out leaves the queue (and passes on a slot it was just
handed). Waiting is measured on real time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ParamSpec, TypeVar

from resilience._checks import sync_result
from resilience.errors import BulkheadFull
from resilience.events import Telemetry
from resilience.policies._base import Policy, check_name
from resilience.policies._slots import Slots, check_wait

__all__ = ["Bulkhead"]

P = ParamSpec("P")
R = TypeVar("R")


class Bulkhead(Slots, Policy):
    """Bound concurrency: see the module docstring. The lock, the count and the FIFO
    of waiters are :class:`~resilience.policies._slots.Slots`, shared with
    :class:`~resilience.ConcurrencyLimit`."""

    def __init__(
        self,
        max_concurrent: int,
        max_wait: float | None = 0.0,
        *,
        max_queue: int | None = None,
        name: str = "bulkhead",
    ) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise TypeError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
        wait, queue = check_wait(max_wait, max_queue)
        self.name = check_name(name)
        self._init_slots(max_concurrent, wait, queue)

    @property
    def max_concurrent(self) -> int:
        """Slots: calls allowed to run at once."""
        return self._capacity

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Callers queued for a slot now."""
        return len(self._waiters)

    def _full(self, waited: float) -> BulkheadFull:
        return BulkheadFull(self.name, self._capacity, waited)

    # -- calling -----------------------------------------------------------------------------

    # call and acall take a free slot, and give it back, inline: one lock round trip
    # each way and no frame of their own; a full bulkhead or a queue takes the long way.

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        lock = self._lock
        lock.acquire()
        if self._active < self._capacity and not self._waiters:
            self._active += 1
            lock.release()
            self._admitted.add()
        else:
            lock.release()
            self._enter()
        try:
            return sync_result(fn(*args, **kwargs), "Bulkhead.call")
        finally:
            lock.acquire()
            if self._waiters:
                lock.release()
                self._release()
            else:
                self._active -= 1
                lock.release()

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        lock = self._lock
        lock.acquire()
        if self._active < self._capacity and not self._waiters:
            self._active += 1
            lock.release()
            self._admitted.add()
        else:
            lock.release()
            await self._aenter()
        try:
            return await fn(*args, **kwargs)
        finally:
            lock.acquire()
            if self._waiters:
                lock.release()
                self._release()
            else:
                self._active -= 1
                lock.release()

    def __enter__(self) -> Bulkhead:
        self._enter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    async def __aenter__(self) -> Bulkhead:
        await self._aenter()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    # -- observing ---------------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        return Telemetry("bulkhead", self.name, self._read)

    def _read(self) -> dict[str, int]:
        return {
            "admitted": self._admitted.value(),
            "rejected": self._rejected.value(),
            "active": self._active,
            "waiting": len(self._waiters),
            "max_concurrent": self.max_concurrent,
        }

    def __repr__(self) -> str:
        return (
            f"Bulkhead(max_concurrent={self.max_concurrent}, max_wait={self.max_wait}, "
            f"name={self.name!r})"
        )
