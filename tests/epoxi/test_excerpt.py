"""Values quoted in error messages: whole when short, else cut with a count of what was cut."""

from __future__ import annotations

import ast
import re

from hypothesis import given
from hypothesis import strategies as st

from epoxi.excerpt import MAX_SHOWN, shown

NOTE = re.compile(r"\.\.\. \((\d+) more characters\)\Z")


def test_a_short_value_is_quoted_whole() -> None:
    assert shown("") == "''"
    assert shown("bad@@example.com") == "'bad@@example.com'"
    assert shown("jörg\r\n") == "'jörg\\r\\n'"  # repr: line breaks show, non-ASCII letters stay
    exact = "a" * MAX_SHOWN
    assert shown(exact) == repr(exact)


def test_a_long_value_is_cut_and_says_how_much() -> None:
    assert shown("a" * (MAX_SHOWN + 1)) == repr("a" * MAX_SHOWN) + "... (1 more characters)"
    assert shown("ü" * 10_000) == repr("ü" * MAX_SHOWN) + f"... ({10_000 - MAX_SHOWN} more characters)"
    assert shown("abcdef", limit=2) == "'ab'... (4 more characters)"


@given(st.text(max_size=300), st.integers(1, 200))
def test_the_quote_and_the_count_give_back_the_value_s_length(value: str, limit: int) -> None:
    text = shown(value, limit)
    m = NOTE.search(text)
    if len(value) <= limit:
        assert m is None and ast.literal_eval(text) == value
        return
    assert m is not None
    quoted = ast.literal_eval(text[: m.start()])
    assert quoted == value[:limit] and len(quoted) + int(m[1]) == len(value)
