"""``epoxi.mail.render``: the direct writer against the ``EmailMessage`` path, on the same emails.

    .venv/bin/python -m benchmarks.render
    .venv/bin/python -m benchmarks.render --repeat 7 --seconds 0.5

Times ``render_slow`` (the baseline) and ``render_fast`` on a few shapes of about 2 KB, in the
same run, and prints µs per message and the ratio slow / fast for each. Each figure is the best
of ``--repeat`` rounds of about ``--seconds`` each, which keeps a noisy shared machine's stalls
out of it. Nothing is asserted: the equivalence of the two paths is tested in tests/test_mail.py.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence

from benchmarks import _utils
from epoxi import envelope, rendering
from epoxi.v1 import email_pb2

_LINE = "The quick brown fox jumps over the lazy dog; Epoxi mesh benchmark payload line.\n"


def _text(size: int) -> str:
    return (_LINE * (size // len(_LINE) + 1))[:size].rstrip("\n") + "\n"


def shapes(size: int) -> dict[str, email_pb2.Email]:
    """About ``size`` bytes of body each, in the shapes the node renders most."""

    def email_(**fields: object) -> email_pb2.Email:
        return envelope.new_email(
            "Epoxi Bench <bench@sender.bench.test>",
            to=["Some User <user1@d0.bench.test>"],
            subject="Your November statement is ready",
            headers=[
                email_pb2.Header(name="List-Unsubscribe", value="<https://sender.bench.test/u/1>"),
                email_pb2.Header(name="X-Campaign", value="november"),
            ],
            **fields,
        )

    html = "<html><body><p>" + _text(size // 2).replace("\n", "</p>\n<p>") + "</p></body></html>\n"
    return {
        f"text, ASCII, {size} B": email_(text=_text(size)),
        f"text + html, ASCII, {size} B": email_(text=_text(size // 2), html=html),
        f"text, non-ASCII (quoted-printable), {size} B": email_(text=_text(size).replace("fox", "föx")),
        f"text, one {size} B line (quoted-printable)": email_(text=_text(size).replace("\n", " ")),
    }


def per_message_us(fn: Callable[[], object], seconds: float, repeat: int) -> float:
    """Best of ``repeat`` rounds of about ``seconds`` each, in µs per call."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 10:  # calibrate the round size
        fn()
        n += 1
    n = max(1, n * 10)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="body bytes per message (default 2048)")
    p.add_argument("--seconds", type=float, default=0.3, help="length of one timing round")
    p.add_argument("--repeat", type=int, default=5, help="rounds per figure; the best counts")
    args = p.parse_args(argv)
    rows = [["email", "bytes", "EmailMessage µs", "direct µs", "slow / fast"]]
    for name, e in shapes(args.size).items():
        if rendering.render_fast(e) is None:
            raise SystemExit(f"{name}: the fast path does not take it")
        slow = per_message_us(functools.partial(rendering.render_slow, e), args.seconds, args.repeat)
        fast = per_message_us(functools.partial(rendering.render_fast, e), args.seconds, args.repeat)
        size = str(len(rendering.render(e)))
        rows.append([name, size, f"{slow:,.1f}", f"{fast:,.1f}", f"{slow / fast:,.0f}"])
    print(_utils.table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
