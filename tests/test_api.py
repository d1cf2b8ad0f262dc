"""The public surface: exports, sync/async twins, layering, packaging."""

from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import sys

import resilience as rs
import resilience.integrations
from resilience.breaker.breaker import Permit
from resilience.integrations import outbox

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_all_is_sorted_complete_and_importable() -> None:
    assert rs.__all__ == sorted(rs.__all__)
    for name in rs.__all__:
        assert getattr(rs, name) is not None
    public = {n for n in vars(rs) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(rs.__all__), (
        f"exported but missing from __all__: {public - set(rs.__all__)}"
    )


def _twins(cls: type) -> tuple[set[str], set[str]]:
    names = {
        n
        for n in dir(cls)
        if not n.startswith("_")
        and callable(getattr(cls, n))
        and not isinstance(getattr(cls, n), type)
    }
    sync = {n for n in names if not inspect.iscoroutinefunction(getattr(cls, n))}
    asyncs = {n for n in names if inspect.iscoroutinefunction(getattr(cls, n))}
    return sync, asyncs


def test_every_sync_method_has_an_async_twin_and_back() -> None:
    # Methods with no I/O or waiting need no twin.
    no_twin = {
        "add_listener",
        "remove_listener",
        "stats",
        "force_open",
        "force_closed",
        "half_open",
        "disable",
        "reset",
        "guard",
        "limit",
        "cached",
        "table",
        "classify",
        "connection",
        "stream_name",
        "outage",
        "reject",
        "by_key",
        "stop",
        "telemetry",  # reads plain numbers, never waits
        "copy",  # makes a breaker like this one, never waits
        "report",  # a cache counts a lookup made for it: plain numbers, never waits
        "consume",  # the inbox: context managers, sync and async
        "aconsume",
        # the sync loop; `run` is its async twin, the name DESIGN.md gives it
        "run_blocking",
    }
    classes = (
        rs.CircuitBreaker,
        Permit,
        rs.TokenBucket,
        rs.TwoTierCache,
        rs.RedisBackend,
        outbox.SqliteOutboxStore,
        outbox.PostgresOutboxStore,
        outbox.OutboxPublisher,
        outbox.Inbox,
        outbox.InMemoryBroker,
        outbox.RedisStreamsBroker,
        outbox.RabbitMQBroker,
        outbox.NatsJetStreamBroker,
    )
    for cls in classes:
        sync, asyncs = _twins(cls)
        for name in sync - no_twin:
            assert "a" + name in asyncs, f"{cls.__name__}.{name} has no async twin"
        for name in asyncs - {"run"}:
            assert name[1:] in sync, f"{cls.__name__}.{name} has no sync twin"
    assert hasattr(rs.CircuitBreaker, "__aenter__")
    assert hasattr(rs.CircuitBreaker, "__enter__")


def test_core_imports_no_web_framework_or_database_driver() -> None:
    code = (
        "import sys, resilience, resilience.testing, resilience.breaker;"
        "bad = [m for m in ('starlette', 'fastapi', 'psycopg', 'sqlite3', 'uvicorn', 'httpx')"
        " if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pure_policies_read_no_clock() -> None:
    source = (ROOT / "resilience" / "breaker" / "policy.py").read_text()
    for forbidden in ("import time", "from time", "monotonic(", "_clock", "threading"):
        assert forbidden not in source, forbidden


def test_integrations_install_under_resilience_and_py_typed_ships() -> None:
    assert resilience.integrations.__name__ == "resilience.integrations"
    assert (pathlib.Path(rs.__file__).parent / "py.typed").exists()


def test_design_doc_diagram_matches_the_transition_table() -> None:
    from resilience._diagram import breaker_mermaid

    assert breaker_mermaid() in (ROOT / "docs" / "design.md").read_text()


def test_time_is_read_only_through_the_clock_module() -> None:
    # The demo shows real time, and the subscriber's network deadline must not freeze.
    allowed = {"resilience/_clock.py", "resilience/_demo.py"}
    offenders = []
    for base in ("resilience", "integrations"):
        for path in (ROOT / base).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            if rel not in allowed and re.search(r"\btime\.(time|monotonic|perf_counter)\(", text):
                offenders.append(rel)
    assert offenders == []
