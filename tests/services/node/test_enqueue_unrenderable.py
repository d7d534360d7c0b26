"""EnqueueBatch over real gRPC with an email that rendering cannot handle: INVALID_ARGUMENT naming
it, refused on purpose (``epoxi-refused``), nothing of the batch spooled, and no traceback logged.

Rendering raised on these once validation had passed them; whether validation or rendering now
catches them, the answer is the same."""

from __future__ import annotations

import logging

import grpc
import pytest

from epoxi.v1 import email_pb2, node_pb2
from tests.services.node.support import KEY, Stub, email

UNRENDERABLE = [
    pytest.param(email("b@example.com", message_id="<>"), id="empty message-id"),
    pytest.param(
        email("b@example.com", headers=[email_pb2.Header(name="Content-Type", value="multipart/mixed")]),
        id="multipart content-type over a text body",
    ),
]


@pytest.mark.parametrize("bad", UNRENDERABLE)
async def test_an_unrenderable_email_refuses_its_batch(
    stub: Stub, bad: email_pb2.Email, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = node_pb2.EnqueueBatchRequest(routing_key=KEY, emails=[email("a@example.com"), bad])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EnqueueBatch(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "emails[1]" in (err.value.details() or "") and "emails[0]" not in (err.value.details() or "")
    assert ("epoxi-refused", "1") in tuple(err.value.trailing_metadata() or ())
    stats = await stub.GetQueueStats(node_pb2.GetQueueStatsRequest(), timeout=5)
    assert stats.totals == node_pb2.GetQueueStatsResponse().totals  # not even emails[0]
    assert [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()] == []
