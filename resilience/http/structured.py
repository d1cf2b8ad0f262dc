"""Structured Field Dictionaries (RFC 8941 section 4.2.2), the syntax of targeted
cache-control fields such as ``CDN-Cache-Control`` (RFC 9213 section 2.1).

Only what a cache needs: members are parsed to Python values, parameters are checked
and dropped. A field that does not parse is None, never a partial result: RFC 9213 has a
cache ignore an invalid targeted field and fall back to ``Cache-Control``.
"""

from __future__ import annotations

import base64
import binascii
import string
from decimal import Decimal
from typing import Final

__all__ = ["Item", "parse_dictionary"]

#: A member's value: an Integer, Decimal, String, Token (as str), Byte Sequence or
#: Boolean, or an Inner List of those.
Item = int | Decimal | str | bytes | bool | tuple["Item", ...]

_KEY_START: Final = frozenset(string.ascii_lowercase + "*")
_KEY: Final = frozenset(string.ascii_lowercase + string.digits + "_-.*")
_TOKEN_START: Final = frozenset(string.ascii_letters + "*")
_TOKEN: Final = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~:/")
_BASE64: Final = frozenset(string.ascii_letters + string.digits + "+/=")


class _Invalid(Exception):
    pass


class _Parser:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _Invalid
        self.pos += 1

    def spaces(self, ows: bool = False) -> None:
        allowed = " \t" if ows else " "
        while self.peek() and self.peek() in allowed:
            self.pos += 1

    def key(self) -> str:
        if self.peek() not in _KEY_START or not self.peek():
            raise _Invalid
        start = self.pos
        while self.peek() and self.peek() in _KEY:
            self.pos += 1
        return self.text[start : self.pos]

    def bare_item(self) -> Item:
        c = self.peek()
        if c == "-" or c.isdigit():
            return self.number()
        if c == '"':
            return self.string()
        if c == ":":
            return self.byte_sequence()
        if c == "?":
            return self.boolean()
        if c and c in _TOKEN_START:
            start = self.pos
            while self.peek() and self.peek() in _TOKEN:
                self.pos += 1
            return self.text[start : self.pos]
        raise _Invalid

    def number(self) -> int | Decimal:
        sign = 1
        if self.peek() == "-":
            sign, self.pos = -1, self.pos + 1
        start, dot = self.pos, -1
        while (c := self.peek()) and ((c.isascii() and c.isdigit()) or c == "."):
            if c == ".":
                if dot >= 0 or self.pos - start > 12:
                    raise _Invalid
                dot = self.pos
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits or digits.endswith(".") or digits.startswith("."):
            raise _Invalid
        if dot < 0:
            if len(digits) > 15:
                raise _Invalid
            return sign * int(digits)
        if len(digits) - (dot - start) - 1 > 3 or len(digits) > 16:
            raise _Invalid
        return sign * Decimal(digits)

    def string(self) -> str:
        self.expect('"')
        out = []
        while True:
            c = self.peek()
            if not c:
                raise _Invalid
            self.pos += 1
            if c == "\\":
                nxt = self.peek()
                if nxt not in ('"', "\\") or not nxt:
                    raise _Invalid
                out.append(nxt)
                self.pos += 1
            elif c == '"':
                return "".join(out)
            elif not (" " <= c <= "~"):
                raise _Invalid
            else:
                out.append(c)

    def byte_sequence(self) -> bytes:
        self.expect(":")
        end = self.text.find(":", self.pos)
        if end < 0:
            raise _Invalid
        data = self.text[self.pos : end]
        if not set(data) <= _BASE64:
            raise _Invalid
        self.pos = end + 1
        try:
            return base64.b64decode(data + "=" * (-len(data) % 4))
        except (binascii.Error, ValueError):
            raise _Invalid from None

    def boolean(self) -> bool:
        self.expect("?")
        c = self.peek()
        if c not in ("0", "1") or not c:
            raise _Invalid
        self.pos += 1
        return c == "1"

    def parameters(self) -> None:
        while self.peek() == ";":
            self.pos += 1
            self.spaces()
            self.key()
            if self.peek() == "=":
                self.pos += 1
                self.bare_item()

    def item_or_inner_list(self) -> Item:
        if self.peek() != "(":
            item = self.bare_item()
            self.parameters()
            return item
        self.pos += 1
        items: list[Item] = []
        while True:
            self.spaces()
            if self.peek() == ")":
                self.pos += 1
                self.parameters()
                return tuple(items)
            items.append(self.bare_item())
            self.parameters()
            if self.peek() not in (" ", ")") or not self.peek():
                raise _Invalid


def parse_dictionary(value: str | None) -> dict[str, Item] | None:
    """The members of a Dictionary field, or None when it does not parse.

    A member without a value is ``True``; a key given twice keeps its last value
    (RFC 8941 section 4.2.2). Several field lines are joined with ``", "`` first.
    """
    if value is None:
        return None
    parser = _Parser(value.strip(" "))
    members: dict[str, Item] = {}
    try:
        while parser.peek():
            key = parser.key()
            if parser.peek() == "=":
                parser.pos += 1
                members[key] = parser.item_or_inner_list()
            else:
                members[key] = True
                parser.parameters()
            parser.spaces(ows=True)
            if not parser.peek():
                break
            parser.expect(",")
            parser.spaces(ows=True)
            if not parser.peek():
                raise _Invalid  # a trailing comma
    except _Invalid:
        return None
    return members
