"""A real uvicorn server on a free loopback port, run in a background thread.

End-to-end tests of ASGI apps talk to it over real sockets with a real HTTP client::

    with UvicornServer(app) as server:
        with httpx.Client(base_url=server.url) as client:
            client.get("/")

The listening socket is bound before the thread starts (port 0: the kernel picks a free
port), so ``server.port`` is known at once and no other process can take it meanwhile.
``start()`` returns once uvicorn has run the lifespan startup and accepts connections;
``stop()`` asks it to exit (``should_exit``), which runs the lifespan shutdown, and
joins the thread. Coroutines that must run on the server's event loop (closing a
``redis.asyncio`` client the app used, say) go through :meth:`UvicornServer.call`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import pytest
import uvicorn

__all__ = ["UvicornServer", "running", "serve", "stop_all"]

T = TypeVar("T")

START_TIMEOUT = 10.0
"""Seconds uvicorn may take to start (lifespan startup included)."""
STOP_TIMEOUT = 10.0
"""Seconds uvicorn may take to stop (graceful shutdown plus lifespan shutdown)."""


class UvicornServer:
    """Serves ``app`` with uvicorn on ``host`` (loopback) in a daemon thread.

    Extra keyword arguments go to :class:`uvicorn.Config` (``log_level`` defaults to
    ``"warning"``, ``lifespan`` to ``"on"``). uvicorn's own logging set-up is skipped
    (``log_config=None``) so its records reach pytest's log capture.

    ``proxy_headers`` defaults to False, unlike uvicorn: uvicorn trusts
    ``X-Forwarded-For`` from 127.0.0.1 by default and would rewrite ``scope["client"]``
    before the app sees it, and a test client on loopback is exactly 127.0.0.1.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        **config: Any,
    ) -> None:
        config.setdefault("log_level", "warning")
        config.setdefault("lifespan", "on")
        config.setdefault("log_config", None)
        config.setdefault("timeout_graceful_shutdown", 5)
        config.setdefault("proxy_headers", False)
        self.host = host
        self._requested_port = port
        self.unix_path = unix_path  # serve on this Unix socket instead of TCP
        self.config = uvicorn.Config(app, host=host, port=port, **config)
        self.server = uvicorn.Server(self.config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._port: int | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``, for ``httpx.Client(base_url=...)``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def start(self) -> UvicornServer:
        if self._thread is not None:
            raise RuntimeError("a UvicornServer can be started only once")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only
            # when the proto says TCP. Without it, Nagle holds each response body ~40 ms
            # behind its headers on keep-alive connections.
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            if self.unix_path is not None:
                sock.bind(self.unix_path)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self._requested_port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._port = 0 if self.unix_path is not None else int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name=f"uvicorn:{self._port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self._thread.is_alive():
                self._cleanup_socket()
                raise RuntimeError("uvicorn exited during startup") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT} s")
            time.sleep(0.005)
        return self

    def request_stop(self) -> None:
        """Ask uvicorn to exit without waiting (see :func:`stop_all`)."""
        self.server.should_exit = True

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for it. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self.server.should_exit = True
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            self.server.force_exit = True
            thread.join(STOP_TIMEOUT)
            raise RuntimeError(f"uvicorn did not stop within {STOP_TIMEOUT} s")
        self._cleanup_socket()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("uvicorn's thread failed") from error

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
        """Run ``fn()`` on the server's event loop and return its result."""
        loop = self.loop
        if loop is None or not loop.is_running():
            raise RuntimeError("the server's event loop is not running")

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def __enter__(self) -> UvicornServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"UvicornServer({self.host}:{self._port}, started={self.server.started})"

    # -- the server thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except SystemExit as exit_:  # uvicorn exits when the lifespan startup fails
            self._error = exit_
        except BaseException as error:
            self._error = error

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        assert self._sock is not None
        await self.server.serve(sockets=[self._sock])

    def _cleanup_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def stop_all(servers: Iterable[UvicornServer]) -> None:
    """Stop several servers at once (each takes ~0.1 s to notice and shut down), then
    wait for each; the first error is raised after all were stopped."""
    servers = list(servers)
    for server in servers:
        server.request_stop()
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop()
        except BaseException as error:
            errors.append(error)
    if errors:
        raise errors[0]


@contextmanager
def running(app: Any, **config: Any) -> Iterator[UvicornServer]:
    """``with running(app) as server:`` — a started server, stopped on exit."""
    server = UvicornServer(app, **config).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., UvicornServer]]:
    """``serve(app, **uvicorn_config)``: a started server, stopped at teardown."""
    servers: list[UvicornServer] = []

    def start(app: Any, **config: Any) -> UvicornServer:
        server = UvicornServer(app, **config).start()
        servers.append(server)
        return server

    yield start
    stop_all(servers)
