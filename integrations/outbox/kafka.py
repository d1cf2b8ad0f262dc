"""Kafka for the outbox, with confluent-kafka (librdkafka).

Install with ``pip install 'resilience[kafka]'``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

import anyio.to_thread

from resilience.clock import SYSTEM_CLOCK
from resilience.integrations.outbox._model import (
    BrokerUnavailable,
    EventRejected,
    EventTooLarge,
    Failure,
    FailureTable,
    HeldBack,
    OutboxEvent,
    Results,
    classify_with,
    encode_batch,
    positive,
    positive_int,
)

try:
    import confluent_kafka
    from confluent_kafka import KafkaError, KafkaException
except ImportError as error:
    raise ImportError(
        "KafkaBroker needs confluent-kafka: pip install 'resilience[kafka]'"
    ) from error

__all__ = ["KafkaBroker"]

log = logging.getLogger(__name__)

K = KafkaError
_Headers = list[tuple[str, str | bytes | None]]
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# How often a batch on a producer whose idempotence is not yet confirmed looks at what
# librdkafka logged, so a broker that refuses it costs milliseconds, not the timeout.
_SLICE: Final = 0.02
# What a broker may answer InitProducerId with for a while (cluster starting, leader
# moving): not a refusal of idempotence.
_TRANSIENT: Final = (
    "load in progress",
    "not available",
    "not coordinator",
    "timed out",
    "not enough",
    "concurrent transactions",
    "throttl",
)


class KafkaBroker:
    """Publishes each event as one Kafka record and waits for every delivery report.

    The record goes to the event's topic with the event's key as message key (so a key
    maps to one partition, and its order is the partition's order), the payload JSON as
    value, and the event's headers plus ``event_id`` as headers. ``acks=all``.

    The producer is idempotent when the broker allows it (``idempotence=None``, the
    default). A broker that refuses it (librdkafka raises a fatal error such as
    ``_UNSUPPORTED_FEATURE`` or ``CLUSTER_AUTHORIZATION_FAILED``, or the broker answers
    ``InitProducerId`` with an error) is detected on the first batch, which is then sent
    again, without idempotence, within the same timeout; this is logged once. Without
    idempotence one request is in flight per connection, so librdkafka's retries cannot
    reorder a partition. ``idempotence=True`` refuses to fall back (the batches fail as
    outages), ``False`` never asks.

    One batch is produced at once and ``timeout`` bounds it (it is also each record's
    ``message.timeout.ms``); records without a report by then are purged. A new
    idempotent producer takes about half a second for its producer id, so keep
    ``timeout`` well above that. Batches run one at a time per adapter (a lock), and
    ``apublish()`` runs the same code in a worker thread, so it works under asyncio and
    trio alike. After a batch with an outage the producer is closed, so nothing
    reconnects in the background while the breaker is open; the next batch (the probe)
    starts a new one.

    ``config`` holds further librdkafka settings, applied last (``linger.ms``,
    ``compression.type``, security settings, ``allow.auto.create.topics``...).
    ``max_bytes`` checks each record (value, key and headers) before anything is sent;
    by default librdkafka's ``message.max.bytes`` (1,000,000) is the limit.

    Failure table (``FAILURES``: error codes, then exception types):

    - outage: no delivery in time (``_MSG_TIMED_OUT``: the broker down, the link dead,
      the partition without a leader), transport and resolve errors, records purged at
      the deadline, ``REQUEST_TIMED_OUT``, ``NOT_ENOUGH_REPLICAS(_AFTER_APPEND)``,
      leader and broker not available, ``KAFKA_STORAGE_ERROR``, throttling, cluster
      authorization, the idempotent producer's sequence and epoch errors and fatal
      errors (the producer is replaced), a full local queue (``BufferError``), and
      any other error librdkafka marks retriable;
    - poison: over ``max_bytes`` or ``message.max.bytes`` (``MSG_SIZE_TOO_LARGE``),
      ``RECORD_LIST_TOO_LARGE``, a topic the cluster says does not exist
      (``UNKNOWN_TOPIC_OR_PART`` once ``topic.metadata.propagation.max.ms`` has passed;
      only when the broker does not create topics on first use), an invalid topic name,
      topic authorization, ``INVALID_RECORD`` and ``POLICY_VIOLATION``. Per-topic
      refusals are poison so the other topics keep flowing; replay the dead events once
      the topic is there;
    - unknown: anything else.
    """

    FAILURES: ClassVar[tuple[tuple[tuple[int, ...], Failure], ...]] = (
        (
            (
                K._MSG_TIMED_OUT,
                K._TIMED_OUT,
                K._TIMED_OUT_QUEUE,
                K._TRANSPORT,
                K._ALL_BROKERS_DOWN,
                K._RESOLVE,
                K._QUEUE_FULL,
                K._PURGE_QUEUE,
                K._PURGE_INFLIGHT,
                K._DESTROY,
                K._FATAL,
                K._FENCED,
                K._AUTHENTICATION,
                K.REQUEST_TIMED_OUT,
                K.NOT_ENOUGH_REPLICAS,
                K.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                K.LEADER_NOT_AVAILABLE,
                K.NOT_LEADER_FOR_PARTITION,
                K.BROKER_NOT_AVAILABLE,
                K.NETWORK_EXCEPTION,
                K.KAFKA_STORAGE_ERROR,
                K.THROTTLING_QUOTA_EXCEEDED,
                K.CLUSTER_AUTHORIZATION_FAILED,
                K.SASL_AUTHENTICATION_FAILED,
                K.OUT_OF_ORDER_SEQUENCE_NUMBER,
                K.UNKNOWN_PRODUCER_ID,
                K.INVALID_PRODUCER_EPOCH,
                K.INVALID_MSG,  # a CRC mismatch on the way: the same bytes again will do
            ),
            Failure.OUTAGE,
        ),
        (
            (
                K.MSG_SIZE_TOO_LARGE,
                K.RECORD_LIST_TOO_LARGE,
                K.UNKNOWN_TOPIC_OR_PART,
                K._UNKNOWN_TOPIC,
                K._UNKNOWN_PARTITION,
                K.TOPIC_EXCEPTION,
                K.TOPIC_AUTHORIZATION_FAILED,
                K.INVALID_RECORD,
                K.POLICY_VIOLATION,
                K.UNSUPPORTED_FOR_MESSAGE_FORMAT,
                K._INVALID_ARG,
                K._BAD_MSG,
            ),
            Failure.POISON,
        ),
    )
    #: Exceptions that are not librdkafka errors.
    EXCEPTIONS: ClassVar[FailureTable] = ((BufferError, Failure.OUTAGE),)

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        timeout: float = 5.0,
        idempotence: bool | None = None,
        max_bytes: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(bootstrap_servers, str) or not bootstrap_servers.strip():
            raise TypeError(
                "bootstrap_servers must be a non-empty str (host:port[,host:port...]), "
                f"got {bootstrap_servers!r}"
            )
        if idempotence is not None and not isinstance(idempotence, bool):
            raise TypeError(f"idempotence must be a bool or None, got {idempotence!r}")
        if config is not None and not (
            isinstance(config, Mapping) and all(isinstance(k, str) for k in config)
        ):
            raise TypeError("config must be a mapping of librdkafka setting names to values")
        for reserved in ("enable.idempotence", "logger", "error_cb", "on_delivery"):
            if config and reserved in config:
                raise ValueError(f"config must not set {reserved!r} (the adapter owns it)")
        self.bootstrap_servers = bootstrap_servers
        self.timeout = positive("timeout", timeout)
        self.max_bytes = None if max_bytes is None else positive_int("max_bytes", max_bytes)
        self.config: dict[str, Any] = dict(config or {})
        self._required = idempotence is True
        #: Whether the producer asks for idempotence (False after a fallback).
        self.idempotent = idempotence is not False
        self._lock = threading.Lock()
        self._producer: confluent_kafka.Producer | None = None
        self._confirmed = False  # the current idempotent producer has delivered
        self._watch = _Watch(self)
        self._topics: set[str] = set()
        # Set by what librdkafka logs while a batch waits (the same thread).
        self._refused: str | None = None
        self._fatal: str | None = None

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap_servers!r}, idempotent={self.idempotent})"

    # -- the protocol ---------------------------------------------------------------------

    def publish(self, events: Sequence[OutboxEvent]) -> Results:
        with self._lock:
            return self._publish(events)

    async def apublish(self, events: Sequence[OutboxEvent]) -> Results:
        return await anyio.to_thread.run_sync(self.publish, events)

    def classify(self, error: BaseException) -> Failure:
        if isinstance(error, KafkaException) and error.args:
            kafka_error = error.args[0]
            if isinstance(kafka_error, KafkaError):
                return self._classify_code(kafka_error)
        return classify_with(self.EXCEPTIONS, error)

    def _classify_code(self, error: KafkaError) -> Failure:
        code = error.code()
        for codes, failure in self.FAILURES:
            if code in codes:
                return failure
        return Failure.OUTAGE if error.retriable() else Failure.UNKNOWN

    def close(self) -> None:
        """Wait up to ``timeout`` for records still in flight, then close the producer."""
        with self._lock:
            producer, self._producer = self._producer, None
            if producer is not None:
                try:
                    producer.flush(self.timeout)
                finally:
                    _discard(producer)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    # -- one batch ------------------------------------------------------------------------

    def _publish(self, events: Sequence[OutboxEvent]) -> Results:
        deadline = SYSTEM_CLOCK.monotonic() + self.timeout
        ready, results = encode_batch(events, self._encode)
        if not ready:
            return results
        while True:
            refused = self._round(events, ready, results, deadline)
            if refused is None:
                return results
            # Nothing was sent (no producer id, no produce request): send it all again.
            if self._required:
                error = BrokerUnavailable(f"Kafka refused the idempotent producer: {refused}")
                for index, _ in ready:
                    results[index] = error
                return results
            log.warning(
                "Kafka at %s refused the idempotent producer (%s): publishing without "
                "idempotence from now on (one request in flight per connection keeps "
                "each partition's order; a retried request may duplicate a record)",
                self.bootstrap_servers,
                refused,
                extra={
                    "resilience_event": "kafka.idempotence_off",
                    "resilience_backend": self.bootstrap_servers,
                    "resilience_from_state": "idempotent",
                    "resilience_to_state": "not_idempotent",
                },
            )
            self.idempotent = False
            for index, _ in ready:
                results[index] = None

    def _round(
        self,
        events: Sequence[OutboxEvent],
        ready: list[tuple[int, tuple[str, bytes, bytes | None, _Headers]]],
        results: Results,
        deadline: float,
    ) -> str | None:
        """Produce and wait; the reason when the broker refused idempotence, else None."""
        left = deadline - SYSTEM_CLOCK.monotonic()
        if left <= 0:
            error = TimeoutError("the batch used up its timeout before it was sent")
            for index, _ in ready:
                results[index] = error
            return None
        producer = self._producer
        if producer is None:
            producer = self._producer = self._connect()
        reports: dict[int, KafkaError | None] = {}
        failed_keys: set[str] = set()
        sent: list[int] = []
        produce = producer.produce
        for index, (topic, value, key, headers) in ready:
            event_key = events[index].key
            if event_key is not None and event_key in failed_keys:
                results[index] = HeldBack(f"held back behind a failed event of key {event_key!r}")
                continue
            try:
                produce(topic, value, key, on_delivery=_report(reports, index), headers=headers)
            except (KafkaException, BufferError) as error:
                results[index] = error
                if event_key is not None:
                    failed_keys.add(event_key)
            else:
                sent.append(index)
        unsettled = self._wait(producer, sent, reports, deadline)
        refused = self._refused
        broken = self._fatal is not None or unsettled
        if refused is not None or broken:
            _purge(producer)
        outage = broken
        for index in sent:
            if index not in reports:
                results[index] = TimeoutError("no delivery report within the batch's timeout")
                outage = True
                continue
            report = reports[index]
            if report is None:
                self._confirmed = True
            else:
                results[index] = KafkaException(report)
                outage = outage or self._classify_code(report) is Failure.OUTAGE
        if refused is not None and self._confirmed:
            refused = None  # it delivered: whatever it logged was not a refusal
        if outage or refused is not None:
            # Closed, so librdkafka does not reconnect in the background while the
            # breaker is open; a new producer (a new producer id) serves the next batch.
            self._producer = None
            _discard(producer)
        return refused

    def _wait(
        self,
        producer: confluent_kafka.Producer,
        sent: list[int],
        reports: dict[int, KafkaError | None],
        deadline: float,
    ) -> bool:
        """Flush until every sent record has its report; True when some have none."""
        probing = self.idempotent and not self._confirmed
        while True:
            left = max(0.0, deadline - SYSTEM_CLOCK.monotonic())  # flush(-1) would wait forever
            try:
                remaining = producer.flush(min(left, _SLICE) if probing else left)
            except Exception as error:  # a fatal error surfaces from flush()
                self._fatal = self._fatal or repr(error)
                return True
            if remaining == 0 or len(reports) == len(sent):
                return False
            if self._refused is not None or self._fatal is not None or left <= 0:
                return True

    def _connect(self) -> confluent_kafka.Producer:
        self._refused = self._fatal = None
        self._confirmed = False
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": "resilience-outbox",
            "acks": "all",
            "enable.idempotence": self.idempotent,
            # A record not delivered within a batch's timeout is reported, not kept.
            "message.timeout.ms": max(1, int(self.timeout * 1000)),
            # How long a topic may be missing from the metadata before its records
            # fail with UNKNOWN_TOPIC_OR_PART (poison) rather than time out (outage).
            "topic.metadata.propagation.max.ms": max(1, int(self.timeout * 500)),
            "logger": self._watch,
        }
        if not self.idempotent:
            # Without sequence numbers a retried request could overtake a later one.
            conf["max.in.flight.requests.per.connection"] = 1
        if self.max_bytes is not None:
            conf["message.max.bytes"] = min(1_000_000_000, max(1000, self.max_bytes + 1024))
        conf.update(self.config)
        try:
            return confluent_kafka.Producer(conf)
        except KafkaException as error:
            raise BrokerUnavailable(f"cannot create the Kafka producer: {error}") from error

    def _encode(self, event: OutboxEvent) -> tuple[str, bytes, bytes | None, _Headers]:
        topic = event.topic
        if topic not in self._topics:
            if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
                raise EventRejected(
                    f"not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249): "
                    f"{topic[:60]!r}"
                )
            self._topics.add(topic)
        value = event.payload.encode()
        key = None if event.key is None else event.key.encode()
        event_id = event.event_id.encode()
        headers: _Headers = [("event_id", event_id)]
        size = len(value) + len(event_id) + 8
        if key is not None:
            size += len(key)
        for name, text in event.headers.items():
            if name == "event_id":
                continue
            data = text.encode()
            headers.append((name, data))
            size += len(name) + len(data)
        if self.max_bytes is not None and size > self.max_bytes:
            raise EventTooLarge(size, self.max_bytes)
        return topic, value, key, headers

    # -- what librdkafka logs -------------------------------------------------------------

    def _logged(self, facility: str, text: str) -> None:
        text = text.removeprefix("[thrd:main]: ")
        if not self.idempotent or self._confirmed:
            return
        if facility == "FATAL":
            # Before the first delivery the only fatal errors are the idempotent
            # producer's: the broker lacks it or forbids it.
            self._fatal = text
            self._refused = text
        elif facility == "GETPID" and "Failed to acquire" in text and "Local:" not in text:
            # The broker answered InitProducerId with an error ("Local:" ones are
            # librdkafka's own, such as a transport failure).
            lowered = text.lower()
            if not any(word in lowered for word in _TRANSIENT):
                self._refused = text


def _report(
    reports: dict[int, KafkaError | None], index: int
) -> Callable[[KafkaError | None, Any], None]:
    def report(error: KafkaError | None, _message: Any) -> None:
        reports[index] = error

    return report


def _serve(producer: confluent_kafka.Producer) -> None:
    """Serve the delivery reports that are ready (the purged records' among them)."""
    try:
        producer.poll(0)
    except Exception:  # a fatal error is raised again here; the reports came anyway
        log.debug(
            "kafka: poll after purge raised",
            exc_info=True,
            extra={"resilience_event": "kafka.poll_failed"},
        )


def _purge(producer: confluent_kafka.Producer) -> None:
    """Fail what is queued or in flight (``_PURGE_*`` reports), and serve the reports."""
    try:
        producer.purge(in_queue=True, in_flight=True)
    except Exception:  # after a fatal error, say
        log.debug(
            "kafka: purge raised", exc_info=True, extra={"resilience_event": "kafka.purge_failed"}
        )
    _serve(producer)


def _discard(producer: confluent_kafka.Producer) -> None:
    """Drop what is queued and close the producer (its threads and connections)."""
    _purge(producer)
    try:
        producer.close()
    except Exception:
        log.debug(
            "kafka: close raised", exc_info=True, extra={"resilience_event": "kafka.close_failed"}
        )


class _Watch(logging.Logger):
    """librdkafka's log, read for the idempotent producer's refusal, then passed on at
    debug level (an outage makes librdkafka log every failed connect)."""

    def __init__(self, broker: KafkaBroker) -> None:
        super().__init__("resilience.integrations.outbox.kafka.librdkafka")
        self._broker = broker

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        facility = str(args[0]) if args else ""
        text = str(args[-1]) if args else str(msg)
        self._broker._logged(facility, text)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "librdkafka %s: %s", facility, text, extra={"resilience_event": "kafka.librdkafka"}
            )
