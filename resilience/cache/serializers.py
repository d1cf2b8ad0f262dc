"""Cache serializers: values to bytes and back, safe by default.

Every blob starts with a two-byte header: a format tag and a format version. The tags
are bytes that never occur in UTF-8 (0xF5-0xF7), so a blob is never mistaken for text,
and ``loads`` rejects anything whose header is not its own with
:class:`SerializationError` before parsing a single byte of payload.

- :class:`JsonSerializer` (the default): plain data plus the common standard-library
  value types, each round-tripping to the same type. Nothing in a blob can make it run code.
- :class:`MsgpackSerializer`: the same types in MessagePack; needs ``resilience[msgpack]``.
- :class:`PickleSerializer`: any picklable value, but only with an HMAC key. The MAC is
  checked before unpickling, so bytes written by anyone without the key are never
  unpickled (a shared Redis is not a trusted channel).
"""

from __future__ import annotations

import base64
import hmac
import importlib
import json
import json.encoder
import json.scanner
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol, runtime_checkable
from uuid import UUID

from resilience._checks import a
from resilience.errors import ResilienceError

__all__ = [
    "DEFAULT",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "SerializationError",
    "Serializer",
]


class SerializationError(ResilienceError):
    """Bytes that cannot be read back: foreign, truncated, tampered or from another format."""


@runtime_checkable
class Serializer(Protocol):
    """Turns cache values into bytes and back.

    ``loads`` raises :class:`SerializationError`, and nothing else, for bytes it did not
    write; ``dumps`` raises :class:`TypeError` naming the type of a value it cannot store.
    """

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


_JSON_TAG: Final = 0xF5
_MSGPACK_TAG: Final = 0xF6
_PICKLE_TAG: Final = 0xF7
_NAMES: Final = {_JSON_TAG: "JSON", _MSGPACK_TAG: "MessagePack", _PICKLE_TAG: "pickle"}


def _payload(data: object, tag: int, version: int) -> bytes:
    """The bytes after the header, once the header is known to be ``tag``/``version``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # A str here usually means a Redis client made with decode_responses=True.
        raise TypeError(
            f"data must be bytes, got {type(data).__name__}"
            " (a Redis client for a cache must not use decode_responses=True)"
        )
    raw = bytes(data)
    name = _NAMES[tag]
    if len(raw) < 2:
        raise SerializationError(f"not {name} cache data: {len(raw)} bytes, shorter than a header")
    if raw[0] != tag:
        other = _NAMES.get(raw[0])
        what = f"{other} cache data" if other else "data without a resilience header"
        raise SerializationError(f"not {name} cache data: {what}")
    if raw[1] != version:
        raise SerializationError(
            f"{name} cache data has format version {raw[1]}; this version of resilience"
            f" reads version {version}"
        )
    return raw[2:]


def _unsupported(t: type, fmt: str) -> TypeError:
    return TypeError(
        f"cannot serialize {a(t.__qualname__)} to {fmt}; "
        "use PickleSerializer(hmac_key=...) or convert it"
    )


# --- JSON ------------------------------------------------------------------------------

_JSON_HEADER: Final = bytes((_JSON_TAG, 1))
# Values JSON cannot express become {"__rs__": <kind>, "v": <plain JSON>}; a user dict
# that has the tag key itself is escaped as kind "map" (a list of pairs), so no user data
# can ever read back as a tagged value.
_TAG: Final = "__rs__"
_TAG_TEXT: Final = '"__rs__"'


def _timedelta_json(v: timedelta) -> list[int]:
    return [v.days, v.seconds, v.microseconds]


# Leaf types the encoder's default= hook turns into tagged objects. Exact types only:
# a subclass (an IntEnum, a numpy float) would not read back as itself.
_LEAF_KINDS: Final[dict[type, tuple[str, Callable[[Any], object]]]] = {
    bytes: ("b", lambda v: base64.b64encode(v).decode("ascii")),
    datetime: ("dt", datetime.isoformat),
    date: ("date", date.isoformat),
    time: ("time", time.isoformat),
    timedelta: ("td", _timedelta_json),
    UUID: ("uuid", str),
    Decimal: ("dec", str),  # str(Decimal) is exact: digits, exponent, sign, NaN
}
# What the C encoder writes faithfully by itself (exact types: it would turn an IntEnum
# into a bare int and a tuple into a list, so those take the walk).
_JSON_NATIVE: Final = frozenset({str, int, float, bool, type(None)})
_JSON_FAST: Final = _JSON_NATIVE | frozenset(_LEAF_KINDS)


def _json_default(value: object) -> dict[str, object]:
    kind = _LEAF_KINDS.get(type(value))
    if kind is None:
        raise _unsupported(type(value), "JSON")
    return {_TAG: kind[0], "v": kind[1](value)}


def _json_is_plain(value: Any) -> bool:
    """True when the C encoder plus the default= hook alone write ``value`` faithfully.

    A read-only check, cheaper than building a converted copy: the common case (small
    dicts and lists of str/int) never allocates anything here.
    """
    t = type(value)
    if t is dict:
        if _TAG in value:
            return False
        for k, x in value.items():
            if type(k) is not str:
                return False
            if type(x) not in _JSON_FAST and not _json_is_plain(x):
                return False
        return True
    if t is list:
        for x in value:  # noqa: SIM110 - a plain loop; all() with a generator costs more
            if type(x) not in _JSON_FAST and not _json_is_plain(x):
                return False
        return True
    return t in _JSON_FAST


def _to_json(value: Any) -> object:
    """A copy of ``value`` in plain JSON types, with tagged objects for everything else."""
    t = type(value)
    if t in _JSON_NATIVE:
        return value
    if t is dict:
        for k in value:
            if type(k) is not str:
                raise TypeError(
                    f"cannot serialize a dict with {a(type(k).__qualname__)} key to JSON"
                    " (JSON object keys are str); use PickleSerializer(hmac_key=...)"
                    " or convert it"
                )
        if _TAG in value:
            return {_TAG: "map", "v": [[k, _to_json(x)] for k, x in value.items()]}
        return {k: _to_json(x) for k, x in value.items()}
    if t is list:
        return [_to_json(x) for x in value]
    if t is tuple:
        return {_TAG: "tup", "v": [_to_json(x) for x in value]}
    if t is set:
        return {_TAG: "set", "v": [_to_json(x) for x in value]}
    if t is frozenset:
        return {_TAG: "fset", "v": [_to_json(x) for x in value]}
    return _json_default(value)


def _expect(value: object, t: type) -> Any:
    if type(value) is not t:
        raise SerializationError(f"expected {a(t.__name__)} in tagged value, got {value!r:.40}")
    return value


def _pairs(value: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in _expect(value, list):
        k, v = _expect(pair, list)
        out[_expect(k, str)] = v
    return out


def _timedelta_from_json(value: object) -> timedelta:
    days, seconds, micros = (_expect(x, int) for x in _expect(value, list))
    return timedelta(days=days, seconds=seconds, microseconds=micros)


_JSON_DECODERS: Final[dict[object, Callable[[object], object]]] = {
    "b": lambda v: base64.b64decode(_expect(v, str), validate=True),
    "dt": lambda v: datetime.fromisoformat(_expect(v, str)),
    "date": lambda v: date.fromisoformat(_expect(v, str)),
    "time": lambda v: time.fromisoformat(_expect(v, str)),
    "td": _timedelta_from_json,
    "uuid": lambda v: UUID(_expect(v, str)),
    "dec": lambda v: Decimal(_expect(v, str)),
    "tup": lambda v: tuple(_expect(v, list)),
    "set": lambda v: set(_expect(v, list)),
    "fset": lambda v: frozenset(_expect(v, list)),
    "map": _pairs,
}


def _json_object_hook(d: dict[str, object]) -> object:
    # json calls this bottom-up, so a tagged value's "v" is already decoded.
    if _TAG not in d:
        return d
    if len(d) != 2 or "v" not in d:
        raise SerializationError("malformed tagged value in JSON cache data")
    decode = _JSON_DECODERS.get(d[_TAG])
    if decode is None:
        raise SerializationError(f"unknown tagged value kind {d[_TAG]!r:.40} in JSON cache data")
    return decode(d["v"])


def _make_encoder(ascii_only: bool) -> Callable[[object], str]:
    c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is not None:
        # The C encoder built once (json.dumps builds one per call: ~1 µs of a 2 µs dump).
        # No circular check here: the walk above recurses first, so a cycle never gets here.
        c_encode = c_make_encoder(
            None,
            _json_default,
            json.encoder.encode_basestring_ascii if ascii_only else json.encoder.encode_basestring,
            None,
            ":",
            ",",
            False,
            False,
            True,
        )
        return lambda value: "".join(c_encode(value, 0))
    encoder = json.JSONEncoder(
        ensure_ascii=ascii_only, separators=(",", ":"), default=_json_default
    )
    return encoder.encode


def _make_decoder(hook: bool) -> Callable[[str, int], tuple[object, int]]:
    decoder = json.JSONDecoder(object_hook=_json_object_hook if hook else None)
    # The scanner directly: JSONDecoder.decode adds a regex pass for surrounding whitespace
    # we never write (trailing bytes are still rejected by the caller).
    make_scanner: Any = json.scanner.make_scanner  # typeshed types it as a class
    scan: Callable[[str, int], tuple[object, int]] = make_scanner(decoder)
    return scan


_encode_utf8 = _make_encoder(ascii_only=False)
_encode_ascii = _make_encoder(ascii_only=True)
_scan_plain = _make_decoder(hook=False)
_scan_tagged = _make_decoder(hook=True)


class JsonSerializer:
    """JSON (compact, UTF-8) that reads back the same types it was given.

    Round-trips exactly: dict (str keys), list, tuple, str, int, float (nan and
    infinities too), bool, None, bytes, datetime (naive or aware, microseconds kept; an
    aware value reads back with a fixed-offset ``timezone`` equal to the original),
    date, time, timedelta, UUID, Decimal, set and frozenset, nested in any way. Anything
    else, subclasses of these included (an ``IntEnum`` would read back as a bare int),
    raises :class:`TypeError`.
    """

    __slots__ = ()

    def dumps(self, value: Any) -> bytes:
        try:
            text = _encode_utf8(value if _json_is_plain(value) else _to_json(value))
        except RecursionError:
            raise ValueError("cannot serialize a circular or too deeply nested value") from None
        try:
            return _JSON_HEADER + text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate in some str: \u-escapes keep it and keep the bytes UTF-8.
            return _JSON_HEADER + _encode_ascii(
                value if _json_is_plain(value) else _to_json(value)
            ).encode("ascii")

    def loads(self, data: bytes) -> Any:
        if type(data) is not bytes or len(data) < 2 or data[0] != _JSON_TAG or data[1] != 1:
            # Off the hot path: explains what the bytes are, or accepts a bytearray/view.
            data = _JSON_HEADER + _payload(data, _JSON_TAG, 1)
        try:
            text = data[2:].decode("utf-8")
            # Text without the tag key holds no tagged value: skip the per-dict hook.
            # (Searching the str is ~5x cheaper than searching the bytes.)
            scan = _scan_tagged if _TAG_TEXT in text else _scan_plain
            value, end = scan(text, 0)
        except SerializationError:
            raise
        except Exception as exc:  # parsing runs no user code: any failure is bad data
            raise SerializationError(f"unreadable JSON cache data: {exc!r:.200}") from exc
        if end != len(text):
            raise SerializationError("unreadable JSON cache data: extra bytes after the value")
        return value

    def __repr__(self) -> str:
        return "JsonSerializer()"


# --- MessagePack -----------------------------------------------------------------------

_MSGPACK_HEADER: Final = bytes((_MSGPACK_TAG, 1))
# Extension type codes (application range 0-127).
_EXT_TUPLE, _EXT_SET, _EXT_FROZENSET = 1, 2, 3
_EXT_DATETIME, _EXT_DATE, _EXT_TIME, _EXT_TIMEDELTA = 4, 5, 6, 7
_EXT_UUID, _EXT_DECIMAL, _EXT_BIGINT = 8, 9, 10


class MsgpackSerializer:
    """MessagePack with the same exact round-trips as :class:`JsonSerializer`.

    Dict keys may be any supported hashable value (MessagePack maps allow them). Needs
    the ``msgpack`` package: ``pip install 'resilience[msgpack]'``.
    """

    __slots__ = ("_msgpack",)

    def __init__(self) -> None:
        try:
            # Imported here so the package works without the extra.
            self._msgpack: Any = importlib.import_module("msgpack")
        except ImportError as exc:
            raise ImportError(
                "MsgpackSerializer needs the 'msgpack' package: pip install 'resilience[msgpack]'"
            ) from exc

    def _pack(self, value: object) -> bytes:
        packed: bytes = self._msgpack.packb(
            value, default=self._default, use_bin_type=True, strict_types=True
        )
        return packed

    def _unpack(self, data: bytes) -> object:
        return self._msgpack.unpackb(
            data, ext_hook=self._ext_hook, raw=False, strict_map_key=False, use_list=True
        )

    def _default(self, value: Any) -> object:
        ext = self._msgpack.ExtType
        t = type(value)
        if t is tuple:
            return ext(_EXT_TUPLE, self._pack(list(value)))
        if t is set:
            return ext(_EXT_SET, self._pack(list(value)))
        if t is frozenset:
            return ext(_EXT_FROZENSET, self._pack(list(value)))
        if t is datetime:
            return ext(_EXT_DATETIME, value.isoformat().encode())
        if t is date:
            return ext(_EXT_DATE, value.isoformat().encode())
        if t is time:
            return ext(_EXT_TIME, value.isoformat().encode())
        if t is timedelta:
            return ext(_EXT_TIMEDELTA, self._pack(_timedelta_json(value)))
        if t is UUID:
            return ext(_EXT_UUID, value.bytes)
        if t is Decimal:
            return ext(_EXT_DECIMAL, str(value).encode())
        if t is int:
            # Only reached for ints outside MessagePack's 64-bit range.
            size = (value.bit_length() + 8) // 8
            return ext(_EXT_BIGINT, value.to_bytes(size, "big", signed=True))
        raise _unsupported(t, "MessagePack")

    def _ext_hook(self, code: int, data: bytes) -> object:
        if code == _EXT_TUPLE:
            return tuple(_expect(self._unpack(data), list))
        if code == _EXT_SET:
            return set(_expect(self._unpack(data), list))
        if code == _EXT_FROZENSET:
            return frozenset(_expect(self._unpack(data), list))
        if code == _EXT_DATETIME:
            return datetime.fromisoformat(data.decode())
        if code == _EXT_DATE:
            return date.fromisoformat(data.decode())
        if code == _EXT_TIME:
            return time.fromisoformat(data.decode())
        if code == _EXT_TIMEDELTA:
            return _timedelta_from_json(self._unpack(data))
        if code == _EXT_UUID:
            return UUID(bytes=data)
        if code == _EXT_DECIMAL:
            return Decimal(data.decode())
        if code == _EXT_BIGINT:
            return int.from_bytes(data, "big", signed=True)
        raise SerializationError(f"unknown MessagePack extension type {code}")

    def dumps(self, value: Any) -> bytes:
        try:
            return _MSGPACK_HEADER + self._pack(value)
        except RecursionError:
            raise ValueError("cannot serialize a circular or too deeply nested value") from None
        except ValueError as exc:
            if "recursion" not in str(exc):
                raise
            # msgpack's own nesting limit (512 levels), which is what a cycle reaches.
            raise ValueError(
                "cannot serialize a circular or too deeply nested value to MessagePack"
            ) from exc

    def loads(self, data: bytes) -> Any:
        payload = _payload(data, _MSGPACK_TAG, 1)
        try:
            return self._unpack(payload)
        except SerializationError:
            raise
        except Exception as exc:  # unpacking runs no user code: any failure is bad data
            raise SerializationError(f"unreadable MessagePack cache data: {exc!r:.200}") from exc

    def __repr__(self) -> str:
        return "MsgpackSerializer()"


# --- pickle ----------------------------------------------------------------------------

_PICKLE_HEADER: Final = bytes((_PICKLE_TAG, 1))
_MAC_SIZE: Final = 32  # HMAC-SHA256, fixed: the algorithm is never read from the data
_MIN_KEY: Final = 16
# Fixed, not HIGHEST_PROTOCOL, so processes on different Pythons (3.8+) share entries.
_PICKLE_PROTOCOL: Final = 5


def _check_key(name: str, key: object) -> bytes:
    if not isinstance(key, bytes):
        raise TypeError(f"{name} must be bytes, got {type(key).__name__}")
    if len(key) < _MIN_KEY:
        raise ValueError(f"{name} must be at least {_MIN_KEY} bytes, got {len(key)}")
    return key


def _mac(key: bytes, payload: bytes) -> bytes:
    # The header is signed too, so a blob cannot be replayed under another format version.
    return hmac.digest(key, _PICKLE_HEADER + payload, "sha256")


@dataclass(frozen=True, slots=True, eq=False)
class PickleSerializer:
    """Pickle, signed: any picklable value, for caches whose writers share a secret.

    A blob is header + HMAC-SHA256(hmac_key, header + pickle) + pickle. ``loads`` checks
    the MAC with :func:`hmac.compare_digest` before unpickling, so bytes from anyone
    without the key (a compromised or shared Redis) are rejected, never unpickled.
    ``previous_keys`` are also accepted when reading, so keys can be rotated: deploy
    the new key with the old one in ``previous_keys``, then drop the old one once every
    entry signed with it has expired.
    """

    hmac_key: bytes = field(repr=False)
    previous_keys: Sequence[bytes] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check_key("hmac_key", self.hmac_key)
        given: object = self.previous_keys
        if isinstance(given, (bytes, str)):
            raise TypeError("previous_keys must be a sequence of bytes keys, not a single key")
        keys = tuple(self.previous_keys)
        for i, key in enumerate(keys):
            _check_key(f"previous_keys[{i}]", key)
        object.__setattr__(self, "previous_keys", keys)

    def dumps(self, value: Any) -> bytes:
        try:
            payload = pickle.dumps(value, protocol=_PICKLE_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(
                f"cannot serialize {a(type(value).__qualname__)} with pickle: {exc}"
            ) from exc
        return _PICKLE_HEADER + _mac(self.hmac_key, payload) + payload

    def loads(self, data: bytes) -> Any:
        body = _payload(data, _PICKLE_TAG, 1)
        if len(body) < _MAC_SIZE:
            raise SerializationError("not pickle cache data: shorter than its signature")
        mac, payload = body[:_MAC_SIZE], body[_MAC_SIZE:]
        if not hmac.compare_digest(mac, _mac(self.hmac_key, payload)) and not any(
            hmac.compare_digest(mac, _mac(key, payload)) for key in self.previous_keys
        ):
            raise SerializationError(
                "pickle cache data has a bad signature (tampered, or signed with another key);"
                " it was not unpickled"
            )
        try:
            return pickle.loads(payload)
        except Exception as exc:  # signed by us, yet unreadable now (e.g. a class moved)
            raise SerializationError(
                f"signed pickle cache data failed to unpickle: {exc!r:.200}"
            ) from exc


#: The serializer caches use unless told otherwise.
DEFAULT: Final = JsonSerializer()
