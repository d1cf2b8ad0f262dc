"""The benchmarks still run (their numbers are read by people, not asserted here)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys


def test_breaker_benchmark_quick_run_reports_every_target(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "breaker", "--quick", "--json", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(target <=") == 4
    assert json.loads(out.read_text())
