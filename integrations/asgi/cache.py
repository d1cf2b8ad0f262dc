"""ResponseCacheMiddleware: a shared HTTP cache (RFC 9111) over a TwoTierCache.

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
import math
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final

from resilience.cache import TwoTierCache
from resilience.http import etag_matches, storable
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

__all__ = ["ResponseCacheMiddleware"]


# Statuses a shared cache may store by default (RFC 9110 section 15.1, heuristically cacheable).
CACHEABLE: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Never stored or replayed: they describe one connection, or one moment.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"age",
        b"date",
        # Per request, per client: replaying them would tell one client another's quota.
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
# Request inputs a shared key cannot see: such requests are never cached.
_UNKEYED: Final = (b"x-http-method-override", b"x-method-override", b"x-http-method")


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    length = joined(headers, b"content-length")
    if length is not None and length.strip() not in (b"", b"0"):
        return True
    return joined(headers, b"transfer-encoding") is not None


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


class ResponseCacheMiddleware:
    """Cache GET responses in ``cache`` for ``ttl`` seconds (or the response's s-maxage /
    max-age, or Expires). Bodies up to ``max_body`` bytes are stored, streamed ones too;
    every body passes through chunk by chunk as it is produced. ``allow_credentials``
    lists path regexes whose requests may be cached even with ``Authorization`` or
    cookies (the key then includes those headers). The cache must be local-only or use
    a redis.asyncio client.
    """

    def __init__(
        self,
        app: ASGIApp,
        cache: TwoTierCache,
        ttl: float = 60.0,
        *,
        max_body: int = 1 << 20,
        allow_credentials: Iterable[str] = (),
        statuses: Iterable[int] = CACHEABLE,
        prefix: str = "http",
    ) -> None:
        if not isinstance(cache, TwoTierCache):
            raise TypeError(f"cache must be a TwoTierCache, got {type(cache).__name__}")
        if cache.remote is not None and not cache.remote.is_async:
            raise ValueError(
                "cache: middleware runs on the event loop, so the cache's RedisCache needs "
                "a redis.asyncio client (a sync client would block every request)"
            )
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not ttl > 0
            or not math.isfinite(ttl)
        ):
            raise ValueError(f"ttl must be a positive number of seconds, and finite, got {ttl!r}")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ValueError(f"max_body must be an int >= 0, got {max_body!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        codes = frozenset(statuses)
        if not codes or not all(
            isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes
        ):
            raise ValueError(f"statuses must be HTTP status codes (100-599), got {statuses!r}")
        self.app = app
        self.cache = cache
        self.ttl = float(ttl)
        self.max_body = max_body
        self.statuses = codes
        self.prefix = prefix
        self._credentialed = patterns(allow_credentials, "allow_credentials")

    # -- keys ------------------------------------------------------------------------------

    def _url(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> str:
        host = (joined(headers, b"host") or b"").decode("latin-1").lower()
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        # A JSON list, not "scheme://host/path?query": a Host of "a/b" with path "/c"
        # must not share a key with host "a" and path "/b/c".
        parts = [scope.get("scheme", "http"), host, _target(scope), query]
        raw = json.dumps(parts, ensure_ascii=True)
        return f"{self.prefix}:{hashlib.sha256(raw.encode()).hexdigest()}"

    @staticmethod
    def _variant(url_key: str, vary: list[str], headers: list[tuple[bytes, bytes]]) -> str:
        parts = [url_key]
        for name in vary:
            value = joined(headers, name.encode("latin-1")) or b""
            parts.append(f"{name}={value.decode('latin-1')}")
        return url_key + ":" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    # -- the request -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] != "http" or method not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = headers_of(scope)
        if _has_body(headers) or any(joined(headers, name) is not None for name in _UNKEYED):
            await self.app(scope, receive, send)  # the key could not tell this request apart
            return
        credentialed = joined(headers, b"authorization") is not None or (
            joined(headers, b"cookie") is not None
        )
        if credentialed and not any(p.fullmatch(scope.get("path", "")) for p in self._credentialed):
            await self.app(scope, receive, send)  # someone's own data: never shared
            return
        url_key = self._url(scope, headers)
        vary = await self.cache.aget(url_key + ":vary")
        forced = ["authorization", "cookie"] if credentialed else []
        if vary is not None:
            stored = await self.cache.aget(self._variant(url_key, [*forced, *vary], headers))
            if stored is not None:
                await self._replay(stored, method == "HEAD", headers, send)
                return
        if method == "HEAD":
            await self.app(scope, receive, send)
            return
        await self._fetch(scope, receive, send, url_key, headers, forced)

    async def _replay(
        self,
        stored: dict[str, Any],
        head: bool,
        request_headers: list[tuple[bytes, bytes]],
        send: Send,
    ) -> None:
        age = max(0, int(self.cache.clock.time() - stored["t"]))
        etag: str = stored["e"]
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored["h"]]
        out.append((b"age", str(age).encode()))
        if_none_match = joined(request_headers, b"if-none-match")
        if etag_matches(None if if_none_match is None else if_none_match.decode("latin-1"), etag):
            keep = {b"etag", b"cache-control", b"vary", b"expires", b"content-location", b"age"}
            await send(
                {
                    "type": "http.response.start",
                    "status": 304,
                    "headers": [(k, v) for k, v in out if k in keep],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": stored["s"], "headers": out})
        await send({"type": "http.response.body", "body": b"" if head else stored["b"]})

    async def _fetch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        url_key: str,
        request_headers: list[tuple[bytes, bytes]],
        forced: list[str],
    ) -> None:
        start: Message | None = None
        keep: float | None = None  # seconds to keep this response; None: not cacheable
        vary: list[str] = []
        body: list[bytes] = []
        size = 0
        started = False
        finished = False  # the last body message said more_body=False
        gone = False  # the client disconnected: what we saw may be a fraction of the body

        async def listen() -> Message:
            nonlocal gone
            message = await receive()
            # After the last body message a server reports "disconnect" for any further
            # receive (uvicorn does): only one before it means the body was cut short.
            if message["type"] == "http.disconnect" and not finished:
                gone = True
            return message

        async def capture(message: Message) -> None:
            nonlocal start, keep, vary, size, started, finished
            if message["type"] == "http.response.start":
                start = message
                keep, vary = self._cacheable(message)
                return  # held until the first body chunk: a one-chunk body gets an ETag
            if message["type"] != "http.response.body":
                if not started and start is not None:  # e.g. http.response.pathsend
                    started = True
                    await send(start)
                keep = None  # a body we never see cannot be stored
                await send(message)
                return
            chunk = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            finished = not more
            if keep is not None:
                size += len(chunk)
                if size > self.max_body:
                    keep, body[:] = None, []  # too big to store: stream it on
                else:
                    body.append(chunk)
            if not started:
                started = True
                assert start is not None
                headers = list(start.get("headers", ()))
                if keep is not None and not more and joined(headers_of(start), b"etag") is None:
                    headers.append((b"etag", _etag(chunk)))
                await send({**start, "headers": headers})
            await send(message)

        await self.app(scope, listen, capture)
        # Only a whole body is stored: an app that returned mid-stream, or stopped
        # because its client went away, would otherwise serve a fraction to everyone.
        if start is None or keep is None or not finished or gone or not _complete(start, size):
            return
        content = b"".join(body)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in headers_of(start)
            if k not in _HOP_BY_HOP
        ]
        etag = joined(headers_of(start), b"etag")
        if etag is None:
            etag = _etag(content)
            headers.append(("etag", etag.decode()))
        entry = {
            "s": start["status"],
            "h": headers,
            "b": content,
            "t": self.cache.clock.time(),
            "e": etag.decode("latin-1"),
        }
        await self.cache.aset(url_key + ":vary", vary, ttl=keep)
        await self.cache.aset(
            self._variant(url_key, [*forced, *vary], request_headers), entry, ttl=keep
        )

    def _cacheable(self, start: Message) -> tuple[float | None, list[str]]:
        """(seconds to keep, varied request headers), or (None, []) when not storable."""
        found = storable(
            start.get("status", 0),
            headers_of(start),
            statuses=self.statuses,
            default=self.ttl,
            now=self.cache.clock.time(),
        )
        return (None, []) if found is None else found
