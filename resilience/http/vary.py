"""Secondary keys: matching a request against a stored response's ``Vary`` (RFC 9111
section 4.1).

Two requests match when their selecting fields are equal after normalisation that keeps
their meaning: whitespace around list members, several field lines combined into one,
and, for the content-negotiation fields whose member order and case carry no meaning,
order and case. A field absent from one request matches only a field absent from the
other: absent is not the same as empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from resilience.http.caching import Headers, field, split_list, vary_fields

__all__ = ["CASELESS", "UNORDERED", "normalise", "selecting_values", "vary_fields"]

#: Fields whose members may be reordered: preference comes from q-values (RFC 9110
#: section 12.5). Members with equal q-values are then equally preferred; an app that
#: reads Accept-Language order as preference among equal q-values should send q-values.
UNORDERED: Final = frozenset({"accept", "accept-charset", "accept-encoding", "accept-language"})
#: Fields whose members are case-insensitive (charsets, codings, language tags).
CASELESS: Final = frozenset({"accept-charset", "accept-encoding", "accept-language"})
_PARAM_SPACE: Final = re.compile(r"[ \t]*;[ \t]*")


def normalise(name: str, value: str | None) -> str | None:
    """A selecting field's value in a canonical form, None when the field is absent.

    Every field is read as a list (members split outside quotes, whitespace around them
    dropped, empty members gone); the content-negotiation fields also lose whitespace
    around ``;`` and, per :data:`CASELESS` and :data:`UNORDERED`, case and order.
    """
    if value is None:
        return None
    members = split_list(value)
    if name in UNORDERED:
        members = [_PARAM_SPACE.sub(";", m) for m in members]
        if name in CASELESS:
            members = [m.lower() for m in members]
        members.sort()
    return ", ".join(members)


def selecting_values(vary: Sequence[str], request_headers: Headers) -> list[str | None]:
    """The normalised value of each field in ``vary`` in a request: equal lists mean
    the request matches a response stored for a request with the same list."""
    return [normalise(name, field(request_headers, name.encode("latin-1"))) for name in vary]
