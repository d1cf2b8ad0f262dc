"""Cache keys: normalised by signature, typed, canonical across processes, never by identity."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import subprocess
import sys
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, Flag, IntEnum
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resilience
from resilience.cache.keys import MAX_ARGS_LENGTH, KeyBuilder


def f(x: Any, y: Any = 2) -> None:
    pass


def one(x: Any) -> None:
    pass


def nothing() -> None:
    pass


def keys(kb: KeyBuilder, *args: Any, **kwargs: Any) -> tuple[object, str]:
    local = kb.local(args, kwargs)
    hash(local)
    return local, kb.remote(local)


def test_positional_keyword_and_defaulted_calls_share_one_key() -> None:
    kb = KeyBuilder(f)
    same = [
        keys(kb, 1),
        keys(kb, x=1),
        keys(kb, 1, 2),
        keys(kb, 1, y=2),
        keys(kb, x=1, y=2),
        keys(kb, y=2, x=1),
    ]
    assert all(k == same[0] for k in same)
    assert keys(kb, 1, 3) != same[0]
    assert keys(kb, 1, 3) == keys(kb, y=3, x=1)


def test_slow_and_fast_paths_agree() -> None:
    kb = KeyBuilder(f)
    for x, y in [(1.5, "a"), (-0.0, None), (Decimal("1.0"), (1, 2)), (Colour.RED, [1])]:
        assert keys(kb, x, y) == keys(kb, x=x, y=y) == keys(kb, y=y, x=x)
    kb2 = KeyBuilder(lambda x, y=1.5: None, namespace="n")  # a default that is not plain
    assert keys(kb2, 1) == keys(kb2, 1, 1.5) == keys(kb2, x=1)
    assert keys(kb2, 1) != keys(kb2, 1, 1)


def test_keyword_order_does_not_matter_for_var_keyword() -> None:
    def g(**kw: Any) -> None:
        pass

    kb = KeyBuilder(g)
    assert keys(kb, a=1, b=2, c=(3,)) == keys(kb, c=(3,), b=2, a=1)
    assert keys(kb, a=1, b=2) != keys(kb, a=2, b=1)
    assert keys(kb, a=1) != keys(kb, b=1)


def test_var_positional_and_var_keyword_and_keyword_only() -> None:
    def h(a: Any, *rest: Any, k: Any = 3, **kw: Any) -> None:
        pass

    kb = KeyBuilder(h)
    assert keys(kb, 1) == keys(kb, a=1) == keys(kb, 1, k=3)
    assert keys(kb, 1, k=4) != keys(kb, 1)
    assert keys(kb, 1, 2, 3) != keys(kb, 1, (2, 3))  # *rest=(2, 3) vs *rest=((2, 3),)
    assert keys(kb, 1, 2, 3) != keys(kb, 1, 2, 3, 4)
    assert keys(kb, 1, 2) != keys(kb, 1, z=2)  # *rest vs **kw
    assert keys(kb, 1, z=2, w=3) == keys(kb, 1, w=3, z=2)
    assert keys(kb, 1, z=2) != keys(kb, 1, z=2.0)


def test_positional_only_parameters() -> None:
    def p(a: Any, /, b: Any = 0) -> None:
        pass

    kb = KeyBuilder(p)
    assert keys(kb, 1) == keys(kb, 1, b=0) == keys(kb, 1, 0)
    with pytest.raises(TypeError):
        kb.local((), {"a": 1})


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, 2, 3), {}), ((1,), {"z": 1}), ((1,), {"x": 1}), ((), {"y": 1})],
)
def test_calls_that_do_not_fit_the_signature_raise_type_error(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        KeyBuilder(f).local(args, kwargs)


class Colour(Enum):
    RED = "red"
    CRIMSON = "red"  # noqa: PIE796 - an alias on purpose: the same member as RED
    BLUE = "blue"


class Level(IntEnum):
    LOW = 1


class Perm(Flag):
    R = 1
    W = 2


DISTINCT: list[Any] = [
    1,
    1.0,
    True,
    "1",
    b"1",
    Decimal(1),
    Level.LOW,
    0,
    0.0,
    -0.0,
    False,
    None,
    "",
    b"",
    (),
    [],
    {},
    set(),
    frozenset(),
    (1,),
    (1.0,),
    (True,),
    [1],
    {1},
    frozenset({1}),
    {1.0},
    {"a": 1},
    {"a": 1.0},
    {"a": True},
    {1: "a"},
    {True: "a"},
    {"1": "a"},
    ((1,),),
    ([1],),
    Decimal("1.0"),
    Decimal("1.00"),
    math.nan,
    math.inf,
    datetime(2020, 1, 1, 12, tzinfo=timezone.utc),
    datetime(2020, 1, 1, 13, tzinfo=timezone(timedelta(hours=1))),  # same instant
    datetime(2020, 1, 1, 12),
    date(2020, 1, 1),
    time(12),
    timedelta(0),
    timedelta(1),
    UUID(int=1),
    Colour.RED,
    Colour.BLUE,
    Perm.R,
    Perm.R | Perm.W,
    "s1:a",
    ("a", "b"),
    ("a,b",),
    ("a", "b,c"),
    ("a,", "b"),
]


@pytest.mark.parametrize("kb", [KeyBuilder(one), KeyBuilder(f)], ids=["one", "f"])
def test_values_equal_in_python_but_of_other_types_get_other_keys(kb: KeyBuilder) -> None:
    locals_ = [kb.local((v,), {}) for v in DISTINCT]
    remotes = [kb.remote(k) for k in locals_]
    assert len(set(locals_)) == len(DISTINCT)
    assert len(set(remotes)) == len(DISTINCT)


def test_equal_values_share_keys() -> None:
    kb = KeyBuilder(one)
    for a, b in [
        (math.nan, float("nan")),  # NaN != NaN, yet one key
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({3, 1, 2}, {2, 3, 1}),
        (Colour.RED, Colour.CRIMSON),
        (Decimal("1.10"), Decimal("1.10")),
        (UUID(int=5), UUID(int=5)),
        (10**400, 10**400),
    ]:
        assert keys(kb, a) == keys(kb, b)


def test_remote_key_shape() -> None:
    kb = KeyBuilder(f)
    assert kb.remote(kb.local((1, "a"), {})) == f"{__name__}.f:1:i1,s1:a"
    assert kb.namespace == f"{__name__}.f"
    kb = KeyBuilder(f, namespace="users:profile", version="v2")
    assert kb.remote(kb.local((None, [1, (b"\x01",)]), {})) == "users%3Aprofile:v2:N,l(i1,t(b01))"


class Service:
    def m(self, x: Any) -> None:
        pass

    @classmethod
    def c(cls, x: Any) -> None:
        pass

    @staticmethod
    def s(self: Any, x: Any = 0) -> None:  # a staticmethod's "self" is a plain argument
        pass


def test_methods_leave_self_out_of_the_key() -> None:
    kb = KeyBuilder(Service.m)
    assert kb.skip_first is True
    a, b = Service(), Service()
    assert keys(kb, a, 1) == keys(kb, b, 1) == keys(kb, b, x=1)
    assert keys(kb, a, 1) != keys(kb, a, 2)
    assert kb.namespace.endswith("Service.m")


def test_classmethods_leave_cls_out_of_the_key() -> None:
    raw = Service.__dict__["c"]
    for kb in (KeyBuilder(raw.__func__), KeyBuilder(raw)):
        assert kb.skip_first is True

        class Sub(Service):
            pass

        assert keys(kb, Service, 1) == keys(kb, Sub, 1)
    bound = KeyBuilder(Service.c)  # bound to the class: no cls in the signature
    assert bound.skip_first is False
    assert keys(bound, 1)[1].endswith(":i1")


def test_staticmethods_keep_their_first_argument() -> None:
    for kb in (KeyBuilder(Service.__dict__["s"]), KeyBuilder(Service.s, skip_first=False)):
        assert kb.skip_first is False
        assert keys(kb, 1) != keys(kb, 2)


def test_skip_first_can_be_forced() -> None:
    kb = KeyBuilder(f, skip_first=True)
    assert keys(kb, "anything", 3) == keys(kb, "other", 3)
    kb = KeyBuilder(Service.m, skip_first=False)
    with pytest.raises(TypeError, match="Service"):
        kb.local((Service(), 1), {})  # self has no stable key: per-instance needs one


class Foo:
    pass


class Account:
    def __init__(self, account_id: int, name: str) -> None:
        self.account_id, self.name = account_id, name

    def __cache_key__(self) -> object:
        return ("account", self.account_id)


class Order:
    def __init__(self, order_id: int) -> None:
        self.order_id = order_id

    def __cache_key__(self) -> object:
        return ("account", self.order_id)  # same value as an Account's, other class


def test_unsupported_arguments_raise_type_error_naming_type_and_argument() -> None:
    kb = KeyBuilder(f)
    message = (
        r"cannot build a stable cache key from a Foo \(argument 'y'\); pass key=\.\.\. "
        r"to cached\(\) or give Foo a __cache_key__\(\) method"
    )
    with pytest.raises(TypeError, match=message):
        kb.local((1, Foo()), {})
    with pytest.raises(TypeError, match=message):
        kb.local((1,), {"y": [1, {"k": Foo()}]})
    with pytest.raises(TypeError, match=r"from a function \(argument 'x'\)"):
        kb.local((one,), {})

    def v(*items: Any, **named: Any) -> None:
        pass

    with pytest.raises(TypeError, match=r"argument 'items'"):
        KeyBuilder(v).local((1, object()), {})
    with pytest.raises(TypeError, match=r"argument 'named'"):
        KeyBuilder(v).local((), {"q": object()})


def test_cache_key_method_is_used_with_the_class() -> None:
    kb = KeyBuilder(one)
    assert keys(kb, Account(1, "a")) == keys(kb, Account(1, "renamed"))
    assert keys(kb, Account(1, "a")) != keys(kb, Account(2, "a"))
    assert keys(kb, Account(1, "a")) != keys(kb, Order(1))
    assert keys(kb, Account(1, "a")) != keys(kb, ("account", 1))
    assert f"{Account.__module__}:Account" in keys(kb, Account(1, "a"))[1]


def test_cache_key_returning_self_is_refused() -> None:
    class Selfish:
        def __cache_key__(self) -> object:
            return self

    with pytest.raises(TypeError, match="returned the object itself"):
        KeyBuilder(one).local((Selfish(),), {})


def test_long_argument_encodings_are_hashed() -> None:
    kb = KeyBuilder(one, namespace="ns")
    short = kb.remote(kb.local(("x" * 10,), {}))
    assert short == "ns:1:s10:xxxxxxxxxx"
    long_a = kb.remote(kb.local(("a" * 500,), {}))
    long_b = kb.remote(kb.local(("a" * 499 + "b",), {}))
    assert re.fullmatch(r"ns:1:#[0-9a-f]{64}", long_a)
    assert long_a != long_b
    edge = kb.remote(kb.local(("y" * (MAX_ARGS_LENGTH - 5),), {}))
    assert edge.endswith("y" * (MAX_ARGS_LENGTH - 5))
    assert "#" in kb.remote(kb.local(("y" * (MAX_ARGS_LENGTH - 4),), {}))


def test_lone_surrogates_are_hashed_into_a_sendable_key() -> None:
    kb = KeyBuilder(one, namespace="ns")
    key = kb.remote(kb.local(("\ud800",), {}))
    key.encode("utf-8")
    assert key.startswith("ns:1:#")


def test_namespace_and_version_cannot_collide_with_arguments() -> None:
    def z(x: Any = None) -> None:
        pass

    seen: dict[str, tuple[str, str, tuple[Any, ...]]] = {}
    for namespace in ["a", "a:1", "a:1:N", "a%3A1", "a%", "a:"]:
        for version in ["1", "1:N", "N", "1:", "%", "1%3AN"]:
            kb = KeyBuilder(z, namespace=namespace, version=version)
            for args in [(), ("1:N",), (":",), ("%3A",)]:
                remote = kb.remote(kb.local(args, {}))
                assert remote not in seen, (remote, seen.get(remote))
                seen[remote] = (namespace, version, args)


def test_functions_sharing_a_local_tier_never_share_local_keys() -> None:
    def g(x: Any, y: Any = 2) -> None:
        pass

    assert KeyBuilder(f).local((1,), {}) != KeyBuilder(g).local((1,), {})
    assert KeyBuilder(f, version="2").local((1,), {}) != KeyBuilder(f).local((1,), {})


def test_mutable_defaults_are_read_at_call_time() -> None:
    box: list[int] = []

    def m(x: Any, y: list[int] = box) -> None:
        pass

    kb = KeyBuilder(m)
    before = keys(kb, 1)
    box.append(1)
    assert keys(kb, 1) != before


def test_remote_rejects_what_local_did_not_make() -> None:
    with pytest.raises(TypeError, match="local_key"):
        KeyBuilder(f).remote("abc")


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "message"),
    [
        (42, {}, TypeError, r"fn must be callable"),
        (f, {"version": ""}, ValueError, r"version must not be empty"),
        (f, {"version": 2}, TypeError, r"version must be a str"),
        (f, {"namespace": ""}, ValueError, r"namespace must not be empty"),
        (f, {"namespace": b"x"}, TypeError, r"namespace must be a str"),
        (f, {"skip_first": 1}, TypeError, r"skip_first must be a bool"),
        (lambda x: x, {}, ValueError, r"namespace: lambdas"),
        (nothing, {"skip_first": True}, ValueError, r"skip_first=True"),
    ],
)
def test_bad_constructor_input_names_the_parameter(
    fn: Any, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        KeyBuilder(fn, **kwargs)


def test_a_lambda_with_a_namespace_is_fine() -> None:
    kb = KeyBuilder(lambda x: x, namespace="square")
    assert kb.remote(kb.local((3,), {})) == "square:1:i3"


# Every supported type, in containers, with str sets/dicts whose iteration order depends
# on the hash seed: the remote keys must still be byte-for-byte the same.
SCRIPT = """
import enum, uuid, datetime as dt, decimal
from resilience.cache.keys import KeyBuilder

class Colour(enum.Enum):
    RED = 1

class Thing:
    def __cache_key__(self):
        return {"b", "a", "c"}

def g(*args, **kwargs):
    pass

kb = KeyBuilder(g, namespace="det")
calls = [
    ((1, 1.5, -0.0, float("nan"), True, None, "s", b"b"), {}),
    (({"x", "y", "z", "w"}, frozenset({"p", "q"}), {"k1": 1, "k2": [2], "k3": {"n": ()}}), {}),
    ((decimal.Decimal("1.10"), uuid.UUID(int=7), dt.datetime(2020, 1, 2, 3, 4, 5, 6)), {}),
    ((dt.date(2020, 1, 2), dt.time(1, 2), dt.timedelta(-1, 3)), {"e": Colour.RED}),
    ((Thing(), {("a", 1): {"b"}, ("c", 2): {"d"}}), {"zz": "last", "aa": "first"}),
    (("x" * 300,), {}),
]
for args, kwargs in calls:
    print(kb.remote(kb.local(args, kwargs)))
"""


def test_remote_keys_are_the_same_in_every_process() -> None:
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(SCRIPT, {"__name__": "__main__"})  # this process, with its own hash seed
    outputs = [here.getvalue()]
    root = str(Path(resilience.__file__).resolve().parent.parent)
    # This process's seed is random unless PYTHONHASHSEED is set: pick another one.
    for seed in ["2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"]:
        env = {"PYTHONHASHSEED": seed, "PYTHONPATH": root, "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
        )
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]
    lines = outputs[0].splitlines()
    assert len(lines) == 6
    assert lines[0] == "det:1:t(i1,f1.5,f-0.0,fnan,T,N,s1:s,b62),m()"
    assert lines[1].startswith("det:1:t(e(s1:w,s1:x,s1:y,s1:z),z(s1:p,s1:q),m(")


# --- property: local equal <=> remote equal <=> typed values equal ------------------------


def typed(v: Any) -> Any:
    """An independent statement of "the same argument": same types all the way down."""
    t = type(v)
    if t is float:
        return ("float", repr(v))
    if t in (tuple, list):
        return (t.__name__, tuple(typed(x) for x in v))
    if t is dict:
        return ("dict", frozenset((typed(k), typed(x)) for k, x in v.items()))
    if t in (set, frozenset):
        return (t.__name__, frozenset(typed(x) for x in v))
    if t is Decimal:
        return ("Decimal", str(v))
    if t in (datetime, time):
        return (t.__name__, v.isoformat())
    if isinstance(v, Enum):
        return (t.__qualname__, v.name)
    return (t.__name__, v)


small_leaves = st.one_of(
    st.sampled_from([0, 1, -1, 2, True, False, None, "", "1", "a", b"", b"1"]),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, math.nan, math.inf]),
    st.sampled_from([Decimal("1"), Decimal("1.0"), Decimal("NaN"), Decimal("-0")]),
    st.sampled_from([Colour.RED, Colour.BLUE, Level.LOW, Perm.R, Perm.R | Perm.W]),
    st.sampled_from(
        [
            datetime(2020, 1, 1, 12, tzinfo=timezone.utc),
            datetime(2020, 1, 1, 13, tzinfo=timezone(timedelta(hours=1))),
            datetime(2020, 1, 1, 12),
            date(2020, 1, 1),
            time(12),
            time(12, tzinfo=timezone.utc),
            timedelta(0),
            timedelta(seconds=1),
            UUID(int=1),
        ]
    ),
    st.integers(),
    st.text(max_size=3),
)
hashable_args = st.recursive(
    small_leaves,
    lambda inner: st.tuples(inner) | st.tuples(inner, inner) | st.frozensets(inner, max_size=2),
    max_leaves=4,
)
arguments = st.recursive(
    small_leaves,
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.lists(inner, max_size=2).map(tuple)
        | st.dictionaries(hashable_args, inner, max_size=2)
        | st.sets(hashable_args, max_size=2)
        | st.frozensets(hashable_args, max_size=2)
    ),
    max_leaves=6,
)
PROPERTY_KB = KeyBuilder(f)


@settings(max_examples=250, deadline=None)
@given(a=arguments, b=arguments, by_keyword=st.booleans())
def test_local_keys_agree_with_remote_keys_and_typed_equality(
    a: Any, b: Any, by_keyword: bool
) -> None:
    kb = PROPERTY_KB
    local_a = kb.local((a,), {})
    local_b = kb.local((), {"x": b}) if by_keyword else kb.local((b,), {})
    same = typed(a) == typed(b)
    assert (local_a == local_b) is same
    assert (kb.remote(local_a) == kb.remote(local_b)) is same
    assert local_a == kb.local((), {"x": a, "y": 2})


def test_messages_use_the_right_article() -> None:
    # "from a object" read badly; the article follows the type's name.
    with pytest.raises(TypeError, match=r"from an object \(argument 'y'\)"):
        KeyBuilder(f).local((1, object()), {})


def two(x: Any, y: Any) -> None:
    pass


def many(a: Any, b: Any, c: Any) -> None:
    pass


def star(*args: Any, **kwargs: Any) -> None:
    pass


FAST_CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1,), {}),
    ((True,), {}),
    (("1",), {}),
    ((None,), {}),
    ((1.0,), {}),
    ((-0.0,), {}),
    (([1],), {}),
    ((1, 2), {}),
    ((1, "a"), {}),
    ((1, 2.5), {}),
    ((1,), {"y": 3}),
    ((), {"x": 1}),
    ((1, 2, 3), {}),
    ((UUID(int=5), date(2026, 1, 2)), {}),
]


@pytest.mark.parametrize("fn", [one, f, two, many, star, Service.m, Service.__dict__["c"]])
def test_the_specialised_local_key_is_local(fn: Any) -> None:
    # fast_local is what decorators call on every hit: it must make exactly local()'s keys.
    kb = KeyBuilder(fn)
    for args, kwargs in FAST_CALLS:
        for call in (args, (Service(), *args)):
            try:
                expected = kb.local(call, kwargs)
            except TypeError as error:
                with pytest.raises(TypeError, match=re.escape(str(error))):
                    kb.fast_local(call, kwargs)
                continue
            got = kb.fast_local(call, kwargs)
            assert got == expected
            assert kb.remote(got) == kb.remote(expected)
