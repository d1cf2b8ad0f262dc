"""The OpenTelemetry consumer of the telemetry protocol (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation

import resilience
from resilience import CallFinished, CallRejected, CircuitState, Outcome
from resilience.clock import SYSTEM_CLOCK
from resilience.events import (
    DELAY_BUCKETS,
    FAILURE_CLASSES,
    LATENCY_BUCKETS,
    MAX_OUTBOX_TOPICS,
    TIERS,
    Telemetry,
    Watched,
    Watchlist,
    in_context,
    tallies,
)
from resilience.policies.retry import REASONS

__all__ = ["INSTRUMENTS", "SPAN_EVENTS", "OTelMetrics"]

# Attribute names: one vocabulary for every instrument (docs/metrics.md).
NAME: Final = "resilience.name"
_STATES: Final = tuple(state.value for state in CircuitState)
_OUTCOMES: Final = tuple(outcome.value for outcome in Outcome)

Points = Iterable[tuple[Mapping[str, str], float]]


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    instrument: str  # counter, updown or gauge (observable)
    unit: str
    description: str
    kind: str  # the telemetry kind it reads
    points: Callable[[Mapping[str, Any]], Points]


def _one(key: str) -> Callable[[Mapping[str, Any]], Points]:
    return lambda r: (({}, r[key]),)


def _by(attr: str, values: Iterable[str], key: str) -> Callable[[Mapping[str, Any]], Points]:
    options = tuple(values)
    return lambda r: (({attr: v}, r[key].get(v, 0)) for v in options)


def _state(r: Mapping[str, Any]) -> Points:
    state = r["state"].value
    return (({"resilience.state": s}, 1 if s == state else 0) for s in _STATES)


def _transitions(r: Mapping[str, Any]) -> Points:
    return (
        ({"resilience.from_state": old, "resilience.to_state": new}, n)
        for (old, new), n in sorted(r["transitions"].items())
    )


def _decisions(r: Mapping[str, Any]) -> Points:
    return (({"resilience.decision": "allowed"}, r["allowed"]),
            ({"resilience.decision": "denied"}, r["denied"]))  # fmt: skip


def _requests(r: Mapping[str, Any]) -> Points:
    for tier in TIERS:
        yield {"resilience.tier": tier, "resilience.result": "hit"}, r["hits"].get(tier, 0)
        yield {"resilience.tier": tier, "resilience.result": "miss"}, r["misses"].get(tier, 0)


def _loads(r: Mapping[str, Any]) -> Points:
    return (({"resilience.outcome": "success"}, r["loads"] - r["load_errors"]),
            ({"resilience.outcome": "error"}, r["load_errors"]))  # fmt: skip


def _stats(attr: str) -> Callable[[Mapping[str, Any]], Points]:
    def points(r: Mapping[str, Any]) -> Points:
        stats = r["stats"]  # there once the publisher read its store's figures
        return () if stats is None else (({}, getattr(stats, attr) or 0),)

    return points


def _partitions(figure: str) -> Callable[[Mapping[str, Any]], Points]:
    def points(r: Mapping[str, Any]) -> Points:
        parts = r.get("partitions") or {}
        return (({"resilience.partition": p}, f[figure]) for p, f in sorted(parts.items()))

    return points


def _attempts(r: Mapping[str, Any]) -> Points:
    return (({}, r["calls"] + r["retries"]),)


C, U, G = "counter", "updown", "gauge"

_ROWS: Final[tuple[tuple[Any, ...], ...]] = (
    # breaker.state comes first: its callback re-reads the links (see _callback).
    ("resilience.breaker.state", U, "1", "1 for the breaker's current state, 0 for the others",
     "breaker", _state),
    ("resilience.breaker.calls", C, "{call}", "Calls that ran, by outcome", "breaker",
     _by("resilience.outcome", _OUTCOMES, "calls")),
    ("resilience.breaker.rejections", C, "{call}", "Calls rejected without running",
     "breaker", _one("rejected")),
    ("resilience.breaker.transitions", C, "{transition}", "State changes", "breaker",
     _transitions),
    ("resilience.limiter.decisions", C, "{decision}", "Decisions, allowed or denied",
     "limiter", _decisions),
    ("resilience.backend.available", U, "1", "1 while a remote backend answers", "backend",
     lambda r: (({"resilience.on_error": r["on_error"]}, 1 if r["available"] else 0),)),
    ("resilience.backend.outages", C, "{outage}", "Times a remote backend went away",
     "backend", _one("outages")),
    ("resilience.backend.errors", C, "{error}", "Remote backend calls that failed",
     "backend", _one("errors")),
    ("resilience.backend.fallbacks", C, "{call}", "Calls answered by the on_error policy",
     "backend", _one("fallbacks")),
    ("resilience.cache.requests", C, "{request}", "Lookups, by tier and hit or miss",
     "cache", _requests),
    ("resilience.cache.loads", C, "{call}", "Loader calls, by outcome", "cache", _loads),
    ("resilience.cache.stale_served", C, "{value}", "Stale values served while loading failed",
     "cache", _one("stale")),
    ("resilience.cache.invalidations", C, "{entry}",
     "Local entries dropped for another instance's write", "cache", _one("invalidated")),
    ("resilience.cache.errors", C, "{entry}", "Entries that could not be read", "cache",
     _by("resilience.tier", TIERS, "errors")),
    ("resilience.outbox.published", C, "{event}", "Events published", "outbox",
     _one("published")),
    ("resilience.outbox.failures", C, "{event}", "Events that failed to publish, by class",
     "outbox", _by("resilience.failure_class", FAILURE_CLASSES, "failures")),
    ("resilience.outbox.died", C, "{event}", "Events moved to the dead state", "outbox",
     _one("died")),
    ("resilience.outbox.breaker_open_polls", C, "{poll}", "Polls that found the breaker open",
     "outbox", _one("breaker_open_polls")),
    ("resilience.outbox.pending", U, "{event}", "Rows waiting to be published", "outbox",
     _stats("pending")),
    ("resilience.outbox.in_flight", U, "{event}", "Rows leased to a relay", "outbox",
     _stats("in_flight")),
    ("resilience.outbox.dead", U, "{event}", "Rows in the dead state", "outbox",
     _stats("dead")),
    ("resilience.outbox.blocked_keys", U, "{key}", "Keys waiting behind a failing head",
     "outbox", _stats("blocked_keys")),
    ("resilience.outbox.oldest_pending_age", G, "s", "Age of the oldest pending row",
     "outbox", _stats("oldest_pending_age")),
    ("resilience.retry.calls", C, "{call}", "Calls made through a retry policy", "retry",
     _one("calls")),
    ("resilience.retry.retries", C, "{attempt}", "Attempts after the first", "retry",
     _one("retries")),
    ("resilience.retry.attempts", C, "{attempt}", "Attempts in all: first ones and retries",
     "retry", _attempts),
    ("resilience.retry.gave_up", C, "{call}", "Calls the policy stopped retrying, by reason",
     "retry", _by("resilience.reason", REASONS, "gave_up")),
    ("resilience.retry_budget.withdrawals", C, "{retry}", "Retries the budget allowed",
     "budget", _one("withdrawals")),
    ("resilience.retry_budget.exhausted", C, "{retry}", "Retries a spent budget refused",
     "budget", _one("exhausted")),
    ("resilience.retry_budget.balance", G, "{retry}", "Retries the budget would allow now",
     "budget", _one("balance")),
    ("resilience.timeout.calls", C, "{call}", "Calls run under a timeout", "timeout",
     _one("calls")),
    ("resilience.timeout.expired", C, "{call}", "Calls cancelled at (or refused after) "
     "their deadline", "timeout", _one("timeouts")),
    ("resilience.timeout.overruns", C, "{call}", "Sync calls that returned after their "
     "deadline", "timeout", _one("overruns")),
    ("resilience.bulkhead.admitted", C, "{call}", "Calls given a slot", "bulkhead",
     _one("admitted")),
    ("resilience.bulkhead.rejected", C, "{call}", "Calls refused", "bulkhead",
     _one("rejected")),
    ("resilience.bulkhead.active", U, "{call}", "Calls holding a slot", "bulkhead",
     _one("active")),
    ("resilience.bulkhead.queue", U, "{call}", "Callers waiting for a slot", "bulkhead",
     _one("waiting")),
    ("resilience.bulkhead.max_concurrent", U, "{call}", "Slots", "bulkhead",
     _one("max_concurrent")),
    ("resilience.fallback.calls", C, "{call}", "Calls run under a fallback", "fallback",
     _one("calls")),
    ("resilience.fallback.used", C, "{call}", "Calls answered by the fallback", "fallback",
     _one("fallbacks")),
    ("resilience.concurrency.limit", U, "{call}", "The adaptive limit now", "concurrency",
     _one("limit")),
    ("resilience.concurrency.in_flight", U, "{call}", "Calls holding a slot", "concurrency",
     _one("in_flight")),
    ("resilience.concurrency.queue", U, "{call}", "Callers waiting for a slot",
     "concurrency", _one("waiting")),
    ("resilience.concurrency.admitted", C, "{call}", "Calls given a slot", "concurrency",
     _one("admitted")),
    ("resilience.concurrency.rejected", C, "{call}", "Calls refused", "concurrency",
     _one("rejected")),
    ("resilience.concurrency.dropped", C, "{call}", "Calls counted as drops", "concurrency",
     _one("dropped")),
    ("resilience.concurrency.partition.limit", U, "{call}", "A partition's guaranteed share",
     "concurrency", _partitions("limit")),
    ("resilience.concurrency.partition.in_flight", U, "{call}", "Slots a partition holds",
     "concurrency", _partitions("in_flight")),
    ("resilience.hedge.calls", C, "{call}", "Calls run under a hedge policy", "hedge",
     _one("calls")),
    ("resilience.hedge.hedges", C, "{attempt}", "Extra attempts started", "hedge",
     _one("hedges")),
    ("resilience.hedge.wins", C, "{call}", "Calls an extra attempt answered", "hedge",
     _one("wins")),
    ("resilience.hedge.budget_refused", C, "{attempt}", "Extra attempts the budget refused",
     "hedge", _one("refused")),
)  # fmt: skip
#: Every observable instrument: (name, type, unit, description, kind, points).
INSTRUMENTS: Final[tuple[_Spec, ...]] = tuple(_Spec(*row) for row in _ROWS)

#: The span events ``span_events=True`` adds to the current span, by what reports them.
SPAN_EVENTS: Final = {
    "resilience.breaker.rejected": "a breaker refused a call (attributes: state, retry_after)",
    "resilience.rate_limited": "a limiter denied a request (retry_after)",
    "resilience.retry": "a retry is about to happen (attempt, delay, error.type)",
    "resilience.timeout": "a call hit its deadline (reason: expired, or overrun for a sync "
    "call that returned late)",
    "resilience.bulkhead.rejected": "a bulkhead had no slot",
    "resilience.concurrency.rejected": "an adaptive concurrency limit had no slot",
    "resilience.cache.hit": "a cache lookup hit (tier)",
    "resilience.cache.miss": "a cache lookup missed (tier)",
    "resilience.outbox.published": "a batch was published (count, failed)",
}
_RESULTS: Final = {"hit": "resilience.cache.hit", "miss": "resilience.cache.miss"}


class OTelMetrics:
    """Feed an OpenTelemetry meter from the primitives you watch.

    ``meter_provider``: None for the global one (``opentelemetry.metrics``). With
    ``histograms=True`` call, load and delivery durations are recorded (every call timed,
    as with Prometheus' opt-in histograms). With ``span_events=True`` rejections,
    retries, timeouts, cache hits and misses and outbox publishes add an event to the
    current span: that needs a listener at event time, which takes breakers, caches and
    limiters off their lock-free paths, so it is off by default.
    """

    def __init__(
        self,
        meter_provider: Any = None,
        *,
        histograms: bool = False,
        span_events: bool = False,
    ) -> None:
        if meter_provider is None:
            meter_provider = otel_metrics.get_meter_provider()
        if not callable(getattr(meter_provider, "get_meter", None)):
            raise TypeError(
                "meter_provider must be an opentelemetry MeterProvider or None, "
                f"got {type(meter_provider).__name__}"
            )
        for flag, given in (("histograms", histograms), ("span_events", span_events)):
            if not isinstance(given, bool):
                raise TypeError(f"{flag} must be True or False, got {given!r}")
        self.histograms = histograms
        self.span_events = span_events
        self.meter = meter_provider.get_meter("resilience", resilience.__version__)
        self._watched = Watchlist(self._added, now=SYSTEM_CLOCK.time)
        make = {
            C: self.meter.create_observable_counter,
            U: self.meter.create_observable_up_down_counter,
            G: self.meter.create_observable_gauge,
        }
        for index, spec in enumerate(INSTRUMENTS):
            make[spec.instrument](
                spec.name,
                callbacks=[self._callback(spec, refresh=index == 0)],
                unit=spec.unit,
                description=spec.description,
            )
        self.breaker_duration = self._histogram(
            "resilience.breaker.call.duration", "Duration of calls that ran", LATENCY_BUCKETS
        )
        self.cache_load_duration = self._histogram(
            "resilience.cache.load.duration", "Loader call duration", LATENCY_BUCKETS
        )
        self.outbox_delivery_delay = self._histogram(
            "resilience.outbox.delivery.delay",
            "Seconds from enqueue to the broker taking the event",
            DELAY_BUCKETS,
        )

    def _histogram(self, name: str, description: str, buckets: tuple[float, ...]) -> Any:
        try:
            return self.meter.create_histogram(
                name, unit="s", description=description,
                explicit_bucket_boundaries_advisory=buckets,
            )  # fmt: skip
        except TypeError:  # opentelemetry-api < 1.23: the SDK's default buckets
            return self.meter.create_histogram(name, unit="s", description=description)

    # -- what to watch -------------------------------------------------------------------

    def watch(self, *targets: Any) -> None:
        """Watch breakers, limiters, caches, outbox publishers, Redis backends and policies,
        and what each reports through (re-read at every collection), as
        :meth:`resilience.metrics.Metrics.watch` does. Watching twice is harmless."""
        self._watched.add(*targets)

    def _added(self, watched: Watched) -> None:
        telemetry = watched.telemetry
        if self.histograms:
            self._listen_timed(telemetry)
        if self.span_events:
            self._listen_spans(watched.target, telemetry)

    # -- collection ----------------------------------------------------------------------

    def _callback(
        self, spec: _Spec, *, refresh: bool
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        kind, points = spec.kind, spec.points

        def observe(options: CallbackOptions) -> Iterator[Observation]:
            # The SDK runs callbacks in the order instruments were made: the first one
            # re-reads links once per collection. Elsewhere a new link waits one more.
            entries = self._watched.refresh() if refresh else self._watched
            for entry in entries:
                t = entry.telemetry
                if t.kind != kind:
                    continue
                read = t.read()
                for attributes, value in points(read):
                    yield Observation(value, {NAME: t.name, **attributes})

        return observe

    # -- histograms (opt-in) -------------------------------------------------------------

    def _listen_timed(self, telemetry: Telemetry) -> None:
        if telemetry.listen is None:
            return
        name = telemetry.name
        if telemetry.kind == "breaker":
            breaker = self.breaker_duration

            def on_call(event: Any) -> None:
                if event.duration is not None:
                    breaker.record(event.duration, {NAME: name})

            telemetry.listen(on_call, only=(CallFinished,))
        elif telemetry.kind == "cache":
            cache = self.cache_load_duration

            def on_load(event: Any) -> None:
                if getattr(event, "kind", None) == "load" and event.duration is not None:
                    cache.record(event.duration, {NAME: name})

            telemetry.listen(on_load, only=telemetry.timed)
        elif telemetry.kind == "outbox":
            telemetry.listen(self._delays(name), only=telemetry.timed)

    def _delays(self, name: str) -> Callable[[Any], None]:
        histogram, topics = self.outbox_delivery_delay, set[str]()

        def on_delivered(event: Any) -> None:
            for topic, delay in getattr(event, "delays", ()):
                if topic not in topics and len(topics) < MAX_OUTBOX_TOPICS:
                    topics.add(topic)
                shown = topic if topic in topics else "_other"
                histogram.record(delay, {NAME: name, "resilience.topic": shown})

        return on_delivered

    # -- span events (opt-in) ------------------------------------------------------------

    def _listen_spans(self, target: object, telemetry: Telemetry) -> None:
        kind, name = telemetry.kind, telemetry.name
        if kind == "breaker" and telemetry.listen is not None:

            def on_rejected(event: Any) -> None:
                _span_event("resilience.breaker.rejected", name,
                            {"resilience.state": event.state.value,
                             "resilience.retry_after": float(event.retry_after)})  # fmt: skip

            telemetry.listen(in_context(on_rejected), only=(CallRejected,))
        elif kind == "cache" and telemetry.listen is not None:

            def on_lookup(event: Any) -> None:
                shown = _RESULTS.get(getattr(event, "kind", ""))
                if shown is not None:
                    _span_event(shown, name, {"resilience.tier": event.tier or "local"})

            telemetry.listen(in_context(on_lookup))
        elif kind == "outbox" and telemetry.listen is not None:

            def on_batch(event: Any) -> None:
                published = getattr(event, "published", 0)
                failed = sum(getattr(event, k, 0) for k in ("outages", "poison", "unknown"))
                if published or failed:
                    shown = {"resilience.count": published, "resilience.failed": failed}
                    _span_event("resilience.outbox.published", name, shown)

            telemetry.listen(in_context(on_batch))
        elif kind == "limiter" and callable(add := getattr(target, "add_listener", None)):

            def on_decision(event: Any) -> None:
                decision = getattr(event, "decision", None)
                if decision is not None and not decision.allowed:
                    shown = {"resilience.retry_after": float(decision.retry_after)}
                    _span_event("resilience.rate_limited", name, shown)

            add(in_context(on_decision))
        elif kind == "retry" and callable(add := getattr(target, "add_listener", None)):

            def on_retry(event: Any) -> None:
                error = getattr(event, "error", None)
                attributes: dict[str, Any] = {
                    "resilience.attempt": int(event.attempt),
                    "resilience.delay": float(event.delay),
                }
                if error is not None:
                    attributes["error.type"] = type(error).__qualname__
                _span_event("resilience.retry", name, attributes)

            add(in_context(on_retry))
        else:
            # Policies without events: hook the tallies they keep (caller's context).
            found = tallies(target)
            for key, event_name, attributes in _TALLY_EVENTS.get(kind, ()):
                tally = found.get(key)
                if tally is not None:
                    tally.hook(_spanner(event_name, name, attributes))


_EXPIRED: Final = {"resilience.reason": "expired"}
_TALLY_EVENTS: Final[dict[str, tuple[tuple[str, str, Mapping[str, str]], ...]]] = {
    "timeout": (
        ("timeouts", "resilience.timeout", _EXPIRED),
        ("overruns", "resilience.timeout", {"resilience.reason": "overrun"}),
    ),
    "bulkhead": (("rejected", "resilience.bulkhead.rejected", {}),),
    "concurrency": (("rejected", "resilience.concurrency.rejected", {}),),
}


def _spanner(event_name: str, name: str, attributes: Mapping[str, str]) -> Callable[[], None]:
    def hook() -> None:
        _span_event(event_name, name, attributes)

    return hook


def _span_event(event_name: str, name: str, attributes: Mapping[str, Any]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(event_name, {NAME: name, **attributes})
