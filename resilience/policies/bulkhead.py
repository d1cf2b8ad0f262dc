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

import asyncio
import math
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio

from resilience import _clock
from resilience.errors import BulkheadFull
from resilience.events import Tally, Telemetry
from resilience.flight import current_async_library
from resilience.policies._base import Policy, check_name

__all__ = ["Bulkhead"]

P = ParamSpec("P")
R = TypeVar("R")


#: The longest max_wait: a year (a thread's lock wait overflows near 9.2e9 seconds).
_MAX_WAIT = 365 * 86_400.0


class _Waiter:
    """One queued caller: ``wake()`` (any thread) ends its ``wait`` (its own kind), and
    returns False when that can no longer happen (the waiter's event loop is gone)."""

    __slots__ = ("granted", "wait", "wake")

    def __init__(self, wake: Callable[[], bool | None], wait: Callable[..., Any]) -> None:
        self.granted = False
        self.wake = wake
        self.wait = wait


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Bulkhead(Policy):
    """Bound concurrency: see the module docstring."""

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
        if max_wait is not None and (
            isinstance(max_wait, bool)
            or not isinstance(max_wait, (int, float))
            or not (math.isfinite(max_wait) and 0 <= max_wait <= _MAX_WAIT)
        ):
            raise ValueError(
                "max_wait must be None (no limit) or a number of seconds from 0 to a year, "
                f"got {max_wait!r}"
            )
        if max_queue is not None and (
            isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0
        ):
            raise ValueError(f"max_queue must be None or an int >= 0, got {max_queue!r}")
        self.max_concurrent = max_concurrent
        self.max_wait = None if max_wait is None else float(max_wait)
        self.max_queue = 0 if self.max_wait == 0.0 else max_queue
        self.name = check_name(name)
        self._lock = threading.Lock()
        self._active = 0
        self._waiters: deque[_Waiter] = deque()
        self._admitted = Tally()
        self._rejected = Tally()

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Callers queued for a slot now."""
        return len(self._waiters)

    # -- slots -------------------------------------------------------------------------------

    def _try_enter(self, wake: Callable[[], _Waiter] | None) -> _Waiter | None:
        """Take a slot (None), or queue a waiter made by ``wake()``; BulkheadFull when
        neither is allowed."""
        with self._lock:
            if self._active < self.max_concurrent and not self._waiters:
                self._active += 1
                self._admitted.add()
                return None
            if wake is None or (
                self.max_queue is not None and len(self._waiters) >= self.max_queue
            ):
                self._rejected.add()
                raise BulkheadFull(self.name, self.max_concurrent)
            waiter = wake()
            self._waiters.append(waiter)
            return waiter

    def _release(self) -> None:
        while True:
            with self._lock:
                if not self._waiters:
                    self._active -= 1
                    return
                waiter = self._waiters.popleft()
                waiter.granted = True  # the slot passes on; _active stays
            if waiter.wake() is not False:
                return
            # Its event loop is gone (closed, or the trio run ended): nobody will take
            # the slot there, so it goes to the next waiter.

    def _give_up(self, waiter: _Waiter, waited: float, cancelled: bool) -> None:
        """A waiter leaves without its slot; if one was handed to it meanwhile, pass it
        on (cancelled) or keep it (timed out: it may run after all). Only a caller that
        ran out of time is counted as rejected: one that went away was not refused."""
        with self._lock:
            if not waiter.granted:
                self._waiters.remove(waiter)
                if cancelled:
                    return
                self._rejected.add()
                raise BulkheadFull(self.name, self.max_concurrent, waited)
        if cancelled:
            self._release()
            return
        self._admitted.add()

    def _enter(self) -> None:
        maker = None if self.max_queue == 0 else _thread_waiter
        waiter = self._try_enter(maker)
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

    async def _aenter(self) -> None:
        maker = None if self.max_queue == 0 else _task_waiter
        waiter = self._try_enter(maker)
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

    # -- calling -----------------------------------------------------------------------------

    # call and acall take a free slot, and give it back, inline: one lock round trip
    # each way and no frame of their own; a full bulkhead or a queue takes the long way.

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        lock = self._lock
        lock.acquire()
        if self._active < self.max_concurrent and not self._waiters:
            self._active += 1
            lock.release()
            self._admitted.add()
        else:
            lock.release()
            self._enter()
        try:
            return fn(*args, **kwargs)
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
        if self._active < self.max_concurrent and not self._waiters:
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


def _thread_waiter() -> _Waiter:
    gate = threading.Lock()
    gate.acquire()
    return _Waiter(gate.release, gate.acquire)


def _task_waiter() -> _Waiter:
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

        return _Waiter(wake_trio, event.wait)
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

    return _Waiter(wake_asyncio, wait)
