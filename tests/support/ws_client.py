"""A minimal blocking WebSocket client (RFC 6455) on a raw socket, for end-to-end tests.

It does the opening handshake (and checks ``Sec-WebSocket-Accept``), sends masked text
frames, reads unfragmented text/binary/close frames and answers pings. Enough to talk
to a real server in a test, with no client library::

    with WebSocketClient.connect("127.0.0.1", port, "/ws") as ws:
        ws.send_text("hello")
        assert ws.recv() == "echo: hello"

The server side still needs a WebSocket implementation: uvicorn serves WebSockets only
when ``websockets`` or ``wsproto`` is installed (see :func:`server_supports_websockets`).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import socket
import struct
from types import TracebackType

__all__ = ["WebSocketClient", "WebSocketClosed", "server_supports_websockets"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def server_supports_websockets() -> bool:
    """True when uvicorn can serve WebSockets here (``websockets`` or ``wsproto`` found)."""
    return any(importlib.util.find_spec(name) is not None for name in ("websockets", "wsproto"))


class WebSocketClosed(Exception):
    """The server closed the connection; ``code`` is its close code (1005: none given)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


class WebSocketClient:
    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self.sock = sock
        self._buf = bytearray(leftover)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        path: str = "/",
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> WebSocketClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            key = base64.b64encode(os.urandom(16))
            lines = [
                f"GET {path} HTTP/1.1",
                f"Host: {host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key.decode()}",
                "Sec-WebSocket-Version: 13",
                *(f"{name}: {value}" for name, value in (headers or {}).items()),
            ]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"handshake: connection closed after {response!r}")
                response += chunk
            head, _, leftover = response.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            if status_line.split(" ", 2)[1] != "101":
                raise ConnectionError(f"handshake refused: {status_line!r}")
            fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines)
            }
            expected = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
            if fields.get("sec-websocket-accept") != expected:
                raise ConnectionError(f"bad Sec-WebSocket-Accept: {fields!r}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, leftover)

    # -- frames --------------------------------------------------------------------------

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head.append(0x80 | 126)
            head += struct.pack("!H", n)
        else:
            head.append(0x80 | 127)
            head += struct.pack("!Q", n)
        mask = os.urandom(4)
        head += mask
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(head) + masked)

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed mid-frame")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _read_frame(self) -> tuple[int, bytes]:
        first, second = self._read_exact(2)
        if not first & 0x80:
            raise NotImplementedError("fragmented frames are not supported")
        opcode = first & 0x0F
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        mask = self._read_exact(4) if second & 0x80 else b""
        payload = self._read_exact(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, payload

    # -- messages ------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._send_frame(_TEXT, text.encode())

    def send_bytes(self, data: bytes) -> None:
        self._send_frame(_BINARY, data)

    def recv(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; raises WebSocketClosed on close."""
        while True:
            opcode, payload = self._read_frame()
            if opcode == _TEXT:
                return payload.decode()
            if opcode == _BINARY:
                return payload
            if opcode == _PING:
                self._send_frame(_PONG, payload)
                continue
            if opcode == _CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise WebSocketClosed(code, payload[2:].decode(errors="replace"))

    def close(self, code: int = 1000) -> None:
        """Send a close frame (best effort) and close the socket."""
        try:
            self._send_frame(_CLOSE, struct.pack("!H", code))
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
