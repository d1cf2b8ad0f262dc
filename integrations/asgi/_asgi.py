"""What every middleware here shares: the ASGI types, header lookup, path patterns."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = [
    "ASGIApp",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "Watched",
    "first",
    "headers_of",
    "joined",
    "patterns",
    "values",
    "watched",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]


def headers_of(scope_or_message: MutableMapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """A scope's or message's headers as bytes, names lower-cased (apps may send any case)."""
    return [(bytes(k).lower(), bytes(v)) for k, v in scope_or_message.get("headers", ())]


def values(headers: Headers, name: bytes) -> list[bytes]:
    """Every line of field ``name``, in order."""
    return [bytes(v) for k, v in headers if k == name]


def first(headers: Headers, name: bytes) -> bytes | None:
    """The first line of field ``name``, or None."""
    for key, value in headers:
        if key == name:
            return bytes(value)
    return None


def joined(headers: Headers, name: bytes) -> bytes | None:
    """All lines of field ``name`` joined by ", " (RFC 9110 section 5.3), or None."""
    found = values(headers, name)
    return b", ".join(found) if found else None


def patterns(regexes: Iterable[str], field: str) -> list[re.Pattern[str]]:
    """Compiled path patterns; a bad one raises ValueError naming ``field``."""
    compiled = []
    for value in regexes:
        try:
            compiled.append(re.compile(value))
        except (re.error, TypeError) as e:
            raise ValueError(f"{field}: {value!r} is not a regular expression: {e}") from None
    return compiled


class _ClientGone(Exception):
    """The client went away while the response was written."""


class Watched:
    """How an app's response went, as a breaker or a limit must judge it.

    ``ignored``: no verdict on the app (the client went away before a response started,
    or while it was written, or the app failed after the client went away); otherwise
    ``error`` is what the app raised, or None and ``status`` is the response's status.
    """

    __slots__ = ("error", "ignored", "status")

    def __init__(self) -> None:
        self.status = 0
        self.error: BaseException | None = None
        self.ignored = False


async def watched(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> Watched:
    """Run ``app``, watching its status and the client's disconnect. An exception of the
    app (cancellation too) is kept in ``error``, not raised: the caller records its
    verdict, then raises it (``raise seen.error``)."""
    seen = Watched()
    disconnected = False

    async def watch_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen.status = int(message["status"])
        try:
            await send(message)
        except OSError as e:  # the client went away while we wrote
            raise _ClientGone() from e

    async def watch_receive() -> Message:
        nonlocal disconnected
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected = True
        return message

    try:
        await app(scope, watch_receive, watch_send)
    except _ClientGone as gone:
        seen.ignored = True
        seen.error = gone.__cause__ if gone.__cause__ is not None else gone
    except BaseException as error:
        seen.error = error
        seen.ignored = disconnected
    else:
        seen.ignored = disconnected and seen.status == 0
    return seen
