"""Asking every passing node at once: each call within ``node_timeout``, its failure kept as an
``Unreachable`` that names the node, the code and the message, as ``unreachable_nodes`` shows it.

The queue inspection (``services.monitor.queues``) and the shaping calls
(``services.monitor.shaping``) merge what comes back; a call fails with UNAVAILABLE only when no
node answers (``none_answered``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from epoxi.runtime.channels import Channels
from epoxi.runtime.status import Refusal
from epoxi.v1 import monitor_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

_NOT_FOUND = grpc.StatusCode.NOT_FOUND


class Unreachable(Exception):
    """A node's call failed; ``outcome`` says how, as the response names it."""

    def __init__(self, outcome: monitor_pb2.UnreachableNode, code: grpc.StatusCode) -> None:
        super().__init__(outcome.error_message)
        self.outcome = outcome
        self.code = code


class NodeCalls:
    """Calls ``NodeService`` methods on nodes, one long-lived channel per node (``channels``)."""

    def __init__(self, channels: Channels, node_timeout: float) -> None:
        self.channels = channels
        self.node_timeout = node_timeout

    async def ask(self, node: node_pb2.NodeInfo, method: str, request: Any) -> Any:
        """The node's answer; ``Unreachable`` when the call fails (a NOT_FOUND is not logged:
        it is an answer)."""
        stub = node_pb2_grpc.NodeServiceStub(self.channels.get(node.address))
        try:
            return await getattr(stub, method)(request, timeout=self.node_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != _NOT_FOUND:
                log.warning(
                    "node %s at %s: %s failed: %s %s",
                    node.id,
                    node.address,
                    method,
                    e.code().name,
                    e.details(),
                )
            outcome = monitor_pb2.UnreachableNode(
                node=node.id, error_code=e.code().name, error_message=str(e.details() or "")
            )
            raise Unreachable(outcome, e.code()) from e

    async def ask_all(
        self, nodes: Sequence[node_pb2.NodeInfo], method: str, requests: Sequence[Any]
    ) -> list[Any]:
        """Each node's answer, or its ``Unreachable``."""
        return await asyncio.gather(
            *(self.ask(n, method, r) for n, r in zip(nodes, requests, strict=True)), return_exceptions=True
        )


def reraise(answer: Any) -> None:
    """An exception ``gather`` returned that is not a node's failed call is a bug: raise it."""
    if isinstance(answer, BaseException):
        raise answer


def reasons(unreachable: Sequence[monitor_pb2.UnreachableNode]) -> str:
    return ", ".join(f"node {u.node} ({u.error_code}: {u.error_message})" for u in unreachable)


def nobody(nodes: Sequence[node_pb2.NodeInfo], unreachable: Sequence[monitor_pb2.UnreachableNode]) -> str:
    if not nodes:
        return "no passing node in the registry to ask"
    return f"no node answered: {reasons(unreachable)}"


def none_answered(
    nodes: Sequence[node_pb2.NodeInfo], answered: Any, unreachable: Sequence[monitor_pb2.UnreachableNode]
) -> None:
    """UNAVAILABLE, naming who did not answer, when ``answered`` is empty."""
    if not answered:
        raise Refusal(grpc.StatusCode.UNAVAILABLE, nobody(nodes, unreachable))
