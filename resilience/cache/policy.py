"""Cache freshness rules, pure: they take ``now`` and a random number, read no clock.

An entry is fresh until ``fresh_until``. After that it may still be served while one
caller refreshes it (stale-while-revalidate), or when the loader fails
(stale-if-error), each within its own window. Before it expires, probabilistic early
refresh (XFetch, Vattani, Chierichetti and Lowenstein, VLDB 2015) lets one caller
refresh it a little early, with a probability that grows as expiry nears and with how
long the value took to load, so a popular key is rarely reloaded by many callers at once.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

__all__ = ["MISSING", "CachePolicy", "Entry", "Freshness"]


class _Missing(enum.Enum):
    MISSING = "missing"


#: What a tier returns for a key it does not hold (None is a value that can be cached).
MISSING: Final = _Missing.MISSING


class Entry(NamedTuple):
    value: Any
    #: Time (on the tier's clock) until which the value is fresh.
    fresh_until: float
    #: Seconds the value took to load: XFetch refreshes slow values earlier.
    delta: float
    #: Time until which the entry is kept at all (for stale serving); 0 means fresh_until.
    keep_until: float = 0.0


class Freshness(enum.Enum):
    FRESH = "fresh"
    REFRESH = "refresh"  # fresh, but this caller should refresh it early (XFetch)
    STALE = "stale"  # expired, within the stale-while-revalidate window
    EXPIRED = "expired"


def _seconds(field: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long values live and how a cache avoids stampedes. All times in seconds."""

    ttl: float = 300.0
    #: Shorten each TTL by up to this fraction, at random, so keys set together
    #: do not all expire together. Never lengthens a TTL.
    jitter: float = 0.0
    #: XFetch's beta: > 1 refreshes earlier, < 1 later; None turns early refresh off.
    early_refresh: float | None = None
    #: After expiry, serve the old value for this long while one caller refreshes.
    stale_while_revalidate: float = 0.0
    #: After expiry, serve the old value for this long when the loader fails.
    stale_if_error: float = 0.0
    #: Cache a loader's None for this long; None means None is never cached.
    negative_ttl: float | None = None

    def __post_init__(self) -> None:
        for field, allow_zero in (
            ("ttl", False),
            ("stale_while_revalidate", True),
            ("stale_if_error", True),
        ):
            object.__setattr__(
                self, field, _seconds(field, getattr(self, field), allow_zero=allow_zero)
            )
        if self.negative_ttl is not None:
            object.__setattr__(
                self, "negative_ttl", _seconds("negative_ttl", self.negative_ttl, allow_zero=False)
            )
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, (int, float))
            or not (0 <= self.jitter < 1)
        ):
            raise ValueError(f"jitter must be a fraction in [0, 1), got {self.jitter!r}")
        if self.early_refresh is not None:
            _seconds("early_refresh", self.early_refresh, allow_zero=False)

    @property
    def keep_for(self) -> float:
        """How long past freshness an entry is worth keeping (for stale serving)."""
        return max(self.stale_while_revalidate, self.stale_if_error)

    def ttl_for(self, value: Any, ttl: float | None, rand: float) -> float | None:
        """The TTL to store ``value`` with, or None when it must not be cached."""
        if value is None:
            if self.negative_ttl is None:
                return None
            base = self.negative_ttl
        else:
            base = self.ttl if ttl is None else ttl
        return base * (1.0 - self.jitter * rand) if self.jitter else base

    def freshness(self, entry: Entry, now: float, rand: float) -> Freshness:
        """Judge ``entry`` at ``now``; ``rand`` is uniform in (0, 1] (for XFetch)."""
        if now < entry.fresh_until:
            beta = self.early_refresh
            # XFetch: refresh when now - delta * beta * ln(rand) >= expiry.
            if (
                beta is not None
                and entry.delta > 0
                and rand > 0
                and now - entry.delta * beta * math.log(rand) >= entry.fresh_until
            ):
                return Freshness.REFRESH
            return Freshness.FRESH
        if now < entry.fresh_until + self.stale_while_revalidate:
            return Freshness.STALE
        return Freshness.EXPIRED

    def can_serve_on_error(self, entry: Entry, now: float) -> bool:
        """May ``entry`` stand in for a loader that just failed?"""
        return now < entry.fresh_until + max(self.stale_if_error, self.stale_while_revalidate)
