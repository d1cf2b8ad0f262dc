"""`make demo` tells the whole story on embedded defaults, and on real servers."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resilience", "demo", "--fast", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # run the installed package, not a checkout folder
        check=False,
    )


def _check_story(out: str) -> None:
    assert "2. a client bursts" in out
    assert "10 accepted, 5 refused with 429; the one more got 429" in out
    assert 'RateLimit: "orders";' in out  # the policy is named after the limiter
    assert "the catalogue was asked 1 time(s)" in out
    assert "breaker closed -> OPEN" in out
    assert "attempts burned: 0; dead: 0" in out
    assert "breaker half_open -> CLOSED" in out
    assert "per-customer order kept: True" in out
    assert "resilience_outbox_published_total = 70" in out
    summary = out.split("== Summary", 1)[1]
    delivered = [line for line in summary.splitlines() if "events delivered" in line]
    accepted = [line for line in summary.splitlines() if "events accepted" in line]
    assert delivered[0].split()[-1] == accepted[0].split()[-1] == "70"
    # The summary agrees with the story: 5 + the one more refused, order kept "True".
    refused = [line for line in summary.splitlines() if "orders refused" in line]
    assert refused[0].split()[-1] == "6"
    kept = [line for line in summary.splitlines() if "per-key order kept" in line]
    assert kept[0].split()[-1] == "True"


def test_the_demo_runs_the_whole_story_on_embedded_defaults() -> None:
    result = _demo()
    assert result.returncode == 0, result.stderr
    _check_story(result.stdout)
    assert "outbox in SQLite" in result.stdout
    # The story narrates the transitions; the package's own log lines stay out of it.
    assert "resilience breaker" not in result.stderr


@pytest.mark.redis
@pytest.mark.postgres
def test_the_demo_runs_on_real_servers(redis_url: str, postgres_dsn: str) -> None:
    result = _demo("--redis", redis_url, "--postgres", postgres_dsn)
    assert result.returncode == 0, result.stderr
    _check_story(result.stdout)
    assert "outbox in PostgreSQL" in result.stdout
    assert f"limits in Redis {redis_url}" in result.stdout
