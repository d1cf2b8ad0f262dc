"""Invalidation (RFC 9111 section 4.4): what an unsafe request's response evicts."""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

from resilience.http.caching import Headers

__all__ = ["SAFE_METHODS", "invalidated_targets", "invalidates", "normalise_percent"]

#: Safe methods (RFC 9110 section 9.2.1 and the IANA method registry). Every other
#: method, one never heard of included, is unsafe.
SAFE_METHODS: Final = frozenset(
    {"GET", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "REPORT", "SEARCH", "QUERY"}
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_PERCENT: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _percent(found: re.Match[str]) -> str:
    char = chr(int(found.group(1), 16))
    return char if char in _UNRESERVED else "%" + found.group(1).upper()


def normalise_percent(text: str) -> str:
    """A path or query with its percent-encoding normalised for use in a cache key
    (RFC 3986 section 6.2.2.1-2): hex digits in upper case, encoded unreserved characters
    decoded (``%7E`` is ``~``, ``%41`` is ``A``). Reserved characters stay encoded,
    since encoding them changes the meaning (``%2F`` is not ``/``, ``%3F`` not ``?``);
    so do malformed escapes."""
    return _PERCENT.sub(_percent, text) if "%" in text else text


def invalidates(method: str, status: int) -> bool:
    """Whether a response to ``method`` invalidates stored responses: a non-error one
    (2xx or 3xx) to an unsafe method."""
    return method not in SAFE_METHODS and 200 <= status < 400


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int | None] | None:
    try:
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def invalidated_targets(
    scheme: str, authority: str, target: str, headers: Headers
) -> list[tuple[str, str]]:
    """(path, query) of every URI a response invalidates: the request's own target,
    and the ``Location`` and ``Content-Location`` URIs (resolved against it) that have
    the same origin. A URI on another origin is never invalidated: that would let one
    origin evict another's responses."""
    base = f"{scheme}://{authority}{target}"
    own = urllib.parse.urlsplit(base)
    found = [(own.path or "/", own.query)]
    origin = _origin(own)
    for name in (b"location", b"content-location"):
        lines = [v for k, v in headers if k == name]
        if len(lines) != 1:
            continue  # absent, or several lines: not one URI
        try:
            uri = lines[0].decode("latin-1").strip(" \t")
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(base, uri))
        except ValueError:
            continue
        if origin is not None and _origin(parts) == origin:
            pair = (parts.path or "/", parts.query)
            if pair not in found:
                found.append(pair)
    return found
