"""ResponseCacheMiddleware, black-box, the way an HTTP-caching conformance suite sees a proxy.

Each row is a sequence of requests. For every request the row says what the origin answers
if the request reaches it, how long to wait first (a FakeClock, nothing sleeps), and what
the client must see: how the response was produced, its status, its ``Age``, the fields it
carries, and which conditional fields reached the origin. The kinds, as the public
conformance suites name them:

- ``cached``: the origin was not asked; the stored response was served;
- ``not_cached``: the origin was asked and its new response was served;
- ``etag_validated`` / ``lm_validated``: the origin was asked with ``If-None-Match`` /
  ``If-Modified-Since`` (validators the cache sent on its own);
- ``stale_after_error``: the origin was asked, failed, and the stored response was served.

The origin is a raw ASGI app: it answers every request with the row's current reply (a step
that gives none keeps the previous one), numbers its bodies (``origin response N``) so a
served body tells which response it is, adds ``Date`` unless told not to, and, like any
origin, answers ``304`` to a ``GET`` whose ``If-None-Match`` / ``If-Modified-Since`` its
validators satisfy. The cache runs with its defaults: what it does is the RFCs' business.

Row ids start with the RFC 9111 section they test; other RFCs are named (``rfc9110-``,
``rfc5861-``, ``rfc9213-``); ``safety-`` rows are this project's rules, stricter than the
RFCs (nothing personal is ever shared). Written to the RFCs, not to the current code.
"""

from __future__ import annotations

import email.utils
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import anyio
import anyio.lowlevel
import httpx
import pytest

import resilience as rs
from resilience.integrations.asgi import ResponseCacheMiddleware
from resilience.testing import FakeClock

Scope = MutableMapping[str, Any]

START = 1_700_000_000.0  # FakeClock's wall time at 0 (Tue, 14 Nov 2023 22:13:20 GMT)
BASE = "http://cache.test"
CACHED: Final = "cached"
NOT_CACHED: Final = "not_cached"
ETAG: Final = "etag_validated"
LM: Final = "lm_validated"
STALE: Final = "stale_after_error"
Kind = Literal["cached", "not_cached", "etag_validated", "lm_validated", "stale_after_error"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def imf(seconds: float) -> str:
    """The IMF-fixdate ``seconds`` after the row's start (negative: before it)."""
    return email.utils.formatdate(START + seconds, usegmt=True)


# --- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rel:
    """An HTTP date ``seconds`` from the origin's now, written when it answers."""

    seconds: float


Field = tuple[str, str | Rel]
Fields = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Reply:
    """What the origin answers. ``body=None``: ``origin response N``; ``fail``: it raises."""

    status: int = 200
    headers: tuple[Field, ...] = ()
    body: bytes | None = None
    date: bool = True  # add ``Date: <now>`` unless the headers carry one
    fail: bool = False


@dataclass(frozen=True)
class Expect:
    kind: Kind | None = None
    status: int | tuple[int, ...] | None = None  # default: the served response's status
    age: int | None = None  # the ``Age`` the client must see
    body: int | None = None  # the origin response (1-based) whose body is served
    content: bytes | None = None  # the exact body served
    headers: Fields = ()  # fields the response must carry, with these values
    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    sent: Fields = ()  # fields the origin must have seen on the request it got
    background: Kind | None = None  # one origin request after the response, of this kind
    range: tuple[int, int] | Literal["unsatisfiable"] | None = None  # of the first body
    asked: int | None = None  # origin requests this step made, whatever their kind
    whole: bool = False  # the body served is one the origin sent with a 200


@dataclass(frozen=True)
class Step:
    method: str = "GET"
    url: str = "/"
    request: Fields = ()
    reply: Reply | None = None  # None: the origin answers as it did last time
    wait: float = 0.0  # seconds the clock moves before this request
    expect: Expect | None = None
    body: bytes | None = None  # the request's body
    copies: int = 1  # sent this many times at once


@dataclass(frozen=True)
class Row:
    id: str
    steps: tuple[Step, ...]

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


def rows(*found: Row) -> list[Any]:
    return [row.param() for row in found]


def cc(value: str) -> Field:
    return ("Cache-Control", value)


FRESH = cc("max-age=3600")
NOW: Field = ("Date", Rel(0))


def reuse(
    row_id: str,
    *headers: Field,
    expect: Expect,
    wait: float = 10.0,
    status: int = 200,
    request: Fields = (),
    date: bool = True,
) -> Row:
    """Store what the origin answers, wait, ask again."""
    reply = Reply(status, headers, b"" if status == 204 else None, date=date)
    return Row(
        row_id,
        (
            Step(request=request, reply=reply, expect=Expect(NOT_CACHED, status=status)),
            Step(request=request, wait=wait, expect=expect),
        ),
    )


def hit(age: int | None = None, **more: Any) -> Expect:
    return Expect(CACHED, age=age, **more)


MISS = Expect(NOT_CACHED)


# --- the origin ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request that reached the origin, and what it answered."""

    method: str
    url: str
    headers: dict[str, str]  # lower-case names, lines joined by ", "
    status: int
    body: bytes


def _when(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def _not_modified(request: dict[str, str], headers: list[tuple[str, str]]) -> bool:
    """RFC 9110 section 13.2.2: If-None-Match first, If-Modified-Since only without it."""
    mine = dict(headers)
    if_none_match = request.get("if-none-match")
    if if_none_match is not None:
        tags = {_opaque(t) for t in if_none_match.split(",")}
        etag = mine.get("etag")
        return "*" in tags or (etag is not None and _opaque(etag) in tags)
    since, modified = _when(request.get("if-modified-since")), _when(mine.get("last-modified"))
    return since is not None and modified is not None and modified <= since


class Origin:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.reply = Reply()
        self.seen: list[Seen] = []
        self.arrived = anyio.Event()  # set (and replaced) at each request

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:  # read the request body, if any
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        request: dict[str, str] = {}
        for k, v in scope["headers"]:
            name, value = bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1")
            request[name] = f"{request[name]}, {value}" if name in request else value
        reply, now = self.reply, self.clock.time()
        headers = [
            (name.lower(), email.utils.formatdate(now + value.seconds, usegmt=True))
            if isinstance(value, Rel)
            else (name.lower(), value)
            for name, value in reply.headers
        ]
        if reply.date and all(name != "date" for name, _ in headers):
            headers.insert(0, ("date", email.utils.formatdate(now, usegmt=True)))
        status = reply.status
        if status == 200 and scope["method"] in ("GET", "HEAD") and _not_modified(request, headers):
            status = 304
        body = reply.body if reply.body is not None else f"origin response {len(self.seen) + 1}"
        body = body.encode() if isinstance(body, str) else body
        if status in (204, 304):
            body = b""
        url = scope["path"] + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        self.seen.append(Seen(scope["method"], url, request, status, body))
        self.arrived.set()
        self.arrived = anyio.Event()
        if reply.fail:
            raise RuntimeError("the origin is down")
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if status not in (204, 304):
            raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


# --- playing a row ------------------------------------------------------------------------


async def _settle(origin: Origin, until: int | None) -> None:
    """Let background work run: a few loop turns, and up to 2 s for an expected request."""
    for _ in range(50):
        await anyio.lowlevel.checkpoint()
    if until is not None:
        with anyio.move_on_after(2.0):
            while len(origin.seen) < until:
                await origin.arrived.wait()
        for _ in range(50):
            await anyio.lowlevel.checkpoint()


_USUAL = frozenset(
    {"host", "accept", "accept-encoding", "connection", "user-agent", "content-length"}
)


def _unusual(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in _USUAL}


def _validated(kind: Kind, seen: Seen, client: dict[str, str]) -> str | None:
    """Why ``seen`` is not a request of ``kind``, or None."""
    if kind == ETAG and ("if-none-match" not in seen.headers or "if-none-match" in client):
        return f"expected the cache to send If-None-Match; the origin saw {_unusual(seen.headers)}"
    if kind == LM and ("if-modified-since" not in seen.headers or "if-modified-since" in client):
        return (
            f"expected the cache to send If-Modified-Since; the origin saw {_unusual(seen.headers)}"
        )
    return None


def _which(origin: Origin, content: bytes) -> int | None:
    """The number of the first origin response whose body was ``content``."""
    for number, seen in enumerate(origin.seen, 1):
        if seen.status != 304 and seen.body == content:
            return number
    return None


def _range_ok(response: httpx.Response, full: bytes, want: tuple[int, int] | str) -> str | None:
    if response.status_code == 200:
        return None if response.content == full else "a 200 to a Range request with a wrong body"
    if want == "unsatisfiable":
        if response.status_code == 416:
            found = response.headers.get("content-range")
            return None if found == f"bytes */{len(full)}" else f"416 with Content-Range {found}"
        return f"status {response.status_code} for an unsatisfiable range (want 416 or 200)"
    assert isinstance(want, tuple)
    first, last = want
    if response.status_code != 206:
        return f"status {response.status_code} to a Range request (want 206 or 200)"
    found = response.headers.get("content-range")
    if found != f"bytes {first}-{last}/{len(full)}":
        return f"206 with Content-Range {found!r}, want 'bytes {first}-{last}/{len(full)}'"
    if response.content != full[first : last + 1]:
        return f"206 with body {response.content!r}, want {full[first : last + 1]!r}"
    return None


def _check(
    origin: Origin,
    step: Step,
    expect: Expect,
    before: int,
    response: httpx.Response,
) -> list[str]:
    problems: list[str] = []
    new = origin.seen[before:]
    client = {k.lower(): v for k, v in step.request}
    head = step.method == "HEAD"
    served = _which(origin, response.content)
    want_status = expect.status
    kind = expect.kind
    if kind == CACHED:
        extra = 1 if expect.background else 0
        if len(new) != extra:
            problems.append(f"expected {extra} origin request(s), got {len(new)}")
        if not head and expect.content is None and (served is None or served > before):
            problems.append(f"served {response.content!r}, not a stored response")
    elif kind == STALE:
        if len(new) != 1:
            problems.append(f"expected the origin to be asked once, got {len(new)}")
        if served is None or served > before:
            problems.append(f"served {response.content!r}, not the stored response")
        want_status = 200 if want_status is None else want_status
    elif kind is not None:  # NOT_CACHED and the validated kinds reach the origin
        if len(new) != 1:
            problems.append(f"expected the origin to be asked once, got {len(new)}")
        elif kind == NOT_CACHED:
            if not head and response.content != new[0].body:
                problems.append(f"served {response.content!r}, not the origin's new response")
            if want_status is None:
                want_status = new[0].status
        elif why := _validated(kind, new[0], client):
            problems.append(why)
    background = expect.background
    if background is not None and len(new) == 1 and (why := _validated(background, new[0], client)):
        problems.append("background request: " + why)
    if want_status is None and kind is not None:
        stored = origin.seen[served - 1].status if served is not None else 200
        want_status = 200 if head else stored
    allowed = (want_status,) if isinstance(want_status, int) else want_status
    if allowed is not None and response.status_code not in allowed:
        problems.append(f"status {response.status_code}, want {' or '.join(map(str, allowed))}")
    if expect.body is not None and served != expect.body:
        problems.append(f"served {response.content!r}, want origin response {expect.body}")
    if expect.content is not None and response.content != expect.content:
        problems.append(f"served {response.content!r}, want {expect.content!r}")
    if expect.age is not None and response.headers.get("age") != str(expect.age):
        problems.append(f"Age {response.headers.get('age')!r}, want {expect.age}")
    for name, value in expect.headers:
        if response.headers.get(name) != value:
            problems.append(f"{name}: {response.headers.get(name)!r}, want {value!r}")
    problems += [f"no {name} field" for name in expect.present if name not in response.headers]
    problems += [
        f"{name}: {response.headers[name]!r} must not be sent"
        for name in expect.absent
        if name in response.headers
    ]
    for name, value in expect.sent:
        got = new[0].headers.get(name) if new else None
        if got != value:
            problems.append(f"the origin saw {name}: {got!r}, want {value!r}")
    if expect.asked is not None and len(new) != expect.asked:
        problems.append(f"expected {expect.asked} origin request(s), got {len(new)}")
    if expect.whole and (served is None or origin.seen[served - 1].status != 200):
        problems.append(f"served {response.content!r}, not a whole 200 response")
    if expect.range is not None:
        assert expect.content is None
        full = origin.seen[0].body
        if why := _range_ok(response, full, expect.range):
            problems.append(why)
    return problems


async def _send(client: httpx.AsyncClient, step: Step, into: list[httpx.Response]) -> None:
    headers = list(step.request)
    into.append(await client.request(step.method, step.url, headers=headers, content=step.body))


async def play(row: Row) -> None:
    clock = FakeClock()
    origin = Origin(clock)
    app = ResponseCacheMiddleware(origin, cache=rs.TwoTierCache(clock=clock))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    failures: list[str] = []
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        for number, step in enumerate(row.steps, 1):
            if step.wait:
                clock.advance(step.wait)
            if step.reply is not None:
                origin.reply = step.reply
            before = len(origin.seen)
            responses: list[httpx.Response] = []

            async with anyio.create_task_group() as group:
                for _ in range(step.copies):
                    group.start_soon(_send, client, step, responses)
            expect = step.expect
            await _settle(origin, before + 1 if expect and expect.background else None)
            if expect is None:
                continue
            for response in responses:
                for problem in _check(origin, step, expect, before, response):
                    failures.append(f"request {number} ({step.method} {step.url}): {problem}")
            if failures:
                break
    if failures:
        trace = "\n".join(
            f"  origin request {i}: {s.method} {s.url} {_unusual(s.headers)} -> {s.status}"
            for i, s in enumerate(origin.seen, 1)
        )
        pytest.fail("\n".join(failures) + "\n" + trace, pytrace=False)


# --- 3, 4.2.2: defaults and heuristic freshness -------------------------------------------

DAY_OLD: tuple[Field, ...] = (("Last-Modified", Rel(-86400)), NOW)
HEURISTIC = (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501)  # RFC 9110 section 15.1
NOT_HEURISTIC = (201, 202, 302, 307, 403, 503, 599)

DEFAULTS = rows(
    reuse("3-no-freshness-information-not-reused", expect=MISS, wait=1),
    reuse("3-date-alone-is-no-freshness", NOW, expect=MISS, wait=1),
    reuse("3-etag-alone-is-no-freshness", ("ETag", '"a"'), expect=Expect(asked=1), wait=1),
    reuse("4.2.2-last-modified-gives-heuristic-freshness", *DAY_OLD, expect=hit(age=60), wait=60),
    reuse(
        "4.2.2-heuristic-fresh-at-5-percent-of-age",
        ("Last-Modified", Rel(-1000)),
        NOW,
        expect=hit(age=50),
        wait=50,
    ),
    reuse(
        "4.2.2-heuristic-stale-at-15-percent-of-age",
        ("Last-Modified", imf(-1000)),
        NOW,
        expect=Expect(LM, body=1, sent=(("if-modified-since", imf(-1000)),)),
        wait=150,
    ),
    reuse(
        "4.2.2-explicit-max-age-0-beats-heuristic",
        cc("max-age=0"),
        *DAY_OLD,
        expect=Expect(asked=1),
        wait=1,
    ),
    reuse(
        "4.2.2-explicit-past-expires-beats-heuristic",
        ("Expires", Rel(-10)),
        *DAY_OLD,
        expect=Expect(asked=1),
        wait=1,
    ),
    *(
        reuse(
            f"4.2.2-heuristically-cacheable-{status}-reused",
            *DAY_OLD,
            status=status,
            expect=hit(status=status),
            wait=60,
        )
        for status in HEURISTIC
    ),
    *(
        reuse(
            f"4.2.2-{status}-not-heuristically-cacheable",
            *DAY_OLD,
            status=status,
            expect=MISS,
            wait=60,
        )
        for status in NOT_HEURISTIC
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", DEFAULTS)
async def test_defaults(row: Row) -> None:
    await play(row)


# --- 4.2.1: freshness lifetime ------------------------------------------------------------

FRESHNESS = rows(
    reuse("4.2.1-max-age-reused", FRESH, expect=hit(age=10)),
    reuse("4.2.1-max-age-fresh-until-its-end", FRESH, expect=hit(age=3599), wait=3599),
    reuse("4.2.1-max-age-stale-after-its-end", FRESH, expect=MISS, wait=3601),
    reuse("4.2.1-max-age-0-not-reused", cc("max-age=0"), expect=MISS, wait=0),
    reuse("4.2.1-s-maxage-beats-short-max-age", cc("max-age=1, s-maxage=3600"), expect=hit()),
    reuse("4.2.1-s-maxage-short-beats-long-max-age", cc("s-maxage=1, max-age=3600"), expect=MISS),
    reuse("4.2.1-max-age-beats-expires", FRESH, ("Expires", Rel(-1000)), NOW, expect=hit()),
    reuse(
        "4.2.1-short-max-age-beats-long-expires",
        cc("max-age=1"),
        ("Expires", Rel(3600)),
        NOW,
        expect=MISS,
    ),
    reuse(
        "4.2.1-s-maxage-beats-expires",
        cc("s-maxage=3600"),
        ("Expires", Rel(-1000)),
        NOW,
        expect=hit(),
    ),
    reuse("4.2.1-expires-in-the-future-reused", ("Expires", Rel(3600)), NOW, expect=hit(age=10)),
    reuse("4.2.1-expires-in-the-past-not-reused", ("Expires", Rel(-1)), NOW, expect=MISS, wait=0),
    reuse("4.2.1-expires-equal-to-date-not-reused", ("Expires", Rel(0)), NOW, expect=MISS, wait=0),
    reuse(
        "4.2.1-expires-without-date-uses-receipt-time",
        ("Expires", Rel(3600)),
        date=False,
        expect=hit(age=10),
    ),
    # The origin's clock runs 1000 s ahead: its Expires is Date + 300, so the response is
    # fresh for 300 s, not for the 1300 s the cache's own clock would give it.
    reuse(
        "4.2.1-expires-minus-date-origin-clock-ahead-fresh",
        ("Date", Rel(1000)),
        ("Expires", Rel(1300)),
        expect=hit(age=200),
        wait=200,
    ),
    reuse(
        "4.2.1-expires-minus-date-origin-clock-ahead-stale",
        ("Date", Rel(1000)),
        ("Expires", Rel(1300)),
        expect=MISS,
        wait=600,
    ),
    reuse("1.2.2-max-age-2147483648-reused", cc("max-age=2147483648"), expect=hit(), wait=86400),
    reuse("1.2.2-max-age-overflow-capped-reused", cc("max-age=99999999999"), expect=hit()),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", FRESHNESS)
async def test_freshness(row: Row) -> None:
    await play(row)


# --- 5.3: Expires parsing (an invalid date means "already expired") ------------------------

VALID_FUTURE = "Thu, 18 Aug 2050 02:01:18 GMT"
EXPIRES = rows(
    reuse("5.3-imf-fixdate-expires-reused", ("Expires", VALID_FUTURE), NOW, expect=hit()),
    reuse(
        "rfc9110-5.6.7-rfc850-expires-reused",
        ("Expires", "Thursday, 18-Aug-50 02:01:18 GMT"),
        NOW,
        expect=hit(),
    ),
    reuse(
        "rfc9110-5.6.7-asctime-expires-reused",
        ("Expires", "Thu Aug 18 02:01:18 2050"),
        NOW,
        expect=hit(),
    ),
    *(
        reuse(f"5.3-invalid-expires-{name}-is-expired", ("Expires", value), NOW, expect=MISS)
        for name, value in (
            ("zero", "0"),
            ("garbage", "soon"),
            ("utc-not-gmt", "Thu, 18 Aug 2050 02:01:18 UTC"),
            ("two-digit-year", "Thu, 18 Aug 50 02:01:18 GMT"),
            ("no-comma", "Thu 18 Aug 2050 02:01:18 GMT"),
            ("date-dashes", "Thu, 18-Aug-2050 02:01:18 GMT"),
            ("time-periods", "Thu, 18 Aug 2050 02.01.18 GMT"),
            ("one-digit-hour", "Thu, 18 Aug 2050 2:01:18 GMT"),
        )
    ),
    # Two lines: section 4.2.1 allows the first one or "stale"; with the first in the past
    # both readings say stale.
    reuse(
        "4.2.1-two-expires-lines-first-past-is-stale",
        ("Expires", Rel(-10)),
        ("Expires", VALID_FUTURE),
        NOW,
        expect=MISS,
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", EXPIRES)
async def test_expires(row: Row) -> None:
    await play(row)


# --- 5.2: Cache-Control parsing -----------------------------------------------------------

CC_PARSE = rows(
    reuse("5.2-quoted-max-age-accepted", cc('max-age="3600"'), expect=hit()),
    reuse("5.2-directive-names-case-insensitive", cc("MAX-AGE=3600"), expect=hit()),
    reuse("5.2-s-maxage-case-insensitive", cc("max-age=1, S-MaxAge=3600"), expect=hit()),
    reuse("5.2-no-store-case-insensitive", cc("max-age=3600, No-StOrE"), expect=MISS),
    reuse("5.2-max-age-leading-zeros", cc("max-age=003600"), expect=hit()),
    reuse("5.2-extension-directive-ignored", cc("foo=bar, max-age=3600, baz"), expect=hit()),
    *(
        reuse(f"4.2.1-invalid-max-age-{name}-is-stale", cc(value), expect=MISS)
        for name, value in (
            ("negative", "max-age=-3600"),
            ("non-numeric", "max-age=abc"),
            ("trailing-alpha", "max-age=3600a"),
            ("decimal", "max-age=3600.5"),
            ("single-quoted", "max-age='3600'"),
            ("empty", "max-age="),
        )
    ),
    reuse(
        "5.2-quoted-max-age-inside-extension-ignored",
        cc('extension="max-age=3600", max-age=1'),
        expect=MISS,
    ),
    reuse(
        "5.2-quoted-max-age-after-real-one-ignored",
        cc('max-age=1, extension="max-age=3600"'),
        expect=MISS,
    ),
    # Duplicates: the first occurrence, or "stale" (section 4.2.1): a stale first is stale.
    reuse(
        "4.2.1-duplicate-max-age-stale-first-same-line", cc("max-age=1, max-age=3600"), expect=MISS
    ),
    reuse(
        "4.2.1-duplicate-max-age-stale-first-two-lines",
        cc("max-age=1"),
        cc("max-age=3600"),
        expect=MISS,
    ),
    reuse(
        "5.2.2.2-must-revalidate-fresh-reused",
        cc("max-age=3600, must-revalidate"),
        ("ETag", '"a"'),
        expect=hit(),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", CC_PARSE)
async def test_cache_control_parsing(row: Row) -> None:
    await play(row)


# --- 4.2.3, 5.1: Age ----------------------------------------------------------------------

AGE = rows(
    reuse("4.2.3-hit-carries-age-0", FRESH, expect=hit(age=0), wait=0),
    reuse("4.2.3-resident-time-is-added", FRESH, expect=hit(age=10)),
    reuse("4.2.3-origin-age-is-added", FRESH, ("Age", "30"), expect=hit(age=40)),
    reuse(
        "4.2.3-origin-age-beyond-max-age-not-reused", FRESH, ("Age", "7200"), expect=MISS, wait=0
    ),
    reuse(
        "4.2.3-origin-age-plus-resident-fresh",
        FRESH,
        ("Age", "3000"),
        expect=hit(age=3500),
        wait=500,
    ),
    reuse("4.2.3-origin-age-plus-resident-stale", FRESH, ("Age", "3000"), expect=MISS, wait=700),
    reuse("4.2.3-apparent-age-from-an-old-date", FRESH, ("Date", Rel(-1000)), expect=hit(age=1010)),
    reuse(
        "4.2.3-old-date-beyond-max-age-not-reused", FRESH, ("Date", Rel(-7200)), expect=MISS, wait=0
    ),
    reuse(
        "4.2.3-apparent-age-beats-smaller-age",
        FRESH,
        ("Date", Rel(-100)),
        ("Age", "30"),
        expect=hit(age=105),
        wait=5,
    ),
    reuse(
        "4.2.3-age-beats-smaller-apparent-age",
        FRESH,
        ("Date", Rel(-30)),
        ("Age", "100"),
        expect=hit(age=105),
        wait=5,
    ),
    reuse(
        "4.2.3-future-date-gives-no-negative-age",
        FRESH,
        ("Date", Rel(100)),
        expect=hit(age=5),
        wait=5,
    ),
    reuse("5.1-age-list-uses-first-member-fresh", FRESH, ("Age", "0, 7200"), expect=hit(age=10)),
    reuse("5.1-age-list-uses-first-member-stale", FRESH, ("Age", "7200, 0"), expect=MISS),
    reuse("5.1-age-two-lines-uses-first", FRESH, ("Age", "0"), ("Age", "7200"), expect=hit(age=10)),
    *(
        reuse(f"5.1-invalid-age-{name}-ignored", FRESH, ("Age", value), expect=hit(age=10))
        for name, value in (("non-numeric", "abc"), ("negative", "-7200"), ("float", "7200.0"))
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", AGE)
async def test_age(row: Row) -> None:
    await play(row)


# --- 3.1, RFC 9110 6.6.1: the stored header fields ----------------------------------------

RATELIMIT: tuple[Field, ...] = (
    ("RateLimit", '"default";r=9;t=60'),
    ("RateLimit-Policy", '"default";q=10;w=60'),
    ("X-RateLimit-Remaining", "9"),
    ("Retry-After", "60"),
)
HEADERS = rows(
    reuse(
        "3.1-origin-date-kept-on-hit",
        FRESH,
        NOW,
        expect=hit(age=30, headers=(("date", imf(0)),)),
        wait=30,
    ),
    reuse(
        "rfc9110-6.6.1-date-added-when-origin-sent-none",
        FRESH,
        date=False,
        expect=hit(age=30, headers=(("date", imf(0)),)),
        wait=30,
    ),
    reuse(
        "3.1-other-fields-stored",
        FRESH,
        ("X-Thing", "a b c"),
        expect=hit(headers=(("x-thing", "a b c"),)),
    ),
    reuse(
        "safety-ratelimit-fields-never-replayed",
        FRESH,
        *RATELIMIT,
        expect=hit(absent=tuple(name.lower() for name, _ in RATELIMIT)),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", HEADERS)
async def test_headers(row: Row) -> None:
    await play(row)


# --- 4.1: Vary ----------------------------------------------------------------------------

VARIED: tuple[Field, ...] = (FRESH, ("Vary", "Foo"))
VARY = rows(
    reuse("4.1-vary-match-reused", *VARIED, request=(("Foo", "1"),), expect=hit()),
    Row(
        "4.1-vary-mismatch-not-reused",
        (
            Step(request=(("Foo", "1"),), reply=Reply(headers=VARIED), expect=MISS),
            Step(request=(("Foo", "2"),), expect=MISS),
        ),
    ),
    Row(
        "4.1-vary-field-omitted-not-reused",
        (
            Step(request=(("Foo", "1"),), reply=Reply(headers=VARIED), expect=MISS),
            Step(expect=MISS),
        ),
    ),
    Row(
        "4.1-other-fields-not-in-the-key",
        (
            Step(request=(("Foo", "1"), ("Other", "2")), reply=Reply(headers=VARIED), expect=MISS),
            Step(request=(("Foo", "1"), ("Other", "3")), expect=hit()),
        ),
    ),
    Row(
        "4.1-vary-field-name-case-insensitive",
        (
            Step(
                request=(("Foo", "1"),), reply=Reply(headers=(FRESH, ("Vary", "fOO"))), expect=MISS
            ),
            Step(request=(("foo", "1"),), expect=hit()),
        ),
    ),
    Row(
        "4.1-two-field-vary-mismatch-not-reused",
        (
            Step(
                request=(("Foo", "1"), ("Bar", "abc")),
                reply=Reply(headers=(FRESH, ("Vary", "Foo, Bar"))),
                expect=MISS,
            ),
            Step(request=(("Foo", "1"), ("Bar", "abd")), expect=MISS),
        ),
    ),
    Row(
        "4.1-both-omit-a-varied-field-reused",
        (
            Step(
                request=(("Foo", "1"),),
                reply=Reply(headers=(FRESH, ("Vary", "Foo, Bar"))),
                expect=MISS,
            ),
            Step(request=(("Foo", "1"),), expect=hit()),
        ),
    ),
    Row(
        "4.1-variants-kept-side-by-side",
        (
            Step(request=(("Foo", "1"),), reply=Reply(headers=VARIED), expect=MISS),
            Step(request=(("Foo", "2"),), expect=MISS),
            Step(request=(("Foo", "1"),), expect=hit(body=1)),
            Step(request=(("Foo", "2"),), expect=hit(body=2)),
        ),
    ),
    Row(
        "4.1-normalise-whitespace",
        (
            Step(request=(("Foo", "1,2"),), reply=Reply(headers=VARIED), expect=MISS),
            Step(request=(("Foo", " 1, 2 "),), expect=hit()),
        ),
    ),
    Row(
        "4.1-normalise-combined-lines",
        (
            Step(request=(("Foo", "1, 2"),), reply=Reply(headers=VARIED), expect=MISS),
            Step(request=(("Foo", "1"), ("Foo", "2")), expect=hit()),
        ),
    ),
    Row(
        "4.1-normalise-list-order",
        (
            Step(
                request=(("Accept-Language", "en, de"),),
                reply=Reply(headers=(FRESH, ("Vary", "Accept-Language"))),
                expect=MISS,
            ),
            Step(request=(("Accept-Language", "de, en"),), expect=hit()),
        ),
    ),
    reuse("4.1-vary-star-never-reused", FRESH, ("Vary", "*"), expect=MISS),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", VARY)
async def test_vary(row: Row) -> None:
    await play(row)


# --- 4.4: invalidation by unsafe methods --------------------------------------------------

STORE = Reply(headers=(FRESH,))


def _invalidates(method: str) -> Row:
    return Row(
        f"4.4-{method.lower()}-invalidates-the-target-uri",
        (
            Step(reply=STORE, expect=MISS),
            Step(method=method, body=b"abc", reply=Reply(), expect=MISS),
            Step(reply=STORE, expect=MISS),
        ),
    )


def _error_keeps(method: str, status: int) -> Row:
    return Row(
        f"4.4-{method.lower()}-{status}-keeps-the-entry",
        (
            Step(reply=STORE, expect=MISS),
            Step(method=method, body=b"abc", reply=Reply(status), expect=MISS),
            Step(reply=STORE, expect=hit(body=1)),
        ),
    )


def _related(method: str, name: str, status: int, value: str) -> Row:
    return Row(
        f"4.4-{method.lower()}-invalidates-{name.lower()}-{status}",
        (
            Step(url="/other", reply=STORE, expect=MISS),
            Step(method=method, body=b"abc", reply=Reply(status, ((name, value),)), expect=MISS),
            Step(url="/other", reply=STORE, expect=MISS),
        ),
    )


INVALIDATION = rows(
    *(_invalidates(method) for method in ("POST", "PUT", "DELETE", "PATCH", "M-SEARCH")),
    _error_keeps("POST", 500),
    _error_keeps("PUT", 404),
    _error_keeps("DELETE", 503),
    _related("POST", "Location", 201, "/other"),
    _related("PUT", "Location", 303, BASE + "/other"),
    _related("POST", "Content-Location", 200, "/other"),
    _related("DELETE", "Content-Location", 200, BASE + "/other"),
    Row(
        "4.4-location-on-another-origin-not-invalidated",
        (
            Step(url="http://other.test/page", reply=STORE, expect=MISS),
            Step(
                method="POST",
                body=b"abc",
                reply=Reply(201, (("Location", "http://other.test/page"),)),
                expect=MISS,
            ),
            Step(url="http://other.test/page", reply=STORE, expect=hit(body=1)),
        ),
    ),
    Row(
        "4.4-get-to-another-uri-does-not-invalidate",
        (
            Step(reply=STORE, expect=MISS),
            Step(url="/elsewhere", expect=MISS),
            Step(expect=hit(body=1)),
        ),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", INVALIDATION)
async def test_invalidation(row: Row) -> None:
    await play(row)


# --- 4.3: validating stored responses -----------------------------------------------------

SHORT_ETAG: tuple[Field, ...] = (cc("max-age=1"), ("ETag", '"abc"'))
VALIDATION = rows(
    reuse(
        "4.3.1-stale-etag-sends-if-none-match",
        *SHORT_ETAG,
        expect=Expect(ETAG, body=1, status=200, sent=(("if-none-match", '"abc"'),)),
    ),
    reuse(
        "4.3.1-stale-weak-etag-sends-if-none-match",
        cc("max-age=1"),
        ("ETag", 'W/"abc"'),
        expect=Expect(ETAG, body=1, status=200, sent=(("if-none-match", 'W/"abc"'),)),
    ),
    reuse(
        "4.3.1-stale-last-modified-sends-if-modified-since",
        cc("max-age=1"),
        ("Last-Modified", imf(-3600)),
        expect=Expect(LM, body=1, status=200, sent=(("if-modified-since", imf(-3600)),)),
    ),
    reuse(
        "4.3.1-both-validators-etag-is-sent",
        *SHORT_ETAG,
        ("Last-Modified", Rel(-3600)),
        expect=Expect(ETAG, body=1, sent=(("if-none-match", '"abc"'),)),
    ),
    Row(
        "4.3.4-304-freshens-the-stored-headers",
        (
            Step(reply=Reply(headers=(*SHORT_ETAG, ("X-Version", "1"))), expect=MISS),
            Step(
                wait=10,
                reply=Reply(headers=(FRESH, ("ETag", '"abc"'), ("X-Version", "2"))),
                expect=Expect(ETAG, body=1, headers=(("x-version", "2"),)),
            ),
            Step(wait=100, expect=hit(body=1, age=100, headers=(("x-version", "2"),))),
        ),
    ),
    Row(
        "4.3.3-200-replaces-the-stored-response",
        (
            Step(reply=Reply(headers=(cc("max-age=1"), ("ETag", '"v1"'))), expect=MISS),
            Step(
                wait=10,
                reply=Reply(headers=(FRESH, ("ETag", '"v2"'))),
                expect=Expect(ETAG, body=2, sent=(("if-none-match", '"v1"'),)),
            ),
            Step(wait=10, expect=hit(body=2, headers=(("etag", '"v2"'),))),
        ),
    ),
    reuse("4.3.1-stale-without-validators-refetched", cc("max-age=1"), expect=MISS),
    Row(
        "5.2.2.4-no-cache-stored-and-revalidated-every-time",
        (
            Step(reply=Reply(headers=(cc("no-cache"), ("ETag", '"abc"'))), expect=MISS),
            Step(wait=1, expect=Expect(ETAG, body=1)),
            Step(wait=1, expect=Expect(ETAG, body=1)),
        ),
    ),
    reuse(
        "5.2.2.4-no-cache-revalidated-even-when-fresh",
        cc("max-age=10000, no-cache"),
        ("Expires", Rel(10000)),
        NOW,
        ("ETag", '"abc"'),
        expect=Expect(ETAG, body=1),
        wait=1,
    ),
    reuse(
        "5.2.2.4-no-cache-with-last-modified-revalidated",
        cc("no-cache"),
        ("Last-Modified", imf(-3600)),
        expect=Expect(LM, body=1),
        wait=1,
    ),
    reuse(
        "5.2.2.4-no-cache-case-insensitive",
        cc("max-age=10000, No-CaChE"),
        ("ETag", '"abc"'),
        expect=Expect(ETAG, body=1),
        wait=1,
    ),
    reuse(
        "5.2.2.2-must-revalidate-stale-revalidated",
        cc("max-age=1, must-revalidate"),
        ("ETag", '"abc"'),
        expect=Expect(ETAG, body=1),
    ),
    Row(
        "5.2.2.2-must-revalidate-not-served-stale-on-error",
        (
            Step(
                reply=Reply(headers=(cc("max-age=1, must-revalidate"), ("ETag", '"abc"'))),
                expect=MISS,
            ),
            Step(wait=10, reply=Reply(503), expect=Expect(asked=1, status=503, body=2)),
        ),
    ),
    Row(
        "5.2.2.4-no-cache-not-served-stale-on-error",
        (
            Step(reply=Reply(headers=(cc("no-cache"), ("ETag", '"abc"'))), expect=MISS),
            Step(wait=1, reply=Reply(503), expect=Expect(asked=1, status=503, body=2)),
        ),
    ),
    reuse(
        "5.2.2.8-proxy-revalidate-stale-revalidated",
        cc("max-age=1, proxy-revalidate"),
        ("ETag", '"abc"'),
        expect=Expect(ETAG, body=1),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", VALIDATION)
async def test_validation(row: Row) -> None:
    await play(row)


# --- 4.3.2: the client's conditional requests ---------------------------------------------

TAGGED: tuple[Field, ...] = (FRESH, ("ETag", '"abc"'), ("Last-Modified", Rel(-3600)))


def _conditional(row_id: str, request: Fields, status: int) -> Row:
    if status == 304:
        expect = hit(
            status=304,
            content=b"",
            headers=(("etag", '"abc"'), ("cache-control", "max-age=3600")),
            present=("date",),
        )
    else:
        expect = hit(status=200, body=1)
    return Row(
        row_id,
        (
            Step(reply=Reply(headers=TAGGED), expect=MISS),
            Step(request=request, wait=5, expect=expect),
        ),
    )


CONDITIONAL = rows(
    _conditional("4.3.2-if-none-match-matching-gives-304", (("If-None-Match", '"abc"'),), 304),
    _conditional("4.3.2-if-none-match-other-gives-200", (("If-None-Match", '"xyz"'),), 200),
    _conditional("4.3.2-if-none-match-star-gives-304", (("If-None-Match", "*"),), 304),
    _conditional(
        "rfc9110-13.1.2-if-none-match-weak-comparison", (("If-None-Match", 'W/"abc"'),), 304
    ),
    _conditional("4.3.2-if-none-match-list-gives-304", (("If-None-Match", '"x", "abc"'),), 304),
    _conditional(
        "4.3.2-if-modified-since-last-modified-gives-304",
        (("If-Modified-Since", imf(-3600)),),
        304,
    ),
    _conditional(
        "4.3.2-if-modified-since-later-gives-304", (("If-Modified-Since", imf(-10)),), 304
    ),
    _conditional(
        "4.3.2-if-modified-since-earlier-gives-200", (("If-Modified-Since", imf(-7200)),), 200
    ),
    _conditional(
        "rfc9110-13.1.3-if-modified-since-ignored-with-if-none-match",
        (("If-None-Match", '"xyz"'), ("If-Modified-Since", imf(-10))),
        200,
    ),
    Row(
        "4.3.2-a-304-for-a-conditional-miss-is-not-stored",
        (
            Step(
                request=(("If-None-Match", '"abc"'),),
                reply=Reply(headers=TAGGED),
                expect=Expect(status=304, content=b""),
            ),
            Step(wait=1, expect=Expect(status=200, whole=True)),
        ),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", CONDITIONAL)
async def test_conditional(row: Row) -> None:
    await play(row)


# --- 4.2.4, RFC 5861: serving stale -------------------------------------------------------

SWR: tuple[Field, ...] = (cc("max-age=1, stale-while-revalidate=60"), ("ETag", '"abc"'))
SIE = Reply(headers=(cc("max-age=1, stale-if-error=60"),))


def _stale_if_error(row_id: str, error: Reply, wait: float, expect: Expect) -> Row:
    return Row(row_id, (Step(reply=SIE, expect=MISS), Step(wait=wait, reply=error, expect=expect)))


STALE_ROWS = rows(
    Row(
        "rfc5861-3-stale-while-revalidate-serves-stale-and-revalidates-once",
        (
            Step(reply=Reply(headers=SWR), expect=MISS),
            Step(wait=10, expect=hit(body=1, age=10, background=ETAG)),
            Step(expect=hit(body=1)),
        ),
    ),
    Row(
        "rfc5861-3-stale-while-revalidate-without-validators-refetches",
        (
            Step(reply=Reply(headers=(cc("max-age=1, stale-while-revalidate=60"),)), expect=MISS),
            Step(wait=10, expect=hit(body=1, background=NOT_CACHED)),
            Step(expect=hit(body=2)),
        ),
    ),
    Row(
        "rfc5861-3-stale-while-revalidate-single-flight",
        (
            Step(reply=Reply(headers=SWR), expect=MISS),
            Step(wait=10, copies=5, expect=hit(body=1, background=ETAG)),
        ),
    ),
    Row(
        "rfc5861-3-past-stale-while-revalidate-revalidates-first",
        (Step(reply=Reply(headers=SWR), expect=MISS), Step(wait=100, expect=Expect(asked=1))),
    ),
    *(
        _stale_if_error(
            f"rfc5861-4-stale-if-error-on-{status}", Reply(status), 10, Expect(STALE, body=1)
        )
        for status in (500, 502, 503, 504)
    ),
    _stale_if_error(
        "rfc5861-4-stale-if-error-on-origin-exception", Reply(fail=True), 10, Expect(STALE, body=1)
    ),
    _stale_if_error(
        "rfc5861-4-stale-if-error-not-for-404", Reply(404), 10, Expect(NOT_CACHED, status=404)
    ),
    _stale_if_error(
        "rfc5861-4-past-stale-if-error-passes-the-error",
        Reply(503),
        100,
        Expect(NOT_CACHED, status=503),
    ),
    _stale_if_error(
        "rfc5861-4-past-stale-if-error-origin-exception-fails",
        Reply(fail=True),
        100,
        Expect(asked=1, status=(500, 502, 504)),
    ),
    Row(
        "4.2.4-no-stale-on-5xx-without-permission",
        (
            Step(reply=Reply(headers=SHORT_ETAG), expect=MISS),
            Step(wait=10, reply=Reply(503), expect=Expect(asked=1, status=503, body=2)),
        ),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", STALE_ROWS)
async def test_stale(row: Row) -> None:
    await play(row)


# --- 5.2.2.3: must-understand -------------------------------------------------------------

MUST_UNDERSTAND = rows(
    reuse(
        "5.2.2.3-must-understand-overrides-no-store-for-a-known-status",
        cc("must-understand, no-store, max-age=3600"),
        expect=hit(),
    ),
    reuse(
        "5.2.2.3-must-understand-unknown-status-not-stored",
        cc("must-understand, max-age=3600"),
        status=299,
        expect=MISS,
    ),
    reuse(
        "5.2.2.3-must-understand-no-store-unknown-status-not-stored",
        cc("must-understand, no-store, max-age=3600"),
        status=299,
        expect=MISS,
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", MUST_UNDERSTAND)
async def test_must_understand(row: Row) -> None:
    await play(row)


# --- RFC 9213: CDN-Cache-Control ----------------------------------------------------------


def cdn(value: str) -> Field:
    return ("CDN-Cache-Control", value)


TARGETED = rows(
    reuse("rfc9213-2.1-cdn-max-age-reused", cdn("max-age=3600"), expect=hit(age=10)),
    reuse(
        "rfc9213-2.1-long-cdn-beats-short-cc", cc("max-age=1"), cdn("max-age=3600"), expect=hit()
    ),
    reuse("rfc9213-2.1-short-cdn-beats-long-cc", FRESH, cdn("max-age=1"), expect=MISS),
    reuse("rfc9213-2.1-cdn-no-store-beats-cc", cc("max-age=10000"), cdn("no-store"), expect=MISS),
    reuse(
        "rfc9213-2.1-cdn-max-age-beats-cc-no-store",
        cc("no-store"),
        cdn("max-age=10000"),
        expect=hit(),
    ),
    reuse("rfc9213-2.1-cdn-private-not-stored", cdn("private"), cc("max-age=10000"), expect=MISS),
    reuse(
        "rfc9213-2.1-cdn-no-cache-revalidated",
        cdn("no-cache"),
        cc("max-age=10000"),
        ("ETag", '"abc"'),
        expect=Expect(ETAG, body=1),
        wait=1,
    ),
    reuse(
        "rfc9213-2.1-cdn-max-age-0-beats-expires",
        cdn("max-age=0"),
        ("Expires", Rel(10000)),
        NOW,
        expect=MISS,
        wait=0,
    ),
    reuse(
        "rfc9213-2.1-cdn-max-age-beats-past-expires",
        cdn("max-age=3600"),
        ("Expires", Rel(-10000)),
        NOW,
        expect=hit(),
    ),
    reuse(
        "rfc9213-2.1-cdn-max-age-counts-age",
        cdn("max-age=3600"),
        ("Age", "7200"),
        expect=MISS,
        wait=0,
    ),
    reuse(
        "rfc9213-2.1-invalid-cdn-field-ignored",
        cdn("max-age=10000, &&&&&"),
        cc("no-store"),
        expect=MISS,
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", TARGETED)
async def test_cdn_cache_control(row: Row) -> None:
    await play(row)


# --- RFC 9110 14, 3.4: Range requests against a stored 200 --------------------------------

DIGITS = Reply(headers=(FRESH,), body=b"0123456789")


def _range(row_id: str, spec: str, want: tuple[int, int] | Literal["unsatisfiable"]) -> Row:
    return Row(
        row_id,
        (
            Step(reply=DIGITS, expect=MISS),
            Step(request=(("Range", spec),), wait=1, expect=Expect(range=want)),
        ),
    )


PARTIAL = rows(
    _range("rfc9110-14.1.2-range-first-bytes", "bytes=0-1", (0, 1)),
    _range("rfc9110-14.1.2-range-open-ended", "bytes=5-", (5, 9)),
    _range("rfc9110-14.1.2-range-suffix", "bytes=-3", (7, 9)),
    _range("rfc9110-14.1.2-range-end-past-the-length", "bytes=8-100", (8, 9)),
    _range("rfc9110-14.1.2-range-unsatisfiable", "bytes=20-30", "unsatisfiable"),
    Row(
        "3.4-range-request-leaves-the-full-entry",
        (
            Step(reply=DIGITS, expect=MISS),
            Step(request=(("Range", "bytes=0-1"),), expect=Expect(range=(0, 1))),
            Step(expect=hit(content=b"0123456789")),
        ),
    ),
    Row(
        "3.4-stored-206-never-served-as-a-full-response",
        (
            Step(
                request=(("Range", "bytes=0-4"),),
                reply=Reply(206, (FRESH, ("Content-Range", "bytes 0-4/10")), b"01234"),
                expect=Expect(NOT_CACHED, status=206),
            ),
            Step(reply=DIGITS, expect=Expect(status=200, content=b"0123456789")),
        ),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", PARTIAL)
async def test_partial(row: Row) -> None:
    await play(row)


# --- 3: statuses with explicit freshness, HEAD --------------------------------------------

STATUS = rows(
    *(
        reuse(f"3-{status}-with-max-age-stored", FRESH, status=status, expect=hit(status=status))
        for status in (201, 299, 302, 400, 500, 599)
    ),
    Row(
        "rfc9110-9.3.2-head-answered-from-a-stored-get",
        (Step(reply=STORE, expect=MISS), Step(method="HEAD", expect=hit(content=b""))),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", STATUS)
async def test_status(row: Row) -> None:
    await play(row)


# --- what is never shared -----------------------------------------------------------------

ALICE = (("Authorization", "Bearer alice"),)
SAFETY = rows(
    reuse("5.2.2.5-no-store-not-stored", cc("no-store"), expect=MISS),
    reuse(
        "5.2.2.5-no-store-even-with-max-age-and-expires",
        cc("max-age=10000, no-store"),
        ("Expires", Rel(10000)),
        NOW,
        expect=MISS,
    ),
    reuse("5.2.2.7-private-not-stored-by-a-shared-cache", cc("private, max-age=3600"), expect=MISS),
    reuse("3.5-authorization-response-not-reused", FRESH, request=ALICE, expect=MISS),
    Row(
        "3.5-authorized-response-not-served-to-anonymous",
        (Step(request=ALICE, reply=STORE, expect=MISS), Step(expect=MISS)),
    ),
    reuse("safety-set-cookie-never-shared", FRESH, ("Set-Cookie", "id=alice"), expect=MISS),
    Row(
        "safety-cookie-request-never-shared",
        (
            Step(request=(("Cookie", "id=alice"),), reply=STORE, expect=MISS),
            Step(request=(("Cookie", "id=bob"),), expect=MISS),
            Step(expect=MISS),
        ),
    ),
)


@pytest.mark.anyio
@pytest.mark.parametrize("row", SAFETY)
async def test_safety(row: Row) -> None:
    await play(row)
