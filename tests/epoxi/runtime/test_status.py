"""Status messages: their size in grpc-message, cut to fit with a note of what was cut, a summary
of many problems, and an abort that reaches the client as sent, however large the message was."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from epoxi.runtime import status
from epoxi.runtime.status import MAX_MESSAGE_BYTES, bounded, encoded_size, summary

NOTE = re.compile(r"\.\.\. \((\d+) more characters\)\Z")


@pytest.mark.parametrize(
    ("message", "size"),
    [
        ("", 0),
        ("plain text ~", 12),
        ("%", 3),  # the escape character itself
        ("\n\t\x00\x1f\x7f", 15),  # control characters, and DEL
        ("ü", 6),  # two UTF-8 octets, each %XX
        ("日", 9),
        ("😀", 12),
        ("\ud800", 9),  # a lone surrogate, as surrogatepass writes it
    ],
)
def test_encoded_size_counts_octets_as_grpc_message_carries_them(message: str, size: int) -> None:
    assert encoded_size(message) == size


@given(st.text(max_size=50))
def test_encoded_size_is_the_length_of_the_percent_encoding(message: str) -> None:
    # grpc-message is the UTF-8 message with "%" and octets outside 0x20-0x7E as %XX.
    safe = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
    assert encoded_size(message) == len(urllib.parse.quote(message.encode("utf-8"), safe=safe))


def test_a_message_that_fits_is_left_as_it_is() -> None:
    assert bounded("short") == "short"
    exact = "a" * MAX_MESSAGE_BYTES
    assert bounded(exact) == exact
    assert bounded("ü" * 10, limit=60) == "ü" * 10


def test_a_message_one_octet_too_long_is_cut_and_says_how_much() -> None:
    message = "a" * (MAX_MESSAGE_BYTES + 1)
    cut = bounded(message)
    assert encoded_size(cut) <= MAX_MESSAGE_BYTES
    m = NOTE.search(cut)
    assert m is not None, cut[-60:]
    kept = cut[: m.start()]
    assert message.startswith(kept) and len(kept) + int(m[1]) == len(message)


@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=3000)
    | st.sampled_from(["%" * 5000, "😀" * 2000]),
    st.integers(64, 5000),
)
def test_a_bounded_message_fits_and_its_note_counts_the_characters_cut(message: str, limit: int) -> None:
    cut = bounded(message, limit)
    assert encoded_size(cut) <= limit
    if encoded_size(message) <= limit:
        assert cut == message
        return
    m = NOTE.search(cut)
    assert m is not None, cut[-60:]
    kept = cut[: m.start()]
    assert message.startswith(kept) and len(kept) + int(m[1]) == len(message)


def test_a_summary_names_the_first_problems_and_counts_the_rest() -> None:
    assert summary(["a", "b"]) == "a; b"
    problems = [f"p{i}" for i in range(25)]
    assert summary(problems) == "; ".join(problems[:20]) + "; and 5 more"
    assert summary([f"p{i}" for i in range(20)]).endswith("p19")  # exactly 20: nothing more


def test_a_summary_of_long_problems_is_bounded() -> None:
    text = summary(["ü" * 100] * 30)  # 600 bytes each in grpc-message
    assert encoded_size(text) <= MAX_MESSAGE_BYTES
    # Whole problems, then the count of the rest: the count is never what gets cut.
    shown, _, more = text.rpartition("; and ")
    assert shown.split("; ") == ["ü" * 100] * 6 and more == "24 more"


def test_a_summary_cuts_a_problem_too_long_alone() -> None:
    text = summary(["ü" * 5000, "b"])
    assert encoded_size(text) <= MAX_MESSAGE_BYTES
    assert text.endswith("; and 1 more")
    assert NOTE.search(text.removesuffix("; and 1 more")) is not None


# What a client receives: a real gRPC server aborting with status.abort.

SERVICE, METHOD = "epoxi.test.Refuser", "Refuse"


@pytest.fixture
async def refuser() -> AsyncIterator[str]:
    """A server whose one method aborts INVALID_ARGUMENT with the request (UTF-8) as its message."""

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await status.abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.decode("utf-8"))

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(refuse)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.parametrize(
    "message",
    ["short", "a" * 200_000, "ü" * 20_000, "%" * 10_000, "\n" * 10_000, "😀" * 5000, "a" * 8000 + "日本"],
    ids=["short", "ascii", "latin", "percent", "control", "emoji", "mixed"],
)
async def test_an_abort_reaches_the_client_bounded_and_as_sent(refuser: str, message: str) -> None:
    async with grpc.aio.insecure_channel(refuser) as ch:
        call = ch.unary_unary(f"/{SERVICE}/{METHOD}")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(message.encode("utf-8"), timeout=5)
    # Not RESOURCE_EXHAUSTED: the trailer fits the client's metadata limit.
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == bounded(message)
