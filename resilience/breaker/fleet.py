"""Breakers that decide as a fleet: ``CircuitBreaker(..., fleet=rs.RedisFleet(client))``.

Every instance keeps deciding on its own call path, lock-free and without Redis. A daemon
thread per :class:`RedisFleet` flushes each attached breaker every ``interval`` seconds (and
at once when the breaker trips or its probe ends) with one EVALSHA of ``fleet.lua``, which
does all of the fleet's bookkeeping on Redis' clock (``TIME``):

- **Membership.** Each flush is this instance's heartbeat; a member that misses
  ``ttl`` seconds of them is dropped, with its vote.
- **Open together.** A member votes while its own breaker has tripped. When the votes
  reach ``quorum`` of the live members (or, for a breaker with a ``FailureRate``, the
  failures of every member over the rule's window reach its threshold), the fleet is
  open: every member opens at its next flush, within one ``interval``.
- **One probe per fleet.** While the fleet is open, a member's open breaker does not go
  half-open by itself when its time is up: it keeps rejecting (``retry_after`` =
  ``interval``) until a flush hands it the probe lease (``SET NX PX``, a token of its
  own). The flusher asks for it only for a breaker that has callers (rejections since
  the last flush), so the lease is never spent on an idle member. Only the holder goes
  half-open; its verdict, sent with its token (a lease that expired and moved on fences
  it off), closes or reopens the whole fleet, and every member applies it at its next
  flush. A holder that dies stops renewing nothing: its lease simply expires after
  ``probe_lease`` (default ``recovery_timeout``) and the next member asks for it.
- **Redis away.** A flush that fails tells the breaker to decide alone (its normal state
  machine, local probes included), logged once per breaker and transition and counted by
  the fleet's guard (``resilience_backend_*`` metrics, backend ``redis-fleet:<prefix>``).
  When Redis answers again the breaker rejoins; the counts it made meanwhile are not
  added (they are old).

The fleet's decisions reach a breaker as :class:`~resilience.breaker.events.FleetVerdict`
inputs of its pure state machine (``BreakerPolicy.fleet_verdict``, table
``FLEET_TRANSITIONS``); :class:`FleetView` here is the pure part that turns a flush's reply
into those verdicts.

Keys (the ``{name}`` hash tag keeps a breaker's keys in one Cluster slot):
``{prefix}:{<name>}:s`` (state, members, votes, counts' bases), ``{prefix}:{<name>}:w``
(the fleet's outcome counts by slot), ``{prefix}:{<name>}:lease`` (the probe lease).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import redis

from resilience._checks import positive_seconds
from resilience.breaker.breaker import CircuitBreaker
from resilience.breaker.events import (
    BreakerMode,
    CircuitState,
    FleetVerdict,
    Outcome,
    StateChanged,
    Trigger,
)
from resilience.events import Tally, Telemetry
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

__all__ = ["FLUSH", "FleetReply", "FleetRequest", "FleetView", "RedisFleet"]

log = logging.getLogger("resilience")

#: The flush script (package data of resilience.breaker).
FLUSH: Final = Script("resilience.breaker", "fleet.lua")
#: Slots of the fleet's failure-rate window.
SLOTS: Final = 10
#: Seconds of the fleet-wide failure-rate window for a rule counted in calls.
DEFAULT_RATE_WINDOW: Final = 10.0


def _check_quorum(quorum: object) -> float:
    if (
        isinstance(quorum, bool)
        or not isinstance(quorum, int | float)
        or not math.isfinite(quorum)
        or not 0 < quorum <= 1
    ):
        raise ValueError(f"quorum must be a number in (0, 1], got {quorum!r}")
    return float(quorum)


# -- the pure part ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetRequest:
    """What one flush sends for one breaker."""

    vote: int  # the fleet generation this member's trip happened in, or -1
    want_lease: bool
    token: str
    verdict: str  # "" none, "s" the probe succeeded, "f" it failed


@dataclass(frozen=True, slots=True)
class FleetReply:
    gen: int
    open: bool
    left: float  # seconds until the fleet's open period ends (Redis' clock)
    holder: bool  # this member's token holds the probe lease
    live: int
    votes: int

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> FleetReply:
        gen, state, left_ms, holder, live, votes = (int(x) for x in raw)
        return cls(gen, state == 1, left_ms / 1000, holder == 1, live, votes)


class FleetView:
    """One member's view of the fleet for one breaker: pure, no clock, no I/O.

    It hears the breaker's state changes (:meth:`changed`), says what to send
    (:meth:`request`) and turns the reply into a verdict (:meth:`apply`, :meth:`lost`).
    The caller serialises the calls.
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.gen: int | None = None  # the fleet's generation, as last heard
        self.open = False
        self.healthy = True
        self.holding: str | None = None  # our token while it holds the lease
        self.tripped = False  # this member's own breaker tripped and has not closed
        self.pending = ""  # the probe's verdict, until a flush carried it
        self._serial = 0
        self._rejections = 0
        self.last: FleetReply | None = None
        self.rejoined = False  # the last reply was the first after an outage

    def changed(self, event: StateChanged) -> bool:
        """Note a state change of the breaker; True when a flush should go out now."""
        if event.trigger is Trigger.TRIP:
            self.tripped = True
        if event.new is CircuitState.CLOSED:
            self.tripped = False
        if self.holding is not None and event.old is CircuitState.HALF_OPEN:
            if event.trigger is Trigger.PROBES_SUCCEEDED:
                self.pending = "s"
            elif event.trigger is Trigger.PROBE_FAILED:
                self.pending = "f"
        return event.trigger is Trigger.TRIP or bool(self.pending)

    def request(self, state: CircuitState, mode: BreakerMode, rejections: int) -> FleetRequest:
        """What to send, given the breaker's state and its running count of rejections."""
        demand = rejections != self._rejections
        self._rejections = rejections
        want = (
            self.open
            and self.holding is None
            and state is CircuitState.OPEN
            and mode is BreakerMode.NORMAL
            and demand
        )
        if self.holding is not None:
            token = self.holding
        else:
            self._serial += 1
            token = f"{self.instance}:{self._serial}"
        vote = self.gen if self.tripped and self.gen is not None else -1
        return FleetRequest(vote, want, token, self.pending)

    def apply(self, sent: FleetRequest, reply: FleetReply) -> FleetVerdict | None:
        """The verdict a flush's reply gives the breaker, or None when nothing changed."""
        if sent.verdict and self.pending == sent.verdict:
            self.pending = ""  # carried: taken, or fenced off by a lease that moved on
        was_healthy, prev_gen, was_holding = self.healthy, self.gen, self.holding
        self.healthy = True
        self.rejoined = not was_healthy
        self.gen, self.open, self.last = reply.gen, reply.open, reply
        self.holding = sent.token if reply.holder else None
        if not reply.open:
            self.holding = None
            # The fleet closed since we last heard (its probe succeeded): close too.
            return FleetVerdict.CLOSE if prev_gen is not None and reply.gen != prev_gen else None
        if reply.holder:
            return None if was_holding else FleetVerdict.PROBE
        if reply.gen != prev_gen:
            return FleetVerdict.OPEN  # it opened, or its probe failed: a new period
        if not was_healthy:
            return FleetVerdict.HOLD  # back after an outage: what we decided alone stands
        if was_holding:
            return FleetVerdict.OPEN  # our lease ran out: back to waiting
        return None

    def lost(self) -> FleetVerdict | None:
        """A flush failed: LOCAL on the first failure after a good one."""
        if not self.healthy:
            return None
        self.healthy = False
        return FleetVerdict.LOCAL


# -- the shell --------------------------------------------------------------------------


class _Member:
    """One attached breaker: its keys, its view, and a weak reference to it."""

    __slots__ = ("args", "breaker", "keys", "name", "skip_counts", "view")

    def __init__(self, fleet: RedisFleet, breaker: CircuitBreaker) -> None:
        cfg = breaker.config
        name = cfg.name
        if "{" in name or "}" in name:
            raise ValueError(
                f"fleet: breaker name must not contain braces (it is the hash tag), got {name!r}"
            )
        self.name = name
        self.breaker = weakref.ref(breaker)
        base = f"{fleet.prefix}:{{{name}}}"
        self.keys = (f"{base}:s", f"{base}:w", f"{base}:lease")
        self.view = FleetView(fleet.instance)
        self.skip_counts = False
        rule = cfg.failure_rate
        window = DEFAULT_RATE_WINDOW if rule is None else (rule.window_seconds or fleet.window)
        cap = cfg.max_recovery_timeout
        self.args: tuple[str, ...] = (
            str(math.ceil(cfg.lease * 1000)),
            repr(fleet.quorum),
            str(math.ceil(cfg.recovery_timeout * 1000)),
            repr(cfg.recovery_backoff),
            "0" if cap is None else str(math.ceil(cap * 1000)),
            "0" if rule is None else repr(rule.threshold),
            "0" if rule is None else str(rule.minimum_calls),
            repr(window * 1000 / SLOTS),
            str(SLOTS),
        )


def _run(
    ref: weakref.ReferenceType[RedisFleet], stop: threading.Event, wake: threading.Event
) -> None:
    """The flusher: holds the fleet only while it flushes; ends on close or collection."""
    while True:
        fleet = ref()
        if fleet is None:
            return
        interval = fleet.interval
        wake.clear()  # before the flush: a wake during it flushes again at once
        try:
            fleet.flush()
        except Exception:  # keep flushing: the next one may do better
            log.exception(
                "resilience fleet %r: flush thread error",
                fleet.prefix,
                extra={
                    "resilience_event": "fleet.thread_error",
                    "resilience_backend": fleet.prefix,
                },
            )
        finally:
            del fleet
        if stop.is_set():
            return
        wake.wait(interval)
        if stop.is_set():
            return


def _shutdown(stop: threading.Event, wake: threading.Event, commands: Commands) -> None:
    stop.set()
    wake.set()
    commands.close()


class RedisFleet:
    """Fleet-wide decisions for the breakers given it (see the module's docstring).

    ``client``: a sync ``redis.Redis`` or ``redis.RedisCluster``, or a ``redis://`` URL, or
    nothing and ``connection`` keyword arguments for ``redis.Redis``. The fleet flushes
    from a daemon thread of its own, so it serves sync and async callers alike and never
    needs an event loop; an asyncio client is refused (pass a sync client or a URL to the
    same server). ``quorum``: the share of live members whose own trips open the fleet, in
    (0, 1]. ``interval``: seconds between flushes, the time a verdict takes to reach every
    member. ``ttl``: seconds a member stays live without a flush (default 3 intervals).
    ``window``: seconds of the fleet-wide failure rate, for a ``FailureRate`` counted in
    calls (one counted in seconds keeps its own). ``timeout``: seconds one flush may take.
    """

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster | str | None = None,
        quorum: float = 0.5,
        interval: float = 1.0,
        *,
        prefix: str = "resilience:fleet",
        ttl: float | None = None,
        window: float = DEFAULT_RATE_WINDOW,
        timeout: float = 0.5,
        **connection: Any,
    ) -> None:
        if isinstance(client, str):
            if connection:
                raise TypeError("pass connection keyword arguments or a URL, not both")
            client = redis.Redis.from_url(client)
        elif client is None:
            if not connection:
                raise TypeError("client: pass a redis.Redis, a redis:// URL or connection kwargs")
            client = redis.Redis(**connection)
        elif connection:
            raise TypeError(f"unexpected keyword arguments with a client: {sorted(connection)}")
        if check_client(client):  # True for an asyncio client
            raise TypeError(
                "client must be a sync redis.Redis or redis.RedisCluster, or a URL: the fleet "
                "flushes from a thread of its own and serves async callers just the same, "
                f"got {type(client).__name__}"
            )
        self.quorum = _check_quorum(quorum)
        self.interval = positive_seconds("interval", interval)
        self.ttl = 3 * self.interval if ttl is None else positive_seconds("ttl", ttl)
        if self.ttl <= self.interval:
            raise ValueError(f"ttl must be more than interval ({self.interval:g}s), got {ttl!r}")
        self.window = positive_seconds("window", window)
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        self.prefix = prefix
        self.timeout = check_timeout(timeout)
        #: This member: host, pid and a random part (the lease's tokens start with it).
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ttl_ms = str(math.ceil(self.ttl * 1000))
        self._members: dict[int, _Member] = {}
        self._lock = threading.Lock()  # guards _members and every FleetView
        self._flushing = threading.Lock()  # the thread's flush and flush() take turns
        #: Plain counters, read at scrape time: flushes sent, and breakers that fell back
        #: to deciding alone (once per outage each). Redis errors: ``guard.errors``.
        self.flushes = 0
        self.local_fallbacks = 0
        self._failing = False
        self._commands = Commands(client, self.timeout)
        self.guard = RemoteGuard(
            f"redis-fleet:{prefix}",
            errors=OUTAGE_ERRORS,
            on_error=OnError.LOCAL,
            breaker=None,
            listeners=[],
            timeout=self.timeout,
        )
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._wake, self._commands)
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"RedisFleet(quorum={self.quorum}, interval={self.interval}, prefix={self.prefix!r})"

    # -- attaching -------------------------------------------------------------------------

    def attach(self, breaker: CircuitBreaker) -> None:
        """Make ``breaker`` decide with the fleet (``CircuitBreaker(fleet=...)`` calls this)."""
        member = _Member(self, breaker)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._members[id(breaker)] = member
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_run,
                    args=(weakref.ref(self), self._stop, self._wake),
                    name=f"resilience-fleet:{self.prefix}",
                    daemon=True,
                )
                self._thread.start()
        if breaker.config.failure_rate is not None:
            _count_successes(breaker)
        interval = self.interval

        def set_wait(policy: Any, now: float) -> None:
            policy.fleet_wait = interval

        breaker._with_policy(set_wait)
        view, wake, lock = member.view, self._wake, self._lock

        def changed(event: object) -> None:
            if isinstance(event, StateChanged):
                with lock:
                    urgent = view.changed(event)
                if urgent:
                    wake.set()

        # State changes only: the breaker keeps its lock-free path.
        breaker.add_listener(changed, only=(StateChanged,))
        wake.set()

    # -- flushing --------------------------------------------------------------------------

    def flush(self) -> None:
        """Flush every attached breaker now (the thread does this every ``interval``)."""
        with self._flushing:
            with self._lock:
                members = list(self._members.items())
            for key, member in members:
                breaker = member.breaker()
                if breaker is None:
                    with self._lock:
                        self._members.pop(key, None)
                    continue
                self._flush_one(member, breaker)
                del breaker

    def _flush_one(self, member: _Member, breaker: CircuitBreaker) -> None:
        state, mode, rejections, successes, failures = _snapshot(breaker)
        with self._lock:
            sent = member.view.request(state, mode, rejections)
        args = (
            self.instance,
            self._ttl_ms,
            str(sent.vote),
            "1" if sent.want_lease else "0",
            sent.token,
            sent.verdict,
            *member.args,
            str(successes),
            str(failures),
            "1" if member.skip_counts else "0",
            "0",
        )
        try:
            raw = self.guard.call(self._commands.evalsha, FLUSH, member.keys, args)
            reply = None if raw is UNAVAILABLE else FleetReply.parse(raw)
        except Exception:  # not an outage: a bug, or the script missing from the install
            if not self._failing:
                self._failing = True
                log.exception(
                    "resilience fleet %r: flush failed",
                    self.prefix,
                    extra={
                        "resilience_event": "fleet.flush_failed",
                        "resilience_backend": self.prefix,
                    },
                )
            reply = None
        self.flushes += 1
        with self._lock:
            if reply is None:
                verdict = member.view.lost()
                member.skip_counts = True
            else:
                verdict = member.view.apply(sent, reply)
                member.skip_counts = False
                self._failing = False
        if reply is None:
            if verdict is not None:
                self.local_fallbacks += 1
                log.warning(
                    "resilience breaker %r: fleet unavailable; deciding alone",
                    member.name,
                    extra={
                        "breaker": member.name,
                        "fleet": self.prefix,
                        "state": state.value,
                        "error_class": type(self.guard._last_error).__name__,
                        "resilience_event": "fleet.unavailable",
                        "resilience_name": member.name,
                        "resilience_backend": self.prefix,
                        "resilience_from_state": "fleet",
                        "resilience_to_state": "alone",
                        "resilience_error_type": type(self.guard._last_error).__name__,
                    },
                )
                _apply(breaker, verdict, 0.0)
            return
        if member.view.rejoined:
            log.warning(
                "resilience breaker %r: fleet back; deciding with it",
                member.name,
                extra={
                    "breaker": member.name,
                    "fleet": self.prefix,
                    "state": state.value,
                    "resilience_event": "fleet.back",
                    "resilience_name": member.name,
                    "resilience_backend": self.prefix,
                    "resilience_from_state": "alone",
                    "resilience_to_state": "fleet",
                },
            )
        if verdict is not None:
            _apply(breaker, verdict, reply.left)

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the fleet (members' entries removed), stop the thread, close the pool. The
        breakers keep deciding, alone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            members = list(self._members.values())
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.timeout * 4 + 5.0)
        for member in members:
            breaker = member.breaker()
            if breaker is not None:
                _apply(breaker, FleetVerdict.LOCAL, 0.0)
            leave = (
                self.instance,
                self._ttl_ms,
                "-1",
                "0",
                "",
                "",
                *member.args,
                "0",
                "0",
                "1",
                "1",
            )
            try:
                self._commands.evalsha(FLUSH, member.keys, leave)
            except OUTAGE_ERRORS:  # its entry expires after ttl instead
                continue
        self._finalizer()

    def __enter__(self) -> RedisFleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def telemetry(self) -> Telemetry:
        """The guard around Redis (kind ``backend``): available, outages, errors, fallbacks."""
        return self.guard.telemetry()

    def view(self, breaker: CircuitBreaker) -> FleetReply | None:
        """The fleet's state for ``breaker`` as of its last good flush (None before one)."""
        with self._lock:
            member = self._members.get(id(breaker))
            return None if member is None else member.view.last


def _snapshot(breaker: CircuitBreaker) -> tuple[CircuitState, BreakerMode, int, int, int]:
    """State, mode, running rejections and outcome counts of ``breaker``."""

    def read(policy: Any, now: float) -> tuple[CircuitState, BreakerMode, int, int, int]:
        ok = breaker._ok.value() if breaker._ok is not None else 0
        return (
            policy.current_state(now),
            policy.mode,
            policy.rejections_total + breaker._quick_carry + breaker._quick(),
            policy.outcomes_total[Outcome.SUCCESS] + ok,
            policy.outcomes_total[Outcome.FAILURE],
        )

    return breaker._with_policy(read)


def _apply(breaker: CircuitBreaker, verdict: FleetVerdict, left: float) -> None:
    breaker._with_policy(lambda policy, now: policy.fleet_verdict(verdict, now, left))


def _count_successes(breaker: CircuitBreaker) -> None:
    """The lock-free path counts successes only when asked: the fleet's rate needs them."""
    with breaker._lock:
        if breaker._ok is None:
            breaker._ok = Tally()
            breaker._policy.count_ok = breaker._ok.add
