"""Sans-IO HTTP caching rules (RFC 9111), shared by server-side and client-side caches.

Nothing here does I/O or reads a clock: callers pass ``now`` and the header lists.
"""

from resilience.http.caching import (
    Headers,
    cache_control,
    delta_seconds,
    etag_matches,
    field,
    freshness_lifetime,
    http_date,
    split_list,
    storable,
)

__all__ = [
    "Headers",
    "cache_control",
    "delta_seconds",
    "etag_matches",
    "field",
    "freshness_lifetime",
    "http_date",
    "split_list",
    "storable",
]
