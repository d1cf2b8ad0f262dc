"""The sans-IO caching rules' parsers and entry points (resilience.http); the RFC's rules
one row each are in test_http_rfc9111.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from resilience.http import (
    CachePolicy,
    cache_control,
    delta_seconds,
    etag_matches,
    freshness_lifetime,
    http_date,
    split_list,
    storable,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 9111 5.2: directive names are case-insensitive.
        ("Max-Age=60", {"max-age": "60"}),
        ("NO-STORE", {"no-store": None}),
        # 5.2: both token and quoted-string arguments are accepted.
        ('max-age="60"', {"max-age": "60"}),
        # RFC 9110 5.6.4: commas and "=" inside a quoted string are data.
        ('community="a,max-age=9999"', {"community": "a,max-age=9999"}),
        ('private="set-cookie, x", max-age=5', {"private": "set-cookie, x", "max-age": "5"}),
        ('ext="a\\"b,c", no-cache', {"ext": 'a"b,c', "no-cache": None}),
        # 4.2.1: the first of two occurrences is used.
        ("max-age=5, max-age=500", {"max-age": "5"}),
        # Whitespace and empty list members (RFC 9110 5.6.1) are ignored ...
        ("  public ,, s-maxage=7 ", {"public": None, "s-maxage": "7"}),
        # ... but not around "=" (RFC 9110 5.6.2): the argument is malformed, "".
        ("public, s-maxage = 7", {"public": None, "s-maxage": ""}),
        ("no-store =x", {"no-store": ""}),  # still there: storing stays forbidden
        ("max-age='60'", {"max-age": "'60'"}),  # no delta-seconds: stale
        ('max-age="6', {"max-age": ""}),  # broken quoting
        ("", {}),
        (None, {}),
    ],
)
def test_cache_control_directives(value: str | None, expected: dict[str, str | None]) -> None:
    assert cache_control(value) == expected


@pytest.mark.parametrize(
    ("arg", "seconds"),
    [
        ("60", 60),
        ("0", 0),
        ("99999999999999999999", 2**31),  # 1.2.2: too large means 2^31
        ("-1", None),
        ("1.5", None),
        ("abc", None),
        ("", None),
        ("٣", None),  # a non-ASCII digit is no delta-seconds
        (None, None),
    ],
)
def test_delta_seconds(arg: str | None, seconds: int | None) -> None:
    assert delta_seconds(arg) == seconds


def test_lists_split_outside_quotes_only() -> None:
    assert split_list('"a,b", W/"c" ,"d"') == ['"a,b"', 'W/"c"', '"d"']
    assert split_list(" , ,") == []


def test_freshness_lifetime_order_of_precedence() -> None:
    date = 1_000.0
    expires = [(b"expires", b"Thu, 01 Jan 1970 00:20:00 GMT")]  # 1,200: 200 s after Date
    # 4.2.1: s-maxage (shared only), then max-age, then Expires - Date.
    both = {"s-maxage": "5", "max-age": "1"}
    assert freshness_lifetime(both, expires, date=date) == 5.0
    assert freshness_lifetime(both, [], date=date, shared=False) == 1.0
    assert freshness_lifetime({"max-age": "1"}, expires, date=date) == 1.0
    assert freshness_lifetime({}, expires, date=date) == 200.0
    assert freshness_lifetime({}, [], date=date) is None  # no explicit freshness
    # Zero or an invalid argument: stale at once.
    assert freshness_lifetime({"max-age": "0"}, [], date=date) == 0.0
    assert freshness_lifetime({"max-age": "soon"}, [], date=date) == 0.0
    # 5.3: an invalid Expires means already expired.
    assert freshness_lifetime({}, [(b"expires", b"yesterday")], date=date) == 0.0
    # RFC 9213 2.2: with a targeted field, Expires does not count.
    assert freshness_lifetime({}, expires, date=date, targeted=True) is None


@pytest.fixture
def far_east() -> Iterator[None]:
    """The host's local time 14 hours ahead of UTC, so a date read as local shows."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "Etc/GMT-14")
    time.tzset()
    yield
    mp.undo()
    time.tzset()


@pytest.mark.usefixtures("far_east")
def test_an_http_date_is_utc_never_local_time() -> None:
    assert http_date("Thu, 01 Jan 1970 00:01:40 GMT") == 100.0
    assert http_date("Thursday, 01-Jan-70 00:01:40 GMT") == 100.0
    assert http_date("Thu Jan  1 00:01:40 1970") == 100.0
    # RFC 9110 5.6.7: GMT only. email.utils would read "-0000" as a (local) zone.
    assert http_date("Thu, 01 Jan 1970 00:01:40 -0000") is None
    assert http_date("not a date") is None
    assert http_date(None) is None


def test_if_none_match_uses_weak_comparison_and_quoted_commas() -> None:
    assert etag_matches('W/"v1"', '"v1"')  # RFC 9110 13.1.2
    assert etag_matches('"x", "v1"', 'W/"v1"')
    assert etag_matches("*", '"anything"')
    assert not etag_matches('"a,b"', '"a"')  # one tag with a comma, not "a" and b"
    assert etag_matches('"a,b"', '"a,b"')
    assert not etag_matches(None, '"v1"')


H = list[tuple[bytes, bytes]]
POLICY = CachePolicy(heuristic_statuses=frozenset({200, 404}))


def kept(status: int, headers: H, default: float | None = 60.0) -> tuple[float, list[str]] | None:
    found = storable(
        status,
        headers,
        request_time=0.0,
        response_time=0.0,
        policy=POLICY,
        default=default,
    )
    return None if found is None else (found.freshness.lifetime, list(found.vary))


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [], (60.0, [])),
        (500, [], None),  # 3: no freshness and not a heuristic status
        (500, [(b"cache-control", b"max-age=5")], (5.0, [])),  # 3: explicit freshness
        (200, [(b"set-cookie", b"a=1")], None),
        (200, [(b"cache-control", b"no-store")], None),  # 5.2.2.5
        (200, [(b"cache-control", b"private")], None),  # 5.2.2.7: shared caches
        (200, [(b"cache-control", b'private="set-cookie, x"')], None),
        (200, [(b"cache-control", b'ext="private"')], (60.0, [])),  # a quoted word is data
        (200, [(b"vary", b"*")], None),  # 4.1
        (
            200,
            [(b"vary", b"Accept-Encoding, accept-language")],
            (60.0, ["accept-encoding", "accept-language"]),
        ),
        (200, [(b"vary", b"b"), (b"vary", b"A")], (60.0, ["a", "b"])),  # two field lines
        (200, [(b"cache-control", b"max-age=5"), (b"cache-control", b"s-maxage=7")], (7.0, [])),
    ],
)
def test_storable(status: int, headers: H, expected: tuple[float, list[str]] | None) -> None:
    assert kept(status, headers) == expected


def test_no_cache_is_stored_but_must_be_validated() -> None:  # 5.2.2.4
    found = storable(
        200, [(b"cache-control", b"No-Cache, max-age=60")], request_time=0, response_time=0
    )
    assert found is not None
    assert found.freshness.no_cache
    assert not found.freshness.is_fresh(1.0)


def test_private_responses_are_storable_in_a_private_cache() -> None:
    headers = [(b"cache-control", b"private, max-age=30")]
    assert storable(200, headers, request_time=0, response_time=0) is None
    private = CachePolicy(shared=False)
    found = storable(200, headers, request_time=0, response_time=0, policy=private)
    assert found is not None
    assert found.freshness.lifetime == 30.0
