"""``python -m devmesh.registry --http-addr 127.0.0.1:8500``: serve the dev registry until SIGTERM/SIGINT."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from devmesh.registry.acl import ACL
from devmesh.registry.app import RunningRegistry, serve
from devmesh.registry.check_tls import CheckTLS
from devmesh.registry.state import RegistryConfig
from epoxi import settings
from epoxi.runtime.lifecycle import serve_main
from epoxi.settings import group, program, setting


def _http_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not <host>:<port>")
    return host.strip("[]"), int(port)


@program("epoxi registry", "A Consul-compatible development registry held in memory.")
@dataclass(frozen=True)
class RegistryFlags:
    """The registry's flags: where to serve, and the agent settings of ``RegistryConfig``."""

    http_addr: tuple[str, int] = setting(
        ("127.0.0.1", 8500), parse=_http_addr, shown="127.0.0.1:8500", help="host:port to serve on"
    )
    config: RegistryConfig = group(RegistryConfig)


def parse(argv: Sequence[str] | None = None) -> RegistryFlags:
    return settings.parse(RegistryFlags, argv)


async def start(flags: RegistryFlags) -> RunningRegistry:
    host, port = flags.http_addr
    return await serve(host, port, flags.config)


def check(config: RegistryConfig) -> str | None:
    """Why the registry cannot start with ``config`` (an unusable ACL or TLS setting), if so."""
    try:
        ACL(config)
        CheckTLS.from_config(config)
    except ValueError as e:
        return str(e)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse(argv)
    problem = check(flags.config)
    if problem:
        print(f"registry: cannot start: {problem}", file=sys.stderr, flush=True)
        return 2
    return serve_main("registry", lambda: start(flags))


if __name__ == "__main__":
    raise SystemExit(main())
