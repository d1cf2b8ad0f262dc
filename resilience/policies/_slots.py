"""Slots for threads and tasks together: what Bulkhead and ConcurrencyLimit share.

One lock, a count of slots held (``_active``) against a capacity (``_capacity``), and
one FIFO of waiters. A thread waits on a locked ``threading.Lock``; a task (asyncio or
trio) on its own loop, woken thread-safely (``call_soon_threadsafe`` /
``run_sync_soon``), so a thread can free a slot a task waits for and back. A freed slot
passes straight to the oldest waiter under the lock, so nobody barges past the queue;
a waiter that is cancelled or times out leaves the queue, and passes on a slot it was
just handed (cancelled) or keeps it (timed out: it may run after all).

The capacity may move (ConcurrencyLimit's does): a slot freed while more are held than
the capacity allows goes back to the pool instead of to a waiter, and :meth:`_fill`
hands out the room a grown capacity made.

A caller may name a :class:`Partition` (ConcurrencyLimit's guaranteed shares): while
its partition holds fewer than its share, it is admitted even when the capacity is
reached or others wait.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from resilience import _clock
from resilience.errors import BulkheadFull
from resilience.events import Tally
from resilience.flight import current_async_library

__all__ = ["MAX_WAIT", "Partition", "Slots", "Waiter", "check_wait", "task_waiter", "thread_waiter"]


class Partition:
    """A guaranteed share of a moving capacity: ``limit`` is ``ceil(capacity * share)``
    (at least 1); ``busy`` counts the slots its callers hold. Changed under the lock."""

    __slots__ = ("busy", "limit", "name", "share")

    def __init__(self, name: str, share: float) -> None:
        self.name = name
        self.share = share
        self.busy = 0
        self.limit = 1

    def resize(self, capacity: int) -> None:
        self.limit = max(1, math.ceil(capacity * self.share))


class Waiter:
    """One queued caller: ``wake()`` (any thread) ends its ``wait`` (its own kind), and
    returns False when that can no longer happen (the waiter's event loop is gone)."""

    __slots__ = ("granted", "partition", "wait", "wake")

    def __init__(self, wake: Callable[[], bool | None], wait: Callable[..., Any]) -> None:
        self.granted = False
        self.partition: Partition | None = None
        self.wake = wake
        self.wait = wait


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: The longest max_wait: a year (a thread's lock wait overflows near 9.2e9 seconds).
MAX_WAIT = 365 * 86_400.0


def check_wait(max_wait: object, max_queue: object) -> tuple[float | None, int | None]:
    """``max_wait`` and ``max_queue`` checked, as the slots use them."""
    if max_wait is not None and (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, (int, float))
        or not (math.isfinite(max_wait) and 0 <= max_wait <= MAX_WAIT)
    ):
        raise ValueError(
            "max_wait must be None (no limit) or a number of seconds from 0 to a year, "
            f"got {max_wait!r}"
        )
    if max_queue is not None and (
        isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0
    ):
        raise ValueError(f"max_queue must be None or an int >= 0, got {max_queue!r}")
    wait = None if max_wait is None else float(max_wait)
    return wait, 0 if wait == 0.0 else max_queue


class Slots:
    """The shared machinery (see the module docstring). Subclasses set the capacity
    and say what a refusal raises (:meth:`_full`)."""

    name: str

    def _init_slots(self, capacity: int, max_wait: float | None, max_queue: int | None) -> None:
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._capacity = capacity
        self._lock = threading.Lock()
        self._active = 0
        self._waiters: deque[Waiter] = deque()
        self._admitted = Tally()
        self._rejected = Tally()

    def _full(self, waited: float) -> BulkheadFull:
        raise NotImplementedError

    # -- taking a slot -------------------------------------------------------------------

    def _try_enter(
        self, wake: Callable[[], Waiter] | None, partition: Partition | None = None
    ) -> Waiter | None:
        """Take a slot (None), or queue a waiter made by ``wake()``; the subclass's
        refusal when neither is allowed."""
        with self._lock:
            if self._active < self._capacity and not self._waiters:
                self._active += 1
                if partition is not None:
                    partition.busy += 1
                self._admitted.add()
                return None
            if partition is not None and partition.busy < partition.limit:
                self._active += 1  # a guaranteed share: above the capacity if need be
                partition.busy += 1
                self._admitted.add()
                return None
            if wake is None or (
                self.max_queue is not None and len(self._waiters) >= self.max_queue
            ):
                self._rejected.add()
                raise self._full(0.0)
            waiter = wake()
            waiter.partition = partition
            self._waiters.append(waiter)
            return waiter

    def _grant(self) -> Waiter:
        """Under the lock: the oldest waiter, handed a slot."""
        waiter = self._waiters.popleft()
        waiter.granted = True
        if waiter.partition is not None:
            waiter.partition.busy += 1
        return waiter

    def _release(self, partition: Partition | None = None) -> None:
        """Give a slot back: to the oldest waiter when the capacity has room for it,
        else to the pool."""
        while True:
            with self._lock:
                if partition is not None:
                    partition.busy -= 1
                    partition = None
                if not self._waiters or self._active > self._capacity:
                    self._active -= 1
                    return
                waiter = self._grant()  # the slot passes on; _active stays
            if waiter.wake() is not False:
                return
            # Its event loop is gone (closed, or the trio run ended): nobody will take
            # the slot there, so it goes to the next waiter.
            partition = waiter.partition

    def _fill(self) -> None:
        """Hand waiters the room a grown capacity made."""
        while True:
            with self._lock:
                if not self._waiters or self._active >= self._capacity:
                    return
                self._active += 1
                waiter = self._grant()
            if waiter.wake() is False:
                self._release(waiter.partition)  # its loop is gone: pass the slot on

    def _give_up(self, waiter: Waiter, waited: float, cancelled: bool) -> None:
        """A waiter leaves without its slot; if one was handed to it meanwhile, pass it
        on (cancelled) or keep it (timed out: it may run after all). Only a caller that
        ran out of time is counted as rejected: one that went away was not refused."""
        with self._lock:
            if not waiter.granted:
                self._waiters.remove(waiter)
                if cancelled:
                    return
                self._rejected.add()
                raise self._full(waited)
        if cancelled:
            self._release(waiter.partition)
            return
        self._admitted.add()

    def _enter(self, partition: Partition | None = None) -> None:
        maker = None if self.max_queue == 0 else thread_waiter
        waiter = self._try_enter(maker, partition)
        if waiter is None:
            return
        start = _clock.monotonic()
        try:
            woke = waiter.wait(timeout=-1 if self.max_wait is None else self.max_wait)
        except BaseException:  # KeyboardInterrupt, or another signal handler's error
            self._give_up(waiter, _clock.monotonic() - start, cancelled=True)
            raise
        if woke:
            self._admitted.add()
            return
        self._give_up(waiter, _clock.monotonic() - start, cancelled=False)

    async def _aenter(self, partition: Partition | None = None) -> None:
        maker = None if self.max_queue == 0 else task_waiter
        waiter = self._try_enter(maker, partition)
        if waiter is None:
            return
        start = _clock.monotonic()
        try:
            with anyio.move_on_after(math.inf if self.max_wait is None else self.max_wait):
                await waiter.wait()
        except BaseException:  # cancelled from outside
            self._give_up(waiter, _clock.monotonic() - start, cancelled=True)
            raise
        if waiter.granted:
            self._admitted.add()
            return
        self._give_up(waiter, _clock.monotonic() - start, cancelled=False)


def thread_waiter() -> Waiter:
    gate = threading.Lock()
    gate.acquire()
    return Waiter(gate.release, gate.acquire)


def task_waiter() -> Waiter:
    if current_async_library() == "trio":
        trio = sys.modules["trio"]
        token = trio.lowlevel.current_trio_token()
        event = trio.Event()

        def wake_trio() -> bool:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                return False
            return True

        return Waiter(wake_trio, event.wait)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def wake_asyncio() -> bool:
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # the loop is closed
            return False
        return True

    async def wait() -> None:
        await future

    return Waiter(wake_asyncio, wait)
