"""Reading the limits a server publishes: sans-IO, no clock, no httpx.

:func:`read_limits` takes a response's status and header fields and returns what they
say about the quota, or None when they say nothing (the common case, decided with one
pass over the field names). It understands:

- ``RateLimit`` and ``RateLimit-Policy`` of draft-ietf-httpapi-ratelimit-headers (-08
  and later): lists of items such as ``"burst";r=0;t=30`` and ``"burst";q=100;w=60``.
  With several items, the one with the fewest requests left decides (on a tie, the one
  that resets last); an item without ``t`` takes its policy's window ``w``.
- The older forms: the ``RateLimit: limit=100, remaining=0, reset=30`` dictionary
  (-07), the ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` trio (-06 and before),
  and the common ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` trio, whose reset
  is delta seconds or, when it is larger than a billion, a Unix time (seconds, or
  milliseconds past 10^12) compared with ``now``.
- ``Retry-After`` on 429 and 503, in delta seconds or as an HTTP-date (against ``now``).

Malformed values are ignored, field by field: a server's typo never raises.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["RETRY_AFTER_STATUS", "ServerLimits", "read_limits", "retry_after_seconds"]

#: Statuses whose Retry-After is a wait before the next request (on a 3xx it is not).
RETRY_AFTER_STATUS: Final = frozenset({429, 503})

_FIELDS: Final = frozenset(
    {
        b"ratelimit",
        b"ratelimit-policy",
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"retry-after",
    }
)
_EPOCH: Final = 1e9  # a reset above this is a Unix time, not a delta
_EPOCH_MS: Final = 1e12
_NUMBER: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one response said about the server's quota (any field may be missing)."""

    #: Requests left in the current window (the fewest of the items).
    remaining: int | None = None
    #: Seconds until that window ends (its quota is restored).
    reset: float | None = None
    #: Requests per window (``q`` of the matching policy, or the Limit field).
    quota: int | None = None
    #: The policy's window in seconds (``w``).
    window: float | None = None
    #: Seconds to wait before the next request (Retry-After on a 429 or 503).
    retry_after: float | None = None

    @property
    def wait(self) -> float:
        """Seconds the server asks every request to wait: Retry-After, or the time to
        the reset when nothing is left; 0.0 when it asks for nothing."""
        wait = self.retry_after or 0.0
        if self.remaining == 0 and self.reset is not None and self.reset > wait:
            wait = self.reset
        return wait


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    found = _NUMBER.match(text)
    if found is None:
        return None
    value = float(found.group(1))
    return value if math.isfinite(value) else None


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After value in seconds from ``now`` (a Unix time): delta seconds or an
    HTTP-date; None when it is neither. A date in the past is 0.0."""
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        # Typed as never None; some Python versions return None on junk all the same.
        when: datetime.datetime | None = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if not isinstance(when, datetime.datetime):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


def _split(value: str, sep: str) -> list[str]:
    """``value`` split on ``sep`` outside double quotes, members stripped."""
    out, start, quoted, i = [], 0, False, 0
    while i < len(value):
        c = value[i]
        if quoted and c == "\\":
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            out.append(value[start:i].strip())
            start = i + 1
        i += 1
    out.append(value[start:].strip())
    return [m for m in out if m]


def _items(value: str) -> list[tuple[str, dict[str, str]]]:
    """A structured-field list: (item, {parameter: value}) per member."""
    items = []
    for member in _split(value, ","):
        parts = _split(member, ";")
        name = parts[0].strip('"') if parts else ""
        params = {}
        for part in parts[1:]:
            key, _, val = part.partition("=")
            params[key.strip().lower()] = val.strip().strip('"')
        items.append((name, params))
    return items


def _reset(value: float | None, now: float) -> float | None:
    """A reset in seconds from now: delta seconds, or a Unix time (s or ms)."""
    if value is None:
        return None
    if value > _EPOCH_MS:
        value /= 1000.0
    if value > _EPOCH:
        return max(0.0, value - now)
    return value


def _whole(value: float | None) -> int | None:
    return None if value is None else int(value)


def read_limits(
    status: int, headers: Iterable[tuple[bytes, bytes]], now: float
) -> ServerLimits | None:
    """What a response's fields say about the server's limits, or None: see the module
    docstring. ``headers`` are raw (name, value) pairs in any case; ``now`` is the
    wall-clock time (Unix seconds) that dates and Unix-time resets are measured from."""
    found: dict[bytes, list[str]] = {}
    for raw_name, raw_value in headers:
        field = raw_name.lower()
        if field in _FIELDS:
            found.setdefault(field, []).append(raw_value.decode("latin-1"))
    if not found:
        return None
    remaining = reset = quota = window = retry_after = None

    policies: dict[str, tuple[float | None, float | None]] = {}
    for value in found.get(b"ratelimit-policy", ()):
        for name, params in _items(value):
            policies[name] = (_number(params.get("q")), _number(params.get("w")))
    # Candidates (remaining, reset or None, policy name): the fewest left wins, and on a
    # tie the one that resets last.
    candidates: list[tuple[float, float | None, str]] = []
    for value in found.get(b"ratelimit", ()):
        members = _items(value)
        if members and all("=" in name for name, _ in members):  # draft -07 dictionary
            fields = dict(name.split("=", 1) for name, _ in members)
            r = _number(fields.get("remaining"))
            if r is not None:
                candidates.append((r, _reset(_number(fields.get("reset")), now), ""))
            quota = _whole(_number(fields.get("limit")))
            continue
        for name, params in members:
            r = _number(params.get("r"))
            if r is not None:
                t = _number(params.get("t"))
                candidates.append(
                    (r, t if t is not None else policies.get(name, (None, None))[1], name)
                )
    if candidates:
        r, reset, name = min(candidates, key=lambda c: (c[0], -(c[1] or 0.0)))
        remaining = int(r)
        q, window = policies.get(name, (None, None))
        quota = _whole(q) if q is not None else quota
    elif len(policies) == 1:
        q, window = next(iter(policies.values()))
        quota = _whole(q)

    for prefix in (b"ratelimit-", b"x-ratelimit-"):
        if remaining is not None:
            break
        left = _number(_first(found, prefix + b"remaining"))
        if left is None:
            continue
        remaining = int(left)
        reset = _reset(_number(_first(found, prefix + b"reset")), now)
        limit = _first(found, prefix + b"limit")
        if limit is not None:  # "100" or "100, 100;w=60"
            first = _items(limit)
            quota = _whole(_number(first[0][0])) if first else None
            # "100, 100;w=60": the quota, then the policies that say their window.
            window = next((w for _, p in first if (w := _number(p.get("w"))) is not None), None)

    if status in RETRY_AFTER_STATUS:
        retry_after = retry_after_seconds(_first(found, b"retry-after"), now)
    if remaining is None and reset is None and quota is None and retry_after is None:
        return None
    return ServerLimits(remaining, reset, quota, window, retry_after)


def _first(found: dict[bytes, list[str]], name: bytes) -> str | None:
    values = found.get(name)
    return values[0] if values else None
