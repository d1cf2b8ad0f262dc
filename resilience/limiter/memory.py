"""In-process token buckets: one dict per limit, one short lock, lazy exact eviction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Final

from resilience._clock import monotonic as _monotonic
from resilience.limiter.bucket import EPSILON, Decision, Limit, combine, decide

__all__ = ["MemoryBackend", "MemoryTable"]

_SWEEP_MIN = 1024
_new_decision = tuple.__new__
_UNIT: Final[float] = 1  # see resilience.limiter._core.UNIT


class MemoryTable:
    """The buckets of one limit: key -> full_at. Full buckets are dropped, which is exact."""

    __slots__ = (
        "_cap_eps",
        "_fill",
        "_full_at",
        "_limit_int",
        "_lock",
        "_next_sweep",
        "capacity",
        "limit",
        "rate",
    )

    def __init__(self, limit: Limit, lock: threading.Lock) -> None:
        self.limit = limit
        self.rate = limit.rate
        self.capacity = limit.capacity
        self._fill = limit.fill_time + EPSILON
        self._cap_eps = limit.capacity + EPSILON
        self._limit_int = int(limit.capacity)
        self._lock = lock
        self._full_at: dict[str, float] = {}
        self._next_sweep = _SWEEP_MIN

    def __len__(self) -> int:
        return len(self._full_at)

    def decide(self, key: str, cost: float, now: float) -> Decision:
        # bucket.decide() inlined with this limit's constants: this is the hot path.
        # tests/test_limiter_memory.py checks that the two always agree. Explicit
        # acquire/release: `with lock` costs ~2.5x as much here.
        table, rate = self._full_at, self.rate
        lock = self._lock
        lock.acquire()
        try:
            full_at = table.get(key)
            if full_at is None:
                base = now
                if len(table) >= self._next_sweep:  # only new keys grow the table
                    self._sweep(now)
            else:
                base = now if full_at < now else full_at
            after = base + cost / rate
            if after - now <= self._fill:
                table[key] = after
                return _new_decision(
                    Decision,
                    (
                        True,
                        int(self._cap_eps - (after - now) * rate),
                        0.0,
                        after - now,
                        self._limit_int,
                    ),
                )
        finally:
            lock.release()
        return _new_decision(
            Decision,
            (
                False,
                int(self._cap_eps - (base - now) * rate),
                after - now - self._fill + EPSILON,
                base - now,
                self._limit_int,
            ),
        )

    def hot_path(
        self,
        general: Callable[[str, float], Decision],
        clock: Callable[[], float] | None,
        allowed: Callable[[], object] | None = None,
        denied: Callable[[], object] | None = None,
    ) -> Callable[[str, float], Decision]:
        """``try_acquire`` for a limiter of this one limit, whole-token capacity, nobody
        listening. A cost of 1 for a non-empty str key, the usual call, is decided here
        in one Python call: the clock (``clock``, or the system clock when None), the
        lock and :meth:`decide` for a cost of 1, specialised (one division less, every
        constant a closure cell). Anything else goes to ``general``. ``allowed`` and
        ``denied``, when given (a watched limiter), count each answer.
        tests/test_limiter_memory.py checks it against decide and bucket.decide.
        """
        table, rate, fill, cap_eps, limit = (
            self._full_at,
            self.rate,
            self._fill,
            self._cap_eps,
            self._limit_int,
        )
        step = 1 / rate  # what decide() computes as cost / rate for a cost of 1
        acquire, release, get = self._lock.acquire, self._lock.release, table.get

        def try_acquire(key: str, cost: float = 1) -> Decision:
            if cost is not _UNIT or type(key) is not str or not key:  # type(): the fastest
                return general(key, cost)
            now = _monotonic() if clock is None else clock()
            acquire()
            try:
                full_at = get(key)
                if full_at is None:
                    base = now
                    if len(table) >= self._next_sweep:
                        self._sweep(now)
                else:
                    base = now if full_at < now else full_at
                after = base + step
                wait = after - now
                if wait <= fill:
                    table[key] = after
                    if allowed is not None:  # watched: one C-level increment
                        allowed()
                    return _new_decision(
                        Decision, (True, int(cap_eps - wait * rate), 0.0, wait, limit)
                    )
            finally:
                release()
            if denied is not None:
                denied()
            return _new_decision(
                Decision,
                (
                    False,
                    int(cap_eps - (base - now) * rate),
                    wait - fill + EPSILON,
                    base - now,
                    limit,
                ),
            )

        return try_acquire

    def _sweep(self, now: float) -> None:
        """Drop full buckets. Runs when the table doubles, so it costs O(1) per insert."""
        table = self._full_at
        for key in [k for k, full_at in table.items() if full_at <= now]:
            del table[key]
        self._next_sweep = max(_SWEEP_MIN, 2 * len(table))

    def peek(self, key: str, now: float) -> float | None:
        """The key's full_at, or None when its bucket is full."""
        full_at = self._full_at.get(key)
        return full_at if full_at is not None and full_at > now else None

    def preview(self, key: str, cost: float, now: float) -> Decision:
        """What :meth:`decide` would answer now, with the same arithmetic, taking nothing
        and adding no entry (one dict read: no lock needed)."""
        rate = self.rate
        full_at = self._full_at.get(key)
        base = now if full_at is None or full_at < now else full_at
        after = base + cost / rate
        if after - now <= self._fill:
            return _new_decision(
                Decision,
                (
                    True,
                    int(self._cap_eps - (after - now) * rate),
                    0.0,
                    after - now,
                    self._limit_int,
                ),
            )
        return _new_decision(
            Decision,
            (
                False,
                int(self._cap_eps - (base - now) * rate),
                after - now - self._fill + EPSILON,
                base - now,
                self._limit_int,
            ),
        )


class MemoryBackend:
    """Buckets in this process's memory. Thread- and task-safe.

    Memory is bounded by the keys active within one fill time (capacity / rate): a key's
    entry is dropped once its bucket has refilled. Several limits sharing one backend
    share its lock, so a group of limits is decided atomically.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[tuple[str, Limit], MemoryTable] = {}

    def table(self, name: str, limit: Limit) -> MemoryTable:
        with self._lock:
            table = self._tables.get((name, limit))
            if table is None:
                table = self._tables[(name, limit)] = MemoryTable(limit, self._lock)
            return table

    def decide(self, tables: Sequence[MemoryTable], key: str, cost: float, now: float) -> Decision:
        """All limits consume, or none do."""
        if len(tables) == 1:
            return tables[0].decide(key, cost, now)
        return self.decide_group(tables, key, cost, now)

    async def adecide(
        self, tables: Sequence[MemoryTable], key: str, cost: float, now: float
    ) -> Decision:
        return self.decide(tables, key, cost, now)

    def decide_many(
        self, tables: Sequence[MemoryTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        return [self.decide(tables, key, cost, now) for key, cost in items]

    async def adecide_many(
        self, tables: Sequence[MemoryTable], items: Sequence[tuple[str, float]], now: float
    ) -> list[Decision]:
        return self.decide_many(tables, items, now)

    def decide_group(
        self, tables: Sequence[MemoryTable], key: str, cost: float, now: float
    ) -> Decision:
        """All limits consume, or none do."""
        with self._lock:
            pending = [decide(t._full_at.get(key), now, cost, t.rate, t.capacity) for t in tables]
            if all(d.allowed for d, _ in pending):
                for t, (_, full_at) in zip(tables, pending, strict=True):
                    assert full_at is not None
                    t._full_at[key] = full_at
                    if len(t._full_at) > t._next_sweep:
                        t._sweep(now)
        return combine([d for d, _ in pending])

    def peek(self, tables: Sequence[MemoryTable], key: str, cost: float, now: float) -> Decision:
        """What :meth:`decide` would answer now; takes nothing and adds no entry."""
        if len(tables) == 1:
            return tables[0].preview(key, cost, now)
        return self.peek_group(tables, key, cost, now)

    async def apeek(
        self, tables: Sequence[MemoryTable], key: str, cost: float, now: float
    ) -> Decision:
        return self.peek(tables, key, cost, now)

    def peek_group(
        self, tables: Sequence[MemoryTable], key: str, cost: float, now: float
    ) -> Decision:
        """What :meth:`decide_group` would answer now; takes nothing and adds no entry."""
        with self._lock:
            return combine(
                [decide(t._full_at.get(key), now, cost, t.rate, t.capacity)[0] for t in tables]
            )

    def reset(self, tables: Sequence[MemoryTable], key: str) -> bool:
        """Make the key's buckets full again: drop its entries (a full bucket has none)."""
        with self._lock:
            for t in tables:
                t._full_at.pop(key, None)
        return True

    async def areset(self, tables: Sequence[MemoryTable], key: str) -> bool:
        return self.reset(tables, key)

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())
