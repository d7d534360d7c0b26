"""Traffic shaping across the cluster: every passing node's ``ListShaping`` or ``ClearShaping``,
asked at once (``services.monitor.fanout``), the answers merged.

* ``list``: every adjustment in force, sorted by site, source IP, then node.
* ``clear``: a site's adjustments (from one source IP, or every IP) ended on every node; what
  was cleared, sorted likewise. A node's NOT_FOUND is an answer: it had none in force. NOT_FOUND
  when no node had one, naming the nodes that did not answer.

A node that does not answer is named in ``unreachable_nodes``; UNAVAILABLE only when none
answers. Refusals are raised as ``epoxi.runtime.status.Refusal``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

import grpc

from epoxi.runtime.status import Refusal
from epoxi.v1 import monitor_pb2, node_pb2, shaping_pb2
from services.monitor.fanout import NodeCalls, Unreachable, nobody, none_answered, reasons, reraise

log = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_NOT_FOUND = grpc.StatusCode.NOT_FOUND


def in_order(
    answers: Iterable[tuple[node_pb2.NodeInfo, Sequence[shaping_pb2.ShapingAdjustment]]],
) -> list[shaping_pb2.ShapingAdjustment]:
    """The nodes' adjustments, each naming its node, sorted by site, source IP, then node."""
    merged = []
    for node, adjustments in answers:
        for a in adjustments:
            if not a.node:
                a.node = node.id
            merged.append(a)
    return sorted(merged, key=lambda a: (a.site, a.source_ip, a.node))


def clear_request(request: monitor_pb2.ClearClusterShapingRequest) -> shaping_pb2.ClearShapingRequest:
    """What to ask each node; INVALID_ARGUMENT for an empty site or a malformed source IP."""
    if not request.site:
        raise Refusal(_INVALID, "site is empty: give a site as ListClusterShaping names it")
    source_ip = request.source_ip
    if source_ip:
        try:
            # As the nodes name it: a pipeline's source IP is canonical.
            source_ip = str(ipaddress.ip_address(source_ip))
        except ValueError:
            raise Refusal(_INVALID, f"source_ip {source_ip!r} is not an IP address") from None
    return shaping_pb2.ClearShapingRequest(site=request.site, source_ip=source_ip)


class NodeShaping(NodeCalls):
    async def list(self, nodes: Sequence[node_pb2.NodeInfo]) -> monitor_pb2.ListClusterShapingResponse:
        request = shaping_pb2.ListShapingRequest()
        answers = await self.ask_all(nodes, "ListShaping", [request] * len(nodes))
        response = monitor_pb2.ListClusterShapingResponse()
        found = []
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, Unreachable):
                response.unreachable_nodes.append(answer.outcome)
                continue
            reraise(answer)
            found.append((node, answer.adjustments))
        none_answered(nodes, found, response.unreachable_nodes)
        response.adjustments.extend(in_order(found))
        return response

    async def clear(
        self, nodes: Sequence[node_pb2.NodeInfo], forward: shaping_pb2.ClearShapingRequest
    ) -> monitor_pb2.ClearClusterShapingResponse:
        """``forward`` (from ``clear_request``) on every node."""
        site, source_ip = forward.site, forward.source_ip
        answers = await self.ask_all(nodes, "ClearShaping", [forward] * len(nodes))
        response = monitor_pb2.ClearClusterShapingResponse()
        cleared = []
        answered = 0
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, Unreachable):
                if answer.code == _NOT_FOUND:
                    answered += 1  # none in force there
                elif answer.code == _INVALID:
                    raise Refusal(
                        _INVALID, f"node {node.id} refuses the request: {answer.outcome.error_message}"
                    )
                else:
                    response.unreachable_nodes.append(answer.outcome)
                continue
            reraise(answer)
            answered += 1
            cleared.append((node, answer.cleared))
        if not answered:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, nobody(nodes, response.unreachable_nodes))
        response.cleared.extend(in_order(cleared))
        where = f" from {source_ip}" if source_ip else ""
        if not response.cleared:
            unreachable = response.unreachable_nodes
            silent = f"; {reasons(unreachable)} did not answer" if unreachable else ""
            raise Refusal(
                _NOT_FOUND, f"no shaping adjustment in force for site {site!r}{where} on any node{silent}"
            )
        log.info(
            "shaping of %s%s cleared: %d adjustments on %s",
            site,
            where,
            len(response.cleared),
            ", ".join(sorted({a.node for a in response.cleared})),
        )
        return response
