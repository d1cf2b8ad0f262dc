"""The rules a cache applies to a response: parse, decide, compute lifetimes and ages.

Header lists are ``[(name, value), ...]`` with lower-case byte names, as ASGI and httpx
have them. Every parser here is quote-aware: a comma or a ``max-age=`` inside a quoted
string is data, not syntax (RFC 9110 section 5.6.4), so an origin's quoted extension
directives cannot change how long a response is kept.

One module serves shared and private caches: :class:`CachePolicy` says which one is
asking (``shared``), and the few rules that differ (``s-maxage``, ``private``,
``proxy-revalidate``, ``Authorization``, ``Set-Cookie``) read that flag.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, NamedTuple

from resilience.http.dates import http_date
from resilience.http.structured import parse_dictionary

__all__ = [
    "DEFAULT_POLICY",
    "HEURISTIC_STATUSES",
    "HOP_BY_HOP",
    "QUOTA_FIELDS",
    "UNDERSTOOD_STATUSES",
    "CachePolicy",
    "Freshness",
    "Headers",
    "Storable",
    "age_value",
    "cache_control",
    "corrected_initial_age",
    "delta_seconds",
    "etag_matches",
    "field",
    "freshness_lifetime",
    "http_date",
    "response_directives",
    "split_list",
    "storable",
    "targeted_directives",
    "vary_fields",
]

Headers = Sequence[tuple[bytes, bytes]]

# RFC 9111 section 1.2.2: a delta-seconds too large to represent is taken as 2^31.
_MAX_DELTA: Final = 2**31
_WS: Final = " \t"

#: Statuses a response may be stored with heuristic freshness (RFC 9110 section 15.1).
HEURISTIC_STATUSES: Final = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: Final statuses whose caching requirements this module implements, for
#: ``must-understand`` (RFC 9111 section 5.2.2.3): every status RFC 9110 defines except
#: 206 (storing partial content) and 304 (it only ever freshens a stored response).
UNDERSTOOD_STATUSES: Final = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 305, 307, 308}
    | set(range(400, 418))
    | {421, 422, 426, 500, 501, 502, 503, 504, 505}
)
#: Fields that describe one connection, never stored (RFC 9110 section 7.6.1, RFC 9111
#: section 3.1: the proxy fields unless the key names the proxy).
#: Fields that tell one client its quota at the moment they were sent (the IETF RateLimit
#: fields, the common X-RateLimit trio, Retry-After): a cache never replays them.
QUOTA_FIELDS: Final = frozenset(
    {
        b"ratelimit",
        b"ratelimit-policy",
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"retry-after",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
    }
)
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


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


def _unquote(text: str) -> str | None:
    """A quoted-string's content, a token as it is; None when the quoting is broken."""
    if not text.startswith('"'):
        return None if '"' in text else text
    if len(text) < 2 or not text.endswith('"'):
        return None
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            i += 1
        elif body[i] == '"':
            return None  # a quote in the middle: not one quoted-string
        out.append(body[i])
        i += 1
    return "".join(out)


def cache_control(value: str | None) -> dict[str, str | None]:
    """Directive name (lower case) -> argument (unquoted), or None without one.

    Names are case-insensitive (RFC 9111 section 5.2); both the token and the
    quoted-string form of an argument are accepted. A directive given twice keeps its
    first value (section 4.2.1 allows using the first occurrence). A malformed argument
    (whitespace around ``=``, broken quoting) reads as ``""``: the directive is still
    there, so ``no-store =x`` still forbids storing, but ``max-age =60`` grants nothing.
    """
    directives: dict[str, str | None] = {}
    for member in split_list(value):
        name, eq, arg = member.partition("=")
        token = name.rstrip(_WS)
        key = token.lower()
        if not key or key in directives:
            continue
        if not eq:
            directives[key] = None
        elif token != name or arg[:1] in (" ", "\t"):
            directives[key] = ""  # RFC 9110 5.6.2: no whitespace around "="
        else:
            directives[key] = _unquote(arg) or ""
    return directives


def delta_seconds(arg: str | None) -> int | None:
    """A delta-seconds argument, capped at 2^31; None when it is not one (then a
    cache must not trust it: the response is treated as stale)."""
    if arg is None or not arg.isascii() or not arg.isdigit():
        return None
    return min(int(arg), _MAX_DELTA)


# Targeted fields (RFC 9213 section 2.1) are Dictionaries; these are the types a
# directive's value must have there, or the whole field is invalid.
_DELTA_DIRECTIVES: Final = frozenset(
    {"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"}
)
_FLAG_DIRECTIVES: Final = frozenset(
    {
        "no-store",
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "must-understand",
        "no-transform",
        "immutable",
    }
)
_FIELD_LIST_DIRECTIVES: Final = frozenset({"no-cache", "private"})


def targeted_directives(value: str | None) -> dict[str, str | None] | None:
    """A targeted cache-control field (``CDN-Cache-Control``) as directives, in the form
    :func:`cache_control` gives; None when the field is absent, empty or invalid (not a
    Structured Field Dictionary, or a known directive with a value of the wrong type),
    in which case RFC 9213 has the cache fall back to ``Cache-Control``."""
    members = parse_dictionary(value)
    if not members:
        return None
    directives: dict[str, str | None] = {}
    for name, item in members.items():
        if item is False:
            continue  # ?0: the directive is off
        if name in _DELTA_DIRECTIVES:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                return None
            directives[name] = str(min(item, _MAX_DELTA))
        elif name in _FLAG_DIRECTIVES:
            if item is not True:
                return None
            directives[name] = None
        elif name in _FIELD_LIST_DIRECTIVES:
            if item is True:
                directives[name] = None
            elif isinstance(item, str):
                directives[name] = item
            elif isinstance(item, tuple) and all(isinstance(i, str) for i in item):
                directives[name] = ", ".join(str(i) for i in item)
            else:
                return None
        else:
            directives[name] = None if item is True else str(item)
    return directives


@dataclasses.dataclass(frozen=True, slots=True)
class CachePolicy:
    """Which cache is asking, and how it fills the gaps the origin left.

    - ``shared``: a shared cache (a proxy, a CDN, server-side middleware) or a private
      one (a client's own cache, where ``private`` responses may be stored, RFC 9111
      section 3.5).
    - ``targets``: the targeted cache-control fields this cache obeys, first match wins
      (RFC 9213), lower-case names such as ``"cdn-cache-control"``. A valid one
      replaces ``Cache-Control`` and ``Expires`` for that response.
    - ``heuristic_statuses``: statuses stored without explicit freshness (RFC 9110
      section 15.1); ``heuristic_fraction`` of the time since ``Last-Modified``, at most
      ``heuristic_max`` seconds, is their lifetime (RFC 9111 section 4.2.2).
    - ``stale_if_error``: seconds a stale response may stand in for an error when the
      origin did not say (an out-of-band contract, RFC 9111 section 4.2.4); 0 by default.
    """

    shared: bool = True
    targets: tuple[str, ...] = ()
    heuristic_statuses: frozenset[int] = HEURISTIC_STATUSES
    heuristic_fraction: float = 0.1
    heuristic_max: float = 86_400.0
    stale_if_error: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.shared, bool):
            raise TypeError(f"shared must be a bool, got {self.shared!r}")
        if not isinstance(self.targets, tuple) or not all(
            isinstance(t, str) and t and t == t.lower() for t in self.targets
        ):
            raise ValueError(f"targets must be lower-case field names, got {self.targets!r}")
        if not all(isinstance(s, int) and 100 <= s <= 599 for s in self.heuristic_statuses):
            raise ValueError(
                f"heuristic_statuses must be HTTP status codes, got {self.heuristic_statuses!r}"
            )
        _check_number("heuristic_fraction", self.heuristic_fraction, zero=True, upper=1.0)
        _check_number("heuristic_max", self.heuristic_max, zero=True)
        _check_number("stale_if_error", self.stale_if_error, zero=True)


def _check_number(name: str, value: object, *, zero: bool, upper: float | None = None) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
        and (upper is None or value <= upper)
    )
    if not ok:
        bound = f" and at most {upper:g}" if upper is not None else ""
        raise ValueError(f"{name} must be a finite number >= 0{bound}, got {value!r}")


#: A shared cache with no targeted fields and the RFC's heuristics.
DEFAULT_POLICY: Final = CachePolicy()


def response_directives(
    headers: Headers, policy: CachePolicy
) -> tuple[dict[str, str | None], bool]:
    """(the directives that govern this response, whether they came from a targeted
    field). The first of ``policy.targets`` with a valid, non-empty value wins over
    ``Cache-Control``, and then ``Expires`` is ignored too (RFC 9213 section 2.2)."""
    for name in policy.targets:
        targeted = targeted_directives(field(headers, name.encode("latin-1")))
        if targeted is not None:
            return targeted, True
    return cache_control(field(headers, b"cache-control")), False


def age_value(headers: Headers) -> int:
    """The ``Age`` a response arrived with: the first member of the field (RFC 9111
    section 5.1 has a list-valued Age read that way), 0 when absent or invalid."""
    members = split_list(field(headers, b"age"))
    seconds = delta_seconds(members[0]) if members else None
    return seconds or 0


def corrected_initial_age(
    headers: Headers, *, date: float, request_time: float, response_time: float
) -> float:
    """How old the response already was when it arrived (RFC 9111 section 4.2.3): the
    larger of its apparent age (``response_time - date``) and its ``Age`` plus the
    time the request took."""
    apparent_age = max(0.0, response_time - date)
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age_value(headers) + response_delay)


class Freshness(NamedTuple):
    """What a cache needs to know, at any later moment, about a stored response's age
    and the uses it allows. A tuple, so it stores as plain data and rebuilds cheaply.

    ``lifetime`` is the freshness lifetime (section 4.2.1), ``corrected_initial_age``
    the age on arrival at ``response_time`` (section 4.2.3). ``no_cache``: validate
    before every use (section 5.2.2.4). ``must_revalidate``: once stale, never serve
    it without validation (``must-revalidate``; in a shared cache also
    ``proxy-revalidate`` and ``s-maxage``). The two windows are RFC 5861's.
    """

    lifetime: float
    corrected_initial_age: float
    response_time: float
    no_cache: bool = False
    must_revalidate: bool = False
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0

    def age(self, now: float) -> float:
        """current_age (section 4.2.3): the initial age plus the time resident here."""
        return self.corrected_initial_age + max(0.0, now - self.response_time)

    def is_fresh(self, now: float) -> bool:
        """Whether it may be served without contacting the origin (section 4.2)."""
        return not self.no_cache and self.age(now) < self.lifetime

    def may_serve_stale(self, now: float, *, error: bool = False) -> bool:
        """Whether this stale response may be served: while it is revalidated in the
        background (within ``stale-while-revalidate``), or, with ``error``, instead of a
        5xx or a failure to answer (within ``stale-if-error``). Never when no-cache or
        must-revalidate forbid serving it stale (section 4.2.4)."""
        if self.no_cache or self.must_revalidate:
            return False
        window = self.stale_if_error if error else self.stale_while_revalidate
        return self.lifetime <= self.age(now) < self.lifetime + window

    def retention(self, *, validator: bool, keep_stale: float) -> float:
        """Seconds after ``response_time`` a cache should keep the response: while it
        is fresh, then for the longest of its stale windows and, when it has a
        validator, ``keep_stale`` (time to revalidate it with a 304 rather than fetch it
        anew). 0 when it could never be used again."""
        fresh_for = max(0.0, self.lifetime - self.corrected_initial_age)
        windows = [keep_stale if validator else 0.0]
        if not (self.no_cache or self.must_revalidate):
            windows += [self.stale_while_revalidate, self.stale_if_error]
        extra = max(windows)
        if extra <= 0 and (fresh_for <= 0 or self.no_cache):
            return 0.0
        return fresh_for + extra


@dataclasses.dataclass(frozen=True, slots=True)
class Storable:
    """A response a cache may store, and how (see :func:`storable`).

    ``vary``: the request fields it varies on (lower case, sorted). ``omit``: fields
    not to store (connection fields, those named by ``Connection`` and by a qualified
    ``no-cache``, and ``Age``, recomputed on every use). ``validator``: it has an
    ``ETag`` or a valid ``Last-Modified``, so it can be revalidated. ``heuristic``: its
    lifetime is a heuristic (or the caller's default), not the origin's.
    """

    freshness: Freshness
    vary: tuple[str, ...]
    omit: frozenset[bytes]
    validator: bool
    heuristic: bool
    directives: dict[str, str | None]

    def stored_headers(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        """``headers`` without the fields that must not be stored."""
        omit = self.omit
        return [(k, v) for k, v in headers if k not in omit]


def vary_fields(headers: Headers) -> tuple[str, ...] | None:
    """The request fields a response varies on (lower case, sorted, once each), or None
    for ``Vary: *`` (in any member, on any line): such a response matches no request."""
    names = {v.lower() for v in split_list(field(headers, b"vary"))}
    return None if "*" in names else tuple(sorted(names))


def freshness_lifetime(
    directives: Mapping[str, str | None],
    headers: Headers,
    *,
    date: float,
    shared: bool = True,
    targeted: bool = False,
) -> float | None:
    """The explicit freshness lifetime in seconds (RFC 9111 section 4.2.1), None when
    the response has none: ``s-maxage`` (shared caches only), then ``max-age``, then
    ``Expires - Date``. An invalid value, or an ``Expires`` that is not exactly one
    HTTP-date, means "already stale": 0. ``targeted``: the directives came from a
    targeted field, and ``Expires`` does not count (RFC 9213 section 2.2)."""
    for name in ("s-maxage", "max-age") if shared else ("max-age",):
        if name in directives:
            seconds = delta_seconds(directives[name])
            return 0.0 if seconds is None else float(seconds)
    if not targeted:
        expires = field(headers, b"expires")
        if expires is not None:
            when = http_date(expires, now=date)
            return 0.0 if when is None else max(0.0, when - date)
    return None


def storable(
    status: int,
    headers: Headers,
    *,
    request_time: float,
    response_time: float,
    policy: CachePolicy = DEFAULT_POLICY,
    default: float | None = None,
    request_headers: Headers = (),
) -> Storable | None:
    """How a response may be stored (RFC 9111 section 3), or None when it must not be.

    Never stored: a non-final status, 206 or 304 (their handling is not implemented);
    ``no-store`` (unless ``must-understand`` with a status understood here, section
    5.2.2.3), ``must-understand`` with any other status; ``Vary: *``; a request with
    ``Cache-Control: no-store``. In a shared cache also: ``private`` (with or without
    field names: we never store a response minus some of its fields), ``Set-Cookie``
    (one client's cookie is no one else's), and a response to a request with
    ``Authorization`` unless ``public``, ``s-maxage`` or ``must-revalidate`` allow it
    (section 3.5). A response needs explicit freshness, ``public``, or a status in
    ``policy.heuristic_statuses``; for the latter two the lifetime is ``default`` when
    given, else the ``Last-Modified`` heuristic (section 4.2.2), else 0 (stored to be
    revalidated). ``no-cache`` and ``must-revalidate`` responses are stored: their
    :class:`Freshness` says they must be validated before use.
    """
    if status < 200 or status in (206, 304):
        return None
    directives, targeted = response_directives(headers, policy)
    shared = policy.shared
    if "must-understand" in directives:
        if status not in UNDERSTOOD_STATUSES:
            return None
    elif "no-store" in directives:
        return None
    if shared and ("private" in directives or any(k == b"set-cookie" for k, _ in headers)):
        return None
    vary = vary_fields(headers)
    if vary is None:
        return None
    if "no-store" in cache_control(field(request_headers, b"cache-control")):
        return None  # section 5.2.1.5
    if (
        shared
        and any(k == b"authorization" for k, _ in request_headers)
        and not {"public", "s-maxage", "must-revalidate"} & directives.keys()
    ):
        return None
    date = http_date(field(headers, b"date"), now=response_time)
    if date is None:
        date = response_time  # RFC 9110 6.6.1: a missing or invalid Date is "now"
    lifetime = freshness_lifetime(directives, headers, date=date, shared=shared, targeted=targeted)
    heuristic = lifetime is None
    last_modified = http_date(field(headers, b"last-modified"), now=response_time)
    if lifetime is None:
        allowed = status in policy.heuristic_statuses or "public" in directives
        if not allowed and (shared or "private" not in directives):
            return None  # nothing in section 3's list makes it storable
        if not allowed:
            lifetime = 0.0
        elif default is not None:
            lifetime = float(default)
        elif last_modified is not None and last_modified <= date:
            lifetime = min(policy.heuristic_fraction * (date - last_modified), policy.heuristic_max)
        else:
            lifetime = 0.0
    no_cache = directives.get("no-cache", "")
    omit = set(HOP_BY_HOP)
    omit.add(b"age")
    omit.update(n.lower().encode("latin-1") for n in split_list(field(headers, b"connection")))
    if no_cache:  # the qualified form: those fields only, never reused unvalidated
        omit.update(n.lower().encode("latin-1") for n in split_list(no_cache))
    freshness = Freshness(
        lifetime=lifetime,
        corrected_initial_age=corrected_initial_age(
            headers, date=date, request_time=request_time, response_time=response_time
        ),
        response_time=response_time,
        no_cache="no-cache" in directives and not no_cache,
        must_revalidate="must-revalidate" in directives
        or (shared and ("proxy-revalidate" in directives or "s-maxage" in directives)),
        stale_while_revalidate=float(delta_seconds(directives.get("stale-while-revalidate")) or 0),
        stale_if_error=_stale_if_error(directives, policy),
    )
    validator = any(k == b"etag" for k, _ in headers) or last_modified is not None
    return Storable(freshness, vary, frozenset(omit), validator, heuristic, directives)


def _stale_if_error(directives: Mapping[str, str | None], policy: CachePolicy) -> float:
    if "stale-if-error" in directives:
        return float(delta_seconds(directives["stale-if-error"]) or 0)
    return policy.stale_if_error


def _opaque(tag: str) -> str:
    tag = tag.strip(_WS)
    return tag[2:] if tag.startswith("W/") else tag


def etag_matches(if_none_match: str | None, etag: str | None) -> bool:
    """If-None-Match against a stored entity tag, by weak comparison (RFC 9110
    section 13.1.2): ``W/"x"`` matches ``"x"``; ``*`` matches any stored response.
    Tags may contain commas."""
    if if_none_match is None:
        return False
    tags = split_list(if_none_match)
    if "*" in tags:
        return True
    return etag is not None and _opaque(etag) in {_opaque(t) for t in tags}
