"""A retry budget for a whole fleet: counts shared by every process through Redis, off
the call path.

:class:`FleetRetryBudget` is a :class:`~resilience.RetryBudget` (same ``deposit()``,
``try_withdraw()``, ``balance()`` and ``telemetry()``, so :class:`~resilience.Retry` takes
it as it is) whose deposits and withdrawals are those of every instance that shares its
``prefix`` and ``name``.

- **Calls stay local.** ``deposit()`` and ``try_withdraw()`` take a lock and count in
  memory; they never wait on Redis.
- **A daemon thread syncs** every ``sync_interval`` seconds: one EVALSHA of
  ``retry_budget.lua`` adds this instance's counts since its last sync to the current
  slot and returns the fleet's deposits and withdrawals over the window. Slots are
  epochs of Redis ``TIME``, so hosts' clocks do not matter. Between syncs a decision uses
  the fleet's totals from the last sync plus this instance's counts since.
- **Staleness.** An instance does not see the others' retries until its next sync. So N
  instances can together overshoot the budget by about what the other N - 1 withdraw in
  one sync interval (each at most the balance it saw at its last sync). The overshoot is
  counted like any withdrawal, so the next sync shows the balance below zero and nobody
  retries until first attempts have paid it back.
- **Redis down or slow.** A sync that fails or takes longer than ``timeout`` counts in
  ``sync_errors`` and the budget decides on this instance's counts alone (what a
  :class:`~resilience.RetryBudget` with the same parameters would decide), as it also does
  when its last good sync is older than ``2 * sync_interval + timeout``. Each instance then
  has the whole ``min_per_second`` floor to itself, so the fleet allows up to N times the
  floor while Redis is away. The calls go through a :class:`~resilience.remote.RemoteGuard`
  (3 failures open its breaker for 1 s), which probes again by itself: the first good sync
  sends the counts made during the outage (those still in the window) and the budget is
  the fleet's again.

Keys (the ``{name}`` hash tag keeps them in one slot of a Redis Cluster):

- ``{prefix}:{<name>}:<window>``: a hash with fields ``d<epoch>`` and ``w<epoch>``, the
  deposits and withdrawals of one slot. The script deletes the slots that left the
  window; the hash expires two windows after its last write. The window is part of the
  key, so budgets that differ in it never mix their slots.
- ``{prefix}:{<name>}:<window>:i:<host>:<pid>:<id>``: one instance's running totals, as
  the script last added them. An instance sends its totals, not deltas, so a sync sent
  again after a lost reply (or one that arrives late) counts nothing twice. It expires
  two windows after the instance last counted anything.

One thread per budget, started by the constructor: make the budget in the process that
uses it (after a fork, e.g. in each worker rather than before ``gunicorn --preload``
forks: the child has no sync thread, so its budget would decide on local counts alone).
``close()`` stops the thread; so does the budget being garbage-collected.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import redis

from resilience import _clock
from resilience._checks import positive_seconds
from resilience._clock import SYSTEM_CLOCK, Clock, resolve
from resilience.breaker import CircuitBreaker
from resilience.events import Tally, Telemetry
from resilience.policies.budget import SLOTS, BudgetWindow, RetryBudget
from resilience.remote import (
    OUTAGE_ERRORS,
    UNAVAILABLE,
    Commands,
    OnError,
    RemoteGuard,
    Script,
    check_client,
    check_timeout,
)

__all__ = ["MIN_SYNC_INTERVAL", "SYNC", "FleetRetryBudget"]

log = logging.getLogger("resilience")

#: The sync script (package data of resilience.policies).
SYNC: Final = Script("resilience.policies", "retry_budget.lua")
#: The shortest ``sync_interval`` accepted, seconds: a tighter loop only loads Redis.
MIN_SYNC_INTERVAL: Final = 0.001


def _counter(window: float) -> BudgetWindow:
    """A BudgetWindow that only counts: with an infinite floor, try_withdraw() always
    takes, so counts() are every deposit and withdrawal of the window."""
    return BudgetWindow(1.0, math.inf, window)


def _run(ref: weakref.ReferenceType[FleetRetryBudget], stop: threading.Event) -> None:
    """The sync thread: holds the budget only while it syncs, and ends when the budget
    is closed or collected (its finalizer sets ``stop``)."""
    while True:
        budget = ref()
        if budget is None:
            return
        interval = budget.sync_interval
        try:
            budget._tick()
        except Exception:  # keep syncing: the next tick may do better
            log.exception(
                "resilience budget %r: sync thread error",
                budget.name,
                extra={"resilience_event": "budget.sync_error", "resilience_name": budget.name},
            )
        finally:
            del budget
        if stop.wait(interval):
            return


def _shutdown(stop: threading.Event, commands: Commands) -> None:
    """What close() and garbage collection both do: wake the thread, close the pool."""
    stop.set()
    commands.close()


class FleetRetryBudget(RetryBudget):
    """A :class:`~resilience.RetryBudget` shared by every process that uses the same
    Redis, ``prefix`` and ``name`` (see the module's docstring for the sync, its
    staleness and what happens while Redis is away).

    ``client`` is a sync ``redis.Redis`` or ``redis.RedisCluster`` (the budget syncs in a
    thread). ``ratio``, ``min_per_second`` and ``window`` are the fleet's: the floor of
    ``min_per_second`` retries per second is shared by every instance. Every instance
    of one budget must use the same ``window``. ``sync_interval``: seconds between syncs
    (at most ``window``). ``timeout``: seconds one sync may take before it counts as
    failed. ``breaker`` replaces the guard's breaker around Redis (3 failures open it for
    1 s). ``clock`` is read for the local window and the age of the fleet's counts; the
    thread waits in real time.
    """

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        ratio: float = 0.1,
        min_per_second: float = 10.0,
        *,
        window: float = 10.0,
        name: str = "retry_budget",
        prefix: str = "resilience:budget",
        sync_interval: float = 0.25,
        timeout: float = 0.25,
        breaker: CircuitBreaker | None = None,
        clock: Clock | None = None,
    ) -> None:
        if check_client(client):  # True for an asyncio client
            raise TypeError(
                "client must be a sync redis.Redis or redis.RedisCluster (the budget syncs "
                f"in a thread), got {type(client).__name__}"
            )
        super().__init__(ratio, min_per_second, window=window, name=name, clock=clock)
        if "{" in self.name or "}" in self.name:
            raise ValueError(f"name must not contain braces (it is the hash tag), got {name!r}")
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        interval = positive_seconds("sync_interval", sync_interval, maximum=self.window)
        if interval < MIN_SYNC_INTERVAL:
            raise ValueError(
                f"sync_interval must be at least {MIN_SYNC_INTERVAL:g} seconds, "
                f"got {sync_interval!r}"
            )
        budget = check_timeout(timeout)
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        self.prefix = prefix
        self.sync_interval = interval
        self.timeout = budget
        #: The budget's Redis key (a hash of per-slot counts).
        self.key = f"{prefix}:{{{self.name}}}:{self.window!r}"
        #: This instance: host, pid and a random part. Its running totals, as Redis last
        #: added them, are under ``instance_key``.
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.instance_key = f"{self.key}:i:{self.instance}"
        self._floor = self.min_per_second * self.window
        self._args_head = (repr(self.window * 1e6 / SLOTS), str(SLOTS))
        self._ttl_ms = str(math.ceil(2 * self.window * 1000) + 1000)
        self._stale_after = 2 * interval + budget
        clock = resolve(clock)
        self._now: Callable[[], float] = (
            _clock.monotonic if clock is SYSTEM_CLOCK else clock.monotonic
        )

        # Guarded by _mutex: this instance's window (the fallback), its running totals,
        # those totals as of its last good sync, and the fleet's totals from that sync.
        self._mutex = threading.Lock()
        self._counts = _counter(self.window)
        self._total_d = self._total_w = 0
        self._synced_d = self._synced_w = 0
        self._fleet_d = self._fleet_w = 0
        self._fresh_until = -math.inf  # the fleet's totals count until then (clock time)
        self._syncs = 0
        self._sync_errors = 0
        self._failing = False  # an unexpected error was logged; quiet until a good sync

        self._made = Tally()
        self._taken = Tally()
        self._refused = Tally()

        self._commands = Commands(client, budget)
        self.guard = RemoteGuard(
            f"redis-budget:{prefix}:{self.name}",
            errors=OUTAGE_ERRORS,
            on_error=OnError.LOCAL,
            breaker=breaker,
            listeners=[],
            timeout=budget,
        )
        self._syncing = threading.Lock()  # the thread's sync and sync_now() take turns
        self._closed = False
        self._stop = threading.Event()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._commands)
        self._thread = threading.Thread(
            target=_run,
            args=(weakref.ref(self), self._stop),
            name=f"resilience-budget-sync:{self.name}",
            daemon=True,
        )
        self._thread.start()

    # -- the call path: memory only ------------------------------------------------------

    def _balance(self, now: float) -> float:
        """Retries allowed now; the caller holds _mutex."""
        if now <= self._fresh_until:  # the fleet's, and ours since the last sync
            deposits = self._fleet_d + self._total_d - self._synced_d
            withdrawals = self._fleet_w + self._total_w - self._synced_w
        else:  # no fresh fleet counts: this instance's alone
            deposits, withdrawals = self._counts.counts(now)
        return self._floor + self.ratio * deposits - withdrawals

    def deposit(self) -> None:
        """Count one first attempt."""
        now = self._now()
        with self._mutex:
            self._counts.deposit(now)
            self._total_d += 1
        self._made.add()

    def try_withdraw(self) -> bool:
        """Take one retry from the fleet's budget; False (and nothing taken) when it is
        spent."""
        now = self._now()
        with self._mutex:
            ok = self._balance(now) >= 1.0
            if ok:
                self._counts.try_withdraw(now)  # always takes: it only counts
                self._total_w += 1
        (self._taken if ok else self._refused).add()
        return ok

    def balance(self) -> float:
        """Retries the budget would allow now (may be fractional or negative)."""
        now = self._now()
        with self._mutex:
            return self._balance(now)

    @property
    def fleet(self) -> bool:
        """True while decisions use the fleet's counts, False while local counts alone."""
        now = self._now()
        with self._mutex:
            return now <= self._fresh_until

    # -- the sync, off the call path -------------------------------------------------------

    def sync_now(self) -> bool:
        """Sync with Redis now, in the calling thread (the sync thread does this every
        ``sync_interval``): True when the fleet's counts were read, False when Redis could
        not answer (the budget then decides on local counts alone)."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        with self._syncing:
            return self._sync()

    def _tick(self) -> None:
        if self._closed:
            return
        with self._syncing:
            self._sync()

    def _eval(self, totals: tuple[int, int, int, int]) -> Any:
        args = (*self._args_head, *map(str, totals), self._ttl_ms)
        return self._commands.evalsha(SYNC, (self.key, self.instance_key), args)

    def _sync(self) -> bool:
        now = self._now()
        with self._mutex:
            # Running totals, and those totals less the counts still in the local window:
            # after a long outage the older counts have expired and are not added.
            total_d, total_w = self._total_d, self._total_w
            window_d, window_w = self._counts.counts(now)
        sent = (total_d, total_d - window_d, total_w, total_w - window_w)
        try:
            reply = self.guard.call(self._eval, sent)
            fleet = None if reply is UNAVAILABLE else (int(reply[0]), int(reply[1]))
        except Exception:  # not an outage: a bug, or the script missing from the install
            if not self._failing:
                self._failing = True
                log.exception(
                    "resilience budget %r: sync failed; deciding locally",
                    self.name,
                    extra={
                        "resilience_event": "budget.sync_failed",
                        "resilience_name": self.name,
                        "resilience_from_state": "shared",
                        "resilience_to_state": "local",
                    },
                )
            fleet = None
        now = self._now()
        with self._mutex:
            if fleet is None:
                # What was not sent is sent with the next sync (the totals carry it).
                self._fresh_until = -math.inf
                self._sync_errors += 1
                return False
            self._fleet_d, self._fleet_w = fleet
            self._synced_d, self._synced_w = total_d, total_w
            self._fresh_until = -math.inf if self._closed else now + self._stale_after
            self._syncs += 1
            self._failing = False
            return True

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the sync thread and close the budget's connection pool (the client you
        passed stays open). The budget keeps deciding, on local counts alone."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._fresh_until = -math.inf
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout * 4 + 5.0)
        self._finalizer()

    def __enter__(self) -> FleetRetryBudget:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- observing -----------------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        """Kind ``budget``, as RetryBudget's, plus the sync's counters; the guard around
        Redis is linked (kind ``backend``)."""
        return Telemetry("budget", self.name, self._read_fleet, links=(self.guard,))

    def _read_fleet(self) -> dict[str, float]:
        now = self._now()
        with self._mutex:
            balance = self._balance(now)
            fleet = now <= self._fresh_until
            syncs, errors = self._syncs, self._sync_errors
            fleet_d, fleet_w = self._fleet_d, self._fleet_w
        return {
            # This instance's own, as in RetryBudget.
            "deposits": self._made.value(),
            "withdrawals": self._taken.value(),
            "exhausted": self._refused.value(),
            # What it decides on now (the fleet's, or its own while Redis is away).
            "balance": balance,
            "fleet": 1.0 if fleet else 0.0,
            "syncs": syncs,
            "sync_errors": errors,
            # The fleet's window at the last good sync.
            "fleet_deposits": fleet_d,
            "fleet_withdrawals": fleet_w,
        }

    def __repr__(self) -> str:
        return (
            f"FleetRetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window}, name={self.name!r}, prefix={self.prefix!r})"
        )
