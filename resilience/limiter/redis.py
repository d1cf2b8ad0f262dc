"""Token buckets in Redis: one Lua script call per decision or per batch, on Redis's clock.

- The script (``token_bucket.lua``, package data) runs with EVALSHA; NOSCRIPT (after a
  SCRIPT FLUSH, a failover, a new node) reloads it and retries once.
- Time comes from Redis ``TIME`` inside the script, so clients with skewed clocks agree.
- Keys are ``{prefix}:{<key>}:{limit}``. Every limit of one key shares that hash tag, so
  a group of limits is one atomic script call, on Redis Cluster too. Braces and ``%`` in
  a key are percent-escaped, so the tag is never empty or cut short.
- Keys carry a PEXPIRE of their time to refill: an idle bucket vanishes.
- A batch is one script call (per hash slot on Cluster, in chunks of ``_CHUNK``).
- The backend talks to Redis through its own connection pool, built from the client's
  settings with ``timeout`` as the socket timeouts and no retries, and through a
  circuit breaker; while Redis is unavailable, ``on_error`` decides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any, Final

from redis.exceptions import NoScriptError

from resilience._redis import CLUSTERS, OUTAGE_ERRORS, Commands, check_client, check_timeout
from resilience._remote import UNAVAILABLE, BackendStateChanged, OnError, RemoteGuard
from resilience.breaker import CircuitBreaker
from resilience.events import Listener
from resilience.limiter.bucket import Decision, Limit, combine, from_wait
from resilience.limiter.memory import MemoryBackend, MemoryTable

__all__ = ["RedisBackend", "RedisTable"]


def _script(name: str) -> tuple[str, str]:
    text = resources.files("resilience.limiter").joinpath(name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


SCRIPT, SCRIPT_SHA = _script("token_bucket.lua")  # groups and batches
ONE, ONE_SHA = _script("token_bucket_one.lua")  # one request, one limit: the hot path
# EVALSHA ONE_SHA 1 <key> <cost_us> <fill_us> as RESP: the constant head, packed once.
_ONE_HEAD: Final = f"*6\r\n$7\r\nEVALSHA\r\n$40\r\n{ONE_SHA}\r\n$1\r\n1\r\n".encode()


def _pack_one(key: str, cost_us: str, fill_us: str) -> list[bytes]:
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
_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})

# One planned script call: (keys, args, indexes of the requests it decides).
_Call = tuple[list[str], list[str], list[int]]


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


class RedisBackend:
    """Token buckets shared by every process and host that uses the same Redis.

    ``client`` is a ``redis.Redis`` (sync calls) or ``redis.asyncio.Redis`` (async calls),
    or a RedisCluster of either kind (which keeps its own timeouts and retries).
    ``on_error`` is what happens while Redis cannot answer within ``timeout`` seconds:
    ``"local"`` (default) decides in process memory with the same limits,
    ``"fail_open"`` allows, ``"fail_closed"`` denies. ``breaker`` replaces the default
    breaker around Redis (3 failures open it for 1 s).
    """

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
        )

    def close(self) -> None:
        """Disconnect the backend's own connection pool (the client you passed stays open)."""
        self._require(False, "close")
        self._commands.close()

    async def aclose(self) -> None:
        self._require(True, "aclose")
        await self._commands.aclose()

    def table(self, name: str, limit: Limit) -> RedisTable:
        if "{" in name or "}" in name:
            raise ValueError(f"name must not contain braces, got {name!r}")
        return RedisTable(name, limit, self._local.table(name, limit))

    # -- planning calls and reading replies ----------------------------------------------

    def _head(self, key: str) -> str:
        if "{" in key or "}" in key or "%" in key:
            key = key.translate(_ESCAPES)
        return f"{self.prefix}:{{{key}}}"

    def _plan(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]]
    ) -> Iterator[_Call]:
        """Script calls for ``items``: one per chunk, and per hash slot on Cluster."""
        limit_args = [str(len(tables))]
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

    def _require(self, want_async: bool, method: str) -> None:
        if self.is_async != want_async:
            kind = "redis.asyncio" if self.is_async else "sync redis"
            other = "a" + method if not want_async else method[1:]
            raise TypeError(f"{method}() cannot use this backend's {kind} client; call {other}()")

    # -- sync ------------------------------------------------------------------------------

    def _eval(self, keys: list[str], args: list[str]) -> Any:
        try:
            return self._commands.run("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            self._client.script_load(SCRIPT)
            return self._commands.run("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)

    def _eval_one(self, key: str, cost_us: str, fill_us: str) -> Any:
        packed = _pack_one(key, cost_us, fill_us)
        try:
            return self._commands.run("EVALSHA", ONE_SHA, 1, key, cost_us, fill_us, packed=packed)
        except NoScriptError:
            self._client.script_load(ONE)
            return self._commands.run("EVALSHA", ONE_SHA, 1, key, cost_us, fill_us, packed=packed)

    def _run(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]]
    ) -> list[Decision]:
        out: list[Decision | None] = [None] * len(items)
        for call in self._plan(tables, items):
            self._read(tables, items, call, self._eval(call[0], call[1]), out)
        return out  # type: ignore[return-value]  # every index is filled by its call

    def decide(self, tables: Sequence[RedisTable], key: str, cost: float, now: float) -> Decision:
        if self.is_async:
            self._require(False, "try_acquire")
        if len(tables) == 1:
            table = tables[0]
            cost_us = table.unit_arg if cost == 1 else repr(cost * table.per_token_us)
            reply = self.guard.call(
                self._eval_one, self._head(key) + table.suffix, cost_us, table.fill_arg
            )
            if reply is UNAVAILABLE:
                return self._fallback(tables, key, cost, now)
            return table.one_decision(reply, cost)
        return self._decide(tables, [(key, cost)], now)[0]

    def decide_many(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        self._require(False, "try_acquire_many")
        return self._decide(tables, items, now)

    def _decide(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        decisions = self.guard.call(self._run, tables, items)
        if decisions is UNAVAILABLE:
            return [self._fallback(tables, k, c, now) for k, c in items]
        return decisions

    # -- async -----------------------------------------------------------------------------

    async def _aeval(self, keys: list[str], args: list[str]) -> Any:
        try:
            return await self._commands.arun("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            await self._client.script_load(SCRIPT)
            return await self._commands.arun("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)

    async def _aeval_one(self, key: str, cost_us: str, fill_us: str) -> Any:
        packed = _pack_one(key, cost_us, fill_us)
        try:
            return await self._commands.arun(
                "EVALSHA", ONE_SHA, 1, key, cost_us, fill_us, packed=packed
            )
        except NoScriptError:
            await self._client.script_load(ONE)
            return await self._commands.arun(
                "EVALSHA", ONE_SHA, 1, key, cost_us, fill_us, packed=packed
            )

    async def _arun(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]]
    ) -> list[Decision]:
        out: list[Decision | None] = [None] * len(items)
        for call in self._plan(tables, items):
            self._read(tables, items, call, await self._aeval(call[0], call[1]), out)
        return out  # type: ignore[return-value]

    async def adecide(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        if not self.is_async:
            self._require(True, "atry_acquire")
        if len(tables) == 1:
            table = tables[0]
            cost_us = table.unit_arg if cost == 1 else repr(cost * table.per_token_us)
            reply = await self.guard.acall(
                self._aeval_one, self._head(key) + table.suffix, cost_us, table.fill_arg
            )
            if reply is UNAVAILABLE:
                return self._fallback(tables, key, cost, now)
            return table.one_decision(reply, cost)
        return (await self._adecide(tables, [(key, cost)], now))[0]

    async def adecide_many(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        self._require(True, "atry_acquire_many")
        return await self._adecide(tables, items, now)

    async def _adecide(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        decisions = await self.guard.acall(self._arun, tables, items)
        if decisions is UNAVAILABLE:
            return [self._fallback(tables, k, c, now) for k, c in items]
        return decisions
