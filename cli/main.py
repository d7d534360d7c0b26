"""The ``epoxi`` command: one entry point for every service, the dev mesh and a sender.

Each program is ``module`` (its ``main(argv)``) or ``module:function``, and is imported only
when chosen, so running a node never loads the dev tooling.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PROGRAMS = {
    "registry": ("devmesh.registry.__main__", "run the development registry (Consul's HTTP API)"),
    "node": ("services.node.main", "run a node: spool mail and deliver it over SMTP"),
    "router": ("services.router.main", "run a router: route emails to node pipelines"),
    "monitor": ("services.monitor.main", "run the monitor: cluster discovery, stats, health, admin"),
    "ingress": ("services.ingress.main", "run the SMTP ingress: accept mail from applications"),
    "gateway": ("gateway.main", "run the HTTP gateway in front of the monitor"),
    "sink": ("devmesh.sink", "run a local mail sink that keeps what it receives"),
    "dev": ("devmesh.launch", "run the whole mesh on this machine, with a demo batch"),
    "send": ("cli.send", "route emails through a router: one, or many from a file with progress"),
    "pipelines": ("cli.admin:pipelines", "list, show, start and stop pipelines (through the monitor)"),
    "rebalance": ("cli.admin:rebalance", "move pipelines between the owners of their IPs (--dry-run)"),
    "queue": ("cli.admin:queue", "list a routing key's spooled messages"),
    "message": ("cli.admin:message", "show one spooled message and its delivery attempts"),
    "health": ("cli.admin:health", "every pipeline's health, problems first"),
    "stats": ("cli.admin:stats", "cluster totals, nodes, load and queues"),
    "shaping": ("cli.admin:shaping", "list and clear the traffic shaping providers' replies put in force"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PROGRAMS:
        name, _, function = PROGRAMS[argv[0]][0].partition(":")
        program = getattr(importlib.import_module(name), function or "main")
        return int(program(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="epoxi",
        description="Epoxi mesh: distributed email delivery.",
        epilog="The admin commands and send exit 0 ok, 1 failure reported, 2 usage, 3 not found, "
        "4 unreachable, 5 not allowed (docs/cli.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, summary) in PROGRAMS.items():
        sub.add_parser(name, help=f"{summary} (see 'epoxi {name} --help')", add_help=False)
    parser.parse_args(argv)
    return 2
