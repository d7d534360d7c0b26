"""How a servicer refuses a call: one abort, and one summary of many problems."""

from __future__ import annotations

from typing import NoReturn

import grpc

MAX_PROBLEMS_REPORTED = 20


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message``; never returns."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it always raises


def summary(problems: list[str]) -> str:
    """The first ``MAX_PROBLEMS_REPORTED`` problems, "; "-joined, and how many more there were."""
    more = len(problems) - MAX_PROBLEMS_REPORTED
    return "; ".join(problems[:MAX_PROBLEMS_REPORTED]) + (f"; and {more} more" if more > 0 else "")
