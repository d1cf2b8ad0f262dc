"""The rules a cache applies to a response: parse, decide, compute lifetimes.

Header lists are ``[(name, value), ...]`` with lower-case byte names, as ASGI has them.
Every parser here is quote-aware: a comma or a ``max-age=`` inside a quoted string is
data, not syntax (RFC 9110 section 5.6.4), so an origin's quoted extension directives
cannot change how long we keep a response.
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Collection, Iterator, Sequence
from typing import Final

__all__ = [
    "Headers",
    "cache_control",
    "delta_seconds",
    "etag_matches",
    "field",
    "freshness_lifetime",
    "http_date",
    "split_list",
    "storable",
]

Headers = Sequence[tuple[bytes, bytes]]

# RFC 9111 section 1.2.2: a delta-seconds too large to represent is taken as 2^31.
_MAX_DELTA: Final = 2**31
_WS: Final = " \t"


def field(headers: Headers, name: bytes) -> str | None:
    """All lines of field ``name`` joined by ", " (RFC 9110 section 5.3), or None."""
    values = [v for k, v in headers if k == name]
    return b", ".join(values).decode("latin-1") if values else None


def _members(value: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each comma-separated member, commas inside quotes skipped."""
    start, i, n, quoted = 0, 0, len(value), False
    while i < n:
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1  # a quoted-pair: the next character is data
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ",":
            yield start, i
            start = i + 1
        i += 1
    yield start, n


def split_list(value: str | None) -> list[str]:
    """The non-empty members of a list field (``#element``), quotes respected."""
    if not value:
        return []
    members = (value[a:b].strip(_WS) for a, b in _members(value))
    return [m for m in members if m]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        out, i, body = [], 0, text[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                i += 1
            out.append(body[i])
            i += 1
        return "".join(out)
    return text


def cache_control(value: str | None) -> dict[str, str | None]:
    """Directive name (lower case) -> argument (unquoted), or None without one.

    Names are case-insensitive (RFC 9111 section 5.2); both the token and the
    quoted-string form of an argument are accepted. A directive given twice keeps its
    first value (section 4.2.1 allows using the first occurrence).
    """
    directives: dict[str, str | None] = {}
    for member in split_list(value):
        name, eq, arg = member.partition("=")
        name = name.strip(_WS).lower()
        if name and name not in directives:
            directives[name] = _unquote(arg.strip(_WS)) if eq else None
    return directives


def delta_seconds(arg: str | None) -> int | None:
    """A delta-seconds argument, capped at 2^31; None when it is not one (then a
    cache must not trust it: the response is treated as stale)."""
    if arg is None or not arg.isascii() or not arg.isdigit():
        return None
    return min(int(arg), _MAX_DELTA)


def http_date(value: str | None) -> float | None:
    """An HTTP date as a POSIX timestamp; None when absent or invalid.

    A zone-less result (``-0000`` parses that way) is UTC, as HTTP dates always are,
    never the host's local time.
    """
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def freshness_lifetime(
    directives: dict[str, str | None],
    expires: str | None,
    now: float,
    default: float | None,
    *,
    shared: bool = True,
) -> float | None:
    """Seconds a response stays fresh (RFC 9111 section 4.2.1), None when it may not
    be kept at all: s-maxage (shared caches), then max-age, then Expires, then
    ``default``. An invalid or zero value means "already stale"."""
    for name in ("s-maxage", "max-age") if shared else ("max-age",):
        if name in directives:
            seconds = delta_seconds(directives[name])
            return float(seconds) if seconds else None
    if expires is not None:
        when = http_date(expires)
        if when is None:
            return None  # an invalid Expires means "already expired" (section 5.3)
        left = when - now
        return left if left > 0 else None
    return default


def storable(
    status: int,
    headers: Headers,
    *,
    statuses: Collection[int],
    default: float | None,
    now: float,
    shared: bool = True,
) -> tuple[float, list[str]] | None:
    """(seconds to keep, the request fields the response varies on, sorted), or None
    when the response must not be stored.

    Never stored: a status outside ``statuses``; ``Set-Cookie``; ``no-store``,
    ``no-cache`` or, in a shared cache, ``private`` (with or without field names: we
    do not store a response minus some of its fields); ``Vary: *``.
    """
    if status not in statuses:
        return None
    if any(k == b"set-cookie" for k, _ in headers):
        return None
    directives = cache_control(field(headers, b"cache-control"))
    refused = ("no-store", "no-cache", "private") if shared else ("no-store", "no-cache")
    if any(name in directives for name in refused):
        return None
    vary = sorted({v.lower() for v in split_list(field(headers, b"vary"))})
    if "*" in vary:
        return None
    seconds = freshness_lifetime(
        directives, field(headers, b"expires"), now, default, shared=shared
    )
    return None if seconds is None else (seconds, vary)


def _opaque(tag: str) -> str:
    tag = tag.strip(_WS)
    return tag[2:] if tag.startswith("W/") else tag


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match against a stored entity tag, by weak comparison (RFC 9110
    section 13.1.2): ``W/"x"`` matches ``"x"``. Tags may contain commas."""
    if if_none_match is None:
        return False
    tags = split_list(if_none_match)
    return "*" in tags or _opaque(etag) in {_opaque(t) for t in tags}
