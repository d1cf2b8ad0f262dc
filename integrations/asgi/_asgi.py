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
    "first",
    "headers_of",
    "joined",
    "patterns",
    "values",
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
