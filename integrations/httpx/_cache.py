"""The private cache's decisions (RFC 9111 with the private-cache rules of section 3.5),
with no I/O and no clock: every time is passed in. The rules themselves are
:mod:`resilience.http`'s; this module turns httpx requests and responses into what
those rules read, and builds the entries and the answers. ``_async_transport.py`` (and
its sync twin) does the I/O: the store, the network, the body.

An entry is stored under one key per URL (a record holding every variant), so a hit
is one lookup in the TwoTierCache. Keys hash a JSON list of the method, scheme,
authority, path and query (percent-encoding normalised as resilience.http does it), so
no URL can be spelled to reach another's entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import httpx

from resilience.cache import TwoTierCache
from resilience.clock import Clock
from resilience.http import (
    CONDITIONAL_FIELDS,
    QUOTA_FIELDS,
    CachePolicy,
    Freshness,
    Storable,
    cache_control,
    conditional_headers,
    delta_seconds,
    field,
    format_http_date,
    freshen,
    invalidated_targets,
    normalise_percent,
    selecting_values,
    storable,
)

__all__ = [
    "CACHE_BODY_LIMIT",
    "CACHE_EXTENSION",
    "KEEP_STALE",
    "Entry",
    "Lookup",
    "PrivateCache",
    "Record",
    "check_cache",
    "complete",
    "lower",
]

#: Where a response says what the cache did: "hit", "revalidated", "stale-if-error",
#: "miss" (looked up, not served from the cache) or "bypass" (not for the cache).
CACHE_EXTENSION: Final = "resilience.cache"
#: The largest body stored by default; a longer one passes through unstored.
CACHE_BODY_LIMIT: Final = 1 << 20
#: Seconds a stale entry with a validator is kept to be revalidated with a 304.
KEEP_STALE: Final = 3600.0
# The origin's stale windows count for a week at most; nothing is kept for more than ten
# years (the TwoTierCache takes at most a hundred).
_MAX_STALE_WINDOW: Final = 7 * 86_400.0
_MAX_RETENTION: Final = 10 * 365 * 86_400.0
# Variants of one URL kept in its record (the one retained longest stay).
_MAX_VARIANTS: Final = 16
_FORMAT: Final = "httpx-private-1"
_MEMO_KEYS: Final = 4096
_POLICY: Final = CachePolicy(shared=False)
# Request fields that make a request none of the cache's business: a body the key cannot
# see, or the caller's own validation or range (answered by the origin alone).
_BYPASS: Final = frozenset({b"content-length", b"transfer-encoding", b"range", *CONDITIONAL_FIELDS})
# Request fields that need a closer look; most requests carry none of them.
_NOTABLE: Final = _BYPASS | {b"cache-control", b"pragma", b"authorization", b"cookie"}
# Not replayed from a stored response: a cookie was set when the response arrived (a
# replay could undo a later one), and a quota describes the moment it was sent.
_NOT_REPLAYED: Final = frozenset({b"set-cookie", b"set-cookie2"}) | QUOTA_FIELDS

Headers = list[tuple[bytes, bytes]]
Entry = dict[str, Any]
Record = dict[str, Any]


def check_cache(cache: object, is_async: bool, side: str) -> Any:
    """``cache=`` checked: a TwoTierCache (or an object with all of its get, set, delete,
    aget, aset and adelete), on the Redis client kind this side needs."""
    if cache is None:
        return None
    names = ("get", "set", "delete", "aget", "aset", "adelete")
    if not isinstance(cache, TwoTierCache) and not all(
        callable(getattr(cache, n, None)) for n in names
    ):
        raise TypeError(f"cache must be a TwoTierCache, got {type(cache).__name__}")
    remote = getattr(cache, "remote", None)
    if remote is not None and getattr(remote, "is_async", is_async) != is_async:
        need = "a redis.asyncio" if is_async else "a sync redis.Redis"
        raise ValueError(f"cache: {side} needs a TwoTierCache whose RedisCache has {need} client")
    return cache


def lower(headers: httpx.Headers) -> Headers:
    """httpx's headers as resilience.http reads them: lower-case names, bytes."""
    return [(k.lower(), v) for k, v in headers.raw]


def complete(headers: Headers, size: int) -> bool:
    """Whether a body of ``size`` bytes is all that ``Content-Length`` promised."""
    length = field(headers, b"content-length")
    return length is None or length.strip() == str(size)


class Lookup(NamedTuple):
    """A cacheable request, read once: its record's key, its headers (lower-case names),
    its variant's credential part and its own cache directives."""

    key: str
    headers: Headers
    credentials: str
    directives: dict[str, str | None]


class PrivateCache:
    """The decisions of the transport's private cache over ``store`` (a TwoTierCache)."""

    def __init__(self, store: Any, *, max_body: int, name: str, clock: Clock) -> None:
        self.store = store
        self.max_body = max_body
        self.name = name
        self.policy = _POLICY
        #: The cache's clock when it has one (its entries expire on it), else ours.
        self.clock: Clock = getattr(store, "clock", None) or clock
        report = getattr(store, "report", None)
        self._report: Callable[..., None] | None = report if callable(report) else None
        # The keys of recent URLs: hashing one costs more than the rest of a hit.
        self._keys: dict[tuple[str, str, bytes, bytes], str] = {}

    def count(self, kind: str, tier: str, key: str) -> None:
        """Report to the cache's event sink, so metrics watching the cache see it."""
        if self._report is not None:
            self._report(kind, tier, key)

    # -- keys -------------------------------------------------------------------------------

    def url_key(self, method: str, scheme: str, authority: str, path: str, query: str) -> str:
        # A JSON list, not "scheme://host/path?query": no spelling of one part can move
        # text into another.
        parts = [
            _FORMAT,
            method,
            scheme.lower(),
            authority.lower(),
            normalise_percent(path or "/"),
            normalise_percent(query),
        ]
        raw = json.dumps(parts, ensure_ascii=True, separators=(",", ":"))
        return f"{self.name}:{hashlib.sha256(raw.encode()).hexdigest()}"

    def _request_key(self, request: httpx.Request) -> str:
        url = request.url
        memo = (request.method, url.scheme, url.netloc, url.raw_path)
        found = self._keys.get(memo)
        if found is None:
            found = self.url_key(
                request.method,
                url.scheme,
                url.netloc.decode("ascii"),
                url.raw_path.partition(b"?")[0].decode("latin-1"),
                url.query.decode("latin-1"),
            )
            if len(self._keys) >= _MEMO_KEYS:
                self._keys.clear()  # bounded, and cheap to rebuild
            self._keys[memo] = found
        return found

    def lookup(self, request: httpx.Request) -> Lookup | None:
        """The request read for the cache, or None when it is none of its business: not
        a GET, a body, the caller's own conditions or Range."""
        if request.method != "GET":
            return None
        headers = lower(request.headers)
        credentials = ""
        directives: dict[str, str | None] = {}
        if any(k in _NOTABLE for k, _ in headers):
            if any(k in _BYPASS for k, _ in headers):
                length = field(headers, b"content-length")
                if any(k in _BYPASS and k != b"content-length" for k, _ in headers) or (
                    length is not None and length.strip() != "0"
                ):
                    return None
            directives = cache_control(field(headers, b"cache-control"))
            if not directives and "no-cache" in (field(headers, b"pragma") or "").lower():
                directives = {"no-cache": None}  # RFC 9111 section 5.4
            auth, cookie = field(headers, b"authorization"), field(headers, b"cookie")
            if auth is not None or cookie is not None:
                # A private cache is one user's, but one transport may speak for several:
                # requests with other credentials never share an entry.
                digest = hashlib.sha256(json.dumps([auth, cookie]).encode()).hexdigest()
                credentials = digest[:32]
        return Lookup(self._request_key(request), headers, credentials, directives)

    @staticmethod
    def variant(vary: list[str], look: Lookup) -> str:
        if not vary and not look.credentials:
            return ""
        parts = [look.credentials, selecting_values(vary, look.headers)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def select(self, record: Record | None, look: Lookup) -> Entry | None:
        """The stored response for this request's variant, or None."""
        if not isinstance(record, dict):
            return None
        entries = record.get("e")
        if not isinstance(entries, dict):
            return None
        found = entries.get(self.variant(record.get("v") or [], look))
        return found if isinstance(found, dict) else None

    # -- using an entry ---------------------------------------------------------------------

    @staticmethod
    def freshness(entry: Entry) -> Freshness:
        return Freshness(*entry["f"])

    @staticmethod
    def usable(entry: Entry, now: float, look: Lookup) -> bool:
        """Whether the entry may answer without asking the origin: fresh (RFC 9111
        section 4.2) as the request's own ``no-cache``, ``max-age``, ``min-fresh`` and
        ``max-stale`` allow (section 5.2.1)."""
        freshness = Freshness(*entry["f"])
        directives = look.directives
        if not directives:
            return freshness.is_fresh(now)
        if "no-cache" in directives or freshness.no_cache:
            return False
        age = freshness.age(now)
        if "max-age" in directives:
            limit = delta_seconds(directives["max-age"])
            if limit is None or age > limit:
                return False
        left = freshness.lifetime - age
        if "min-fresh" in directives:
            wanted = delta_seconds(directives["min-fresh"])
            if wanted is None or left < wanted:
                return False
        if left > 0:
            return True
        if "max-stale" in directives and not freshness.must_revalidate:
            stale = directives["max-stale"]
            bound = None if stale is None else delta_seconds(stale)
            return stale is None or (bound is not None and -left <= bound)
        return False

    @staticmethod
    def stale_if_error(entry: Entry | None, now: float) -> bool:
        """Whether a stale entry may stand in for an error (RFC 5861 ``stale-if-error``)."""
        return entry is not None and Freshness(*entry["f"]).may_serve_stale(now, error=True)

    @staticmethod
    def answer(entry: Entry, now: float, how: str) -> httpx.Response:
        """A response from an entry, with its current ``Age`` (RFC 9111 section 4.2.3)."""
        age = Freshness(*entry["f"]).age(now)
        headers = [*entry["h"], (b"age", b"%d" % age)]
        return httpx.Response(
            entry["s"],
            headers=headers,
            stream=httpx.ByteStream(entry["b"]),
            extensions={CACHE_EXTENSION: how},
        )

    @staticmethod
    def conditional(request: httpx.Request, entry: Entry) -> httpx.Request | None:
        """The request made conditional on the entry's validators (RFC 9111 section
        4.3.1), or None when it has none. The caller's request is left as it is."""
        validators = conditional_headers(entry["et"], entry["lm"])
        if not validators:
            return None
        kept = [(k, v) for k, v in request.headers.raw if k.lower() not in CONDITIONAL_FIELDS]
        return httpx.Request(
            request.method,
            request.url,
            headers=kept + validators,
            stream=request.stream,
            extensions=request.extensions,
        )

    # -- storing ----------------------------------------------------------------------------

    def decide(
        self,
        status: int,
        headers: Headers,
        look: Lookup,
        request_time: float,
        response_time: float,
    ) -> Storable | None:
        """How a response may be stored (resilience.http's rules, private), or None."""
        return storable(
            status,
            headers,
            request_time=request_time,
            response_time=response_time,
            policy=self.policy,
            request_headers=look.headers,
        )

    def too_long(self, headers: Headers) -> bool:
        """Whether ``Content-Length`` already says the body is past ``max_body``."""
        length = field(headers, b"content-length")
        if length is None:
            return False
        length = length.strip()
        return not length.isdigit() or int(length) > self.max_body

    def entry(
        self, status: int, headers: Headers, body: bytes, decision: Storable, now: float
    ) -> Entry | None:
        """What is stored for a response, or None when it would be of no use."""
        freshness = decision.freshness
        capped = freshness._replace(
            stale_while_revalidate=min(freshness.stale_while_revalidate, _MAX_STALE_WINDOW),
            stale_if_error=min(freshness.stale_if_error, _MAX_STALE_WINDOW),
        )
        keep = capped.retention(validator=decision.validator, keep_stale=KEEP_STALE)
        keep = min(keep, _MAX_RETENTION)
        until = freshness.response_time + keep
        if until <= now:
            return None
        kept = [(k, v) for k, v in decision.stored_headers(headers) if k not in _NOT_REPLAYED]
        if not any(k == b"date" for k, _ in kept):
            # RFC 9110 section 6.6.1: a cache appends the time it received a response lacking one.
            kept.append((b"date", format_http_date(freshness.response_time).encode()))
        return {
            "s": status,
            "h": kept,
            "b": body,
            "f": tuple(capped),
            "et": field(headers, b"etag"),
            "lm": field(headers, b"last-modified"),
            "u": until,
            "vary": list(decision.vary),
        }

    def refreshed(
        self,
        stored: Entry,
        update: Headers,
        look: Lookup,
        request_time: float,
        response_time: float,
    ) -> tuple[Entry, Entry | None]:
        """A 304's update of a stored entry (RFC 9111 section 4.3.4): (the entry to serve,
        the entry to store or None when it may no longer be stored)."""
        if not any(k == b"date" for k, _ in update):
            update = [*update, (b"date", format_http_date(response_time).encode())]
        merged = freshen(stored["h"], update)
        ages = [(k, v) for k, v in update if k == b"age"]  # the 304's own age counts
        decision = self.decide(stored["s"], merged + ages, look, request_time, response_time)
        if decision is None:
            served = {**stored, "h": merged, "f": tuple(Freshness(0.0, 0.0, response_time))}
            return served, None
        entry = self.entry(stored["s"], merged, stored["b"], decision, response_time)
        if entry is None:
            return {**stored, "h": merged, "f": tuple(decision.freshness)}, None
        return entry, entry

    def with_entry(
        self, record: Record | None, look: Lookup, entry: Entry, now: float
    ) -> tuple[Record, float]:
        """The URL's record with ``entry`` as this request's variant, and for how long
        to store it. A new ``Vary`` starts the record over: the old variants were chosen
        by other fields."""
        vary = entry["vary"]
        entries: dict[str, Entry] = {}
        if isinstance(record, dict) and record.get("v") == vary:
            old = record.get("e")
            if isinstance(old, dict):
                entries = {k: e for k, e in old.items() if e.get("u", 0.0) > now}
        entries[self.variant(vary, look)] = entry
        if len(entries) > _MAX_VARIANTS:
            ranked = sorted(entries.items(), key=lambda item: item[1]["u"], reverse=True)
            entries = dict(ranked[:_MAX_VARIANTS])
        ttl = max(e["u"] for e in entries.values()) - now
        return {"v": vary, "e": entries}, ttl

    def without(
        self, record: Record | None, look: Lookup, now: float
    ) -> tuple[Record, float] | None:
        """The record without this request's variant: (record, ttl), or None when
        nothing is left (delete the key)."""
        if not isinstance(record, dict) or not isinstance(record.get("e"), dict):
            return None
        gone = self.variant(record.get("v") or [], look)
        entries = {k: e for k, e in record["e"].items() if k != gone and e.get("u", 0.0) > now}
        if not entries:
            return None
        return {"v": record.get("v"), "e": entries}, max(e["u"] for e in entries.values()) - now

    def invalidated(self, request: httpx.Request, response_headers: Headers) -> list[str]:
        """The keys an unsafe request's non-error response evicts (RFC 9111 section 4.4):
        its own URI's, and its Location's and Content-Location's on the same origin."""
        url = request.url
        scheme, authority = url.scheme, url.netloc.decode("ascii")
        target = url.raw_path.decode("latin-1")
        return [
            self.url_key("GET", scheme, authority, path, query)
            for path, query in invalidated_targets(scheme, authority, target, response_headers)
        ]
