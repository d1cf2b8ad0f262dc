"""Telling a timeout from a caller going away, on asyncio and trio.

A deadline (``anyio.fail_after``/``move_on_after`` around the call) cancels the call
just like a caller that gave up does. The first says the dependency was too slow and
counts as a failure; the second says nothing about it. Once a scope is cancelled
both libraries report an effective deadline of -inf, so we walk the enclosing cancel
scopes and look for one that was cancelled because its deadline passed. The walk
uses anyio's and trio's scope chains, which are not public API; it runs only on the
cancellation path, falls back to "not a timeout", and tests pin it on both backends.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

__all__ = ["EXPIRED", "cancelled_types", "deadline_expired"]

#: The message of the CancelledError a resilience Timeout's asyncio timer delivers, so
#: code between the Timeout and the call (a breaker inside it) can tell that deadline
#: from a caller going away, as it can an anyio or trio scope's deadline.
EXPIRED = "resilience.Timeout: deadline exceeded"


def cancelled_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [asyncio.CancelledError, GeneratorExit]
    trio = sys.modules.get("trio")
    if trio is not None:
        types.append(trio.Cancelled)
    return tuple(types)


def deadline_expired(error: BaseException | None = None) -> bool:
    """True when an enclosing cancel scope was cancelled by its deadline, or ``error``
    is the cancellation a resilience Timeout delivered."""
    if error is not None and error.args[:1] == (EXPIRED,):
        return True
    try:
        return _trio_deadline_expired() or _asyncio_deadline_expired()
    except Exception:  # internals moved: treat as a plain cancellation
        return False


def _trio_deadline_expired() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        task = trio.lowlevel.current_task()
    except RuntimeError:
        return False
    now = trio.current_time()
    status: Any = task._cancel_status
    while status is not None:
        scope = status._scope
        if scope.cancel_called and scope.deadline <= now:
            return True
        status = status._parent
    return False


def _asyncio_deadline_expired() -> bool:
    anyio_asyncio = sys.modules.get("anyio._backends._asyncio")
    if anyio_asyncio is None:
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    state = anyio_asyncio._task_states.get(task) if task is not None else None
    scope: Any = state.cancel_scope if state is not None else None
    if scope is None:
        return False
    now = asyncio.get_running_loop().time()  # anyio's asyncio deadlines use loop time
    while scope is not None:
        if scope.cancel_called and scope.deadline <= now:
            return True
        scope = scope._parent_scope
    return False
