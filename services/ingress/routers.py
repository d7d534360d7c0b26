"""How the ingress reaches a router: at a given address, or any passing ``epoxi-router`` the
registry lists; and what a RouteEmails call came to.

With the registry, the passing routers are looked up at most every ``REFRESH`` seconds, and a
router the ingress cannot connect to is skipped for the next (nothing reached it, so trying
another is safe). Any other failure of the call is the caller's to answer: the router may have
routed the message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from epoxi.registry.client import RegistryError
from epoxi.runtime.channels import Channels
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc

ROUTER_SERVICE = "epoxi-router"
REFRESH = 2.0


class MeshUnavailable(Exception):
    """The mesh cannot take the message now: a retry later may succeed."""


class Refused(Exception):
    """The router refused the message for good (INVALID_ARGUMENT): ``details`` says why."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class RouterLink:
    channels: Channels
    # A fixed router address; None: the registry's passing routers.
    address: str | None
    consul: Any | None
    timeout: float = 30.0
    _routers: Sequence[str] = ()
    _looked_up: float = float("-inf")

    async def route(self, email: email_pb2.Email) -> router_pb2.RouteEmailsResponse:
        """RouteEmails with ``email``; raises ``MeshUnavailable`` or ``Refused``."""
        targets = await self._targets()
        if not targets:
            raise MeshUnavailable("no router is passing its health check in the registry")
        request = router_pb2.RouteEmailsRequest(emails=[email])
        failures = []
        for target in targets:
            stub = router_pb2_grpc.RouterServiceStub(self.channels.get(target))
            try:
                reply: router_pb2.RouteEmailsResponse = await stub.RouteEmails(request, timeout=self.timeout)
                return reply
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.INVALID_ARGUMENT or code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise Refused(code, details) from None
                failures.append(f"router {target}: {code.name}: {details}")
                if not (code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower()):
                    break  # it may have routed the message: the client's retry is safe, not ours
        self._looked_up = float("-inf")
        raise MeshUnavailable("; ".join(failures))

    async def _targets(self) -> Sequence[str]:
        if self.address is not None:
            return [self.address]
        now = time.monotonic()
        if now - self._looked_up < REFRESH and self._routers:
            return self._routers
        assert self.consul is not None
        try:
            _, entries = await self.consul.health.service(ROUTER_SERVICE, passing=True)
        except RegistryError as e:
            raise MeshUnavailable(f"the registry cannot be reached ({type(e).__name__}: {e})") from None
        self._routers = [_address(e) for e in entries]
        self._looked_up = now
        return self._routers


def _address(entry: dict[str, Any]) -> str:
    service = entry["Service"]
    host = service.get("Address") or entry.get("Node", {}).get("Address", "")
    return f"{host}:{service.get('Port', 0)}"
