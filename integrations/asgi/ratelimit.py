"""RateLimitMiddleware: token-bucket limits for HTTP requests, as pure ASGI middleware."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from resilience.integrations.asgi._asgi import ASGIApp, Message, Receive, Scope, Send, patterns
from resilience.integrations.asgi.keys import KeyFunc, client_ip
from resilience.limiter import Decision, LimitGroup, MemoryBackend, RedisBackend, TokenBucket

__all__ = ["RateLimitMiddleware", "Rule", "ratelimit_headers", "reset_seconds"]

Limiter = TokenBucket | LimitGroup


@dataclass(frozen=True, slots=True)
class Rule:
    """Requests whose method and path match use ``limiter`` (and ``cost``, ``key``).

    ``path`` is a regular expression matched against the whole path; ``methods`` an
    iterable of methods (empty: any). The first matching rule wins.
    """

    path: str
    limiter: Limiter
    methods: Iterable[str] = ()
    cost: float = 1
    key: KeyFunc | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.path)
        except re.error as e:
            raise ValueError(f"path: {self.path!r} is not a regular expression: {e}") from None
        methods = (self.methods,) if isinstance(self.methods, str) else self.methods
        object.__setattr__(self, "methods", tuple(m.upper() for m in methods))
        if self.name is not None:
            _check_name(self.name, "name")
        _check_limiter(self.limiter, "limiter")
        for limit in self.limiter.limits:
            limit.check_cost(self.cost)


_TOKEN = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(name: object, field: str) -> None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"{field} must be a short token for the RateLimit fields, got {name!r}")


def _check_limiter(limiter: object, field: str) -> None:
    if not isinstance(limiter, (TokenBucket, LimitGroup)):
        raise TypeError(
            f"{field} must be a TokenBucket or LimitGroup, got {type(limiter).__name__}"
        )
    backend = limiter.backend
    if isinstance(backend, RedisBackend) and not backend.is_async:
        raise ValueError(
            f"{field}: middleware runs on the event loop, so its RedisBackend needs a "
            "redis.asyncio client (a sync client would block every request)"
        )


def reset_seconds(reset_after: float) -> int:
    """The RateLimit ``t`` (and window) value: whole seconds, rounded up, never below 0.

    Float sums like 999.9 + 0.1 land a hair above a whole second: that is not rounded up
    (a 1000 s bucket says t=1000, not 1001).
    """
    # A conditional, not max(): this runs on every request.
    return math.ceil(reset_after - 1e-9) if reset_after > 1e-9 else 0


def _policy(name: str, limiter: Limiter, capacity: int) -> bytes:
    limit = limiter.limits[0]
    for candidate in limiter.limits:  # the group member that bounds this decision
        if int(candidate.capacity) == capacity:
            limit = candidate
    window = max(1, reset_seconds(limit.fill_time))
    return f'"{name}";q={int(limit.capacity)};w={window}'.encode()


def ratelimit_headers(
    name: str, limiter: Limiter, decision: Decision, policy: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10)."""
    if policy is None:
        policy = _policy(name, limiter, decision.limit)
    reset = reset_seconds(decision.reset_after)
    current = f'"{name}";r={max(0, decision.remaining)};t={reset}'.encode()
    return [(_POLICY, policy), (_RATELIMIT, current)]


_POLICY: Final = b"ratelimit-policy"
_RATELIMIT: Final = b"ratelimit"


@dataclass(frozen=True, slots=True)
class _Choice:
    """What a request matched, worked out once at construction."""

    limiter: Limiter
    cost: float
    key: KeyFunc
    name: str
    current: bytes  # the RateLimit field, to be filled in with r and t
    policy: tuple[bytes, bytes] | None  # the RateLimit-Policy field; None for groups
    in_memory: bool


class RateLimitMiddleware:
    """Limit HTTP requests per key; 429 with ``Retry-After`` and RateLimit fields.

    ``limiter`` applies to every request not matched by a ``rules`` entry; ``key`` says
    who a request counts against (default: the socket peer's address, see
    ``client_ip``); ``exempt`` paths (regular expressions) are never limited. ``name``
    names the policy in the RateLimit fields.
    WebSocket and lifespan scopes pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter | None = None,
        *,
        key: KeyFunc | None = None,
        cost: float = 1,
        exempt: Iterable[str] = (),
        rules: Sequence[Rule] = (),
        name: str = "default",
        headers: bool = True,
    ) -> None:
        if limiter is None and not rules:
            raise ValueError("limiter: give a limiter, rules, or both")
        if limiter is not None:
            _check_limiter(limiter, "limiter")
            for limit in limiter.limits:
                limit.check_cost(cost)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"rules[{i}] must be a Rule, got {type(rule).__name__}")
            _check_limiter(rule.limiter, f"rules[{i}].limiter")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the ASGI scope, got {key!r}")
        _check_name(name, "name")
        self.app = app
        self.limiter = limiter
        self.key = key or client_ip()
        self.cost = cost
        self.name = name
        self.headers = headers
        self._exempt = patterns(exempt, "exempt")
        # Each route's limiter, key, name and policy field, worked out here, once.
        self._default = None if limiter is None else self._choose(limiter, cost, self.key, name)
        self._rules = [
            (
                re.compile(r.path),
                r,
                self._choose(r.limiter, r.cost, r.key or self.key, r.name or name),
            )
            for r in rules
        ]
        # Groups' policy fields, by name, group and bounding limit.
        self._policies: dict[tuple[str, int, int], tuple[bytes, bytes]] = {}
        self._plain = not self._rules and not self._exempt

    def _choose(self, limiter: Limiter, cost: float, key: KeyFunc, name: str) -> _Choice:
        policy = (
            (_POLICY, _policy(name, limiter, int(limiter.capacity)))
            if isinstance(limiter, TokenBucket)
            else None
        )
        return _Choice(
            limiter,
            cost,
            key,
            name,
            b'"%s";r=%%d;t=%%d' % name.encode(),
            policy,
            isinstance(limiter.backend, MemoryBackend),
        )

    def _pick(self, scope: Scope) -> _Choice | None:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        for pattern, rule, choice in self._rules:
            if (not rule.methods or method in rule.methods) and pattern.fullmatch(path):
                return choice
        return self._default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._plain:  # no rules, no exemptions: nothing to match
            choice = self._default
        else:
            path = scope.get("path", "")
            if any(p.fullmatch(path) for p in self._exempt):
                await self.app(scope, receive, send)
                return
            choice = self._pick(scope)
        key = None if choice is None else choice.key(scope)
        if choice is None or key is None:
            await self.app(scope, receive, send)
            return
        limiter = choice.limiter
        if choice.in_memory:
            decision = limiter.try_acquire(key, choice.cost)  # no I/O: no coroutine needed
        else:
            decision = await limiter.atry_acquire(key, choice.cost)
        if not self.headers:
            if decision.allowed:
                await self.app(scope, receive, send)
            else:
                await _too_many(send, decision, [])
            return
        allowed, remaining, _, reset, bound = decision  # one unpack, not four lookups
        policy = choice.policy
        if policy is None:  # a group: its bounding limit can change per decision
            cache_key = (choice.name, id(limiter), bound)
            policy = self._policies.get(cache_key)
            if policy is None:
                policy = self._policies[cache_key] = (
                    _POLICY,
                    _policy(choice.name, limiter, bound),
                )
        # reset_seconds(), inlined: this runs on every request.
        current = (
            _RATELIMIT,
            choice.current
            % (remaining if remaining > 0 else 0, math.ceil(reset - 1e-9) if reset > 1e-9 else 0),
        )
        if not allowed:
            await _too_many(send, decision, [policy, current])
            return

        # A plain function returning send's awaitable, not a coroutine of its own: the
        # app awaits it all the same, and each message saves a coroutine and a frame.
        def send_with_fields(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                # A copy: an app may send the same start message on every request.
                # dict() and a store: ~40 ns less than {**message, "headers": ...}.
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), policy, current]
            return send(message)

        await self.app(scope, receive, send_with_fields)


async def _too_many(send: Send, decision: Decision, extra: list[tuple[bytes, bytes]]) -> None:
    retry = max(1, math.ceil(decision.retry_after))
    body = b'{"detail":"Too Many Requests"}'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
