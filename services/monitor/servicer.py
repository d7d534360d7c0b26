"""MonitorService: cluster-wide discovery, stats and health, every answer read from the registry.

Pipeline counts and health come from ``/v1/health/service/<name>``; message counters come from
each passing node's live ``NodeService.GetNodeState``, asked concurrently with a timeout.
The admin actions (start, stop, rebalance) call the nodes' ``NodeService`` and pass a node's
error on with its code; the planning they need is pure, in ``services.monitor.cluster``. A stop
goes to every node the registry shows running the key and to the holder of its placement record
(``epoxi.registry.ownership``); the node drains and hands the queued mail over, and its answer
says where the mail went. A rebalance moves each pipeline by one such stop, with the target named
(``hand_to_node``), under the cluster-wide lock of ``services.monitor.lock``. Queue inspection
asks every passing node's spool and merges the answers (``services.monitor.queues``); so do the
shaping calls, which list and clear the nodes' shaping adjustments (``services.monitor.shaping``).

A call that cannot reach the registry ends in one UNAVAILABLE naming the query that failed,
however many queries it had under way (``epoxi.runtime.status.refusals``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import grpc

from epoxi import routing
from epoxi.registry import services
from epoxi.registry.client import RegistryError
from epoxi.registry.ownership import Owner, owner_from_metadata, owner_of
from epoxi.routing import routing_key, split_routing_key
from epoxi.runtime import status
from epoxi.runtime.channels import Channels
from epoxi.runtime.status import Refusal, abort, refusals
from epoxi.v1 import monitor_pb2, monitor_pb2_grpc, node_pb2, node_pb2_grpc
from services.monitor import cluster, lock
from services.monitor.queues import NodeQueues
from services.monitor.shaping import NodeShaping, clear_request

log = logging.getLogger(__name__)

# Refusals naming another node that StartPipelineOptimal follows before it gives up.
FOLLOWED_REFUSALS = 3


class MonitorService(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(
        self,
        consul: Any,
        channels: Channels,
        node_timeout: float = 2.0,
        admin_timeout: float = 15.0,
        name: str = "monitor",
        address: str = "",
    ) -> None:
        self.consul = consul
        # Who this monitor is, in the rebalance lock's value.
        self.name = name
        self.address = address
        self.channels = channels
        self.node_timeout = node_timeout
        # Seconds for a node's StartPipeline or StopPipeline (a stop drains the pipeline first).
        self.admin_timeout = admin_timeout
        self.queues = NodeQueues(channels, node_timeout)
        self.shaping = NodeShaping(channels, node_timeout)

    @refusals
    async def FindAllPipelines(
        self, request: monitor_pb2.FindAllPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.FindAllPipelinesResponse:
        entries = await self._health(services.PIPELINE_SERVICE, passing=request.passing_only)
        response = monitor_pb2.FindAllPipelinesResponse()
        for p in cluster.pipelines_in_order(entries):
            response.nodes[p.node].pipelines.append(p)
        return response

    @refusals
    async def FindPipelinesByRoutingKey(
        self, request: monitor_pb2.FindPipelinesByRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.FindPipelinesByRoutingKeyResponse:
        key, _ = await self._key(context, request.routing_key)
        entries = await self._pipelines_for(key, passing=request.passing_only)
        return monitor_pb2.FindPipelinesByRoutingKeyResponse(pipelines=cluster.pipelines_in_order(entries))

    @refusals
    async def FindNodeForRoutingKey(
        self, request: monitor_pb2.FindNodeForRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.FindNodeForRoutingKeyResponse:
        key, source_ip = await self._key(context, request.routing_key)
        node, has_pipeline = await self._node_for_key(context, key, source_ip)
        return monitor_pb2.FindNodeForRoutingKeyResponse(node=node, has_pipeline=has_pipeline)

    @refusals
    async def GetPipelineStats(
        self, request: monitor_pb2.GetPipelineStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.GetPipelineStatsResponse:
        cluster_stats = await self._cluster()
        return monitor_pb2.GetPipelineStatsResponse(stats=cluster_stats.pipeline_stats)

    @refusals
    async def GetClusterStats(
        self, request: monitor_pb2.GetClusterStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.GetClusterStatsResponse:
        return await self._cluster()

    @refusals
    async def HealthCheckAll(
        self, request: monitor_pb2.HealthCheckAllRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.HealthCheckAllResponse:
        results, summary = cluster.health_results(await self._health(services.PIPELINE_SERVICE))
        return monitor_pb2.HealthCheckAllResponse(results=results, summary=summary)

    @refusals
    async def HealthCheckRoutingKey(
        self, request: monitor_pb2.HealthCheckRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.HealthCheckRoutingKeyResponse:
        key, _ = await self._key(context, request.routing_key)
        entries = await self._pipelines_for(key)
        if not entries:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no pipeline has routing key {key}")
        results, summary = cluster.health_results(entries)
        return monitor_pb2.HealthCheckRoutingKeyResponse(results=results, summary=summary)

    @refusals
    async def StartPipelineOptimal(
        self, request: monitor_pb2.StartPipelineOptimalRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.StartPipelineOptimalResponse:
        problems = routing.target_problems(request.domain, request.source_ip)
        if problems:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, status.summary(problems))
        source_ip = str(ipaddress.ip_address(request.source_ip))
        key = routing_key(request.domain, source_ip)
        # A node already running the key answers it (no second copy); else placement.best_node.
        node, _ = await self._node_for_key(context, key, source_ip)
        forward = node_pb2.StartPipelineRequest(
            domain=request.domain, source_ip=source_ip, policy_name=request.policy_name
        )
        if request.HasField("policy"):
            forward.policy.CopyFrom(request.policy)
        for hop in range(FOLLOWED_REFUSALS + 1):
            try:
                started = await self._start(node, forward)
                break
            except grpc.aio.AioRpcError as e:
                # A node that may not run the key names the one that does (the key, or its site).
                owner = owner_from_metadata(
                    (k, v) for k, v in (e.trailing_metadata() or ()) if isinstance(v, str)
                )
                if (
                    e.code() != grpc.StatusCode.FAILED_PRECONDITION
                    or owner is None
                    or hop == FOLLOWED_REFUSALS
                ):
                    await abort(context, e.code(), f"node {node.id} at {node.address}: {e.details()}")
                    raise
                log.info(
                    "StartPipelineOptimal %s: node %s names node %s: %s",
                    key,
                    node.id,
                    owner.node,
                    e.details(),
                )
                node = node_pb2.NodeInfo(id=owner.node, address=owner.address)
        return monitor_pb2.StartPipelineOptimalResponse(
            pipeline=started.pipeline, node=node, started=started.started
        )

    @refusals
    async def StopPipelineByRoutingKey(
        self, request: monitor_pb2.StopPipelineByRoutingKeyRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.StopPipelineByRoutingKeyResponse:
        key, _ = await self._key(context, request.routing_key)
        entries, owner = await asyncio.gather(self._pipelines_for(key), self._owner(key))
        found = {p.node: p.address for p in map(services.pipeline_from_entry, entries)}
        if owner is not None:
            found.setdefault(owner.node, owner.address)
        if not found:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no pipeline has routing key {key}")
        outcomes = await asyncio.gather(*(self._stop_on(n, found[n], key) for n in sorted(found)))
        stopped = sum(o.stopped for o in outcomes)
        if not stopped and all(o.error_code == grpc.StatusCode.NOT_FOUND.name for o in outcomes):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no node runs a pipeline for routing key {key}")
        return monitor_pb2.StopPipelineByRoutingKeyResponse(stopped_count=stopped, outcomes=outcomes)

    @refusals
    async def Rebalance(
        self, request: monitor_pb2.RebalanceRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.RebalanceResponse:
        if request.dry_run:
            planned, _ = await self._plan()
            return planned
        try:
            async with lock.held(self.consul, lock.REBALANCE, self.name, self.address) as held:
                # Planned under the lock: no other rebalance moves pipelines meanwhile.
                response, addresses = await self._plan()
                for group in cluster.move_groups(response.moves):
                    if held.lost:
                        log.warning("rebalance: %s was lost; the later moves stay planned", lock.REBALANCE)
                        break
                    await self._move(group, addresses)
                    if any(move.state != monitor_pb2.PIPELINE_MOVE_STATE_MOVED for move in group):
                        break  # later moves assumed this one; leave them planned
                return response
        except lock.LockHeld as e:
            await abort(context, grpc.StatusCode.ABORTED, f"another rebalance is under way: {e}")
        except RegistryError as e:
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"cannot take {lock.REBALANCE}: {e}")

    @refusals
    async def GetClusterQueueStats(
        self, request: monitor_pb2.GetClusterQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.GetClusterQueueStatsResponse:
        key = (await self._key(context, request.routing_key))[0] if request.routing_key else ""
        return await self.queues.stats(await self._passing_nodes(), key)

    @refusals
    async def ListClusterShaping(
        self, request: monitor_pb2.ListClusterShapingRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ListClusterShapingResponse:
        return await self.shaping.list(await self._passing_nodes())

    @refusals
    async def ClearClusterShaping(
        self, request: monitor_pb2.ClearClusterShapingRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ClearClusterShapingResponse:
        forward = clear_request(request)  # refused before the registry is read
        return await self.shaping.clear(await self._passing_nodes(), forward)

    @refusals
    async def ListQueuedMessages(
        self, request: monitor_pb2.ListQueuedMessagesRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ListQueuedMessagesResponse:
        key, _ = await self._key(context, request.routing_key)
        return await self.queues.list(await self._passing_nodes(), key, request)

    @refusals
    async def GetQueuedMessage(
        self, request: monitor_pb2.GetQueuedMessageRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.GetQueuedMessageResponse:
        return await self.queues.get(await self._passing_nodes(), request.message_id)

    async def _passing_nodes(self) -> list[node_pb2.NodeInfo]:
        entries = await self._health(services.NODE_SERVICE, passing=True)
        return sorted(map(services.node_from_entry, entries), key=lambda n: n.id)

    async def _plan(self) -> tuple[monitor_pb2.RebalanceResponse, dict[str, str]]:
        """The moves that even out the passing nodes' pipeline counts (all PLANNED), and the
        nodes' addresses."""
        nodes = [services.node_from_entry(e) for e in await self._health(services.NODE_SERVICE, passing=True)]
        answers = await asyncio.gather(*(self._node_state(n) for n in nodes))
        states = [s for n, s in zip(nodes, answers, strict=True) if s is not None and s.node.id == n.id]
        moves, skipped, counts = cluster.plan_rebalance(states)
        response = monitor_pb2.RebalanceResponse(
            moves=moves, skipped=skipped, planned_pipelines_per_node=counts
        )
        return response, {n.id: n.address for n in nodes}

    async def _move(self, group: list[monitor_pb2.PipelineMove], addresses: dict[str, str]) -> None:
        """Stop a group's pipelines on from_node with one StopPipeline (a node stops the keys of
        one site together), handing their queued mail to to_node, then make sure to_node runs
        each (started with the source's policy when nothing was queued)."""
        first = group[0]
        outcome = await self._stop_on(
            first.from_node, addresses[first.from_node], first.routing_key, hand_to=first.to_node
        )
        outcomes = {first.routing_key: outcome}
        outcomes.update((o.pipeline.routing_key, o) for o in outcome.moved_with)
        for move in group:
            found = outcomes.get(move.routing_key)
            if found is None:
                move.state = monitor_pb2.PIPELINE_MOVE_STATE_STOP_FAILED
                move.error_message = f"node {move.from_node} did not stop it with {first.routing_key}"
                if outcome.stopped:
                    move.error_message += " (it is no longer of the same site there)"
                continue
            await self._moved(move, found, addresses)

    async def _moved(
        self, move: monitor_pb2.PipelineMove, outcome: monitor_pb2.NodeStopOutcome, addresses: dict[str, str]
    ) -> None:
        """Record where ``move``'s stop put the mail, and start the key on to_node."""
        p = move.pipeline
        if not outcome.stopped:
            move.state = monitor_pb2.PIPELINE_MOVE_STATE_STOP_FAILED
            move.error_code, move.error_message = outcome.error_code, outcome.error_message
            return
        handed = outcome.messages_handed_off > 0 and outcome.handed_to_node == move.to_node
        if not handed and (outcome.messages_handed_off or outcome.messages_kept):
            # The mail stayed on from_node (which runs the key again) or went to another node.
            move.state = monitor_pb2.PIPELINE_MOVE_STATE_START_FAILED
            move.error_message = outcome.kept_reason or where_mail_went(outcome)
            return
        move.state = monitor_pb2.PIPELINE_MOVE_STATE_MOVED
        move.messages_moved = outcome.messages_handed_off
        if outcome.messages_kept:  # handed in part: the rest waits on from_node for its next round
            move.error_message = where_mail_went(outcome)
        target = node_pb2.NodeInfo(id=move.to_node, address=addresses[move.to_node])
        try:
            # With mail handed over to_node runs the key already, and this answers its pipeline.
            started = await self._start(
                target, node_pb2.StartPipelineRequest(domain=p.domain, source_ip=p.source_ip, policy=p.policy)
            )
        except grpc.aio.AioRpcError as e:
            if not handed:  # nothing queued, and to_node did not take the key
                move.state = monitor_pb2.PIPELINE_MOVE_STATE_START_FAILED
            move.error_code, move.error_message = e.code().name, str(e.details())
            return
        move.pipeline.CopyFrom(started.pipeline)

    async def _start(
        self, node: node_pb2.NodeInfo, request: node_pb2.StartPipelineRequest
    ) -> node_pb2.StartPipelineResponse:
        stub = node_pb2_grpc.NodeServiceStub(self.channels.get(node.address))
        response: node_pb2.StartPipelineResponse = await stub.StartPipeline(
            request, timeout=self.admin_timeout
        )
        log.info(
            "pipeline %s started on node %s (new: %s)",
            response.pipeline.routing_key,
            node.id,
            response.started,
        )
        return response

    async def _stop_on(
        self, node: str, address: str, key: str, hand_to: str = ""
    ) -> monitor_pb2.NodeStopOutcome:
        """Stop ``key`` on ``node`` (its queued mail to ``hand_to``, else where the node picks);
        the outcome carries where the mail went, or the node's error instead of raising it."""
        outcome = monitor_pb2.NodeStopOutcome(node=node, address=address)
        stub = node_pb2_grpc.NodeServiceStub(self.channels.get(address))
        try:
            response: node_pb2.StopPipelineResponse = await stub.StopPipeline(
                node_pb2.StopPipelineRequest(routing_key=key, hand_to_node=hand_to),
                timeout=self.admin_timeout,
            )
        except grpc.aio.AioRpcError as e:
            log.warning(
                "node %s at %s: StopPipeline %s failed: %s %s", node, address, key, e.code().name, e.details()
            )
            outcome.error_code, outcome.error_message = e.code().name, str(e.details())
            return outcome
        outcome = cluster.stop_outcome(node, address, response)
        for also in outcome.moved_with:
            log.info(
                "pipeline %s stopped with it on node %s: %s",
                also.pipeline.routing_key,
                node,
                where_mail_went(also),
            )
        log.info("pipeline %s stopped on node %s: %s", key, node, where_mail_went(outcome))
        return outcome

    async def _cluster(self) -> monitor_pb2.GetClusterStatsResponse:
        node_entries, pipeline_entries = await asyncio.gather(
            self._health(services.NODE_SERVICE), self._health(services.PIPELINE_SERVICE)
        )
        nodes = [services.node_from_entry(e) for e in node_entries]
        passing = [n for n, e in zip(nodes, node_entries, strict=True) if services.passing(e)]
        states = await asyncio.gather(*(self._node_state(n) for n in passing))
        live = {n.id: s for n, s in zip(passing, states, strict=True) if s is not None}
        pipelines = [services.pipeline_from_entry(e) for e in pipeline_entries]
        _, summary = cluster.health_results(pipeline_entries)
        return monitor_pb2.GetClusterStatsResponse(
            pipeline_stats=cluster.pipeline_stats(nodes, pipelines, live.values()),
            health_summary=summary,
            nodes=cluster.cluster_nodes(nodes, live),
            pipelines=cluster.cluster_pipelines(pipeline_entries, live),
            node_health=cluster.node_health(node_entries, live),
        )

    async def _node_state(self, node: node_pb2.NodeInfo) -> node_pb2.GetNodeStateResponse | None:
        """The node's live state; None (logged) when it does not answer in time."""
        stub = node_pb2_grpc.NodeServiceStub(self.channels.get(node.address))
        try:
            state: node_pb2.GetNodeStateResponse = await stub.GetNodeState(
                node_pb2.GetNodeStateRequest(), timeout=self.node_timeout
            )
        except grpc.aio.AioRpcError as e:
            log.warning(
                "node %s at %s: GetNodeState failed: %s %s", node.id, node.address, e.code().name, e.details()
            )
            return None
        return state

    async def _node_for_key(
        self, context: grpc.aio.ServicerContext, key: str, source_ip: str
    ) -> tuple[node_pb2.NodeInfo, bool]:
        """The passing node holding ``key``'s placement record, else the passing node the registry
        shows running it, else the best passing owner of ``source_ip`` (and whether it runs the
        key); NOT_FOUND when no passing node owns the IP."""
        node_entries, pipeline_entries, owner = await asyncio.gather(
            self._health(services.NODE_SERVICE, passing=True),
            self._pipelines_for(key, passing=True),
            self._owner(key),
        )
        if owner is not None:
            for entry in node_entries:
                holder = services.node_from_entry(entry)
                if holder.id == owner.node:
                    return holder, True
        found = cluster.node_for_key(
            map(services.node_from_entry, node_entries),
            map(services.pipeline_from_entry, pipeline_entries),
            source_ip,
        )
        if found is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no passing node owns source IP {source_ip} (routing key {key})",
            )
        return found

    async def _owner(self, key: str) -> Owner | None:
        """The node holding ``key``'s placement record; UNAVAILABLE when the registry does not answer."""
        try:
            return await owner_of(self.consul, key)
        except RegistryError as e:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE, f"cannot read the owner of {key} from the registry: {e}"
            ) from e

    async def _key(self, context: grpc.aio.ServicerContext, key: str) -> tuple[str, str]:
        """The canonical routing key and its source IP; INVALID_ARGUMENT when malformed."""
        try:
            domain, ip = split_routing_key(key)
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return routing_key(domain, ip), ip

    async def _pipelines_for(self, key: str, passing: bool = False) -> list[services.Entry]:
        entries = await self._health(services.PIPELINE_SERVICE, passing=passing, tag=key)
        return [e for e in entries if (e["Service"].get("Meta") or {}).get("routing_key") == key]

    async def _health(
        self, service: str, passing: bool = False, tag: str | None = None
    ) -> list[services.Entry]:
        try:
            _, entries = await self.consul.health.service(service, passing=passing, tag=tag)
        except RegistryError as e:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"cannot read {service} from the registry: {e}") from e
        return list(entries or [])


def where_mail_went(o: monitor_pb2.NodeStopOutcome) -> str:
    """Where a stop's queued mail went, in words: "3 messages handed to node n2", "2 messages kept
    on node n1: <reason>", both, or "no queued mail"."""
    parts = []
    if o.messages_handed_off:
        parts.append(f"{o.messages_handed_off} messages handed to node {o.handed_to_node}")
    if o.messages_kept:
        parts.append(f"{o.messages_kept} messages kept on node {o.node}: {o.kept_reason}")
    return "; ".join(parts) or "no queued mail"
