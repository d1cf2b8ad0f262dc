"""Prometheus metrics for every primitive, fed by their listener hooks.

Nothing registers at import time: make a :class:`Metrics` on the registry you serve
(``prometheus_client.CollectorRegistry()``; the global ``REGISTRY`` if you want) and hand
it what to watch::

    metrics = Metrics(registry)
    metrics.watch(breaker, limiter, cache, publisher)

Labels are the names you gave the objects (breaker, limiter, cache, outbox, backend),
never a request's key, so the series count stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from resilience._remote import BackendStateChanged, RemoteGuard
from resilience.breaker import (
    CallFinished,
    CallRejected,
    CircuitBreaker,
    CircuitState,
    Outcome,
    StateChanged,
)
from resilience.cache.cache import CacheEvent, TwoTierCache
from resilience.limiter.limiter import LimiterDecision, _Limiter

__all__ = ["Metrics"]

_STATES: Final = tuple(state for state in CircuitState)
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """The collectors, registered once in ``registry`` under ``namespace`` (``resilience``)."""

    def __init__(self, registry: CollectorRegistry, *, namespace: str = "resilience") -> None:
        if not isinstance(registry, CollectorRegistry):
            raise TypeError(
                "registry must be a prometheus_client.CollectorRegistry, "
                f"got {type(registry).__name__}"
            )
        if not isinstance(namespace, str) or not namespace.isidentifier():
            raise ValueError(f"namespace must be a metric-name prefix, got {namespace!r}")
        self.registry = registry
        ns, reg = namespace, registry
        # -- breaker
        self.breaker_state = Gauge(
            "breaker_state", "1 for the breaker's current state, 0 for the others",
            ["breaker", "state"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.breaker_transitions = Counter(
            "breaker_transitions", "State changes", ["breaker", "from_state", "to_state"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.breaker_calls = Counter(
            "breaker_calls", "Calls that ran, by outcome", ["breaker", "outcome"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.breaker_rejected = Counter(
            "breaker_rejected", "Calls rejected without running", ["breaker"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.breaker_duration = Histogram(
            "breaker_call_duration_seconds", "Duration of calls that ran", ["breaker"],
            namespace=ns, registry=reg, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        # -- limiter
        self.limiter_decisions = Counter(
            "limiter_decisions", "Decisions by limiter", ["limiter", "decision"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.backend_available = Gauge(
            "backend_available", "1 while a remote backend answers, 0 while its policy applies",
            ["backend", "on_error"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.backend_outages = Counter(
            "backend_outages", "Times a remote backend went away", ["backend"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self._guards = _GuardCounters(ns)
        reg.register(self._guards)
        # -- cache
        self.cache_hits = Counter(
            "cache_hits", "Hits by tier", ["cache", "tier"], namespace=ns, registry=reg
        )
        self.cache_misses = Counter(
            "cache_misses", "Misses by tier", ["cache", "tier"], namespace=ns, registry=reg
        )
        self.cache_loads = Counter(
            "cache_loads", "Loader calls", ["cache"], namespace=ns, registry=reg
        )
        self.cache_load_errors = Counter(
            "cache_load_errors", "Loader calls that raised", ["cache"], namespace=ns, registry=reg
        )
        self.cache_load_duration = Histogram(
            "cache_load_duration_seconds", "Loader call duration", ["cache"],
            namespace=ns, registry=reg, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.cache_stale = Counter(
            "cache_stale_served", "Stale values served while loading failed", ["cache"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.cache_invalidations = Counter(
            "cache_invalidations", "Local entries dropped for another instance's write",
            ["cache"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.cache_errors = Counter(
            "cache_errors", "Entries that could not be read (corrupt or unsigned)",
            ["cache", "tier"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        # -- outbox
        self.outbox_pending = Gauge(
            "outbox_pending", "Rows waiting to be published", ["outbox"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.outbox_in_flight = Gauge(
            "outbox_in_flight", "Rows leased to a relay", ["outbox"], namespace=ns, registry=reg
        )
        self.outbox_oldest_age = Gauge(
            "outbox_oldest_pending_age_seconds", "Age of the oldest pending row", ["outbox"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.outbox_dead = Gauge(
            "outbox_dead", "Rows in the dead state", ["outbox"], namespace=ns, registry=reg
        )
        self.outbox_blocked_keys = Gauge(
            "outbox_blocked_keys", "Keys waiting behind a failing head", ["outbox"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.outbox_published = Counter(
            "outbox_published", "Events published", ["outbox"], namespace=ns, registry=reg
        )
        self.outbox_failures = Counter(
            "outbox_failures", "Events that failed to publish, by class", ["outbox", "class"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.outbox_died = Counter(
            "outbox_died", "Events moved to the dead state", ["outbox"], namespace=ns, registry=reg
        )
        self.outbox_breaker_open = Counter(
            "outbox_breaker_open_polls", "Polls that found the breaker open", ["outbox"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self._watched: set[int] = set()

    # -- what to watch -------------------------------------------------------------------

    def watch(self, *targets: Any) -> None:
        """Watch breakers, limiters, caches, outbox publishers and Redis backends."""
        for target in targets:
            if id(target) in self._watched:
                continue
            self._watched.add(id(target))
            if isinstance(target, CircuitBreaker):
                self._breaker(target)
            elif isinstance(target, _Limiter):
                self._limiter(target)
            elif isinstance(target, TwoTierCache):
                self._cache(target)
            elif _is_publisher(target):
                self._publisher(target)
            elif isinstance(getattr(target, "guard", None), RemoteGuard):
                self._backend(target.guard)
            else:
                self._watched.discard(id(target))
                raise TypeError(
                    "watch() takes breakers, limiters, caches, outbox publishers and "
                    f"Redis backends, got {type(target).__name__}"
                )

    def _breaker(self, breaker: CircuitBreaker) -> None:
        name = breaker.name
        self._set_state(name, breaker.state)  # present from the start, CLOSED included
        # Children bound once: a labels() lookup per call costs more than the increment.
        calls = {o: self.breaker_calls.labels(name, o.value) for o in Outcome}
        rejected = self.breaker_rejected.labels(name)
        duration = self.breaker_duration.labels(name)

        def listen(event: object) -> None:
            if isinstance(event, CallFinished):
                calls[event.outcome].inc()
                if event.duration is not None:
                    duration.observe(event.duration)
            elif isinstance(event, CallRejected):
                rejected.inc()
            elif isinstance(event, StateChanged):
                self.breaker_transitions.labels(name, event.old.value, event.new.value).inc()
                self._set_state(name, event.new)

        breaker.add_listener(listen)

    def _set_state(self, name: str, state: CircuitState) -> None:
        for each in _STATES:
            self.breaker_state.labels(name, each.value).set(1.0 if each is state else 0.0)

    def _limiter(self, limiter: _Limiter) -> None:
        allowed = self.limiter_decisions.labels(limiter.name, "allowed")
        denied = self.limiter_decisions.labels(limiter.name, "denied")

        def listen(event: LimiterDecision) -> None:
            (allowed if event.decision.allowed else denied).inc()

        limiter.add_listener(listen)
        if isinstance(getattr(limiter.backend, "guard", None), RemoteGuard):
            self.watch(limiter.backend)

    def _backend(self, guard: RemoteGuard) -> None:
        name = guard.name
        gauge = self.backend_available.labels(name, guard.on_error.value)
        gauge.set(1.0 if guard.available else 0.0)
        outages = self.backend_outages.labels(name)
        self._guards.guards.append(guard)
        self.watch(guard.breaker)

        def listen(event: object) -> None:
            if isinstance(event, BackendStateChanged):
                gauge.set(1.0 if event.available else 0.0)
                if not event.available:
                    outages.inc()

        guard.add_listener(listen)

    def _cache(self, cache: TwoTierCache) -> None:
        name = cache.name
        tiers = ("local", "remote")
        for tier in tiers:
            self.cache_hits.labels(name, tier)
            self.cache_misses.labels(name, tier)
        loads = self.cache_loads.labels(name)
        load_errors = self.cache_load_errors.labels(name)
        load_time = self.cache_load_duration.labels(name)
        stale = self.cache_stale.labels(name)
        invalidated = self.cache_invalidations.labels(name)

        def listen(event: CacheEvent) -> None:
            kind = event.kind
            if kind == "hit":
                self.cache_hits.labels(name, event.tier or "local").inc()
            elif kind == "miss":
                self.cache_misses.labels(name, event.tier or "local").inc()
            elif kind == "load":
                loads.inc()
                if event.duration is not None:
                    load_time.observe(event.duration)
            elif kind == "load_error":
                loads.inc()
                load_errors.inc()
            elif kind == "stale":
                stale.inc()
            elif kind == "invalidated":
                invalidated.inc()
            elif kind == "corrupt":
                self.cache_errors.labels(name, event.tier or "remote").inc()

        cache.add_listener(listen)
        remote = getattr(cache, "remote", None)
        if isinstance(getattr(remote, "guard", None), RemoteGuard):
            self.watch(remote)

    def _publisher(self, publisher: Any) -> None:
        from resilience.integrations.outbox import BatchResult, OutboxStats

        name = str(publisher.name)
        published = self.outbox_published.labels(name)
        died = self.outbox_died.labels(name)
        opened = self.outbox_breaker_open.labels(name)
        failures = {
            k: self.outbox_failures.labels(name, k) for k in ("outage", "poison", "unknown")
        }

        def listen(event: object) -> None:
            if isinstance(event, BatchResult):
                published.inc(event.published)
                failures["outage"].inc(event.outages)
                failures["poison"].inc(event.poison)
                failures["unknown"].inc(event.unknown)
                died.inc(event.dead)
                if event.breaker_open:
                    opened.inc()
            elif isinstance(event, OutboxStats):
                self.outbox_pending.labels(name).set(event.pending)
                self.outbox_in_flight.labels(name).set(event.in_flight)
                self.outbox_dead.labels(name).set(event.dead)
                self.outbox_blocked_keys.labels(name).set(event.blocked_keys)
                self.outbox_oldest_age.labels(name).set(event.oldest_pending_age or 0.0)

        publisher.add_listener(listen)
        self.watch(publisher.breaker)


def _is_publisher(target: object) -> bool:
    cls = type(target)
    return cls.__name__ == "OutboxPublisher" and cls.__module__.startswith(
        "resilience.integrations.outbox"
    )


class _GuardCounters(Collector):
    """Backend errors and policy fallbacks, read from the guards' counters at scrape time
    (the calls themselves pay one integer increment, not a metrics call)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.guards: list[RemoteGuard] = []

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            f"{self.namespace}_backend_errors",
            "Remote backend calls that failed",
            labels=["backend"],
        )
        fallbacks = CounterMetricFamily(
            f"{self.namespace}_backend_fallbacks",
            "Calls answered by the on_error policy instead of the backend",
            labels=["backend"],
        )
        for guard in self.guards:
            errors.add_metric([guard.name], guard.errors)
            fallbacks.add_metric([guard.name], guard.fallbacks)
        yield errors
        yield fallbacks

    def describe(self) -> Iterator[Metric]:
        return iter(())
