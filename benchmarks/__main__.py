"""``python -m benchmarks [names...] [--quick] [--json PATH]``.

Each benchmark is a module ``benchmarks.<name>`` with ``main(quick: bool) -> dict``.
To add one, create the module and list its name in MODULES; a listed module that does
not exist yet is skipped with a message, so the list can run ahead of the code.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, cast

# The one place that says which benchmarks exist, in the order they run.
MODULES: Final = ("breaker", "limiter", "cache", "asgi", "outbox", "policies", "httpx", "shedding")

BenchMain = Callable[[bool], dict[str, Any]]


def _load(name: str) -> BenchMain | None:
    qualified = f"{__package__ or 'benchmarks'}.{name}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as error:
        if error.name != qualified:
            raise  # the module exists but something it imports does not: a real error
        return None
    return cast(BenchMain, module.main)


def _environment() -> dict[str, Any]:
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        usable = os.cpu_count()
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmarks against peer libraries."
    )
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"benchmarks to run (default: all of {MODULES})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for smoke tests")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    # Checked by hand: argparse's choices= with nargs="*" rejects the empty default.
    unknown = [name for name in args.names if name not in MODULES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    names: list[str] = list(dict.fromkeys(args.names)) or list(MODULES)
    env = _environment()
    print(
        f"{env['implementation']} {env['python']} on {env['platform']}; "
        f"{env['cpu_count']} CPUs ({env['cpus_usable']} usable)"
        + ("; --quick" if args.quick else "")
    )
    results: dict[str, Any] = {}
    for name in names:
        bench = _load(name)
        if bench is None:
            print(f"\nskipped: benchmarks.{name} does not exist yet")
            continue
        print()
        started = time.perf_counter()
        results[name] = bench(args.quick)
        seconds = time.perf_counter() - started
        results[name]["seconds"] = seconds
        print(f"\n({name}: {seconds:.1f} s)")
    if args.json is not None:
        report = {"environment": env, "quick": args.quick, "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
