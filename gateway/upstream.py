"""Where the gateway sends a service's calls: a fixed address, or a passing instance found in the registry.

Each upstream dials through the ``Channels`` it is given (and closes them): the caller decides
how channels are secured (``epoxi.runtime.channels``). Give each upstream its own.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol

import grpc

from epoxi.registry.client import RegistryError
from epoxi.runtime.channels import Channels

log = logging.getLogger(__name__)


class NoUpstream(LookupError):
    """No instance of the target service is available (HTTP 503, UNAVAILABLE)."""


class Upstream(Protocol):
    async def channel(self) -> grpc.aio.Channel:
        """A channel to an instance; NoUpstream when there is none."""
        ...

    def unavailable(self) -> None:
        """The last call found the instance UNAVAILABLE: choose again next time."""
        ...

    async def close(self) -> None: ...


class StaticUpstream:
    def __init__(self, target: str, channels: Channels | None = None) -> None:
        self.target = target
        self._channels = channels if channels is not None else Channels()

    async def channel(self) -> grpc.aio.Channel:
        return self._channels.get(self.target)

    def unavailable(self) -> None:
        pass

    async def close(self) -> None:
        await self._channels.close()


class RegistryUpstream:
    """A passing instance of ``service`` from the registry, kept until a call finds it unavailable."""

    def __init__(
        self, consul: Any, service: str, channels: Channels | None = None, owns_client: bool = False
    ) -> None:
        self._consul = consul
        self._owns_client = owns_client
        self.service = service
        self.target: str | None = None
        self._channels = channels if channels is not None else Channels()

    async def channel(self) -> grpc.aio.Channel:
        if self.target is None:
            try:
                _, entries = await self._consul.health.service(self.service, passing=True)
            except RegistryError as e:
                raise NoUpstream(f"cannot read {self.service} from the registry: {e}") from e
            if not entries:
                raise NoUpstream(f"no passing {self.service} in the registry")
            entry = random.choice(entries)
            host = entry["Service"].get("Address") or entry["Node"]["Address"]
            self.target = (
                f"[{host}]:{entry['Service']['Port']}"
                if ":" in host
                else f"{host}:{entry['Service']['Port']}"
            )
            log.info("using %s at %s", self.service, self.target)
        return self._channels.get(self.target)

    def unavailable(self) -> None:
        self.target = None

    async def close(self) -> None:
        try:
            await self._channels.close()
        finally:
            if self._owns_client:
                await self._consul.close()
