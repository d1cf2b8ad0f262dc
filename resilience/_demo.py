"""`python -m resilience demo`: the package in action on embedded defaults, no servers."""

from __future__ import annotations

import threading
import time
from collections import Counter

import resilience as rs


class FlakyService:
    """A dependency that is healthy, then down, then healthy again."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def charge(self, amount: int) -> str:
        self.calls += 1
        if self.down:
            raise ConnectionError("payments service unreachable")
        time.sleep(0.005)
        return f"charged {amount}"


def run_breaker_demo(out: list[str] | None = None) -> Counter[str]:
    """Drive a breaker through an outage; print and return what happened."""
    start = time.monotonic()
    tally: Counter[str] = Counter()

    def say(text: str) -> None:
        line = f"  t={time.monotonic() - start:5.2f}s  {text}"
        print(line, flush=True)
        if out is not None:
            out.append(line)

    def on_event(event: rs.BreakerEvent) -> None:
        if isinstance(event, rs.StateChanged):
            say(f"breaker {event.old.value} -> {event.new.value}  ({event.trigger.value})")
            tally[f"to {event.new.value}"] += 1

    service = FlakyService()
    breaker = rs.CircuitBreaker(
        "payments",
        failure_threshold=3,
        recovery_timeout=0.4,
        success_threshold=2,
        half_open_max_calls=1,
        listeners=[on_event],
    )
    charge = breaker(service.charge)

    def attempt(i: int) -> None:
        try:
            charge(i)
            tally["ok"] += 1
            say(f"call {i:2d}: ok")
        except rs.CircuitOpenError as e:
            tally["rejected"] += 1
            say(f"call {i:2d}: rejected without calling ({e.retry_after:.2f}s to go)")
        except ConnectionError as e:
            tally["failed"] += 1
            say(f"call {i:2d}: failed: {e}")

    print("\n== Circuit breaker: a payments dependency goes down and comes back")
    for i in range(1, 4):
        attempt(i)
    say("-- the payments service goes down --")
    service.down = True
    for i in range(4, 12):
        attempt(i)
        time.sleep(0.05)
    time.sleep(0.1)
    attempt(12)  # half-open: one probe, it fails, open again

    say("-- the service recovers; 20 threads arrive together once the breaker half-opens --")
    service.down = False
    time.sleep(breaker.retry_after + 0.01)
    gate = threading.Barrier(20)
    admitted = Counter[str]()
    lock = threading.Lock()

    def burst() -> None:
        gate.wait()
        try:
            charge(0)
            outcome = "probe admitted"
        except rs.CircuitOpenError:
            outcome = "rejected at once"
        with lock:
            admitted[outcome] += 1

    threads = [threading.Thread(target=burst) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say(f"burst of 20: {dict(admitted)} (half_open_max_calls=1)")
    tally["burst rejected"] = admitted["rejected at once"]
    for i in range(13, 16):
        attempt(i)
    say(f"the dependency saw {service.calls} calls; the breaker is {breaker.state.value}")
    return tally


def run_limiter_demo(out: list[str] | None = None) -> Counter[str]:
    """A client bursts past its limit; the limiter answers exactly when to come back."""
    tally: Counter[str] = Counter()

    def say(text: str) -> None:
        print(f"  {text}", flush=True)
        if out is not None:
            out.append(text)

    print("\n== Rate limiter: 10 requests/s with bursts of 20, per client")
    limiter = rs.TokenBucket(rate=10.0, capacity=20)
    first_denial = None
    for i in range(30):
        decision = limiter.try_acquire("client:alice")
        tally["allowed" if decision else "denied"] += 1
        if not decision and first_denial is None:
            first_denial = decision
            say(
                f"request {i + 1}: denied, {decision.remaining} left, "
                f"retry in {decision.retry_after * 1000:.0f} ms"
            )
    say(f"burst of 30 from alice: {tally['allowed']} allowed, {tally['denied']} denied")
    say(f"bob is unaffected: {bool(limiter.try_acquire('client:bob'))}")
    start = time.monotonic()
    limiter.acquire("client:alice", timeout=1.0)
    say(f"alice waits {(time.monotonic() - start) * 1000:.0f} ms for one token, then goes")
    tally["waited"] += 1
    return tally


def run_cache_demo(out: list[str] | None = None) -> Counter[str]:
    """Fifty callers miss one cold key at once; the slow loader runs once."""
    tally: Counter[str] = Counter()

    def say(text: str) -> None:
        print(f"  {text}", flush=True)
        if out is not None:
            out.append(text)

    print("\n== Two-tier cache: 50 threads miss one cold key at the same moment")
    cache = rs.TwoTierCache(rs.LocalCache(max_entries=1000, ttl=30.0), None, ttl=60.0)
    lock = threading.Lock()

    def load_report() -> dict[str, int]:
        with lock:
            tally["loader calls"] += 1
        time.sleep(0.2)  # a slow query
        return {"orders": 1234}

    gate = threading.Barrier(50)
    results: list[dict[str, int]] = []

    def caller() -> None:
        gate.wait()
        results.append(cache.get_or_load("report:today", load_report))

    start = time.monotonic()
    threads = [threading.Thread(target=caller) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    tally["callers served"] = len(results)
    say(
        f"50 callers got {results[0]} in {took * 1000:.0f} ms; "
        f"the loader ran {tally['loader calls']} time(s)"
    )
    say(f"the next call is a local hit: {cache.get('report:today')}")
    return tally


def main() -> int:
    tally = run_breaker_demo()
    tally.update(run_limiter_demo())
    tally.update(run_cache_demo())
    print("\n== Summary")
    width = max(len(k) for k in tally)
    for key, value in sorted(tally.items()):
        print(f"  {key:<{width}}  {value}")
    return 0
