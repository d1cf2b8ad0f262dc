"""Prometheus metrics for every primitive, read from their telemetry at scrape time.

Nothing registers at import time: make a :class:`Metrics` on the registry you serve
(``prometheus_client.CollectorRegistry()``; the global ``REGISTRY`` if you want) and hand
it what to watch::

    metrics = Metrics(registry)
    metrics.watch(breaker, limiter, cache, publisher)

Watching costs a primitive next to nothing: its counters are plain integers it keeps
anyway, turned into samples when Prometheus scrapes (see :mod:`resilience.events`). Only
latency histograms need every call timed, so they are opt-in: ``Metrics(registry,
histograms=True)``. Labels are the names you gave the objects (breaker, limiter, cache,
outbox, backend), never a request's key, so the series count stays bounded.

This module knows the telemetry protocol only, no concrete type: anything whose
``telemetry()`` returns a :class:`~resilience.events.Telemetry` can be watched. Links
are re-read at every scrape, so primitives made after ``watch()`` (an httpx transport's
per-host breakers) are exported too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from resilience._clock import SYSTEM_CLOCK
from resilience.breaker.events import CircuitState, Outcome
from resilience.events import (
    DELAY_BUCKETS,
    FAILURE_CLASSES,
    LATENCY_BUCKETS,
    MAX_OUTBOX_TOPICS,
    TIERS,
    Telemetry,
    Watched,
    Watchlist,
)
from resilience.policies.retry import REASONS

__all__ = ["MAX_OUTBOX_TOPICS", "Metrics"]  # the cap, for tests and dashboards

_STATES: Final = tuple(state.value for state in CircuitState)
_OUTCOMES: Final = tuple(outcome.value for outcome in Outcome)


class Metrics:
    """The collectors, registered once in ``registry`` under ``namespace`` (``resilience``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str = "resilience",
        histograms: bool = False,
    ) -> None:
        if not isinstance(registry, CollectorRegistry):
            raise TypeError(
                "registry must be a prometheus_client.CollectorRegistry, "
                f"got {type(registry).__name__}"
            )
        if not isinstance(namespace, str) or not namespace.isidentifier():
            raise ValueError(f"namespace must be a metric-name prefix, got {namespace!r}")
        if not isinstance(histograms, bool):
            raise TypeError(f"histograms must be True or False, got {histograms!r}")
        self.registry = registry
        self.namespace = namespace
        self.histograms = histograms
        # Each entry's `since` is its counters' _created timestamp: when watching began.
        self._watched = Watchlist(self._added, now=SYSTEM_CLOCK.time)
        # The histograms' series exist either way (dashboards find them); they fill only
        # when opted in, since timing every call is the one cost watching cannot hide.
        self.breaker_duration = Histogram(
            "breaker_call_duration_seconds", "Duration of calls that ran", ["breaker"],
            namespace=namespace, registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.cache_load_duration = Histogram(
            "cache_load_duration_seconds", "Loader call duration", ["cache"],
            namespace=namespace, registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.outbox_delivery_delay = Histogram(
            "outbox_delivery_delay_seconds", "Seconds from enqueue to the broker taking the event",
            ["outbox", "topic"], namespace=namespace, registry=registry, buckets=DELAY_BUCKETS,
        )  # fmt: skip
        registry.register(_Scrape(self))

    # -- what to watch -------------------------------------------------------------------

    def watch(self, *targets: Any) -> None:
        """Watch breakers, limiters, caches, outbox publishers, Redis backends and policies
        (retry, budget, timeout, bulkhead, fallback, a pipeline and its members): anything
        with ``telemetry()``, and what each reports through (re-read at every scrape)."""
        self._watched.add(*targets)

    def _added(self, watched: Watched) -> None:
        self._histogram(watched.telemetry)

    def _histogram(self, telemetry: Telemetry) -> None:
        if telemetry.kind == "outbox":
            if self.histograms and telemetry.listen is not None:
                telemetry.listen(self._delays(telemetry.name), only=telemetry.timed)
            return
        histogram = {"breaker": self.breaker_duration, "cache": self.cache_load_duration}.get(
            telemetry.kind
        )
        if histogram is None:
            return
        child = histogram.labels(telemetry.name)
        if not self.histograms or telemetry.listen is None:
            return

        def observe(event: Any) -> None:
            duration = getattr(event, "duration", None)
            if duration is not None and getattr(event, "kind", "load") == "load":
                child.observe(duration)

        telemetry.listen(observe, only=telemetry.timed)

    def _delays(self, name: str) -> Callable[[Any], None]:
        """Observe a publisher's ``Delivered`` events: ``(topic, seconds)`` pairs. The
        first MAX_OUTBOX_TOPICS topics get a series each, the rest share ``_other``."""
        histogram = self.outbox_delivery_delay
        children: dict[str, Any] = {}

        def observe(event: Any) -> None:
            for topic, delay in getattr(event, "delays", ()):
                child = children.get(topic)
                if child is None:
                    if len(children) < MAX_OUTBOX_TOPICS:
                        child = children[topic] = histogram.labels(name, topic)
                    else:
                        child = histogram.labels(name, "_other")
                child.observe(delay)

        return observe


class _Families:
    """The families of one scrape, each made on first use."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.made: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        family = self.made.get(name)
        if family is None:
            family = self.made[name] = CounterMetricFamily(
                f"{self.namespace}_{name}", doc, labels=labels
            )
        assert isinstance(family, CounterMetricFamily)
        return family

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        family = self.made.get(name)
        if family is None:
            family = self.made[name] = GaugeMetricFamily(
                f"{self.namespace}_{name}", doc, labels=labels
            )
        assert isinstance(family, GaugeMetricFamily)
        return family


def _breaker(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    state = r["state"].value
    gauge = f.gauge("breaker_state", "1 for the breaker's current state, 0 for the others",
                    ["breaker", "state"])  # fmt: skip
    for each in _STATES:
        gauge.add_metric([name, each], 1.0 if each == state else 0.0)
    moves = f.counter("breaker_transitions", "State changes", ["breaker", "from_state", "to_state"])
    for (old, new), n in sorted(r["transitions"].items()):
        moves.add_metric([name, old, new], n, created=created)
    calls = f.counter("breaker_calls", "Calls that ran, by outcome", ["breaker", "outcome"])
    for outcome in _OUTCOMES:
        calls.add_metric([name, outcome], r["calls"].get(outcome, 0), created=created)
    f.counter("breaker_rejected", "Calls rejected without running", ["breaker"]).add_metric(
        [name], r["rejected"], created=created
    )


def _limiter(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    decisions = f.counter("limiter_decisions", "Decisions by limiter", ["limiter", "decision"])
    decisions.add_metric([name, "allowed"], r["allowed"], created=created)
    decisions.add_metric([name, "denied"], r["denied"], created=created)


def _backend(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.gauge(
        "backend_available",
        "1 while a remote backend answers, 0 while its policy applies",
        ["backend", "on_error"],
    ).add_metric([name, r["on_error"]], 1.0 if r["available"] else 0.0)
    f.counter("backend_outages", "Times a remote backend went away", ["backend"]).add_metric(
        [name], r["outages"], created=created
    )
    f.counter("backend_errors", "Remote backend calls that failed", ["backend"]).add_metric(
        [name], r["errors"]
    )
    f.counter(
        "backend_fallbacks",
        "Calls answered by the on_error policy instead of the backend",
        ["backend"],
    ).add_metric([name], r["fallbacks"])


def _cache(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    hits = f.counter("cache_hits", "Hits by tier", ["cache", "tier"])
    misses = f.counter("cache_misses", "Misses by tier", ["cache", "tier"])
    for tier in TIERS:
        hits.add_metric([name, tier], r["hits"].get(tier, 0), created=created)
        misses.add_metric([name, tier], r["misses"].get(tier, 0), created=created)
    for key, metric, doc in (
        ("loads", "cache_loads", "Loader calls"),
        ("load_errors", "cache_load_errors", "Loader calls that raised"),
        ("stale", "cache_stale_served", "Stale values served while loading failed"),
        ("invalidated", "cache_invalidations",
         "Local entries dropped for another instance's write"),
    ):  # fmt: skip
        f.counter(metric, doc, ["cache"]).add_metric([name], r[key], created=created)
    errors = f.counter("cache_errors", "Entries that could not be read (corrupt or unsigned)",
                       ["cache", "tier"])  # fmt: skip
    for tier, n in sorted(r["errors"].items()):
        if n:
            errors.add_metric([name, tier], n, created=created)


def _outbox(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    stats = r["stats"]
    if stats is not None:  # figures arrive with the publisher's stats, every stats_interval
        for attr, metric, doc in (
            ("pending", "outbox_pending", "Rows waiting to be published"),
            ("in_flight", "outbox_in_flight", "Rows leased to a relay"),
            ("oldest_pending_age", "outbox_oldest_pending_age_seconds",
             "Age of the oldest pending row"),
            ("dead", "outbox_dead", "Rows in the dead state"),
            ("blocked_keys", "outbox_blocked_keys", "Keys waiting behind a failing head"),
        ):  # fmt: skip
            f.gauge(metric, doc, ["outbox"]).add_metric([name], getattr(stats, attr) or 0.0)
    f.counter("outbox_published", "Events published", ["outbox"]).add_metric(
        [name], r["published"], created=created
    )
    failures = f.counter(
        "outbox_failures", "Events that failed to publish, by class", ["outbox", "class"]
    )
    for kind in FAILURE_CLASSES:
        failures.add_metric([name, kind], r["failures"].get(kind, 0), created=created)
    f.counter("outbox_died", "Events moved to the dead state", ["outbox"]).add_metric(
        [name], r["died"], created=created
    )
    f.counter(
        "outbox_breaker_open_polls", "Polls that found the breaker open", ["outbox"]
    ).add_metric([name], r["breaker_open_polls"], created=created)


def _retry(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.counter("retry_calls", "Calls made through a retry policy (first attempts)",
              ["policy"]).add_metric([name], r["calls"], created=created)  # fmt: skip
    f.counter("retry_retries", "Attempts after the first", ["policy"]).add_metric(
        [name], r["retries"], created=created
    )
    f.counter(
        "retry_attempts", "Attempts in all: first attempts and retries", ["policy"]
    ).add_metric([name], r["calls"] + r["retries"], created=created)
    gave_up = f.counter("retry_gave_up", "Calls the policy stopped retrying, by reason",
                        ["policy", "reason"])  # fmt: skip
    for reason in REASONS:
        gave_up.add_metric([name, reason], r["gave_up"].get(reason, 0), created=created)


def _budget(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.counter("retry_budget_exhausted", "Retries refused by a spent retry budget",
              ["budget"]).add_metric([name], r["exhausted"], created=created)  # fmt: skip
    f.counter("retry_budget_withdrawals", "Retries the budget allowed", ["budget"]).add_metric(
        [name], r["withdrawals"], created=created
    )
    f.gauge("retry_budget_balance", "Retries the budget would allow now", ["budget"]).add_metric(
        [name], float(r["balance"])
    )


def _timeout(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.counter("timeout_calls", "Calls run under a timeout", ["policy"]).add_metric(
        [name], r["calls"], created=created
    )
    f.counter("timeout_expired", "Async calls cancelled at their deadline, and calls refused "
              "because an enclosing deadline had passed", ["policy"]).add_metric(
        [name], r["timeouts"], created=created)  # fmt: skip
    f.counter("timeout_overruns", "Sync calls that returned after their deadline",
              ["policy"]).add_metric([name], r["overruns"], created=created)  # fmt: skip


def _bulkhead(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.counter("bulkhead_admitted", "Calls given a slot", ["bulkhead"]).add_metric(
        [name], r["admitted"], created=created
    )
    f.counter("bulkhead_rejected", "Calls refused (no slot, no room or time to wait)",
              ["bulkhead"]).add_metric([name], r["rejected"], created=created)  # fmt: skip
    f.gauge("bulkhead_active", "Calls holding a slot", ["bulkhead"]).add_metric(
        [name], float(r["active"])
    )
    f.gauge("bulkhead_queue", "Callers waiting for a slot", ["bulkhead"]).add_metric(
        [name], float(r["waiting"])
    )
    f.gauge("bulkhead_max_concurrent", "Slots", ["bulkhead"]).add_metric(
        [name], float(r["max_concurrent"])
    )


def _fallback(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.counter("fallback_calls", "Calls run under a fallback", ["policy"]).add_metric(
        [name], r["calls"], created=created
    )
    f.counter("fallback_used", "Calls answered by the fallback", ["policy"]).add_metric(
        [name], r["fallbacks"], created=created
    )


def _concurrency(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    f.gauge("concurrency_limit", "The adaptive limit: calls allowed at once now",
            ["policy"]).add_metric([name], float(r["limit"]))  # fmt: skip
    f.gauge("concurrency_in_flight", "Calls holding a slot", ["policy"]).add_metric(
        [name], float(r["in_flight"])
    )
    f.gauge("concurrency_queue", "Callers waiting for a slot", ["policy"]).add_metric(
        [name], float(r["waiting"])
    )
    f.counter("concurrency_admitted", "Calls given a slot", ["policy"]).add_metric(
        [name], r["admitted"], created=created
    )
    f.counter("concurrency_rejected", "Calls refused (no slot, no room or time to wait)",
              ["policy"]).add_metric([name], r["rejected"], created=created)  # fmt: skip
    f.counter("concurrency_dropped", "Calls counted as drops (timeouts, drop_on errors)",
              ["policy"]).add_metric([name], r["dropped"], created=created)  # fmt: skip
    partitions = r.get("partitions") or {}
    if partitions:
        limit = f.gauge("concurrency_partition_limit", "A partition's guaranteed share",
                        ["policy", "partition"])  # fmt: skip
        busy = f.gauge("concurrency_partition_in_flight", "Slots a partition holds",
                       ["policy", "partition"])  # fmt: skip
        for partition, figures in sorted(partitions.items()):
            limit.add_metric([name, partition], float(figures["limit"]))
            busy.add_metric([name, partition], float(figures["in_flight"]))


def _hedge(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    for key, metric, doc in (
        ("calls", "hedge_calls", "Calls run under a hedge policy"),
        ("hedges", "hedge_hedges", "Extra attempts started because a call was slow"),
        ("wins", "hedge_wins", "Calls answered by an extra attempt"),
        ("refused", "hedge_budget_refused", "Extra attempts the retry budget refused"),
    ):
        f.counter(metric, doc, ["policy"]).add_metric([name], r[key], created=created)


def _nothing(f: _Families, name: str, r: Mapping[str, Any], created: float) -> None:
    """A pipeline: its members report for it."""


_BY_KIND: Final[dict[str, Callable[[_Families, str, Mapping[str, Any], float], None]]] = {
    "breaker": _breaker,
    "limiter": _limiter,
    "backend": _backend,
    "cache": _cache,
    "outbox": _outbox,
    "retry": _retry,
    "budget": _budget,
    "timeout": _timeout,
    "bulkhead": _bulkhead,
    "fallback": _fallback,
    "pipeline": _nothing,
    "concurrency": _concurrency,
    "hedge": _hedge,
}


class _Scrape(Collector):
    """Every watched primitive's figures, read when Prometheus asks."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families = _Families(self.metrics.namespace)
        for watched in self.metrics._watched.refresh():
            t = watched.telemetry
            _BY_KIND[t.kind](families, t.name, t.read(), watched.since)
        yield from families.made.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names vary with what is watched; nothing to check at register
