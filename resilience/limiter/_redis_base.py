"""What the Redis backend's sync and async sides share: the scripts, the key layout,
planning script calls, reading their replies, and the fallback policy."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

from resilience.breaker import CircuitBreaker
from resilience.events import Listener, Telemetry
from resilience.limiter.bucket import Decision, Limit, combine, from_wait
from resilience.limiter.memory import MemoryBackend, MemoryTable
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

__all__ = ["ONE", "SCRIPT", "RedisBackendBase", "RedisTable", "bucket_key", "key_head"]

SCRIPT: Final = Script("resilience.limiter", "token_bucket.lua")  # groups, batches, peeks
ONE: Final = Script("resilience.limiter", "token_bucket_one.lua")  # one request, one limit
# EVALSHA <ONE> 1 <key> <cost_us> <fill_us> as RESP: the constant head, packed once.
_ONE_HEAD: Final = f"*6\r\n$7\r\nEVALSHA\r\n$40\r\n{ONE.sha}\r\n$1\r\n1\r\n".encode()


def _pack_one(key: str, cost_us: str, fill_us: str) -> list[bytes]:
    """The hot path's command, packed by hand: what redis-py would send, at half the cost."""
    k, c, f = key.encode(), cost_us.encode(), fill_us.encode()
    return [
        b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
        % (
            _ONE_HEAD,
            len(k),
            k,
            len(c),
            c,
            len(f),
            f,
        )
    ]


_CHUNK: Final = 500  # requests per script call: bounds how long one call holds Redis
_new_decision = tuple.__new__
_ESCAPES: Final = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})

# One planned script call: (keys, args, indexes of the requests it decides).
_Call = tuple[list[str], list[str], list[int]]


# -- the key layout ----------------------------------------------------------------------


def key_head(prefix: str, key: str) -> str:
    """``{prefix}:{<key>}``: what every bucket of one request key starts with. The key is
    the hash tag, so all its limits share a slot; braces and ``%`` are percent-escaped,
    so the tag is never empty or cut short."""
    if "{" in key or "}" in key or "%" in key:
        key = key.translate(_ESCAPES)
    return f"{prefix}:{{{key}}}"


def bucket_key(prefix: str, key: str, name: str) -> str:
    """The Redis key of request key ``key``'s bucket in the limiter called ``name``."""
    return f"{key_head(prefix, key)}:{name}"


class RedisTable:
    """One limit's buckets in Redis; decisions go through the backend."""

    __slots__ = ("args", "fill_arg", "limit", "local", "per_token_us", "suffix", "unit_arg")

    def __init__(self, name: str, limit: Limit, local: MemoryTable) -> None:
        self.limit = limit
        self.suffix = f":{name}"
        self.per_token_us = 1e6 / limit.rate
        self.args = (repr(self.per_token_us), repr(limit.capacity * self.per_token_us))
        self.unit_arg = repr(self.per_token_us)  # ARGV[1] of ONE for a cost of 1
        self.fill_arg = self.args[1]
        self.local = local

    def one_decision(self, reply: int, cost: float) -> Decision:
        taken = reply >= 0
        wait = (reply if taken else -reply - 1) / 1e6
        return from_wait(wait, cost, self.limit.rate, self.limit.capacity, taken)


class RedisBackendBase:
    """The backend's state and its pure parts; the sync and async calls are mixins."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "rl",
        timeout: float = 0.1,
        on_error: str | OnError = "local",
        breaker: CircuitBreaker | None = None,
        listeners: Sequence[Listener[BackendStateChanged]] = (),
    ) -> None:
        is_async = check_client(client)
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        budget = check_timeout(timeout)
        self.is_async = is_async
        self._async_client = is_async
        self._sync_client = not is_async
        self.is_cluster = isinstance(client, CLUSTERS)
        self.prefix = prefix
        self.on_error = OnError.parse(on_error)
        self._commands = Commands(client, budget)
        self._client = self._commands.client
        self._local = MemoryBackend()
        self.guard = RemoteGuard(
            f"redis:{prefix}",
            errors=OUTAGE_ERRORS,
            on_error=self.on_error,
            breaker=breaker,
            listeners=list(listeners),
            timeout=budget,
        )

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads (resilience.events): the guard's counters."""
        return self.guard.telemetry()

    def table(self, name: str, limit: Limit) -> RedisTable:
        if "{" in name or "}" in name:
            raise ValueError(f"name must not contain braces, got {name!r}")
        return RedisTable(name, limit, self._local.table(name, limit))

    # -- planning calls and reading replies ----------------------------------------------

    def _head(self, key: str) -> str:
        return key_head(self.prefix, key)

    def _keys(self, tables: Sequence[RedisTable], key: str) -> list[str]:
        """The Redis keys of ``key``'s buckets, one per limit (one hash slot)."""
        head = self._head(key)
        return [head + t.suffix for t in tables]

    def _plan(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], take: bool = True
    ) -> Iterator[_Call]:
        """Script calls for ``items``: one per chunk, and per hash slot on Cluster.
        ``take=False`` peeks: the script answers the same but takes nothing."""
        limit_args = [str(len(tables) if take else -len(tables))]
        for t in tables:
            limit_args.extend(t.args)
        groups: dict[int, list[int]] = {}
        if self.is_cluster:
            for i, (key, _) in enumerate(items):
                slot = self._client.keyslot(self._head(key))
                groups.setdefault(slot, []).append(i)
        else:
            groups[0] = list(range(len(items)))
        for indexes in groups.values():
            for start in range(0, len(indexes), _CHUNK):
                chunk = indexes[start : start + _CHUNK]
                keys: list[str] = []
                costs: list[str] = []
                for i in chunk:
                    key, cost = items[i]
                    head = self._head(key)
                    keys.extend(head + t.suffix for t in tables)
                    costs.append(repr(cost))
                yield keys, limit_args + costs, chunk

    @staticmethod
    def _read(
        tables: Sequence[RedisTable],
        items: Sequence[tuple[str, float]],
        call: _Call,
        reply: bytes | str,
        out: list[Decision | None],
    ) -> None:
        fields = reply.split()
        step = 1 + len(tables)
        for n, i in enumerate(call[2]):
            cost = items[i][1]
            taken = int(fields[n * step]) == 1
            parts = [
                from_wait(
                    int(fields[n * step + 1 + j]) / 1e6,
                    cost,
                    t.limit.rate,
                    t.limit.capacity,
                    taken,
                )
                for j, t in enumerate(tables)
            ]
            out[i] = combine(parts)

    def _fallback(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        if self.on_error is OnError.LOCAL:
            return self._local.decide_group([t.local for t in tables], key, cost, now)
        limit = tables[0].limit
        if self.on_error is OnError.FAIL_OPEN:
            return _new_decision(Decision, (True, 0, 0.0, 0.0, int(limit.capacity)))
        # Denied: come back when the breaker next asks Redis, or after one token's time.
        retry = max(self.guard.breaker.retry_after, cost / limit.rate)
        return _new_decision(Decision, (False, 0, retry, 0.0, int(limit.capacity)))

    def _peek_fallback(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        """What :meth:`_fallback` would answer now, taking nothing."""
        if self.on_error is OnError.LOCAL:
            return self._local.peek_group([t.local for t in tables], key, cost, now)
        return self._fallback(tables, key, cost, now)  # fail_open, fail_closed: no state

    def _wrong_client(self, method: str) -> TypeError:
        """The error for a sync call on an asyncio-client backend, or the reverse."""
        kind = "redis.asyncio" if self.is_async else "sync redis"
        other = "a" + method if self.is_async else method[1:]
        return TypeError(f"{method}() cannot use this backend's {kind} client; call {other}()")
