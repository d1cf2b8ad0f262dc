"""Redis Streams for the outbox: all of the adapter but its round trip, which
``_async_streams.py`` writes once for both kinds of client."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import redis
import redis.asyncio
from redis.exceptions import ResponseError

from resilience import remote
from resilience.integrations.outbox._model import (
    EventTooLarge,
    Failure,
    FailureTable,
    OutboxEvent,
    Results,
    classify_with,
    positive_int,
)

__all__ = ["StreamsBase"]


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


_XADD_FORMAT: Final = (
    b"*%d\r\n$4\r\nXADD\r\n%s%s$1\r\n*\r\n"
    b"$8\r\nevent_id\r\n$%d\r\n%s\r\n$5\r\ntopic\r\n$%d\r\n%s\r\n"
    b"$7\r\npayload\r\n$%d\r\n%s\r\n$7\r\ncreated\r\n$%d\r\n%s\r\n%s"
)


# Error replies that mean "the server cannot take writes right now", not "this event".
_REDIS_BUSY: Final = (
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
)


def _redis_reply_failure(error: ResponseError) -> Failure:
    code = str(error).split(" ", 1)[0].upper()
    return Failure.OUTAGE if code in _REDIS_BUSY else Failure.POISON


class StreamsBase:
    """Everything of :class:`RedisStreamsBroker` but the round trip: checks, encoding,
    the cluster pipeline and merging the replies."""

    FAILURES: Final[FailureTable] = (
        (redis.exceptions.BusyLoadingError, Failure.OUTAGE),
        ((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError), Failure.OUTAGE),
        (redis.exceptions.DataError, Failure.POISON),
    )

    def __init__(
        self,
        client: redis.Redis | redis.asyncio.Redis,
        *,
        stream: str = "outbox:{topic}",
        maxlen: int | None = None,
        max_bytes: int | None = 1_048_576,
        timeout: float = 5.0,
    ) -> None:
        self._is_async = remote.check_client(client)
        if not isinstance(stream, str) or "{topic}" not in stream:
            raise ValueError(f"stream must be a str containing '{{topic}}', got {stream!r}")
        self.stream = stream
        self.maxlen = None if maxlen is None else positive_int("maxlen", maxlen)
        self.max_bytes = None if max_bytes is None else positive_int("max_bytes", max_bytes)
        self.timeout = remote.check_timeout(timeout)
        # Our own pool with the timeout and no retries: a blackholed broker costs one
        # timeout per batch, and the breaker takes it from there.
        self._commands = remote.Commands(client, self.timeout)
        self._client = self._commands.client
        # Cluster streams live in different slots: those batches go through a pipeline.
        self._packed = self._commands.owned
        trim = (
            b""
            if self.maxlen is None
            else _bulk(b"MAXLEN") + _bulk(b"~") + _bulk(str(self.maxlen).encode())
        )
        self._trim_args = 0 if self.maxlen is None else 3
        self._trim = trim
        self._names: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"RedisStreamsBroker(stream={self.stream!r})"

    def stream_name(self, topic: str) -> str:
        return self.stream.replace("{topic}", topic)

    def _name(self, topic: str) -> bytes:
        name = self._names.get(topic)
        if name is None:
            name = self._names[topic] = _bulk(self.stream_name(topic).encode())
        return name

    def _encode(self, event: OutboxEvent) -> bytes:
        """The XADD command as RESP bytes. One format operation per event: redis-py's
        generic packer costs five times as much, and this measures the size on the way."""
        payload = event.payload.encode()
        eid = event.event_id.encode()
        topic = event.topic.encode()
        created = repr(event.created).encode()
        argc = 11 + self._trim_args
        extra = b""
        size = len(payload) + len(eid) + len(topic) + len(created) + 26
        if event.key is not None:
            key = event.key.encode()
            extra = b"$3\r\nkey\r\n$%d\r\n%s\r\n" % (len(key), key)
            argc += 2
            size += len(key) + 3
        if event.headers:
            headers = json.dumps(dict(event.headers), separators=(",", ":")).encode()
            extra += b"$7\r\nheaders\r\n$%d\r\n%s\r\n" % (len(headers), headers)
            argc += 2
            size += len(headers) + 7
        if self.max_bytes is not None and size > self.max_bytes:
            raise EventTooLarge(size, self.max_bytes)
        return _XADD_FORMAT % (
            argc, self._name(event.topic), self._trim,
            len(eid), eid, len(topic), topic, len(payload), payload, len(created), created,
            extra,
        )  # fmt: skip

    def _fields(self, event: OutboxEvent) -> dict[str, str]:
        fields = {
            "event_id": event.event_id,
            "topic": event.topic,
            "payload": event.payload,
            "created": repr(event.created),
        }
        if event.key is not None:
            fields["key"] = event.key
        if event.headers:
            fields["headers"] = json.dumps(dict(event.headers), separators=(",", ":"))
        return fields

    def _pipeline(self, events: Sequence[OutboxEvent], sent: list[int]) -> Any:
        pipe = self._client.pipeline(transaction=False)
        for index in sent:
            event = events[index]
            pipe.xadd(
                self.stream_name(event.topic),
                self._fields(event),
                maxlen=self.maxlen,
                approximate=True,
            )
        return pipe

    @staticmethod
    def _merge(results: Results, sent: list[int], replies: list[Any]) -> Results:
        for index, reply in zip(sent, replies, strict=True):
            if isinstance(reply, BaseException):
                results[index] = reply
        return results

    def classify(self, error: BaseException) -> Failure:
        if isinstance(error, ResponseError) and not isinstance(
            error, redis.exceptions.BusyLoadingError
        ):
            return _redis_reply_failure(error)
        return classify_with(self.FAILURES, error)
