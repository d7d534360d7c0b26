"""The admin commands: ``epoxi pipelines|rebalance|queue|message|health|stats|shaping`` over
the monitor's gRPC API (MonitorService).

Each dials ``--monitor`` (EPOXI_MONITOR; default the dev mesh's monitor, 127.0.0.1:50052) as
the shared security settings say (``epoxi.runtime.security``), prints an aligned table
(``cli.tables``), or with ``--json`` the responses as proto JSON, and exits as ``cli.exits``
says. A gRPC error is one line on stderr, ``epoxi <command>: <CODE>: <message>``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from cli import exits
from cli.tables import fields, table
from epoxi import proto_time, settings
from epoxi.routing import split_routing_key
from epoxi.runtime.channels import channel
from epoxi.runtime.security import SecurityConfig, SecurityError, load_security
from epoxi.shaping import action_name
from epoxi.v1 import monitor_pb2, monitor_pb2_grpc, pipeline_pb2, queue_pb2, shaping_pb2

# What `epoxi dev` runs the monitor on (devmesh/launch.py --monitor).
DEV_MONITOR = "127.0.0.1:50052"
MONITOR_ENV = "EPOXI_MONITOR"
DEFAULT_TIMEOUT = 30.0

Stub = monitor_pb2_grpc.MonitorServiceStub
Work = Callable[[Stub, argparse.Namespace], Awaitable[int]]


def to_json(message: Message) -> dict[str, Any]:
    """A response as proto JSON, every field present (zeros too), so scripts see stable keys."""
    found: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return found


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=exits.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _subcommand(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, epilog=exits.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--monitor",
        default=os.environ.get(MONITOR_ENV) or DEV_MONITOR,
        metavar="HOST:PORT",
        help=f"the monitor's gRPC address (default {DEV_MONITOR}, where `epoxi dev` runs it; env {MONITOR_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print the responses as proto JSON, for scripts")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help="deadline of each call"
    )
    settings.add_arguments(parser, SecurityConfig)


def _run(command: str, args: argparse.Namespace, work: Work) -> int:
    try:
        security = load_security(settings.from_args(SecurityConfig, args))
    except (SecurityError, ValueError) as e:
        return exits.usage(command, str(e))

    async def call() -> int:
        async with channel(args.monitor, security=security) as ch:
            try:
                return await work(Stub(ch), args)
            except grpc.aio.AioRpcError as e:
                return exits.rpc_failed(command, e)

    return asyncio.run(call())


# --- shown values ---


def _status(status: pipeline_pb2.PipelineStatus.ValueType) -> str:
    return pipeline_pb2.PipelineStatus.Name(status).removeprefix("PIPELINE_STATUS_").lower()


def _state(state: queue_pb2.DeliveryState.ValueType) -> str:
    return queue_pb2.DeliveryState.Name(state).removeprefix("DELIVERY_STATE_").lower().replace("_", "-")


def _move_state(state: monitor_pb2.PipelineMoveState.ValueType) -> str:
    return (
        monitor_pb2.PipelineMoveState.Name(state)
        .removeprefix("PIPELINE_MOVE_STATE_")
        .lower()
        .replace("_", "-")
    )


def _when(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    at = datetime.datetime.fromtimestamp(ts.seconds, datetime.UTC)
    return at.strftime("%Y-%m-%d %H:%M:%SZ")


PIPELINE_HEADERS = (
    "NODE",
    "ROUTING KEY",
    "STATUS",
    "HEALTHY",
    "QUEUED",
    "IN FLIGHT",
    "DEFERRED",
    "DELIVERED",
    "BOUNCED",
)


def _pipeline_row(p: pipeline_pb2.PipelineInfo) -> list[object]:
    c = p.counters
    return [
        p.node,
        p.routing_key,
        _status(p.status),
        p.healthy,
        c.queued,
        c.in_flight,
        c.deferred,
        c.delivered,
        c.bounced,
    ]


def _pipelines_table(pipelines: Sequence[pipeline_pb2.PipelineInfo]) -> str:
    return table(PIPELINE_HEADERS, [_pipeline_row(p) for p in pipelines]) if pipelines else "no pipelines"


HEALTH_HEADERS = ("ROUTING KEY", "NODE", "STATUS", "HEALTHY", "OUTPUT")


def _health_table(results: Sequence[monitor_pb2.PipelineHealth]) -> str:
    rows = [
        [r.pipeline.routing_key, r.pipeline.node, r.status, r.healthy, "; ".join(r.outputs)]
        for r in sorted(results, key=lambda r: (r.healthy, r.pipeline.routing_key, r.pipeline.node))
    ]
    return table(HEALTH_HEADERS, rows) if rows else "no pipelines"


def _summary(s: monitor_pb2.HealthSummary) -> str:
    return f"{s.healthy} healthy, {s.unhealthy} unhealthy"


# --- pipelines ---


async def _pipelines_ls(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.FindAllPipelines(
        monitor_pb2.FindAllPipelinesRequest(passing_only=args.passing_only), timeout=args.timeout
    )
    if args.json:
        print_json(to_json(reply))
        return exits.OK
    pipelines = [p for node in sorted(reply.nodes) for p in reply.nodes[node].pipelines]
    print(_pipelines_table(pipelines))
    return exits.OK


async def _pipelines_show(stub: Stub, args: argparse.Namespace) -> int:
    found, health = await asyncio.gather(
        stub.FindPipelinesByRoutingKey(
            monitor_pb2.FindPipelinesByRoutingKeyRequest(routing_key=args.key), timeout=args.timeout
        ),
        stub.HealthCheckRoutingKey(
            monitor_pb2.HealthCheckRoutingKeyRequest(routing_key=args.key), timeout=args.timeout
        ),
    )
    if args.json:
        print_json({"pipelines": to_json(found)["pipelines"], "health": to_json(health)})
    else:
        print(_pipelines_table(found.pipelines))
        for p in found.pipelines:
            policy = p.policy
            print(
                f"\n{p.name} at {p.address}, started {_when(p.started_at)}\n"
                + fields(
                    [
                        ("policy", policy.name),
                        ("max connections", policy.max_connections),
                        ("batch size", policy.batch_size),
                        ("rate", f"{policy.allowed_messages} per {policy.message_interval.ToTimedelta()}"),
                    ]
                )
            )
        print()
        print(_health_table(health.results))
        print(_summary(health.summary))
    return exits.OK if health.summary.unhealthy == 0 else exits.FAILED


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(domain, source IP) from ``DOMAIN SOURCE_IP`` or one routing key; ValueError says why not."""
    if len(args.target) == 2:
        domain, ip = args.target
        return domain, ip
    if len(args.target) == 1:
        return split_routing_key(args.target[0])
    raise ValueError("give DOMAIN SOURCE_IP, or one routing key (e.g. gmail.com_127_0_0_2)")


async def _pipelines_start(stub: Stub, args: argparse.Namespace) -> int:
    domain, ip = args.domain_and_ip
    reply = await stub.StartPipelineOptimal(
        monitor_pb2.StartPipelineOptimalRequest(domain=domain, source_ip=ip, policy_name=args.policy_name),
        timeout=args.timeout,
    )
    if args.json:
        print_json(to_json(reply))
        return exits.OK
    how = "started" if reply.started else "already running"
    print(f"{reply.pipeline.routing_key} {how} on {reply.node.id} ({reply.node.address})")
    print(_pipelines_table([reply.pipeline]))
    return exits.OK


def _stop_failed(o: monitor_pb2.NodeStopOutcome) -> bool:
    # A node asked only because it held the key's record may simply not run it.
    return not o.stopped and o.error_code not in ("", grpc.StatusCode.NOT_FOUND.name)


async def _pipelines_stop(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.StopPipelineByRoutingKey(
        monitor_pb2.StopPipelineByRoutingKeyRequest(routing_key=args.key), timeout=args.timeout
    )
    failed = any(_stop_failed(o) for o in reply.outcomes)
    if args.json:
        print_json(to_json(reply))
    else:
        # The keys of the pipeline's MX site on a node stop with it (they move only together).
        outcomes = [(args.key, o) for o in reply.outcomes]
        outcomes += [(m.pipeline.routing_key, m) for o in reply.outcomes for m in o.moved_with]
        rows = [
            [
                key,
                o.node,
                o.stopped,
                o.messages_handed_off,
                o.handed_to_node,
                o.messages_kept,
                o.kept_reason,
                f"{o.error_code}: {o.error_message}" if o.error_code else "",
            ]
            for key, o in outcomes
        ]
        print(table(("KEY", "NODE", "STOPPED", "HANDED OFF", "TO", "KEPT", "KEPT BECAUSE", "ERROR"), rows))
        print(f"stopped on {reply.stopped_count} node(s)")
        for o in reply.outcomes:
            if o.moved_with:
                also = ", ".join(m.pipeline.routing_key for m in o.moved_with)
                print(f"{also} stopped with it on {o.node}: same MX site ({o.pipeline.site}) and source IP")
    return exits.FAILED if failed else exits.OK


# --- rebalance, queue, message, health, stats ---


_MOVE_FAILED = (monitor_pb2.PIPELINE_MOVE_STATE_START_FAILED, monitor_pb2.PIPELINE_MOVE_STATE_STOP_FAILED)


async def _rebalance(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.Rebalance(monitor_pb2.RebalanceRequest(dry_run=args.dry_run), timeout=args.timeout)
    failed = any(m.state in _MOVE_FAILED for m in reply.moves)
    if args.json:
        print_json(to_json(reply))
        return exits.FAILED if failed else exits.OK
    if reply.moves:
        rows = [
            [
                m.routing_key,
                m.from_node,
                m.to_node,
                _move_state(m.state),
                m.messages_moved,
                f"{m.error_code}: {m.error_message}" if m.error_code else m.error_message,
            ]
            for m in reply.moves
        ]
        print(table(("ROUTING KEY", "FROM", "TO", "STATE", "MESSAGES", "ERROR"), rows))
    else:
        print("no moves: the nodes are balanced" + (" (dry run)" if args.dry_run else ""))
    if reply.skipped:
        rows = [[s.pipeline.routing_key, s.pipeline.node, s.to_node, s.reason] for s in reply.skipped]
        print("\nskipped:\n" + table(("ROUTING KEY", "NODE", "TO", "REASON"), rows))
    planned = reply.planned_pipelines_per_node
    if planned:
        heading = "pipelines per node after the planned moves" if args.dry_run else "pipelines per node"
        print(f"\n{heading}:\n" + table(("NODE", "PIPELINES"), [[n, planned[n]] for n in sorted(planned)]))
    return exits.FAILED if failed else exits.OK


_STATES = {
    _state(v): v for v in queue_pb2.DeliveryState.values() if v != queue_pb2.DELIVERY_STATE_UNSPECIFIED
}


async def _queue_ls(stub: Stub, args: argparse.Namespace) -> int:
    request = monitor_pb2.ListQueuedMessagesRequest(
        routing_key=args.key,
        state=_STATES[args.state] if args.state else queue_pb2.DELIVERY_STATE_UNSPECIFIED,
        page_size=args.page_size,
        page_token=args.page_token,
    )
    reply = await stub.ListQueuedMessages(request, timeout=args.timeout)
    pages = [reply]
    while args.all and pages[-1].next_page_token:
        request.page_token = pages[-1].next_page_token
        pages.append(await stub.ListQueuedMessages(request, timeout=args.timeout))
    messages = [m for page in pages for m in page.messages]
    unreachable = {u.node: u for page in pages for u in page.unreachable_nodes}
    next_token = pages[-1].next_page_token
    if args.json:
        if len(pages) == 1:
            print_json(to_json(reply))
        else:
            merged = monitor_pb2.ListQueuedMessagesResponse(
                messages=messages, unreachable_nodes=list(unreachable.values())
            )
            print_json(to_json(merged))
    else:
        rows = [
            [
                m.message.id,
                m.node,
                ", ".join(sorted({_state(r.state) for r in m.message.recipients})),
                _when(m.message.accepted_at),
                len(m.message.recipients),
                m.message.sender,
                m.message.subject,
            ]
            for m in messages
        ]
        headers = ("ID", "NODE", "STATE", "ACCEPTED", "RECIPIENTS", "SENDER", "SUBJECT")
        print(table(headers, rows) if rows else f"no messages for {args.key}")
        if next_token:
            print(f"more: --page-token {next_token}")
    for u in unreachable.values():
        print(
            f"epoxi queue: node {u.node} did not answer: {u.error_code}: {u.error_message}", file=sys.stderr
        )
    return exits.OK


async def _message_show(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.GetQueuedMessage(
        monitor_pb2.GetQueuedMessageRequest(message_id=args.id), timeout=args.timeout
    )
    if args.json:
        print_json(to_json(reply))
        return exits.OK
    m = reply.message
    print(
        fields(
            [
                ("id", m.id),
                ("node", reply.node),
                ("routing key", m.routing_key),
                ("sender", m.sender),
                ("subject", m.subject),
                ("message-id", m.message_id_header),
                ("accepted", _when(m.accepted_at)),
                ("size", f"{m.size_bytes} bytes"),
            ]
        )
    )
    rows = [
        [
            r.recipient,
            _state(r.state),
            r.attempts,
            r.smtp_code or "",
            r.enhanced_code,
            r.text,
            _when(r.next_attempt_at),
        ]
        for r in m.recipients
    ]
    print("\n" + table(("RECIPIENT", "STATE", "ATTEMPTS", "CODE", "ENHANCED", "REPLY", "NEXT ATTEMPT"), rows))
    if reply.attempts:
        rows = [
            [
                _when(a.attempted_at),
                a.recipient,
                a.attempt,
                _state(a.result),
                a.smtp_code or "",
                a.enhanced_code,
                a.text,
            ]
            for a in reply.attempts
        ]
        print("\nattempts:\n" + table(("AT", "RECIPIENT", "#", "RESULT", "CODE", "ENHANCED", "REPLY"), rows))
    return exits.OK


async def _health(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.HealthCheckAll(monitor_pb2.HealthCheckAllRequest(), timeout=args.timeout)
    if args.json:
        print_json(to_json(reply))
    else:
        print(_health_table(reply.results))
        print(_summary(reply.summary))
    return exits.OK if reply.summary.unhealthy == 0 else exits.FAILED


async def _stats(stub: Stub, args: argparse.Namespace) -> int:
    cluster_call = stub.GetClusterStats(monitor_pb2.GetClusterStatsRequest(), timeout=args.timeout)
    if args.no_queues:
        cluster, queues = await cluster_call, None
    else:
        cluster, queues = await asyncio.gather(
            cluster_call,
            stub.GetClusterQueueStats(monitor_pb2.GetClusterQueueStatsRequest(), timeout=args.timeout),
        )
    if args.json:
        found: dict[str, Any] = {"cluster": to_json(cluster)}
        if queues is not None:
            found["queues"] = to_json(queues)
        print_json(found)
        return exits.OK
    stats, health = cluster.pipeline_stats, cluster.health_summary
    t = stats.totals
    print(
        fields(
            [
                ("nodes", stats.total_nodes),
                ("pipelines", f"{stats.total_pipelines} ({_summary(health)})"),
                (
                    "messages",
                    f"{t.queued} queued, {t.in_flight} in flight, {t.deferred} deferred, "
                    f"{t.delivered} delivered, {t.bounced} bounced",
                ),
            ]
        )
    )
    rows = [
        [n.id, n.address, n.ip_pool, ", ".join(n.egress_ips), n.pipeline_count, n.load]
        for n in sorted(cluster.nodes, key=lambda n: n.id)
    ]
    print("\n" + table(("NODE", "ADDRESS", "POOL", "EGRESS IPS", "PIPELINES", "LOAD"), rows))
    if queues is not None:
        rows = []
        for node in sorted(queues.nodes):
            for q in queues.nodes[node].pipelines:
                c = q.counters
                rows.append(
                    [
                        node,
                        q.routing_key,
                        q.running,
                        c.queued,
                        c.in_flight,
                        c.deferred,
                        c.delivered,
                        c.bounced,
                    ]
                )
        headers = (
            "NODE",
            "ROUTING KEY",
            "RUNNING",
            "QUEUED",
            "IN FLIGHT",
            "DEFERRED",
            "DELIVERED",
            "BOUNCED",
        )
        print("\nqueues:\n" + (table(headers, rows) if rows else "no spooled mail"))
        for u in queues.unreachable_nodes:
            print(
                f"epoxi stats: node {u.node} did not answer: {u.error_code}: {u.error_message}",
                file=sys.stderr,
            )
    return exits.OK


# --- shaping ---


SHAPING_HEADERS = (
    "SITE",
    "SOURCE IP",
    "NODE",
    "RULE",
    "ACTION",
    "FACTOR",
    "LIMITS",
    "UNTIL",
    "REPLY",
    "ROUTING KEYS",
)


def _limits(a: shaping_pb2.ShapingAdjustment) -> str:
    """The limits in force, e.g. "2 connections, 5 per 1s"; "none" when nothing limits the site."""
    parts = []
    if a.max_connections:
        parts.append(f"{a.max_connections} connection" + ("s" if a.max_connections != 1 else ""))
    if a.allowed_messages:
        parts.append(f"{a.allowed_messages} per {proto_time.seconds(a.message_interval):g}s")
    return ", ".join(parts) or "none"


def _shaping_table(adjustments: Sequence[shaping_pb2.ShapingAdjustment]) -> str:
    rows = [
        [
            a.site,
            a.source_ip,
            a.node,
            a.rule,
            action_name(a.action),
            round(a.factor, 4),
            _limits(a),
            _when(a.until),
            a.reply,
            ", ".join(a.routing_keys),
        ]
        for a in adjustments
    ]
    return table(SHAPING_HEADERS, rows)


def _unreachable(command: str, unreachable: Sequence[monitor_pb2.UnreachableNode]) -> None:
    for u in unreachable:
        print(
            f"epoxi {command}: node {u.node} did not answer: {u.error_code}: {u.error_message}",
            file=sys.stderr,
        )


async def _shaping_ls(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.ListClusterShaping(monitor_pb2.ListClusterShapingRequest(), timeout=args.timeout)
    if args.json:
        print_json(to_json(reply))
    else:
        print(_shaping_table(reply.adjustments) if reply.adjustments else "no shaping adjustments in force")
    _unreachable("shaping ls", reply.unreachable_nodes)
    return exits.OK


async def _shaping_clear(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.ClearClusterShaping(
        monitor_pb2.ClearClusterShapingRequest(site=args.site, source_ip=args.ip), timeout=args.timeout
    )
    if args.json:
        print_json(to_json(reply))
    else:
        print(_shaping_table(reply.cleared))
        print(f"cleared {len(reply.cleared)} adjustment(s)")
    _unreachable("shaping clear", reply.unreachable_nodes)
    return exits.OK


# --- entry points (cli.main's PROGRAMS) ---


def pipelines(argv: list[str]) -> int:
    parser = _parser("epoxi pipelines", "List, show, start and stop pipelines through the monitor.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ls|show|start|stop")
    ls = _subcommand(sub, "ls", "every pipeline, by node")
    ls.add_argument("--passing-only", action="store_true", help="only pipelines whose checks all pass")
    ls.set_defaults(work=_pipelines_ls)
    show = _subcommand(sub, "show", "one routing key's pipelines and their health (exit 1: unhealthy)")
    show.add_argument("key", metavar="KEY", help="routing key, e.g. gmail.com_127_0_0_2")
    show.set_defaults(work=_pipelines_show)
    start = _subcommand(sub, "start", "start a pipeline on the best node for its source IP")
    start.add_argument(
        "target",
        nargs="+",
        metavar="TARGET",
        help="DOMAIN SOURCE_IP (e.g. gmail.com 127.0.0.2), or one routing key (gmail.com_127_0_0_2)",
    )
    start.add_argument("--policy-name", default="", help="a stored policy (epoxi/policies/<name>) to follow")
    start.set_defaults(work=_pipelines_start)
    stop = _subcommand(sub, "stop", "stop a routing key's pipeline everywhere (exit 1: a node failed)")
    stop.add_argument("key", metavar="KEY", help="routing key")
    stop.set_defaults(work=_pipelines_stop)
    for p in (ls, show, start, stop):
        _common(p)
    args = parser.parse_args(argv)
    if args.action == "start":
        try:
            args.domain_and_ip = _target(args)
        except ValueError as e:
            start.error(str(e))
    return _run(f"pipelines {args.action}", args, args.work)


def rebalance(argv: list[str]) -> int:
    parser = _parser(
        "epoxi rebalance",
        "Move pipelines from the most- to the least-loaded owners of their IPs (exit 1: a move failed).",
    )
    parser.add_argument("--dry-run", action="store_true", help="plan the moves without making them")
    _common(parser)
    return _run("rebalance", parser.parse_args(argv), _rebalance)


def queue(argv: list[str]) -> int:
    parser = _parser("epoxi queue", "Inspect spooled mail across the cluster.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ls")
    ls = _subcommand(sub, "ls", "a routing key's spooled messages, oldest first, a page at a time")
    ls.add_argument("key", metavar="KEY", help="routing key")
    ls.add_argument("--state", choices=sorted(_STATES), help="only messages with a recipient in this state")
    ls.add_argument(
        "--page-size", type=int, default=0, help="messages per page (0: the monitor's 50; at most 1000)"
    )
    ls.add_argument("--page-token", default="", help="the token a previous page printed")
    ls.add_argument("--all", action="store_true", help="follow the pages to the end")
    _common(ls)
    args = parser.parse_args(argv)
    if args.page_size < 0:
        ls.error("--page-size must be 0 or more")
    return _run("queue ls", args, _queue_ls)


def message(argv: list[str]) -> int:
    parser = _parser("epoxi message", "Inspect one spooled message.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="show")
    show = _subcommand(sub, "show", "a message with its recipients and every delivery attempt")
    show.add_argument("id", metavar="ID", help="spool ID (RouteEmails' message_ids)")
    _common(show)
    return _run("message show", parser.parse_args(argv), _message_show)


def health(argv: list[str]) -> int:
    parser = _parser(
        "epoxi health", "Every pipeline's registry health, problems first (exit 1: any unhealthy)."
    )
    _common(parser)
    return _run("health", parser.parse_args(argv), _health)


def stats(argv: list[str]) -> int:
    parser = _parser("epoxi stats", "Cluster totals, nodes and their load, and each node's queues.")
    parser.add_argument(
        "--no-queues",
        action="store_true",
        help="skip the queues (GetClusterQueueStats needs an admin token; the rest a read one)",
    )
    _common(parser)
    return _run("stats", parser.parse_args(argv), _stats)


def shaping(argv: list[str]) -> int:
    parser = _parser(
        "epoxi shaping",
        "List and clear the shaping adjustments providers' replies put in force, per (MX site, source IP).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ls|clear")
    ls = _subcommand(sub, "ls", "every adjustment in force, on every node, by site, source IP and node")
    ls.set_defaults(work=_shaping_ls)
    clear = _subcommand(
        sub, "clear", "end a site's adjustments on every node: its own limits again (exit 3: none in force)"
    )
    clear.add_argument("site", metavar="SITE", help="the site, as `epoxi shaping ls` names it")
    clear.add_argument("--ip", default="", metavar="IP", help="only this source IP's (default: every IP's)")
    clear.set_defaults(work=_shaping_clear)
    for p in (ls, clear):
        _common(p)
    args = parser.parse_args(argv)
    return _run(f"shaping {args.action}", args, args.work)
