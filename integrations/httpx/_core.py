"""What the sync and async transports share: configuration, checked once; the per-host
breakers; and every decision that does no I/O.

A request goes through these layers, outermost first (``_async_transport.py``)::

    handle_request       the private cache (cache=): a fresh hit goes no further; a stale
                         entry is revalidated through the layers below, and stands in for
                         an error when it allows (stale-if-error)
      retry              only for a retryable request: idempotent method or
                         Idempotency-Key, and a body that can be sent again
        attempt          each try, in this order:
          deadline       rs.remaining() caps the httpx timeouts; nothing starts past it
          server limits  the host's record (holds): wait, or raise rs.RateLimited
          limiter        the client-side limiter= on the host key
          breaker        the host's breaker: rs.CircuitOpenError before connecting
          inner transport
          observe        the response's RateLimit / X-RateLimit / Retry-After fields
          classify       breaker outcome from the status; retryable status -> raise for Retry
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Collection, Container
from typing import Any, Final

import httpx

from resilience.breaker import CircuitBreaker, CircuitState
from resilience.clock import SYSTEM_CLOCK, Clock, resolve
from resilience.errors import CircuitOpenError, RateLimited, TimeoutExceeded
from resilience.events import Telemetry
from resilience.integrations.httpx._cache import CACHE_BODY_LIMIT, PrivateCache, check_cache
from resilience.integrations.httpx.holds import Holds, MemoryHolds, RedisHolds
from resilience.limiter import LimitGroup, RedisBackend, TokenBucket
from resilience.policies import Retry

__all__ = [
    "FAILURE_STATUS",
    "IDEMPOTENT_METHODS",
    "RETRYABLE_ERRORS",
    "RETRY_STATUS",
    "SIDE_ASYNC",
    "SIDE_SYNC",
    "STALE_ERRORS",
    "NoRetry",
    "RetryableResponse",
    "TransportCore",
    "host_key",
]

#: Methods that may be sent twice (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: Statuses the per-host breaker counts as failures: 429 and every 5xx.
FAILURE_STATUS: Final = frozenset({429, *range(500, 600)})
#: Statuses a retryable request is tried again on.
RETRY_STATUS: Final = frozenset({429, 502, 503, 504})
#: Transport errors a retryable request is tried again on: the connection failed, broke
#: or timed out. Others (an invalid URL, a local protocol error) would fail again.
RETRYABLE_ERRORS: Final = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
#: Errors a stored response may stand in for, when it allows (``stale-if-error``): the
#: host's breaker is open, the host is held, the deadline is spent, the origin is unreachable.
STALE_ERRORS: Final = (CircuitOpenError, RateLimited, TimeoutExceeded, *RETRYABLE_ERRORS)
#: Which side a mixin is (scripts/unasync.py renames SIDE_ASYNC to SIDE_SYNC).
SIDE_ASYNC: Final = True
SIDE_SYNC: Final = False
#: The largest body read to retry a response; a longer one is returned as it is.
RETRY_BODY_LIMIT: Final = 1 << 20

Limiter = TokenBucket | LimitGroup


class RetryableResponse(Exception):
    """A response whose status asks for another try (``retry_status``), raised inside
    the transport so the Retry policy sees it, with the server's wait as
    ``retry_after``. When the retry gives up, the transport returns ``response``
    (its body read and intact); name this class in ``Retry(on=...)`` to choose."""

    def __init__(self, response: httpx.Response, retry_after: float | None) -> None:
        super().__init__(response.status_code, retry_after)
        self.response = response
        self.status_code = response.status_code
        self.retry_after = retry_after

    def __str__(self) -> str:
        wait = "" if self.retry_after is None else f"; retry after {self.retry_after:.3f}s"
        return f"HTTP {self.status_code}{wait}"


class NoRetry(BaseException):
    """Carries an error the retry must not try again past the Retry policy (which
    retries ``Exception``s its ``on`` accepts); the transport raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


def host_key(request: httpx.Request) -> str:
    """The default key: the URL's host, and its port when not the scheme's default
    (``api.example.com``, ``127.0.0.1:8000``)."""
    return request.url.netloc.decode("ascii")


def _statuses(field: str, value: object) -> Container[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__contains__"):
        raise TypeError(f"{field} must be a container of status codes, got {value!r}")
    return value


def _wait(field: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{field} must be None or a number of seconds >= 0, got {value!r}")
    if value == float("inf"):
        return None
    return float(value)


class TransportCore:
    """Configuration and decisions shared by ResilientTransport and AsyncResilientTransport."""

    _IS_ASYNC: bool
    _BASE: type
    _DEFAULT: Callable[[], Any]

    def __init__(
        self,
        transport: Any = None,
        *,
        breaker: CircuitBreaker | None = None,
        retry: Retry | None = None,
        limiter: Limiter | None = None,
        cache: Any = None,
        cache_max_body: int = CACHE_BODY_LIMIT,
        follow_server_limits: bool = True,
        holds: Holds | None = None,
        max_wait: float | None = 0.0,
        failure_status: Container[int] = FAILURE_STATUS,
        retry_status: Container[int] = RETRY_STATUS,
        retry_methods: Collection[str] = IDEMPOTENT_METHODS,
        retry_idempotency_key: bool = True,
        timeouts_are_failures: bool = False,
        key: Callable[[httpx.Request], str] | None = None,
        on_new_breaker: Callable[[CircuitBreaker], object] | None = None,
        max_hosts: int = 1024,
        name: str = "httpx",
        clock: Clock | None = None,
    ) -> None:
        side = "AsyncResilientTransport" if self._IS_ASYNC else "ResilientTransport"
        if transport is None:
            transport = self._DEFAULT()
        elif not isinstance(transport, self._BASE):
            raise TypeError(
                f"transport must be an httpx.{self._BASE.__name__} for {side}, "
                f"got {type(transport).__name__}"
            )
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(
                f"breaker must be a CircuitBreaker (the template of the per-host breakers), "
                f"got {type(breaker).__name__}"
            )
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a resilience.Retry, got {type(retry).__name__}")
        if limiter is not None:
            if not isinstance(limiter, (TokenBucket, LimitGroup)):
                raise TypeError(
                    f"limiter must be a TokenBucket or LimitGroup, got {type(limiter).__name__}"
                )
            backend = limiter.backend
            if isinstance(backend, RedisBackend) and backend.is_async != self._IS_ASYNC:
                need = "a redis.asyncio" if self._IS_ASYNC else "a sync redis.Redis"
                raise ValueError(f"limiter: {side} needs a RedisBackend on {need} client")
        cache = check_cache(cache, self._IS_ASYNC, side)
        if (
            isinstance(cache_max_body, bool)
            or not isinstance(cache_max_body, int)
            or cache_max_body < 0
        ):
            raise ValueError(f"cache_max_body must be an int >= 0, got {cache_max_body!r}")
        if not isinstance(follow_server_limits, bool):
            raise TypeError(
                f"follow_server_limits must be True or False, got {follow_server_limits!r}"
            )
        if holds is not None:
            if not isinstance(holds, (MemoryHolds, RedisHolds)):
                raise TypeError(
                    f"holds must be a MemoryHolds or RedisHolds, got {type(holds).__name__}"
                )
            if not follow_server_limits:
                raise ValueError("holds: given with follow_server_limits=False, it would go unused")
            if isinstance(holds, RedisHolds) and holds.is_async != self._IS_ASYNC:
                need = "a redis.asyncio" if self._IS_ASYNC else "a sync redis.Redis"
                raise ValueError(f"holds: {side} needs a RedisHolds on {need} client")
        for flag, value in (
            ("retry_idempotency_key", retry_idempotency_key),
            ("timeouts_are_failures", timeouts_are_failures),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        if isinstance(retry_methods, str) or not all(isinstance(m, str) for m in retry_methods):
            raise TypeError(
                f"retry_methods must be a collection of method names, got {retry_methods!r}"
            )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the request, got {key!r}")
        if on_new_breaker is not None and not callable(on_new_breaker):
            raise TypeError(f"on_new_breaker must be callable, got {on_new_breaker!r}")
        if isinstance(max_hosts, bool) or not isinstance(max_hosts, int) or max_hosts < 1:
            raise ValueError(f"max_hosts must be an int >= 1, got {max_hosts!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.transport = transport
        self.breaker = breaker
        self.retry = retry
        self.limiter = limiter
        self.cache = cache
        self.cache_max_body = cache_max_body
        self.follow_server_limits = follow_server_limits
        self.max_wait = _wait("max_wait", max_wait)
        self.failure_status = _statuses("failure_status", failure_status)
        self.retry_status = _statuses("retry_status", retry_status)
        self.retry_methods = frozenset(m.upper() for m in retry_methods)
        self.retry_idempotency_key = retry_idempotency_key
        self.timeouts_are_failures = timeouts_are_failures
        self.key: Callable[[httpx.Request], str] = key or host_key
        self.on_new_breaker = on_new_breaker
        self.max_hosts = max_hosts
        self.name = name
        self._clock = resolve(clock)
        self._sleep: Callable[[float], None] = getattr(self._clock, "sleep", SYSTEM_CLOCK.sleep)
        self._asleep: Callable[[float], Awaitable[None]] = getattr(
            self._clock, "asleep", SYSTEM_CLOCK.asleep
        )
        if follow_server_limits and holds is None:
            holds = MemoryHolds(clock=self._clock, name=f"{name}:server-limits")
        elif holds is not None and clock is not None:
            holds.bind(self._clock)
        self.holds = holds
        self._http_cache = (
            None
            if cache is None
            else PrivateCache(
                cache, max_body=cache_max_body, name=f"{name}:rfc9111", clock=self._clock
            )
        )
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    # -- per-host breakers ---------------------------------------------------------------

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The per-host breakers made so far, by host key (a copy)."""
        return dict(self._breakers)

    def breaker_for(self, key: str) -> CircuitBreaker | None:
        """The breaker of host ``key`` (made from the template on first use), or None
        without a template."""
        found = self._breakers.get(key)
        if found is not None or self.breaker is None:
            return found
        with self._lock:
            found = self._breakers.get(key)
            if found is not None:
                return found
            if len(self._breakers) >= self.max_hosts:
                self._evict()
            found = self.breaker.copy(f"{self.breaker.name}:{key}")
            self._breakers[key] = found
        if self.on_new_breaker is not None:
            self.on_new_breaker(found)
        return found

    def _evict(self) -> None:
        """Forget the oldest closed breaker (with the lock held); if none is closed,
        the oldest: keys are bounded even for a client of unboundedly many hosts."""
        for key, each in self._breakers.items():
            if each.state is CircuitState.CLOSED:
                del self._breakers[key]
                return
        del self._breakers[next(iter(self._breakers))]

    @staticmethod
    def _open_error(breaker: CircuitBreaker) -> CircuitOpenError:
        stats = breaker.stats()
        return CircuitOpenError(breaker.name, stats.retry_after, stats.state.value)

    # -- decisions ------------------------------------------------------------------------

    def _retryable(self, request: httpx.Request) -> bool:
        """May this request be sent more than once?"""
        if self.retry is None:
            return False
        if request.method not in self.retry_methods and not (
            self.retry_idempotency_key and "idempotency-key" in request.headers
        ):
            return False
        # A body from a generator or a file cannot be sent again; bytes can.
        return isinstance(request.stream, httpx.ByteStream)

    @staticmethod
    def _capped(timeout: Any, left: float) -> dict[str, float]:
        """httpx's per-phase timeouts, none longer than ``left`` seconds."""
        phases = timeout if isinstance(timeout, dict) else {}
        return {
            phase: left if (value := phases.get(phase)) is None or value > left else value
            for phase in ("connect", "read", "write", "pool")
        }

    def _budget(self, left: float | None) -> float | None:
        """How long a request may wait for the server's window or the limiter."""
        wait = self.max_wait
        if left is not None and (wait is None or left < wait):
            return left
        return wait

    # -- observing ------------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        """A pipeline to metrics: its members report for it (the retry, the limiter, the
        server-limit store, the cache, and the per-host breakers; metrics read these
        links again at each scrape, so breakers made later are exported too)."""
        members = (self.retry, self.limiter, self.holds, self.cache)
        links: list[Any] = [m for m in members if m is not None and hasattr(m, "telemetry")]
        links.extend(self._breakers.values())
        return Telemetry("pipeline", self.name, dict, links=tuple(links))
