"""ResponseCacheMiddleware: a shared HTTP cache (RFC 9111) over a TwoTierCache.

The rules (what may be stored, for how long, when it is stale, what a 304 changes,
what an unsafe request evicts) live in :mod:`resilience.http`, sans-IO; this module
moves ASGI messages and stores entries. docs/asgi.md has the table of what it honours.

What it never does, because each of these leaked one user's data to another in a peer
library or a framework:

- store a response that sets a cookie, or is ``Cache-Control: private`` / ``no-store``,
  or has ``Vary: *``;
- store or serve for a request with ``Authorization`` or cookies, unless its route opts in;
- ignore ``Vary`` (the key includes every request header the response varies on);
- answer ``304`` for a different URL (an ETag is only compared with the entry of the
  same URL and variant);
- let a client's request headers set how long the server keeps a response.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Final

import anyio

from resilience.cache import TwoTierCache
from resilience.flight import SingleFlight
from resilience.http import (
    CONDITIONAL_FIELDS,
    QUOTA_FIELDS,
    SAFE_METHODS,
    UNSATISFIABLE,
    CachePolicy,
    Freshness,
    Storable,
    byte_range,
    cache_control,
    conditional_headers,
    content_range,
    field,
    format_http_date,
    freshen,
    head_matches,
    http_date,
    if_range_matches,
    invalidated_targets,
    invalidates,
    not_modified,
    not_modified_headers,
    selecting_values,
    selects,
    storable,
)
from resilience.integrations.asgi._asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    headers_of,
    joined,
    patterns,
)

__all__ = ["CACHEABLE", "TARGETED", "ResponseCacheMiddleware"]

log = logging.getLogger("resilience.integrations.asgi")


class _Streak:
    """A log level per failure: WARNING for the first of a streak, DEBUG for the rest,
    so an app that keeps failing makes one warning, not one per request."""

    __slots__ = ("failing",)

    def __init__(self) -> None:
        self.failing = False

    def level(self) -> int:
        first, self.failing = not self.failing, True
        return logging.WARNING if first else logging.DEBUG

    def ended(self) -> None:
        self.failing = False


#: Statuses stored without explicit freshness (RFC 9110 section 15.1, heuristically
#: cacheable), but for 206: partial responses are never stored here.
CACHEABLE: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
#: The targeted cache-control fields obeyed by default, first match wins (RFC 9213).
TARGETED: Final = ("resilience-cache-control", "cdn-cache-control")
# Per request, per client: replaying them would tell one client another's quota.
_PER_CLIENT: Final = QUOTA_FIELDS
# Request inputs a shared key cannot see: such requests are never cached.
_UNKEYED: Final = (b"x-http-method-override", b"x-method-override", b"x-http-method")
# Request fields that need a closer look; most requests carry none of them, and then
# the hit path checks nothing more.
_NOTABLE: Final = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"authorization",
        b"cookie",
        b"if-match",
        b"if-unmodified-since",
        b"if-none-match",
        b"if-modified-since",
        b"range",
        *_UNKEYED,
    }
)
_PRECONDITIONS: Final = (b"if-none-match", b"if-modified-since")
# The entry format; part of every key, so entries of another format are never read.
_FORMAT: Final = "rfc9111-1"
# The stale windows an origin asks for are honoured up to a week.
_MAX_STALE_WINDOW: Final = 7 * 86_400.0
_MAX_RETENTION: Final = 10 * 365 * 86_400.0
_FETCH, _REVALIDATE, _BACKGROUND = "fetch", "revalidate", "background"


def _etag(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'


def _target(scope: Scope) -> str:
    """The request target's path as the client sent it, percent-encoding kept.

    ``scope["path"]`` is decoded, so ``/x%3Fy`` and ``/x?y`` would read alike.
    """
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw).decode("latin-1")
    return urllib.parse.quote(scope.get("path", ""), safe="/:@!$&'()*+,;=~")


def _complete(start: Message, size: int) -> bool:
    """Whether a body of ``size`` bytes is all that ``Content-Length`` promised."""
    length = joined(headers_of(start), b"content-length")
    if length is None:
        return True
    try:
        return int(length) == size
    except ValueError:
        return False


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _dated(headers: list[tuple[bytes, bytes]], received: float) -> list[tuple[bytes, bytes]]:
    """``headers`` with a Date: the time they arrived when they have none (RFC 9110
    section 6.6.1), so a refreshed entry's Date and Age agree."""
    if any(k == b"date" for k, _ in headers):
        return headers
    return [*headers, (b"date", format_http_date(received).encode())]


def _freshness(entry: dict[str, Any]) -> Freshness:
    return Freshness(*entry["f"])


async def _empty(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _seconds(name: str, value: object, *, zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not (value >= 0 if zero else value > 0)
    ):
        what = "a number >= 0 of seconds" if zero else "a positive number of seconds"
        raise ValueError(f"{name} must be {what}, and finite, got {value!r}")
    return float(value)


def _routes(default_ttl: object) -> dict[str, float | None]:
    try:
        items = default_ttl.items() if isinstance(default_ttl, Mapping) else default_ttl
        return dict(items)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        raise TypeError(
            f"default_ttl must map path regexes to seconds (or None), got {default_ttl!r}"
        ) from None


class ResponseCacheMiddleware:
    """A shared HTTP cache for GET responses (RFC 9111), stored in ``cache``.

    Only what the response allows is stored: explicit freshness (``Cache-Control``
    ``s-maxage`` / ``max-age``, ``Expires``, or a targeted field such as
    ``CDN-Cache-Control``), or a heuristically cacheable status (``statuses``) with a
    ``Last-Modified``. ``ttl`` (every route) and ``default_ttl`` (path regex -> seconds,
    first match wins, None to opt a route out) give responses without freshness
    information a lifetime of your choosing instead; by default they get none.
    Stale entries are revalidated with the app (conditional requests), served stale
    within ``stale-while-revalidate`` while one background revalidation runs, or
    within ``stale-if-error`` (``stale_if_error``: your default for responses that do
    not say) when the app fails. An entry with a validator is kept ``keep_stale``
    seconds past its freshness so it can be revalidated. Bodies up to ``max_body``
    bytes are stored, streamed ones too; every body passes through chunk by chunk.
    ``allow_credentials`` lists path regexes whose requests may be cached even with
    ``Authorization`` or cookies (the key then includes those headers). ``targeted``
    names the targeted cache-control fields obeyed above ``Cache-Control``. The cache
    must be local-only or use a redis.asyncio client.
    """

    def __init__(
        self,
        app: ASGIApp,
        cache: TwoTierCache,
        ttl: float | None = None,
        *,
        default_ttl: Mapping[str, float | None] | Iterable[tuple[str, float | None]] = (),
        max_body: int = 1 << 20,
        allow_credentials: Iterable[str] = (),
        statuses: Iterable[int] = CACHEABLE,
        targeted: Iterable[str] = TARGETED,
        keep_stale: float = 3600.0,
        stale_if_error: float = 0.0,
        prefix: str = "http",
    ) -> None:
        if not isinstance(cache, TwoTierCache):
            raise TypeError(f"cache must be a TwoTierCache, got {type(cache).__name__}")
        if cache.remote is not None and not cache.remote.is_async:
            raise ValueError(
                "cache: middleware runs on the event loop, so the cache's RedisCache needs "
                "a redis.asyncio client (a sync client would block every request)"
            )
        self.ttl = None if ttl is None else _seconds("ttl", ttl)
        routes = _routes(default_ttl)
        compiled = patterns(routes, "default_ttl")
        self._routes = [
            (p, None if s is None else _seconds(f"default_ttl[{p.pattern!r}]", s))
            for p, s in zip(compiled, routes.values(), strict=True)
        ]
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ValueError(f"max_body must be an int >= 0, got {max_body!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        codes = frozenset(statuses)
        if not codes or not all(
            isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes
        ):
            raise ValueError(f"statuses must be HTTP status codes (100-599), got {statuses!r}")
        if isinstance(targeted, str):
            raise TypeError(f"targeted must be a list of field names, got {targeted!r}")
        targets = tuple(targeted)
        if not all(isinstance(t, str) and t and t.isascii() and " " not in t for t in targets):
            raise ValueError(f"targeted must be field names, got {targets!r}")
        self.keep_stale = _seconds("keep_stale", keep_stale, zero=True)
        self.policy = CachePolicy(
            targets=tuple(t.lower() for t in targets),
            heuristic_statuses=codes,
            stale_if_error=_seconds("stale_if_error", stale_if_error, zero=True),
        )
        self.app = app
        self._app_failures = _Streak()  # failures of the app behind a stored entry
        self.cache = cache
        self.max_body = max_body
        self.statuses = codes
        self.prefix = prefix
        self._credentialed = patterns(allow_credentials, "allow_credentials")
        self._targets = frozenset(t.encode("latin-1") for t in self.policy.targets)
        self._revalidating = SingleFlight()  # one background revalidation per entry

    # -- keys ------------------------------------------------------------------------------

    def _key(self, scheme: str, host: str, target: str, query: str) -> str:
        # A JSON list, not "scheme://host/path?query": a Host of "a/b" with path "/c"
        # must not share a key with host "a" and path "/b/c".
        raw = json.dumps([_FORMAT, scheme, host, target, query], ensure_ascii=True)
        return f"{self.prefix}:{hashlib.sha256(raw.encode()).hexdigest()}"

    def _url(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> str:
        host = (joined(headers, b"host") or b"").decode("latin-1").lower()
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        return self._key(scope.get("scheme", "http"), host, _target(scope), query)

    @staticmethod
    def _variant(
        url_key: str,
        record: dict[str, Any],
        forced: list[str],
        headers: list[tuple[bytes, bytes]],
    ) -> str:
        vary: list[str] = record["v"]
        if not vary and not forced:
            return f"{url_key}:{record['g']}"
        parts = [record["g"], [_text(joined(headers, n.encode("latin-1"))) for n in forced]]
        parts.append(selecting_values(vary, headers))
        digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
        return f"{url_key}:{digest}"

    def _default(self, scope: Scope) -> float | None:
        path = scope.get("path", "")
        for pattern, seconds in self._routes:
            if pattern.fullmatch(path):
                return seconds
        return self.ttl

    # -- the request -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method")
        if method != "GET" and method != "HEAD":
            if method in SAFE_METHODS:
                await self.app(scope, receive, send)
            else:
                await self._unsafe(scope, receive, send)
            return
        headers = headers_of(scope)
        notable = [k for k, _ in headers if k in _NOTABLE]
        forced: list[str] = []
        if notable:
            length = joined(headers, b"content-length")
            if (
                (length is not None and length.strip() not in (b"", b"0"))
                or b"transfer-encoding" in notable
                or any(name in notable for name in _UNKEYED)
            ):
                await self.app(scope, receive, send)  # the key could not tell this request apart
                return
            if b"if-match" in notable or b"if-unmodified-since" in notable:
                await self.app(scope, receive, send)  # preconditions for the origin alone
                return
            if b"authorization" in notable or b"cookie" in notable:
                if not any(p.fullmatch(scope.get("path", "")) for p in self._credentialed):
                    await self.app(scope, receive, send)  # someone's own data: never shared
                    return
                forced = ["authorization", "cookie"]
        url_key = self._url(scope, headers)
        record = await self.cache.aget(url_key + ":vary")
        stored = None
        if record is not None:
            stored = await self.cache.aget(self._variant(url_key, record, forced, headers))
        if stored is not None:
            freshness = _freshness(stored)
            now = self.cache.clock.time()
            if freshness.is_fresh(now):
                await self._serve(
                    stored, freshness.age(now), method == "HEAD", headers, notable, send
                )
                return
        await self._not_fresh(
            scope, receive, send, headers, notable, url_key, record, forced, stored
        )

    async def _not_fresh(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        notable: list[bytes],
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        stored: dict[str, Any] | None,
    ) -> None:
        head = scope.get("method") == "HEAD"
        only_if_cached = "only-if-cached" in cache_control(_text(joined(headers, b"cache-control")))
        if stored is not None:
            now = self.cache.clock.time()
            freshness = _freshness(stored)
            if freshness.may_serve_stale(now):  # stale-while-revalidate
                await self._serve(stored, freshness.age(now), head, headers, notable, send)
                if not head:
                    await self._background(scope, url_key, record, forced, headers, stored)
                return
            if only_if_cached:
                await _empty(send, 504, [(b"content-length", b"0")])
                return
            if head:
                await self._head(scope, receive, send, url_key, record, forced, headers, stored)
                return
            mode = _REVALIDATE
        elif only_if_cached:
            await _empty(send, 504, [(b"content-length", b"0")])  # RFC 9111 section 5.2.1.7
            return
        elif head:
            await self.app(scope, receive, send)  # a HEAD miss stores nothing
            return
        else:
            mode = _FETCH
        await self._exchange(
            scope, receive, send, url_key, record, forced, headers, notable, stored, mode
        )

    # -- answering from an entry -----------------------------------------------------------

    async def _serve(
        self,
        stored: dict[str, Any],
        age: float,
        head: bool,
        request_headers: list[tuple[bytes, bytes]],
        notable: list[bytes],
        send: Send,
    ) -> None:
        out = [(k, v) for k, v in stored["h"]]
        out.append((b"age", b"%d" % age))
        status: int = stored["s"]
        body: bytes = b"" if head else stored["b"]
        if notable:
            if any(n in notable for n in _PRECONDITIONS) and not_modified(
                request_headers, etag=stored["e"], last_modified=stored["lm"], date=stored["d"]
            ):
                also = self._targets | {b"age"}
                await _empty(send, 304, not_modified_headers(out, also))
                return
            if b"range" in notable and status == 200 and not head:
                found = self._range(stored, request_headers)
                if found is UNSATISFIABLE:
                    length = len(stored["b"])
                    fields = [(b"content-range", content_range(found, length))]
                    await _empty(send, 416, [*fields, (b"content-length", b"0")])
                    return
                if found is not None:
                    first, last = found
                    body = body[first : last + 1]
                    out = [(k, v) for k, v in out if k != b"content-length"]
                    out.append((b"content-range", content_range(found, len(stored["b"]))))
                    out.append((b"content-length", b"%d" % len(body)))
                    status = 206
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _range(stored: dict[str, Any], request_headers: list[tuple[bytes, bytes]]) -> Any:
        if_range = _text(joined(request_headers, b"if-range"))
        if not if_range_matches(
            if_range, etag=stored["e"], last_modified=stored["lm"], date=stored["d"]
        ):
            return None
        return byte_range(_text(joined(request_headers, b"range")), len(stored["b"]))

    # -- asking the app ----------------------------------------------------------------------

    def _conditional_scope(self, scope: Scope, stored: dict[str, Any]) -> Scope:
        """The request without the client's own preconditions and Range (the answer
        is for the cache), with the stored response's validators instead."""
        kept = [
            (k, v) for k, v in headers_of(scope) if k not in CONDITIONAL_FIELDS and k != b"range"
        ]
        kept += conditional_headers(stored["o"], stored["lm"])
        return {**scope, "headers": kept}

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
        notable: list[bytes],
        stored: dict[str, Any] | None,
        mode: str,
    ) -> None:
        """Run the app once: on a miss (``_FETCH``), to revalidate a stale entry for
        this client (``_REVALIDATE``) or after answering it (``_BACKGROUND``)."""
        app_scope = scope if stored is None else self._conditional_scope(scope, stored)
        forward = mode != _BACKGROUND
        request_time = self.cache.clock.time()
        response_time = request_time
        start: Message | None = None
        decision: Storable | None = None
        body: list[bytes] = []
        size = 0
        started = False
        finished = False  # the last body message said more_body=False
        gone = False  # the client disconnected: what we saw may be a fraction of the body
        not_modified_response = False
        swallowed = False  # a 5xx the client will not see: the stale entry stands in

        async def listen() -> Message:
            nonlocal gone
            message = await receive()
            # After the last body message a server reports "disconnect" for any further
            # receive (uvicorn does): only one before it means the body was cut short.
            if message["type"] == "http.disconnect" and not finished:
                gone = True
            return message

        async def capture(message: Message) -> None:
            nonlocal start, decision, size, started, finished, forward, response_time
            nonlocal not_modified_response, swallowed
            if message["type"] == "http.response.start":
                start = message
                response_time = self.cache.clock.time()
                status = message.get("status", 0)
                if stored is not None and status == 304:
                    not_modified_response, forward = True, False
                    return
                if (
                    mode == _REVALIDATE
                    and status >= 500
                    and stored is not None
                    and _freshness(stored).may_serve_stale(response_time, error=True)
                ):
                    swallowed, forward = True, False
                    return
                decision = self._decide(
                    message, request_headers, request_time, response_time, scope
                )
                return  # held until the first body chunk: a one-chunk body gets an ETag
            if message["type"] != "http.response.body":
                if not started and start is not None and forward:  # e.g. http.response.pathsend
                    started = True
                    await send(start)
                decision = None  # a body we never see cannot be stored
                if forward:
                    await send(message)
                return
            chunk = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            finished = not more
            if decision is not None:
                size += len(chunk)
                if size > self.max_body:
                    decision, body[:] = None, []  # too big to store: stream it on
                else:
                    body.append(chunk)
            if not forward:
                return
            if not started:
                started = True
                assert start is not None
                headers = list(start.get("headers", ()))
                if decision is not None:
                    present = headers_of(start)
                    if not more and joined(present, b"etag") is None:
                        headers.append((b"etag", _etag(chunk)))
                    if joined(present, b"date") is None:  # RFC 9110 6.6.1, as stored
                        headers.append((b"date", format_http_date(response_time).encode()))
                await send({**start, "headers": headers})
            await send(message)

        try:
            await self.app(app_scope, _background_receive() if not forward else listen, capture)
        except Exception:
            if mode == _BACKGROUND:
                log.log(
                    self._app_failures.level(),
                    "background revalidation of %s failed",
                    scope.get("path"),
                    exc_info=True,
                    extra={"resilience_event": "asgi_cache.revalidation_failed"},
                )
                return
            now = self.cache.clock.time()
            # A 5xx already held back (Starlette sends its 500, then re-raises) or none
            # sent yet: the stale entry answers, once.
            if (
                mode == _REVALIDATE
                and not started
                and stored is not None
                and (swallowed or _freshness(stored).may_serve_stale(now, error=True))
            ):
                # Logged, not raised: the client gets the stale answer, the error is seen
                # (at WARNING once a streak of failures, then at DEBUG).
                log.log(
                    self._app_failures.level(),
                    "served %s stale (stale-if-error): the app raised",
                    scope.get("path"),
                    exc_info=True,
                    extra={"resilience_event": "asgi_cache.stale_if_error"},
                )
                age = _freshness(stored).age(now)
                await self._serve(stored, age, False, request_headers, notable, send)
                return
            raise
        self._app_failures.ended()
        if start is None:
            return
        if not_modified_response and stored is not None:
            await self._not_modified(
                scope,
                receive,
                send,
                url_key,
                record,
                forced,
                request_headers,
                notable,
                stored,
                start,
                request_time,
                response_time,
                mode,
            )
            return
        if swallowed and stored is not None:
            now = self.cache.clock.time()
            await self._serve(
                stored, _freshness(stored).age(now), False, request_headers, notable, send
            )
            return
        # Only a whole body is stored: an app that returned mid-stream, or stopped
        # because its client went away, would otherwise serve a fraction to everyone.
        whole = finished and not gone and _complete(start, size)
        if decision is not None and whole:
            await self._store(
                url_key,
                record,
                forced,
                request_headers,
                start["status"],
                headers_of(start),
                b"".join(body),
                decision,
            )
        elif stored is not None and start.get("status", 0) < 500:
            await self._forget(url_key, record, forced, request_headers)

    async def _not_modified(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
        notable: list[bytes],
        stored: dict[str, Any],
        start: Message,
        request_time: float,
        response_time: float,
        mode: str,
    ) -> None:
        """A 304 to our conditional request: freshen the entry (RFC 9111 section 4.3.4)
        and answer from it; or, when it is about another response, forget the entry
        and, for a waiting client, ask once more without conditions."""
        update = _dated(headers_of(start), response_time)
        if not selects(stored["o"], stored["lm"], update):
            await self._forget(url_key, record, forced, request_headers)
            if mode == _REVALIDATE:
                await self._exchange(
                    scope,
                    receive,
                    send,
                    url_key,
                    None,
                    forced,
                    request_headers,
                    notable,
                    None,
                    _FETCH,
                )
            return
        merged = freshen(stored["h"], update)
        ages = [(k, v) for k, v in update if k == b"age"]  # the 304's own age counts
        decision = storable(
            stored["s"],
            merged + ages,
            request_time=request_time,
            response_time=response_time,
            policy=self.policy,
            default=self._default(scope),
            request_headers=request_headers,
        )
        origin_etag = _text(joined(update, b"etag")) or stored["o"]
        entry = self._entry(stored["s"], merged, stored["b"], decision, origin_etag, stored["e"])
        if decision is not None:
            await self._keep(url_key, record, forced, request_headers, entry, decision)
        else:
            await self._forget(url_key, record, forced, request_headers)
        if mode == _REVALIDATE:
            now = self.cache.clock.time()
            age = _freshness(entry).age(now)
            await self._serve(entry, age, False, request_headers, notable, send)

    async def _head(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
        stored: dict[str, Any],
    ) -> None:
        """A HEAD for a stale entry goes to the app; a 200 that matches the entry's
        validators freshens it, one that does not makes it go (RFC 9111 section 4.3.5)."""
        start: Message | None = None
        request_time = self.cache.clock.time()
        response_time = request_time

        async def watch(message: Message) -> None:
            nonlocal start, response_time
            if message["type"] == "http.response.start":
                start, response_time = message, self.cache.clock.time()
            await send(message)

        await self.app(scope, receive, watch)
        if start is None or start.get("status") != 200:
            return
        update = _dated(headers_of(start), response_time)
        if not head_matches(stored["h"], update):
            await self._forget(url_key, record, forced, request_headers)
            return
        merged = freshen(stored["h"], update)
        decision = storable(
            stored["s"],
            merged + [(k, v) for k, v in update if k == b"age"],
            request_time=request_time,
            response_time=response_time,
            policy=self.policy,
            default=self._default(scope),
            request_headers=request_headers,
        )
        if decision is None:
            await self._forget(url_key, record, forced, request_headers)
            return
        origin_etag = _text(joined(update, b"etag")) or stored["o"]
        entry = self._entry(stored["s"], merged, stored["b"], decision, origin_etag, stored["e"])
        await self._keep(url_key, record, forced, request_headers, entry, decision)

    async def _background(
        self,
        scope: Scope,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
        stored: dict[str, Any],
    ) -> None:
        """Revalidate a stale entry after its client has the stale answer, as
        ``stale-while-revalidate`` asks: one at a time per entry (this process's
        requests for it meanwhile get the stale answer and go)."""
        key = self._variant(url_key, record, forced, request_headers) if record else url_key
        flight, leader = self._revalidating.join(key)
        if not leader:
            return
        try:
            await self._exchange(
                scope,
                _never,
                _discard,
                url_key,
                record,
                forced,
                request_headers,
                [],
                stored,
                _BACKGROUND,
            )
        finally:
            self._revalidating.land(key, flight)

    # -- deciding and storing ----------------------------------------------------------------

    def _decide(
        self,
        start: Message,
        request_headers: list[tuple[bytes, bytes]],
        request_time: float,
        response_time: float,
        scope: Scope,
    ) -> Storable | None:
        """How this response may be stored, or None: the rules are resilience.http's."""
        headers = headers_of(start)
        return storable(
            start.get("status", 0),
            headers,
            request_time=request_time,
            response_time=response_time,
            policy=self.policy,
            default=self._default(scope),
            # Credentials reach here only on allow_credentials routes, where they are
            # part of the key: no other user shares the entry (so section 3.5 is moot).
            request_headers=[(k, v) for k, v in request_headers if k != b"authorization"],
        )

    def _entry(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        decision: Storable | None,
        origin_etag: str | None,
        etag: str | None,
    ) -> dict[str, Any]:
        kept = [(k, v) for k, v in headers if k not in _PER_CLIENT]
        if decision is not None:
            kept = decision.stored_headers(kept)
        if not any(k == b"content-length" for k, _ in kept) and status not in (204, 304):
            kept.append((b"content-length", b"%d" % len(content)))
        if origin_etag is None and etag is not None and not any(k == b"etag" for k, _ in kept):
            kept.append((b"etag", etag.encode("latin-1")))
        if decision is not None:
            freshness = decision.freshness
        else:  # served once, never stored
            freshness = Freshness(0.0, 0.0, self.cache.clock.time())
        date = http_date(field(headers, b"date"), now=freshness.response_time)
        if not any(k == b"date" for k, _ in kept):
            # RFC 9110 6.6.1: a cache appends the time it received a response lacking one.
            kept.append((b"date", format_http_date(freshness.response_time).encode()))
        return {
            "s": status,
            "h": kept,
            "b": content,
            "f": tuple(freshness),
            "e": origin_etag or etag,  # what clients' If-None-Match is compared with
            "o": origin_etag,  # what the app knows: only this revalidates
            "lm": field(headers, b"last-modified"),
            "d": freshness.response_time if date is None else date,
        }

    async def _store(
        self,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
        status: int,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        decision: Storable,
    ) -> None:
        origin_etag = _text(joined(headers, b"etag"))
        etag = origin_etag or _etag(content).decode()
        entry = self._entry(status, headers, content, decision, origin_etag, etag)
        await self._keep(url_key, record, forced, request_headers, entry, decision)

    async def _keep(
        self,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
        entry: dict[str, Any],
        decision: Storable,
    ) -> None:
        """Store ``entry`` for as long as it can be of use, and point the URL's record
        (its Vary fields and generation) at it."""
        freshness = decision.freshness
        capped = freshness._replace(  # the origin's windows count for a week at most
            stale_while_revalidate=min(freshness.stale_while_revalidate, _MAX_STALE_WINDOW),
            stale_if_error=min(freshness.stale_if_error, _MAX_STALE_WINDOW),
        )
        now = self.cache.clock.time()
        keep = capped.retention(validator=decision.validator, keep_stale=self.keep_stale)
        keep = min(keep - max(0.0, now - freshness.response_time), _MAX_RETENTION)
        if keep <= 0:
            return
        vary = list(decision.vary)
        if record is None or record["v"] != vary or record["x"] < now + keep:
            generation = record["g"] if record is not None else secrets.token_hex(8)
            until = max(now + keep, record["x"] if record is not None else 0.0)
            record = {"v": vary, "g": generation, "x": until}
            await self.cache.aset(url_key + ":vary", record, ttl=until - now)
        await self.cache.aset(
            self._variant(url_key, record, forced, request_headers), entry, ttl=keep
        )

    async def _forget(
        self,
        url_key: str,
        record: dict[str, Any] | None,
        forced: list[str],
        request_headers: list[tuple[bytes, bytes]],
    ) -> None:
        if record is not None:
            await self.cache.adelete(self._variant(url_key, record, forced, request_headers))

    # -- unsafe methods ----------------------------------------------------------------------

    async def _unsafe(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an unsafe request through; a non-error response evicts what it changed
        (RFC 9111 section 4.4) before the client sees it, so its next GET is fresh."""
        method: str = scope.get("method", "")

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and invalidates(
                method, message.get("status", 0)
            ):
                await self._invalidate(scope, headers_of(message))
            await send(message)

        await self.app(scope, receive, watch)

    async def _invalidate(self, scope: Scope, response_headers: list[tuple[bytes, bytes]]) -> None:
        request_headers = headers_of(scope)
        host = (joined(request_headers, b"host") or b"").decode("latin-1").lower()
        scheme = scope.get("scheme", "http")
        path = _target(scope)
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        target = f"{path}?{query}" if query else path
        for found_path, found_query in invalidated_targets(
            scheme, host or "localhost", target, response_headers
        ):
            # Removing the record orphans every variant: the next record gets a new
            # generation, so no variant stored before this moment is found again.
            await self.cache.adelete(self._key(scheme, host, found_path, found_query) + ":vary")


def _background_receive() -> Receive:
    """The request for a background revalidation: no body, then no disconnect ever
    (its client has its answer and may be gone, but the app must finish this one)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


async def _never() -> Message:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def _discard(message: Message) -> None:
    return None
