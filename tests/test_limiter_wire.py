"""The single-decision command is packed by hand; it must be what redis-py would send."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from resilience.limiter.redis import ONE_SHA, _pack_one


@pytest.mark.parametrize("key", ["rl:{user:42}:20@10/s", "rl:{ключ✓}:x", "rl:{%7B}:y", "k" * 5000])
def test_hand_packed_evalsha_matches_redis_py(key: str) -> None:
    conn: Any = redis.Connection()  # type: ignore[no-untyped-call]  # only its packer is used
    expected = b"".join(conn.pack_command("EVALSHA", ONE_SHA, 1, key, "100000.0", "2e+06"))
    assert b"".join(_pack_one(key, "100000.0", "2e+06")) == expected
