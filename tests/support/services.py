"""Fixtures for tests against the real Redis and PostgreSQL servers.

The servers come from ``RESILIENCE_REDIS_URL`` and ``RESILIENCE_POSTGRES_DSN``. When one
is unreachable, the tests that need it skip with a reason that says how to start it;
under ``CI=true`` (or ``CI=1``) an unreachable server fails them instead. The start hints
for RabbitMQ and NATS (``RESILIENCE_RABBITMQ_URL``, ``RESILIENCE_NATS_URL``) live here too.

The servers may be shared, so nothing here flushes a database or drops anything it did
not create: each test gets its own Redis key prefix and its own PostgreSQL schema.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from support.faultproxy import FaultProxy

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

    from support.redis_servers import RedisServer

__all__ = [
    "DEFAULT_POSTGRES_DSN",
    "DEFAULT_REDIS_URL",
    "NATS_URL_ENV",
    "POSTGRES_DSN_ENV",
    "RABBITMQ_URL_ENV",
    "REDIS_URL_ENV",
    "aredis_client",
    "create_schema",
    "delete_prefixed_keys",
    "drop_schema",
    "in_ci",
    "nats_hint",
    "new_redis_prefix",
    "pg_conn",
    "pg_schema",
    "postgres_dsn",
    "postgres_dsn_from_env",
    "postgres_hint",
    "rabbitmq_hint",
    "redis_client",
    "redis_hint",
    "redis_prefix",
    "redis_url",
    "redis_url_from_env",
    "require_asyncio",
    "require_service",
]

REDIS_URL_ENV = "RESILIENCE_REDIS_URL"
POSTGRES_DSN_ENV = "RESILIENCE_POSTGRES_DSN"
RABBITMQ_URL_ENV = "RESILIENCE_RABBITMQ_URL"
NATS_URL_ENV = "RESILIENCE_NATS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

PROBE_TIMEOUT = 1.0
"""Seconds a reachability probe may spend connecting."""

REDIS_PREFIX_ROOT = "rstest:"
PG_SCHEMA_ROOT = "rstest_"

# Probe outcome per service name: None when reachable, else the error text.
_probe_cache: dict[str, str | None] = {}


def redis_url_from_env() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def postgres_dsn_from_env() -> str:
    return os.environ.get(POSTGRES_DSN_ENV) or DEFAULT_POSTGRES_DSN


def in_ci() -> bool:
    """True when ``CI`` is ``true`` (any case) or ``1``: absent services then fail."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _redact(url: str) -> str:
    """The URL without its password, for messages that end up in CI logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def _port(url: str, default: int) -> int:
    """The URL's port; ``default`` when it has none or an invalid one."""
    with contextlib.suppress(ValueError):
        return urlsplit(url).port or default
    return default


def redis_hint(url: str) -> str:
    port = _port(url, 6379)
    return (
        f'start one with `redis-server --daemonize yes --port {port} --save "" '
        f"--appendonly no`, or set {REDIS_URL_ENV} to a reachable server"
    )


def _pg_cluster_version() -> str:
    """The Debian cluster version, for a copy-pasteable hint; ``<version>`` if unknown."""
    try:
        versions = sorted(
            (p.name for p in Path("/etc/postgresql").iterdir() if p.name.isdigit()),
            key=int,
        )
    except OSError:
        return "<version>"
    return versions[-1] if versions else "<version>"


def postgres_hint() -> str:
    return (
        "start it with `pg_ctlcluster --skip-systemctl-redirect "
        f"{_pg_cluster_version()} main start` (see `pg_lsclusters`), "
        f"or set {POSTGRES_DSN_ENV} to a reachable server"
    )


def rabbitmq_hint(url: str) -> str:
    port = _port(url, 5672)
    start = "rabbitmq-server -detached"
    if port != 5672:
        # A second node needs its own name and listener. A rabbitmq.conf that sets
        # listeners (this machine's names 5672) wins over RABBITMQ_NODE_PORT, which still
        # moves the distribution port (port + 20000) off the first node's.
        conf = f"/tmp/rabbitmq-{port}.conf"
        start = (
            f"printf 'listeners.tcp.local = 127.0.0.1:{port}\\n' > {conf} && "
            f"RABBITMQ_CONFIG_FILE={conf} RABBITMQ_NODE_PORT={port} "
            f"RABBITMQ_NODENAME=rabbit-{port}@localhost {start}"
        )
    return f"start it with `{start}`, or set {RABBITMQ_URL_ENV} to a reachable server"


def nats_hint(url: str) -> str:
    port = _port(url, 4222)
    daemon, files = "", "-sd /var/lib/nats-server -l /var/log/nats-server.log"
    if port != 4222:
        # start-stop-daemon matches by executable: beside a server on 4222 it would say
        # "already running" and start nothing. A pidfile of its own tells them apart, and
        # a store of its own keeps the two JetStreams apart.
        daemon = f"--make-pidfile --pidfile /run/nats-server-{port}.pid "
        files = f"-sd /var/lib/nats-server-{port} -l /var/log/nats-server-{port}.log"
    return (
        f"start it with `start-stop-daemon --start --oknodo --background {daemon}"
        f"--exec /usr/sbin/nats-server -- -a 127.0.0.1 -p {port} -js {files}`, "
        f"or set {NATS_URL_ENV} to a reachable server"
    )


def require_service(name: str, check: Callable[[], object], *, hint: str = "") -> None:
    """Skip the current test (fail it under CI) unless ``check()`` runs without raising.

    ``check`` is called at most once per ``name`` per session; later calls reuse its result.
    """
    if name not in _probe_cache:
        try:
            check()
        except Exception as exc:
            _probe_cache[name] = f"{type(exc).__name__}: {exc}"
        else:
            _probe_cache[name] = None
    error = _probe_cache[name]
    if error is None:
        return
    reason = f"{name} is not reachable ({error})"
    if hint:
        reason += f"; {hint}"
    if in_ci():
        pytest.fail(f"{reason} [CI is set, so a missing service is a failure]", pytrace=False)
    pytest.skip(reason)


def _no_retry() -> Retry:
    # redis-py retries connection errors by default, which would stretch a probe to seconds.
    return Retry(NoBackoff(), 0)


def _check_redis(url: str) -> None:
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=PROBE_TIMEOUT,
        socket_timeout=PROBE_TIMEOUT,
        retry=_no_retry(),
    )
    try:
        client.ping()
    finally:
        client.close()


def _check_postgres(dsn: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "")
    port = str(params.get("port") or "5432")
    # libpq rounds connect_timeout up to 2 s; a bare TCP connect bounds a dead host at 1 s.
    if host and not host.startswith("/") and "," not in host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT).close()
    with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
        conn.execute("SELECT 1")


# --- Redis -----------------------------------------------------------------------------


def new_redis_prefix() -> str:
    """A key prefix no other test (or run) uses, e.g. ``rstest:1a2b3c4d5e6f:``."""
    return f"{REDIS_PREFIX_ROOT}{uuid.uuid4().hex[:12]}:"


def _glob_escape(text: str) -> str:
    # SCAN MATCH is a glob: a prefix must match itself literally.
    return "".join(f"\\{ch}" if ch in "\\*?[]" else ch for ch in text)


def delete_prefixed_keys(client: redis.Redis, prefix: str, *, batch: int = 500) -> int:
    """Delete every key starting with ``prefix`` (SCAN + UNLINK); return how many."""
    if not prefix:
        raise ValueError("refusing to delete with an empty prefix (that is every key)")
    deleted = 0
    keys: list[bytes | str] = []
    for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            deleted += int(client.unlink(*keys))
            keys.clear()
    if keys:
        deleted += int(client.unlink(*keys))
    return deleted


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis URL to test against; skips (fails under CI) when Redis is unreachable."""
    url = redis_url_from_env()
    require_service(f"Redis at {_redact(url)}", lambda: _check_redis(url), hint=redis_hint(url))
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = new_redis_prefix()
    yield prefix
    client = redis.Redis.from_url(redis_url, retry=_no_retry())
    try:
        delete_prefixed_keys(client, prefix)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def require_asyncio(anyio_backend_name: str) -> None:
    """Skip the test unless it runs on the asyncio backend (for asyncio-only libraries)."""
    # A sync fixture, so the skip happens before any trio runner starts.
    if anyio_backend_name != "asyncio":
        pytest.skip(
            f"needs the asyncio backend (e.g. redis.asyncio runs only on asyncio), "
            f"not {anyio_backend_name}"
        )


@pytest.fixture
async def aredis_client(
    require_asyncio: None, redis_url: str
) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio Redis client; on the trio backend the test is skipped."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# --- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The PostgreSQL DSN to test against; skips (fails under CI) when it is unreachable."""
    dsn = postgres_dsn_from_env()
    require_service(
        f"PostgreSQL at {_redact(dsn)}", lambda: _check_postgres(dsn), hint=postgres_hint()
    )
    return dsn


def create_schema(dsn: str) -> str:
    """Create a schema with a fresh ``rstest_<hex>`` name and return the name."""
    import psycopg
    from psycopg import sql

    name = f"{PG_SCHEMA_ROOT}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return name


def drop_schema(dsn: str, name: str) -> None:
    """Drop the schema and everything in it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        # A connection a test leaked open would block the DROP forever; fail instead.
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A schema of this test's own, dropped with CASCADE afterwards."""
    name = create_schema(postgres_dsn)
    try:
        yield name
    finally:
        drop_schema(postgres_dsn, name)


@pytest.fixture
def pg_conn(postgres_dsn: str, pg_schema: str) -> Iterator[psycopg.Connection[TupleRow]]:
    """A connection (autocommit off) whose ``search_path`` is ``pg_schema``."""
    import psycopg
    from psycopg import sql

    conn = psycopg.connect(postgres_dsn, autocommit=False)
    try:
        # SET, not an `options` parameter, so options already in the DSN survive.
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        conn.commit()
        yield conn
    finally:
        conn.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the shared Redis, for outage tests (cut, blackhole, delay)."""
    target = urlsplit(redis_url)
    if target.scheme != "redis" or target.hostname is None:
        pytest.skip(f"FaultProxy needs a plain TCP Redis URL, not {target.scheme}://")
    with FaultProxy(target.hostname, target.port or 6379) as p:
        yield p


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test module's own: SCRIPT FLUSH, CLIENT KILL, MONITOR and
    CONFIG are fine there, never on the shared one."""
    from support.redis_servers import RedisServer  # it imports this module: import late

    with RedisServer.start(tmp_path_factory.mktemp("redis")) as server:
        yield server
