"""The benchmarks still run (their numbers are read by people, not asserted here)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from support.services import POSTGRES_DSN_ENV, REDIS_URL_ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_quick(
    name: str, out: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", name, "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_breaker_benchmark_quick_run_reports_every_target(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run_quick("breaker", out)
    assert proc.returncode == 0, proc.stderr
    # four, both closed paths watched, and fleet mode when Redis answers (always in CI)
    fleet = "fleet mode on:" in proc.stdout
    assert fleet or os.environ.get("CI") != "true"
    assert proc.stdout.count("(target <=") == 6 + fleet
    assert json.loads(out.read_text())


def test_policies_benchmark_quick_run_reports_every_target(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run_quick("policies", out)
    assert proc.returncode == 0, proc.stderr
    assert "not installed" not in proc.stdout, proc.stdout  # the dev extra has every peer
    assert proc.stdout.count("(target <=") == 6  # @retry vs two peers, pipeline; sync, async
    report: dict[str, Any] = json.loads(out.read_text())["results"]["policies"]
    assert all(target["value"] is not None for target in report["targets"])
    assert {"success_sync", "success_async"} == set(report["groups"])


def test_outbox_benchmark_quick_run_reports_every_target(
    tmp_path: pathlib.Path, postgres_dsn: str, redis_url: str
) -> None:
    # The fixtures skip (fail under CI) without the servers; the benchmark gets the same ones.
    env = {**os.environ, POSTGRES_DSN_ENV: postgres_dsn, REDIS_URL_ENV: redis_url}
    out = tmp_path / "bench.json"
    proc = _run_quick("outbox", out, env)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: outbox" not in proc.stdout, proc.stdout
    assert proc.stdout.count("(target >=") == 7, proc.stdout
    report: dict[str, Any] = json.loads(out.read_text())["results"]["outbox"]
    assert len(report["targets"]) == 7  # the seventh: into Kafka (Tansu)
    assert all(target["value"] is not None for target in report["targets"])
    assert {"batch_1", "batch_100", "batch_500", "hot_key", "deep", "kafka"} <= set(
        report["groups"]
    )
