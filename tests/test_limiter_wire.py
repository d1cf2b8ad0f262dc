"""What goes on the wire: the single-decision command, packed by hand, must be what
redis-py would send; every Lua script is package data, run by the SHA1 Redis computes."""

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


@pytest.mark.redis
def test_every_script_is_package_data_with_the_sha_redis_computes(
    redis_client: redis.Redis,
) -> None:
    from resilience.cache._redis_base import UNLOCK, WRITE
    from resilience.limiter._redis_base import ONE, SCRIPT

    for script in (SCRIPT, ONE, WRITE, UNLOCK):
        assert script.text.startswith("--")  # the .lua file, its header comment first
        assert redis_client.script_load(script.text) == script.sha
    assert ONE.sha == ONE_SHA


def test_a_missing_script_file_is_a_loud_error_not_an_outage() -> None:
    from resilience.remote import OUTAGE_ERRORS, Script

    missing = Script("resilience.limiter", "no_such_script.lua")
    with pytest.raises(RuntimeError, match=r"no_such_script\.lua is missing") as caught:
        _ = missing.sha
    assert not isinstance(caught.value, OUTAGE_ERRORS)  # a guard would have hidden it
