"""A TCP proxy that puts network faults between a client and a real server.

Outage tests put a :class:`FaultProxy` in front of Redis or PostgreSQL, point the client
at ``proxy.url_for(url)`` and then break the network on purpose::

    with FaultProxy("127.0.0.1", 6379) as proxy:
        client = redis.Redis.from_url(proxy.url_for(url), socket_timeout=1)
        proxy.cut()        # connections reset, new ones refused
        proxy.blackhole()  # connections accepted, nothing passes: clients time out
        proxy.delay(0.2)   # 0.2 s more latency on each chunk, each way
        proxy.restore()    # healthy again

Control calls return once the proxy has switched, so a test can act right after them.
One daemon thread runs a selector loop; it does all socket I/O and never sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import math
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyStats"]

_CHUNK = 64 * 1024
_HIGH_WATER = 1024 * 1024  # stop reading a side while this much waits for the other side
_CONTROL_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0
_CONNECTING = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN}

_Mode = Literal["normal", "cut", "blackhole"]
_LISTENER = "listener"
_WAKE = "wake"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start (or :meth:`FaultProxy.reset_stats`).

    Bytes are counted before the receiver can see them, and resets before the client
    can see them; ``accepted`` lags a client's ``connect()``, which the kernel completes
    before the proxy accepts.
    """

    accepted: int = 0
    """Client connections the proxy accepted (those refused during ``cut()`` are not)."""
    rejected: int = 0
    """Client connections accepted and reset at once, during ``cut(refuse=False)``."""
    upstream_connects: int = 0
    """Connections the proxy opened to the target: how often the backend was contacted."""
    upstream_failures: int = 0
    """Connections to the target that failed (the target itself is down)."""
    bytes_up: int = 0
    """Bytes delivered from clients to the target."""
    bytes_down: int = 0
    """Bytes delivered from the target to clients."""
    active: int = 0
    """Client connections open now."""


class _Pipe:
    """One direction of a connection: bytes read from one socket, waiting for the other."""

    __slots__ = ("eof", "last_due", "outbuf", "pending", "queued", "shut")

    def __init__(self) -> None:
        self.pending: deque[tuple[float, bytes]] = deque()  # (due time, chunk), in order
        self.outbuf = bytearray()  # due, not yet accepted by the destination
        self.queued = 0  # bytes in pending + outbuf
        self.last_due = 0.0
        self.eof = False  # the source sent FIN
        self.shut = False  # the FIN was passed on to the destination

    def push(self, chunk: bytes, due: float) -> None:
        # Never before an earlier chunk: delay(0) after delay(1) must not reorder bytes.
        self.last_due = max(due, self.last_due)
        self.pending.append((self.last_due, chunk))
        self.queued += len(chunk)

    def release(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            self.outbuf += self.pending.popleft()[1]


class _Conn:
    __slots__ = ("client", "closed", "connecting", "down", "masks", "up", "upstream")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.up = _Pipe()  # client -> target
        self.down = _Pipe()  # target -> client
        self.masks: dict[socket.socket, int] = {}  # events registered with the selector
        self.closed = False


class _Command:
    __slots__ = ("done", "error", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.error: BaseException | None = None


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN, as a crashed host or a firewall reset would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FaultProxy:
    """Forwards TCP connections from a free loopback port to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self._port: int | None = None
        self._mode: _Mode = "normal"
        self._delay = 0.0
        self._listen_info: tuple[socket.AddressFamily, tuple[Any, ...]] | None = None
        self._target_info: tuple[socket.AddressFamily, tuple[Any, ...]] | None = None
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        # Guards _commands, _stopping, _wake_w and _counts (the only state shared with callers).
        self._lock = threading.Lock()
        self._commands: deque[_Command] = deque()
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        self._counts: dict[str, int] = {f.name: 0 for f in fields(ProxyStats)}

    # --- public API --------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's; user, path, query kept."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{self.port}"))

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._counts)

    def reset_stats(self) -> None:
        """Zero every counter except ``active``."""
        with self._lock:
            for key in self._counts:
                if key != "active":
                    self._counts[key] = 0

    @property
    def mode(self) -> str:
        """``"normal"``, ``"cut"`` or ``"blackhole"``."""
        return self._mode

    def start(self) -> FaultProxy:
        if self._thread is not None or self._closed:
            raise RuntimeError("a FaultProxy can be started only once")
        try:
            self._target_info = self._resolve(self.target_host, self.target_port)
            self._listen_info = self._resolve(self.host, 0)
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
            self._open_listener()
            self._thread = threading.Thread(
                target=self._run,
                name=f"FaultProxy:{self._port}->{self.target_host}:{self.target_port}",
                daemon=True,
            )
            self._thread.start()
        except BaseException:
            self._closed = True
            self._release_all()
            raise
        return self

    def cut(self, *, refuse: bool = True) -> None:
        """Reset every open connection; refuse new ones (or, with ``refuse=False``,
        accept and reset them at once) until :meth:`restore`."""

        def run() -> None:
            self._mode = "cut"
            for conn in list(self._conns):
                self._close_conn(conn, abort=True)
            if refuse:
                self._close_listener()
            else:
                self._open_listener()

        self._call(run)

    def blackhole(self) -> None:
        """Accept connections but pass nothing either way until :meth:`restore`.

        Bytes sent meanwhile wait (as TCP would retransmit them) and flow after restore.
        """

        def run() -> None:
            self._open_listener()
            self._mode = "blackhole"

        self._call(run)

    def delay(self, seconds: float) -> None:
        """Hold each chunk ``seconds`` before passing it on (both ways); 0 turns it off."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")

        def run() -> None:
            self._delay = float(seconds)

        self._call(run)

    def restore(self) -> None:
        """Back to plain forwarding (a delay set with :meth:`delay` stays)."""

        def run() -> None:
            self._open_listener()
            self._mode = "normal"
            for conn in list(self._conns):
                if conn.upstream is None:  # accepted during blackhole()
                    self._connect_upstream(conn)

        self._call(run)

    def close(self) -> None:
        """Stop the thread and close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            with self._lock:
                self._stopping = True
                self._wake_locked()
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not stop within {_JOIN_TIMEOUT} s")
        self._release_all()
        if self._error is not None:
            raise RuntimeError("the FaultProxy loop crashed") from self._error

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.host}:{self._port} -> {self.target_host}:{self.target_port}, "
            f"mode={self._mode}, delay={self._delay})"
        )

    # --- caller side -------------------------------------------------------------------

    @staticmethod
    def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return family, tuple(sockaddr)

    def _wake_locked(self) -> None:
        if self._wake_w is None:
            return
        # A full buffer already holds enough wake-ups.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self._wake_w.send(b"\0")

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait for it, so sockets have one owner."""
        command = _Command(fn)
        with self._lock:
            if self._thread is None or self._stopping:
                raise RuntimeError("FaultProxy is not running")
            self._commands.append(command)
            self._wake_locked()
        if not command.done.wait(_CONTROL_TIMEOUT):
            raise RuntimeError("FaultProxy loop did not answer")
        if command.error is not None:
            raise command.error

    def _release_all(self) -> None:
        # Only after the thread is gone (or never ran): nobody else touches these now.
        for conn in list(self._conns):
            self._close_conn(conn)
        self._close_listener()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        with self._lock:
            self._wake_w = None
        self._wake_r = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None

    # --- loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                for key, mask in self._sel.select(self._timeout()):
                    self._on_event(key, mask)
                self._run_commands()
                self._pump()
        except BaseException as exc:
            # Kept for close() to raise in the test's thread, not printed from this one.
            self._error = exc
        finally:
            with self._lock:
                self._stopping = True
                failed = list(self._commands)
                self._commands.clear()
            for command in failed:
                command.error = RuntimeError("FaultProxy closed")
                command.done.set()
            try:
                for conn in list(self._conns):
                    self._close_conn(conn)
                self._close_listener()
            except Exception as exc:
                self._error = self._error or exc

    def _timeout(self) -> float | None:
        if self._mode != "normal":
            return None
        # Only connections that can deliver: a chunk waiting on a connect must not spin us.
        due = [
            p.pending[0][0]
            for c in self._conns
            if c.upstream is not None and not c.connecting
            for p in (c.up, c.down)
            if p.pending
        ]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                command.fn()
            except Exception as exc:
                command.error = exc
            finally:
                command.done.set()

    def _on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == _WAKE:
            assert self._wake_r is not None
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            return
        if key.data == _LISTENER:
            if key.fileobj is self._listener:  # not one closed earlier in this round
                self._accept()
            return
        conn: _Conn = key.data
        if conn.closed:
            return
        sock = key.fileobj
        if sock is conn.upstream and conn.connecting:
            if mask & selectors.EVENT_WRITE:
                self._finish_connect(conn)
            return
        if mask & selectors.EVENT_READ and self._mode == "normal":
            assert isinstance(sock, socket.socket)
            self._read(conn, sock)

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:
                return  # e.g. out of file descriptors: try again on the next round
            if self._mode == "cut":
                self._count("rejected")  # counted first: the client may look once reset
                _abort(sock)
                continue
            sock.setblocking(False)
            _nodelay(sock)
            conn = _Conn(sock)
            self._conns.add(conn)
            self._count("accepted")
            self._count("active")
            if self._mode == "normal":
                self._connect_upstream(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        assert self._target_info is not None
        family, sockaddr = self._target_info
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in _CONNECTING:
            sock.close()
            self._count("upstream_failures")
            self._close_conn(conn, abort=True)
            return
        conn.upstream = sock
        conn.connecting = err != 0
        if not conn.connecting:
            self._upstream_ready(conn)

    def _finish_connect(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        if conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._count("upstream_failures")
            self._close_conn(conn, abort=True)
            return
        conn.connecting = False
        self._upstream_ready(conn)

    def _upstream_ready(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        _nodelay(conn.upstream)
        self._count("upstream_connects")

    def _read(self, conn: _Conn, sock: socket.socket) -> None:
        pipe = conn.up if sock is conn.client else conn.down
        try:
            chunk = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn, abort=True)  # pass a reset on as a reset
            return
        if chunk:
            pipe.push(chunk, time.monotonic() + self._delay)
        else:
            pipe.eof = True

    def _pump(self) -> None:
        """Deliver what is due, pass FINs on, and set each socket's selector interest."""
        now = time.monotonic()
        for conn in list(self._conns):
            if self._mode == "normal" and conn.upstream is not None and not conn.connecting:
                if not self._flush(conn, conn.up, conn.upstream, "bytes_up", now):
                    continue
                if not self._flush(conn, conn.down, conn.client, "bytes_down", now):
                    continue
                if conn.up.shut and conn.down.shut:
                    self._close_conn(conn)
                    continue
            self._update_interest(conn)

    def _flush(
        self, conn: _Conn, pipe: _Pipe, dst: socket.socket, counter: str, now: float
    ) -> bool:
        pipe.release(now)
        if pipe.outbuf:
            try:
                # Count under the lock that `stats` takes, so a peer that has the bytes
                # never reads a count without them.
                with self._lock:
                    sent = dst.send(pipe.outbuf)
                    self._counts[counter] += sent
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close_conn(conn, abort=True)
                return False
            del pipe.outbuf[:sent]
            pipe.queued -= sent
        if pipe.eof and not pipe.queued and not pipe.shut:
            pipe.shut = True
            # If the peer is gone, its own read or write will show it.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        return True

    def _update_interest(self, conn: _Conn) -> None:
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        client_mask = upstream_mask = 0
        if self._mode == "normal":
            if not conn.up.eof and conn.up.queued < _HIGH_WATER:
                client_mask |= read
            if conn.down.outbuf:
                client_mask |= write
            if conn.upstream is not None and not conn.connecting:
                if not conn.down.eof and conn.down.queued < _HIGH_WATER:
                    upstream_mask |= read
                if conn.up.outbuf:
                    upstream_mask |= write
        if conn.connecting:
            upstream_mask = write  # let a connect finish even in a blackhole
        self._set_mask(conn, conn.client, client_mask)
        if conn.upstream is not None:
            self._set_mask(conn, conn.upstream, upstream_mask)

    def _set_mask(self, conn: _Conn, sock: socket.socket, mask: int) -> None:
        assert self._sel is not None
        old = conn.masks.get(sock, 0)
        if mask == old:
            return
        if not old:
            self._sel.register(sock, mask, conn)
        elif not mask:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, mask, conn)
        conn.masks[sock] = mask

    def _close_conn(self, conn: _Conn, *, abort: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._count("active", -1)  # before the peers can see the close
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            if conn.masks.get(sock) and self._sel is not None:
                self._sel.unregister(sock)
            if abort:
                _abort(sock)
            else:
                sock.close()
        conn.masks.clear()
        self._conns.discard(conn)

    def _open_listener(self) -> None:
        if self._listener is not None:
            return
        assert self._listen_info is not None
        assert self._sel is not None
        family, sockaddr = self._listen_info
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Reopening after cut() must get the same port back.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((sockaddr[0], self._port or 0, *sockaddr[2:]))
            sock.listen(128)
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, _LISTENER)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._listener = sock

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        if self._sel is not None:
            self._sel.unregister(self._listener)
        self._listener.close()
        self._listener = None
