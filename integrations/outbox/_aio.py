"""What the asyncio-native broker adapters (RabbitMQ, NATS) share: one home event loop per
connection, reached from threads and other loops, and per-key sending in order."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import anyio.to_thread

from resilience.integrations.outbox._model import (
    BrokerUnavailable,
    Failure,
    FailureTable,
    HeldBack,
    OutboxEvent,
    Results,
    classify_with,
    encode_batch,
)

__all__ = ["AsyncBroker", "Home", "left", "send_by_key"]

T = TypeVar("T")
M = TypeVar("M")
R = TypeVar("R")


class AsyncBroker:
    """The broker protocol over an adapter's coroutines ``_publish`` and ``_disconnect``,
    which run on the connection's home loop."""

    FAILURES: ClassVar[FailureTable] = ()
    _home: Home

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        return self._home.call(self._publish, events)

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        if self._home.here():
            return await self._publish(events)
        return await anyio.to_thread.run_sync(self.publish, events)

    def classify(self, error: BaseException) -> Failure:
        return classify_with(self.FAILURES, error)

    def close(self) -> None:
        """Close the connection (when the adapter made it) on its own loop."""
        self._home.shutdown(self._disconnect)

    async def aclose(self) -> None:
        if self._home.here():
            await self._disconnect()
            self._home.forget()
        else:
            await anyio.to_thread.run_sync(self.close)

    # -- on the home loop ----------------------------------------------------------------

    #: How errors name the server ("NATS", "RabbitMQ").
    _label: ClassVar[str] = "the broker"
    timeout: float
    _loop: asyncio.AbstractEventLoop | None = None
    _lock: asyncio.Lock | None = None

    async def _publish(self, events: Sequence[OutboxEvent]) -> Results:
        deadline = asyncio.get_running_loop().time() + self.timeout
        target = await self._ready(deadline)
        ready, results = encode_batch(events, self._encode)

        async def send(message: Any) -> None:
            await self._send(target, message, deadline)

        await send_by_key(events, ready, results, send)
        return results

    async def _ready(self, deadline: float) -> Any:
        """What to send through, connecting first when there is nothing usable."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use here, or the old home loop is gone and took the connection along.
            self._loop, self._lock = loop, asyncio.Lock()
            self._forget()
        assert self._lock is not None
        async with self._lock:
            target = self._usable()
            if target is None:
                await self._disconnect()
                try:
                    await asyncio.wait_for(self._open(deadline), left(deadline))
                except Exception as error:
                    await self._disconnect()
                    raise BrokerUnavailable(
                        f"cannot connect to {self._label}: {error!r}"
                    ) from error
                target = self._usable()
                assert target is not None
            return target

    # What an adapter supplies.

    def _encode(self, event: OutboxEvent) -> Any:
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop references to a connection that lived on a loop now gone."""
        raise NotImplementedError

    def _usable(self) -> Any:
        """The open channel or context to send through, or None."""
        raise NotImplementedError

    async def _open(self, deadline: float) -> None:
        raise NotImplementedError

    async def _send(self, target: Any, message: Any, deadline: float) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError


def left(deadline: float) -> float:
    """Seconds until ``deadline``; raises once it has passed, so nothing more is sent."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise TimeoutError("the batch used up its timeout before this event was sent")
    return left


async def send_by_key(
    events: Sequence[OutboxEvent],
    ready: list[tuple[int, M]],
    results: Results,
    send: Callable[[M], Awaitable[None]],
) -> None:
    """Send keys concurrently, each key's events one by one in id order; after a key's
    first failure, hold its later events back."""
    lanes: dict[tuple[bool, str | int], list[tuple[int, M]]] = {}
    for index, message in ready:
        key = events[index].key
        lanes.setdefault((True, key) if key is not None else (False, index), []).append(
            (index, message)
        )

    async def lane(items: list[tuple[int, M]]) -> None:
        items.sort(key=lambda item: events[item[0]].id)
        for n, (index, message) in enumerate(items):
            try:
                await send(message)
            except Exception as error:
                results[index] = error
                for later, _ in items[n + 1 :]:
                    results[later] = HeldBack(
                        f"held back behind a failed event of key {events[index].key!r}"
                    )
                return

    await asyncio.gather(*(lane(items) for items in lanes.values()))


class Home:
    """The one asyncio loop a connection lives on, and how other callers reach it.

    The first ``here()`` on an asyncio loop makes that loop home; a ``call()`` with no home
    starts a private loop thread (when ``private``). A home loop that has been closed is
    forgotten, with what lived on it.
    """

    def __init__(self, name: str, *, private: bool) -> None:
        self._name = name
        self._private = private
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def here(self) -> bool:
        """True when the caller runs on the home loop (claiming it when there is none)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # no asyncio loop: trio, say
            return False
        with self._lock:
            if self.loop is None or self.loop.is_closed():
                self.loop = running
            return self.loop is running

    def forget(self) -> None:
        with self._lock:
            if self._thread is None:
                self.loop = None

    def _target(self) -> tuple[asyncio.AbstractEventLoop, bool]:
        with self._lock:
            if self.loop is not None and not self.loop.is_closed():
                return self.loop, self._thread is not None
            if not self._private:
                raise RuntimeError(
                    f"{self._name} cannot reach the event loop of the connection given "
                    "(unknown or closed): await apublish() on that loop, or pass a URL"
                )
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
            thread.start()
            self.loop, self._thread = loop, thread
            return loop, True

    def call(self, fn: Callable[[T], Awaitable[R]], arg: T) -> R:
        """Run ``fn(arg)`` on the home loop and wait for it."""
        loop, private = self._target()
        if not private:
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError(
                    f"{self._name}: a blocking call on the loop the connection lives on "
                    "would deadlock; await the async method instead"
                )
            if not loop.is_running():
                raise RuntimeError(f"{self._name}: the connection's event loop is not running")
        return asyncio.run_coroutine_threadsafe(_coro(fn, arg), loop).result()

    def shutdown(self, disconnect: Callable[[], Awaitable[None]]) -> None:
        """Run ``disconnect`` on the home loop, then stop the private thread if any."""
        with self._lock:
            loop, thread = self.loop, self._thread
        if loop is None or loop.is_closed():
            self.forget()
            return
        if thread is None:
            self.call(lambda _: disconnect(), None)
            self.forget()
            return
        try:
            asyncio.run_coroutine_threadsafe(_drain(disconnect), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            with self._lock:
                self.loop, self._thread = None, None


async def _coro(fn: Callable[[T], Awaitable[R]], arg: T) -> R:
    return await fn(arg)


async def _drain(disconnect: Callable[[], Awaitable[None]]) -> None:
    """Disconnect, then end what the libraries left running, as ``asyncio.run`` would."""
    await disconnect()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    loop = asyncio.get_running_loop()
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()
