"""HTTP dates (RFC 9110 section 5.6.7), parsed strictly.

``email.utils`` accepts far more than HTTP allows: ``UTC`` or ``-0000`` for ``GMT``,
two-digit years, no comma, dashes, single-digit hours. A cache that reads those as
dates keeps responses the origin's own clients would treat as already expired
(RFC 9111 section 5.3), so only the three HTTP-date forms are accepted here:

- IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT`` (what senders must generate);
- rfc850-date ``Sunday, 06-Nov-94 08:49:37 GMT`` (the only form with a two-digit year);
- asctime-date ``Sun Nov  6 08:49:37 1994``.

Names of days and months and the zone are matched without regard to case: HTTP-date is
case-sensitive, but a lower-case ``gmt`` is a sender's slip, not another date.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Final

__all__ = ["format_http_date", "http_date"]

_DAY: Final = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_DAY_LONG: Final = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTH: Final = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_TIME: Final = r"(\d\d):(\d\d):(\d\d)"
_IMF: Final = re.compile(rf"{_DAY}, (\d\d) {_MONTH} (\d{{4}}) {_TIME} gmt", re.I | re.A)
_RFC850: Final = re.compile(rf"{_DAY_LONG}, (\d\d)-{_MONTH}-(\d\d) {_TIME} gmt", re.I | re.A)
_ASCTIME: Final = re.compile(rf"{_DAY} {_MONTH} ([ \d]\d) {_TIME} (\d{{4}})", re.I | re.A)
_MONTHS: Final = {m: i for i, m in enumerate(_MONTH[1:-1].split("|"), 1)}
_NAMES: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES: Final = tuple(m.title() for m in _MONTHS)


def _timestamp(year: int, month: int, day: int, h: int, m: int, s: int) -> float | None:
    if year < 1 or not (1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    if not (h < 24 and m < 60 and s <= 60):
        return None
    # A leap second (:60) is the last instant of its minute.
    return float(calendar.timegm((year, month, day, h, m, min(s, 59), 0, 0, 0)))


def http_date(value: str | None, *, now: float | None = None) -> float | None:
    """An HTTP-date as a POSIX timestamp; None when absent or not exactly one HTTP-date.

    ``now`` places an rfc850-date's two-digit year: one that would be more than 50 years
    ahead of ``now`` is the most recent past year with those digits (RFC 9110 5.6.7).
    Without ``now``, 70-99 are 1970-1999 and 00-69 are 2000-2069.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    if (found := _IMF.fullmatch(text)) is not None:
        day, month, year, h, m, s = found.groups()
        return _timestamp(int(year), _MONTHS[month.lower()], int(day), int(h), int(m), int(s))
    if (found := _ASCTIME.fullmatch(text)) is not None:
        month, day, h, m, s, year = found.groups()
        if day[0] == " " and day[1] == "0":
            return None  # " 0" is no day of the month
        return _timestamp(int(year), _MONTHS[month.lower()], int(day), int(h), int(m), int(s))
    if (found := _RFC850.fullmatch(text)) is not None:
        day, month, yy, h, m, s = found.groups()
        year = _century(int(yy), now)
        return _timestamp(year, _MONTHS[month.lower()], int(day), int(h), int(m), int(s))
    return None


def _century(yy: int, now: float | None) -> int:
    if now is None:
        return 1900 + yy if yy >= 70 else 2000 + yy
    this_year = time.gmtime(now).tm_year
    year = this_year - this_year % 100 + yy
    if year > this_year + 50:
        year -= 100
    elif year <= this_year - 50:
        year += 100
    return year


def format_http_date(timestamp: float) -> str:
    """``timestamp`` as an IMF-fixdate, the form every sender must generate."""
    tm = time.gmtime(int(timestamp))
    return (
        f"{_NAMES[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTH_NAMES[tm.tm_mon - 1]} "
        f"{tm.tm_year:04d} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT"
    )
