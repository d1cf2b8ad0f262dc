"""Decorators keep types (checked by mypy), and the system clock honours freezegun."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import freezegun
import pytest
from typing_extensions import assert_type

import resilience as rs


def test_decorated_callables_keep_their_types() -> None:
    b = rs.CircuitBreaker("types")

    @b
    def sync(x: int, *, y: str = "") -> float:
        return float(x)

    @b
    async def coro(x: int) -> str:
        return str(x)

    @b
    def gen(n: int) -> Iterator[int]:
        yield from range(n)

    @b
    async def agen(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    assert_type(sync(1, y="a"), float)

    async def use() -> None:  # checked by mypy; never run
        assert_type(await coro(1), str)
        assert_type(await b.acall(coro, 1), str)

    assert_type(gen(2), Iterator[int])
    assert_type(agen(2), AsyncIterator[int])
    assert_type(b.call(sync, 2), float)
    assert list(gen(3)) == [0, 1, 2]


def test_system_clock_follows_freezegun() -> None:
    with freezegun.freeze_time("2026-01-01") as frozen:
        b = rs.CircuitBreaker("frozen", failure_threshold=1, recovery_timeout=30.0)
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
        assert b.state is rs.CircuitState.OPEN
        frozen.tick(29)
        assert b.retry_after == pytest.approx(1.0)
        frozen.tick(1)
        assert b.state.value == "half_open"
