"""Single-flight: at most one load per key at a time, across threads and tasks alike.

The first caller for a key leads: it runs the load and publishes the outcome. Later
callers wait for it. Threads block on a ``threading.Event``; async tasks (asyncio or
trio) register a waker that the leader calls thread-safely, so no one polls and no
event loop is blocked. A leader that is cancelled or dies hands the turn on: its
waiters wake, see ``LEADER_GONE`` and try again, one of them becoming the new leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import sys
import threading
from collections.abc import Callable, Hashable
from typing import Any, Final

__all__ = ["LEADER_GONE", "Flight", "SingleFlight", "current_async_library"]


def current_async_library() -> str:
    """``"trio"`` or ``"asyncio"``: the library running the current task.

    sniffio would say the same, but it is not a dependency (anyio 4 dropped it). Trio is
    asked only when something imported it, so this costs asyncio one dict lookup; its
    ``current_task()`` raises RuntimeError outside a trio run. Outside both, RuntimeError.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except (RuntimeError, AttributeError):  # AttributeError: trio half-imported
            pass
        else:
            return "trio"
    asyncio.get_running_loop()  # raises RuntimeError when no event loop runs here
    return "asyncio"


class _Gone(enum.Enum):
    LEADER_GONE = "leader_gone"


#: A flight's error when its leader left without an outcome (cancelled, killed).
LEADER_GONE: Final = _Gone.LEADER_GONE


class Flight:
    """One load in progress, and what it produced."""

    __slots__ = ("_done", "_lock", "_wakers", "error", "value")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []
        self.value: Any = None
        self.error: BaseException | _Gone | None = None

    def finish(self, value: Any = None, error: BaseException | _Gone | None = None) -> None:
        self.value, self.error = value, error
        with self._lock:
            self._done.set()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def wait(self) -> None:
        self._done.wait()

    async def await_done(self) -> None:
        if self._done.is_set():
            return
        if current_async_library() == "trio":
            trio = sys.modules["trio"]
            token = trio.lowlevel.current_trio_token()
            event = trio.Event()

            def wake() -> None:
                # RunFinishedError: that run is over, so there is no one to wake.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(event.set)

            if self._add(wake):
                await event.wait()
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake_asyncio() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)

        if self._add(wake_asyncio):
            await future

    def _add(self, wake: Callable[[], None]) -> bool:
        """Register ``wake``; False when the flight already finished."""
        with self._lock:
            if self._done.is_set():
                return False
            self._wakers.append(wake)
            return True

    def outcome(self) -> Any:
        """The value, or raise the error as a fresh copy (waiters must not share one)."""
        error = self.error
        if error is None:
            return self.value
        assert isinstance(error, BaseException)
        raise _copy(error) from error


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _copy(error: BaseException) -> BaseException:
    # Raising one exception object in many threads would grow its traceback each time.
    try:
        fresh = copy.copy(error)
    except Exception:
        return error
    fresh.__traceback__ = None
    return fresh


class SingleFlight:
    """The flights in progress, by key. Thread- and task-safe."""

    __slots__ = ("_flights", "_lock")

    def __init__(self) -> None:
        self._flights: dict[Hashable, Flight] = {}
        self._lock = threading.Lock()

    def join(self, key: Hashable) -> tuple[Flight, bool]:
        """The key's flight, and whether the caller leads it."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    def land(self, key: Hashable, flight: Flight, value: Any = None, error: Any = None) -> None:
        """The leader's last act: remove the flight, then wake everyone on it."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.finish(value, error)
