"""Sans-IO HTTP caching rules (RFC 9111, with RFC 9110, 5861, 8941 and 9213), shared by
server-side and client-side caches.

Nothing here does I/O or reads a clock: callers pass ``now`` (and the request and
response times) and header lists of ``(lower-case name, value)`` bytes pairs. The one
difference between a shared and a private cache is :attr:`CachePolicy.shared`.

- :mod:`~resilience.http.caching`: directives, storability, freshness, age.
- :mod:`~resilience.http.validation`: conditional requests, 304s, clients' preconditions.
- :mod:`~resilience.http.vary`, :mod:`~resilience.http.invalidation`,
  :mod:`~resilience.http.ranges`, :mod:`~resilience.http.dates`,
  :mod:`~resilience.http.structured`.
"""

from resilience.http.caching import (
    DEFAULT_POLICY,
    HEURISTIC_STATUSES,
    HOP_BY_HOP,
    QUOTA_FIELDS,
    UNDERSTOOD_STATUSES,
    CachePolicy,
    Freshness,
    Headers,
    Storable,
    age_value,
    cache_control,
    corrected_initial_age,
    delta_seconds,
    etag_matches,
    field,
    freshness_lifetime,
    response_directives,
    split_list,
    storable,
    targeted_directives,
    vary_fields,
)
from resilience.http.dates import format_http_date, http_date
from resilience.http.invalidation import (
    SAFE_METHODS,
    invalidated_targets,
    invalidates,
    normalise_percent,
)
from resilience.http.ranges import UNSATISFIABLE, byte_range, content_range, if_range_matches
from resilience.http.structured import parse_dictionary
from resilience.http.validation import (
    CONDITIONAL_FIELDS,
    NOT_MODIFIED_FIELDS,
    conditional_headers,
    freshen,
    head_matches,
    not_modified,
    not_modified_headers,
    selects,
)
from resilience.http.vary import normalise, selecting_values

__all__ = [
    "CONDITIONAL_FIELDS",
    "DEFAULT_POLICY",
    "HEURISTIC_STATUSES",
    "HOP_BY_HOP",
    "NOT_MODIFIED_FIELDS",
    "QUOTA_FIELDS",
    "SAFE_METHODS",
    "UNDERSTOOD_STATUSES",
    "UNSATISFIABLE",
    "CachePolicy",
    "Freshness",
    "Headers",
    "Storable",
    "age_value",
    "byte_range",
    "cache_control",
    "conditional_headers",
    "content_range",
    "corrected_initial_age",
    "delta_seconds",
    "etag_matches",
    "field",
    "format_http_date",
    "freshen",
    "freshness_lifetime",
    "head_matches",
    "http_date",
    "if_range_matches",
    "invalidated_targets",
    "invalidates",
    "normalise",
    "normalise_percent",
    "not_modified",
    "not_modified_headers",
    "parse_dictionary",
    "response_directives",
    "selecting_values",
    "selects",
    "split_list",
    "storable",
    "targeted_directives",
    "vary_fields",
]
