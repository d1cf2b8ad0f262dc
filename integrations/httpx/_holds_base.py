"""Where the transport keeps what servers said about their limits, per host key.

The record of one host, in memory or in Redis, is a **window**: a generation (which
window this is), a sequence number (requests let through in it), a limit (the sequence
number the window may reach, -1 while unknown) and an end; plus a **hold** (a server's
Retry-After: nothing goes before it ends) and the host's **policy** (``q`` requests per
``w`` seconds, when the server published it).

- ``take(key)``: before a request. Held (a hold, or the window's limit reached): the
  seconds until it ends. Otherwise the request's :class:`Ticket` (its window and its
  place in it). A new window starts with the policy's quota as its limit when the
  policy is known, else with no limit until a response says one.
- ``observe(key, ticket, limits)``: after a response that carried limit fields. A
  response says ``r`` requests are left after it: requests up to ``seq + r`` may go in
  this window, so the limit becomes ``min(limit, seq + r)``. Counting from the request's
  own place in its window, not from what is left now, is what keeps requests already in
  flight from being let through twice. ``t`` moves the window's end to the server's;
  a ``t`` over a second past the end is a later window of the server's, whose ``seq + r``
  replaces the limit. A limit set afresh (that, or the first one) leaves room for the
  requests sent before this one that may still be in flight and land behind it (the
  memory store counts the answers it saw).
  A response from an older window changes nothing.

So when every client of a server shares one record and the server counts requests in
the order they are sent, a window never admits more than the server's quota. Token
buckets (``t`` is "full again in") are followed conservatively.

This module is pure bookkeeping plus the Redis layout and scripts; ``_async_holds.py``
(and its generated ``_sync_holds.py``) make the Redis calls.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from resilience.breaker import CircuitBreaker
from resilience.clock import SYSTEM_CLOCK, Clock, resolve
from resilience.events import Listener, Tally, Telemetry
from resilience.integrations.httpx.limits import ServerLimits
from resilience.remote import (
    CLUSTERS,
    OUTAGE_ERRORS,
    BackendStateChanged,
    Commands,
    OnError,
    RemoteGuard,
    Script,
    check_client,
    check_timeout,
)

__all__ = ["HOLD_SLACK", "MemoryHolds", "RedisHoldsBase", "Ticket"]

#: A ``t`` more than this past a window's end (seconds) belongs to a later window of
#: the server's; up to it, ``t`` rounded up to whole seconds still names the same end.
_LATER: Final = 1.0
#: How long a host's policy is remembered after it was last seen.
_POLICY_TTL: Final = 86_400.0
#: The memory store forgets expired records once it holds this many keys.
_PRUNE_AT: Final = 10_000
#: Waits this short are slept, not raised, even with max_wait=0: what is left of a hold
#: on Redis's clock after sleeping out the same hold on ours.
HOLD_SLACK: Final = 0.02


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request let through: its window, its place in it, what the store knew."""

    #: The window's generation ("m<n>" in memory, digits in Redis).
    window: str
    #: The request's sequence number in its window (1 for the first).
    seq: int
    #: The window's limit when the request was let through (-1: unknown).
    limit: int
    #: When the window ended then, on the transport's monotonic clock.
    ends: float


class MemoryHolds:
    """The records of this process, on the transport's clock (the default store).

    ``default_window``: how long a window lasts (seconds) while the server has said
    nothing about its length. Thread-safe; shared by threads and tasks alike.
    """

    def __init__(
        self, *, default_window: float = 60.0, clock: Clock | None = None, name: str = "holds"
    ) -> None:
        if (
            isinstance(default_window, bool)
            or not isinstance(default_window, (int, float))
            or not (math.isfinite(default_window) and default_window > 0)
        ):
            raise ValueError(
                f"default_window must be a positive number of seconds, got {default_window!r}"
            )
        self.default_window = float(default_window)
        self.name = name
        self._clock = resolve(clock)
        self._monotonic: Callable[[], float] = self._clock.monotonic
        self._lock = threading.Lock()
        self._generations = itertools.count(1)
        # key -> [generation, seq, limit, ends, answers observed in this window]
        self._windows: dict[str, list[Any]] = {}
        self._holds: dict[str, float] = {}  # key -> until
        self._policies: dict[str, tuple[int, float | None, float]] = {}  # q, w, until
        self._allowed = Tally()
        self._held = Tally()

    def bind(self, clock: Clock) -> None:
        """Use the transport's clock (when the store was made without one)."""
        if self._clock is SYSTEM_CLOCK:
            self._clock = clock
            self._monotonic = clock.monotonic

    # -- decisions ----------------------------------------------------------------------

    def take(self, key: str) -> float | Ticket:
        """Seconds to wait (held), or the request's Ticket."""
        now = self._monotonic()
        with self._lock:
            until = self._holds.get(key)
            if until is not None:
                if until > now:
                    self._held.add()
                    return until - now
                del self._holds[key]
            window = self._windows.get(key)
            if window is None or window[3] <= now:
                if len(self._windows) >= _PRUNE_AT:
                    self._prune(now)
                policy = self._policies.get(key)
                if policy is not None and policy[2] <= now:
                    policy = None
                limit = policy[0] if policy is not None else -1
                length = policy[1] if policy is not None and policy[1] else self.default_window
                window = [f"m{next(self._generations)}", 0, limit, now + length, 0]
                self._windows[key] = window
            elif 0 <= window[2] <= window[1]:
                self._held.add()
                return float(window[3] - now)
            window[1] += 1
            self._allowed.add()
            return Ticket(window[0], window[1], window[2], window[3])

    async def atake(self, key: str) -> float | Ticket:
        return self.take(key)

    def observe(self, key: str, ticket: Ticket | None, limits: ServerLimits) -> None:
        """Apply what a response said (see the module docstring)."""
        now = self._monotonic()
        with self._lock:
            if limits.retry_after:
                until = now + limits.retry_after
                if until > self._holds.get(key, -math.inf):
                    self._holds[key] = until
            if limits.quota is not None:
                self._policies[key] = (limits.quota, limits.window, now + _POLICY_TTL)
            if ticket is None or limits.remaining is None:
                return
            window = self._windows.get(key)
            if window is None or window[0] != ticket.window or window[3] <= now:
                return  # a response from an older window
            window[4] += 1
            bound = ticket.seq + limits.remaining
            later = False
            if limits.reset is not None:
                ends = now + limits.reset
                later = ends > window[3] + _LATER
                window[3] = ends
            if later or window[2] < 0:
                # The limit is set afresh from this answer (the server counted this request
                # in its next window, or nothing was known): requests sent before it and
                # still in flight may land behind it (threads reorder them), so keep room
                # for as many of them as can be unanswered.
                others, after = window[4] - 1, window[1] - ticket.seq
                bound -= ticket.seq - 1 - min(ticket.seq - 1, max(0, others - after))
            if window[2] < 0 or bound < window[2] or later:
                window[2] = bound

    async def aobserve(self, key: str, ticket: Ticket | None, limits: ServerLimits) -> None:
        self.observe(key, ticket, limits)

    def clear(self, key: str) -> None:
        """Forget what servers said about ``key``."""
        with self._lock:
            self._windows.pop(key, None)
            self._holds.pop(key, None)
            self._policies.pop(key, None)

    def _prune(self, now: float) -> None:
        """Drop expired records (with the lock held)."""
        for key in [k for k, w in self._windows.items() if w[3] <= now]:
            del self._windows[key]
        for key in [k for k, until in self._holds.items() if until <= now]:
            del self._holds[key]
        for key in [k for k, p in self._policies.items() if p[2] <= now]:
            del self._policies[key]

    # -- observing ----------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        """A limiter to metrics: requests let through, and requests held."""
        return Telemetry("limiter", self.name, self._read)

    def _read(self) -> dict[str, int]:
        return {"allowed": self._allowed.value(), "denied": self._held.value()}

    def __repr__(self) -> str:
        return f"MemoryHolds(default_window={self.default_window:g}, name={self.name!r})"


# -- Redis ---------------------------------------------------------------------------------

_TAKE_LUA: Final = """
local held = redis.call('PTTL', KEYS[2])
if held > 0 then return {0, held} end
local w = redis.call('HMGET', KEYS[1], 'g', 's', 'l')
if not w[1] then
  local p = redis.call('HMGET', KEYS[3], 'q', 'w')
  local limit = p[1] or '-1'
  local ms = p[2] or ARGV[1]
  local t = redis.call('TIME')
  local g = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'g', g, 's', 1, 'l', limit)
  redis.call('PEXPIRE', KEYS[1], ms)
  return {1, g, 1, tonumber(limit), tonumber(ms)}
end
local ttl = redis.call('PTTL', KEYS[1])
local limit = tonumber(w[3])
if limit >= 0 and tonumber(w[2]) >= limit then return {0, ttl} end
return {1, w[1], redis.call('HINCRBY', KEYS[1], 's', 1), limit, ttl}
"""

_OBSERVE_LUA: Final = """
if ARGV[5] ~= '' then
  local ms = tonumber(ARGV[5])
  if redis.call('PTTL', KEYS[2]) < ms then redis.call('SET', KEYS[2], '1', 'PX', ms) end
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], 'q', ARGV[6])
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], 'w', ARGV[7]) end
  redis.call('PEXPIRE', KEYS[3], ARGV[9])
end
if ARGV[1] == '' or ARGV[3] == '' then return 0 end
local w = redis.call('HMGET', KEYS[1], 'g', 'l')
if w[1] ~= ARGV[1] then return 0 end
local bound = tonumber(ARGV[2]) + tonumber(ARGV[3])
local limit = tonumber(w[2])
local later = false
if ARGV[4] ~= '' then
  local ms = tonumber(ARGV[4])
  later = ms > redis.call('PTTL', KEYS[1]) + tonumber(ARGV[8])
  redis.call('PEXPIRE', KEYS[1], ms)
end
if limit < 0 or bound < limit or later then redis.call('HSET', KEYS[1], 'l', bound) end
return 1
"""


class _Inline(Script):
    """A Script whose text lives here rather than in a package data file."""

    __slots__ = ()

    def __init__(self, name: str, text: str) -> None:
        super().__init__("resilience.integrations.httpx", name)
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


TAKE: Final = _Inline("take.lua", _TAKE_LUA)
OBSERVE: Final = _Inline("observe.lua", _OBSERVE_LUA)
_ESCAPES: Final = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


class RedisHoldsBase:
    """The Redis store's configuration and its pure parts; the calls are mixins."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "holds",
        default_window: float = 60.0,
        timeout: float = 0.1,
        on_error: str | OnError = "local",
        breaker: CircuitBreaker | None = None,
        listeners: Sequence[Listener[BackendStateChanged]] = (),
        clock: Clock | None = None,
    ) -> None:
        self.is_async = check_client(client)
        self._async_client = self.is_async
        self._sync_client = not self.is_async
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        budget = check_timeout(timeout)
        self.prefix = prefix
        self.on_error = OnError.parse(on_error)
        self.is_cluster = isinstance(client, CLUSTERS)
        self._local = MemoryHolds(default_window=default_window, clock=clock, name=prefix)
        self.default_window = self._local.default_window
        self._default_ms = _ms(self.default_window)
        self._commands = Commands(client, budget)
        self.guard = RemoteGuard(
            f"redis:{prefix}",
            errors=OUTAGE_ERRORS,
            on_error=self.on_error,
            breaker=breaker,
            listeners=list(listeners),
            timeout=budget,
        )
        # Policies this process wrote lately, so an unchanged one is not written again.
        self._written: dict[str, tuple[int, float | None, float]] = {}
        self._allowed = Tally()
        self._held = Tally()

    @property
    def _monotonic(self) -> Callable[[], float]:
        return self._local._monotonic

    def bind(self, clock: Clock) -> None:
        self._local.bind(clock)

    def keys(self, key: str) -> list[str]:
        """The Redis keys of ``key``'s record: window, hold, policy (one hash slot)."""
        if "{" in key or "}" in key or "%" in key:
            key = key.translate(_ESCAPES)
        head = f"{self.prefix}:{{{key}}}"
        return [head + ":w", head + ":h", head + ":p"]

    def _ticket(self, reply: Sequence[Any], now: float) -> float | Ticket:
        if int(reply[0]) == 0:
            self._held.add()
            return max(int(reply[1]), 0) / 1000.0
        self._allowed.add()
        generation = reply[1]
        if isinstance(generation, bytes):
            generation = generation.decode()
        return Ticket(str(generation), int(reply[2]), int(reply[3]), now + int(reply[4]) / 1000)

    def _fallback(self, key: str) -> float | Ticket | None:
        if self.on_error is OnError.LOCAL:
            return self._local.take(key)
        if self.on_error is OnError.FAIL_OPEN:
            return None
        return max(self.guard.breaker.retry_after, HOLD_SLACK)

    def _observe_args(
        self, key: str, ticket: Ticket | None, limits: ServerLimits, now: float
    ) -> list[str] | None:
        """The observe script's arguments, or None when it would change nothing."""
        hold = _ms(limits.retry_after) if limits.retry_after else ""
        quota = window = ""
        if limits.quota is not None:
            written = self._written.get(key)
            if (
                written is None
                or written[:2] != (limits.quota, limits.window)
                or written[2] - now < _POLICY_TTL / 2
            ):
                quota = str(limits.quota)
                window = _ms(limits.window) if limits.window else ""
                self._written[key] = (limits.quota, limits.window, now + _POLICY_TTL)
                if len(self._written) > _PRUNE_AT:
                    self._written.clear()
        generation = seq = remaining = reset = ""
        if ticket is not None and limits.remaining is not None:
            bound = ticket.seq + limits.remaining
            moved = limits.reset is not None and abs(limits.reset - (ticket.ends - now)) > 0.5
            if ticket.limit < 0 or bound < ticket.limit or moved:
                generation, seq, remaining = ticket.window, str(ticket.seq), str(limits.remaining)
                reset = "" if limits.reset is None else str(max(0, math.ceil(limits.reset * 1000)))
        if not (hold or quota or generation):
            return None
        later = _ms(_LATER)
        return [
            generation, seq, remaining, reset, hold, quota, window, later, _ms(_POLICY_TTL),
        ]  # fmt: skip

    def _wrong_client(self, method: str) -> TypeError:
        kind = "redis.asyncio" if self.is_async else "sync redis"
        other = "a" + method if self.is_async else method[1:]
        return TypeError(f"{method}() cannot use this store's {kind} client; call {other}()")

    def telemetry(self) -> Telemetry:
        """A limiter to metrics (requests let through, requests held), through the guard
        of its Redis (a backend)."""
        return Telemetry("limiter", self.prefix, self._read, links=(self.guard,))

    def _read(self) -> dict[str, int]:
        return {"allowed": self._allowed.value(), "denied": self._held.value()}

    def __repr__(self) -> str:
        return f"RedisHolds(prefix={self.prefix!r}, on_error={self.on_error.value!r})"
