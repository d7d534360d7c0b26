"""RouteEmails refuses bad input with INVALID_ARGUMENT whatever the size of its bad values: the
message fits in grpc-message (a trailer over 8 KiB would turn the refusal into RESOURCE_EXHAUSTED),
counts the problems up front, and says how many characters were cut."""

from __future__ import annotations

import re

import grpc
import pytest

from epoxi.runtime.status import MAX_MESSAGE_BYTES, encoded_size
from epoxi.v1 import email_pb2
from services.router.main import RunningRouter
from tests.services.router.support import email, route

CUT = re.compile(r"\((\d+) more characters\)")


async def refusal(router: RunningRouter, *emails: email_pb2.Email) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await route(router, *emails)
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), details[:200])
    assert encoded_size(details) <= MAX_MESSAGE_BYTES
    return details


def most_cut(details: str) -> int:
    counts = [int(n) for n in CUT.findall(details)]
    assert counts, details
    return max(counts)


@pytest.mark.parametrize("size", [200_000, 2_000_000])
async def test_a_huge_address_is_cut_and_says_how_much(router: RunningRouter, size: int) -> None:
    details = await refusal(router, email("a" * size + "@example.com", ip="127.0.0.2"))
    assert details.startswith("nothing was routed: emails[0].to[0] 'aaaa")
    # Whichever cut it (the value's quote, or the message), the note counts nearly all of it.
    assert most_cut(details) >= size - MAX_MESSAGE_BYTES


async def test_a_huge_non_ascii_value_is_cut_and_says_how_much(router: RunningRouter) -> None:
    details = await refusal(router, email("ü" * 100_000 + "@example.com", ip="127.0.0.2"))
    assert details.startswith("nothing was routed: emails[0].to[0] 'üüüü")
    assert most_cut(details) >= 100_000 - MAX_MESSAGE_BYTES


@pytest.mark.parametrize("value", ["x" * 1000, "ü" * 1000, "日本" * 500], ids=["ascii", "latin", "cjk"])
async def test_thousands_of_invalid_emails_with_long_values_are_counted_and_cut(
    router: RunningRouter, value: str
) -> None:
    emails = [email(f"{value}{i}@example.com", ip="127.0.0.2") for i in range(5000)]
    details = await refusal(router, *emails)
    assert details.startswith(f"nothing was routed (5000 problems): emails[0].to[0] {value[:4]!r}"[:-1])
    assert most_cut(details) > 0
