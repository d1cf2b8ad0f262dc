"""Every live CircuitBreaker of the process, by name: ``rs.breakers()``, ``rs.get_breaker()``.

The registry holds weak references only, so it never keeps a breaker alive: a breaker
nobody refers to any more is collected and drops out. Names need not be unique (tests
and libraries make several breakers called the same), so listing shows them all and a
lookup by a name two live breakers share is an error instead of a guess.

A weak reference's callback may run in any thread, at any allocation, even while this
thread holds the registry's lock, so the callback takes no lock: it removes its entry
with one ``dict.pop``, atomic on its own.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from resilience.breaker.breaker import CircuitBreaker

__all__ = ["breakers", "get_breaker"]

#: At most this many names are spelled out in a lookup error.
_NAMES_SHOWN: Final = 20


class _Registry:
    """Weak references to breakers in creation order. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, weakref.ref[CircuitBreaker]] = {}
        self._serials = itertools.count()

    def add(self, breaker: CircuitBreaker) -> None:
        refs = self._refs
        with self._lock:
            serial = next(self._serials)
            refs[serial] = weakref.ref(breaker, _forget(refs, serial))

    def live(self) -> list[CircuitBreaker]:
        """The live breakers, in creation order."""
        with self._lock:
            refs = list(self._refs.values())
        return [b for ref in refs if (b := ref()) is not None]


def _forget(
    refs: dict[int, weakref.ref[CircuitBreaker]], serial: int
) -> Callable[[weakref.ref[CircuitBreaker]], None]:
    def forget(_: weakref.ref[CircuitBreaker]) -> None:
        refs.pop(serial, None)

    return forget


REGISTRY: Final = _Registry()


def breakers() -> list[CircuitBreaker]:
    """Every live breaker of this process, sorted by name (breakers of the same name in
    the order they were made). A new list each call; it holds the breakers while kept."""
    return sorted(REGISTRY.live(), key=lambda b: b.name)


def get_breaker(name: str) -> CircuitBreaker:
    """The live breaker called ``name``.

    Raises KeyError naming the live breakers when none is called so, and LookupError
    when several live breakers share the name (pick one from ``breakers()``).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    live = REGISTRY.live()
    found = [b for b in live if b.name == name]
    if len(found) == 1:
        return found[0]
    if found:
        raise LookupError(
            f"{len(found)} live breakers are named {name!r}; give each breaker its own "
            "name, or pick one from resilience.breakers()"
        )
    names = sorted({b.name for b in live})
    if not names:
        known = "there are no live breakers"
    else:
        shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
        more = len(names) - _NAMES_SHOWN
        known = f"live breakers: {shown}" + (f" and {more} more" if more > 0 else "")
    raise KeyError(f"no live breaker named {name!r}; {known}")
