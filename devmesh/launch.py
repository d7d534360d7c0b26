"""``epoxi dev``: the whole mesh on one machine, like ``consul agent -dev``, with a demo batch."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

from google.protobuf import json_format

from devmesh.supervisor import Mesh, StartFailed
from devmesh.watchdog import Backoff, Died, Event, Watchdog
from epoxi import envelope
from epoxi.observability.logs import configure_logging
from epoxi.runtime.channels import channel
from epoxi.runtime.lifecycle import run_until_signalled
from epoxi.runtime.security import security_from_environment
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc

DEMO_RECIPIENTS = [
    ("alice@gmail.com", "127.0.0.2"),
    ("bob@gmail.com", "127.0.0.2"),
    ("carol@yahoo.com", "127.0.0.3"),
    ("dave@example.org", "127.0.0.4"),
    ("erin@example.org", "127.0.0.5"),
    ("frank@outlook.com", ""),  # no IP: the router picks one from the default pool
]


def demo_emails() -> list[email_pb2.Email]:
    # A Message-ID of this run's own: without one the router derives it from the content, and a
    # node that kept its spool from an earlier run would take the demo for a batch it already has.
    run = uuid.uuid4().hex[:12]
    return [
        envelope.new_email(
            "Epoxi Demo <demo@epoxi.dev>",
            to=[rcpt],
            subject=f"Hello {rcpt.split('@')[0].title()}",
            text="Routed by Epoxi mesh: router -> node pipeline -> SMTP.",
            html="<p>Routed by <b>Epoxi mesh</b>.</p>",
            delivery=email_pb2.Delivery(ip=ip),
            message_id=f"<demo-{run}-{i}@epoxi.dev>",
        )
        for i, (rcpt, ip) in enumerate(DEMO_RECIPIENTS)
    ]


async def send_demo(mesh: Mesh) -> router_pb2.RouteEmailsResponse:
    # The services' own environment (EPOXI_TLS_*, EPOXI_TOKEN*) says how to reach the router.
    security = security_from_environment({**os.environ, **mesh.env})
    async with channel(mesh.address("router"), security=security) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        reply: router_pb2.RouteEmailsResponse = await stub.RouteEmails(
            router_pb2.RouteEmailsRequest(emails=demo_emails()), timeout=30
        )
        return reply


async def wait_delivered(mesh: Mesh, count: int, seconds: float = 60.0) -> list[str]:
    async with asyncio.timeout(seconds):
        return await mesh.processes["sink"].wait_for_lines("received from", count)


def _echo(name: str, line: str) -> None:
    print(f"{name:>8} | {line}", flush=True)


def _report(event: Event) -> None:
    print(event.describe(), flush=True)


async def run(args: argparse.Namespace, stop: asyncio.Event) -> int:
    data_dir = Path(args.data_dir)
    mesh = Mesh(
        data_dir=data_dir,
        consul=args.consul,
        registry_addr=args.registry,
        router_addr=args.router,
        monitor_addr=args.monitor,
        gateway_addr=args.gateway,
        sink_addr=args.sink,
        ingress=True,
        ingress_addr=args.ingress,
        echo=_echo if args.verbose else None,
        log_dir=data_dir / "logs",
        own_process_group=True,
    )
    print(f"Starting Epoxi mesh; each service logs to {data_dir / 'logs'}/<service>.log", flush=True)
    try:
        await mesh.start()
    except StartFailed as failed:
        log = mesh.log_path(failed.process.name)
        _report(Died.of(failed.process, failed.reason, log, "the mesh cannot start without it; stopped it"))
        return 1
    watchdog = Watchdog(mesh, _report, Backoff(give_up_after=args.give_up_after)).start()
    try:
        print("\nEpoxi mesh is up:")
        for name, p in mesh.processes.items():
            address = mesh.smtp_address if name == "ingress" else p.address  # SMTP, not its health
            print(f"  {name:<9} {address:<22} pid {p.pid}")
        print(f"  status    http://{mesh.address('gateway')}/ (the live status page)")
        print(f"  data      {data_dir} (spools; delivered mail in {data_dir / 'sink'})")
        print(f"  logs      {data_dir / 'logs'}/<service>.log (the previous run's: <service>.log.1)")
        if not args.no_demo:
            summary = await send_demo(mesh)
            print("\nDemo batch routed:")
            counts = json_format.MessageToDict(summary, always_print_fields_with_no_presence=True)
            counts.pop("batches")
            print("  " + json.dumps(counts))
            for b in summary.batches:
                outcome = (
                    f"-> {b.node}{' (new pipeline)' if b.new_pipeline else ''}"
                    if b.ok
                    else f"FAILED: {b.error}"
                )
                print(f"  {b.routing_key:<26} {b.email_count} email(s) {outcome}")
            print("\nDelivered at the sink:")
            for line in await wait_delivered(mesh, len(DEMO_RECIPIENTS)):
                print("  " + line.rstrip())
        print(f"\nTry: .venv/bin/epoxi pipelines ls --monitor {mesh.address('monitor')}")
        print(f"     curl -s http://{mesh.address('gateway')}/admin/pipelines")
        print(f"     curl -s {mesh.metrics_url(mesh.nodes[0].id)}")
        print(f"     grpcurl -plaintext {mesh.address('router')} list")
        smtp_host, _, smtp_port = mesh.smtp_address.rpartition(":")
        print(
            f"     swaks --server {smtp_host} --port {smtp_port} --from you@epoxi.dev --to friend@example.org"
        )
        if args.exit_after_demo:
            return 0
        print("Ctrl-C stops the mesh.", flush=True)
        await stop.wait()
        return 0
    finally:
        await watchdog.stop()
        await mesh.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=os.environ.get("EPOXI_DATA_DIR", "var/dev"), help="spools and delivered mail"
    )
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR"), help="use this registry")
    parser.add_argument("--registry", default="127.0.0.1:8500", help="dev registry HTTP address")
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--monitor", default="127.0.0.1:50052", help="monitor gRPC address")
    parser.add_argument("--gateway", default="127.0.0.1:8080", help="gateway HTTP address")
    parser.add_argument("--sink", default="127.0.0.1:2525", help="mail sink SMTP address")
    parser.add_argument(
        "--ingress", default="127.0.0.1:2587", help="SMTP ingress address (anonymous submission, no TLS)"
    )
    parser.add_argument("--no-demo", action="store_true", help="do not send the demo batch")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is delivered")
    parser.add_argument(
        "--give-up-after",
        type=int,
        default=Backoff.give_up_after,
        metavar="N",
        help="stop restarting a service after N quick deaths in a row (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show every service's log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="epoxi dev", description="Run the whole mesh on this machine, with a demo batch."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    code = 0

    async def dev_main(stop: asyncio.Event) -> None:
        nonlocal code
        # The services are in their own process group, so a closed terminal hangs up only this
        # process: it stops them.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, stop.set)
        code = await run(args, stop)

    asyncio.run(run_until_signalled(dev_main))
    return code
