"""What the Redis tier's sync and async sides share: the envelope, the scripts, the keys
and notices, and the subscriber that hears other instances' writes."""

from __future__ import annotations

import logging
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from resilience.breaker import CircuitBreaker
from resilience.cache.policy import Entry
from resilience.cache.serializers import DEFAULT, SerializationError, Serializer
from resilience.events import Listener, Telemetry
from resilience.flight import Flight
from resilience.remote import (
    CLUSTERS,
    OUTAGE_ERRORS,
    BackendStateChanged,
    Commands,
    OnError,
    RemoteGuard,
    Script,
    Subscriber,
    check_client,
    check_timeout,
    shard_channel,
)

__all__ = ["UNLOCK", "WRITE", "RedisCacheBase", "_Corrupt"]

log = logging.getLogger("resilience")

_ENVELOPE: Final = struct.Struct("<BBdd")  # magic, version, fresh_until (epoch s), delta (s)
_MAGIC, _VERSION = 0xC5, 1

#: SET (or DEL) and publish the invalidation, in one round trip.
WRITE: Final = Script("resilience.cache", "write.lua")
#: Release the lock only if still ours, then tell waiters the value is there.
UNLOCK: Final = Script("resilience.cache", "unlock.lua")


class _Corrupt(Exception):
    """A stored value that cannot be read back (counted as a miss)."""


class RedisCacheBase:
    """The tier's state and its pure parts; the sync and async commands are mixins."""

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
        self._async_client = self.is_async
        self._sync_client = not self.is_async
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
        budget = check_timeout(timeout)
        self._commands = Commands(client, budget)
        self._client = self._commands.client
        self.guard = RemoteGuard(
            f"redis-cache:{prefix}",
            errors=OUTAGE_ERRORS,
            on_error=OnError.LOCAL,
            breaker=breaker,
            listeners=list(listeners),
            timeout=budget,
        )
        self.origin = uuid.uuid4().hex
        #: True with a RedisCluster client: notices go over sharded pub/sub.
        self.sharded = isinstance(client, CLUSTERS)
        # One server: "<origin> <key>" on the first channel, "<key>" on the second.
        self.invalidate_channel = f"{prefix}:invalidate"
        self.loaded_channel = f"{prefix}:loaded"
        #: On a Redis Cluster, both kinds of notice ("invalidate <origin> <key>" and
        #: "loaded <key>") go on the shard channel of this base in the slot of the key
        #: written (see resilience.remote.shard_channel).
        self.notice_channel = f"{prefix}:notices"
        if self.sharded:
            shard_channel(self.notice_channel, "")  # the slot tags: once per process, now
        self._waiters: dict[str, Flight] = {}
        self._waiters_lock = threading.Lock()
        self._subscriber: Subscriber | None = None
        self._on_invalidate: Callable[[str], None] = _ignore
        self._on_flush: Callable[[], None] = _nothing
        self._channel_down = False  # lost, not yet back: its recovery is logged once

    def telemetry(self) -> Telemetry:
        """What a metrics consumer reads (resilience.events): the guard's counters."""
        return self.guard.telemetry()

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

    # -- script arguments ------------------------------------------------------------------

    def _write_args(self, key: str, blob: bytes, px: int) -> tuple[list[str], list[Any]]:
        rkey = self.key(key)
        if self.sharded:
            channel = shard_channel(self.notice_channel, rkey)
            return [rkey], [blob, px, channel, f"invalidate {self.origin} {key}", "1"]
        return [rkey], [blob, px, self.invalidate_channel, f"{self.origin} {key}", "0"]

    def _unlock_args(self, key: str, token: str) -> tuple[list[str], list[Any]]:
        lkey = self.lock_key(key)
        if self.sharded:
            channel = shard_channel(self.notice_channel, lkey)
            return [lkey], [token, channel, f"loaded {key}", "1"]
        return [lkey], [token, self.loaded_channel, key, "0"]

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
        """Start listening for other instances' writes (idempotent).

        ``on_invalidate(key)`` for each key another instance wrote or deleted; ``on_lost()``
        whenever notices may have been missed: on subscribing, on losing the channel."""
        if self._subscriber is not None:
            return
        self._on_invalidate, self._on_flush = on_invalidate, on_lost
        self._subscriber = Subscriber(
            self._user_client,
            name=f"resilience-cache-{self.prefix}",
            on_message=self._on_notice,
            on_subscribed=self._channel_up,
            on_lost=self._channel_lost,
            channels=[self.invalidate_channel, self.loaded_channel],
            shard_base=self.notice_channel,
        )
        self._subscriber.start()
        self._subscriber.ready.wait(timeout=2.0)

    @property
    def listening(self) -> bool:
        return self._subscriber is not None and self._subscriber.connected

    def _stop_listening(self) -> None:
        if self._subscriber is not None:
            self._subscriber.stop()
            self._subscriber = None

    def _on_notice(self, channel: str, data: str) -> None:
        if self.sharded:
            kind, _, data = data.partition(" ")
        elif channel == self.invalidate_channel:
            kind = "invalidate"
        elif channel == self.loaded_channel:
            kind = "loaded"
        else:
            return
        if kind == "invalidate":
            origin, _, key = data.partition(" ")
            if origin != self.origin:
                self._on_invalidate(key)
        elif kind == "loaded":
            self._loaded(data)

    def _channel_up(self) -> None:
        if self._channel_down:
            self._channel_down = False
            log.warning(
                "resilience cache %r has its invalidation channel back",
                self.prefix,
                extra={
                    "resilience_event": "cache.channel_back",
                    "resilience_name": self.prefix,
                    "resilience_backend": self.guard.name,
                    "resilience_from_state": "lost",
                    "resilience_to_state": "listening",
                },
            )
        self._on_flush()

    def _channel_lost(self, error: BaseException) -> None:
        self._channel_down = True
        log.warning(
            "resilience cache %r lost its invalidation channel (%s); local tier flushed",
            self.prefix,
            error,
            extra={
                "resilience_event": "cache.channel_lost",
                "resilience_name": self.prefix,
                "resilience_backend": self.guard.name,
                "resilience_from_state": "listening",
                "resilience_to_state": "lost",
                "resilience_error_type": type(error).__name__,
            },
        )
        self._on_flush()


def _ignore(key: str) -> None:
    pass


def _nothing() -> None:
    pass
