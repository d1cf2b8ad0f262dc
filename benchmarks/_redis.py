"""Redis helpers the benchmarks share: where Redis is, whether it answers, cleaning up."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final

import redis

REDIS_URL_ENV: Final = "RESILIENCE_REDIS_URL"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def where(url: str) -> str:
    """host:port/db, without any credentials the URL may carry."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


def redis_or_reason(url: str) -> tuple[redis.Redis | None, str | None]:
    """A connected client, or None and why not (the benchmark then skips its Redis groups)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    except ValueError as error:  # not a Redis URL
        return None, f"bad {REDIS_URL_ENV} ({error})"
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        client.close()
        return None, f"Redis not reachable at {where(url)} ({type(error).__name__}: {error})"
    return client, None


def unlink(client: redis.Redis, patterns: Sequence[str]) -> int:
    """Delete our keys only: SCAN MATCH each pattern, then UNLINK, in chunks."""
    keys: list[Any] = []
    for pattern in patterns:
        keys += client.scan_iter(match=pattern, count=1000)
    for i in range(0, len(keys), 500):
        client.unlink(*keys[i : i + 500])
    return len(keys)


def unlink_prefix(client: redis.Redis, prefix: str) -> int:
    return unlink(client, [f"{prefix}:*"])
