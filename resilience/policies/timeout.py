"""Timeout: async calls are cancelled at the deadline; sync calls are bounded.

**Async** (asyncio, trio, anyio): the call is cancelled when its time is up and
:class:`~resilience.TimeoutExceeded` is raised in its place. On asyncio (Python >= 3.11)
one timer per event loop and policy serves every call in flight: calls with the same
limit end in the order they start, so a FIFO queue holds them and the timer fires only
for the oldest (asyncio.timeout arms and cancels a timer per call, which costs more
than the call it guards). Cancellation comes from the event loop's clock.

**Sync**: Python cannot interrupt a running thread safely, so a sync call is not
stopped. It runs with :func:`resilience.remaining` telling it the time left (pass that
to your client's own timeout); one that returns after its deadline raises
TimeoutExceeded (its result is dropped, and a breaker outside counts the failure); and
no call starts once an enclosing deadline has passed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, ParamSpec, TypeVar

import anyio

from resilience import _clock
from resilience._cancel import EXPIRED
from resilience._checks import positive_seconds, sync_result
from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.errors import TimeoutExceeded
from resilience.events import Tally, Telemetry
from resilience.policies import deadline as _deadline
from resilience.policies._base import Policy, check_name

__all__ = ["EXPIRED", "Timeout"]

P = ParamSpec("P")
R = TypeVar("R")

# Task.uncancel() arrived in 3.11; before that the anyio path serves asyncio too.
_NATIVE: Final = sys.version_info >= (3, 11)
_running_loop = asyncio.events._get_running_loop  # None outside a loop, without raising
_current_task = asyncio.current_task
_thread_id = threading.get_ident


class _Watch:
    """The calls of one Timeout in flight on one event loop, oldest first, and the one
    timer that ends them. Touched only from that loop's thread.

    An entry is ``[deadline in loop time, task, expired]``; the call sets its task to
    None when it ends, so a finished task is not kept alive until the timer comes. The
    loop is held weakly: the Timeout's table of watches must not keep old loops alive.
    """

    __slots__ = ("__weakref__", "armed", "loop", "queue", "same_clock")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.queue: deque[list[Any]] = deque()
        self.armed = False
        self.same_clock = False  # loop.time() is the clock the Timeout reads

    def arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self.armed = True
        loop.call_at(when, self.fire)

    def fire(self) -> None:
        loop = self.loop()
        if loop is None:  # pragma: no cover - a loop runs its own callbacks
            return
        queue, now = self.queue, loop.time()
        while queue:
            entry = queue[0]
            task = entry[1]
            if task is None:
                queue.popleft()
            elif entry[0] <= now:
                queue.popleft()
                entry[2] = True
                task.cancel(EXPIRED)
            else:
                loop.call_at(entry[0], self.fire)
                return
        self.armed = False


class Timeout(Policy):
    """Give each call at most ``seconds`` (see the module docstring for sync calls)."""

    def __init__(self, seconds: float, *, name: str = "timeout", clock: Clock | None = None):
        self.seconds = positive_seconds("seconds", seconds, maximum=365 * 86_400.0)
        self.name = check_name(name)
        clock = resolve(clock)
        self._monotonic: Callable[[], float] = (
            _clock.monotonic if clock is SYSTEM_CLOCK else clock.monotonic
        )
        self._watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watch] = (
            weakref.WeakKeyDictionary()
        )
        self._watches_lock = threading.Lock()  # loops in several threads add watches
        # By thread: the watch of the loop it ran last (see acall).
        self._by_thread: dict[int, _Watch] = {}
        self._calls = Tally()
        self._timeouts = Tally()
        self._overruns = Tally()

    def _left(self, now: float) -> float:
        left = _deadline.tighter(self.seconds, now, self._monotonic)
        assert left is not None
        if left <= 0.0:  # an enclosing deadline has passed: start nothing
            self._timeouts.add()
            raise TimeoutExceeded(self.seconds, self.name)
        return left

    # -- sync --------------------------------------------------------------------------------

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a sync call under the deadline: see the module docstring."""
        self._calls.add()
        monotonic = self._monotonic
        now = monotonic()
        ends = now + (self.seconds if _deadline.DEADLINE.get() is None else self._left(now))
        token = _deadline.DEADLINE.set((ends, monotonic))
        try:
            result = fn(*args, **kwargs)
        finally:
            _deadline.DEADLINE.reset(token)
        if monotonic() > ends:
            self._overruns.add()
            raise TimeoutExceeded(self.seconds, self.name)
        return sync_result(result, "Timeout.call")

    # -- async -------------------------------------------------------------------------------

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run an async call, cancelling it at the deadline."""
        self._calls.add()
        monotonic = self._monotonic
        now = monotonic()
        left = self.seconds if _deadline.DEADLINE.get() is None else self._left(now)
        # The watch this thread used last, if its loop runs in this thread now (a
        # thread runs one loop at a time): asking asyncio for the running loop costs a
        # getpid() system call on Python 3.11. BaseEventLoop keeps the thread it runs
        # in as _thread_id; a loop without it takes the long way every time.
        ident = _thread_id()
        watch = self._by_thread.get(ident)
        loop = None if watch is None else watch.loop()
        if loop is None or getattr(loop, "_thread_id", None) != ident:
            loop = _running_loop()
            watch = None
        if loop is None or not _NATIVE or left < self.seconds:
            # trio, Python 3.10, or a deadline shortened by an enclosing one (out of the
            # FIFO order): an anyio cancel scope.
            return await self._scoped(left, now + left, fn, args, kwargs)
        task: Any = _current_task(loop)  # cancelling()/uncancel(): Python >= 3.11
        if task is None:  # no asyncio task runs this: trio in guest mode on asyncio
            return await self._scoped(left, now + left, fn, args, kwargs)
        if watch is None:
            watch = self._watch(loop)
        # On the stdlib loop, loop time is the monotonic clock we already read.
        entry = [(now if watch.same_clock else loop.time()) + left, task, False]
        cancelling = task.cancelling()
        token = _deadline.DEADLINE.set((now + left, monotonic))
        watch.queue.append(entry)
        if not watch.armed:
            watch.arm(loop, entry[0])
        try:
            result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            if entry[2] and task.uncancel() <= cancelling:
                self._timeouts.add()
                raise TimeoutExceeded(self.seconds, self.name) from None
            raise
        except BaseException:
            if entry[2]:  # the call turned our cancellation into an error: take it back
                task.uncancel()
                self._timeouts.add()
            raise
        finally:
            entry[1] = None
            _deadline.DEADLINE.reset(token)
        if entry[2]:  # the call swallowed its cancellation: still too late
            task.uncancel()
            self._timeouts.add()
            raise TimeoutExceeded(self.seconds, self.name)
        return result

    def _watch(self, loop: asyncio.AbstractEventLoop) -> _Watch:
        with self._watches_lock:
            watch = self._watches.get(loop)
            if watch is None:
                watch = self._watches[loop] = _Watch(loop)
                watch.same_clock = (
                    self._monotonic is _clock.monotonic
                    and type(loop).time is asyncio.BaseEventLoop.time
                )
        self._by_thread[_thread_id()] = watch
        return watch

    async def _scoped(
        self,
        left: float,
        ends: float,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        token = _deadline.DEADLINE.set((ends, self._monotonic))
        try:
            with anyio.move_on_after(left) as scope:
                result = await fn(*args, **kwargs)
        finally:
            _deadline.DEADLINE.reset(token)
        if scope.cancel_called:  # cancelled at the deadline, or it swallowed that and returned
            self._timeouts.add()
            raise TimeoutExceeded(self.seconds, self.name)
        return result

    # -- observing ---------------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        return Telemetry("timeout", self.name, self._read)

    def _read(self) -> dict[str, int]:
        return {
            "calls": self._calls.value(),
            "timeouts": self._timeouts.value(),
            "overruns": self._overruns.value(),
        }

    def __repr__(self) -> str:
        return f"Timeout({self.seconds}, name={self.name!r})"
