"""Fixtures for the whole suite.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio and on trio.
- ``clock``: a :class:`resilience.testing.FakeClock` starting at 0.
- Real Redis / PostgreSQL fixtures from ``support.services`` (see that module).
"""

from __future__ import annotations

import pytest
from support.services import (
    aredis_client,
    pg_conn,
    pg_schema,
    postgres_dsn,
    proxy,
    redis_client,
    redis_prefix,
    redis_url,
    require_asyncio,
    throwaway,
)

from resilience.testing import FakeClock

# Imported so pytest registers them as fixtures for every test module.
__all__ = [
    "anyio_backend",
    "aredis_client",
    "clock",
    "pg_conn",
    "pg_schema",
    "postgres_dsn",
    "proxy",
    "redis_client",
    "redis_prefix",
    "redis_url",
    "require_asyncio",
    "throwaway",
]


# Module scope, like anyio's own default, so module-scoped async fixtures stay possible.
@pytest.fixture(
    scope="module",
    params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")],
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
