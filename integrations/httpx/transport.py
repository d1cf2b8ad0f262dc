"""ResilientTransport and AsyncResilientTransport: httpx transports that apply the
library's policies to outbound HTTP (see docs/httpx.md)."""

from __future__ import annotations

import httpx

from resilience.integrations.httpx._async_transport import AsyncTransportOps
from resilience.integrations.httpx._sync_transport import SyncTransportOps

__all__ = ["AsyncResilientTransport", "ResilientTransport"]


class ResilientTransport(SyncTransportOps, httpx.BaseTransport):
    """An ``httpx.BaseTransport`` for ``httpx.Client``: per-host breakers from a
    template, safe retries, the server's published limits, a client-side limiter, and
    a private RFC 9111 cache.

    ``ResilientTransport(transport=None, *, breaker=None, retry=None, limiter=None,
    cache=None, follow_server_limits=True, holds=None, max_wait=0.0, ...)``;
    ``transport`` is the inner transport (default: ``httpx.HTTPTransport()``), ``cache``
    a TwoTierCache. See docs/httpx.md.
    """

    transport: httpx.BaseTransport


class AsyncResilientTransport(AsyncTransportOps, httpx.AsyncBaseTransport):
    """The same as :class:`ResilientTransport`, for ``httpx.AsyncClient`` (asyncio or
    trio); the inner transport defaults to ``httpx.AsyncHTTPTransport()``."""

    transport: httpx.AsyncBaseTransport
