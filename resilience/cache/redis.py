"""The Redis tier: values in an envelope, invalidation and load notices over pub/sub.

A stored value is ``envelope + serializer payload``. The envelope holds a magic byte, a
version, the time (writer's wall clock) until which the value is fresh and how long it
took to load. Redis's own TTL (``ttl`` plus any stale window) is the hard expiry, so
clock skew between hosts can only move the soft, early-refresh decisions. Bytes
without the envelope, or that the serializer rejects, are a miss: counted, never
raised, never executed.

Every write publishes the key on ``{prefix}:invalidate`` (with the writer's origin, so
the writer ignores its own notice); a background thread per cache subscribes with a
connection of its own and evicts those keys from the local tier. When that connection
drops, the local tier is flushed, and again when it is back, since notices may have
been missed in between. The same thread relays ``{prefix}:loaded`` notices that wake
waiters of the cross-process single-flight lock.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from resilience._redis import CLUSTERS, OUTAGE_ERRORS, Commands, check_client, check_timeout
from resilience._remote import BackendStateChanged, OnError, RemoteGuard
from resilience.breaker import CircuitBreaker
from resilience.cache.policy import Entry
from resilience.cache.serializers import DEFAULT, SerializationError, Serializer
from resilience.events import Listener
from resilience.flight import Flight

__all__ = ["RedisCache"]

log = logging.getLogger("resilience")

_ENVELOPE: Final = struct.Struct("<BBdd")  # magic, version, fresh_until (epoch s), delta (s)
_MAGIC, _VERSION = 0xC5, 1

# SET (or DEL) and PUBLISH in one round trip; the notice carries "<origin> <key>".
_WRITE = """
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# Release the lock only if still ours, then tell waiters the value is there.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


class RedisCache:
    """The Redis tier of a :class:`TwoTierCache`.

    ``client`` is a ``redis.Redis`` (sync methods) or ``redis.asyncio.Redis`` (async
    methods). Each operation has ``timeout`` seconds; a breaker (by default 3 failures
    open it for 1 s) stops calling a Redis that is down, and the cache then falls
    through to the local tier and the loader. Values are written with ``serializer``
    (JSON by default; pickle only with an HMAC key).
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "c",
        serializer: Serializer | None = None,
        timeout: float = 0.05,
        breaker: CircuitBreaker | None = None,
        listeners: Sequence[Listener[BackendStateChanged]] = (),
    ) -> None:
        self.is_async = check_client(client)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if serializer is not None and not (
            callable(getattr(serializer, "dumps", None))
            and callable(getattr(serializer, "loads", None))
        ):
            raise TypeError(
                f"serializer must have dumps() and loads(), got {type(serializer).__name__}"
            )
        self.prefix = prefix
        self.serializer: Serializer = serializer if serializer is not None else DEFAULT
        self._user_client = client
        self._commands = Commands(client, check_timeout(timeout))
        self._client = self._commands.client
        self.guard = RemoteGuard(
            f"redis-cache:{prefix}",
            errors=OUTAGE_ERRORS,
            on_error=OnError.LOCAL,
            breaker=breaker,
            listeners=list(listeners),
        )
        self.origin = uuid.uuid4().hex
        self.invalidate_channel = f"{prefix}:invalidate"
        self.loaded_channel = f"{prefix}:loaded"
        self._write_sha = ""
        self._unlock_sha = ""
        self._waiters: dict[str, Flight] = {}
        self._waiters_lock = threading.Lock()
        self._subscriber: _Subscriber | None = None

    def key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def lock_key(self, key: str) -> str:
        return f"{self.prefix}:lock:{key}"

    # -- envelope --------------------------------------------------------------------------

    def encode(self, value: Any, fresh_until: float, delta: float) -> bytes:
        return _ENVELOPE.pack(_MAGIC, _VERSION, fresh_until, delta) + self.serializer.dumps(value)

    def decode(self, blob: bytes | None) -> Entry | None:
        """The entry in ``blob`` (times on the wall clock), or None when absent or unreadable."""
        if blob is None:
            return None
        try:
            magic, version, fresh_until, delta = _ENVELOPE.unpack_from(blob)
            if magic != _MAGIC or version != _VERSION:
                raise SerializationError("not a resilience cache envelope")
            value = self.serializer.loads(blob[_ENVELOPE.size :])
        except (struct.error, SerializationError):
            raise _Corrupt from None
        return Entry(value, fresh_until, delta)

    # -- commands, sync and async ----------------------------------------------------------

    def _script(self, text: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._client.evalsha(_sha(text), len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self._client.eval(text, len(keys), *keys, *args)

    async def _ascript(self, text: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.evalsha(_sha(text), len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await self._client.eval(text, len(keys), *keys, *args)

    def get(self, key: str) -> bytes | None:
        blob: bytes | None = self._commands.run("GET", self.key(key))
        return blob

    async def aget(self, key: str) -> bytes | None:
        blob: bytes | None = await self._commands.arun("GET", self.key(key))
        return blob

    def _write_args(self, key: str, blob: bytes, px: int) -> tuple[list[str], list[Any]]:
        notice = f"{self.origin} {key}"
        return [self.key(key)], [blob, px, self.invalidate_channel, notice]

    def write(self, key: str, blob: bytes, px: int) -> None:
        """SET (or DEL, with an empty blob) and publish the invalidation."""
        keys, args = self._write_args(key, blob, px)
        self._script(_WRITE, keys, args)

    async def awrite(self, key: str, blob: bytes, px: int) -> None:
        keys, args = self._write_args(key, blob, px)
        await self._ascript(_WRITE, keys, args)

    def lock(self, key: str, token: str, px: int) -> bool:
        return bool(self._commands.run("SET", self.lock_key(key), token, "NX", "PX", px))

    async def alock(self, key: str, token: str, px: int) -> bool:
        return bool(await self._commands.arun("SET", self.lock_key(key), token, "NX", "PX", px))

    def unlock(self, key: str, token: str) -> None:
        self._script(_UNLOCK, [self.lock_key(key)], [token, self.loaded_channel, key])

    async def aunlock(self, key: str, token: str) -> None:
        await self._ascript(_UNLOCK, [self.lock_key(key)], [token, self.loaded_channel, key])

    # -- notifications ---------------------------------------------------------------------

    def waiter(self, key: str) -> Flight:
        """A flight that lands when another process announces ``key`` loaded."""
        with self._waiters_lock:
            flight = self._waiters.get(key)
            if flight is None:
                flight = self._waiters[key] = Flight()
            return flight

    def _loaded(self, key: str) -> None:
        with self._waiters_lock:
            flight = self._waiters.pop(key, None)
        if flight is not None:
            flight.finish()

    def start(self, on_invalidate: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        """Start listening for other instances' writes (idempotent)."""
        if self._subscriber is not None:
            return
        if isinstance(self._user_client, CLUSTERS):
            raise ValueError(
                "invalidation needs a non-cluster client (pub/sub); pass invalidation=False"
            )
        self._subscriber = _Subscriber(self, on_invalidate, on_lost)
        self._subscriber.start()
        self._subscriber.ready.wait(timeout=2.0)

    @property
    def listening(self) -> bool:
        return self._subscriber is not None and self._subscriber.connected

    def close(self) -> None:
        """Stop listening and disconnect this tier's own connections."""
        if self._subscriber is not None:
            self._subscriber.stop()
            self._subscriber = None
        if not self.is_async:
            self._commands.close()

    async def aclose(self) -> None:
        if self._subscriber is not None:
            self._subscriber.stop()
            self._subscriber = None
        if self.is_async:
            await self._commands.aclose()


class _Corrupt(Exception):
    """A stored value that cannot be read back (counted as a miss)."""


_SHAS: dict[str, str] = {}


def _sha(text: str) -> str:
    sha = _SHAS.get(text)
    if sha is None:
        import hashlib

        sha = _SHAS[text] = hashlib.sha1(text.encode()).hexdigest()
    return sha


class _NoRetry(Retry):
    """Never retry and never reconnect: the subscriber's own loop handles every drop, so
    that each one flushes the local tier. redis-py's PubSub would otherwise reconnect
    and resubscribe in its failure callback, even with zero retries, hiding the drop."""

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 0)

    def call_with_retry(self, do: Callable[[], Any], fail: Any, *args: Any, **kwargs: Any) -> Any:
        return do()


class _Subscriber(threading.Thread):
    """Listens on the invalidate and loaded channels with a connection of its own."""

    def __init__(
        self,
        tier: RedisCache,
        on_invalidate: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> None:
        super().__init__(name=f"resilience-cache-{tier.prefix}", daemon=True)
        self._tier = tier
        self._on_invalidate = on_invalidate
        self._on_lost = on_lost
        self._stop_event = threading.Event()
        self.ready = threading.Event()
        self.connected = False
        self._pubsub: Any = None
        kwargs = dict(tier._user_client.connection_pool.connection_kwargs)
        kwargs.update(retry=_NoRetry(), retry_on_error=[], retry_on_timeout=False)
        # Blocking reads wait for messages; the loop wakes every half second to stop.
        kwargs.update(socket_timeout=2.0, socket_connect_timeout=1.0)
        self._kwargs = kwargs

    def stop(self) -> None:
        self._stop_event.set()
        # Wake the blocking read at once: shutdown() is the thread-safe way to end a recv.
        sock = getattr(getattr(self._pubsub, "connection", None), "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.join(timeout=5)

    def run(self) -> None:
        backoff = 0.05
        tier = self._tier
        while not self._stop_event.is_set():
            client: redis.Redis | None = None
            pubsub: Any = None
            try:
                client = redis.Redis(connection_pool=redis.ConnectionPool(**self._kwargs))
                pubsub = self._pubsub = client.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(tier.invalidate_channel, tier.loaded_channel)
                self._await_confirmations(pubsub)
                # Notices sent while we were away are lost: start from an empty local tier,
                # now that the subscription is confirmed (no notice can slip in between).
                self._on_lost()
                self.connected = True
                self.ready.set()
                backoff = 0.05
                while not self._stop_event.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._handle(message)
            except OUTAGE_ERRORS as error:
                if self._stop_event.is_set():
                    break
                if self.connected:
                    log.warning(
                        "resilience cache %r lost its invalidation channel (%s); "
                        "local tier flushed",
                        tier.prefix,
                        error,
                    )
                    self._on_lost()
                self.connected = False
                self.ready.set()
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self.connected = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.connection_pool.disconnect()

    def _await_confirmations(self, pubsub: Any) -> None:
        pending = {self._tier.invalidate_channel, self._tier.loaded_channel}
        # A real-time network deadline (not the cache's injectable clock, which a test may
        # freeze): how long Redis gets to confirm the subscription.
        deadline = time.monotonic() + 5.0
        while pending:
            if time.monotonic() > deadline:
                raise redis.TimeoutError("no subscribe confirmation")
            message = pubsub.get_message(timeout=0.5)
            if message is not None:
                if message.get("type") == "subscribe":
                    pending.discard(_text(message.get("channel")))
                else:
                    self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        if message.get("type") not in ("message", "pmessage"):
            return
        channel = _text(message.get("channel"))
        data = _text(message.get("data"))
        if channel == self._tier.invalidate_channel:
            origin, _, key = data.partition(" ")
            if origin != self._tier.origin:
                self._on_invalidate(key)
        elif channel == self._tier.loaded_channel:
            self._tier._loaded(data)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
