"""A Prometheus metrics endpoint to mount on an ASGI app."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app

__all__ = ["metrics_app"]


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """prometheus-client's ASGI app for ``registry`` (default: the global one).

    Mount it: ``app.mount("/metrics", metrics_app(registry))``. Its responses say
    ``Cache-Control: no-store``, so no cache (ours included) freezes the scrapes.
    """
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a CollectorRegistry, got {type(registry).__name__}")
    inner = make_asgi_app(registry=registry if registry is not None else REGISTRY)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def no_store(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"cache-control", b"no-store")],
                }
            await send(message)

        await inner(scope, receive, no_store if scope["type"] == "http" else send)

    return app
