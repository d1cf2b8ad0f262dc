"""RabbitMQ for the outbox, with aio-pika and publisher confirms.

Install with ``pip install 'resilience[rabbitmq]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, ClassVar, Final

from resilience.integrations.outbox._aio import AsyncBroker, Home, left
from resilience.integrations.outbox._model import (
    BrokerUnavailable,
    EventRejected,
    EventTooLarge,
    Failure,
    FailureTable,
    OutboxEvent,
    positive,
    positive_int,
)

try:
    import aio_pika
    import aiormq
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
    from aio_pika.connection import make_url
    from pamqp.frame import marshal as marshal_frame
    from pamqp.header import ContentHeader
except ImportError as error:
    raise ImportError(
        "RabbitMQBroker needs aio-pika: pip install 'resilience[rabbitmq]'"
    ) from error

__all__ = ["RabbitMQBroker"]

log = logging.getLogger(__name__)


#: RabbitMQ 4's default ``max_message_size``; 3.x allows 128 MiB.
DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
_MAX_ROUTING_KEY: Final = 255  # AMQP shortstr
_MAX_HEADER_NAME: Final = 128  # pamqp truncates longer field names (with a warning)


class RabbitMQBroker(AsyncBroker):
    """Publishes each event as one persistent message, waiting for the broker's confirm.

    The message goes to ``exchange`` (declared durable, type ``topic``; ``""`` is the
    default exchange, which routes to the queue named like the topic) with the event's
    topic as routing key. Its body is the payload JSON, ``message_id`` the event id (for
    consumer dedupe), ``content_type`` ``application/json``, and its headers the event's
    headers plus ``topic`` and ``key`` (when set).

    Events of one key go one at a time in id order, different keys (and events without
    a key) concurrently; after a key's first failure its later events in the batch are
    :class:`HeldBack`. ``timeout``
    bounds one batch: connecting and every send and confirm in it.

    ``connection`` is a URL (the adapter owns that connection: it connects on first use
    and reconnects after a failure) or an aio-pika connection of yours (used, never
    closed). The connection lives on one event loop: the loop of the first ``apublish()``
    or, for ``publish()`` and trio, a private loop thread of the adapter. Calls from
    elsewhere run there. ``aclose()`` it on its loop before that loop ends.

    Failure table:

    - outage: connection refused, reset or closed (``AMQPConnectionError``), channel
      closed (``ChannelClosed``, ``ChannelInvalidStateError``; e.g. ``NOT_FOUND`` when the
      exchange was deleted: the next batch declares it again), timeouts, and nacks
      (``DeliveryError``: RabbitMQ nacks when a queue with ``x-overflow=reject-publish``
      is full), and a failed connect or setup (:class:`BrokerUnavailable`);
    - poison: a returned message (``PublishError``: unroutable while ``mandatory``), a
      body over ``max_bytes``, headers that do not fit one AMQP frame or do not encode
      (names over 128 bytes, say), a topic over 255 bytes, and ``PRECONDITION_FAILED``
      (a body over the server's ``max_message_size``; the server then closes the
      channel, so events in flight beside it get the same error: keep ``max_bytes`` at
      or below the server's limit);
    - unknown: anything else.
    """

    FAILURES: ClassVar[FailureTable] = (
        (aiormq.exceptions.PublishError, Failure.POISON),
        (aiormq.exceptions.DeliveryError, Failure.OUTAGE),
        (aiormq.exceptions.ChannelPreconditionFailed, Failure.POISON),
        (
            (aiormq.exceptions.ChannelClosed, aiormq.exceptions.ChannelInvalidStateError),
            Failure.OUTAGE,
        ),
        ((aiormq.exceptions.AMQPConnectionError, asyncio.TimeoutError), Failure.OUTAGE),
    )

    def __init__(
        self,
        connection: str | AbstractConnection,
        *,
        exchange: str = "outbox",
        timeout: float = 5.0,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        mandatory: bool = True,
    ) -> None:
        if isinstance(connection, str):
            self._url: str | None = connection
            self._given: AbstractConnection | None = None
        elif isinstance(connection, AbstractConnection):
            self._url, self._given = None, connection
        else:
            raise TypeError(
                "connection must be an AMQP URL or an aio_pika connection, "
                f"got {type(connection).__name__}"
            )
        if not isinstance(exchange, str):
            raise TypeError(f"exchange must be a str, got {type(exchange).__name__}")
        if not isinstance(mandatory, bool):
            raise TypeError(f"mandatory must be a bool, got {type(mandatory).__name__}")
        self.exchange = exchange
        self.timeout = positive("timeout", timeout)
        self.max_bytes = None if max_bytes is None else positive_int("max_bytes", max_bytes)
        self.mandatory = mandatory
        self._home = Home("RabbitMQBroker", private=self._given is None)
        given_loop = getattr(self._given, "loop", None)
        if isinstance(given_loop, asyncio.AbstractEventLoop):
            self._home.loop = given_loop
        # Touched only on the home loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._target: AbstractExchange | None = None
        self._frame_max = 0

    def __repr__(self) -> str:
        return f"RabbitMQBroker(exchange={self.exchange!r})"

    # -- on the home loop ----------------------------------------------------------------

    _label = "RabbitMQ"

    def _forget(self) -> None:
        self._conn = self._channel = self._target = None

    def _usable(self) -> AbstractExchange | None:
        if self._target is None or self._channel is None or self._channel.is_closed:
            return None
        return self._target

    async def _send(
        self, target: AbstractExchange, message: tuple[aio_pika.Message, str], deadline: float
    ) -> None:
        body, routing_key = message
        await target.publish(body, routing_key, mandatory=self.mandatory, timeout=left(deadline))

    async def _open(self, deadline: float) -> None:
        conn: AbstractConnection
        if self._given is None:
            assert self._url is not None
            # Not aio_pika.connect(): it drops a connection that failed to connect
            # unclosed, and that one's __del__ then schedules a close on whatever loop.
            conn = self._conn = aio_pika.Connection(
                make_url(self._url), client_properties={"connection_name": "resilience outbox"}
            )
            await conn.connect(timeout=left(deadline))
        else:
            conn = self._given
            if conn.is_closed:
                raise BrokerUnavailable("the aio_pika connection given is closed")
        channel = conn.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        await channel.initialize()
        if self.exchange:
            self._target = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        else:
            self._target = channel.default_exchange
        transport = conn.transport
        self._frame_max = transport.connection.connection_tune.frame_max if transport else 0

    async def _disconnect(self) -> None:
        channel, conn = self._channel, self._conn
        self._channel = self._target = self._conn = None
        # Bounded: closing waits for the broker's CloseOk, which a dead link never sends.
        with contextlib.suppress(Exception):
            if conn is not None:
                await asyncio.wait_for(conn.close(), self.timeout)
            elif channel is not None and not channel.is_closed:
                await asyncio.wait_for(channel.close(), self.timeout)

    def _encode(self, event: OutboxEvent) -> tuple[aio_pika.Message, str]:
        if len(event.topic.encode()) > _MAX_ROUTING_KEY:
            raise EventRejected(f"topic is over AMQP's {_MAX_ROUTING_KEY}-byte routing key")
        body = event.payload.encode()
        if self.max_bytes is not None and len(body) > self.max_bytes:
            raise EventTooLarge(len(body), self.max_bytes)
        for name in event.headers:
            if len(name.encode()) > _MAX_HEADER_NAME:
                raise EventRejected(f"header name over {_MAX_HEADER_NAME} bytes: {name[:40]!r}...")
        headers: dict[str, Any] = dict(event.headers)
        headers["topic"] = event.topic
        if event.key is not None:
            headers["key"] = event.key
        message = aio_pika.Message(
            body,
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id,
        )
        try:
            size = len(marshal_frame(ContentHeader(0, len(body), message.properties), 1))
        except Exception as error:
            raise EventRejected(f"headers do not encode as AMQP: {error!r}") from error
        # The properties must fit one frame, or the broker closes the whole connection.
        if self._frame_max and size > self._frame_max:
            too_large = EventTooLarge(size, self._frame_max)
            too_large.args = (
                f"headers take {size} bytes encoded; one AMQP frame holds {self._frame_max}",
            )
            raise too_large
        return message, event.topic
