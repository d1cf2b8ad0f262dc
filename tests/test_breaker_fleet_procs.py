"""Eight processes on one Redis decide as a fleet (tests/support/fleet_proc.py).

The dependency is a line server of the test's on a free port that counts every request
and says which process sent it; it fails for everyone until the test says otherwise.
Redis is reached through a FaultProxy, so the test can cut it without touching the shared
server. Every process has its own state-change log (wall time), read here.

1. Open together: four busy processes trip on their own; the four quiet ones (one call
   every 0.3 s, so their own breakers would need 0.6 s) open within one flush interval of
   the quorum, by the fleet's verdict.
2. One probe per window: while the dependency keeps failing, requests reach it one at a
   time, a recovery period apart, fleet-wide; when it is back, one probe closes all.
3. SIGKILL of the probe holder: the lease moves on after its expiry, to another process.
4. Redis cut: every process decides alone (its own probes), closes when the dependency is
   back, and no call waits on Redis.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from support.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).parent / "support" / "fleet_proc.py")
INTERVAL = 0.1
RECOVERY = 0.5
LEASE = 0.6
# Scheduling slack on a loaded 2-CPU machine running 8 processes.
SLACK = 0.3


class Dependency:
    """A line server: reads ``<pid>``, answers per ``mode`` (ok, fail, hang), logs each."""

    def __init__(self) -> None:
        self.mode = "fail"
        self.requests: list[tuple[float, int]] = []  # (wall time, pid)
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            line = conn.makefile("rb").readline()
            with self.lock:
                self.requests.append((time.time(), int(line or b"0")))
                mode = self.mode
            if mode == "hang":
                self.release.wait(10.0)
                mode = "fail"
            conn.sendall(b"ok\n" if mode == "ok" else b"fail\n")

    def since(self, t: float) -> list[tuple[float, int]]:
        with self.lock:
            return [r for r in self.requests if r[0] >= t]

    def close(self) -> None:
        self.release.set()
        self.sock.close()


class Member:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.instance = ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready "):
                self.instance = line.split()[1]
                self.ready.set()
            elif line.startswith("{"):
                record = json.loads(line)
                if record.get("summary"):
                    self.summary = record
                else:
                    self.events.append(record)

    @property
    def state(self) -> str:
        return self.events[-1]["new"] if self.events else "closed"

    def first(self, new: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["new"] == new), None)


class Fleet:
    def __init__(self, tmp_path: Path, redis_url: str, prefix: str, dep: Dependency) -> None:
        self.go = tmp_path / "go"
        self.stop_file = tmp_path / "stop"
        self.members: list[Member] = []
        self.stopped = False
        self.base = {
            "go": str(self.go),
            "stop": str(self.stop_file),
            "host": "127.0.0.1",
            "port": dep.port,
            "redis_url": redis_url,
            "prefix": prefix,
            "quorum": 0.5,
            "interval": INTERVAL,
            "recovery": RECOVERY,
            "lease": LEASE,
        }

    def start(self, pauses: list[float]) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        for pause in pauses:
            config = {**self.base, "pause": pause}
            proc = subprocess.Popen(
                [sys.executable, SCRIPT, json.dumps(config)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            self.members.append(Member(proc))
        for m in self.members:
            assert m.ready.wait(30.0), "a member did not start"
        self.go.touch()

    def wait(self, what: Callable[[], bool], timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, message
            time.sleep(0.01)

    def all_in(self, state: str) -> bool:
        return all(m.state == state for m in self.members if m.proc.poll() is None)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.stop_file.touch()
        for m in self.members:
            try:
                m.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
            m.thread.join(timeout=5.0)
            if m.proc.stdout is not None:
                m.proc.stdout.close()


@pytest.fixture
def dependency() -> Iterator[Dependency]:
    dep = Dependency()
    yield dep
    dep.close()


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    target = urlsplit(redis_url)
    with FaultProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        yield proxy


@pytest.fixture
def fleet(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    redis_proxy: FaultProxy,
    dependency: Dependency,
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, redis_proxy.url_for(redis_url), redis_prefix + "fleet", dependency)
    yield f
    f.stop()


BUSY, QUIET = 0.005, 0.3


def open_together(fleet: Fleet) -> float:
    """Start 4 busy and 4 quiet members against a failing dependency; check they open
    together; return the time every member was open."""
    fleet.start([BUSY] * 4 + [QUIET] * 4)
    fleet.wait(lambda: fleet.all_in("open"), 10.0, "the fleet did not open")
    trips = sorted(e["t"] for m in fleet.members for e in m.events if e["trigger"] == "trip")
    quorum = trips[3]  # the 4th own trip of 8 members: quorum 0.5
    opened = [m.first("open") for m in fleet.members]
    assert all(e is not None for e in opened)
    for m, e in zip(fleet.members[4:], opened[4:], strict=True):
        assert e is not None
        assert e["trigger"] == "fleet_open", m.events  # not its own trip
        assert e["t"] <= quorum + INTERVAL + SLACK, e["t"] - quorum
    return float(max(e["t"] for e in opened if e is not None))


def test_open_together_then_one_probe_per_window(fleet: Fleet, dependency: Dependency) -> None:
    all_open = open_together(fleet)
    windows = 3
    time.sleep(windows * RECOVERY)  # recovery windows while the dependency still fails
    probes = dependency.since(all_open + 0.05)
    assert 1 <= len(probes) <= windows + 1, probes
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(probes)]
    assert all(gap >= RECOVERY - 0.05 for gap in gaps), gaps  # one request per window
    switched = time.time()
    dependency.mode = "ok"
    fleet.wait(lambda: fleet.all_in("closed"), 2 * RECOVERY + 3 * INTERVAL + 2 * SLACK, "no close")
    after = dependency.since(switched)
    first_ok = after[0]
    closers = [m.events[-1] for m in fleet.members]
    # One probe closed them all: the others closed on the fleet's verdict.
    assert sum(e["trigger"] == "probes_succeeded" for e in closers) == 1, closers
    assert sum(e["trigger"] == "fleet_close" for e in closers) == 7, closers
    for e in closers:
        assert e["t"] <= first_ok[0] + INTERVAL + SLACK


def test_sigkill_of_the_probe_holder_hands_the_lease_on(
    fleet: Fleet, dependency: Dependency
) -> None:
    all_open = open_together(fleet)
    dependency.mode = "hang"  # the next probe hangs in its call
    fleet.wait(lambda: bool(dependency.since(all_open + 0.05)), 3 * RECOVERY, "no probe")
    first_t, holder_pid = dependency.since(all_open + 0.05)[0]
    dependency.mode = "ok"
    os.kill(holder_pid, signal.SIGKILL)
    fleet.wait(lambda: len(dependency.since(all_open + 0.05)) >= 2, 3 * LEASE, "no new probe")
    second_t, second_pid = dependency.since(all_open + 0.05)[1]
    assert second_pid != holder_pid
    assert second_t - first_t >= LEASE - 0.05  # not before the dead holder's lease ended
    assert second_t - first_t <= LEASE + INTERVAL + QUIET + SLACK
    fleet.wait(lambda: fleet.all_in("closed"), INTERVAL + 2 * SLACK, "the fleet did not close")
    assert len(dependency.since(all_open + 0.05)) >= 2


def test_a_redis_cut_leaves_every_member_working_alone(
    fleet: Fleet, dependency: Dependency, redis_proxy: FaultProxy
) -> None:
    open_together(fleet)
    redis_proxy.cut()
    cut = time.time()
    time.sleep(2 * INTERVAL + 0.2)  # every member's flush fails: it decides alone
    dependency.mode = "ok"
    fleet.wait(lambda: fleet.all_in("closed"), RECOVERY + QUIET + 2 * SLACK + 1.0, "not closed")
    # Each closed by its own probe: the fleet could not tell them.
    for m in fleet.members:
        close = m.events[-1]
        assert close["t"] > cut
        assert close["trigger"] == "probes_succeeded", m.events
    fleet.stop()
    for m in fleet.members:
        assert m.summary is not None
        assert m.summary["state"] == "closed"
        assert m.summary["ok"] >= 1
        assert m.summary["fallbacks"] == 1  # logged and counted once
        assert m.summary["slowest_reject"] < 0.05  # no call waited on Redis
