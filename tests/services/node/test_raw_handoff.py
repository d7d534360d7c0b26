"""Raw mail (Email.raw) on the node: spooled as given, handed to a peer by a stop, and delivered
byte for byte by the peer. Real nodes, a real dev registry, a real sink."""

from __future__ import annotations

from devmesh.sink import Sink
from epoxi.v1 import email_pb2, node_pb2
from tests.services.node.test_ownership import FAST, KEY
from tests.support import SOURCE_IP, Nodes, eventually

MESSAGE = (
    "From: Jörg <jorg@sender.test>\r\n"
    "To: later@example.com\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    "Message-ID: <handoff-1@sender.test>\r\n"
    "DKIM-Signature: v=1; d=sender.test;\r\n\tb=abc\r\n"
    "\r\n"
    ".leading dot\r\n"
    "8-bit body: größer\r\n"
).encode()


async def test_a_stop_hands_raw_mail_to_a_peer_that_sends_it_unchanged(nodes: Nodes, sink: Sink) -> None:
    await nodes.start("n1", SOURCE_IP, retry_base=0.2)
    await nodes.start("n2", SOURCE_IP)
    sink.replies = {"later@example.com": "451 4.3.0 try again"}
    n1 = nodes.stub("n1")
    await n1.StartPipeline(
        node_pb2.StartPipelineRequest(domain="example.com", source_ip=SOURCE_IP, policy=FAST), timeout=5
    )
    raw = email_pb2.RawMessage(mail_from="bounce@sender.test", rcpt_to=["later@example.com"], content=MESSAGE)
    email = email_pb2.Email(raw=raw, message_id="<handoff-1@sender.test>")
    first = await n1.EnqueueBatch(node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email]), timeout=5)
    [spool_id] = first.message_ids

    async def deferred() -> bool:
        stats: node_pb2.GetQueueStatsResponse = await n1.GetQueueStats(
            node_pb2.GetQueueStatsRequest(routing_key=KEY), timeout=5
        )
        return stats.totals.deferred == 1

    await eventually(deferred)
    stop = await n1.StopPipeline(node_pb2.StopPipelineRequest(routing_key=KEY), timeout=10)
    assert (stop.messages_handed_off, stop.handed_to_node) == (1, "n2")
    moved = await nodes.stub("n2").GetMessage(node_pb2.GetMessageRequest(message_id=spool_id), timeout=5)
    assert (moved.message.subject, moved.message.message_id_header) == ("Grüße", "<handoff-1@sender.test>")
    sink.replies = {}
    [m] = await sink.wait_for(1)
    assert (m.data, m.mail_from, m.rcpt_tos) == (MESSAGE, "bounce@sender.test", ["later@example.com"])
