"""Pure ASGI middleware for Starlette and FastAPI (extra: ``resilience[asgi]``).

Each middleware is ``__call__(scope, receive, send)``, never ``BaseHTTPMiddleware``, so
streaming responses, background tasks and contextvars keep working. WebSocket and
lifespan scopes pass through untouched.
"""

from resilience.integrations.asgi.breaker import CircuitBreakerMiddleware
from resilience.integrations.asgi.cache import ResponseCacheMiddleware
from resilience.integrations.asgi.keys import client_ip, first, header, join, path_template
from resilience.integrations.asgi.metrics import metrics_app
from resilience.integrations.asgi.ratelimit import RateLimitMiddleware, Rule, ratelimit_headers
from resilience.integrations.asgi.shedding import ConcurrencyLimitMiddleware

__all__ = [
    "CircuitBreakerMiddleware",
    "ConcurrencyLimitMiddleware",
    "RateLimitMiddleware",
    "ResponseCacheMiddleware",
    "Rule",
    "client_ip",
    "first",
    "header",
    "join",
    "metrics_app",
    "path_template",
    "ratelimit_headers",
]
