"""CircuitBreakerMiddleware: stop sending requests to an app (or route group) that fails."""

from __future__ import annotations

import math
import re
from collections.abc import Container, Sequence

from resilience.breaker import CircuitBreaker
from resilience.integrations.asgi._asgi import ASGIApp, Receive, Scope, Send, watched

__all__ = ["CircuitBreakerMiddleware"]


class CircuitBreakerMiddleware:
    """Count 5xx responses and exceptions as failures; while open, answer 503.

    ``breaker`` guards every HTTP request not matched by ``rules`` (a list of
    ``(path regex, breaker)``, first match wins). The 503 carries ``Retry-After`` from the
    breaker. A client that disconnects mid-request is never counted as a failure.
    """

    def __init__(
        self,
        app: ASGIApp,
        breaker: CircuitBreaker | None = None,
        *,
        failure_status: Container[int] = range(500, 600),
        rules: Sequence[tuple[str, CircuitBreaker]] = (),
    ) -> None:
        if breaker is None and not rules:
            raise ValueError("breaker: give a breaker, rules, or both")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        compiled = []
        for i, rule in enumerate(rules):
            try:
                pattern, rule_breaker = rule
                compiled.append((re.compile(pattern), rule_breaker))
            except (TypeError, ValueError, re.error) as e:
                raise ValueError(f"rules[{i}] must be (path regex, CircuitBreaker): {e}") from None
            if not isinstance(rule_breaker, CircuitBreaker):
                raise TypeError(f"rules[{i}] breaker must be a CircuitBreaker")
        if not hasattr(failure_status, "__contains__"):
            raise TypeError("failure_status must be a container of status codes")
        self.app = app
        self.breaker = breaker
        self.failure_status = failure_status
        self._rules = compiled

    def _pick(self, path: str) -> CircuitBreaker | None:
        for pattern, breaker in self._rules:
            if pattern.fullmatch(path):
                return breaker
        return self.breaker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        breaker = self._pick(scope.get("path", ""))
        if breaker is None:
            await self.app(scope, receive, send)
            return
        permit = await breaker.atry_acquire()
        if permit is None:
            await _unavailable(send, breaker.retry_after)
            return
        seen = await watched(self.app, scope, receive, send)
        error = seen.error
        if seen.ignored:
            await permit.aignore()
        elif error is not None:  # the breaker's include/exclude, cancellation and deadline rules
            await permit.aerror(error)
        elif seen.status in self.failure_status:
            await permit.afailure()
        else:
            await permit.asuccess()
        if error is not None:
            raise error


async def _unavailable(send: Send, retry_after: float) -> None:
    body = b'{"detail":"Service Unavailable"}'
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, math.ceil(retry_after))).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
