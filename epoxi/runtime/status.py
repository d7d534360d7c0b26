"""How a servicer refuses a call: one abort, with one bounded summary of many problems."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

R = TypeVar("R")
# Refusals that say something is wrong on our side, logged where they end a call.
_SERVER_TROUBLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})

MAX_PROBLEMS_REPORTED = 20
# The status message travels percent-encoded in the grpc-message trailer, and a peer refuses
# metadata over 8 KiB (grpc.max_metadata_size) with RESOURCE_EXHAUSTED instead of the status.
MAX_MESSAGE_BYTES = 4096


def encoded_size(message: str) -> int:
    """Bytes ``message`` takes in grpc-message: UTF-8, with "%" and bytes outside 0x20-0x7E as "%XX"."""
    data = message.encode("utf-8", "surrogatepass")
    return len(data) + 2 * sum(1 for b in data if b < 0x20 or b > 0x7E or b == 0x25)


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message``, cut so that it takes at most ``limit`` bytes in grpc-message, ending with how
    many characters were cut."""
    if encoded_size(message) <= limit:
        return message
    # Leave room for the note; a character takes at most 12 bytes encoded.
    room = limit - 48
    kept, used = [], 0
    for ch in message:
        used += encoded_size(ch)
        if used > room:
            break
        kept.append(ch)
    return "".join(kept) + f"... ({len(message) - len(kept)} more characters)"


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message`` (bounded); never returns."""
    await context.abort(code, bounded(message))
    raise AssertionError("context.abort returned")  # it always raises


class Refusal(Exception):
    """Raised by a servicer's helpers to refuse the call; ``refusals`` turns it into one abort.

    Helpers that run concurrently (``asyncio.gather``) must not abort themselves: a second
    ``context.abort`` on the same call raises ``UsageError: Abort already called``.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refusals(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """A servicer method whose ``Refusal`` ends the call with its code and message, once."""

    @functools.wraps(method)
    async def refusing(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except Refusal as r:
            if r.code in _SERVER_TROUBLE:
                logging.getLogger(method.__module__).warning(
                    "%s: %s %s", method.__qualname__, r.code.name, r.message
                )
            await abort(context, r.code, r.message)

    return refusing


def summary(problems: list[str]) -> str:
    """The first problems, "; "-joined, and how many more there were: at most
    ``MAX_PROBLEMS_REPORTED``, and as many whole ones as fit ``MAX_MESSAGE_BYTES`` with the count
    (a problem alone too long for it is cut, saying how much)."""
    room = MAX_MESSAGE_BYTES - 32  # for "; and N more"
    shown: list[str] = []
    used = 0
    for p in problems[:MAX_PROBLEMS_REPORTED]:
        size = encoded_size(p) + (2 if shown else 0)
        if used + size > room:
            if not shown:
                shown.append(bounded(p, room))
            break
        shown.append(p)
        used += size
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
