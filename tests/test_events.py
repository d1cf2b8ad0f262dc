"""Event delivery: listeners come and go as users expect."""

from __future__ import annotations

import pytest

import resilience as rs
from resilience.events import Dispatcher


class Recorder:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def on(self, event: object) -> None:
        self.seen.append(event)


def test_a_bound_method_is_removed_by_writing_it_again() -> None:
    # `recorder.on` is a new object each time it is written: equal, not identical.
    recorder = Recorder()
    breaker = rs.CircuitBreaker("events-bound-method")
    breaker.add_listener(recorder.on)
    breaker.remove_listener(recorder.on)
    breaker.force_open()
    assert recorder.seen == []


def test_removing_what_was_never_added_names_it() -> None:
    dispatcher: Dispatcher[object] = Dispatcher()
    with pytest.raises(ValueError, match="not registered"):
        dispatcher.remove(Recorder().on)
