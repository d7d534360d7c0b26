"""One JSON value read as Go's ``json.Decoder.Decode`` reads it (Consul's ``lib.DecodeJSON``).

Byte for byte like Go's scanner (``encoding/json/scanner.go``, ``stream.go``):

* the same syntax errors: ``invalid character '}' looking for beginning of object key string``,
  ``... after object key``, ``... in string literal``, ``... in literal true (expecting 'r')``;
  the character is quoted as Go's ``quoteChar`` quotes a byte;
* nesting deeper than 10000 arrays and objects is ``invalid character '[' exceeded max depth``;
* an empty body is ``EOF``, a truncated one ``unexpected EOF``; whatever follows the first
  complete value is left unread;
* strings decode as Go's ``unquote`` does: each byte of invalid UTF-8 and each unpaired
  surrogate escape becomes U+FFFD.

Numbers are ``int`` for integer literals of up to 20 digits and ``Number`` (a float that keeps
its literal, which Go's type errors quote) otherwise. The reader is iterative: no depth
reaches Python's recursion limit.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

MAX_DEPTH = 10000  # maxNestingDepth
# uint64's largest value has 20 digits; longer literals fit no integer field.
_MAX_INT_DIGITS = 20

_SPACE = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"([^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*)"')
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]*')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LITERALS: dict[int, tuple[bytes, Any]] = {
    ord("t"): (b"true", True),
    ord("f"): (b"false", False),
    ord("n"): (b"null", None),
}
# Go's unquote, on text where invalid UTF-8 bytes are already U+FFFD.
_ESCAPE = re.compile(
    r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|(.))"
)
_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of an invalid byte
_GO_NAMED = {0x07: "\\a", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v"}


class JSONError(ValueError):
    """A body Go's decoder refuses before it fills any field; ``str()`` is Go's error text."""


class Number(float):
    """A JSON number that is not a short integer, with its text as written."""

    literal: str

    def __new__(cls, literal: str) -> Number:
        number = super().__new__(cls, literal)
        number.literal = literal
        return number


def quote_char(c: int) -> str:
    """Go's ``quoteChar``: a byte as the scanner names it in an error."""
    if c == 0x27:
        return "'\\''"
    if c == 0x22:
        return "'\"'"
    if c in _GO_NAMED:
        shown = _GO_NAMED[c]
    elif c < 0x20 or c == 0x7F:
        shown = f"\\x{c:02x}"
    elif 0x80 <= c <= 0xA0 or c == 0xAD:  # not printable in Go's unicode tables
        shown = f"\\u{c:04x}"
    elif c == 0x5C:
        shown = "\\\\"
    else:
        shown = chr(c)
    return f"'{shown}'"


def read_value(data: bytes) -> Any:
    """The first JSON value in ``data``; JSONError with Go's text when there is none."""
    return _Reader(data).read()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def fail(self, pos: int, context: str) -> NoReturn:
        if pos >= len(self.data):
            raise JSONError("unexpected EOF")
        raise JSONError(f"invalid character {quote_char(self.data[pos])} {context}")

    def space(self, pos: int) -> int:
        match = _SPACE.match(self.data, pos)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    def read(self) -> Any:
        data, n = self.data, len(self.data)
        pos = self.space(0)
        if pos == n:
            raise JSONError("EOF")
        root: Any = None
        # Open containers, innermost last; an object's pending key is kept beside it.
        stack: list[list[Any] | dict[str, Any]] = []
        keys: list[str] = []
        while True:
            pos = self.space(pos)
            c = data[pos] if pos < n else -1
            value: Any
            opened = False
            if c in (0x7B, 0x5B):  # { [
                if len(stack) >= MAX_DEPTH:
                    self.fail(pos, "exceeded max depth")
                value = {} if c == 0x7B else []
                opened = True
                pos += 1
            elif c == 0x22:
                value, pos = self.string(pos)
            elif c == 0x2D or 0x30 <= c <= 0x39:
                value, pos = self.number(pos)
            elif c in _LITERALS:
                value, pos = self.literal(pos, *_LITERALS[c])
            else:
                self.fail(pos, "looking for beginning of value")
            if not stack:
                root = value
            elif isinstance(stack[-1], list):
                stack[-1].append(value)
            else:
                stack[-1][keys.pop()] = value
            if opened:
                stack.append(value)
                pos = self.space(pos)
                close = 0x7D if c == 0x7B else 0x5D
                if pos < n and data[pos] == close:
                    pos += 1
                    stack.pop()
                elif c == 0x7B:
                    pos = self.key(pos, keys)
                    continue
                else:
                    continue
            # A value ended: close what it ends, up to the next value or the end of the top one.
            while stack:
                pos = self.space(pos)
                c = data[pos] if pos < n else -1
                if isinstance(stack[-1], list):
                    if c == 0x2C:
                        pos += 1
                        break
                    if c != 0x5D:
                        self.fail(pos, "after array element")
                else:
                    if c == 0x2C:
                        pos = self.key(self.space(pos + 1), keys)
                        break
                    if c != 0x7D:
                        self.fail(pos, "after object key:value pair")
                pos += 1
                stack.pop()
            if not stack:
                return root

    def key(self, pos: int, keys: list[str]) -> int:
        """Read ``"key":`` at ``pos`` (after spaces); the position of the value."""
        if pos >= len(self.data) or self.data[pos] != 0x22:
            self.fail(pos, "looking for beginning of object key string")
        key, pos = self.string(pos)
        pos = self.space(pos)
        if pos >= len(self.data) or self.data[pos] != 0x3A:
            self.fail(pos, "after object key")
        keys.append(key)
        return pos + 1

    def string(self, pos: int) -> tuple[str, int]:
        match = _STRING.match(self.data, pos)
        if match is None:
            self.string_error(pos + 1)
        return _unquote(match.group(1)), match.end()

    def string_error(self, pos: int) -> NoReturn:
        data, n = self.data, len(self.data)
        while True:
            plain = _PLAIN.match(data, pos)
            assert plain is not None
            pos = plain.end()
            if pos >= n:
                self.fail(pos, "")
            if data[pos] < 0x20:
                self.fail(pos, "in string literal")
            assert data[pos] == 0x5C, "a closed string matches _STRING"
            pos += 1
            if pos < n and data[pos] in b'"\\/bfnrt':
                pos += 1
                continue
            if pos >= n or data[pos] != ord("u"):
                self.fail(pos, "in string escape code")
            for _ in range(4):
                pos += 1
                if pos >= n or data[pos] not in _HEX:
                    self.fail(pos, "in \\u hexadecimal character escape")
            pos += 1

    def number(self, pos: int) -> tuple[int | Number, int]:
        data, n = self.data, len(self.data)
        match = _NUMBER.match(data, pos)
        if match is None:  # a '-' without a digit
            self.fail(pos + 1, "in numeric literal")
        end = match.end()
        # Go's scanner goes on into a '.' or an 'e' that the optional parts could not take.
        if end < n and data[end] == 0x2E and match.group(1) is None:
            self.fail(end + 1, "after decimal point in numeric literal")
        if end < n and data[end] in b"eE" and match.group(2) is None:
            sign = end + 1 < n and data[end + 1] in b"+-"
            self.fail(end + 1 + sign, "in exponent of numeric literal")
        literal = match.group().decode("ascii")
        if match.group(1) is None and match.group(2) is None and len(literal.lstrip("-")) <= _MAX_INT_DIGITS:
            return int(literal), end
        return Number(literal), end

    def literal(self, pos: int, word: bytes, value: Any) -> tuple[Any, int]:
        for i in range(1, len(word)):
            if pos + i >= len(self.data) or self.data[pos + i] != word[i]:
                self.fail(pos + i, f"in literal {word.decode()} (expecting '{chr(word[i])}')")
        return value, pos + len(word)


def _unquote(raw: bytes) -> str:
    if raw.isascii():
        text = raw.decode("ascii")
    else:
        text = _ESCAPED_BYTE.sub("\ufffd", raw.decode("utf-8", "surrogateescape"))
    return _ESCAPE.sub(_unescape, text) if "\\" in text else text


def _unescape(match: re.Match[str]) -> str:
    high, low, single, simple = match.groups()
    if high is not None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    if single is not None:
        code = int(single, 16)
        return "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)
    return _SIMPLE[simple]
