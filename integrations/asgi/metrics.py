"""A Prometheus metrics endpoint to mount on an ASGI app."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app

__all__ = ["metrics_app"]


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """prometheus-client's ASGI app for ``registry`` (default: the global one).

    Mount it: ``app.mount("/metrics", metrics_app(registry))``.
    """
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a CollectorRegistry, got {type(registry).__name__}")
    return make_asgi_app(registry=registry if registry is not None else REGISTRY)
