"""A fleet member for tests/test_breaker_fleet_procs.py: ``python fleet_proc.py '<json>'``.

It makes a ``RedisFleet`` and a breaker ``dep`` on it, prints ``ready <instance>``, waits
for the file ``go`` to exist, then calls the dependency (a line-protocol server of the
test's: send ``<pid>\\n``, read ``ok`` or ``fail``) through the breaker every ``pause``
seconds until the file ``stop`` exists. Every state change is printed as a JSON line
(``{"t": wall time, "old", "new", "trigger"}``); at the end one JSON summary line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import resilience as rs


class Refused(Exception):
    """The dependency answered ``fail``."""


def call_dependency(address: tuple[str, int]) -> str:
    with socket.create_connection(address, timeout=10.0) as sock:
        sock.sendall(f"{os.getpid()}\n".encode())
        answer = sock.makefile("rb").readline().strip().decode()
    if answer != "ok":
        raise Refused(answer)
    return answer


def main(argv: list[str]) -> int:
    config: dict[str, Any] = json.loads(argv[1])
    go, stop = Path(config["go"]), Path(config["stop"])
    address = (config["host"], int(config["port"]))
    fleet = rs.RedisFleet(
        config["redis_url"],
        quorum=config["quorum"],
        interval=config["interval"],
        prefix=config["prefix"],
        timeout=0.2,
    )

    def changed(event: rs.BreakerEvent) -> None:
        if isinstance(event, rs.StateChanged):
            line = {
                "t": time.time(),
                "old": event.old.value,
                "new": event.new.value,
                "trigger": event.trigger.value,
            }
            print(json.dumps(line), flush=True)

    breaker = rs.CircuitBreaker(
        "dep",
        failure_threshold=3,
        recovery_timeout=config["recovery"],
        probe_lease=config["lease"],
        success_threshold=1,
        include=(Refused, OSError),
        fleet=fleet,
    )
    breaker.add_listener(changed, only=(rs.StateChanged,))  # keeps the lock-free path
    fleet.flush()
    print(f"ready {fleet.instance}", flush=True)
    while not go.exists():
        time.sleep(0.005)
    pause = config["pause"]
    calls = ok = rejected = 0
    slowest_reject = 0.0
    while not stop.exists():
        start = time.monotonic()
        try:
            breaker.call(call_dependency, address)
            ok += 1
        except rs.CircuitOpenError:
            rejected += 1
            slowest_reject = max(slowest_reject, time.monotonic() - start)
        except (Refused, OSError):
            pass
        calls += 1
        until = time.monotonic() + pause
        while time.monotonic() < until and not stop.exists():
            time.sleep(min(0.005, pause))
    summary = {
        "summary": True,
        "calls": calls,
        "ok": ok,
        "rejected": rejected,
        "slowest_reject": slowest_reject,
        "state": breaker.state.value,
        "fallbacks": fleet.local_fallbacks,
    }
    print(json.dumps(summary), flush=True)
    fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
