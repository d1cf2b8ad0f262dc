"""Pub/sub on connections of its own: plain channels on one server, shard channels on a
Redis Cluster.

On a Redis Cluster a notice about a key goes out with SPUBLISH (Redis >= 7) on the shard
channel of the key's own hash slot, ``{<tag>}<base>``, where ``<tag>`` is a short hash tag
that hashes to that slot (:func:`slot_channel`). So the Lua script that writes the key
publishes in the same call (one hash slot per script), and the notice reaches that shard's
subscribers only instead of crossing the whole cluster bus. A :class:`Subscriber` listens
on every primary, with SSUBSCRIBE to the channels of the slots that primary serves: one
channel per slot, 16,384 in all, about 120 bytes of server memory each per subscriber.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError
from redis.retry import Retry

from resilience.remote._clients import CLUSTERS, OUTAGE_ERRORS

__all__ = ["Subscriber", "shard_channel", "slot_channel"]

log = logging.getLogger("resilience")

#: Connection settings a subscriber takes over from the user's client: where the server
#: is, who we are, how to talk to it. Everything else (timeouts, retries, health checks,
#: a cluster's hooks) is the subscriber's own business.
_PASSED_ON: Final = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "credential_provider",
        "client_name",
        "lib_name",
        "lib_version",
        "driver_info",
        "protocol",
        "socket_keepalive",
        "socket_keepalive_options",
        "socket_read_size",
        "encoding",
        "encoding_errors",
        "decode_responses",
    }
)
_SYNC_CONNECTIONS: Final = {
    "Connection": redis.Connection,
    "SSLConnection": redis.SSLConnection,
    "UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
}
#: Error replies of a cluster in motion: the next attempt sees the new layout.
_TRANSIENT: Final = (AskError, TryAgainError, ClusterDownError)
#: Empty reads of half a second each that Redis gets to confirm a subscription.
_CONFIRM_POLLS: Final = 10


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each hash slot, the smallest number whose hex digits hash to it."""
    tags: list[str] = [""] * REDIS_CLUSTER_HASH_SLOTS
    left, n = REDIS_CLUSTER_HASH_SLOTS, 0
    while left:
        tag = f"{n:x}"
        slot = key_slot(tag.encode())
        if not tags[slot]:
            tags[slot] = tag
            left -= 1
        n += 1
    return tuple(tags)


def slot_channel(base: str, slot: int) -> str:
    """The shard channel of ``base`` in hash slot ``slot``. The tag comes first, so braces
    in ``base`` cannot move the channel to another slot."""
    return f"{{{_slot_tags()[slot]}}}{base}"


def shard_channel(base: str, key: str) -> str:
    """The shard channel of ``base`` in the hash slot of ``key``."""
    return slot_channel(base, key_slot(key.encode()))


class _NoRetry(Retry):
    """Never retry and never reconnect: the subscriber's own loop handles every drop, so
    that each one is reported. redis-py's PubSub would otherwise reconnect and
    resubscribe in its failure callback, even with zero retries, hiding the drop."""

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 0)

    def call_with_retry(self, do: Callable[[], Any], fail: Any, *args: Any, **kwargs: Any) -> Any:
        return do()


def _sync_connection_class(cls: type) -> type:
    """The sync twin of a connection class (an asyncio client's, for the thread)."""
    if issubclass(cls, redis.connection.AbstractConnection):
        return cls
    for base in cls.__mro__:
        found = _SYNC_CONNECTIONS.get(base.__name__)
        if found is not None:
            return found
    return redis.Connection


def _settings(kwargs: dict[str, Any], connection_class: type) -> dict[str, Any]:
    settings = {k: v for k, v in kwargs.items() if k in _PASSED_ON or k.startswith("ssl_")}
    settings.update(
        connection_class=_sync_connection_class(connection_class),
        retry=_NoRetry(),
        retry_on_error=[],
        retry_on_timeout=False,
        # Blocking reads wait for messages; the loop wakes every half second to stop.
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
    )
    return settings


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _Link:
    """One subscriber connection (its own client and pool) and the confirmations it awaits."""

    def __init__(self, settings: dict[str, Any]) -> None:
        client: Any = redis.Redis(connection_pool=redis.ConnectionPool(**settings))
        self.client = client
        self.pubsub: Any = client.pubsub()
        self.pending: set[str] = set()

    def socket(self) -> socket.socket | None:
        sock = getattr(getattr(self.pubsub, "connection", None), "_sock", None)
        return sock if isinstance(sock, socket.socket) else None

    def shutdown(self) -> None:
        # Wake a blocking read at once: shutdown() is the thread-safe way to end a recv.
        sock = self.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pubsub.close()
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()


class Subscriber(threading.Thread):
    """Listens with connections of its own, on a daemon thread, until :meth:`stop`.

    ``client`` (sync or asyncio) gives the connection settings. On one server, the
    subscriber sends SUBSCRIBE ``channels``. On a RedisCluster it sends SSUBSCRIBE, on each
    primary, for the shard channels of ``shard_base`` (:func:`slot_channel`) of every slot
    that primary serves.

    ``on_message(channel, data)`` gets each message, as text. ``on_subscribed()`` runs
    once every subscription is confirmed, after each (re)connection: notices sent while
    no subscription was active are lost, so that is the moment to forget what they would
    have announced. ``on_lost(error)`` runs when a confirmed subscription is lost: a
    connection dropped, or a slot moved to another node (Redis then unsubscribes its
    channels). The subscriber then connects again after a pause that grows to 2 s.
    """

    def __init__(
        self,
        client: Any,
        *,
        name: str,
        on_message: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        on_lost: Callable[[BaseException], None],
        channels: Sequence[str] = (),
        shard_base: str | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.sharded = isinstance(client, CLUSTERS)
        if self.sharded and shard_base is None:
            raise ValueError("a RedisCluster client needs shard_base (sharded pub/sub)")
        if not self.sharded and not channels:
            raise ValueError("channels must name at least one channel")
        self._client = client
        self._channels = list(channels)
        self._shard_base = shard_base or ""
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_lost = on_lost
        self._stop_event = threading.Event()
        self._links: list[_Link] = []
        self._complained: set[str] = set()
        #: Set once the first attempt to subscribe has ended, either way.
        self.ready = threading.Event()
        #: True while every subscription is confirmed and being read.
        self.connected = False
        if self.sharded:
            _slot_tags()  # computed once per process (0.2 s): here, not on the first write
            # Read here, in the caller's thread: the client's own thread or event loop may
            # change its node tables while the subscriber runs.
            self._seeds, self._settings = _cluster_nodes(client)
        else:
            pool = client.connection_pool
            self._settings = _settings(pool.connection_kwargs, pool.connection_class)

    def stop(self) -> None:
        self._stop_event.set()
        for link in list(self._links):
            link.shutdown()
        self.join(timeout=5)

    def run(self) -> None:
        backoff = 0.05
        while not self._stop_event.is_set():
            try:
                self._subscribe()
                self._await_confirmations()
                self._on_subscribed()
                self.connected = True
                self.ready.set()
                backoff = 0.05
                self._listen()
            except OUTAGE_ERRORS as error:
                if self._stop_event.is_set():
                    break
                if self.connected:
                    self.connected = False
                    self._on_lost(error)
                elif isinstance(error, ResponseError) and not isinstance(error, _TRANSIENT):
                    self._complain(error)
                self.ready.set()
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self.connected = False
                links, self._links = self._links, []
                for link in links:
                    link.close()

    def _complain(self, error: ResponseError) -> None:
        """An error reply will not fix itself (an old Redis, an ACL): say so, once."""
        text = str(error)
        if text not in self._complained:
            self._complained.add(text)
            hint = " (sharded pub/sub needs Redis >= 7)" if self.sharded else ""
            log.error(
                "resilience %s cannot subscribe: %s%s",
                self.name,
                text,
                hint,
                extra={
                    "resilience_event": "pubsub.refused",
                    "resilience_name": self.name,
                    "resilience_error_type": type(error).__name__,
                },
            )

    # -- subscribing ---------------------------------------------------------------------

    def _link(self, settings: dict[str, Any]) -> _Link:
        link = _Link(settings)
        self._links.append(link)
        if self._stop_event.is_set():  # stop() may have looked at the links already
            raise redis.ConnectionError("stopped")
        return link

    def _subscribe(self) -> None:
        if not self.sharded:
            link = self._link(self._settings)
            link.pubsub.subscribe(*self._channels)
            link.pending.update(self._channels)
            return
        for settings, slots in self._shards():
            link = self._link(settings)
            channels = [slot_channel(self._shard_base, slot) for slot in slots]
            link.pending.update(channels)
            # The first through redis-py (it connects, and marks the PubSub subscribed),
            # the others in one write: one SSUBSCRIBE per slot, since a cluster refuses
            # channels of several slots in one, and thousands of round trips are slow.
            link.pubsub.ssubscribe(channels[0])
            conn = link.pubsub.connection
            rest = conn.pack_commands([("SSUBSCRIBE", channel) for channel in channels[1:]])
            conn.send_packed_command(rest, check_health=False)

    def _shards(self) -> list[tuple[dict[str, Any], list[int]]]:
        """Connection settings of every primary and the slots it serves (CLUSTER SLOTS,
        asked of the first node of the client that answers)."""
        try:
            seeds, settings = _cluster_nodes(self._client)
            seeds = list(dict.fromkeys([*seeds, *self._seeds]))
        except RuntimeError:  # its tables changed while we read them: what we knew
            seeds, settings = self._seeds, self._settings
        remap = getattr(getattr(self._client, "nodes_manager", None), "address_remap", None)
        error: BaseException = redis.ConnectionError("the cluster client knows no node")
        for host, port in seeds:
            link = self._link({**settings, "host": host, "port": port})
            try:
                reply = link.client.execute_command("CLUSTER SLOTS")
            except OUTAGE_ERRORS as failed:
                error = failed
                continue
            finally:
                self._links.remove(link)
                link.close()
            owners: dict[tuple[str, int], list[int]] = {}
            for entry in reply:
                start, end, primary = int(entry[0]), int(entry[1]), entry[2]
                address = (_text(primary[0]) or host, int(primary[1]))
                if callable(remap):
                    address = remap(address)
                owners.setdefault(address, []).extend(range(start, end + 1))
            if sum(len(slots) for slots in owners.values()) != REDIS_CLUSTER_HASH_SLOTS:
                # A slot no node serves (the cluster is down, or mid-change): once it is
                # served again nothing would tell us, so wait until every slot is.
                error = redis.ConnectionError(f"{host}:{port} reports slots no node serves")
                continue
            self._seeds = list(dict.fromkeys([*owners, *self._seeds]))
            return [({**settings, "host": h, "port": p}, slots) for (h, p), slots in owners.items()]
        raise error

    def _await_confirmations(self) -> None:
        for link in self._links:
            empty = 0
            while link.pending:
                message = link.pubsub.get_message(timeout=0.5)
                if message is None:
                    empty += 1
                    if empty >= _CONFIRM_POLLS or self._stop_event.is_set():
                        raise redis.TimeoutError("no subscribe confirmation")
                    continue
                if message.get("type") in ("subscribe", "ssubscribe"):
                    link.pending.discard(_text(message.get("channel")))
                else:
                    self._handle(message)

    # -- listening -----------------------------------------------------------------------

    def _listen(self) -> None:
        links = self._links
        if len(links) == 1:
            pubsub = links[0].pubsub
            while not self._stop_event.is_set():
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    self._handle(message)
            return
        with selectors.DefaultSelector() as selector:
            for link in links:
                sock = link.socket()
                if sock is None:
                    raise redis.ConnectionError("a subscriber connection is closed")
                selector.register(sock, selectors.EVENT_READ, link)
            while not self._stop_event.is_set():
                # Drain every link: a reply may sit in a parser's buffer, not the socket.
                for link in links:
                    while (message := link.pubsub.get_message(timeout=0.0)) is not None:
                        self._handle(message)
                selector.select(timeout=0.5)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("message", "smessage", "pmessage"):
            self._on_message(_text(message.get("channel")), _text(message.get("data")))
        elif kind in ("unsubscribe", "sunsubscribe"):
            # We never unsubscribe: Redis did, because the channel's slot moved.
            channel = _text(message.get("channel"))
            raise redis.ConnectionError(f"Redis unsubscribed {channel} (its slot moved)")


def _cluster_nodes(client: Any) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The nodes a cluster client knows (to ask for the slots) and its connection settings."""
    nodes = list(client.get_nodes())
    manager = getattr(client, "nodes_manager", None)
    nodes += list(getattr(manager, "startup_nodes", {}).values())
    seeds = list(dict.fromkeys((str(n.host), int(n.port)) for n in nodes))
    for node in nodes:
        sync_client = getattr(node, "redis_connection", None)  # a sync cluster's node
        if sync_client is not None:
            pool = sync_client.connection_pool
            return seeds, _settings(pool.connection_kwargs, pool.connection_class)
        kwargs = getattr(node, "connection_kwargs", None)  # an asyncio cluster's node
        if isinstance(kwargs, dict):
            return seeds, _settings(kwargs, node.connection_class)
    return seeds, _settings({}, redis.Connection)
