"""The in-process tier: bounded (LRU), expiring, thread- and task-safe.

It also guards against a race every two-tier cache has: a fill that read the remote
tier before an invalidation of the same key arrived must not land afterwards, or the
old value would be served until it expires. A fill takes a ticket before it reads;
an invalidation records its sequence number; a fill whose key was invalidated after
its ticket is dropped. Invalidations are remembered in a bounded table; when a key's
record has been pushed out, fills older than the oldest record are dropped too, so
the check errs towards a miss, never towards a stale hit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from resilience._checks import positive_seconds
from resilience._clock import Clock, resolve
from resilience._clock import monotonic as _monotonic
from resilience.cache.policy import MISSING, Entry

__all__ = ["LocalCache"]

_RECENT_INVALIDATIONS = 4096


class LocalCache:
    """Up to ``max_entries`` values for at most ``ttl`` seconds each, least recently used
    out first. In a TwoTierCache, ``ttl`` caps how stale this tier can be when an
    invalidation message is lost.
    """

    def __init__(self, max_entries: int = 10_000, ttl: float = 30.0, *, clock: Clock | None = None):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.ttl = positive_seconds("ttl", ttl, maximum=100 * 365 * 86_400.0)
        self._clock = resolve(clock)
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, Entry] = OrderedDict()
        self._seq = 0
        self._invalidated: OrderedDict[Hashable, int] = OrderedDict()
        self._forgotten_before = 0  # fills with older tickets are dropped (see invalidate)
        self._aliases: dict[Hashable, Hashable] = {}  # alias -> key
        self._alias_of: dict[Hashable, Hashable] = {}  # key -> alias

    def __len__(self) -> int:
        return len(self._data)

    @property
    def clock(self) -> Clock:
        return self._clock

    def get_entry(self, key: Hashable, now: float) -> Entry | None:
        """The entry if still kept, refreshing its LRU place; freshness is the caller's call."""
        lock = self._lock
        lock.acquire()
        try:
            entry = self._data.get(key)
            if entry is None:
                return None
            if (entry.keep_until or entry.fresh_until) <= now:
                self._drop(key)
                return None
            self._data.move_to_end(key)
            return entry
        finally:
            lock.release()

    def reader(self, clock: Callable[[], float] | None = None) -> Callable[[Hashable], Any]:
        """A function of a key: its value if fresh now on ``clock`` (None: the system
        clock), else ``MISSING``. A hit in one call: the decorators' hot path.

        An entry that is not fresh stays where it is, for the caller's slower path
        (:meth:`get_entry`) to serve stale or drop.
        """
        # A closure over bound methods: each attribute lookup a method would make per
        # call is made once, here, which takes about a third off a hit.
        acquire, release = self._lock.acquire, self._lock.release
        get, move_to_end = self._data.get, self._data.move_to_end

        def fresh(key: Hashable) -> Any:
            now = _monotonic() if clock is None else clock()
            acquire()
            try:
                entry = get(key)
                if entry is None or now >= entry[1]:  # entry.fresh_until (by index: faster)
                    return MISSING
                move_to_end(key)
                return entry[0]  # entry.value
            finally:
                release()

        return fresh

    def get(self, key: Hashable) -> Any:
        """The fresh value, or ``MISSING``."""
        now = self._clock.monotonic()
        entry = self.get_entry(key, now)
        return MISSING if entry is None or entry.fresh_until <= now else entry.value

    def ticket(self) -> int:
        """Take before reading the source of a fill; pass to :meth:`fill`."""
        return self._seq

    def fill(
        self,
        key: Hashable,
        entry: Entry,
        ticket: int | None = None,
        alias: Hashable | None = None,
    ) -> bool:
        """Store ``entry`` unless ``key`` (or ``alias``) was invalidated after ``ticket``.

        ``alias`` is another name invalidations may use for this key (the Redis key of a
        decorated call whose local key is a tuple). Returns True if stored.
        """
        lock = self._lock
        lock.acquire()
        try:
            if ticket is not None:
                # Dropped when an invalidation numbered after the ticket touched this key.
                recent = self._invalidated
                if (
                    ticket < self._forgotten_before
                    or recent.get(key, -1) > ticket
                    or (alias is not None and recent.get(alias, -1) > ticket)
                ):
                    return False
            data = self._data
            data[key] = entry
            data.move_to_end(key)
            if alias is not None and alias != key:
                self._aliases[alias] = key
                self._alias_of[key] = alias
            if len(data) > self.max_entries:
                self._drop(next(iter(data)))
            return True
        finally:
            lock.release()

    def _drop(self, key: Hashable) -> None:
        self._data.pop(key, None)
        alias = self._alias_of.pop(key, None)
        if alias is not None:
            self._aliases.pop(alias, None)

    def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds, capped by this tier's ``ttl``."""
        life = self.ttl if ttl is None else min(ttl, self.ttl)
        self.invalidate(key)  # fills that started earlier must not overwrite this value
        self.fill(key, Entry(value, self._clock.monotonic() + life, 0.0))

    def invalidate(self, key: Hashable) -> None:
        """Drop ``key`` (a key or an alias) and stop fills that started before now."""
        with self._lock:
            target = self._aliases.get(key, key)
            self._drop(target)
            self._seq += 1
            recent = self._invalidated
            for name in {key, target}:
                recent[name] = self._seq
                recent.move_to_end(name)
            while len(recent) > _RECENT_INVALIDATIONS:
                # Which key it was is forgotten: drop every fill that started before it.
                _, seq = recent.popitem(last=False)
                self._forgotten_before = seq

    def delete(self, key: Hashable) -> None:
        self.invalidate(key)

    def clear(self) -> None:
        """Drop everything; fills in progress are dropped too."""
        with self._lock:
            self._data.clear()
            self._aliases.clear()
            self._alias_of.clear()
            self._seq += 1
            self._invalidated.clear()
            self._forgotten_before = self._seq
