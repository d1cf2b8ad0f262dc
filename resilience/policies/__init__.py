"""The everyday policies: retry (with a shared budget), timeout with deadline
propagation, bulkhead, adaptive concurrency limit, hedging and fallback, and the
pipeline that composes them with breakers and limiters."""

from resilience.policies.backoff import JITTERS, Backoff
from resilience.policies.budget import RetryBudget
from resilience.policies.bulkhead import Bulkhead
from resilience.policies.concurrency import ConcurrencyLimit, LimitExceeded, LimitPermit
from resilience.policies.deadline import remaining
from resilience.policies.fallback import Fallback
from resilience.policies.fleet_budget import FleetRetryBudget
from resilience.policies.hedge import Hedge
from resilience.policies.pipeline import Pipeline, pipeline
from resilience.policies.retry import Retry, RetryEvent
from resilience.policies.timeout import Timeout

__all__ = [
    "JITTERS",
    "Backoff",
    "Bulkhead",
    "ConcurrencyLimit",
    "Fallback",
    "FleetRetryBudget",
    "Hedge",
    "LimitExceeded",
    "LimitPermit",
    "Pipeline",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "Timeout",
    "pipeline",
    "remaining",
]
