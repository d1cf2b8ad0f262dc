"""resilience.integrations.httpx: the transports, the server-limit stores, the parser.

Unit tests run on httpx.MockTransport and a FakeClock; the rest talk to real uvicorn
servers on loopback that misbehave on purpose (5xx bursts, 429 with Retry-After,
RateLimit fields, slow responses, connections reset through the FaultProxy), sync with
threads and async on asyncio and trio. One test runs four client processes that share a
server's quota through Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import math
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from support.faultproxy import FaultProxy
from support.uvicorn_server import UvicornServer

import resilience as rs
from resilience.integrations.httpx import (
    AsyncResilientTransport,
    MemoryHolds,
    RedisHolds,
    ResilientTransport,
    RetryableResponse,
    ServerLimits,
    Ticket,
    read_limits,
)
from resilience.metrics import Metrics
from resilience.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
Handler = Callable[[httpx.Request], httpx.Response]


def mock(handler: Handler, seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return handler(request)

    return httpx.MockTransport(record)


def replies(*responses: httpx.Response | BaseException) -> Handler:
    """A handler that answers with each of ``responses`` in turn, then 200s."""
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        if not queue:
            return httpx.Response(200, text="ok")
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return handle


def no_backoff(**kwargs: Any) -> rs.Retry:
    return rs.Retry(backoff=rs.Backoff(0.0, 0.0, jitter="none"), **kwargs)


# -- read_limits: the server's fields -------------------------------------------------------


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_read_limits_ietf_fields_pick_the_tightest_item_and_its_policy() -> None:
    limits = read_limits(
        200,
        h(
            ("RateLimit", '"burst";r=5;t=3, "day";r=5;t=30'),
            ("RateLimit-Policy", '"burst";q=10;w=1, "day";q=1000;w=86400'),
        ),
        0.0,
    )
    # A tie on r: the item that resets last decides, with its own policy.
    assert limits == ServerLimits(remaining=5, reset=30.0, quota=1000, window=86400.0)
    spent = read_limits(200, h(("ratelimit", '"name";r=0;t=30')), 0.0)
    assert spent is not None
    assert spent.wait == 30.0
    # An item without t takes its policy's window.
    assert read_limits(
        200, h(("RateLimit", "x;r=2"), ("RateLimit-Policy", "x;q=10;w=60")), 0.0
    ) == ServerLimits(2, 60.0, 10, 60.0)


def test_read_limits_older_forms_and_the_x_trio() -> None:
    assert read_limits(200, h(("RateLimit", "limit=100, remaining=0, reset=30")), 0.0) == (
        ServerLimits(0, 30.0, 100)
    )
    trio = h(
        ("RateLimit-Limit", "100, 100;w=60"), ("RateLimit-Remaining", "7"), ("RateLimit-Reset", "9")
    )
    assert read_limits(200, trio, 0.0) == ServerLimits(7, 9.0, 100, 60.0)
    now = 1_700_000_000.0
    epoch = h(
        ("X-RateLimit-Limit", "60"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", "1700000030"),
    )
    assert read_limits(200, epoch, now) == ServerLimits(0, 30.0, 60)
    millis = h(("X-RateLimit-Remaining", "1"), ("X-RateLimit-Reset", "1700000012000"))
    assert read_limits(200, millis, now) == ServerLimits(1, 12.0)
    delta = h(("x-ratelimit-remaining", "3"), ("x-ratelimit-reset", "15"))
    assert read_limits(200, delta, now) == ServerLimits(3, 15.0)


def test_read_limits_retry_after_seconds_dates_and_junk() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert read_limits(429, h(("Retry-After", "7")), now) == ServerLimits(retry_after=7.0)
    assert read_limits(503, h(("Retry-After", date)), now) == ServerLimits(retry_after=42.0)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert read_limits(429, h(("Retry-After", past)), now) == ServerLimits(retry_after=0.0)
    assert read_limits(429, h(("Retry-After", "soon")), now) is None
    # On a redirect Retry-After is no wait before the next request.
    assert read_limits(301, h(("Retry-After", "5")), now) is None
    assert read_limits(200, h(("Content-Type", "text/plain")), now) is None
    assert read_limits(200, h(("RateLimit", '"x";r=lots')), now) is None


# -- CircuitBreaker.copy --------------------------------------------------------------------


def test_breaker_copy_keeps_the_configuration_and_starts_fresh() -> None:
    clock = FakeClock()
    heard: list[object] = []
    template = rs.CircuitBreaker(
        "tmpl",
        failure_threshold=None,
        failure_rate=rs.FailureRate(0.5, window=10, minimum_calls=2),
        recovery_timeout=7.0,
        success_threshold=3,
        half_open_max_calls=2,
        recovery_backoff=2.0,
        max_recovery_timeout=60.0,
        probe_lease=4.0,
        include=(ConnectionError,),
        exclude=(ConnectionResetError,),
        fail_on_result=lambda result: result == "bad",
        listeners=[heard.append],
        clock=clock,
    )
    template.force_open()
    copy = template.copy("tmpl:host")
    assert copy.config == dataclasses.replace(template.config, name="tmpl:host")
    assert copy.state is rs.CircuitState.CLOSED
    assert copy.mode is rs.BreakerMode.NORMAL
    assert rs.get_breaker("tmpl:host") is copy
    assert copy._include == (ConnectionError,)
    assert copy._exclude == (ConnectionResetError,)
    assert copy._clock is clock
    heard.clear()
    for _ in range(2):
        with pytest.raises(ConnectionError):
            copy.call(_raise, ConnectionError())
    assert copy.stats().state is rs.CircuitState.OPEN  # its own failure rate and state
    assert heard == []  # listeners belong to the template
    with pytest.raises(ValueError, match="name"):
        template.copy("")


def _raise(error: BaseException) -> None:
    raise error


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"transport": httpx.AsyncHTTPTransport()}, TypeError, "transport"),
        ({"breaker": "api"}, TypeError, "breaker"),
        ({"retry": 3}, TypeError, "retry"),
        ({"limiter": object()}, TypeError, "limiter"),
        ({"cache": {}}, TypeError, "cache"),
        ({"cache_max_body": -1}, ValueError, "cache_max_body"),
        ({"follow_server_limits": "yes"}, TypeError, "follow_server_limits"),
        ({"holds": {}}, TypeError, "holds"),
        ({"holds": MemoryHolds(), "follow_server_limits": False}, ValueError, "holds"),
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"failure_status": 500}, TypeError, "failure_status"),
        ({"retry_status": "503"}, TypeError, "retry_status"),
        ({"retry_methods": "GET"}, TypeError, "retry_methods"),
        ({"retry_idempotency_key": 1}, TypeError, "retry_idempotency_key"),
        ({"timeouts_are_failures": None}, TypeError, "timeouts_are_failures"),
        ({"key": "host"}, TypeError, "key"),
        ({"on_new_breaker": 1}, TypeError, "on_new_breaker"),
        ({"max_hosts": 0}, ValueError, "max_hosts"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_construction_errors_name_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        ResilientTransport(**kwargs)


def test_construction_checks_the_side_of_redis_clients(redis_url: str) -> None:
    sync_client = redis.Redis.from_url(redis_url)
    async_client = redis.asyncio.Redis.from_url(redis_url)
    with pytest.raises(ValueError, match="holds: AsyncResilientTransport needs"):
        AsyncResilientTransport(holds=RedisHolds(sync_client))
    with pytest.raises(ValueError, match="holds: ResilientTransport needs"):
        ResilientTransport(holds=RedisHolds(async_client))
    bucket = rs.TokenBucket(1, 1, backend=rs.RedisBackend(sync_client))
    with pytest.raises(ValueError, match="limiter: AsyncResilientTransport needs"):
        AsyncResilientTransport(limiter=bucket)
    with pytest.raises(TypeError, match=r"transport must be an httpx\.AsyncBaseTransport"):
        AsyncResilientTransport(httpx.HTTPTransport())
    sync_client.close()


# -- per-host breakers ----------------------------------------------------------------------


def test_per_host_breakers_count_5xx_and_429_but_not_other_4xx() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(int(request.url.path.strip("/")))

    template = rs.CircuitBreaker("api", failure_threshold=3, recovery_timeout=30.0)
    made: list[rs.CircuitBreaker] = []
    transport = ResilientTransport(mock(handle, seen), breaker=template, on_new_breaker=made.append)
    with httpx.Client(transport=transport) as client:
        for _ in range(5):
            assert client.get("http://a.test/404").status_code == 404
        assert client.get("http://b.test:8080/500").status_code == 500
        assert client.get("http://b.test:8080/429").status_code == 429
        assert client.get("http://b.test:8080/503").status_code == 503
        sent = len(seen)
        with pytest.raises(rs.CircuitOpenError) as opened:
            client.get("http://b.test:8080/200")
        assert len(seen) == sent  # rejected before any connection
        assert opened.value.name == "api:b.test:8080"
        assert 29 < opened.value.retry_after <= 30
        assert client.get("http://a.test/200").status_code == 200  # another host, closed
    assert set(transport.breakers) == {"a.test", "b.test:8080"}
    assert [b.name for b in made] == ["api:a.test", "api:b.test:8080"]
    assert rs.get_breaker("api:a.test").state is rs.CircuitState.CLOSED
    assert rs.get_breaker("api:b.test:8080").state is rs.CircuitState.OPEN
    assert template.state is rs.CircuitState.CLOSED  # the template itself is never called


def test_failure_status_is_configurable_and_the_key_too() -> None:
    template = rs.CircuitBreaker("cfg", failure_threshold=1)
    transport = ResilientTransport(
        mock(replies(httpx.Response(429), httpx.Response(418))),
        breaker=template,
        failure_status={418},
        key=lambda request: request.url.host + request.url.path,
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("http://c.test/x").status_code == 429  # no failure now
        assert client.get("http://c.test/x").status_code == 418  # a failure: opens
        with pytest.raises(rs.CircuitOpenError):
            client.get("http://c.test/x")
        assert client.get("http://c.test/y").status_code == 200
    assert set(transport.breakers) == {"c.test/x", "c.test/y"}


def test_hosts_are_bounded_and_closed_breakers_go_first() -> None:
    template = rs.CircuitBreaker("many", failure_threshold=1)
    transport = ResilientTransport(
        mock(replies(httpx.Response(500))), breaker=template, max_hosts=3
    )
    with httpx.Client(transport=transport) as client:
        client.get("http://h0.test/")  # 500: h0's breaker opens
        for i in range(1, 6):
            client.get(f"http://h{i}.test/")
    assert len(transport.breakers) == 3
    assert "h0.test" in transport.breakers


def test_transport_errors_are_failures_timeouts_only_when_configured() -> None:
    request = httpx.Request("GET", "http://t.test/")
    errors = (httpx.ReadTimeout("slow", request=request), httpx.ConnectError("refused"))
    for failing, expected in ((False, 1), (True, 2)):
        template = rs.CircuitBreaker(f"errors-{failing}", failure_threshold=10)
        transport = ResilientTransport(
            mock(replies(*errors)), breaker=template, timeouts_are_failures=failing
        )
        with httpx.Client(transport=transport) as client:
            for _ in errors:
                with pytest.raises(httpx.TransportError):
                    client.get("http://t.test/")
        calls = transport.breakers["t.test"]._read()["calls"]
        assert calls["failure"] == expected
        assert calls["ignored"] == 2 - expected


def test_metrics_watch_the_transport_and_new_host_breakers() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    retry = no_backoff(attempts=2, name="api-retry")
    transport = ResilientTransport(
        mock(replies()),
        breaker=rs.CircuitBreaker("metered", failure_threshold=5),
        retry=retry,
        on_new_breaker=metrics.watch,
    )
    metrics.watch(transport)
    with httpx.Client(transport=transport) as client:
        client.get("http://m.test/")
    text = generate_latest(registry).decode()
    assert 'resilience_breaker_calls_total{breaker="metered:m.test",outcome="success"} 1.0' in text
    assert 'resilience_retry_calls_total{policy="api-retry"} 1.0' in text
    assert 'decisions_total{decision="allowed",limiter="httpx:server-limits"} 1.0' in text
    linked = {t.telemetry().name for t in transport.telemetry().links}
    assert linked >= {"metered:m.test", "api-retry"}


# -- retries --------------------------------------------------------------------------------


def test_retries_only_idempotent_methods_or_an_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    down = [httpx.Response(503)] * 20
    transport = ResilientTransport(mock(replies(*down), seen), retry=no_backoff(attempts=3))
    with httpx.Client(transport=transport, base_url="http://r.test") as client:
        for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
            seen.clear()
            assert client.request(method, "/").status_code == 503
            assert len(seen) == 3, method
        for method in ("POST", "PATCH"):
            seen.clear()
            assert client.request(method, "/", content=b"x").status_code == 503
            assert len(seen) == 1, method
        seen.clear()
        client.post("/", content=b"x", headers={"Idempotency-Key": "k1"})
        assert len(seen) == 3
    configured = ResilientTransport(
        mock(replies(*down), seen),
        retry=no_backoff(attempts=2),
        retry_methods={"POST"},
        retry_idempotency_key=False,
    )
    with httpx.Client(transport=configured, base_url="http://r.test") as client:
        seen.clear()
        client.post("/", content=b"x")
        client.get("/", headers={"Idempotency-Key": "k2"})
        assert [r.method for r in seen] == ["POST", "POST", "GET"]


def test_a_streamed_body_is_never_sent_twice() -> None:
    seen: list[httpx.Request] = []
    transport = ResilientTransport(
        mock(replies(httpx.Response(503), httpx.Response(503)), seen),
        retry=no_backoff(attempts=3),
    )

    def body() -> Iterator[bytes]:
        yield b"chunk"

    with httpx.Client(transport=transport) as client:
        assert client.put("http://s.test/", content=body()).status_code == 503
        assert len(seen) == 1
        assert client.put("http://s.test/", content=b"bytes").status_code == 200  # replayable
        assert len(seen) == 3


def test_the_last_response_is_returned_whole_when_the_retry_gives_up() -> None:
    transport = ResilientTransport(
        mock(replies(*(httpx.Response(502, text=f"bad gateway {i}") for i in range(3)))),
        retry=no_backoff(attempts=3),
    )
    with httpx.Client(transport=transport) as client:
        response = client.get("http://g.test/")
    assert response.status_code == 502
    assert response.text == "bad gateway 2"


def test_retry_after_seconds_and_dates_are_waited_for(clock: FakeClock) -> None:
    date = email.utils.formatdate(clock.time() + 3, usegmt=True)
    seen: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(clock.monotonic())
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "2"})
        if len(seen) == 2:
            return httpx.Response(503, headers={"Retry-After": date})
        return httpx.Response(200)

    retry = rs.Retry(attempts=3, backoff=rs.Backoff(0.01, 10.0), clock=clock)
    transport = ResilientTransport(httpx.MockTransport(handle), retry=retry, clock=clock)
    with httpx.Client(transport=transport) as client:
        assert client.get("http://w.test/").status_code == 200
    assert seen == [0.0, 2.0, 3.0]  # the date: 3 s after the start


def test_retry_after_beyond_the_deadline_returns_the_response_at_once(clock: FakeClock) -> None:
    seen: list[httpx.Request] = []
    retry = rs.Retry(attempts=5, deadline=10.0, clock=clock)
    transport = ResilientTransport(
        mock(replies(httpx.Response(429, headers={"Retry-After": "60"})), seen),
        retry=retry,
        follow_server_limits=False,
        clock=clock,
    )
    with httpx.Client(transport=transport) as client:
        response = client.get("http://d.test/")
    assert response.status_code == 429
    assert len(seen) == 1
    assert clock.monotonic() == 0.0
    assert retry._read()["gave_up"]["rejected"] == 1


def test_the_retry_budget_caps_retries() -> None:
    seen: list[httpx.Request] = []
    budget = rs.RetryBudget(ratio=0.1, min_per_second=0)
    transport = ResilientTransport(
        mock(lambda request: httpx.Response(503), seen),
        retry=no_backoff(attempts=4, budget=budget),
    )
    with httpx.Client(transport=transport) as client:
        for _ in range(50):
            client.get("http://b.test/")
    assert 50 <= len(seen) <= 56  # not 200


def test_errors_that_would_fail_again_are_not_retried() -> None:
    seen: list[httpx.Request] = []
    transport = ResilientTransport(
        mock(replies(httpx.LocalProtocolError("bad header"), httpx.ConnectError("x")), seen),
        retry=no_backoff(attempts=3),
    )
    with httpx.Client(transport=transport) as client:
        with pytest.raises(httpx.LocalProtocolError) as raised:
            client.get("http://e.test/")
        assert len(seen) == 1
        assert raised.value.__context__ is None
        assert client.get("http://e.test/").status_code == 200  # ConnectError: retried
        assert len(seen) == 3


def test_retry_on_chooses_what_is_retried() -> None:
    seen: list[httpx.Request] = []
    transport = ResilientTransport(
        mock(replies(httpx.Response(503), httpx.ConnectError("x"), httpx.ConnectError("x")), seen),
        retry=no_backoff(attempts=3, on=httpx.ConnectError),
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("http://o.test/").status_code == 503  # not named in on=
        assert client.get("http://o.test/").status_code == 200
    assert len(seen) == 4
    transport2 = ResilientTransport(
        mock(replies(httpx.Response(503))), retry=no_backoff(attempts=2, on=RetryableResponse)
    )
    with httpx.Client(transport=transport2) as client:
        assert client.get("http://o.test/").status_code == 200


def test_an_open_breaker_stops_the_retry(clock: FakeClock) -> None:
    seen: list[httpx.Request] = []
    transport = ResilientTransport(
        mock(lambda request: httpx.Response(503), seen),
        breaker=rs.CircuitBreaker("stop", failure_threshold=2, recovery_timeout=30.0, clock=clock),
        retry=rs.Retry(attempts=5, backoff=rs.Backoff(0.1, 1.0), clock=clock),
        clock=clock,
    )
    with httpx.Client(transport=transport) as client, pytest.raises(rs.CircuitOpenError):
        client.get("http://x.test/")
    assert len(seen) == 2


# -- deadlines ------------------------------------------------------------------------------


def test_remaining_caps_the_request_timeout_and_a_spent_deadline_sends_nothing(
    clock: FakeClock,
) -> None:
    sent: list[dict[str, float]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(dict(request.extensions["timeout"]))
        return httpx.Response(200)

    transport = ResilientTransport(httpx.MockTransport(handle), clock=clock)
    with httpx.Client(transport=transport, timeout=httpx.Timeout(5.0, connect=0.5)) as client:

        @rs.Timeout(2.0, clock=clock)
        def call() -> httpx.Response:
            clock.advance(0.5)
            return client.get("http://to.test/")

        call()
        assert sent[-1] == {
            "connect": 0.5, "read": 1.5, "write": 1.5, "pool": 1.5,
        }  # fmt: skip
        client.get("http://to.test/")
        assert sent[-1]["read"] == 5.0  # no deadline: as given

        @rs.Timeout(1.0, clock=clock)
        def late() -> httpx.Response:
            clock.advance(1.0)
            return client.get("http://to.test/")

        with pytest.raises(rs.TimeoutExceeded):
            late()
    assert len(sent) == 2


# -- the server's limits --------------------------------------------------------------------


def limited(remaining: int, reset: int, quota: int = 3, window: int = 10) -> httpx.Response:
    return httpx.Response(
        200,
        headers={
            "RateLimit": f'"q";r={remaining};t={reset}',
            "RateLimit-Policy": f'"q";q={quota};w={window}',
        },
    )


def test_remaining_zero_holds_the_host_and_max_wait_waits(clock: FakeClock) -> None:
    seen: list[httpx.Request] = []
    transport = ResilientTransport(mock(replies(limited(0, 30)), seen), clock=clock)
    with httpx.Client(transport=transport) as client:
        client.get("http://l.test/")
        with pytest.raises(rs.RateLimited) as held:
            client.post("http://l.test/")
        assert held.value.retry_after == 30.0
        assert held.value.key == "l.test"
        assert len(seen) == 1  # nothing sent
        assert client.get("http://other.test/").status_code == 200
    waiting = ResilientTransport(mock(replies(limited(0, 30)), seen), clock=clock, max_wait=60.0)
    with httpx.Client(transport=waiting) as client:
        client.get("http://l.test/")
        start = clock.monotonic()
        assert client.get("http://l.test/").status_code == 200
        assert clock.monotonic() - start == 30.0


def test_a_window_admits_the_published_quota_and_no_more(clock: FakeClock) -> None:
    left = [3]

    def handle(request: httpx.Request) -> httpx.Response:
        left[0] -= 1
        return limited(left[0], 10)

    transport = ResilientTransport(httpx.MockTransport(handle), clock=clock, max_wait=None)
    sent = []
    with httpx.Client(transport=transport) as client:
        for _ in range(7):
            client.get("http://w.test/")
            sent.append(clock.monotonic())
            if left[0] == 0 and clock.monotonic() >= 10.0:
                left[0] = 3  # the server's next window
    # Three in the first window, then a wait until it ends: the policy's quota again.
    assert sent[:3] == [0.0, 0.0, 0.0]
    assert sent[3] == 10.0


def test_in_flight_requests_are_not_let_through_twice() -> None:
    holds = MemoryHolds(clock=FakeClock())
    tickets = [holds.take("k") for _ in range(3)]  # three sent before any answer
    assert all(isinstance(t, Ticket) for t in tickets)
    # The first answer says 3 are left after it: the first plus three more.
    first = tickets[0]
    assert isinstance(first, Ticket)
    holds.observe("k", first, ServerLimits(remaining=3, reset=10.0))
    assert isinstance(holds.take("k"), Ticket)  # the 4th
    assert holds.take("k") == 10.0  # held: the two in flight are counted already


def test_the_first_answer_keeps_room_for_unanswered_requests_sent_before_it() -> None:
    """Six threads send before any answer; the server sees ticket 2 first. Its answer
    (11 left) must not let a 13th request through while ticket 1 is on its way."""
    holds = MemoryHolds(clock=FakeClock())
    tickets = [holds.take("k") for _ in range(6)]
    second = tickets[1]
    assert isinstance(second, Ticket)
    holds.observe("k", second, ServerLimits(remaining=11, reset=3.0, quota=12, window=3.0))
    admitted = 0
    while isinstance(holds.take("k"), Ticket):
        admitted += 1
    assert 6 + admitted == 12


def test_a_request_counted_in_the_servers_next_window_keeps_room_for_those_before_it() -> None:
    """Threads reorder requests: ticket 12 reaches the server just after its window
    flipped, ticket 11 (sent earlier, unanswered) lands behind it in the same new
    window. The new window's limit leaves room for ticket 11, so the server's quota of
    12 holds (the CI failure: one 429 with six threads)."""
    clock = FakeClock()
    holds = MemoryHolds(clock=clock)
    quota = 12
    first = holds.take("k")
    assert isinstance(first, Ticket)
    clock.advance(0.5)  # the server's window ends at 3.0; it says t=ceil(2.5)=3
    holds.observe("k", first, ServerLimits(remaining=11, reset=3.0, quota=quota, window=3.0))
    tickets = [holds.take("k") for _ in range(11)]
    assert all(isinstance(t, Ticket) for t in tickets)
    assert holds.take("k") == 3.0  # all 12 used; the window ends at 3.5 here
    for seq, ticket in enumerate(tickets[:9], start=2):  # answers to tickets 2..10
        assert isinstance(ticket, Ticket)
        holds.observe("k", ticket, ServerLimits(remaining=quota - seq, reset=3.0))
    clock.advance(2.7)  # 3.2: the server is in its next window, ours lasts to 3.5
    twelfth = tickets[10]
    assert isinstance(twelfth, Ticket)
    # The first request of the server's new window: 11 left, 3 s to go (ceil(2.8)).
    holds.observe("k", twelfth, ServerLimits(remaining=11, reset=3.0))
    admitted = 0
    while isinstance(holds.take("k"), Ticket):
        admitted += 1
    # The server's new window: ticket 12, ticket 11 still on its way, and these.
    assert 2 + admitted <= quota
    assert admitted == quota - 2  # and no room lost beyond ticket 11's


def test_x_ratelimit_and_retry_after_hold_too(clock: FakeClock) -> None:
    trio = httpx.Response(
        200,
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(clock.time()) + 20)},
    )
    transport = ResilientTransport(
        mock(replies(trio, httpx.Response(503, headers={"Retry-After": "5"}))), clock=clock
    )
    with httpx.Client(transport=transport) as client:
        client.get("http://x.test/")
        with pytest.raises(rs.RateLimited, match=r"20\.000s"):
            client.get("http://x.test/")
        client.get("http://y.test/")  # 503, Retry-After 5: y is held
        with pytest.raises(rs.RateLimited, match=r"5\.000s"):
            client.get("http://y.test/")
    off = ResilientTransport(mock(replies(limited(0, 30))), clock=clock, follow_server_limits=False)
    with httpx.Client(transport=off) as client:
        client.get("http://x.test/")
        assert client.get("http://x.test/").status_code == 200


def test_a_held_request_is_retried_when_the_wait_fits(clock: FakeClock) -> None:
    seen: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(clock.monotonic())
        return limited(0, 4) if len(seen) == 1 else httpx.Response(200)

    transport = ResilientTransport(
        httpx.MockTransport(handle), retry=rs.Retry(attempts=2, clock=clock), clock=clock
    )
    with httpx.Client(transport=transport) as client:
        client.get("http://h.test/")
        assert client.get("http://h.test/").status_code == 200  # held 4 s, within 10 s
    assert seen == [0.0, 4.0]


def test_the_limiter_applies_per_host() -> None:
    bucket = rs.TokenBucket(rate=0.001, capacity=2)
    transport = ResilientTransport(mock(replies()), limiter=bucket)
    with httpx.Client(transport=transport) as client:
        client.get("http://a.test/")
        client.get("http://a.test/")
        with pytest.raises(rs.RateLimited) as raised:
            client.get("http://a.test/")
        assert raised.value.key == "a.test"
        assert client.get("http://b.test/").status_code == 200


@pytest.mark.anyio
async def test_async_transport_on_a_mock(anyio_backend: str) -> None:
    seen: list[httpx.Request] = []
    transport = AsyncResilientTransport(
        mock(replies(httpx.Response(503), httpx.Response(503)), seen),
        breaker=rs.CircuitBreaker("async-mock", failure_threshold=5),
        retry=no_backoff(attempts=3),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://am.test/")).status_code == 200
    assert len(seen) == 3


# -- real servers on loopback ---------------------------------------------------------------

Scope = dict[str, Any]


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class Scripted:
    """An ASGI app that answers from a script: (status, headers, body, delay) per request,
    then 200 "ok". Counts what it served."""

    def __init__(self, *script: tuple[int, dict[str, str], bytes, float]) -> None:
        self.script = list(script)
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        self.hits += 1
        status, headers, body, delay = self.script.pop(0) if self.script else (200, {}, b"ok", 0.0)
        if delay:
            await asyncio.sleep(delay)
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


class FixedWindow:
    """A server with a quota of ``quota`` requests per ``window`` seconds (fixed windows
    from its start), publishing RateLimit-Policy and RateLimit; 429 beyond the quota.
    ``counts`` is the requests it saw per window."""

    def __init__(self, quota: int, window: float) -> None:
        self.quota = quota
        self.window = window
        self.start = time.monotonic()
        self.counts: dict[int, int] = defaultdict(int)
        self.rejected = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        now = time.monotonic() - self.start
        index = int(now // self.window)
        self.counts[index] += 1
        left = self.quota - self.counts[index]
        reset = max(1, math.ceil((index + 1) * self.window - now))
        headers = [
            (b"ratelimit-policy", f'"fixed";q={self.quota};w={self.window:g}'.encode()),
            (b"ratelimit", f'"fixed";r={max(left, 0)};t={reset}'.encode()),
            (b"content-length", b"2"),
        ]
        status = 200
        if left < 0:
            self.rejected += 1
            status = 429
            headers.append((b"retry-after", str(reset).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.anyio
async def test_a_5xx_burst_is_retried_and_counted_by_the_hosts_breaker(
    anyio_backend: str, serve: Callable[[Any], UvicornServer]
) -> None:
    app = Scripted(
        (503, {}, b"busy", 0.0),
        (503, {}, b"busy", 0.0),
        (200, {}, b"ok", 0.0),
        (500, {}, b"boom", 0.0),
    )
    server = serve(app)
    template = rs.CircuitBreaker(f"burst-{anyio_backend}", failure_threshold=5)
    transport = AsyncResilientTransport(breaker=template, retry=no_backoff(attempts=3))
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        assert (await client.get("/")).status_code == 200  # 503, 503, then 200
        assert (await client.get("/")).status_code == 500  # 500 is not retried
    assert app.hits == 4
    calls = transport.breakers[f"127.0.0.1:{server.port}"]._read()["calls"]
    assert calls["failure"] == 3
    assert calls["success"] == 1


@pytest.mark.anyio
async def test_a_429_with_retry_after_seconds_waits_on_a_real_server(
    anyio_backend: str, serve: Callable[[Any], UvicornServer]
) -> None:
    app = Scripted((429, {"Retry-After": "1"}, b"slow down", 0.0))
    server = serve(app)
    transport = AsyncResilientTransport(retry=rs.Retry(attempts=2))
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        started = time.monotonic()
        response = await client.get("/")
        waited = time.monotonic() - started
    assert response.status_code == 200
    assert app.hits == 2
    assert 0.95 <= waited < 2.5


def test_a_429_with_an_http_date_on_a_real_server_and_the_body_kept(
    serve: Callable[[Any], UvicornServer],
) -> None:
    date = email.utils.formatdate(time.time() + 1.5, usegmt=True)
    app = Scripted((429, {"Retry-After": date}, b"come back later", 0.0))
    server = serve(app)
    transport = ResilientTransport(retry=rs.Retry(attempts=2, deadline=0.2))
    with httpx.Client(transport=transport, base_url=server.url) as client:
        response = client.get("/")  # the date is past the deadline: no wait, body intact
        assert response.status_code == 429
        assert response.text == "come back later"
        with pytest.raises(rs.RateLimited):  # and the host is held until that date
            client.get("/")
    assert app.hits == 1


def test_streaming_responses_pass_through_unbuffered(serve: Callable[[Any], UvicornServer]) -> None:
    received = threading.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        for _ in range(500):  # the second chunk only once the client has the first
            if received.is_set():
                break
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"second"})

    server = serve(app)
    transport = ResilientTransport(
        breaker=rs.CircuitBreaker("stream", failure_threshold=5), retry=no_backoff(attempts=2)
    )
    with httpx.Client(transport=transport) as client, client.stream("GET", server.url) as response:
        chunks = response.iter_raw()
        assert next(chunks) == b"first"
        received.set()
        assert b"".join(chunks) == b"second"


@pytest.mark.anyio
async def test_slow_responses_time_out_within_the_deadline_and_are_no_breaker_failure(
    anyio_backend: str, serve: Callable[[Any], UvicornServer]
) -> None:
    server = serve(Scripted((200, {}, b"late", 5.0)))
    template = rs.CircuitBreaker(f"slow-{anyio_backend}", failure_threshold=1)
    transport = AsyncResilientTransport(breaker=template)
    async with httpx.AsyncClient(transport=transport, base_url=server.url, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises((rs.TimeoutExceeded, httpx.TimeoutException)):
            await rs.Timeout(0.3).acall(client.get, "/")
        assert time.monotonic() - started < 2.0
    breaker = transport.breakers[f"127.0.0.1:{server.port}"]
    assert breaker.state is rs.CircuitState.CLOSED
    assert breaker._read()["calls"]["failure"] == 0


def test_sync_deadline_caps_the_read_timeout(serve: Callable[[Any], UvicornServer]) -> None:
    server = serve(Scripted((200, {}, b"late", 5.0)))
    transport = ResilientTransport(breaker=rs.CircuitBreaker("slow-sync", failure_threshold=1))
    with httpx.Client(transport=transport, base_url=server.url, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            rs.Timeout(0.3).call(client.get, "/")
        assert time.monotonic() - started < 2.0
    assert transport.breakers[f"127.0.0.1:{server.port}"].state is rs.CircuitState.CLOSED


def test_connections_reset_through_the_fault_proxy(serve: Callable[[Any], UvicornServer]) -> None:
    app = Scripted()
    server = serve(app)
    template = rs.CircuitBreaker("reset", failure_threshold=2, recovery_timeout=0.3)
    transport = ResilientTransport(breaker=template, retry=no_backoff(attempts=2))
    with FaultProxy("127.0.0.1", server.port) as proxy, httpx.Client(transport=transport) as client:
        url = f"http://127.0.0.1:{proxy.port}/"
        assert client.get(url).status_code == 200  # a pooled connection now
        proxy.cut(refuse=False)  # reset it, and every new one
        with pytest.raises(httpx.TransportError):
            client.get(url)  # tried twice, reset twice: the breaker opens
        accepted = proxy.stats.accepted
        with pytest.raises(rs.CircuitOpenError):
            client.get(url)
        assert proxy.stats.accepted == accepted  # no connection was tried
        proxy.restore()
        time.sleep(0.35)
        for _ in range(2):  # success_threshold probes close it again
            assert client.get(url).status_code == 200
    assert transport.breakers[f"127.0.0.1:{proxy.port}"].state is rs.CircuitState.CLOSED


@pytest.mark.slow
def test_threads_sharing_a_transport_stay_within_the_servers_quota(
    serve: Callable[[Any], UvicornServer],
) -> None:
    app = FixedWindow(quota=12, window=3.0)
    server = serve(app)
    transport = ResilientTransport(max_wait=None)
    until = time.monotonic() + 4.0
    statuses: list[int] = []

    def hammer(client: httpx.Client) -> None:
        while time.monotonic() < until:
            statuses.append(client.get("/").status_code)

    with httpx.Client(transport=transport, base_url=server.url) as client:
        threads = [threading.Thread(target=hammer, args=(client,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert app.rejected == 0
    assert set(statuses) == {200}
    assert max(app.counts.values()) <= 12
    assert sum(app.counts.values()) >= 24  # the quota of two windows was used


WORKER = """
import sys, time
import httpx, redis
from resilience.integrations.httpx import RedisHolds, ResilientTransport

url, redis_url, prefix, start, until = sys.argv[1:6]
client = redis.Redis.from_url(redis_url)
transport = ResilientTransport(holds=RedisHolds(client, prefix=prefix), max_wait=None)
codes = []
with httpx.Client(transport=transport, base_url=url) as http:
    while time.time() < float(start):
        time.sleep(0.001)
    while time.time() < float(until):
        codes.append(http.get("/").status_code)
print(len(codes), codes.count(200))
"""


@pytest.mark.redis
@pytest.mark.slow
def test_four_processes_share_one_server_quota_through_redis(
    serve: Callable[[Any], UvicornServer], redis_url: str, redis_prefix: str
) -> None:
    app = FixedWindow(quota=15, window=3.0)
    server = serve(app)
    start = time.time() + 1.5  # once every process has imported httpx
    until = start + 6.5
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                server.url,
                redis_url,
                redis_prefix + "holds",
                str(start),
                str(until),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [worker.communicate(timeout=60) for worker in workers]
    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    sent = [tuple(map(int, out.split())) for out, _ in outputs]
    assert all(total == ok and total > 0 for total, ok in sent), sent
    assert app.rejected == 0
    assert max(app.counts.values()) <= 15, dict(app.counts)
    assert sum(app.counts.values()) >= 2 * 15  # they did use the quota


@pytest.mark.redis
def test_redis_holds_are_shared_between_transports(redis_url: str, redis_prefix: str) -> None:
    left = [2]

    def handle(request: httpx.Request) -> httpx.Response:
        left[0] -= 1
        return limited(max(left[0], 0), 30, quota=2, window=30)

    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    a, b = (
        ResilientTransport(httpx.MockTransport(handle), holds=RedisHolds(c, prefix=redis_prefix))
        for c in clients
    )
    with httpx.Client(transport=a) as first, httpx.Client(transport=b) as second:
        first.get("http://shared.test/")
        second.get("http://shared.test/")  # the quota is spent now
        for client in (first, second):
            with pytest.raises(rs.RateLimited) as held:
                client.get("http://shared.test/")
            assert 28 < held.value.retry_after <= 30
    assert b.holds is not None
    assert isinstance(b.holds, RedisHolds)
    assert b.holds.clear("shared.test") is True
    with httpx.Client(transport=b) as second:
        second.get("http://shared.test/")
    for transport in (a, b):
        assert isinstance(transport.holds, RedisHolds)
        transport.holds.close()
    for c in clients:
        c.close()


@pytest.mark.redis
def test_redis_holds_fall_back_to_memory_while_redis_is_away(
    proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(proxy.url_for(redis_url))
    holds = RedisHolds(client, prefix=redis_prefix, timeout=0.2)
    transport = ResilientTransport(mock(replies(limited(0, 30))), holds=holds)
    with httpx.Client(transport=transport) as http:
        proxy.cut()
        http.get("http://away.test/")  # no Redis: decided in memory, and remembered there
        with pytest.raises(rs.RateLimited):
            http.get("http://away.test/")
    assert holds.guard.errors >= 1
    holds.close()
    client.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_async_redis_holds(anyio_backend: str, aredis_client: Any, redis_prefix: str) -> None:
    holds = RedisHolds(aredis_client, prefix=redis_prefix)
    transport = AsyncResilientTransport(mock(replies(limited(0, 30))), holds=holds)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://aredis.test/")
        with pytest.raises(rs.RateLimited):
            await client.get("http://aredis.test/")
    await holds.aclose()
    with pytest.raises(TypeError, match="take"):
        RedisHolds(aredis_client, prefix=redis_prefix).take("x")


def test_a_streamed_retryable_body_is_read_to_retry_unless_too_long() -> None:
    big = [b"x" * 65536] * 20  # 1.25 MiB, no Content-Length

    def handle(request: httpx.Request) -> httpx.Response:
        size = request.url.path.strip("/")
        chunks = big if size == "big" else [b"small ", b"body"]
        return httpx.Response(503, content=iter(chunks))

    seen: list[httpx.Request] = []
    transport = ResilientTransport(mock(handle, seen), retry=no_backoff(attempts=2))
    with httpx.Client(transport=transport) as client:
        small = client.get("http://big.test/small")
        assert small.text == "small body"
        assert len(seen) == 2  # read, then retried
        large = client.get("http://big.test/big")
        assert large.content == b"".join(big)  # handed on whole, not retried
        assert len(seen) == 3
