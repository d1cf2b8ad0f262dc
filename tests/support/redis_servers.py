"""Throwaway ``redis-server`` processes for tests that must not touch the shared Redis.

Anything destructive (SCRIPT FLUSH, CLUSTER commands, a Redis Cluster) runs here, on free
loopback ports, in a temporary directory, with persistence off::

    with RedisServer.start(tmp_path) as server:
        client = redis.Redis(port=server.port)

    with RedisCluster3.start(tmp_path) as cluster:
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])

:func:`require_redis_binaries` skips a test when ``redis-server``/``redis-cli`` are not on
PATH, and fails it under ``CI=true`` (like an unreachable service in ``support.services``).
Every process started here is killed by ``stop()`` / on leaving the ``with`` block.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from support.services import in_ci

__all__ = [
    "RedisCluster3",
    "RedisServer",
    "free_port",
    "require_redis_binaries",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
"""Seconds a server (or a cluster) may take to become ready."""

_BUS_OFFSET = 10_000  # a cluster node's bus listens on port + 10000


def require_redis_binaries(*names: str) -> dict[str, str]:
    """Paths of the named binaries; skip (fail under CI) when one is not on PATH."""
    found = {name: shutil.which(name) for name in names}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        reason = (
            f"{' and '.join(missing)} not on PATH; install Redis "
            "(e.g. `apt-get install redis-server` or `brew install redis`)"
        )
        if in_ci():
            pytest.fail(f"{reason} [CI is set, so a missing tool is a failure]", pytrace=False)
        pytest.skip(reason)
    return {name: path for name, path in found.items() if path is not None}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port that is free right now (and, ``with_bus``, so is port + 10000).

    Redis refuses ``--port 0``, so the port is picked by binding to port 0 and closing.
    Another process may take it before redis-server binds; callers retry on that.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not with_bus:
            return port
        if port + _BUS_OFFSET <= 65535 and _port_free(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free loopback port (with a free bus port) found")


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class RedisServer:
    """One ``redis-server`` process on a free loopback port, persistence off."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], workdir: Path) -> None:
        self.port = port
        self.process = process
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @classmethod
    def start(
        cls, workdir: Path, *extra_args: str, cluster: bool = False, attempts: int = 5
    ) -> RedisServer:
        """Start a server in ``workdir`` (created if needed) and wait until it answers PING.

        ``cluster=True`` enables cluster mode, with its config file in ``workdir``.
        """
        binary = require_redis_binaries("redis-server")["redis-server"]
        error: Exception | None = None
        for _ in range(attempts):
            port = free_port(with_bus=cluster)
            node_dir = workdir / f"redis-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [
                binary,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(node_dir),
                "--logfile",
                str(node_dir / "redis.log"),
            ]
            if cluster:
                args += [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ]
            args += list(extra_args)
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            server = cls(port, process, node_dir)
            try:
                server._wait_ready()
            except Exception as exc:  # e.g. the port was taken between pick and bind
                server.stop()
                error = exc
                continue
            return server
        raise RuntimeError(f"redis-server did not start after {attempts} attempts") from error

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with _client(self.port) as client:
            while True:
                if self.process.poll() is not None:
                    log = self.workdir / "redis.log"
                    text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with "
                        f"{self.process.returncode}: {text}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.01)

    def client(self) -> redis.Redis:
        """A client (strings decoded, no retries) for administration."""
        return _client(self.port)

    def stop(self) -> None:
        """Kill the process (it holds nothing worth saving) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisCluster3:
    """A Redis Cluster of three primaries (no replicas), each a :class:`RedisServer`."""

    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @classmethod
    def start(cls, workdir: Path, size: int = 3) -> RedisCluster3:
        """Start ``size`` nodes, join them with ``redis-cli --cluster create``, wait for ok."""
        cli = require_redis_binaries("redis-server", "redis-cli")["redis-cli"]
        nodes: list[RedisServer] = []
        try:
            for _ in range(size):
                nodes.append(RedisServer.start(workdir, cluster=True))
            cluster = cls(nodes)
            created = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"{HOST}:{port}" for port in cluster.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({created.returncode}): "
                    f"{created.stdout[-2000:]} {created.stderr[-2000:]}"
                )
            cluster._wait_ok()
        except BaseException:
            for node in nodes:
                node.stop()
            raise
        return cluster

    def _wait_ok(self) -> None:
        """Until every node says ``cluster_state:ok`` and knows every node and slot."""
        deadline = time.monotonic() + START_TIMEOUT
        clients = [node.client() for node in self.nodes]
        try:
            while True:
                infos = [c.cluster("INFO") for c in clients]
                if all(self._ready(info) for info in infos):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ready: {infos}")
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()

    def _ready(self, info: object) -> bool:
        if isinstance(info, dict):
            fields = {str(k): str(v) for k, v in info.items()}
        else:
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_assigned") == "16384"
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def node_of(self, slot: int) -> RedisServer:
        """The node that serves ``slot`` now (as the first node sees it)."""
        with self.nodes[0].client() as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, target: RedisServer) -> None:
        """Move ``slot`` and its keys to ``target``, the way ``redis-cli --cluster reshard``
        does (IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE), and wait until every node
        agrees. The source then unsubscribes the slot's shard channels."""
        source = self.node_of(slot)
        if source is target:
            return
        # Any: redis-py's execute_command has no annotations.
        clients: dict[int, Any] = {node.port: node.client() for node in self.nodes}
        try:
            ids = {port: str(c.execute_command("CLUSTER MYID")) for port, c in clients.items()}
            src, dst = clients[source.port], clients[target.port]
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.port])
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port])
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
            others = [port for port in clients if port not in (target.port, source.port)]
            for port in (target.port, source.port, *others):
                clients[port].execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port])
            deadline = time.monotonic() + START_TIMEOUT
            while not all(self._serves(c, slot, target.port) for c in clients.values()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the nodes do not agree that {target.port} has {slot}")
                time.sleep(0.05)
        finally:
            for c in clients.values():
                c.close()

    @staticmethod
    def _serves(client: Any, slot: int, port: int) -> bool:
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1]) == port
        return False

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster3:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
