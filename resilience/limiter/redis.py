"""Token buckets in Redis: one Lua script call per decision, on Redis's clock.

- The script (``token_bucket.lua``, package data) runs with EVALSHA; NOSCRIPT (after a
  SCRIPT FLUSH, a failover, a new node) reloads it and retries once.
- Time comes from Redis ``TIME`` inside the script, so clients with skewed clocks agree.
- Keys are ``{prefix}:{{{key}}}:{limit}``: every limit of one key shares a hash tag, so a
  group of limits is one atomic script call, on Redis Cluster too.
- Keys carry a PEXPIRE of their time to refill: an idle bucket vanishes.
- The backend talks to Redis through its own connection pool, built from the client's
  settings with ``timeout`` as the socket timeouts and no retries, and through a
  circuit breaker; while Redis is unavailable, ``on_error`` decides.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from resilience._events import Listener
from resilience._remote import UNAVAILABLE, BackendStateChanged, OnError, RemoteGuard
from resilience.breaker import CircuitBreaker
from resilience.limiter.bucket import Decision, Limit, combine
from resilience.limiter.memory import MemoryBackend, MemoryTable

__all__ = ["RedisBackend", "RedisTable"]

log = logging.getLogger("resilience")

SCRIPT: Final = resources.files("resilience.limiter").joinpath("token_bucket.lua").read_text()
SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()
_new_decision = tuple.__new__
_ASYNC_CLIENTS = (redis.asyncio.Redis, redis.asyncio.RedisCluster)
_SYNC_CLIENTS = (redis.Redis, redis.RedisCluster)
_OUTAGE_ERRORS: Final = (redis.RedisError, OSError)


class RedisTable:
    """The buckets of one limit in Redis; decisions go through the backend."""

    __slots__ = ("args", "limit", "local", "suffix")

    def __init__(self, name: str, limit: Limit, local: MemoryTable) -> None:
        self.limit = limit
        self.suffix = f":{name}"
        self.args = (repr(limit.rate), repr(limit.capacity))
        self.local = local


def _budgeted(client: Any, timeout: float) -> Any:
    """A client on a pool of its own with ``timeout`` socket timeouts and no retries."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or isinstance(client, (redis.RedisCluster, redis.asyncio.RedisCluster)):
        log.info("resilience: %s keeps its own timeouts and retries", type(client).__name__)
        return client
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    is_async = isinstance(client, _ASYNC_CLIENTS)
    retry_cls = redis.asyncio.retry.Retry if is_async else Retry
    kwargs["retry"] = retry_cls(NoBackoff(), 0)
    new_pool = type(pool)(connection_class=pool.connection_class, **kwargs)
    cls = redis.asyncio.Redis if is_async else redis.Redis
    return cls(connection_pool=new_pool)


class RedisBackend:
    """Token buckets shared by every process and host that uses the same Redis.

    ``client`` is a ``redis.Redis`` (sync calls) or ``redis.asyncio.Redis`` (async calls).
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
        if not isinstance(client, _SYNC_CLIENTS + _ASYNC_CLIENTS):
            raise TypeError(
                "client must be a redis.Redis, redis.asyncio.Redis or a RedisCluster, "
                f"got {type(client).__name__}"
            )
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.is_async = isinstance(client, _ASYNC_CLIENTS)
        self.prefix = prefix
        self.on_error = OnError.parse(on_error)
        self._user_client = client
        self._client = _budgeted(client, float(timeout))
        self._local = MemoryBackend()
        self.guard = RemoteGuard(
            f"redis:{prefix}",
            errors=_OUTAGE_ERRORS,
            on_error=self.on_error,
            breaker=breaker,
            listeners=list(listeners),
        )

    def close(self) -> None:
        """Disconnect the backend's own connection pool (the client you passed stays open)."""
        self._require(False, "close")
        if self._client is not self._user_client:
            self._client.connection_pool.disconnect()

    async def aclose(self) -> None:
        self._require(True, "aclose")
        if self._client is not self._user_client:
            await self._client.connection_pool.disconnect()

    def table(self, name: str, limit: Limit) -> RedisTable:
        if "{" in name or "}" in name:
            raise ValueError(f"name must not contain braces, got {name!r}")
        return RedisTable(name, limit, self._local.table(name, limit))

    # -- key and argument layout ---------------------------------------------------------

    def _keys(self, tables: Sequence[RedisTable], key: str) -> list[str]:
        head = f"{self.prefix}:{{{key}}}"
        return [head + t.suffix for t in tables]

    @staticmethod
    def _args(tables: Sequence[RedisTable], cost: float) -> list[str]:
        args = [repr(cost)]
        for t in tables:
            args.extend(t.args)
        return args

    @staticmethod
    def _decision(tables: Sequence[RedisTable], reply: Sequence[Any]) -> Decision:
        parts = []
        for i, t in enumerate(tables):
            allowed, remaining, retry_us, reset_us = reply[1 + 4 * i : 5 + 4 * i]
            parts.append(
                _new_decision(
                    Decision,
                    (
                        bool(allowed) and bool(reply[0]),
                        int(remaining),
                        retry_us / 1e6,
                        reset_us / 1e6,
                        int(t.limit.capacity),
                    ),
                )
            )
        return combine(parts)

    def _fallback(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        if self.on_error is OnError.LOCAL:
            return self._local.decide_group([t.local for t in tables], key, cost, now)
        allowed = self.on_error is OnError.FAIL_OPEN
        limit = tables[0].limit
        return _new_decision(
            Decision,
            (allowed, 0, 0.0 if allowed else limit.fill_time, 0.0, int(limit.capacity)),
        )

    def _require(self, want_async: bool, method: str) -> None:
        if self.is_async != want_async:
            kind = "redis.asyncio" if self.is_async else "sync redis"
            other = "a" + method if not want_async else method[1:]
            raise TypeError(f"{method}() cannot use this backend's {kind} client; call {other}()")

    # -- sync ------------------------------------------------------------------------------

    def _eval(self, keys: list[str], args: list[str]) -> Any:
        try:
            return self._client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            self._client.script_load(SCRIPT)
            return self._client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)

    def decide(self, tables: Sequence[RedisTable], key: str, cost: float, now: float) -> Decision:
        self._require(False, "try_acquire")
        reply = self.guard.call(self._eval, self._keys(tables, key), self._args(tables, cost))
        if reply is UNAVAILABLE:
            return self._fallback(tables, key, cost, now)
        return self._decision(tables, reply)

    def _pipeline(self, calls: list[tuple[list[str], list[str]]], todo: list[int]) -> Any:
        pipe = self._client.pipeline(transaction=False)
        for i in todo:
            keys, args = calls[i]
            pipe.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        return pipe

    @staticmethod
    def _collect(todo: list[int], replies: list[Any], results: list[Any]) -> list[int]:
        """Store replies; return the calls that met NOSCRIPT (script flushed mid-batch)."""
        missing = []
        for i, reply in zip(todo, replies, strict=True):
            if isinstance(reply, NoScriptError):
                missing.append(i)
            elif isinstance(reply, Exception):
                raise reply
            else:
                results[i] = reply
        return missing

    def _eval_many(self, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        replies = self._pipeline(calls, todo).execute(raise_on_error=False)
        missing = self._collect(todo, replies, results)
        if missing:
            self._client.script_load(SCRIPT)
            replies = self._pipeline(calls, missing).execute(raise_on_error=False)
            if self._collect(missing, replies, results):
                raise NoScriptError("script missing right after SCRIPT LOAD")
        return results

    def decide_many(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        self._require(False, "try_acquire_many")
        calls = [(self._keys(tables, k), self._args(tables, c)) for k, c in items]
        replies = self.guard.call(self._eval_many, calls)
        if replies is UNAVAILABLE:
            return [self._fallback(tables, k, c, now) for k, c in items]
        return [self._decision(tables, r) for r in replies]

    # -- async -----------------------------------------------------------------------------

    async def _aeval(self, keys: list[str], args: list[str]) -> Any:
        try:
            return await self._client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            await self._client.script_load(SCRIPT)
            return await self._client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)

    async def adecide(
        self, tables: Sequence[RedisTable], key: str, cost: float, now: float
    ) -> Decision:
        self._require(True, "atry_acquire")
        reply = await self.guard.acall(
            self._aeval, self._keys(tables, key), self._args(tables, cost)
        )
        if reply is UNAVAILABLE:
            return self._fallback(tables, key, cost, now)
        return self._decision(tables, reply)

    async def _aeval_many(self, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        replies = await self._pipeline(calls, todo).execute(raise_on_error=False)
        missing = self._collect(todo, replies, results)
        if missing:
            await self._client.script_load(SCRIPT)
            replies = await self._pipeline(calls, missing).execute(raise_on_error=False)
            if self._collect(missing, replies, results):
                raise NoScriptError("script missing right after SCRIPT LOAD")
        return results

    async def adecide_many(
        self, tables: Sequence[RedisTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        self._require(True, "atry_acquire_many")
        calls = [(self._keys(tables, k), self._args(tables, c)) for k, c in items]
        replies = await self.guard.acall(self._aeval_many, calls)
        if replies is UNAVAILABLE:
            return [self._fallback(tables, k, c, now) for k, c in items]
        return [self._decision(tables, r) for r in replies]
