"""Cache keys built from a call's arguments, normalised by the function's signature.

A :class:`KeyBuilder` makes two keys for a call:

- :meth:`KeyBuilder.local`: a tuple for the in-process tier, built on every cached call,
  so it is cheap: a positional call with int/str/bytes/None arguments is checked by type
  and used as is, without ``inspect.Signature.bind`` (which costs microseconds).
- :meth:`KeyBuilder.remote`: a string for Redis, derived from the local key only on a
  local miss. It is canonical: the same call gives the same string in every process and
  every Python run (no ``hash()``, ``id()`` or ``repr()`` of arbitrary objects).

Both keep types apart: ``f(1)``, ``f(1.0)``, ``f(True)`` and ``f("1")`` are four keys,
although Python finds ``1 == 1.0 == True``. And the two keys agree: two calls share a
local key exactly when they share a remote key.

Supported argument types: None, bool, int, float, str, bytes, Decimal, UUID, datetime,
date, time, timedelta, Enum members, tuples, lists, dicts, sets and frozensets of these,
and any object with a ``__cache_key__()`` method (its result is used, together with the
object's class). Anything else raises :class:`TypeError` when the key is built: an
object's identity or address is never a key, as it would differ between processes and
could be reused after the object is gone.

Methods: a first parameter named ``self`` or ``cls`` is left out of the key, so all
instances of a class share entries for equal arguments. For per-instance entries, give
the class a ``__cache_key__()`` method and pass ``skip_first=False``, or pass ``key=``
to ``cached()``.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Hashable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Final, TypeAlias
from uuid import UUID

from resilience._checks import a

__all__ = ["MAX_ARGS_LENGTH", "KeyBuilder", "LocalKey"]

#: The local key: ``(prefix, type_1, ..., type_n, values)``: the remote key's prefix (so
#: functions sharing one local tier never share entries), the types of the n normalised
#: arguments, then the tuple of their values (flat, not a tuple of types: one tuple less
#: to build and hash on every hit). Values of types whose equality is not exact enough
#: (float zeros and NaN, Decimal, aware times) are replaced by a canonical string;
#: containers by their own (types, values) pairs.
LocalKey: TypeAlias = "tuple[Any, ...]"
#: A container's local form: (types, values) of its elements.
_Seq: TypeAlias = "tuple[tuple[type, ...], tuple[object, ...]]"

#: Remote argument encodings longer than this are replaced by their SHA-256 digest.
MAX_ARGS_LENGTH: Final = 200

_MISSING: Final[Any] = object()

# Types whose local form is (type, value): their == is exact within the type, and they
# are immutable. Exact types: a subclass may redefine ==, and has no stable name here.
_IDENTITY_TYPES: Final = frozenset({type(None), bool, int, str, bytes, UUID, date, timedelta})

_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _unsupported(t: type, where: str) -> TypeError:
    name = t.__qualname__
    return TypeError(
        f"cannot build a stable cache key from {a(name)} (argument {where!r}); "
        f"pass key=... to cached() or give {name} a __cache_key__() method"
    )


def _norm(x: Any, where: str) -> tuple[type, object]:
    """One value's local form: (type, canonical value)."""
    t = type(x)
    if t in _IDENTITY_TYPES:
        return t, x
    if t is float:
        # 0.0 == -0.0 and NaN != NaN, but the remote key tells them apart / merges them
        # by repr(); the local key must agree, so those few take their repr() here.
        return t, (x if x == x and x != 0.0 else repr(x))
    if t is tuple or t is list:
        return t, _norm_seq(x, where)
    if t is dict:
        return t, frozenset((*_norm(k, where), *_norm(v, where)) for k, v in x.items())
    if t is set or t is frozenset:
        return t, frozenset(_norm(e, where) for e in x)
    if t is Decimal:
        return t, str(x)  # Decimal("1.0") == Decimal("1.00"), yet they print differently
    if t is datetime or t is time:
        return t, x.isoformat()  # aware values in different zones compare equal
    hook = getattr(t, "__cache_key__", None)
    if hook is not None:
        value = hook(x)
        if value is x:
            raise TypeError(f"{t.__qualname__}.__cache_key__() returned the object itself")
        return t, _norm(value, where)
    if isinstance(x, Enum):
        return t, x
    raise _unsupported(t, where)


def _norm_seq(values: tuple[Any, ...] | list[Any], where: str) -> _Seq:
    types = tuple(map(type, values))
    if _IDENTITY_TYPES.issuperset(types):
        return types, tuple(values)
    pairs = [_norm(v, where) for v in values]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _immutable(x: object) -> bool:
    """Whether ``x``'s local form can never change (so a default's can be computed once)."""
    t = type(x)
    if t in _IDENTITY_TYPES or t in (float, Decimal, datetime, time) or isinstance(x, Enum):
        return True
    if t is tuple or t is frozenset:
        return all(map(_immutable, x))  # type: ignore[call-overload]
    return False


# --- remote encoding -------------------------------------------------------------------
# Every element is self-delimiting: a one-character tag, then either a payload whose
# characters never include ',', '=', '(' or ')' (numbers, hex, ISO dates), or a
# length-prefixed str, or a parenthesised list. So the encoding is injective: distinct
# local keys never share a remote key.


def _enc_str(s: str) -> str:
    return f"s{len(s)}:{s}"


def _enc_int(n: int) -> str:
    # Hex beyond ~300 digits: int -> decimal str has a length limit (and is quadratic).
    return f"i{n}" if n.bit_length() <= 1000 else f"x{n:x}"


def _enc_float(v: object) -> str:
    return f"f{v!r}" if type(v) is float else f"f{v}"


def _enc_timedelta(v: timedelta) -> str:
    return f"R{(v.days * 86400 + v.seconds) * 1_000_000 + v.microseconds}"


def _class_path(t: type) -> str:
    return _enc_str(f"{t.__module__}:{t.__qualname__}")


def _enc_seq(value: _Seq) -> str:
    types, values = value
    return ",".join(map(_enc, types, values))


def _enc_dict(items: frozenset[tuple[type, object, type, object]]) -> str:
    # Sorted by encoding: a frozenset's iteration order depends on hash seeds.
    return ",".join(sorted(f"{_enc(kt, k)}={_enc(vt, v)}" for kt, k, vt, v in items))


def _enc_set(items: frozenset[tuple[type, object]]) -> str:
    return ",".join(sorted(_enc(t, v) for t, v in items))


_ENCODERS: Final[dict[type, Callable[[Any], str]]] = {
    type(None): lambda v: "N",
    bool: lambda v: "T" if v else "F",
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: lambda v: f"b{v.hex()}",
    Decimal: lambda v: f"d{v}",
    UUID: lambda v: f"u{v.hex}",
    datetime: lambda v: f"D{v}",
    date: lambda v: f"Y{v.isoformat()}",
    time: lambda v: f"H{v}",
    timedelta: _enc_timedelta,
    tuple: lambda v: f"t({_enc_seq(v)})",
    list: lambda v: f"l({_enc_seq(v)})",
    dict: lambda v: f"m({_enc_dict(v)})",
    set: lambda v: f"e({_enc_set(v)})",
    frozenset: lambda v: f"z({_enc_set(v)})",
}


def _enc(t: type, v: Any) -> str:
    encode = _ENCODERS.get(t)
    if encode is not None:
        return encode(v)
    if getattr(t, "__cache_key__", None) is not None:  # same order as _norm()
        return f"K{_class_path(t)}{_enc(*v)}"
    # An Enum member, by name; a Flag combination may have none: then by value.
    name = v.name
    return f"E{_class_path(t)}" + (
        _enc_str(name) if name is not None else _enc(*_norm(v.value, ""))
    )


def _escape(part: str) -> str:
    # The remote key is "<namespace>:<version>:<arguments>": with ':' escaped in the
    # first two, the first two ':' always end them, whatever the arguments contain.
    return part.replace("%", "%25").replace(":", "%3A")


# --- the builder -----------------------------------------------------------------------


class KeyBuilder:
    """Builds the local and remote cache keys of calls to ``fn``.

    ``version`` and ``namespace`` are part of every remote key: bump ``version`` when the
    function's results change meaning, so old entries are no longer read. ``namespace``
    defaults to ``"<module>.<qualname>"`` of ``fn``. Functions defined inside another
    function share that name between closures: give each a namespace if their results
    differ. ``skip_first`` leaves the first parameter out of the key: None (the default)
    does so when it is named ``self`` or ``cls``. So a method's entries are shared by all
    instances; for per-instance entries give the class a ``__cache_key__()`` method and
    pass ``skip_first=False``, or pass ``key=`` to ``cached()``.

    Arguments are normalised by the signature: ``f(1)``, ``f(x=1)`` and ``f(1, y=2)``
    (when 2 is ``y``'s default) give the same keys, in whatever order keywords come.
    """

    __slots__ = (
        "_bind",
        "_defaults",
        "_index",
        "_names",
        "_positional",
        "_prefix",
        "_qualname",
        "_skip",
        "_tails",
        "fast_local",
        "fn",
        "namespace",
        "skip_first",
        "version",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        version: str = "1",
        namespace: str | None = None,
        skip_first: bool | None = None,
    ) -> None:
        if isinstance(fn, (classmethod, staticmethod)):
            if skip_first is None and isinstance(fn, staticmethod):
                skip_first = False  # a staticmethod has no self, whatever its names
            fn = fn.__func__
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(version, str):
            raise TypeError(f"version must be a str, got {type(version).__name__}")
        if not version:
            raise ValueError("version must not be empty")
        if namespace is None:
            namespace = _default_namespace(fn)
        elif not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str or None, got {type(namespace).__name__}")
        elif not namespace:
            raise ValueError("namespace must not be empty")
        if skip_first is not None and not isinstance(skip_first, bool):
            raise TypeError(f"skip_first must be a bool or None, got {type(skip_first).__name__}")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"fn: cannot read the signature of {fn!r}: {exc}") from exc

        params = list(sig.parameters.values())
        first_positional = bool(params) and params[0].kind in _POSITIONAL
        if skip_first is None:
            skip_first = first_positional and params[0].name in ("self", "cls")
        elif skip_first and not first_positional:
            raise ValueError(f"skip_first=True, but {fn!r} has no positional first parameter")

        self.fn = fn
        self.version = version
        self.namespace = namespace
        self.skip_first = skip_first
        self._prefix = f"{_escape(namespace)}:{_escape(version)}:"
        self._qualname = getattr(fn, "__qualname__", repr(fn))
        self._skip = int(skip_first)
        self._bind = sig.bind
        kept = params[self._skip :]
        self._names = tuple(p.name for p in kept)
        # Each kept parameter's value when the call leaves it out.
        self._defaults = tuple(
            ()
            if p.kind is p.VAR_POSITIONAL
            else {}
            if p.kind is p.VAR_KEYWORD
            else (_MISSING if p.default is p.empty else p.default)
            for p in kept
        )
        # Tables for signatures of positional parameters alone (the usual case). _tails:
        # len(args) -> the local form of the defaults that complete such a call, when
        # they are immutable (so computing them once is exact); _index: keyword -> slot.
        self._positional = all(p.kind in _POSITIONAL for p in params)
        self._tails: dict[int, _Seq] = {}
        self._index: dict[str, int] = {}
        if self._positional:
            for given in range(self._skip, len(params) + 1):
                rest = self._defaults[given - self._skip :]
                if all(map(_immutable, rest)):  # _MISSING (no default) is not
                    self._tails[given] = _norm_seq(rest, "")
            self._index = {
                p.name: i for i, p in enumerate(kept) if p.kind is p.POSITIONAL_OR_KEYWORD
            }
        #: :meth:`local`, specialised to this signature for the decorators' hot path.
        self.fast_local = self._specialised()

    def local(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LocalKey:
        """The in-process key of a call ``fn(*args, **kwargs)``: a hashable tuple.

        Raises :class:`TypeError` when an argument has no stable key, or when the call
        does not fit the signature (as calling ``fn`` would).
        """
        tail = self._tails.get(len(args))
        if tail is not None and not kwargs:
            # The hot path: a positional call of a positional signature whose arguments
            # are all of types that are their own local form. Unrolled for one and two
            # arguments: tuple(map(type, args)) costs more than the whole branch.
            given = args[1:] if self._skip else args
            n = len(given)
            if n == 1:
                t0 = type(given[0])
                if t0 not in _IDENTITY_TYPES:
                    return self._norm_values(given + self._defaults[1:])
                if not tail[0]:
                    return self._prefix, t0, given
                types: tuple[type, ...] = (t0,)
            elif n == 2:
                t0, t1 = type(given[0]), type(given[1])
                if t0 not in _IDENTITY_TYPES or t1 not in _IDENTITY_TYPES:
                    return self._norm_values(given + self._defaults[2:])
                if not tail[0]:
                    return self._prefix, t0, t1, given
                types = (t0, t1)
            else:
                types = tuple(map(type, given))
                if not _IDENTITY_TYPES.issuperset(types):
                    return self._norm_values(given + self._defaults[n:])
            return (self._prefix, *types, *tail[0], given + tail[1])
        return self._norm_call(args, kwargs)

    def _specialised(self) -> Callable[[tuple[Any, ...], dict[str, Any]], LocalKey]:
        """A function that returns what :meth:`local` returns, in fewer steps for the usual
        call: every parameter given by position, one or two of them (``self`` or ``cls``
        aside), each of a type that is its own local form, and no keywords. Every other
        call goes to :meth:`local`. (A closure: its constants are cells, not attributes.)
        """
        general = self.local
        width = len(self._names)
        if not self._positional or width not in (1, 2):
            return general
        prefix, skip, plain, size = self._prefix, self._skip, _IDENTITY_TYPES, width + self._skip

        if width == 1:

            def local_one(args: tuple[Any, ...], kwargs: dict[str, Any]) -> LocalKey:
                if len(args) == size and not kwargs:
                    given = args[1:] if skip else args
                    t0 = type(given[0])
                    if t0 in plain:
                        return prefix, t0, given
                return general(args, kwargs)

            return local_one

        def local_two(args: tuple[Any, ...], kwargs: dict[str, Any]) -> LocalKey:
            if len(args) == size and not kwargs:
                given = args[1:] if skip else args
                t0, t1 = type(given[0]), type(given[1])
                if t0 in plain and t1 in plain:
                    return prefix, t0, t1, given
            return general(args, kwargs)

        return local_two

    def remote(self, local_key: Hashable) -> str:
        """The Redis key for a key made by :meth:`local`: ``<namespace>:<version>:<args>``.

        Deterministic across processes and runs. Argument encodings longer than
        :data:`MAX_ARGS_LENGTH` characters are replaced by ``#`` + their SHA-256 digest.
        """
        if type(local_key) is not tuple or not local_key:
            raise _not_local(local_key)
        values = local_key[-1]
        if type(values) is not tuple or len(local_key) != len(values) + 2:
            raise _not_local(local_key)
        if len(values) == 1:  # one argument: no map, no join (this runs on every local miss)
            kind = local_key[1]
            encode = _ENCODERS.get(kind)
            encoded = encode(values[0]) if encode is not None else _enc(kind, values[0])
        else:
            encoded = ",".join(map(_enc, local_key[1:-1], values))
        if len(encoded) > MAX_ARGS_LENGTH:
            encoded = _digest(encoded)
        elif not encoded.isascii():
            try:
                encoded.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no client could send this key
                encoded = _digest(encoded)
        return f"{local_key[0]}{encoded}"

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The Redis key of a call: ``remote(local(args, kwargs))``."""
        return self.remote(self.local(args, kwargs))

    def _norm_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LocalKey:
        """The local key the long way: bind, apply defaults, normalise every value."""
        values = self._bind_call(args, kwargs)
        types = tuple(map(type, values))
        if _IDENTITY_TYPES.issuperset(types):
            return (self._prefix, *types, values)
        return self._norm_values(values)

    def _norm_values(self, values: tuple[Any, ...]) -> LocalKey:
        names = self._names
        norm_types: list[type] = []
        norm_values: list[object] = []
        for i, value in enumerate(values):
            t, v = _norm(value, names[i])
            norm_types.append(t)
            norm_values.append(v)
        return (self._prefix, *norm_types, tuple(norm_values))

    def _bind_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The call's value for every kept parameter, defaults applied."""
        if self._positional:
            # Bound by hand: Signature.bind costs microseconds.
            values = self._bind_positional(args, kwargs)
            if values is not None:
                return values
        # Anything else, and any call that does not fit (so the error is Python's own).
        arguments = self._bind(*args, **kwargs).arguments
        return tuple(
            default if (value := arguments.get(name, _MISSING)) is _MISSING else value
            for name, default in zip(self._names, self._defaults, strict=True)
        )

    def _bind_positional(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        skip, defaults = self._skip, self._defaults
        if len(args) < skip or len(args) - skip > len(defaults):
            return None
        values = list(args[skip:])
        values += defaults[len(values) :]
        index = self._index
        for name, value in kwargs.items():
            i = index.get(name)
            if i is None or i < len(args) - skip:
                return None  # unknown, positional-only or given twice
            values[i] = value
        for value in values:  # by identity: `in` would call the arguments' __eq__
            if value is _MISSING:
                return None  # a required argument is missing
        return tuple(values)

    def __repr__(self) -> str:
        return (
            f"KeyBuilder({self._qualname}, version={self.version!r},"
            f" namespace={self.namespace!r}, skip_first={self.skip_first})"
        )


def _not_local(local_key: object) -> TypeError:
    return TypeError(f"local_key must be a key made by local(), got {local_key!r:.60}")


def _digest(encoded: str) -> str:
    # '#' never starts an unhashed encoding, so a digest cannot equal one.
    return "#" + hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


def _default_namespace(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(
            f"namespace: cannot name {fn!r} (no __module__/__qualname__); pass namespace=..."
        )
    if "<lambda>" in qualname:
        # Every lambda in a scope has this name: their entries would be shared.
        raise ValueError(f"namespace: lambdas have no unique name ({qualname}); pass namespace=...")
    return f"{module}.{qualname}"
