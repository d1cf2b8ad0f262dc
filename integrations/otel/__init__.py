"""OpenTelemetry metrics and span events for every primitive (extra: ``resilience[otel]``).

:class:`OTelMetrics` reads the same telemetry as :class:`resilience.metrics.Metrics`
(the event sink of :mod:`resilience.events`) into an OpenTelemetry meter: observable
counters, up-down counters and gauges whose callbacks read the primitives' plain
integers at collection time, so watching costs the hot path nothing more than the
Prometheus collector does. Histograms and span events are opt-in. The names are listed
in :data:`INSTRUMENTS` and in docs/metrics.md. Nothing registers at import time.
"""

try:
    import opentelemetry.metrics as _metrics  # noqa: F401 - the extra's check
    import opentelemetry.trace as _trace  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised by tests/test_otel.py
    raise ImportError(
        "resilience.integrations.otel needs opentelemetry-api: pip install 'resilience[otel]'"
    ) from error

from resilience.integrations.otel._meter import INSTRUMENTS, SPAN_EVENTS, OTelMetrics

__all__ = ["INSTRUMENTS", "SPAN_EVENTS", "OTelMetrics"]
