"""Queue inspection across the cluster: every passing node is asked at once, the answers merged.

* ``stats``: each node's ``GetQueueStats``, with totals over the nodes that answered.
* ``list``: one routing key's messages oldest first across nodes, a page at a time
  (``services.monitor.queue_pages``). Each node is asked for a full page from where the listing
  stands on it; the page takes the oldest of all; a node that gave only part of its answer is
  asked again for just that part, for the node's own token after it. So each node's position
  is the node's own token, and nothing is skipped or repeated.
* ``get``: ``GetMessage`` on every node; the answer of the node that holds it.

A node that does not answer (in ``node_timeout``) is named in ``unreachable_nodes`` with the
code and message of its failed call. A call fails with UNAVAILABLE only when no node answers.
Refusals are raised as ``epoxi.runtime.status.Refusal``.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from epoxi.runtime.status import Refusal
from epoxi.v1 import monitor_pb2, node_pb2, queue_pb2
from services.monitor.cluster import add_counters
from services.monitor.fanout import NodeCalls, Unreachable, nobody, none_answered, reasons, reraise
from services.monitor.queue_pages import BadPageToken, Position, merge, page_size, spool_id_problem

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_NOT_FOUND = grpc.StatusCode.NOT_FOUND


class NodeQueues(NodeCalls):
    async def stats(
        self, nodes: Sequence[node_pb2.NodeInfo], routing_key: str
    ) -> monitor_pb2.GetClusterQueueStatsResponse:
        request = node_pb2.GetQueueStatsRequest(routing_key=routing_key)
        answers = await self.ask_all(nodes, "GetQueueStats", [request] * len(nodes))
        response = monitor_pb2.GetClusterQueueStatsResponse()
        response.totals.SetInParent()
        holders = 0
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, Unreachable) and routing_key and answer.code == _NOT_FOUND:
                response.nodes[node.id].totals.SetInParent()  # it answered: none of that key here
                continue
            if isinstance(answer, Unreachable):
                response.unreachable_nodes.append(answer.outcome)
                continue
            reraise(answer)
            response.nodes[node.id].CopyFrom(answer)
            add_counters(response.totals, answer.totals)
            holders += 1
        none_answered(nodes, response.nodes, response.unreachable_nodes)
        if routing_key and not holders:
            raise Refusal(_NOT_FOUND, f"routing key {routing_key} has no pipeline and no mail on any node")
        return response

    async def list(
        self,
        nodes: Sequence[node_pb2.NodeInfo],
        routing_key: str,
        request: monitor_pb2.ListQueuedMessagesRequest,
    ) -> monitor_pb2.ListQueuedMessagesResponse:
        problems = []
        size = 0
        try:
            size = page_size(request.page_size)
        except ValueError as e:
            problems.append(str(e))
        if request.state not in queue_pb2.DeliveryState.values():
            problems.append(f"state {request.state} is not a DeliveryState")
        position = Position(routing_key, request.state)
        if request.page_token:
            try:
                position = Position.parse(request.page_token, routing_key, request.state)
            except BadPageToken as e:
                problems.append(str(e))
        if problems:
            raise Refusal(_INVALID, "; ".join(problems))
        passing = {n.id for n in nodes}
        asked = [n for n in nodes if n.id not in position.done]
        response = monitor_pb2.ListQueuedMessagesResponse()
        for gone in sorted(set(position.nodes) - passing):
            response.unreachable_nodes.append(
                monitor_pb2.UnreachableNode(
                    node=gone, error_code="UNAVAILABLE", error_message="not passing in the registry"
                )
            )
        answers = await self.ask_all(
            asked, "ListMessages", [self._page(routing_key, request, position, n, size) for n in asked]
        )
        pages: dict[str, node_pb2.ListMessagesResponse] = {}
        for node, answer in zip(asked, answers, strict=True):
            if isinstance(answer, Unreachable):
                if answer.code == _INVALID:
                    raise Refusal(
                        _INVALID, f"node {node.id} refuses the page_token: {answer.outcome.error_message}"
                    )
                response.unreachable_nodes.append(answer.outcome)
                continue
            reraise(answer)
            pages[node.id] = answer
        if asked or not request.page_token:
            none_answered(nodes, pages, response.unreachable_nodes)
        messages, taken = merge({n: list(p.messages) for n, p in pages.items()}, size)
        response.messages.extend(messages)
        await self._advance(
            position, [n for n in asked if n.id in pages], pages, taken, routing_key, request, response
        )
        if any(n in position.nodes for n in pages if n not in position.done):
            response.next_page_token = position.token()
        return response

    def _page(
        self,
        routing_key: str,
        request: monitor_pb2.ListQueuedMessagesRequest,
        position: Position,
        node: node_pb2.NodeInfo,
        size: int,
    ) -> node_pb2.ListMessagesRequest:
        return node_pb2.ListMessagesRequest(
            routing_key=routing_key, state=request.state, page_size=size, page_token=position.at(node.id)
        )

    async def _advance(
        self,
        position: Position,
        answered: Sequence[node_pb2.NodeInfo],
        pages: dict[str, node_pb2.ListMessagesResponse],
        taken: dict[str, int],
        routing_key: str,
        request: monitor_pb2.ListQueuedMessagesRequest,
        response: monitor_pb2.ListQueuedMessagesResponse,
    ) -> None:
        """Move ``position`` past what each node gave to this page."""
        partial = []
        for node in answered:
            page, k = pages[node.id], taken[node.id]
            if k == len(page.messages):
                if page.next_page_token:
                    position.nodes[node.id] = page.next_page_token
                else:
                    position.done.add(node.id)
                    position.nodes.pop(node.id, None)
            elif k:
                partial.append(node)
            else:
                position.nodes.setdefault(node.id, position.at(node.id))
        # Those that gave part of their page: their own token after just that part.
        again = await self.ask_all(
            partial,
            "ListMessages",
            [self._page(routing_key, request, position, n, taken[n.id]) for n in partial],
        )
        for node, answer in zip(partial, again, strict=True):
            if isinstance(answer, Unreachable):
                # Its position stays: the next page may show some of this page's messages again.
                response.unreachable_nodes.append(answer.outcome)
                continue
            reraise(answer)
            if answer.next_page_token:
                position.nodes[node.id] = answer.next_page_token
            else:
                position.done.add(node.id)
                position.nodes.pop(node.id, None)

    async def get(
        self, nodes: Sequence[node_pb2.NodeInfo], message_id: str
    ) -> monitor_pb2.GetQueuedMessageResponse:
        problem = spool_id_problem(message_id)
        if problem is not None:
            raise Refusal(_INVALID, problem)
        request = node_pb2.GetMessageRequest(message_id=message_id)
        answers = await self.ask_all(nodes, "GetMessage", [request] * len(nodes))
        unreachable = []
        answered = 0
        for node, answer in sorted(zip(nodes, answers, strict=True), key=lambda na: na[0].id):
            if isinstance(answer, Unreachable):
                if answer.code == _NOT_FOUND:
                    answered += 1
                else:
                    unreachable.append(answer.outcome)
                continue
            reraise(answer)
            return monitor_pb2.GetQueuedMessageResponse(
                node=node.id, message=answer.message, attempts=answer.attempts
            )
        if not answered:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, nobody(nodes, unreachable))
        silent = f"; {reasons(unreachable)} did not answer" if unreachable else ""
        raise Refusal(_NOT_FOUND, f"no reachable node has message {message_id}{silent}")
