"""A sync call API handed an async function: ``Retry.call(fetch)``, where ``fetch`` is
``async def``, used to return the coroutine unguarded, to run unretried (untimed,
unlimited) wherever it was awaited. Every sync ``call()`` (and sync decorator) now raises
TypeError naming the async twin, closes the coroutine (no "never awaited" warning) and
leaves the policy as it was: the error is never retried, answered by a fallback or
counted against a slot."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import resilience as rs

ran: list[str] = []


async def fetch() -> str:
    ran.append("fetch")  # never: the coroutine is closed unstarted
    return "ok"


def policies() -> Iterator[tuple[str, Any]]:
    yield "CircuitBreaker", rs.CircuitBreaker("sync-of-async", failure_threshold=1)
    yield "Retry", rs.Retry(attempts=3, on=Exception)
    yield "Timeout", rs.Timeout(5.0)
    yield "Bulkhead", rs.Bulkhead(1)
    yield "ConcurrencyLimit", rs.ConcurrencyLimit("aimd", initial=1, min=1, max=1)
    yield "Fallback", rs.Fallback("fallback answer")


CASES = list(policies())


@pytest.fixture(autouse=True)
def _no_warning() -> Iterator[None]:
    ran.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine left unawaited warns: fail on it
        yield
    assert ran == []


@pytest.mark.parametrize(("api", "policy"), CASES, ids=[api for api, _ in CASES])
def test_call_of_an_async_function_raises_and_names_the_async_twin(api: str, policy: Any) -> None:
    with pytest.raises(TypeError, match=rf"{api}\.call\(\) got a coroutine.*{api}\.acall\(\)"):
        policy.call(fetch)
    # The policy is as it was: a slot given back, the breaker closed, a plain call works.
    assert policy.call(lambda: "sync") == "sync"
    assert policy.call(lambda: "again") == "again"


@pytest.mark.parametrize(("api", "policy"), CASES, ids=[api for api, _ in CASES])
def test_a_sync_function_returning_a_coroutine_is_refused_through_the_decorator(
    api: str, policy: Any
) -> None:
    if api == "CircuitBreaker":
        pytest.skip("the breaker's decorator has its own paths; its call() is checked above")

    def returns_a_coroutine() -> Any:
        return fetch()

    looks_sync = policy(returns_a_coroutine)
    with pytest.raises(TypeError, match="got a coroutine"):
        looks_sync()


def test_retry_does_not_retry_the_refusal_even_on_every_exception() -> None:
    attempts: list[int] = []
    retry = rs.Retry(attempts=5, on=Exception)

    def counted() -> Any:
        attempts.append(1)
        return fetch()

    with pytest.raises(TypeError):
        retry.call(counted)
    assert attempts == [1]
    deadline = rs.Retry(attempts=5, on=Exception, deadline=10.0)
    with pytest.raises(TypeError):
        deadline.call(counted)  # the loop's first attempt, not the plain path
    assert attempts == [1, 1]


def test_a_pipeline_refuses_too() -> None:
    pipeline = rs.Pipeline(rs.Timeout(5.0), rs.Retry(attempts=2))
    with pytest.raises(TypeError, match="got a coroutine"):
        _ = pipeline.call(fetch)


@pytest.mark.anyio
async def test_the_async_twins_still_take_async_functions() -> None:
    for _, policy in policies():
        assert await policy.acall(fetch) == "ok"
    assert ran == ["fetch"] * len(CASES)
    ran.clear()


def test_sync_results_pass_through_untouched() -> None:
    marker = object()
    make: Callable[[], object] = lambda: marker  # noqa: E731
    for _, policy in policies():
        assert policy.call(make) is marker
