"""The demo runs on embedded defaults and tells the story it promises."""

from __future__ import annotations

import subprocess
import sys

from resilience._demo import run_breaker_demo, run_cache_demo, run_limiter_demo


def test_breaker_demo_shows_trip_rejections_and_one_probe() -> None:
    lines: list[str] = []
    tally = run_breaker_demo(out=lines)
    assert tally["to open"] >= 1
    assert tally["rejected"] >= 1
    assert tally["burst rejected"] == 19  # 20 threads at half-open: exactly one probe
    assert tally["to closed"] == 1
    assert any("closed -> open" in line for line in lines)


def test_demo_command_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "resilience", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",  # run the installed package, not a checkout folder
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "Summary" in out.stdout


def test_limiter_demo_denies_past_the_burst_and_waits_exactly() -> None:
    tally = run_limiter_demo()
    # Real time runs on: a very slow machine may refill a token during the burst.
    assert tally["allowed"] + tally["denied"] == 30
    assert 20 <= tally["allowed"] <= 21
    assert tally["waited"] == 1


def test_cache_demo_loads_the_cold_key_once() -> None:
    tally = run_cache_demo()
    assert tally["loader calls"] == 1
    assert tally["callers served"] == 50
