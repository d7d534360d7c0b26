"""``python -m devmesh.registry --http-addr 127.0.0.1:8500``: serve the dev registry until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import socket

from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.state import RegistryConfig
from epoxi import durations
from epoxi.runtime.lifecycle import serve_main


def _duration(text: str) -> int:
    try:
        return durations.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _http_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not <host>:<port>")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    defaults = RegistryConfig()
    parser = argparse.ArgumentParser(
        prog="epoxi-devregistry", description="A Consul-compatible development registry held in memory."
    )
    parser.add_argument(
        "--http-addr", type=_http_addr, default=("127.0.0.1", 8500), help="host:port to serve on"
    )
    parser.add_argument("--node", default=socket.gethostname(), help="node name (default: the host name)")
    parser.add_argument("--datacenter", default=defaults.datacenter)
    parser.add_argument(
        "--session-ttl-min", type=_duration, default=defaults.session_ttl_min, metavar="DURATION"
    )
    parser.add_argument(
        "--check-deregister-interval-min",
        type=_duration,
        default=defaults.check_deregister_interval_min,
        metavar="DURATION",
    )
    parser.add_argument(
        "--check-reap-interval", type=_duration, default=defaults.check_reap_interval, metavar="DURATION"
    )
    parser.add_argument(
        "--check-update-interval", type=_duration, default=defaults.check_update_interval, metavar="DURATION"
    )
    return parser


async def start(args: argparse.Namespace) -> RunningRegistry:
    host, port = args.http_addr
    config = RegistryConfig(
        node_name=args.node,
        datacenter=args.datacenter,
        session_ttl_min=args.session_ttl_min,
        check_deregister_interval_min=args.check_deregister_interval_min,
        check_reap_interval=args.check_reap_interval,
        check_update_interval=args.check_update_interval,
    )
    return await serve(host, port, config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve_main("registry", lambda: start(args))


if __name__ == "__main__":
    raise SystemExit(main())
