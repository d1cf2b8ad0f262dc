"""Range requests answered from a stored complete response (RFC 9110 section 14).

One byte range is served as 206 with ``Content-Range``; a range that starts past the end
is 416. Anything else (several ranges, another unit, bad syntax) is ignored and the whole
representation is sent as 200, which a server may always do.
"""

from __future__ import annotations

import enum
from typing import Final

from resilience.http.dates import http_date

__all__ = ["UNSATISFIABLE", "byte_range", "content_range", "if_range_matches"]


class _Unsatisfiable(enum.Enum):
    UNSATISFIABLE = "unsatisfiable"


#: :func:`byte_range`'s answer when the range lies outside the representation: 416.
UNSATISFIABLE: Final = _Unsatisfiable.UNSATISFIABLE


def _position(text: str) -> int | None:
    text = text.strip(" \t")
    return int(text) if text.isascii() and text.isdigit() else None


def byte_range(value: str | None, length: int) -> tuple[int, int] | _Unsatisfiable | None:
    """The one byte range a ``Range`` field asks of ``length`` bytes, as (first, last),
    both inclusive; :data:`UNSATISFIABLE`; or None: send the whole representation."""
    if value is None:
        return None
    unit, eq, spec = value.strip(" \t").partition("=")
    if not eq or unit.lower() != "bytes":
        return None
    specs = [s for s in (p.strip(" \t") for p in spec.split(",")) if s]
    if len(specs) != 1:
        return None
    first_text, dash, last_text = specs[0].partition("-")
    if not dash:
        return None
    if not first_text.strip(" \t"):  # suffix-range: the last N bytes
        suffix = _position(last_text)
        if suffix is None:
            return None
        if suffix == 0 or length == 0:
            return UNSATISFIABLE
        return max(0, length - suffix), length - 1
    first = _position(first_text)
    last = _position(last_text) if last_text.strip(" \t") else None
    if first is None or (last is None and last_text.strip(" \t")):
        return None
    if last is not None and last < first:
        return None  # an invalid range-spec: the field is ignored (section 14.1.1)
    if first >= length:
        return UNSATISFIABLE
    return first, length - 1 if last is None else min(last, length - 1)


def content_range(found: tuple[int, int] | _Unsatisfiable, length: int) -> bytes:
    """The ``Content-Range`` value for a 206 or a 416 (section 14.4)."""
    if found is UNSATISFIABLE:
        return f"bytes */{length}".encode()
    first, last = found
    return f"bytes {first}-{last}/{length}".encode()


def if_range_matches(
    value: str | None, *, etag: str | None, last_modified: str | None, date: float
) -> bool:
    """Whether ``Range`` applies under ``If-Range`` (RFC 9110 section 13.1.5): absent,
    or it names the stored representation by a strong validator: the same strong
    entity tag, or exactly its ``Last-Modified`` when that is at least a second before
    its ``Date`` (only then is a date strong, section 8.8.2.2)."""
    if value is None:
        return True
    value = value.strip(" \t")
    if value.startswith(('"', "W/")):
        return etag is not None and not etag.startswith("W/") and value == etag.strip(" \t")
    when = http_date(value)
    modified = http_date(last_modified)
    return when is not None and when == modified and date >= when + 1
