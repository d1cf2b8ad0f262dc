"""Check a plain install: build the wheel, install it with no extras, import everything.

    python scripts/check_install.py [--keep]

1. Builds the wheel from a copy of the checkout's files (git's view: tracked and new,
   not ignored), so stale ``build/`` output cannot leak into it, and fails on the
   setuptools warnings about undeclared data packages.
2. The wheel holds exactly the checkout's package files (``integrations/`` under
   ``resilience/integrations/``), plus LICENSE, and its metadata says MIT.
3. A fresh venv gets the wheel and its dependencies only. From a folder outside the
   checkout, every installed module imports, except those that need an extra: they
   raise ImportError naming ``pip install 'resilience[<extra>]'``. So do the classes
   that import their extra only when used, and ``resilience demo``.
4. A cache-miss wait on asyncio (the single-flight path) works without sniffio.

Prints one line per check and exits 1 if any failed. Needs pip and the package index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Modules that import an extra's library at import time, and that extra (a package
# covers its modules).
NEEDS_EXTRA_AT_IMPORT = {
    "resilience.integrations.outbox.rabbitmq": "rabbitmq",
    "resilience.integrations.outbox.nats": "nats",
    "resilience.integrations.outbox.kafka": "kafka",
    "resilience.integrations.outbox.sqlalchemy": "sqlalchemy",
    "resilience.integrations.httpx": "httpx",
    "resilience.integrations.otel": "otel",
}
# Libraries that must be missing from the fresh venv, or the checks above prove nothing:
# each extra's, and sniffio/trio (the core must not need them).
MUST_BE_ABSENT = [
    "aio_pika", "confluent_kafka", "httpx", "msgpack", "nats", "opentelemetry", "psycopg",
    "sniffio", "sqlalchemy", "starlette", "trio",
]  # fmt: skip
# setuptools' banner for a folder of data files that is not a declared package.
BUILD_WARNINGS = ["Package would be ignored", "is absent from the `packages` configuration"]

# Runs in the fresh venv, from a folder outside the checkout; prints JSON.
PROBE = r"""
import asyncio, importlib, importlib.util, json, pathlib, sys

import resilience

out = {"file": resilience.__file__, "version": resilience.__version__,
       "modules": {}, "uses": {}, "present": [], "flight": None}
base = pathlib.Path(resilience.__file__).parent
names = sorted(
    ".".join(("resilience", *p.relative_to(base).with_suffix("").parts)).removesuffix(".__init__")
    for p in base.rglob("*.py")
)
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as error:
        out["modules"][name] = f"{type(error).__name__}: {error}"
    else:
        out["modules"][name] = None

def use(label, action):
    try:
        action()
    except BaseException as error:
        out["uses"][label] = f"{type(error).__name__}: {error}"
    else:
        out["uses"][label] = None

from resilience.cache import MsgpackSerializer
from resilience.integrations.outbox import PostgresOutboxStore

use("MsgpackSerializer()", MsgpackSerializer)
# Construction names the missing extra before any connection is tried.
use("PostgresOutboxStore(dsn)",
    lambda: PostgresOutboxStore("postgresql://127.0.0.1:1/none").create_schema())

def plain_enqueue():
    # No OpenTelemetry, no SQLAlchemy: enqueue and claim as ever, no trace headers.
    import sqlite3, tempfile
    from resilience.integrations.outbox import SqliteOutboxStore
    path = pathlib.Path(tempfile.mkdtemp()) / "outbox.db"
    store = SqliteOutboxStore(path)
    store.create_schema()
    with sqlite3.connect(path) as conn:
        store.enqueue(conn, topic="t", payload=1)
    (event,) = store.claim("probe", 10, 30.0)
    assert dict(event.headers) == {}, event.headers
    store.close()

use("enqueue without the extras", plain_enqueue)
out["present"] = [m for m in MUST_BE_ABSENT if importlib.util.find_spec(m) is not None]

async def flight():
    # Two callers miss one key: the second waits on the first's load (Flight.await_done).
    cache = resilience.TwoTierCache(local=resilience.LocalCache(max_entries=8), remote=None)
    started, release, calls = asyncio.Event(), asyncio.Event(), []

    async def load():
        calls.append(1)
        started.set()
        await release.wait()
        return 42

    first = asyncio.ensure_future(cache.aget_or_load("k", load))
    second = asyncio.ensure_future(cache.aget_or_load("k", load))
    await started.wait()
    release.set()
    return [await first, await second, len(calls)]

try:
    out["flight"] = asyncio.run(flight())
except BaseException as error:
    out["flight"] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


class Report:
    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        # Details only for a failure: they say what was found instead.
        print(
            f"{'PASS' if ok else 'FAIL'}  {what}"
            + (f"\n      {detail}" if detail and not ok else "")
        )
        return ok


def run(
    cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env)


def source_files() -> list[str]:
    """The checkout's files as a clean clone would have them (plus uncommitted ones)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        )
        if listed.returncode == 0:
            return sorted(p for p in listed.stdout.split("\0") if p and (ROOT / p).is_file())
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache"}
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file()
        and not skip & set(p.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in p.parts)
    )


def expected_wheel_files(files: Iterable[str]) -> set[str]:
    """Where each package file of the checkout belongs in the wheel."""
    expected = set()
    for path in files:
        if path.startswith("resilience/integrations/"):
            continue  # the checkout's stand-in: the wheel has integrations/__init__.py there
        if path.startswith("resilience/"):
            expected.add(path)
        elif path.startswith("integrations/"):
            expected.add("resilience/" + path)
    return expected


def module_name(wheel_path: str) -> str:
    name = wheel_path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def check_wheel(report: Report, wheel: Path, files: list[str]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata_name = next(n for n in dist_info if n.endswith("/METADATA"))
        metadata = archive.read(metadata_name).decode()
    shipped = names - dist_info
    expected = expected_wheel_files(files)
    report.check(
        shipped == expected,
        f"the wheel holds the checkout's {len(expected)} package files, and only them",
        f"missing: {sorted(expected - shipped)}; unexpected: {sorted(shipped - expected)}",
    )
    for pattern in ("resilience/py.typed", ".lua", ".sql"):
        found = [n for n in shipped if n.endswith(pattern)]
        report.check(bool(found), f"the wheel ships {pattern} ({len(found)})")
    report.check(
        any(n.endswith("/licenses/LICENSE") for n in dist_info),
        "the wheel ships LICENSE",
        f"dist-info: {sorted(dist_info)}",
    )
    headers = metadata.split("\n\n", 1)[0].splitlines()
    report.check(
        "License-Expression: MIT" in headers and "License-File: LICENSE" in headers,
        "the metadata says License-Expression: MIT and License-File: LICENSE",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    started = time.monotonic()
    report = Report()
    tmp = Path(tempfile.mkdtemp(prefix="resilience-install-"))
    try:
        # 1. Build from a copy, so stale build/ output in the checkout cannot leak in.
        files = source_files()
        src = tmp / "src"
        for path in files:
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, src / path)
        dist = tmp / "dist"
        build = run(
            [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(dist), str(src)]
        )
        if not report.check(build.returncode == 0, "the wheel builds", build.stdout[-3000:]):
            return 1
        wheel = next(dist.glob("resilience-*.whl"))
        banners = [w for w in BUILD_WARNINGS if w in build.stdout + build.stderr]
        report.check(
            not banners, f"the build warns about no data package ({wheel.name})", str(banners)
        )

        # 2. What the wheel holds.
        check_wheel(report, wheel, files)

        # 3. A fresh venv with no extras, used from a folder outside the checkout.
        env_dir = tmp / "venv"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        install = run([str(python), "-m", "pip", "install", "-q", str(wheel)])
        if not report.check(install.returncode == 0, "the wheel installs", install.stderr[-3000:]):
            return 1
        work = tmp / "work"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.pop("VIRTUAL_ENV", None)
        probe_file = work / "probe.py"
        probe_file.write_text(f"MUST_BE_ABSENT = {MUST_BE_ABSENT!r}\n{PROBE}")
        probe = run([str(python), "-I", str(probe_file)], cwd=work, env=env)
        if not report.check(probe.returncode == 0, "the probe runs", probe.stderr[-3000:]):
            return 1
        out = json.loads(probe.stdout)
        report.check(
            Path(out["file"]).is_relative_to(env_dir),
            "resilience is imported from the fresh venv, not the checkout",
            out["file"],
        )
        report.check(
            not out["present"],
            f"the fresh venv lacks {', '.join(MUST_BE_ABSENT)}",
            f"present: {out['present']}",
        )
        expected_modules = {
            module_name(p) for p in expected_wheel_files(files) if p.endswith(".py")
        }
        report.check(
            set(out["modules"]) == expected_modules,
            f"the venv has the checkout's {len(expected_modules)} modules",
            f"differ: {sorted(set(out['modules']) ^ expected_modules)}",
        )
        for name, error in sorted(out["modules"].items()):
            extra = next(
                (
                    x
                    for m, x in NEEDS_EXTRA_AT_IMPORT.items()
                    if name == m or name.startswith(m + ".")
                ),
                None,
            )
            if extra is None:
                report.check(error is None, f"import {name}", str(error))
            else:
                hint = f"pip install 'resilience[{extra}]'"
                report.check(
                    error is not None and error.startswith("ImportError") and hint in error,
                    f"import {name} raises ImportError naming {hint}",
                    str(error),
                )
        report.check(
            out["uses"].get("enqueue without the extras") is None,
            "enqueue and claim work without SQLAlchemy and OpenTelemetry",
            str(out["uses"].get("enqueue without the extras")),
        )
        for label, extra in (
            ("MsgpackSerializer()", "msgpack"),
            ("PostgresOutboxStore(dsn)", "postgres"),
        ):
            error = out["uses"].get(label)
            hint = f"pip install 'resilience[{extra}]'"
            report.check(
                error is not None and error.startswith("ImportError") and hint in error,
                f"{label} raises ImportError naming {hint}",
                str(error),
            )
        report.check(
            out["flight"] == [42, 42, 1],
            "two asyncio callers share one load (the single-flight wait, no sniffio)",
            str(out["flight"]),
        )

        cli = run([str(env_dir / "bin" / "resilience"), "--help"], cwd=work, env=env)
        report.check(cli.returncode == 0, "the resilience command runs (--help)", cli.stderr)
        module_cli = run([str(python), "-I", "-m", "resilience", "--help"], cwd=work, env=env)
        report.check(module_cli.returncode == 0, "python -m resilience --help", module_cli.stderr)
        demo = run([str(env_dir / "bin" / "resilience"), "demo", "--fast"], cwd=work, env=env)
        hint = "pip install 'resilience[demo]'"
        report.check(
            demo.returncode != 0 and hint in demo.stderr,
            f"resilience demo without its extra says {hint}",
            demo.stderr[-500:],
        )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    verdict = "passed" if report.failed == 0 else "FAILED"
    print(
        f"\nclean install check {verdict} ({report.passed} checks passed, {report.failed} "
        f"failed, {time.monotonic() - started:.0f} s)"
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
