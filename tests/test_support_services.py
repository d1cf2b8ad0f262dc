"""The test infrastructure itself, against the real servers: fixtures, cleanup, FaultProxy."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import services
from support.faultproxy import FaultProxy, ProxyStats

from resilience.testing import FakeClock

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow


def _client(url: str, timeout: float = 1.0) -> redis.Redis:
    # No retries: redis-py's default would retry a dead connection for seconds.
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def _proxy_threads(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"FaultProxy:{port}->")]


# --- plain fixtures --------------------------------------------------------------------


def test_clock_is_a_fresh_fake_clock(clock: FakeClock) -> None:
    assert clock.monotonic() == 0.0
    assert clock.advance(1.5) == 1.5
    assert clock.monotonic() == 1.5


@pytest.mark.anyio
async def test_anyio_backend_runs_each_backend(anyio_backend: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = "trio"
    else:
        running = "asyncio"
    assert running == anyio_backend


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), (" True ", True), ("1", True), ("", False), ("0", False)],
)
def test_in_ci(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert services.in_ci() is expected


def test_require_service_skips_outside_ci_and_probes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        raise ConnectionRefusedError("nobody home")

    name = f"svc-{uuid.uuid4().hex}"
    for _ in range(2):
        with pytest.raises(pytest.skip.Exception, match=r"nobody home.*run `start-it`"):
            services.require_service(name, check, hint="run `start-it`")
    assert calls == [1]


def test_require_service_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")

    def check() -> None:
        raise TimeoutError("no answer")

    with pytest.raises(pytest.fail.Exception, match="no answer"):
        services.require_service(f"svc-{uuid.uuid4().hex}", check)


def test_require_service_passes_when_reachable() -> None:
    services.require_service(f"svc-{uuid.uuid4().hex}", lambda: None)


def test_hints_say_how_to_start_the_servers() -> None:
    redis_hint = services.redis_hint("redis://127.0.0.1:6390/0")
    assert 'redis-server --daemonize yes --port 6390 --save "" --appendonly no' in redis_hint
    assert services.REDIS_URL_ENV in redis_hint
    pg_hint = services.postgres_hint()
    assert re.search(r"pg_ctlcluster --skip-systemctl-redirect \S+ main start", pg_hint)
    assert services.POSTGRES_DSN_ENV in pg_hint


def test_nats_hint_starts_a_server_on_the_urls_port() -> None:
    default = services.nats_hint("nats://127.0.0.1:4222")
    assert (
        "`start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
        "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log`"
    ) in default
    assert services.NATS_URL_ENV in default
    assert services.nats_hint("nats://127.0.0.1") == default  # no port: the default one

    other = services.nats_hint("nats://127.0.0.1:4223")
    assert "-p 4223 -js" in other
    assert "4222" not in other
    # Its own pidfile and store: matched by executable alone, start-stop-daemon would
    # take the server on 4222 for it and start nothing.
    assert "--make-pidfile --pidfile /run/nats-server-4223.pid" in other
    assert "-sd /var/lib/nats-server-4223 " in other


def test_rabbitmq_hint_starts_a_node_on_the_urls_port() -> None:
    default = services.rabbitmq_hint("amqp://guest:guest@127.0.0.1:5672/")
    assert "start it with `rabbitmq-server -detached`" in default
    assert services.RABBITMQ_URL_ENV in default
    assert services.rabbitmq_hint("amqp://guest:guest@127.0.0.1/") == default

    other = services.rabbitmq_hint("amqp://guest:guest@127.0.0.1:5673/")
    assert "listeners.tcp.local = 127.0.0.1:5673" in other
    assert "RABBITMQ_NODE_PORT=5673 RABBITMQ_NODENAME=rabbit-5673@localhost" in other
    assert "5672" not in other


@pytest.mark.parametrize("hint", [services.redis_hint, services.rabbitmq_hint, services.nats_hint])
def test_hints_survive_a_bad_port(hint: Callable[[str], str]) -> None:
    assert "set RESILIENCE_" in hint("scheme://127.0.0.1:notaport/")


def test_redact_hides_passwords() -> None:
    assert services._redact("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert services._redact("redis://h:1/0") == "redis://h:1/0"


# --- Redis -----------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_prefix_is_unique(redis_prefix: str) -> None:
    assert re.fullmatch(r"rstest:[0-9a-f]{12}:", redis_prefix)
    assert services.new_redis_prefix() != services.new_redis_prefix()


@pytest.mark.redis
def test_delete_prefixed_keys_deletes_only_that_prefix(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    other = services.new_redis_prefix()
    try:
        redis_client.set(f"{redis_prefix}a", 1)
        redis_client.hset(f"{redis_prefix}b:c", "f", 1)
        redis_client.set(f"{other}a", 1)
        # Batches: more keys than one SCAN/UNLINK round.
        redis_client.mset({f"{redis_prefix}n{i}": i for i in range(1200)})

        assert services.delete_prefixed_keys(redis_client, redis_prefix, batch=500) == 1202
        assert list(redis_client.scan_iter(match=f"{redis_prefix}*")) == []
        assert redis_client.exists(f"{other}a") == 1
    finally:
        services.delete_prefixed_keys(redis_client, other)
    assert redis_client.exists(f"{other}a") == 0


@pytest.mark.redis
def test_delete_prefixed_keys_matches_glob_characters_literally(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    globby = f"{redis_prefix}g[1]*?\\"
    redis_client.set(f"{globby}k", 1)
    # Matched by the unescaped pattern `g[1]*?\*`, so it shows the escaping works.
    redis_client.set(f"{redis_prefix}g1zz\\k", 1)
    assert services.delete_prefixed_keys(redis_client, globby) == 1
    assert redis_client.exists(f"{redis_prefix}g1zz\\k") == 1


def test_delete_prefixed_keys_refuses_empty_prefix() -> None:
    with redis.Redis() as client, pytest.raises(ValueError, match="empty prefix"):
        services.delete_prefixed_keys(client, "")  # fails before any I/O


@pytest.mark.redis
@pytest.mark.anyio
async def test_aredis_client_works_on_asyncio(
    aredis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    await aredis_client.set(f"{redis_prefix}k", b"v")
    assert await aredis_client.get(f"{redis_prefix}k") == b"v"


# --- PostgreSQL ------------------------------------------------------------------------


@pytest.mark.postgres
def test_pg_schema_isolates_tables(
    pg_conn: psycopg.Connection[TupleRow], pg_schema: str, postgres_dsn: str
) -> None:
    import psycopg

    assert re.fullmatch(r"rstest_[0-9a-f]{12}", pg_schema)
    table = f"probe_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f"CREATE TABLE {table} (id int)")
    pg_conn.commit()
    row = pg_conn.execute("SELECT current_schema()").fetchone()
    assert row == (pg_schema,)

    with psycopg.connect(postgres_dsn, autocommit=True) as other:
        found = other.execute(
            "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
            (f"{pg_schema}.{table}", f"public.{table}"),
        ).fetchone()
    assert found == (True, False)


@pytest.mark.postgres
def test_drop_schema_removes_it_and_its_tables(postgres_dsn: str) -> None:
    import psycopg

    name = services.create_schema(postgres_dsn)
    try:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {name}.t (id int)")
    finally:
        services.drop_schema(postgres_dsn, name)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,))
        assert row.fetchone() == (0,)


# --- FaultProxy ------------------------------------------------------------------------


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    target = urlsplit(redis_url)
    if target.scheme not in {"redis", "rediss"} or target.hostname is None:
        pytest.skip(f"FaultProxy needs a TCP Redis URL, not {target.scheme}://")
    with FaultProxy(target.hostname, target.port or 6379) as proxy:
        yield proxy


def test_url_for_keeps_everything_but_host_and_port() -> None:
    with FaultProxy("127.0.0.1", 9) as proxy:
        port = proxy.port
        assert proxy.url_for("redis://u:p@db.example:6379/2?x=1") == (
            f"redis://u:p@127.0.0.1:{port}/2?x=1"
        )
        assert proxy.url_for("postgresql://postgres@127.0.0.1:5432/postgres") == (
            f"postgresql://postgres@127.0.0.1:{port}/postgres"
        )


def test_unreachable_target_resets_clients() -> None:
    # Port 9 (discard) is closed on loopback: the target is down, the proxy is not.
    with FaultProxy("127.0.0.1", 9) as proxy, _client(f"redis://{proxy.host}:{proxy.port}") as c:
        with pytest.raises(redis.ConnectionError):
            c.ping()
        assert proxy.stats.upstream_failures == 1
        assert proxy.stats.upstream_connects == 0


@pytest.mark.redis
def test_proxy_forwards_and_counts(redis_proxy: FaultProxy, redis_url: str) -> None:
    url = redis_proxy.url_for(redis_url)
    with _client(url) as a, _client(url) as b:
        assert a.ping()
        assert b.ping()
        stats = redis_proxy.stats
        assert (stats.accepted, stats.upstream_connects, stats.active) == (2, 2, 2)
        assert stats.bytes_up > 0
        assert stats.bytes_down > 0
    redis_proxy.reset_stats()
    assert redis_proxy.stats == ProxyStats(active=redis_proxy.stats.active)


@pytest.mark.redis
def test_proxy_carries_large_values(
    redis_proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    # Bigger than the proxy's buffer limit, so back-pressure is exercised.
    value = bytes(range(256)) * (12 * 1024)
    with _client(redis_proxy.url_for(redis_url)) as client:
        client.set(f"{redis_prefix}big", value)
        assert client.get(f"{redis_prefix}big") == value
    assert redis_proxy.stats.bytes_up > len(value)
    assert redis_proxy.stats.bytes_down > len(value)


@pytest.mark.redis
def test_cut_fails_fast_then_restore_recovers(redis_proxy: FaultProxy, redis_url: str) -> None:
    url = redis_proxy.url_for(redis_url)
    with _client(url) as old:
        assert old.ping()
        redis_proxy.cut()
        assert redis_proxy.stats.active == 0

        with _client(url) as new:
            start = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                new.ping()
            assert time.monotonic() - start < 1.0
        with pytest.raises(redis.ConnectionError):
            old.ping()  # its connection was reset
        assert redis_proxy.stats.accepted == 1  # refused connections never reach the proxy

        redis_proxy.restore()
        assert old.ping()
    assert redis_proxy.stats.upstream_connects == 2


@pytest.mark.redis
def test_cut_without_refusing_resets_new_connections(
    redis_proxy: FaultProxy, redis_url: str
) -> None:
    redis_proxy.cut(refuse=False)
    with _client(redis_proxy.url_for(redis_url)) as client:
        start = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert time.monotonic() - start < 1.0
    assert redis_proxy.stats.rejected >= 1
    assert redis_proxy.stats.upstream_connects == 0


@pytest.mark.redis
def test_blackhole_times_out_then_restore_recovers(redis_proxy: FaultProxy, redis_url: str) -> None:
    url = redis_proxy.url_for(redis_url)
    redis_proxy.blackhole()
    with _client(url, timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 1.0
    stats = redis_proxy.stats
    assert stats.accepted == 1
    assert (stats.upstream_connects, stats.bytes_up, stats.bytes_down) == (0, 0, 0)

    redis_proxy.restore()
    with _client(url) as client:
        assert client.ping()


@pytest.mark.redis
def test_delay_adds_latency_each_way(redis_proxy: FaultProxy, redis_url: str) -> None:
    with _client(redis_proxy.url_for(redis_url)) as client:
        assert client.ping()  # connect (and handshake) before the delay
        redis_proxy.delay(0.2)
        start = time.monotonic()
        assert client.ping()
        assert time.monotonic() - start >= 0.4  # 0.2 s there, 0.2 s back
        redis_proxy.delay(0)
        start = time.monotonic()
        assert client.ping()
        assert time.monotonic() - start < 0.2


def test_delay_rejects_bad_values() -> None:
    with FaultProxy("127.0.0.1", 9) as proxy:
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="finite number"):
                proxy.delay(bad)


@pytest.mark.redis
def test_close_is_prompt_and_leaves_nothing_open(redis_url: str) -> None:
    target = urlsplit(redis_url)
    assert target.hostname is not None
    proxy = FaultProxy(target.hostname, target.port or 6379).start()
    port = proxy.port
    with _client(proxy.url_for(redis_url)) as client, socket.socket() as raw:
        assert client.ping()
        proxy.delay(1.0)
        raw.connect(proxy.address)
        raw.sendall(b"PING\r\n")  # a chunk in flight must not hold close() up
        start = time.monotonic()
        proxy.close()
        assert time.monotonic() - start < 0.5
        assert _proxy_threads(port) == []
        with pytest.raises(redis.ConnectionError):
            client.ping()
    proxy.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(RuntimeError, match="not running"):
        proxy.restore()


@pytest.mark.postgres
def test_proxy_in_front_of_postgres(postgres_dsn: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(postgres_dsn)
    host = str(params.get("host") or "")
    if not host or host.startswith("/"):
        pytest.skip("FaultProxy needs a TCP PostgreSQL DSN")
    with FaultProxy(host, int(params.get("port") or 5432)) as proxy:
        dsn = make_conninfo(postgres_dsn, host=proxy.host, port=str(proxy.port))
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert proxy.stats.upstream_connects == 1
