"""ConcurrencyLimitMiddleware: load shedding for ASGI apps with an adaptive limit.

Each HTTP request takes a slot of a :class:`~resilience.ConcurrencyLimit` before the
app sees it. While the app keeps up, every request is admitted; when it slows down,
the limit falls with the measured latency, a bounded number of requests wait briefly
(the limit's ``max_wait`` and ``max_queue``), and the rest are answered ``503 Service
Unavailable`` with ``Retry-After`` at once, before the app reads a byte of them. So the
requests that are admitted keep their latency, and the server keeps serving what it can
instead of drowning in a queue of requests whose clients have given up.

- ``exempt`` paths (regular expressions, whole path; by default health checks and
  ``/metrics``) are never shed and never counted.
- ``partition`` names a request's partition (a function of the scope, such as
  :func:`~resilience.integrations.asgi.header`); the limit's ``partitions`` give each a
  guaranteed share, as concurrency-limits' partitioned limiter does: while its
  partition holds less than its share, a request is admitted even over the limit.
- Samples: a response is a sample of its latency (from admission to the last byte
  sent); a status in ``drop_status`` (default 504) is a drop, and so is an exception
  the limit's ``drop_on`` matches. A client that goes away gives no sample.

WebSocket and lifespan scopes pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable

from resilience.integrations.asgi._asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    patterns,
    watched,
)
from resilience.integrations.asgi.keys import KeyFunc
from resilience.policies import ConcurrencyLimit, LimitExceeded

__all__ = ["DEFAULT_EXEMPT", "ConcurrencyLimitMiddleware"]

#: Paths never shed by default: health and readiness checks, and the metrics endpoint
#: (an overloaded service must still say so).
DEFAULT_EXEMPT = (
    r"/health(z|/.*)?",
    r"/(livez|readyz|ready|live)",
    r"/metrics(/.*)?",
)
_BODY = b'{"detail":"Service Unavailable"}'


class ConcurrencyLimitMiddleware:
    """Shed what the app cannot take; see the module docstring.

    ``ConcurrencyLimitMiddleware(app, limiter=None, *, exempt=DEFAULT_EXEMPT,
    partition=None, retry_after=1, drop_status=(504,))``. With no ``limiter``, a
    ``ConcurrencyLimit("gradient2", max_wait=0.05, max_queue=50, window=0.1,
    name="asgi")`` is made.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: ConcurrencyLimit | None = None,
        *,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        partition: KeyFunc | None = None,
        retry_after: float = 1,
        drop_status: Container[int] = (504,),
    ) -> None:
        if limiter is None:
            limiter = ConcurrencyLimit(
                "gradient2", max_wait=0.05, max_queue=50, window=0.1, name="asgi"
            )
        if not isinstance(limiter, ConcurrencyLimit):
            raise TypeError(f"limiter must be a ConcurrencyLimit, got {type(limiter).__name__}")
        if limiter.max_wait is None:
            raise ValueError(
                "limiter: a middleware must not queue requests without bound; give the "
                "ConcurrencyLimit a max_wait (seconds a request may wait for a slot)"
            )
        if partition is not None and not callable(partition):
            raise TypeError(f"partition must be a function of the ASGI scope, got {partition!r}")
        if (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, (int, float))
            or not (math.isfinite(retry_after) and retry_after >= 0)
        ):
            raise ValueError(f"retry_after must be seconds >= 0, got {retry_after!r}")
        if not hasattr(drop_status, "__contains__"):
            raise TypeError("drop_status must be a container of status codes")
        self.app = app
        self.limiter = limiter
        self.partition = partition
        self.retry_after = retry_after
        self.drop_status = drop_status
        self._exempt = patterns(exempt, "exempt")
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_BODY)).encode()),
            (b"retry-after", str(max(1, math.ceil(retry_after))).encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._exempt:
            path = scope.get("path", "")
            for pattern in self._exempt:
                if pattern.fullmatch(path):
                    await self.app(scope, receive, send)
                    return
        name = None if self.partition is None else self.partition(scope)
        try:
            permit = await self.limiter.aacquire(name)
        except LimitExceeded:
            await self._shed(send)
            return
        seen = await watched(self.app, scope, receive, send)
        error = seen.error
        if seen.ignored:
            permit.ignore()
        elif error is not None:  # drop_on, and an expired deadline, make it a drop
            permit.error(error, in_async=True)
        elif seen.status in self.drop_status:
            permit.drop()
        else:
            permit.success()
        if error is not None:
            raise error

    async def _shed(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": list(self._headers)})
        await send({"type": "http.response.body", "body": _BODY})
