"""Token buckets in Redis: one Lua script call per decision or per batch, on Redis's clock.

- The scripts (``token_bucket.lua``, which also answers ``peek`` without writing, and
  ``token_bucket_one.lua``: package data) run with EVALSHA; NOSCRIPT
  (after a SCRIPT FLUSH, a failover, a new node) reloads them and retries once
  (:class:`resilience.remote.Script`).
- ``reset`` deletes a key's buckets (one DEL: they share a hash slot).
- Time comes from Redis ``TIME`` inside the script, so clients with skewed clocks agree.
- Keys are ``{prefix}:{<key>}:{limit}`` (:func:`bucket_key`). Every limit of one key
  shares that hash tag, so a group of limits is one atomic script call, on Redis Cluster
  too. Braces and ``%`` in a key are percent-escaped, so the tag is never empty or cut
  short.
- A bucket's value is the time it is full again, in microseconds of Redis's clock; the
  key carries a PEXPIRE of its time to refill, so an idle (full) bucket has no key.
  :func:`bucket_levels` reads them back (the ``resilience buckets`` command).
- A batch is one script call (per hash slot on Cluster, in chunks of 500).
- The backend talks to Redis through its own connection pool, built from the client's
  settings with ``timeout`` as the socket timeouts and no retries, and through a
  circuit breaker; while Redis is unavailable, ``on_error`` decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from resilience.limiter._async_redis import AsyncRedisBackend
from resilience.limiter._redis_base import ONE, SCRIPT, RedisTable, bucket_key
from resilience.limiter._redis_base import _pack_one as _pack_one  # tests check it
from resilience.limiter._sync_redis import SyncRedisBackend
from resilience.limiter.bucket import Limit

__all__ = [
    "BucketLevel",
    "RedisBackend",
    "RedisTable",
    "bucket_key",
    "bucket_levels",
    "bucket_pattern",
    "full_in",
    "limit_from_name",
    "split_bucket_key",
    "tokens_now",
]

# The scripts' SHA1s, under the names they always had.
SCRIPT_SHA: Final = SCRIPT.sha
ONE_SHA: Final = ONE.sha


class RedisBackend(SyncRedisBackend, AsyncRedisBackend):
    """Token buckets shared by every process and host that uses the same Redis.

    ``client`` is a ``redis.Redis`` (sync calls) or ``redis.asyncio.Redis`` (async calls),
    or a RedisCluster of either kind (which keeps its own timeouts and retries).
    ``on_error`` is what happens while Redis cannot answer within ``timeout`` seconds:
    ``"local"`` (default) decides in process memory with the same limits,
    ``"fail_open"`` allows, ``"fail_closed"`` denies. ``breaker`` replaces the default
    breaker around Redis (3 failures open it for 1 s).
    """


# -- reading the buckets back (operators, `resilience buckets`) ---------------------------

#: ``str(Limit)``, the name a TokenBucket gets when it is given none: ``20@10/s``.
_DEFAULT_NAME: Final = re.compile(r"^(?P<capacity>[0-9.e+-]+)@(?P<rate>[0-9.e+-]+)/s$")


def limit_from_name(name: str) -> Limit | None:
    """The limit a default limiter name (``str(Limit)``, e.g. ``20@10/s``) stands for, or
    None for a name of the user's own. The name rounds to 6 significant digits."""
    found = _DEFAULT_NAME.match(name)
    if found is None:
        return None
    try:
        return Limit(rate=float(found["rate"]), capacity=float(found["capacity"]))
    except ValueError:
        return None


def bucket_pattern(prefix: str, match: str = "*") -> str:
    """A SCAN MATCH pattern for the buckets of the request keys ``match`` (a glob)."""
    return f"{prefix}:{{{match}}}:*" if match != "*" else f"{prefix}:*"


def split_bucket_key(prefix: str, key: str) -> tuple[str, str] | None:
    """``(request key, limiter name)`` of a bucket's Redis key, or None for another key.
    The request key is as stored: braces and ``%`` percent-escaped."""
    head, sep, name = key.rpartition(":")
    start = f"{prefix}:{{"
    if not sep or not head.startswith(start) or not head.endswith("}"):
        return None
    return head[len(start) : -1], name


def full_in(value: bytes | str | float, now_us: int) -> float:
    """Seconds until a bucket whose stored value is ``value`` is full again, at Redis time
    ``now_us`` (microseconds)."""
    return max(0.0, float(value) - now_us) / 1e6


def tokens_now(value: bytes | str | float, now_us: int, rate: float, capacity: float) -> float:
    """Tokens in a bucket whose stored value is ``value``, at Redis time ``now_us``."""
    return max(0.0, capacity - full_in(value, now_us) * rate)


@dataclass(frozen=True, slots=True)
class BucketLevel:
    """One bucket below capacity, as Redis holds it now."""

    #: The request key, as stored (braces and ``%`` percent-escaped).
    key: str
    #: The limiter's name (``str(Limit)`` unless it was given one).
    name: str
    #: Seconds until the bucket is full again (and its key expires).
    full_in: float
    #: Tokens now, when the limit is known (from a default name, or given).
    tokens: float | None
    #: The capacity, when the limit is known.
    capacity: float | None


def bucket_levels(
    client: Any,
    prefix: str,
    *,
    match: str = "*",
    rate: float | None = None,
    capacity: float | None = None,
) -> Iterator[BucketLevel]:
    """Every bucket under ``prefix`` that is below capacity (a full bucket has no key),
    for request keys matching the glob ``match``, read with a sync ``redis.Redis``.
    ``rate`` and ``capacity``, when given, are the limit of every bucket listed (for
    limiters with names of their own); otherwise a default name says it."""
    if (rate is None) != (capacity is None):
        raise ValueError("rate and capacity go together")
    given = None if rate is None or capacity is None else Limit(rate, capacity)
    seconds, micros = client.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    for raw in client.scan_iter(match=bucket_pattern(prefix, match), count=1000):
        parts = split_bucket_key(prefix, raw.decode() if isinstance(raw, bytes) else raw)
        if parts is None:
            continue
        value = client.get(raw)
        if value is None:
            continue  # expired while we looked: full again
        try:
            ahead = full_in(value, now_us)
        except ValueError:
            continue  # not a number: not a bucket of ours
        key, name = parts
        limit = given or limit_from_name(name)
        if limit is None:
            yield BucketLevel(key, name, ahead, None, None)
        else:
            tokens = tokens_now(value, now_us, limit.rate, limit.capacity)
            yield BucketLevel(key, name, ahead, tokens, limit.capacity)
