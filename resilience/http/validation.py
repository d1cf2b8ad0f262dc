"""Validation: conditional requests to the origin, 304 responses, and clients' own
conditional requests answered from a stored response (RFC 9111 section 4.3, RFC 9110
section 13).
"""

from __future__ import annotations

from typing import Final

from resilience.http.caching import HOP_BY_HOP, Headers, etag_matches, field, split_list
from resilience.http.dates import http_date

__all__ = [
    "CONDITIONAL_FIELDS",
    "NOT_MODIFIED_FIELDS",
    "conditional_headers",
    "freshen",
    "head_matches",
    "not_modified",
    "not_modified_headers",
    "selects",
]

#: The request fields that make a request conditional (RFC 9110 section 13.1).
CONDITIONAL_FIELDS: Final = frozenset(
    {b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"if-range"}
)
#: What a 304 carries of the stored response (RFC 9110 section 15.4.5), plus
#: Last-Modified, which guides a client that validates by date.
NOT_MODIFIED_FIELDS: Final = frozenset(
    {
        b"cache-control",
        b"content-location",
        b"date",
        b"etag",
        b"expires",
        b"last-modified",
        b"vary",
    }
)
# Never taken from a 304 into a stored response (RFC 9111 section 3.2): it describes
# the stored body, which the 304 did not resend, or the connection.
_KEEP_STORED: Final = frozenset(
    {b"content-length", b"content-encoding", b"content-range", b"age"} | HOP_BY_HOP
)


def _entity_tag(tag: str) -> str:
    """An entity-tag as it must be sent: quoted (an unquoted one is a sender's slip)."""
    tag = tag.strip(" \t")
    if tag.startswith(('W/"', '"')):
        return tag
    return f'"{tag}"'


def conditional_headers(etag: str | None, last_modified: str | None) -> list[tuple[bytes, bytes]]:
    """The fields that revalidate a stored response (RFC 9111 section 4.3.1):
    ``If-None-Match`` with its entity tag, strong or weak, and ``If-Modified-Since``
    with its ``Last-Modified`` exactly as received (an origin may compare strings)."""
    out = []
    if etag:
        out.append((b"if-none-match", _entity_tag(etag).encode("latin-1")))
    if last_modified and http_date(last_modified) is not None:
        out.append((b"if-modified-since", last_modified.encode("latin-1")))
    return out


def selects(etag: str | None, last_modified: str | None, response: Headers) -> bool:
    """Whether a 304 is about the stored response with these validators (RFC 9111
    section 4.3.4): an ``ETag`` in it must match weakly, a ``Last-Modified`` exactly.
    A 304 with neither answers the conditional request made for this response."""
    new_etag = field(response, b"etag")
    if new_etag is not None:
        return etag is not None and etag_matches(new_etag, etag) and new_etag.strip() != "*"
    new_lm = field(response, b"last-modified")
    if new_lm is not None and last_modified is not None:
        return http_date(new_lm) == http_date(last_modified)
    return True


def freshen(stored: Headers, update: Headers) -> list[tuple[bytes, bytes]]:
    """A stored response's fields updated from a 304 or a HEAD response (RFC 9111
    section 3.2): each field ``update`` has replaces the stored lines of that name; the
    rest stay. Content-Length, Content-Encoding and Content-Range describe the stored
    body and stay too, and connection fields (and those ``Connection`` names) never
    enter."""
    skip = set(_KEEP_STORED)
    skip.update(n.lower().encode("latin-1") for n in split_list(field(update, b"connection")))
    new = [(k, v) for k, v in update if k not in skip]
    replaced = {k for k, _ in new}
    return [(k, v) for k, v in stored if k not in replaced] + new


def head_matches(stored: Headers, head: Headers) -> bool:
    """Whether a 200 response to HEAD describes the stored GET response (RFC 9111
    section 4.3.5), so it may freshen it: every validator it has (``ETag``,
    ``Last-Modified``) and its ``Content-Length``, if any, equal the stored ones."""
    for name in (b"etag", b"last-modified", b"content-length"):
        value = field(head, name)
        if value is not None and value != field(stored, name):
            return False
    return True


def not_modified(
    request: Headers,
    *,
    etag: str | None,
    last_modified: str | None,
    date: float,
) -> bool:
    """Whether a client's conditional GET or HEAD gets 304 from a stored response.

    RFC 9110 section 13.2.2's order, as RFC 9111 section 4.3.2 has a cache apply it: an
    ``If-None-Match`` decides alone (weak comparison); otherwise ``If-Modified-Since``
    (ignored unless one valid HTTP-date) against the stored ``Last-Modified``, or, if
    there is none, its ``Date`` (``date``: the Date, or when the response arrived).
    If-Match and If-Unmodified-Since are for the origin, not for a cache.
    """
    if_none_match = field(request, b"if-none-match")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    since = http_date(field(request, b"if-modified-since"))
    if since is None:
        return False
    modified = http_date(last_modified) if last_modified is not None else None
    return (date if modified is None else modified) <= since


def not_modified_headers(
    headers: Headers, also: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """The stored fields a 304 sends (:data:`NOT_MODIFIED_FIELDS`, and ``also``)."""
    return [(k, v) for k, v in headers if k in NOT_MODIFIED_FIELDS or k in also]
