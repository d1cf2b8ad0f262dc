"""NATS JetStream for the outbox, with nats-py.

Install with ``pip install 'resilience[nats]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import ClassVar

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
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
except ImportError as error:
    raise ImportError(
        "NatsJetStreamBroker needs nats-py: pip install 'resilience[nats]'"
    ) from error

__all__ = ["NatsJetStreamBroker"]

log = logging.getLogger(__name__)


# What nats-py accepts as a header name; it raises BadHeaderError on others at send time.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_LINE = b"NATS/1.0\r\n"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


class NatsJetStreamBroker(AsyncBroker):
    """Publishes each event to JetStream and waits for the stream's ack.

    The subject is ``subject`` with ``{topic}`` replaced by the event's topic; the
    payload is the event's JSON; the headers are the event's headers plus
    ``Nats-Msg-Id: <event id>`` (JetStream drops a repeat within the stream's duplicate
    window), ``topic`` and ``key`` (when set). A stream must capture the subjects.

    Events of one key go one at a time in id order, different keys (and events without
    a key) concurrently; after a key's first failure its later events in the batch are
    :class:`HeldBack`. ``timeout`` bounds one batch: connecting and every publish and ack
    in it. ``max_bytes`` caps payload plus headers; it defaults to (and never exceeds)
    the server's ``max_payload``, since the server drops the connection of a client that
    sends more.

    ``connection`` is a URL (the adapter owns that connection: it connects on first use,
    without nats-py's background reconnects, and connects again on the next batch after
    losing it) or a connected ``nats.aio.client.Client`` of yours (used, never closed).
    The connection lives on one event loop: the loop of the first ``apublish()`` or, for
    ``publish()`` and trio, a private loop thread of the adapter. Calls from elsewhere
    run there. ``aclose()`` it on its loop before that loop ends.

    Failure table:

    - outage: connection refused, reset or closed, timeouts (no ack in time, as when the
      link is dead), a client that is reconnecting or draining, no responders
      (``NoStreamResponseError``), JetStream 503s (``ServiceUnavailableError``: a stream
      full under ``discard: new`` answers 503 with err_code 10077) and 500s, and a failed
      connect (:class:`BrokerUnavailable`). No responders is what the server answers when
      no stream captures the subject, and equally while JetStream or the stream's leader
      is unavailable; the adapter cannot tell these apart, and the fix (create the stream,
      wait for the cluster) belongs to the broker, not to the event: retrying the same
      bytes later succeeds, so the events wait rather than burn attempts toward dead.
      The price: a topic without a stream opens the breaker for every topic;
    - poison: other JetStream API errors (``BadRequestError``: 400 with err_code 10054
      for a message over the stream's ``max_msg_size``), payload plus headers over
      ``max_bytes``, header names nats-py refuses, and subjects with spaces, empty
      tokens or wildcards (a wildcard subject would get a misleading 503);
    - unknown: anything else.
    """

    FAILURES: ClassVar[FailureTable] = (
        (nats.js.errors.NoStreamResponseError, Failure.OUTAGE),
        ((nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError), Failure.OUTAGE),
        (nats.js.errors.APIError, Failure.POISON),
        (
            (nats.errors.MaxPayloadError, nats.errors.BadHeaderError, nats.errors.BadSubjectError),
            Failure.POISON,
        ),
        (
            (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.ConnectionDrainingError,
                nats.errors.NoServersError,
                nats.errors.AuthorizationError,
                asyncio.TimeoutError,
            ),
            Failure.OUTAGE,
        ),
    )

    def __init__(
        self,
        connection: str | Client,
        *,
        subject: str = "{topic}",
        timeout: float = 5.0,
        max_bytes: int | None = None,
    ) -> None:
        if isinstance(connection, str):
            self._url: str | None = connection
            self._given: Client | None = None
        elif isinstance(connection, Client):
            self._url, self._given = None, connection
        else:
            raise TypeError(
                "connection must be a NATS URL or a nats.aio.client.Client, "
                f"got {type(connection).__name__}"
            )
        if not isinstance(subject, str) or "{topic}" not in subject:
            raise ValueError(f"subject must be a str containing '{{topic}}', got {subject!r}")
        self.subject = subject
        self.timeout = positive("timeout", timeout)
        self.max_bytes = None if max_bytes is None else positive_int("max_bytes", max_bytes)
        self._home = Home("NatsJetStreamBroker", private=self._given is None)
        # Touched only on the home loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._limit = 0

    def __repr__(self) -> str:
        return f"NatsJetStreamBroker(subject={self.subject!r})"

    # -- on the home loop ----------------------------------------------------------------

    _label = "NATS"

    def _forget(self) -> None:
        self._nc = self._js = None

    def _usable(self) -> JetStreamContext | None:
        nc = self._given if self._given is not None else self._nc
        if self._js is None or nc is None or nc.is_closed:
            return None
        return self._js

    async def _send(
        self, target: JetStreamContext, message: tuple[str, bytes, dict[str, str]], deadline: float
    ) -> None:
        subject, payload, headers = message
        await target.publish(subject, payload, timeout=left(deadline), headers=headers)

    async def _open(self, deadline: float) -> None:
        if self._given is None:
            assert self._url is not None
            nc = self._nc = Client()
            # One attempt or two (nats-py's floor), no background reconnects: a lost
            # connection fails this batch and the next batch connects again.
            await nc.connect(
                self._url,
                name="resilience outbox",
                connect_timeout=max(1, int(left(deadline))),
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=_log_error,
            )
        else:
            nc = self._given
            if nc.is_closed:
                raise BrokerUnavailable("the NATS client given is closed")
        limit = nc.max_payload
        self._limit = limit if self.max_bytes is None else min(limit, self.max_bytes)
        self._js = nc.jetstream(timeout=self.timeout)

    async def _disconnect(self) -> None:
        nc = self._nc
        self._nc = self._js = None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.timeout)

    def _encode(self, event: OutboxEvent) -> tuple[str, bytes, dict[str, str]]:
        subject = self.subject.replace("{topic}", event.topic)
        tokens = subject.split(".")
        if any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in tokens):
            raise EventRejected(f"not a NATS subject to publish to: {subject!r}")
        payload = event.payload.encode()
        headers = dict(event.headers)
        headers["topic"] = event.topic
        if event.key is not None:
            headers["key"] = event.key
        headers["Nats-Msg-Id"] = event.event_id
        size = len(payload) + len(_HEADER_LINE) + 2
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise EventRejected(f"not a NATS header name: {name!r}")
            # Counted as nats-py sends it: values trimmed, newlines made spaces.
            size += len(name) + 4 + len(value.strip().translate(_NEWLINES).encode())
        if size > self._limit:
            raise EventTooLarge(size, self._limit)
        return subject, payload, headers


async def _log_error(error: Exception) -> None:
    # nats-py logs each error with a traceback by default; failures reach the caller anyway.
    log.debug(
        "nats: %r",
        error,
        extra={"resilience_event": "nats.error", "resilience_error_type": type(error).__name__},
    )
