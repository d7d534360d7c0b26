"""``epoxi send``: route emails through a router: one from flags, a RouteEmailsRequest from a
file, or many from a file (``--file``) in batches with a progress line and a summary.

It dials as the shared security settings say (``epoxi.runtime.security``: ``--tls-ca`` or
EPOXI_TLS_CA for TLS, ``--tls-cert``/``--tls-key`` for mTLS, ``--token-file`` or EPOXI_TOKEN for a
token with scope ``submit``).

With ``--file`` (``cli.inputs`` says what it reads, ``cli.bulk`` how it sends): the progress
goes to stderr, the summary to stdout (``--json``: as JSON), and every email that failed to
``--failed`` (default ``<input>.failed``), one JSON object a line, ``{"index", "file"?,
"reason", "idempotencyKey"?}``: what ``--only-indexes`` reads to send just those again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from cli import exits
from cli.bulk import BulkSender, Outcome, Retry
from cli.inputs import Defaults, count, read, single
from cli.progress import Progress
from cli.tables import fields
from epoxi import settings
from epoxi.runtime.channels import RPC_TIMEOUT, channel
from epoxi.runtime.security import Security, SecurityConfig, SecurityError, load_security
from epoxi.v1 import router_pb2, router_pb2_grpc

DEFAULT_SENDER = "Epoxi <sender@epoxi.dev>"
FAILED_SUFFIX = ".failed"

EPILOG = f"""bulk files (--file):
  JSON lines: one epoxi.v1.Email in proto JSON a line, e.g.
    {{"from": "Ann <ann@example.com>", "to": ["bob@example.org"], "subject": "Hi", "text": "hello"}}
    (also "html", "cc", "headers", "delivery": {{"ip": ...}}, ...); an email's index is its
    0-based line number.
  a directory: each *.eml file is one message, sent as written (Email.raw); its envelope is
    --from/--to, else the From address and the To, Cc and Bcc addresses (Bcc then removed).
  Emails that failed go to --failed (default <input>{FAILED_SUFFIX}), one JSON object a line;
  send them again with --file <input> --only-indexes <input>{FAILED_SUFFIX}.

{exits.EPILOG}
  With --file: 0 every email accepted, 1 some failed, 4 the router could not be reached at all."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epoxi send",
        description="Route emails through a router: one from the flags, or many from --file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--json", action="store_true", help="with --file: print the summary as JSON")
    parser.add_argument("--request", type=Path, help="a file with a RouteEmailsRequest as JSON")
    parser.add_argument(
        "--from",
        dest="sender",
        help=f"the sender (default {DEFAULT_SENDER!r}; "
        "with --file: for emails without one, and an .eml's envelope sender)",
    )
    parser.add_argument(
        "--to",
        action="append",
        default=[],
        help="a recipient (repeatable; with --file: an .eml's envelope recipients)",
    )
    parser.add_argument("--subject", default="Hello from Epoxi mesh", help="the subject")
    parser.add_argument("--text", default="Sent with epoxi send.", help="the plain-text body")
    parser.add_argument("--ip", default="", help="source IP; empty lets the router pick from --ip-pool")
    parser.add_argument("--ip-pool", default="", help="the IP pool to pick from (default: the router's)")
    bulk = parser.add_argument_group("bulk sending")
    bulk.add_argument(
        "--file", type=Path, metavar="PATH", help="a JSON lines file, or a directory of .eml files"
    )
    bulk.add_argument("--batch-size", type=int, default=500, help="emails per RouteEmails call (default 500)")
    bulk.add_argument("--concurrency", type=int, default=4, help="calls in flight at once (default 4)")
    bulk.add_argument(
        "--failed",
        type=Path,
        metavar="PATH",
        help=f"where the failed emails go (default <input>{FAILED_SUFFIX})",
    )
    bulk.add_argument(
        "--only-indexes", type=Path, metavar="FILE", help="send only the emails a failed file names"
    )
    bulk.add_argument(
        "--progress-interval",
        type=float,
        metavar="SECONDS",
        help="least time between progress lines (default 0.1 on a terminal, else 1)",
    )
    bulk.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="deadline of each call (default 60)"
    )
    settings.add_arguments(parser, SecurityConfig)
    return parser


def _usage(message: str) -> int:
    return exits.usage("send", message)


def send(args: argparse.Namespace) -> int:
    try:
        security = load_security(settings.from_args(SecurityConfig, args))
    except (SecurityError, ValueError) as e:
        return _usage(str(e))
    if args.file is not None:
        return send_file(args, security)
    request_file = args.request
    if request_file is not None:
        try:
            request = json_format.Parse(request_file.read_text(), router_pb2.RouteEmailsRequest())
        except (OSError, json_format.ParseError) as e:
            return _usage(f"{request_file}: {e}")
    else:
        if not args.to:
            return _usage("give --to (repeatable), --request FILE, or --file PATH")
        defaults = Defaults(args.sender or DEFAULT_SENDER, tuple(args.to), args.ip)
        request = router_pb2.RouteEmailsRequest(
            emails=[single(defaults, args.subject, args.text)], ip_pool=args.ip_pool
        )
    return asyncio.run(_send_one(args.router, security, request))


async def _send_one(router: str, security: Security, request: router_pb2.RouteEmailsRequest) -> int:
    async with channel(router, security=security) as ch:
        try:
            reply = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            return exits.rpc_failed("send", e)
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
    return exits.OK if reply.failed_batches == 0 else exits.FAILED


def send_file(args: argparse.Namespace, security: Security) -> int:
    path: Path = args.file
    if not path.exists():
        return _usage(f"--file {path}: no such file or directory")
    if args.batch_size < 1 or args.concurrency < 1:
        return _usage("--batch-size and --concurrency must be at least 1")
    retry = None
    if args.only_indexes is not None:
        try:
            retry = Retry.load(args.only_indexes)
        except (OSError, ValueError) as e:
            return _usage(f"--only-indexes: {e}")
    failed_path: Path = args.failed or path.with_name(path.name + FAILED_SUFFIX)
    defaults = Defaults(args.sender, tuple(args.to), args.ip, args.ip_pool)
    only = set(retry.keys) if retry is not None else None
    progress = Progress(count(path, only), sys.stderr, args.progress_interval)

    async def send_all() -> Outcome:
        async with channel(args.router, security=security) as ch:
            sender = BulkSender(
                router_pb2_grpc.RouterServiceStub(ch),
                progress,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                ip_pool=args.ip_pool,
                timeout=args.timeout,
            )
            return await sender.run(read(path, defaults, only), retry)

    outcome = asyncio.run(send_all())
    progress.finish()
    failures = sorted(outcome.failures, key=lambda f: (f.index, f.file))
    failed_path.write_text("".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n" for f in failures))
    summary = _summary(outcome, progress.elapsed, failed_path)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return _exit_code(outcome)


def _summary(outcome: Outcome, elapsed: float, failed_path: Path) -> dict[str, Any]:
    return {
        "total": outcome.total,
        "accepted": outcome.accepted,
        "failed": len(outcome.failures),
        "batches": outcome.batches,
        "failedBatches": outcome.failed_batches,
        "elapsedSeconds": round(elapsed, 3),
        "emailsPerSecond": round(outcome.total / elapsed, 1) if elapsed > 0 else 0.0,
        "failedFile": str(failed_path),
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(
        fields(
            [
                ("accepted", f"{s['accepted']} of {s['total']}"),
                ("failed", s["failed"]),
                ("batches", f"{s['batches']} ({s['failedBatches']} with failures)"),
                ("elapsed", f"{s['elapsedSeconds']:.1f} s"),
                ("rate", f"{s['emailsPerSecond']:.0f} emails/s"),
                ("failed file", s["failedFile"]),
            ]
        )
    )


def _exit_code(outcome: Outcome) -> int:
    if not outcome.failures:
        return exits.OK
    codes = set(outcome.call_failures)
    # Not one call answered, and they all failed alike: say that (unreachable, not allowed).
    if not outcome.answered and len(codes) == 1 and codes <= {exits.UNREACHABLE, exits.DENIED}:
        return codes.pop()
    return exits.FAILED


def main(argv: list[str] | None = None) -> int:
    return send(build_parser().parse_args(argv))
