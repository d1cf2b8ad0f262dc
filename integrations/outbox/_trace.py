"""W3C trace context across the outbox: stamped into an event's headers at enqueue,
continued by the inbox on the consumer's side.

OpenTelemetry is optional and this module never imports it. A span can be active only
in a process that has imported ``opentelemetry.trace``, so when that module is not in
``sys.modules`` there is nothing to stamp and the check costs one dictionary lookup; with
it but no valid span, one context lookup more. Only then are the two headers formatted,
as the W3C propagator would (``traceparent``, and ``tracestate`` when not empty), without
going through the global propagator: the stamp is always W3C, whatever else the
application propagates.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Final

__all__ = ["TRACE_HEADERS", "consumer_span", "current_headers", "trace_carrier"]

#: The header names the stamp writes (W3C Trace Context).
TRACE_HEADERS: Final = ("traceparent", "tracestate")
_TRACER_NAME: Final = "resilience.integrations.outbox"


def current_headers() -> dict[str, str] | None:
    """``traceparent`` (and ``tracestate``) of the active span, or None when there is no
    valid span or OpenTelemetry was never imported."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    span = trace.get_current_span()
    if span is trace.INVALID_SPAN:  # what no span at all looks like: the common case
        return None
    context = span.get_span_context()
    if not context.is_valid:
        return None
    headers = {
        "traceparent": (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        )
    }
    state = context.trace_state
    if state:
        headers["tracestate"] = state.to_header()
    return headers


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return None
    return None


def trace_carrier(headers: object) -> dict[str, str]:
    """The trace headers of a delivered message, in whichever form its broker gives them:
    a mapping of str or bytes (RabbitMQ, NATS, an :class:`OutboxEvent`'s headers), a list
    of ``(name, bytes)`` pairs (Kafka), the JSON text of a Redis Streams entry's
    ``headers`` field, or the entry's whole field mapping. Names are matched without
    regard to case; anything unreadable is left out."""
    if headers is None:
        return {}
    text = _text(headers)
    if text is not None:
        try:
            headers = json.loads(text)
        except ValueError:
            return {}
    if isinstance(headers, Mapping):
        pairs: Any = headers.items()
    elif isinstance(headers, list | tuple):
        pairs = [p for p in headers if isinstance(p, list | tuple) and len(p) == 2]
    else:
        return {}
    carrier: dict[str, str] = {}
    nested: str | None = None
    for name, value in pairs:
        name_ = _text(name)
        if name_ is None:
            continue
        lowered = name_.lower()
        if lowered in TRACE_HEADERS:
            value_ = _text(value)
            if value_ is not None:
                carrier[lowered] = value_
        elif lowered == "headers":  # a Redis Streams entry: the headers are JSON inside it
            nested = _text(value)
    if not carrier and nested is not None:
        return trace_carrier(nested)
    return carrier


@contextlib.contextmanager
def consumer_span(
    headers: object,
    *,
    consumer: str,
    event_id: str,
    topic: str | None,
    tracer_provider: Any = None,
) -> Iterator[Any]:
    """A CONSUMER span around handling one delivered event, or nothing (``None``) when
    OpenTelemetry was never imported.

    With no span active, the span continues the producer's trace (its parent is the span
    that enqueued the event). Inside a span of the consumer's own (a batch, a request) it
    stays in that trace. Either way it links to the producer's span. An exception is
    recorded on the span and goes on.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        yield None
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    producer = TraceContextTextMapPropagator().extract(trace_carrier(headers))
    remote = trace.get_current_span(producer).get_span_context()
    links = [trace.Link(remote)] if remote.is_valid else []
    ambient = trace.get_current_span().get_span_context().is_valid
    parent = None if ambient or not remote.is_valid else producer
    attributes: dict[str, Any] = {
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": consumer,
        "messaging.message.id": event_id,
    }
    if topic is not None:
        attributes["messaging.destination.name"] = topic
    tracer = trace.get_tracer(_TRACER_NAME, tracer_provider=tracer_provider)
    with tracer.start_as_current_span(
        f"process {topic or consumer}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    ) as span:
        yield span
