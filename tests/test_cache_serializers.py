"""Cache serializers: exact round-trips, and bytes they did not write are refused, never run."""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import pickle
import sys
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import IntEnum
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.cache.serializers import (
    DEFAULT,
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    SerializationError,
    Serializer,
)
from resilience.errors import ResilienceError

KEY = b"k" * 32
OTHER_KEY = b"o" * 32

try:
    MSGPACK: MsgpackSerializer | None = MsgpackSerializer()
    NO_MSGPACK = ""
except ImportError as exc:  # the optional extra is not installed
    MSGPACK = None
    NO_MSGPACK = str(exc)

needs_msgpack = pytest.mark.skipif(MSGPACK is None, reason=NO_MSGPACK)


def json_s() -> Serializer:
    return JsonSerializer()


def msgpack_s() -> Serializer:
    assert MSGPACK is not None
    return MSGPACK


def pickle_s() -> Serializer:
    return PickleSerializer(hmac_key=KEY)


# Serializers that round-trip the documented types exactly (pickle does too, trivially).
TYPED = [
    pytest.param(json_s, id="json"),
    pytest.param(msgpack_s, id="msgpack", marks=needs_msgpack),
]
ALL = [*TYPED, pytest.param(pickle_s, id="pickle")]


def canon(v: Any) -> Any:
    """A comparable form that sees types, float signs and NaN (== sees none of them)."""
    t = type(v)
    if t is float:
        return ("float", repr(v))
    if t in (tuple, list):
        return (t.__name__, tuple(canon(x) for x in v))
    if t is dict:
        return ("dict", tuple((canon(k), canon(x)) for k, x in v.items()))
    if t in (set, frozenset):
        return (t.__name__, frozenset(canon(x) for x in v))
    if t in (datetime, time):
        return (t.__name__, v.isoformat(), v.utcoffset())
    if t is Decimal:
        return ("Decimal", str(v))
    return (t.__name__, v)


IST = timezone(timedelta(hours=5, minutes=30))
EVERY_TYPE: dict[str, Any] = {
    "dict": {"a": 1, "b": {"c": [1, 2]}},
    "empty_dict": {},
    "list": [1, "two", 3.0, None],
    "tuple": (1, "two", (3, (4,))),
    "empty_tuple": (),
    "str": "héllo, 世界 \x00",
    "int": -(2**80),
    "float": 0.1,
    "neg_zero": -0.0,
    "nan": math.nan,
    "inf": math.inf,
    "ninf": -math.inf,
    "bool": True,
    "none": None,
    "bytes": b"\x00\xff\x80abc",
    "datetime_naive": datetime(2024, 2, 29, 23, 59, 59, 999_999),
    "datetime_aware": datetime(2024, 1, 1, 12, 0, 0, 1, tzinfo=IST),
    "datetime_utc": datetime(2024, 1, 1, tzinfo=timezone.utc),
    "date": date(1999, 12, 31),
    "time": time(1, 2, 3, 4),
    "time_aware": time(1, 2, 3, 4, tzinfo=IST),
    "timedelta": timedelta(days=-3, seconds=5, microseconds=7),
    "uuid": UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("1.10"),
    "decimal_exp": Decimal("-1.5E+300"),
    "decimal_nan": Decimal("NaN"),
    "set": {1, "a", (2, 3)},
    "frozenset": frozenset({1.5, frozenset({b"x"})}),
    "empty_set": set(),
}


@pytest.mark.parametrize("make", TYPED)
@pytest.mark.parametrize("name", sorted(EVERY_TYPE))
def test_every_supported_type_round_trips_exactly(make: Any, name: str) -> None:
    s: Serializer = make()
    value = EVERY_TYPE[name]
    back = s.loads(s.dumps(value))
    assert canon(back) == canon(value)


@pytest.mark.parametrize("make", ALL)
def test_nested_structures_of_everything_round_trip(make: Any) -> None:
    s: Serializer = make()
    value = {
        "all": dict(EVERY_TYPE),
        "in_list": list(EVERY_TYPE.values()),
        "in_tuple": tuple(EVERY_TYPE.values()),
        "deep": [({"x": (frozenset({(1, date(2000, 1, 1))}),)},)],
    }
    assert canon(s.loads(s.dumps(value))) == canon(value)


@pytest.mark.parametrize("make", TYPED)
def test_user_dicts_with_the_tag_key_are_escaped(make: Any) -> None:
    s: Serializer = make()
    for value in [
        {"__rs__": "dt", "v": "x"},
        {"__rs__": "tup", "v": [1, 2]},
        {"__rs__": "map", "v": [["a", 1]]},
        {"__rs__": 1},
        [{"__rs__": "b", "v": "AA=="}, {"nested": {"__rs__": "set", "v": []}}],
    ]:
        assert canon(s.loads(s.dumps(value))) == canon(value)


def test_json_blob_is_compact_utf8_json_after_the_header() -> None:
    blob = JsonSerializer().dumps({"id": 1, "name": "é"})
    assert blob[:2] == b"\xf5\x01"
    assert blob[2:] == '{"id":1,"name":"é"}'.encode()
    # The header is not UTF-8, so a blob is never mistaken for a text value.
    with pytest.raises(UnicodeDecodeError):
        blob.decode("utf-8")


def test_json_keeps_lone_surrogates_and_still_writes_valid_utf8() -> None:
    s = JsonSerializer()
    blob = s.dumps({"s": "a\ud800b"})
    blob[2:].decode("utf-8")
    assert s.loads(blob) == {"s": "a\ud800b"}


class Foo:
    pass


class Colour(IntEnum):
    RED = 1


@pytest.mark.parametrize("make", TYPED)
@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Foo(), "Foo"),
        ({"x": [Foo()]}, "Foo"),
        (Colour.RED, "Colour"),  # an int subclass would read back as a bare int
        (object, "type"),
    ],
)
def test_unsupported_types_raise_type_error_naming_the_type(
    make: Any, value: object, type_name: str
) -> None:
    with pytest.raises(TypeError, match=rf"cannot serialize a {type_name} to .*PickleSerializer"):
        make().dumps(value)


@pytest.mark.parametrize("key", [1, (1, 2), None, 1.5])
def test_json_dict_keys_must_be_str(key: object) -> None:
    with pytest.raises(TypeError, match=type(key).__name__):
        JsonSerializer().dumps({key: "v"})


@needs_msgpack
def test_msgpack_dict_keys_may_be_any_supported_hashable() -> None:
    s = msgpack_s()
    value = {1: "a", (1, "x"): "b", None: "c", b"k": "d", 2.5: "e"}
    assert canon(s.loads(s.dumps(value))) == canon(value)


def test_msgpack_missing_extra_raises_import_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "msgpack", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'resilience\[msgpack\]'"):
        MsgpackSerializer()


@pytest.mark.parametrize("make", TYPED)
def test_circular_values_raise_value_error(make: Any) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="circular"):
        make().dumps({"a": loop})


# --- bytes a serializer did not write ---------------------------------------------------


def blobs_of_every_serializer() -> dict[str, bytes]:
    value = {"id": 1, "tags": ["a", "b"]}
    out = {
        "json": JsonSerializer().dumps(value),
        "pickle": PickleSerializer(hmac_key=KEY).dumps(value),
        "pickle_other_key": PickleSerializer(hmac_key=OTHER_KEY).dumps(value),
        "raw_json": json.dumps(value).encode(),
        "raw_pickle": pickle.dumps(value),
    }
    if MSGPACK is not None:
        out["msgpack"] = MSGPACK.dumps(value)
    return out


GARBAGE = [
    b"",
    b"\xf5",
    b"\xf6",
    b"\xf7",
    b"\xf5\x01",
    b"\xf6\x01",
    b"\xf7\x01",
    b"\x00\x01\x02",
    b"hello world",
    b'{"id": 1}',
    b"\xf5\x01\xff\xfe\xfd",
    b"\xf5\x01{",
    b"\xf5\x01[1,2",
    b"\xf5\x01[1] [2]",
    b"\xf5\x01 1",
    b'\xf5\x01{"__rs__":"dt","v":5}',
    b'\xf5\x01{"__rs__":"dt","v":"not a date"}',
    b'\xf5\x01{"__rs__":"nope","v":1}',
    b'\xf5\x01{"__rs__":"tup"}',
    b'\xf5\x01{"__rs__":"tup","v":"abc"}',
    b'\xf5\x01{"__rs__":"tup","v":[],"x":1}',
    b'\xf5\x01{"__rs__":"set","v":[[1]]}',
    b'\xf5\x01{"__rs__":"map","v":[[1,2]]}',
    b'\xf5\x01{"__rs__":"td","v":[1,2]}',
    b'\xf5\x01{"__rs__":"b","v":"!!"}',
    b'\xf5\x01{"__rs__":"dec","v":"x"}',
    b"\xf5\x01" + b"[" * 100_000,
    b"\xf6\x01\xc1",
    b"\xf6\x01\xd4\x63\x00",  # an extension type no MsgpackSerializer writes
    b"\xf7\x01" + b"\x00" * 31,
    b"\xf7\x01" + b"\x00" * 32 + pickle.dumps(1),
]


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_raises_serialization_error(make: Any, data: bytes) -> None:
    with pytest.raises(SerializationError):
        make().loads(data)


@pytest.mark.parametrize("make", ALL)
def test_other_serializers_bytes_raise_serialization_error(make: Any) -> None:
    s: Serializer = make()
    own = s.dumps({"id": 1, "tags": ["a", "b"]})
    for blob in blobs_of_every_serializer().values():
        if blob == own:
            continue
        with pytest.raises(SerializationError):
            s.loads(blob)


@pytest.mark.parametrize("make", ALL)
def test_every_truncation_raises_serialization_error(make: Any) -> None:
    s: Serializer = make()
    blob = s.dumps({"id": 1, "tags": ["a", "b"], "when": date(2020, 1, 1)})
    for cut in range(len(blob)):
        with pytest.raises(SerializationError):
            s.loads(blob[:cut])


@pytest.mark.parametrize("make", ALL)
def test_another_format_version_raises_serialization_error(make: Any) -> None:
    s: Serializer = make()
    blob = s.dumps([1, 2, 3])
    for version in (0, 2, 255):
        with pytest.raises(SerializationError, match="version"):
            s.loads(blob[:1] + bytes([version]) + blob[2:])


@pytest.mark.parametrize("make", ALL)
def test_loads_takes_bytes_like_and_rejects_str(make: Any) -> None:
    s: Any = make()  # loads is typed for bytes; bytes-like values work too
    blob = s.dumps({"a": 1})
    assert s.loads(bytearray(blob)) == {"a": 1}
    assert s.loads(memoryview(blob)) == {"a": 1}
    with pytest.raises(TypeError, match="decode_responses"):
        s.loads(blob.decode("latin-1"))


@pytest.mark.parametrize("make", ALL)
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=64), header=st.sampled_from([b"", b"\xf5\x01", b"\xf6\x01"]))
def test_arbitrary_bytes_never_raise_anything_but_serialization_error(
    make: Any, data: bytes, header: bytes
) -> None:
    with contextlib.suppress(SerializationError):
        make().loads(header + data)


def test_serialization_error_is_a_resilience_error() -> None:
    assert issubclass(SerializationError, ResilienceError)


def test_default_is_json_and_every_serializer_fits_the_protocol() -> None:
    assert isinstance(DEFAULT, JsonSerializer)
    assert isinstance(JsonSerializer(), Serializer)
    assert isinstance(PickleSerializer(hmac_key=KEY), Serializer)


# --- pickle -----------------------------------------------------------------------------

CALLS: list[str] = []


def record(what: str) -> str:
    CALLS.append(what)
    return what


class Malicious:
    """Unpickling this calls record(): stands in for os.system and friends."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (record, ("pwned",))


@pytest.fixture
def evil_payload() -> bytes:
    payload = pickle.dumps(Malicious(), protocol=5)
    # The payload is live: plain pickle.loads runs it.
    assert pickle.loads(payload) == "pwned"
    assert CALLS == ["pwned"]
    CALLS.clear()
    return payload


def test_pickle_round_trips_any_picklable_value() -> None:
    s = PickleSerializer(hmac_key=KEY)
    value = {"foo": Foo, "c": Colour.RED, "t": (1, [2.5, {3}])}
    assert s.loads(s.dumps(value)) == value


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda p: b"\xf7\x01" + p, id="no-mac"),
        pytest.param(lambda p: b"\xf7\x01" + b"\x00" * 32 + p, id="zero-mac"),
        pytest.param(
            lambda p: b"\xf7\x01" + PickleSerializer(hmac_key=OTHER_KEY).dumps(0)[2:34] + p,
            id="mac-of-other-data",
        ),
        pytest.param(
            lambda p: b"\xf7\x01" + hmac.digest(OTHER_KEY, b"\xf7\x01" + p, "sha256") + p,
            id="signed-with-wrong-key",
        ),
        pytest.param(lambda p: p, id="bare-pickle"),
    ],
)
def test_a_malicious_pickle_without_a_valid_mac_is_never_unpickled(
    evil_payload: bytes, forge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    unpickled: list[bytes] = []

    def spy(data: bytes, /, **kw: Any) -> Any:
        unpickled.append(data)

    monkeypatch.setattr(pickle, "loads", spy)
    with pytest.raises(SerializationError):
        PickleSerializer(hmac_key=KEY).loads(forge(evil_payload))
    assert unpickled == []
    assert CALLS == []


def test_tampered_payload_or_mac_is_rejected() -> None:
    s = PickleSerializer(hmac_key=KEY)
    blob = bytearray(s.dumps({"amount": 100}))
    for i in range(2, len(blob)):  # every byte of the MAC and of the payload
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(SerializationError, match="signature"):
            s.loads(bytes(tampered))
    extended = bytes(blob) + b"."
    with pytest.raises(SerializationError, match="signature"):
        s.loads(extended)


def test_wrong_key_is_rejected_and_previous_keys_allow_rotation() -> None:
    old = PickleSerializer(hmac_key=OTHER_KEY)
    new = PickleSerializer(hmac_key=KEY, previous_keys=[OTHER_KEY])
    with pytest.raises(SerializationError):
        PickleSerializer(hmac_key=KEY).loads(old.dumps("v"))
    assert new.loads(old.dumps("v")) == "v"  # entries signed before the rotation
    assert new.loads(new.dumps("v")) == "v"
    with pytest.raises(SerializationError):
        old.loads(new.dumps("v"))  # new entries are signed with the new key only


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hmac_key": b"short"}, ValueError, r"hmac_key must be at least 16 bytes"),
        ({"hmac_key": "a str key of many chars"}, TypeError, r"hmac_key must be bytes"),
        ({"hmac_key": KEY, "previous_keys": [b"x"]}, ValueError, r"previous_keys\[0\]"),
        ({"hmac_key": KEY, "previous_keys": OTHER_KEY}, TypeError, r"previous_keys"),
        ({"hmac_key": KEY, "previous_keys": [KEY, 5]}, TypeError, r"previous_keys\[1\]"),
    ],
)
def test_bad_keys_raise_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PickleSerializer(**kwargs)


def test_pickle_repr_does_not_show_keys() -> None:
    s = PickleSerializer(hmac_key=KEY, previous_keys=[OTHER_KEY])
    assert "k" * 16 not in repr(s)
    assert "o" * 16 not in repr(s)


def test_unpicklable_value_raises_type_error_naming_the_type() -> None:
    with pytest.raises(TypeError, match="cannot serialize a function with pickle"):
        PickleSerializer(hmac_key=KEY).dumps(lambda: None)


def test_a_signed_blob_that_no_longer_unpickles_raises_serialization_error() -> None:
    s = PickleSerializer(hmac_key=KEY)
    payload = b"\x80\x05cno_such_module\nthing\n."
    blob = b"\xf7\x01" + hmac.digest(KEY, b"\xf7\x01" + payload, "sha256") + payload
    with pytest.raises(SerializationError, match="unpickle"):
        s.loads(blob)


# --- property ---------------------------------------------------------------------------

fixed_offsets = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
)
hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.datetimes(timezones=st.none() | fixed_offsets),
    st.dates(),
    st.times(timezones=st.none() | fixed_offsets),
    st.timedeltas(),
    st.uuids(),
    st.decimals(allow_nan=False),
)
# NaN only where it need not be hashed (a signalling Decimal NaN cannot be).
leaves = hashable_leaves | st.floats() | st.decimals()
dict_keys = st.text() | st.sampled_from(["__rs__", "v"])
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(dict_keys, inner, max_size=4)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(values)
def test_json_round_trips_generated_nested_values(value: Any) -> None:
    s = JsonSerializer()
    assert canon(s.loads(s.dumps(value))) == canon(value)
