"""The values the outbox passes around: events, failure classes, stats and errors, and
what every broker adapter shares (the failure table, batch encoding)."""

from __future__ import annotations

import enum
import json
import math
import random
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from resilience.errors import CircuitOpenError

__all__ = [
    "Backoff",
    "BrokerUnavailable",
    "DeadEvent",
    "EventRejected",
    "EventTooLarge",
    "Failure",
    "HeldBack",
    "OutboxEvent",
    "OutboxStats",
    "RowFailure",
    "Status",
    "classify_with",
    "encode_batch",
]

E = TypeVar("E")


class Status(str, enum.Enum):
    """A row's status. Leases are columns of their own, not a status."""

    PENDING = "pending"
    PUBLISHED = "published"
    DEAD = "dead"


class Failure(str, enum.Enum):
    """What a failed publish means for the row.

    ``OUTAGE`` is the broker's fault (down, slow, full, or our breaker is open): it feeds
    the breaker and never counts as an attempt. ``POISON`` is the event's fault
    (unencodable, too large, rejected). ``UNKNOWN`` is anything else. Both count attempts.
    """

    OUTAGE = "outage"
    POISON = "poison"
    UNKNOWN = "unknown"


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached (raised by the in-memory broker and adapters)."""


class EventRejected(Exception):
    """The broker refused this one event; retrying the same bytes will not help."""


class EventTooLarge(EventRejected):
    """The encoded event is larger than the broker accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"event is {size} bytes; the broker accepts at most {limit}")
        self.size = size
        self.limit = limit


class HeldBack(Exception):
    """Not sent: an earlier event of the same key in this batch failed before sending.
    The publisher gives the row back without counting an attempt."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One claimed row, as a broker sees it. ``payload`` is the JSON text stored at enqueue."""

    id: int
    event_id: str
    topic: str
    key: str | None
    payload: str
    headers: Mapping[str, str]
    created: float
    attempts: int

    def json(self) -> Any:
        """The payload decoded."""
        return json.loads(self.payload)


@dataclass(frozen=True, slots=True)
class DeadEvent:
    """A dead row, for operators deciding what to replay."""

    id: int
    event_id: str
    topic: str
    key: str | None
    attempts: int
    last_error: str | None
    created: float


@dataclass(frozen=True, slots=True)
class RowFailure:
    """A write-back for one row that failed with a poison or unknown error."""

    id: int
    error: str
    delay: float
    dead: bool


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What an operator asks first. Ages are seconds; ``breaker_state`` comes from the
    publisher (``None`` when the store is asked directly)."""

    pending: int
    in_flight: int
    dead: int
    oldest_pending_age: float | None
    blocked_keys: int
    breaker_state: str | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter for poison and unknown failures.

    The delay before attempt ``n + 1`` is drawn uniformly from ``[d * (1 - jitter), d]``
    where ``d = min(maximum, base * factor ** (n - 1))``.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        positive("Backoff(base=)", self.base)
        positive("Backoff(maximum=)", self.maximum)
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ValueError(f"Backoff(factor=) must be >= 1, got {self.factor!r}")
        if not (0.0 <= self.jitter <= 1.0):
            raise ValueError(f"Backoff(jitter=) must be within [0, 1], got {self.jitter!r}")
        if self.maximum < self.base:
            raise ValueError("Backoff(maximum=) must be >= base")

    def delay(self, attempts: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failure (1-based)."""
        exponent = max(0, attempts - 1)
        # Cap the exponent first: factor ** 5000 overflows long before it matters.
        if exponent > 1024 or self.base * self.factor**exponent > self.maximum:
            full = self.maximum
        else:
            full = self.base * self.factor**exponent
        u = (rand or _RANDOM).random()
        return full * (1.0 - self.jitter * u)


_RANDOM: Final = random.Random()
# json.dumps() with options builds an encoder per call; headers (the trace context on
# every traced event) reuse one.
_HEADERS_JSON: Final = json.JSONEncoder(separators=(",", ":"))
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def check_identifier(field: str, value: object) -> str:
    """A table or schema name that can be pasted into SQL safely."""
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise ValueError(
            f"{field} must be a plain SQL identifier (letters, digits, _), got {value!r}"
        )
    return value


def positive(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a finite number > 0, got {value!r}")
    return float(value)


def positive_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{field} must be >= 1, got {value!r}")
    return value


def encode_event(
    topic: object,
    key: object,
    payload: object,
    headers: object,
    event_id: object,
) -> tuple[str, str, str | None, str, str]:
    """Validate an enqueue call and return (event_id, topic, key, payload, headers) as
    stored. Runs before any SQL so bad input fails inside the caller's transaction, loudly.
    """
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"topic must be a non-empty str, got {topic!r}")
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str or None, got {type(key).__name__}")
    try:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"payload must be JSON-serializable: {error}") from error
    if headers is None:
        head = "{}"
    else:
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise TypeError("headers must be a mapping of str to str")
        head = _HEADERS_JSON.encode(dict(headers))
    if event_id is None:
        eid = str(uuid.uuid4())
    else:
        try:
            eid = str(uuid.UUID(str(event_id)))
        except ValueError:
            raise ValueError(f"event_id must be a UUID, got {event_id!r}") from None
    return eid, topic, key, body, head


def decode_headers(text: str | None) -> Mapping[str, str]:
    if not text or text == "{}":
        return _NO_HEADERS
    value: dict[str, str] = json.loads(text)
    return value


_NO_HEADERS: Final[Mapping[str, str]] = {}


# -- what every broker shares -------------------------------------------------------------

#: One entry per event of a batch: ``None`` when the broker took it, else the exception.
Results = list[BaseException | None]
FailureTable = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], Failure]]

#: Failures every adapter shares, checked after the adapter's own rows.
COMMON_FAILURES: Final[FailureTable] = (
    (CircuitOpenError, Failure.OUTAGE),
    (BrokerUnavailable, Failure.OUTAGE),
    ((ConnectionError, TimeoutError), Failure.OUTAGE),
    (EventRejected, Failure.POISON),
    ((TypeError, ValueError, UnicodeError, OverflowError), Failure.POISON),
    (OSError, Failure.OUTAGE),
)


def classify_with(table: FailureTable, error: BaseException) -> Failure:
    """The first row of ``table`` (then the common rows) that matches ``error``."""
    for types, failure in (*table, *COMMON_FAILURES):
        if isinstance(error, types):
            return failure
    return Failure.UNKNOWN


def encode_batch(
    events: Sequence[OutboxEvent], encode: Callable[[OutboxEvent], E]
) -> tuple[list[tuple[int, E]], Results]:
    """Encode every event up front: (index, encoded) pairs to send, and the results so far.

    A failed encoding holds back the later events of its key."""
    results: Results = [None] * len(events)
    ready: list[tuple[int, E]] = []
    failed_keys: set[str] = set()
    for index, event in enumerate(events):
        if event.key is not None and event.key in failed_keys:
            results[index] = HeldBack(f"held back behind a failed event of key {event.key!r}")
            continue
        try:
            ready.append((index, encode(event)))
        except Exception as error:
            results[index] = error
            if event.key is not None:
                failed_keys.add(event.key)
    return ready, results
