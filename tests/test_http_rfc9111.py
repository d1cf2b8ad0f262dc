"""RFC 9111 (with 9110, 5861, 8941 and 9213), one row per rule, the section in the row id.

Pure functions of resilience.http: no I/O, no clock; every time is passed in. Row ids:
``9111-<section>-...`` for RFC 9111, ``9110-``, ``5861-``, ``8941-``, ``9213-`` for the
others, ``safety-`` for this project's rules that are stricter than the RFCs.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from resilience.http import (
    UNSATISFIABLE,
    CachePolicy,
    Freshness,
    Storable,
    byte_range,
    conditional_headers,
    content_range,
    format_http_date,
    freshen,
    head_matches,
    http_date,
    if_range_matches,
    invalidated_targets,
    invalidates,
    normalise,
    not_modified,
    not_modified_headers,
    parse_dictionary,
    selecting_values,
    selects,
    storable,
    targeted_directives,
    vary_fields,
)

T0 = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT: when the response arrived
H = list[tuple[bytes, bytes]]
SHARED = CachePolicy()
PRIVATE = CachePolicy(shared=False)
CDN = CachePolicy(targets=("resilience-cache-control", "cdn-cache-control"))


def imf(offset: float) -> str:
    return format_http_date(T0 + offset)


def fields(*pairs: tuple[str, str]) -> H:
    return [(k.lower().encode(), v.encode("latin-1")) for k, v in pairs]


def decide(
    *pairs: tuple[str, str],
    status: int = 200,
    policy: CachePolicy = SHARED,
    default: float | None = None,
    request: tuple[tuple[str, str], ...] = (),
    request_time: float = T0,
) -> Storable | None:
    return storable(
        status,
        fields(*pairs),
        request_time=request_time,
        response_time=T0,
        policy=policy,
        default=default,
        request_headers=fields(*request),
    )


def row(row_id: str, *values: Any) -> Any:
    return pytest.param(*values, id=row_id)


# --- 3, 3.1, 3.5, 5.2.2: what may be stored ------------------------------------------------

CC = "Cache-Control"
AUTH = (("Authorization", "Bearer a"),)

STORE = [
    row("9111-3-any-final-status-with-explicit-freshness", 500, [(CC, "max-age=60")], {}, 60.0),
    row("9111-3-206-is-never-stored", 206, [(CC, "max-age=60")], {}, None),
    row("9111-3-304-is-never-stored", 304, [(CC, "max-age=60")], {}, None),
    row("9111-3-interim-status-is-never-stored", 103, [(CC, "max-age=60")], {}, None),
    row("9111-3-heuristic-status-stored-for-validation", 200, [("ETag", '"a"')], {}, 0.0),
    row("9111-3-other-status-without-freshness-refused", 201, [("ETag", '"a"')], {}, None),
    row("9111-3-public-makes-any-status-storable", 599, [(CC, "public")], {}, 0.0),
    row("9111-3-expires-makes-it-storable", 201, [("Expires", imf(60))], {}, 60.0),
    row(
        "9111-3.5-authorization-refused-by-a-shared-cache",
        200,
        [(CC, "max-age=60")],
        {"request": AUTH},
        None,
    ),
    row(
        "9111-3.5-authorization-with-public",
        200,
        [(CC, "public, max-age=60")],
        {"request": AUTH},
        60.0,
    ),
    row(
        "9111-3.5-authorization-with-s-maxage", 200, [(CC, "s-maxage=60")], {"request": AUTH}, 60.0
    ),
    row(
        "9111-3.5-authorization-with-must-revalidate",
        200,
        [(CC, "max-age=60, must-revalidate")],
        {"request": AUTH},
        60.0,
    ),
    row(
        "9111-3.5-authorization-private-cache-stores",
        200,
        [(CC, "max-age=60")],
        {"request": AUTH, "policy": PRIVATE},
        60.0,
    ),
    row("9111-5.2.2.5-no-store-refused", 200, [(CC, "max-age=60, no-store")], {}, None),
    row("9111-5.2-no-store-case-insensitive", 200, [(CC, "No-StOrE")], {}, None),
    row("9111-5.2-malformed-no-store-still-refused", 200, [(CC, "no-store =1")], {}, None),
    row(
        "9111-5.2.2.7-private-refused-by-a-shared-cache",
        200,
        [(CC, "private, max-age=60")],
        {},
        None,
    ),
    row(
        "9111-5.2.2.7-private-stored-by-a-private-cache",
        200,
        [(CC, "private, max-age=60")],
        {"policy": PRIVATE},
        60.0,
    ),
    row(
        "9111-5.2.2.7-qualified-private-refused-by-a-shared-cache",
        200,
        [(CC, 'private="x", max-age=60')],
        {},
        None,
    ),
    row(
        "9111-5.2.2.3-must-understand-known-status-ignores-no-store",
        200,
        [(CC, "must-understand, no-store, max-age=60")],
        {},
        60.0,
    ),
    row(
        "9111-5.2.2.3-must-understand-unknown-status-refused",
        299,
        [(CC, "must-understand, max-age=60")],
        {},
        None,
    ),
    row(
        "9111-5.2.2.3-must-understand-206-refused",
        206,
        [(CC, "must-understand, max-age=60")],
        {},
        None,
    ),
    row(
        "9111-5.2.1.5-request-no-store-refused",
        200,
        [(CC, "max-age=60")],
        {"request": ((CC, "no-store"),)},
        None,
    ),
    row(
        "9111-5.2.1-other-request-directives-do-not-change-storing",
        200,
        [(CC, "max-age=60")],
        {"request": ((CC, "no-cache, max-age=0"),)},
        60.0,
    ),
    row("9111-4.1-vary-star-refused", 200, [(CC, "max-age=60"), ("Vary", "*")], {}, None),
    row(
        "9111-4.1-vary-star-in-a-list-refused",
        200,
        [(CC, "max-age=60"), ("Vary", "Foo, *")],
        {},
        None,
    ),
    row(
        "9111-4.1-vary-star-on-a-second-line-refused",
        200,
        [(CC, "max-age=60"), ("Vary", ""), ("Vary", "*")],
        {},
        None,
    ),
    row(
        "safety-set-cookie-refused-by-a-shared-cache",
        200,
        [(CC, "max-age=60"), ("Set-Cookie", "a=b")],
        {},
        None,
    ),
    row(
        "safety-set-cookie-stored-by-a-private-cache",
        200,
        [(CC, "max-age=60"), ("Set-Cookie", "a=b")],
        {"policy": PRIVATE},
        60.0,
    ),
    row(
        "9213-2.2-targeted-field-replaces-cache-control",
        200,
        [(CC, "no-store"), ("CDN-Cache-Control", "max-age=60")],
        {"policy": CDN},
        60.0,
    ),
    row(
        "9213-2.2-targeted-no-store-beats-cache-control",
        200,
        [(CC, "max-age=60"), ("CDN-Cache-Control", "no-store")],
        {"policy": CDN},
        None,
    ),
    row(
        "9213-2.2-targeted-private-refused",
        200,
        [(CC, "max-age=60"), ("CDN-Cache-Control", "private")],
        {"policy": CDN},
        None,
    ),
    row(
        "9213-2.2-first-target-wins",
        200,
        [("CDN-Cache-Control", "max-age=5"), ("Resilience-Cache-Control", "max-age=60")],
        {"policy": CDN},
        60.0,
    ),
    row(
        "9213-2.2-an-invalid-target-is-skipped",
        200,
        [("Resilience-Cache-Control", "&&"), ("CDN-Cache-Control", "max-age=60")],
        {"policy": CDN},
        60.0,
    ),
    row(
        "9213-2.2-invalid-targeted-field-falls-back",
        200,
        [(CC, "no-store"), ("CDN-Cache-Control", "max-age=60, &&&")],
        {"policy": CDN},
        None,
    ),
    row(
        "9213-2.1-wrong-type-falls-back",
        200,
        [(CC, "no-store"), ("CDN-Cache-Control", 'max-age="60"')],
        {"policy": CDN},
        None,
    ),
    row(
        "9213-2.2-empty-targeted-field-falls-back",
        200,
        [(CC, "max-age=7"), ("CDN-Cache-Control", "")],
        {"policy": CDN},
        7.0,
    ),
    row(
        "9213-2.2-untargeted-cache-ignores-the-field",
        200,
        [(CC, "max-age=7"), ("CDN-Cache-Control", "max-age=60")],
        {},
        7.0,
    ),
]


@pytest.mark.parametrize(("status", "pairs", "options", "lifetime"), STORE)
def test_what_may_be_stored(
    status: int, pairs: list[tuple[str, str]], options: dict[str, Any], lifetime: float | None
) -> None:
    found = decide(*pairs, status=status, **options)
    assert (None if found is None else found.freshness.lifetime) == lifetime


FLAGS = [
    row(
        "9111-5.2.2.4-no-cache-stored-but-always-validated",
        [(CC, "no-cache, max-age=60")],
        "no_cache",
        True,
    ),
    row(
        "9111-5.2.2.4-qualified-no-cache-is-not-unqualified",
        [(CC, 'no-cache="a", max-age=60')],
        "no_cache",
        False,
    ),
    row(
        "9111-5.2.2.4-empty-qualified-no-cache-is-unqualified",
        [(CC, 'no-cache="", max-age=60')],
        "no_cache",
        True,
    ),
    row(
        "9111-5.2.2.2-must-revalidate",
        [(CC, "max-age=60, must-revalidate")],
        "must_revalidate",
        True,
    ),
    row(
        "9111-5.2.2.8-proxy-revalidate-binds-a-shared-cache",
        [(CC, "max-age=60, proxy-revalidate")],
        "must_revalidate",
        True,
    ),
    row(
        "9111-5.2.2.10-s-maxage-implies-proxy-revalidate",
        [(CC, "s-maxage=60")],
        "must_revalidate",
        True,
    ),
    row("9111-5.2.2.1-max-age-alone-may-go-stale", [(CC, "max-age=60")], "must_revalidate", False),
    row(
        "5861-3-stale-while-revalidate-window",
        [(CC, "max-age=1, stale-while-revalidate=30")],
        "stale_while_revalidate",
        30.0,
    ),
    row(
        "5861-4-stale-if-error-window",
        [(CC, "max-age=1, stale-if-error=30")],
        "stale_if_error",
        30.0,
    ),
    row(
        "5861-3-invalid-window-is-none",
        [(CC, "max-age=1, stale-while-revalidate=soon")],
        "stale_while_revalidate",
        0.0,
    ),
]


@pytest.mark.parametrize(("pairs", "name", "value"), FLAGS)
def test_directives_that_govern_reuse(
    pairs: list[tuple[str, str]], name: str, value: object
) -> None:
    found = decide(*pairs)
    assert found is not None
    assert getattr(found.freshness, name) == value


def test_9111_5_2_2_8_proxy_revalidate_does_not_bind_a_private_cache() -> None:
    found = decide((CC, "max-age=60, proxy-revalidate"), policy=PRIVATE)
    assert found is not None
    assert not found.freshness.must_revalidate


def test_9111_4_2_4_out_of_band_stale_if_error_only_where_the_origin_is_silent() -> None:
    policy = CachePolicy(stale_if_error=300.0)
    silent = decide((CC, "max-age=1"), policy=policy)
    told = decide((CC, "max-age=1, stale-if-error=5"), policy=policy)
    assert silent is not None
    assert silent.freshness.stale_if_error == 300.0
    assert told is not None
    assert told.freshness.stale_if_error == 5.0


OMITTED = [
    row(
        "9111-3.1-connection-and-the-fields-it-names",
        [("Connection", "a, B"), ("a", "1"), ("b", "2"), ("c", "3")],
        {b"connection", b"a", b"b"},
        {b"c"},
    ),
    row(
        "9111-3.1-hop-by-hop-fields",
        [("Keep-Alive", "5"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c")],
        {b"keep-alive", b"transfer-encoding", b"upgrade"},
        set(),
    ),
    row(
        "9111-3.1-proxy-authenticate",
        [("Proxy-Authenticate", "Basic"), ("WWW-Authenticate", "Basic")],
        {b"proxy-authenticate"},
        {b"www-authenticate"},
    ),
    row(
        "9111-5.2.2.4-qualified-no-cache-fields",
        [(CC, 'no-cache="a, b"'), ("a", "1"), ("b", "2"), ("c", "3")],
        {b"a", b"b"},
        {b"c"},
    ),
    row("9111-4.2.3-age-recomputed-not-stored", [("Age", "10")], {b"age"}, set()),
]


@pytest.mark.parametrize(("pairs", "dropped", "kept"), OMITTED)
def test_fields_never_stored(
    pairs: list[tuple[str, str]], dropped: set[bytes], kept: set[bytes]
) -> None:
    found = decide((CC, "max-age=60"), *pairs)
    assert found is not None
    names = {k for k, _ in found.stored_headers(fields((CC, "max-age=60"), *pairs))}
    assert not dropped & names
    assert kept <= names


# --- 4.2.1, 4.2.2: freshness lifetime -----------------------------------------------------

LIFETIME = [
    row(
        "9111-4.2.1-s-maxage-first-in-a-shared-cache", [(CC, "max-age=1, s-maxage=5")], SHARED, 5.0
    ),
    row(
        "9111-4.2.1-s-maxage-ignored-by-a-private-cache",
        [(CC, "max-age=1, s-maxage=5")],
        PRIVATE,
        1.0,
    ),
    row(
        "9111-4.2.1-max-age-beats-expires",
        [(CC, "max-age=10"), ("Expires", imf(-100)), ("Date", imf(0))],
        SHARED,
        10.0,
    ),
    row("9111-4.2.1-expires-minus-date", [("Expires", imf(100)), ("Date", imf(0))], SHARED, 100.0),
    row(
        "9111-4.2.1-expires-minus-the-origins-date",
        [("Expires", imf(1300)), ("Date", imf(1000))],
        SHARED,
        300.0,
    ),
    row(
        "9111-4.2.1-expires-without-date-uses-receipt-time", [("Expires", imf(100))], SHARED, 100.0
    ),
    row(
        "9110-6.6.1-invalid-date-is-receipt-time",
        [("Expires", imf(100)), ("Date", "soon")],
        SHARED,
        100.0,
    ),
    row(
        "9111-4.2.1-expires-before-date-is-stale",
        [("Expires", imf(300)), ("Date", imf(400))],
        SHARED,
        0.0,
    ),
    row("9111-5.3-invalid-expires-is-stale", [("Expires", "0"), ("Date", imf(0))], SHARED, 0.0),
    row(
        "9111-4.2.1-two-expires-lines-are-stale",
        [("Expires", imf(100)), ("Expires", imf(200))],
        SHARED,
        0.0,
    ),
    row("9111-4.2.1-first-of-two-max-ages", [(CC, "max-age=5, max-age=500")], SHARED, 5.0),
    row(
        "9111-4.2.1-first-of-two-max-age-lines",
        [(CC, "max-age=5"), (CC, "max-age=500")],
        SHARED,
        5.0,
    ),
    row("9111-1.2.2-overflowing-delta-is-2-pow-31", [(CC, "max-age=99999999999")], SHARED, 2.0**31),
    row("9111-1.2.2-leading-zeros", [(CC, "max-age=003600")], SHARED, 3600.0),
    row("9111-5.2-quoted-argument", [(CC, 'max-age="3600"')], SHARED, 3600.0),
    row("9111-5.2-case-insensitive-names", [(CC, "MaX-AgE=60")], SHARED, 60.0),
    row("9110-5.6.4-quoted-max-age-is-data", [(CC, 'ext="max-age=9999", max-age=1')], SHARED, 1.0),
    *(
        row(f"9111-4.2.1-invalid-max-age-{name}-is-stale", [(CC, value)], SHARED, 0.0)
        for name, value in (
            ("negative", "max-age=-60"),
            ("decimal", "max-age=60.5"),
            ("alpha", "max-age=60a"),
            ("single-quoted", "max-age='60'"),
            ("space-before-equals", "max-age =60"),
            ("space-after-equals", "max-age= 60"),
            ("no-argument", "max-age"),
        )
    ),
    row(
        "9111-4.2.2-heuristic-is-10-percent-of-the-last-modified-age",
        [("Last-Modified", imf(-1000)), ("Date", imf(0))],
        SHARED,
        100.0,
    ),
    row(
        "9111-4.2.2-heuristic-is-capped",
        [("Last-Modified", imf(-(10**8))), ("Date", imf(0))],
        SHARED,
        86_400.0,
    ),
    row(
        "9111-4.2.2-last-modified-after-date-gives-none",
        [("Last-Modified", imf(100)), ("Date", imf(0))],
        SHARED,
        0.0,
    ),
    row("9111-4.2.2-no-last-modified-gives-none", [("Date", imf(0))], SHARED, 0.0),
    row(
        "9111-4.2.2-explicit-freshness-beats-the-heuristic",
        [(CC, "max-age=0"), ("Last-Modified", imf(-(10**6)))],
        SHARED,
        0.0,
    ),
    row(
        "9111-4.2.2-an-invalid-expires-is-explicit",
        [("Expires", "never"), ("Last-Modified", imf(-(10**6)))],
        SHARED,
        0.0,
    ),
]


@pytest.mark.parametrize(("pairs", "policy", "lifetime"), LIFETIME)
def test_freshness_lifetime(
    pairs: list[tuple[str, str]], policy: CachePolicy, lifetime: float
) -> None:
    found = decide(*pairs, policy=policy)
    assert found is not None
    assert found.freshness.lifetime == lifetime


@pytest.mark.parametrize(
    ("pairs", "default", "lifetime", "heuristic"),
    [
        row(
            "9111-4.2.2-a-default-lifetime-replaces-the-heuristic",
            [("Last-Modified", imf(-1000))],
            30.0,
            30.0,
            True,
        ),
        row(
            "9111-4.2.2-a-default-never-beats-explicit-freshness",
            [(CC, "max-age=5")],
            30.0,
            5.0,
            False,
        ),
        row(
            "9111-4.2.2-a-default-never-beats-an-expired-expires",
            [("Expires", imf(-5))],
            30.0,
            0.0,
            False,
        ),
    ],
)
def test_default_lifetime(
    pairs: list[tuple[str, str]], default: float, lifetime: float, heuristic: bool
) -> None:
    found = decide(*pairs, default=default)
    assert found is not None
    assert (found.freshness.lifetime, found.heuristic) == (lifetime, heuristic)


def test_9111_4_2_2_a_default_only_for_heuristic_statuses() -> None:
    assert decide(status=201, default=30.0) is None
    found = decide((CC, "public"), status=201, default=30.0)
    assert found is not None
    assert found.freshness.lifetime == 30.0


# --- RFC 9110 5.6.7: HTTP dates -----------------------------------------------------------

DATES = [
    row("9110-5.6.7-imf-fixdate", "Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),
    row("9110-5.6.7-rfc850-date", "Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),
    row("9110-5.6.7-asctime-date", "Sun Nov  6 08:49:37 1994", 784111777.0),
    row("9110-5.6.7-surrounding-whitespace", "  Sun, 06 Nov 1994 08:49:37 GMT ", 784111777.0),
    row("9110-5.6.7-case-of-names-is-a-slip", "SUN, 06 NOV 1994 08:49:37 gmt", 784111777.0),
    row("9110-5.6.7-leap-second", "Sun, 06 Nov 1994 08:49:60 GMT", 784111799.0),
    row("9110-5.6.7-utc-is-not-gmt", "Sun, 06 Nov 1994 08:49:37 UTC", None),
    row("9110-5.6.7-numeric-zone", "Sun, 06 Nov 1994 08:49:37 +0000", None),
    row("9110-5.6.7-two-digit-year-in-imf", "Sun, 06 Nov 94 08:49:37 GMT", None),
    row("9110-5.6.7-no-comma", "Sun 06 Nov 1994 08:49:37 GMT", None),
    row("9110-5.6.7-double-spaces", "Sun, 06  Nov  1994 08:49:37 GMT", None),
    row("9110-5.6.7-dashes-in-imf", "Sun, 06-Nov-1994 08:49:37 GMT", None),
    row("9110-5.6.7-periods", "Sun, 06 Nov 1994 08.49.37 GMT", None),
    row("9110-5.6.7-one-digit-hour", "Sun, 06 Nov 1994 8:49:37 GMT", None),
    row("9110-5.6.7-one-digit-day-in-imf", "Sun, 6 Nov 1994 08:49:37 GMT", None),
    row(
        "9110-5.6.7-two-dates-on-two-lines",
        "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
        None,
    ),
    row("9110-5.6.7-no-such-day", "Thu, 31 Feb 2050 02:01:18 GMT", None),
    row("9110-5.6.7-hour-24", "Sun, 06 Nov 1994 24:00:00 GMT", None),
    row("9110-5.6.7-a-number", "0", None),
    row("9110-5.6.7-absent", None, None),
]


@pytest.mark.parametrize(("value", "timestamp"), DATES)
def test_http_dates(value: str | None, timestamp: float | None) -> None:
    assert http_date(value) == timestamp


@pytest.mark.parametrize(
    ("value", "now", "year"),
    [
        row(
            "9110-5.6.7-rfc850-year-within-50-years-ahead",
            "Thursday, 18-Aug-50 02:01:18 GMT",
            T0,
            2050,
        ),
        row(
            "9110-5.6.7-rfc850-year-over-50-years-ahead-is-past",
            "Monday, 18-Aug-80 02:01:18 GMT",
            T0,
            1980,
        ),
        row(
            "9110-5.6.7-rfc850-without-now-uses-1970-2069",
            "Thursday, 18-Aug-69 02:01:18 GMT",
            None,
            2069,
        ),
    ],
)
def test_rfc850_two_digit_years(value: str, now: float | None, year: int) -> None:
    found = http_date(value, now=now)
    assert found is not None
    assert format_http_date(found).split()[3] == str(year)


def test_9110_5_6_7_imf_fixdate_round_trip() -> None:
    assert format_http_date(784111777.0) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(format_http_date(T0)) == T0


# --- 4.2.3, 5.1: age ----------------------------------------------------------------------

AGE = [
    # (response fields, request_time offset, seconds resident, current_age)
    row("9111-4.2.3-resident-time", [], 0, 30, 30.0),
    row("9111-4.2.3-age-field-is-added", [("Age", "10")], 0, 30, 40.0),
    row("9111-4.2.3-response-delay-is-added-to-age", [("Age", "10")], -4, 0, 14.0),
    row("9111-4.2.3-apparent-age-from-date", [("Date", imf(-100))], 0, 0, 100.0),
    row(
        "9111-4.2.3-larger-of-apparent-and-corrected-age",
        [("Date", imf(-100)), ("Age", "30")],
        0,
        5,
        105.0,
    ),
    row(
        "9111-4.2.3-corrected-age-beats-apparent-age",
        [("Date", imf(-30)), ("Age", "100")],
        0,
        5,
        105.0,
    ),
    row("9111-4.2.3-future-date-gives-no-negative-age", [("Date", imf(100))], 0, 5, 5.0),
    row("9111-5.1-list-age-uses-the-first-member", [("Age", "7, 7200")], 0, 0, 7.0),
    row("9111-5.1-two-age-lines-use-the-first", [("Age", "7"), ("Age", "7200")], 0, 0, 7.0),
    row("9111-5.1-invalid-age-ignored", [("Age", "-7200")], 0, 0, 0.0),
    row("9111-5.1-float-age-ignored", [("Age", "7200.0")], 0, 0, 0.0),
    row("9111-1.2.2-huge-age-is-2-pow-31", [("Age", "99999999999")], 0, 0, 2.0**31),
]


@pytest.mark.parametrize(("pairs", "sent", "resident", "age"), AGE)
def test_current_age(
    pairs: list[tuple[str, str]], sent: float, resident: float, age: float
) -> None:
    found = decide((CC, "max-age=60"), *pairs, request_time=T0 + sent)
    assert found is not None
    assert found.freshness.age(T0 + resident) == age


# --- 4.2, 4.2.4, RFC 5861: fresh, stale, served stale --------------------------------------

F = Freshness
REUSE = [
    # (freshness, seconds after arrival, fresh?, stale while revalidating?, stale on error?)
    row("9111-4.2-fresh-while-age-below-lifetime", F(60, 0, T0), 59, True, False, False),
    row("9111-4.2-stale-at-the-lifetime", F(60, 0, T0), 60, False, False, False),
    row("9111-4.2-initial-age-counts", F(60, 50, T0), 10, False, False, False),
    row("9111-5.2.2.4-no-cache-never-fresh", F(60, 0, T0, no_cache=True), 0, False, False, False),
    row(
        "5861-3-within-stale-while-revalidate",
        F(60, 0, T0, stale_while_revalidate=30),
        89,
        False,
        True,
        False,
    ),
    row(
        "5861-3-past-stale-while-revalidate",
        F(60, 0, T0, stale_while_revalidate=30),
        90,
        False,
        False,
        False,
    ),
    row("5861-4-within-stale-if-error", F(60, 0, T0, stale_if_error=30), 89, False, False, True),
    row("5861-4-past-stale-if-error", F(60, 0, T0, stale_if_error=30), 90, False, False, False),
    row(
        "9111-4.2.4-must-revalidate-forbids-stale",
        F(60, 0, T0, False, True, 30, 30),
        61,
        False,
        False,
        False,
    ),
    row(
        "9111-4.2.4-no-cache-forbids-stale",
        F(60, 0, T0, True, False, 30, 30),
        61,
        False,
        False,
        False,
    ),
]


@pytest.mark.parametrize(("freshness", "after", "fresh", "revalidating", "error"), REUSE)
def test_reuse(
    freshness: Freshness, after: float, fresh: bool, revalidating: bool, error: bool
) -> None:
    now = T0 + after
    assert freshness.is_fresh(now) == fresh
    assert freshness.may_serve_stale(now) == revalidating
    assert freshness.may_serve_stale(now, error=True) == error


RETENTION = [
    # (freshness, has a validator, keep_stale, seconds kept after arrival)
    row("9111-4.3-fresh-then-long-enough-to-revalidate", F(60, 0, T0), True, 600, 660.0),
    row("9111-4.3-without-a-validator-only-while-fresh", F(60, 0, T0), False, 600, 60.0),
    row("9111-4.3-initial-age-shortens-it", F(60, 20, T0), False, 600, 40.0),
    row("9111-4.3-stale-on-arrival-without-validator-is-useless", F(0, 0, T0), False, 600, 0.0),
    row(
        "9111-5.2.2.4-no-cache-without-validator-is-useless",
        F(60, 0, T0, no_cache=True),
        False,
        600,
        0.0,
    ),
    row(
        "5861-3-kept-for-stale-while-revalidate",
        F(0, 0, T0, stale_while_revalidate=30),
        False,
        0,
        30.0,
    ),
    row("5861-4-kept-for-stale-if-error", F(10, 0, T0, stale_if_error=300), True, 60, 310.0),
    row(
        "9111-4.2.4-must-revalidate-drops-the-stale-windows",
        F(10, 0, T0, False, True, 300, 300),
        False,
        60,
        10.0,
    ),
]


@pytest.mark.parametrize(("freshness", "validator", "keep_stale", "seconds"), RETENTION)
def test_retention(
    freshness: Freshness, validator: bool, keep_stale: float, seconds: float
) -> None:
    assert freshness.retention(validator=validator, keep_stale=keep_stale) == seconds


# --- 4.3.1, 4.3.4, 4.3.5: validating with the origin --------------------------------------

CONDITIONAL = [
    row("9111-4.3.1-strong-etag-to-if-none-match", '"a"', None, [(b"if-none-match", b'"a"')]),
    row("9111-4.3.1-weak-etag-to-if-none-match", 'W/"a"', None, [(b"if-none-match", b'W/"a"')]),
    row("9111-4.3.1-unquoted-etag-is-quoted", "a", None, [(b"if-none-match", b'"a"')]),
    row(
        "9111-4.3.1-last-modified-verbatim",
        None,
        imf(-60),
        [(b"if-modified-since", imf(-60).encode())],
    ),
    row(
        "9111-4.3.1-both-validators",
        '"a"',
        imf(-60),
        [(b"if-none-match", b'"a"'), (b"if-modified-since", imf(-60).encode())],
    ),
    row("9110-13.1.3-invalid-last-modified-not-sent", None, "yesterday", []),
    row("9111-4.3.1-no-validators-unconditional", None, None, []),
]


@pytest.mark.parametrize(("etag", "last_modified", "sent"), CONDITIONAL)
def test_conditional_request(etag: str | None, last_modified: str | None, sent: H) -> None:
    assert conditional_headers(etag, last_modified) == sent


SELECTS = [
    row("9111-4.3.4-same-strong-etag", '"a"', None, [("ETag", '"a"')], True),
    row("9111-4.3.4-weak-etag-matches-weakly", '"a"', None, [("ETag", 'W/"a"')], True),
    row("9111-4.3.4-other-etag-is-another-response", '"a"', None, [("ETag", '"b"')], False),
    row("9111-4.3.4-etag-when-none-was-stored", None, imf(-60), [("ETag", '"b"')], False),
    row("9111-4.3.4-same-last-modified", None, imf(-60), [("Last-Modified", imf(-60))], True),
    row("9111-4.3.4-other-last-modified", None, imf(-60), [("Last-Modified", imf(-30))], False),
    row("9111-4.3.4-no-validator-answers-our-request", '"a"', None, [("Date", imf(0))], True),
]


@pytest.mark.parametrize(("etag", "last_modified", "pairs", "selected"), SELECTS)
def test_which_304_freshens(
    etag: str | None, last_modified: str | None, pairs: list[tuple[str, str]], selected: bool
) -> None:
    assert selects(etag, last_modified, fields(*pairs)) is selected


STORED = fields(
    ("Content-Type", "text/plain"),
    ("Content-Length", "5"),
    ("Content-Encoding", "gzip"),
    ("X-A", "1"),
    ("X-A", "2"),
    ("Cache-Control", "max-age=1"),
)
FRESHEN = [
    row("9111-3.2-new-fields-replace-stored-lines", [("X-A", "3")], {b"x-a": [b"3"]}),
    row(
        "9111-3.2-fields-not-in-the-304-stay",
        [("X-B", "1")],
        {b"x-a": [b"1", b"2"], b"x-b": [b"1"]},
    ),
    row(
        "9111-3.2-content-type-is-updated",
        [("Content-Type", "text/html")],
        {b"content-type": [b"text/html"]},
    ),
    row(
        "9111-3.2-cache-control-is-updated",
        [(CC, "max-age=60")],
        {b"cache-control": [b"max-age=60"]},
    ),
    row(
        "9111-3.2-content-length-is-not-updated",
        [("Content-Length", "0")],
        {b"content-length": [b"5"]},
    ),
    row(
        "9111-3.2-content-encoding-describes-the-stored-body",
        [("Content-Encoding", "br")],
        {b"content-encoding": [b"gzip"]},
    ),
    row(
        "9111-3.2-connection-fields-never-enter",
        [("Connection", "x-c"), ("X-C", "1"), ("Keep-Alive", "5")],
        {b"x-c": [], b"connection": [], b"keep-alive": []},
    ),
]


@pytest.mark.parametrize(("pairs", "expected"), FRESHEN)
def test_freshening(pairs: list[tuple[str, str]], expected: dict[bytes, list[bytes]]) -> None:
    merged = freshen(STORED, fields(*pairs))
    for name, values in expected.items():
        assert [v for k, v in merged if k == name] == values


HEAD = [
    row("9111-4.3.5-no-validators-in-the-head-response", [("X", "1")], True),
    row("9111-4.3.5-matching-etag", [("ETag", '"a"')], True),
    row("9111-4.3.5-other-etag", [("ETag", '"b"')], False),
    row("9111-4.3.5-other-last-modified", [("Last-Modified", imf(1))], False),
    row("9111-4.3.5-other-content-length", [("Content-Length", "6")], False),
]


@pytest.mark.parametrize(("pairs", "matches"), HEAD)
def test_head_freshens_only_the_same_response(pairs: list[tuple[str, str]], matches: bool) -> None:
    stored = fields(("ETag", '"a"'), ("Last-Modified", imf(0)), ("Content-Length", "5"))
    assert head_matches(stored, fields(*pairs)) is matches


# --- 4.3.2, RFC 9110 13.2.2: clients' conditional requests --------------------------------

LM = imf(-3600)
PRECONDITIONS = [
    row("9111-4.3.2-if-none-match-same", [("If-None-Match", '"a"')], True),
    row("9111-4.3.2-if-none-match-other", [("If-None-Match", '"b"')], False),
    row("9111-4.3.2-if-none-match-in-a-list", [("If-None-Match", '"b", "a"')], True),
    row("9111-4.3.2-if-none-match-star", [("If-None-Match", "*")], True),
    row("9110-13.1.2-if-none-match-weak-comparison", [("If-None-Match", 'W/"a"')], True),
    row("9110-13.1.2-quoted-comma-is-one-tag", [("If-None-Match", '"a,b"')], False),
    row("9111-4.3.2-if-modified-since-equal", [("If-Modified-Since", LM)], True),
    row("9111-4.3.2-if-modified-since-later", [("If-Modified-Since", imf(-10))], True),
    row("9111-4.3.2-if-modified-since-earlier", [("If-Modified-Since", imf(-7200))], False),
    row(
        "9110-13.1.3-invalid-if-modified-since-ignored", [("If-Modified-Since", "yesterday")], False
    ),
    row(
        "9110-13.2.2-if-none-match-decides-alone",
        [("If-None-Match", '"b"'), ("If-Modified-Since", imf(-10))],
        False,
    ),
    row("9110-13.2.2-unconditional", [], False),
]


@pytest.mark.parametrize(("pairs", "answer"), PRECONDITIONS)
def test_client_preconditions(pairs: list[tuple[str, str]], answer: bool) -> None:
    assert not_modified(fields(*pairs), etag='"a"', last_modified=LM, date=T0) is answer


@pytest.mark.parametrize(
    ("since", "answer"),
    [
        row("9111-4.3.2-without-last-modified-date-is-compared", imf(10), True),
        row("9111-4.3.2-without-last-modified-an-earlier-date-is-modified", imf(-3000), False),
    ],
)
def test_if_modified_since_without_last_modified(since: str, answer: bool) -> None:
    request = fields(("If-Modified-Since", since))
    assert not_modified(request, etag=None, last_modified=None, date=T0) is answer


def test_9110_15_4_5_what_a_304_carries() -> None:
    stored = fields(
        ("ETag", '"a"'),
        ("Cache-Control", "max-age=60"),
        ("Date", imf(0)),
        ("Content-Type", "text/plain"),
        ("Content-Length", "5"),
        ("CDN-Cache-Control", "max-age=9"),
    )
    names = [k for k, _ in not_modified_headers(stored, frozenset({b"cdn-cache-control"}))]
    assert names == [b"etag", b"cache-control", b"date", b"cdn-cache-control"]


# --- 4.4: invalidation --------------------------------------------------------------------

METHODS = [
    row("9111-4.4-post-2xx", "POST", 201, True),
    row("9111-4.4-put-3xx", "PUT", 303, True),
    row("9111-4.4-delete", "DELETE", 204, True),
    row("9111-4.4-unknown-method-is-unsafe", "M-SEARCH", 200, True),
    row("9111-4.4-error-response-does-not-invalidate", "POST", 500, False),
    row("9111-4.4-client-error-does-not-invalidate", "PUT", 404, False),
    row("9111-4.4-safe-method-does-not-invalidate", "OPTIONS", 200, False),
    row("9111-4.4-get-does-not-invalidate", "GET", 200, False),
]


@pytest.mark.parametrize(("method", "status", "answer"), METHODS)
def test_what_invalidates(method: str, status: int, answer: bool) -> None:
    assert invalidates(method, status) is answer


TARGETS = [
    row("9111-4.4-the-target-uri", [], [("/a/b", "q=1")]),
    row("9111-4.4-relative-location", [("Location", "/c")], [("/a/b", "q=1"), ("/c", "")]),
    row(
        "9111-4.4-relative-path-location",
        [("Location", "c?x=1")],
        [("/a/b", "q=1"), ("/a/c", "x=1")],
    ),
    row(
        "9111-4.4-absolute-same-origin-content-location",
        [("Content-Location", "http://app.test/c")],
        [("/a/b", "q=1"), ("/c", "")],
    ),
    row(
        "9111-4.4-default-port-is-the-same-origin",
        [("Location", "http://app.test:80/c")],
        [("/a/b", "q=1"), ("/c", "")],
    ),
    row(
        "9111-4.4-another-host-is-not-invalidated",
        [("Location", "http://evil.test/c")],
        [("/a/b", "q=1")],
    ),
    row(
        "9111-4.4-another-scheme-is-not-invalidated",
        [("Location", "https://app.test/c")],
        [("/a/b", "q=1")],
    ),
    row(
        "9111-4.4-another-port-is-not-invalidated",
        [("Location", "http://app.test:8080/c")],
        [("/a/b", "q=1")],
    ),
    row(
        "9111-4.4-two-location-lines-are-not-one-uri",
        [("Location", "/c"), ("Location", "/d")],
        [("/a/b", "q=1")],
    ),
    row("9111-4.4-fragment-dropped", [("Location", "/c#top")], [("/a/b", "q=1"), ("/c", "")]),
]


@pytest.mark.parametrize(("pairs", "targets"), TARGETS)
def test_what_is_invalidated(pairs: list[tuple[str, str]], targets: list[tuple[str, str]]) -> None:
    assert invalidated_targets("http", "app.test", "/a/b?q=1", fields(*pairs)) == targets


# --- 4.1: Vary ----------------------------------------------------------------------------

SAME = [
    row("9111-4.1-whitespace-around-members", "foo", "1,2", " 1, 2 "),
    row("9111-4.1-empty-members", "foo", "1,,2", "1, 2"),
    row("9111-4.1-content-negotiation-order", "accept-encoding", "gzip, br", "br, gzip"),
    row("9111-4.1-language-order", "accept-language", "en, de", "de, en"),
    row("9111-4.1-language-case", "accept-language", "en-US", "en-us"),
    row("9111-4.1-parameter-whitespace", "accept", "text/html;q=0.5", "text/html ; q=0.5"),
    row("9111-4.1-quoted-commas-kept-whole", "foo", '"a,b", c', '"a,b",c'),
]


@pytest.mark.parametrize(("name", "one", "other"), SAME)
def test_selecting_fields_that_match(name: str, one: str, other: str) -> None:
    assert normalise(name, one) == normalise(name, other)


DIFFERENT = [
    row("9111-4.1-other-values", "foo", "1", "2"),
    row(
        "9111-4.1-order-kept-for-other-fields",
        "x-forwarded-for",
        "1.1.1.1, 2.2.2.2",
        "2.2.2.2, 1.1.1.1",
    ),
    row("9111-4.1-case-kept-for-other-fields", "foo", "A", "a"),
    row("9111-4.1-absent-is-not-empty", "foo", None, ""),
]


@pytest.mark.parametrize(("name", "one", "other"), DIFFERENT)
def test_selecting_fields_that_differ(name: str, one: str | None, other: str | None) -> None:
    assert normalise(name, one) != normalise(name, other)


def test_9111_4_1_combined_lines_match_one_line() -> None:
    two = selecting_values(["foo"], fields(("Foo", "1"), ("Foo", "2")))
    assert two == selecting_values(["foo"], fields(("Foo", "1, 2")))


@pytest.mark.parametrize(
    ("pairs", "vary"),
    [
        row(
            "9111-4.1-field-names-lower-case-sorted-once",
            [("Vary", "B, a"), ("Vary", "A")],
            ("a", "b"),
        ),
        row("9111-4.1-no-vary", [], ()),
        row("9111-4.1-star", [("Vary", "accept, *")], None),
    ],
)
def test_vary_fields(pairs: list[tuple[str, str]], vary: tuple[str, ...] | None) -> None:
    assert vary_fields(fields(*pairs)) == vary


# --- RFC 9110 14, 13.1.5: ranges from a stored response -----------------------------------

RANGES = [
    row("9110-14.1.2-first-and-last", "bytes=0-1", (0, 1)),
    row("9110-14.1.2-open-ended", "bytes=5-", (5, 9)),
    row("9110-14.1.2-suffix", "bytes=-3", (7, 9)),
    row("9110-14.1.2-suffix-longer-than-the-body", "bytes=-30", (0, 9)),
    row("9110-14.1.2-last-past-the-end-is-clipped", "bytes=8-100", (8, 9)),
    row("9110-14.1-unit-is-case-insensitive", "Bytes=0-1", (0, 1)),
    row("9110-14.1.2-first-past-the-end-is-unsatisfiable", "bytes=10-20", UNSATISFIABLE),
    row("9110-14.1.2-zero-suffix-is-unsatisfiable", "bytes=-0", UNSATISFIABLE),
    row("9110-14.1.1-last-before-first-is-invalid", "bytes=5-1", None),
    row("9110-14.1-other-unit-ignored", "items=0-1", None),
    row("9110-14.2-several-ranges-get-the-whole-body", "bytes=0-1, 4-5", None),
    row("9110-14.1-garbage-ignored", "bytes=a-b", None),
    row("9110-14.2-absent", None, None),
]


@pytest.mark.parametrize(("value", "expected"), RANGES)
def test_byte_ranges(value: str | None, expected: object) -> None:
    assert byte_range(value, 10) == expected


def test_9110_14_4_content_range() -> None:
    assert content_range((7, 9), 10) == b"bytes 7-9/10"
    assert content_range(UNSATISFIABLE, 10) == b"bytes */10"


IF_RANGE = [
    row("9110-13.1.5-absent", None, '"a"', True),
    row("9110-13.1.5-same-strong-etag", '"a"', '"a"', True),
    row("9110-13.1.5-other-etag", '"b"', '"a"', False),
    row("9110-13.1.5-weak-etags-never-match", 'W/"a"', 'W/"a"', False),
    row("9110-13.1.5-strong-last-modified", imf(-3600), None, True),
    row("9110-13.1.5-other-date", imf(-60), None, False),
]


@pytest.mark.parametrize(("value", "etag", "applies"), IF_RANGE)
def test_if_range(value: str | None, etag: str | None, applies: bool) -> None:
    found = if_range_matches(value, etag=etag, last_modified=imf(-3600), date=T0)
    assert found is applies


def test_9110_8_8_2_2_a_last_modified_within_a_second_of_date_is_weak() -> None:
    assert not if_range_matches(imf(0), etag=None, last_modified=imf(0), date=T0)


# --- RFC 8941, RFC 9213 2.1: targeted fields ----------------------------------------------

DICTIONARIES = [
    row(
        "8941-4.2.2-integer-and-boolean", "max-age=60, no-store", {"max-age": 60, "no-store": True}
    ),
    row("8941-4.2.2-parameters-dropped", "max-age=60;x=1, public", {"max-age": 60, "public": True}),
    row("8941-4.2.2-last-duplicate-wins", "max-age=1, max-age=2", {"max-age": 2}),
    row(
        "8941-4.2.2-string-token-decimal",
        'a="x", b=tok, c=1.5',
        {"a": "x", "b": "tok", "c": Decimal("1.5")},
    ),
    row("8941-4.2.2-inner-list", 'private=("a" "b")', {"private": ("a", "b")}),
    row("8941-4.2.2-false-boolean", "no-store=?0", {"no-store": False}),
    row("8941-4.2.2-empty", "", {}),
    row("8941-4.2.2-upper-case-key", "Max-Age=60", None),
    row("8941-4.2.2-space-around-equals", "max-age =60", None),
    row("8941-4.2.2-unknown-character", "max-age=60, &&&", None),
    row("8941-4.2.2-trailing-comma", "max-age=60,", None),
    row("8941-4.2.2-too-long-integer", "max-age=1234567890123456", None),
]


@pytest.mark.parametrize(("value", "members"), DICTIONARIES)
def test_structured_dictionaries(value: str, members: dict[str, object] | None) -> None:
    assert parse_dictionary(value) == members


TARGETED = [
    row(
        "9213-2.1-delta-directives-are-integers",
        "max-age=60, stale-if-error=5",
        {"max-age": "60", "stale-if-error": "5"},
    ),
    row(
        "9213-2.1-flags-are-booleans",
        "no-store, must-revalidate",
        {"no-store": None, "must-revalidate": None},
    ),
    row("9213-2.1-false-flag-is-absent", "no-store=?0, max-age=5", {"max-age": "5"}),
    row("9213-2.1-field-names-as-a-string", 'no-cache="a, b"', {"no-cache": "a, b"}),
    row("9213-2.1-field-names-as-an-inner-list", 'private=("a" "b")', {"private": "a, b"}),
    row("9213-2.1-extensions-pass", "none", {"none": None}),
    row("9213-2.1-string-max-age-invalidates-the-field", 'max-age="60"', None),
    row("9213-2.1-negative-max-age-invalidates-the-field", "max-age=-1", None),
    row("9213-2.1-decimal-max-age-invalidates-the-field", "max-age=1.5", None),
    row("9213-2.1-valued-flag-invalidates-the-field", "no-store=1", None),
    row("9213-2.2-empty-is-no-value", "", None),
    row("9213-2.2-absent", None, None),
]


@pytest.mark.parametrize(("value", "directives"), TARGETED)
def test_targeted_directives(value: str | None, directives: dict[str, str | None] | None) -> None:
    assert targeted_directives(value) == directives


# --- the policy object --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"shared": 1}, "shared"),
        ({"targets": "cdn-cache-control"}, "targets"),
        ({"targets": ("CDN-Cache-Control",)}, "targets"),
        ({"heuristic_statuses": frozenset({99})}, "heuristic_statuses"),
        ({"heuristic_fraction": 1.5}, "heuristic_fraction"),
        ({"heuristic_max": -1.0}, "heuristic_max"),
        ({"stale_if_error": float("nan")}, "stale_if_error"),
    ],
)
def test_bad_policies_name_the_field(options: dict[str, Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        CachePolicy(**options)
