"""The OpenAPI document: what it says of each route, and that what the gateway emits for real
messages is valid against the schemas it gives for them (JSON Schema 2020-12)."""

from __future__ import annotations

from typing import Any

import aiohttp
import jsonschema_rs
import pytest
from google.protobuf import message

from epoxi.v1 import monitor_pb2, node_pb2, pipeline_pb2, queue_pb2, router_pb2, shaping_pb2
from gateway import openapi
from gateway.app import HEALTH_PATH, OPENAPI_PATH, Gateway
from gateway.main import MEDIA_TYPES, SERVICES
from gateway.routes import RouteTable
from gateway.transcode import response_json
from tests.gateway.support import ECHO_MEDIA_TYPES, echo_service

DOC = openapi.document(RouteTable.from_services(SERVICES, MEDIA_TYPES), HEALTH_PATH, OPENAPI_PATH)
ECHO = openapi.document(
    RouteTable.from_services([echo_service()], ECHO_MEDIA_TYPES), HEALTH_PATH, OPENAPI_PATH
)


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    return jsonschema_rs.Draft202012Validator(
        {**schema, "components": doc["components"]}, validate_formats=True
    )


def _response_schema(doc: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    schema: dict[str, Any] = doc["paths"][path][method]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    return schema


def test_every_route_is_an_operation_with_a_unique_id() -> None:
    routes = RouteTable.from_services(SERVICES, MEDIA_TYPES).routes
    operations = [op for item in DOC["paths"].values() for op in item.values()]
    assert len(operations) == len(routes) + 2  # and /healthz, /openapi.json
    ids = [op["operationId"] for op in operations]
    assert len(set(ids)) == len(ids)
    assert DOC["paths"]["/admin/pipelines:rebalance"]["post"]["operationId"] == "MonitorService_Rebalance"
    assert DOC["openapi"] == "3.1.0"
    # An additional binding is an operation of its own.
    assert ECHO["paths"]["/v1/items/{name}"]["get"]["operationId"] == "EchoService_GetThing2"


def test_path_and_query_parameters() -> None:
    listing = DOC["paths"]["/admin/queues/{routing_key}/messages"]["get"]
    assert [(p["name"], p["in"]) for p in listing["parameters"]] == [
        ("routing_key", "path"),
        ("state", "query"),
        ("pageSize", "query"),
        ("pageToken", "query"),
    ]
    state = listing["parameters"][1]["schema"]["anyOf"][0]
    assert "DELIVERY_STATE_DEFERRED" in state["enum"]
    # Flattened through nested messages, repeated scalars exploded; path-bound fields are not queries.
    things = {p["name"]: p for p in ECHO["paths"]["/v1/shelves/{shelf.id}/things"]["get"]["parameters"]}
    assert "shelf.displayName" in things and "shelf.id" not in {
        n for n, p in things.items() if p["in"] == "query"
    }
    assert things["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert things["since"]["schema"]["format"] == "date-time"
    assert things["limit"]["schema"]["format"] == "int32"  # a wrapper: its scalar
    assert "labels" not in things and "thing.name" in things  # maps cannot be set from a query


def test_bodies() -> None:
    raw = DOC["paths"]["/v1/emails:raw"]["post"]
    assert raw["requestBody"]["content"] == {
        "message/rfc822": {"schema": {"type": "string", "format": "binary"}}
    }
    assert [p["name"] for p in raw["parameters"]] == [
        "mailFrom",
        "rcptTo",
        "delivery.ip",
        "delivery.ipPool",
        "ipPool",
    ]
    assert _response_schema(DOC, "/v1/emails:raw", "post") == {
        "$ref": "#/components/schemas/epoxi.v1.RouteEmailsResponse"
    }
    emails = DOC["paths"]["/v1/emails"]["post"]
    assert emails["parameters"] == []
    assert emails["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/epoxi.v1.RouteEmailsRequest.input"
    }
    any_type = ECHO["paths"]["/v1/uploads/{name}"]["put"]["requestBody"]["content"]
    assert list(any_type) == ["application/octet-stream"]


def test_security_follows_the_scope() -> None:
    paths = DOC["paths"]
    assert paths["/v1/pipelines"]["get"]["security"] == [{}, {"bearerAuth": []}]  # SCOPE_READ: optional
    assert paths["/admin/queues"]["get"]["security"] == [{"bearerAuth": []}]
    assert paths["/admin/queues"]["get"]["x-epoxi-scope"] == "SCOPE_ADMIN"
    assert paths["/v1/emails"]["post"]["x-epoxi-scope"] == "SCOPE_SUBMIT"
    assert paths[HEALTH_PATH]["get"]["security"] == []
    assert DOC["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    # Every error is a google.rpc.Status, with the request ID.
    assert all(
        op["responses"]["default"] == {"$ref": "#/components/responses/Status"}
        for item in paths.values()
        for op in item.values()
    )
    status = DOC["components"]["schemas"]["google.rpc.Status"]
    assert status["required"] == ["code", "message", "details"]


def test_the_proto3_json_mapping() -> None:
    schemas = DOC["components"]["schemas"]
    message_schema = schemas["epoxi.v1.QueuedMessage"]["properties"]
    assert message_schema["sizeBytes"]["type"] == "string"  # uint64
    assert message_schema["acceptedAt"] == {"type": "string", "format": "date-time"}
    assert schemas["epoxi.v1.RecipientStatus"]["properties"]["smtpCode"]["type"] == "integer"
    assert (
        schemas["epoxi.v1.PipelineStats"]["properties"]["pipelinesPerNode"]["additionalProperties"]["type"]
        == "integer"
    )
    assert schemas["epoxi.v1.Attachment.input"]["properties"]["content"]["anyOf"][0]["format"] == "byte"
    assert "messageIdHeader" in message_schema
    # Fields without presence are always printed; messages and optional fields only when set.
    assert "acceptedAt" not in schemas["epoxi.v1.QueuedMessage"]["required"]
    assert "id" in schemas["epoxi.v1.QueuedMessage"]["required"]
    assert "maxRetries" not in schemas["epoxi.v1.PipelinePolicy"]["required"]


def _queued() -> queue_pb2.QueuedMessage:
    m = queue_pb2.QueuedMessage(
        id="0" * 32,
        routing_key="gmail.com_127_0_0_2",
        size_bytes=2**63,
        subject="é",
        message_id_header="<a@b>",
    )
    m.accepted_at.FromSeconds(1_700_000_000)
    r = m.recipients.add(recipient="a@gmail.com", state=queue_pb2.DELIVERY_STATE_DEFERRED, attempts=2)
    r.next_attempt_at.FromNanoseconds(1_700_000_000_123_456_789)
    return m


def _adjustment() -> shaping_pb2.ShapingAdjustment:
    a = shaping_pb2.ShapingAdjustment(
        site="google",
        source_ip="192.0.2.1",
        node="n1",
        rule="gmail-rate-limited",
        action=shaping_pb2.SHAPING_ACTION_THROTTLE,
        reply="421 4.7.28 slow down",
        factor=0.25,
        max_connections=2,
        allowed_messages=5,
        routing_keys=["gmail.com_192_0_2_1"],
    )
    a.until.FromSeconds(1_700_000_600)
    a.message_interval.FromSeconds(1)
    return a


SAMPLES: list[tuple[str, str, message.Message]] = [
    (
        "get",
        "/admin/messages/{message_id}",
        monitor_pb2.GetQueuedMessageResponse(
            node="n1",
            message=_queued(),
            attempts=[queue_pb2.DeliveryAttempt(recipient="a@gmail.com", attempt=1)],
        ),
    ),
    ("get", "/admin/messages/{message_id}", monitor_pb2.GetQueuedMessageResponse()),
    (
        "get",
        "/admin/queues",
        monitor_pb2.GetClusterQueueStatsResponse(
            nodes={"n1": node_pb2.GetQueueStatsResponse(pipelines=[queue_pb2.QueueStats(routing_key="k")])},
            totals=pipeline_pb2.PipelineCounters(queued=3),
            unreachable_nodes=[monitor_pb2.UnreachableNode(node="n2", error_code="UNAVAILABLE")],
        ),
    ),
    ("get", "/admin/shaping", monitor_pb2.ListClusterShapingResponse(adjustments=[_adjustment()])),
    (
        "post",
        "/admin/shaping:clear",
        monitor_pb2.ClearClusterShapingResponse(
            cleared=[_adjustment()],
            unreachable_nodes=[monitor_pb2.UnreachableNode(node="n2", error_code="UNAVAILABLE")],
        ),
    ),
    (
        "post",
        "/admin/pipelines",
        monitor_pb2.StartPipelineOptimalResponse(
            pipeline=pipeline_pb2.PipelineInfo(
                policy=pipeline_pb2.PipelinePolicy(max_retries=0), status=pipeline_pb2.PIPELINE_STATUS_RUNNING
            )
        ),
    ),
    (
        "get",
        "/admin/pipelines",
        monitor_pb2.GetClusterStatsResponse(nodes=[node_pb2.NodeInfo(load=2**64 - 1)]),
    ),
    (
        "post",
        "/v1/emails",
        router_pb2.RouteEmailsResponse(batches=[router_pb2.BatchResult(message_ids=["x"])]),
    ),
]


@pytest.mark.parametrize(("method", "path", "response"), SAMPLES)
def test_what_the_gateway_emits_is_valid_against_the_document(
    method: str, path: str, response: message.Message
) -> None:
    route = next(
        r
        for r in RouteTable.from_services(SERVICES).routes
        if openapi.openapi_path_of(r) == path and r.http_method == method.upper()
    )
    body = response_json(response, route.response_body)
    _validator(DOC, _response_schema(DOC, path, method)).validate(body)


def test_the_raw_route_emits_the_summary_even_when_unset() -> None:
    body = response_json(router_pb2.RouteRawEmailResponse(), "summary")
    assert body["totalEmails"] == 0
    _validator(DOC, _response_schema(DOC, "/v1/emails:raw", "post")).validate(body)


def test_a_drifting_response_is_invalid() -> None:
    validator = _validator(DOC, _response_schema(DOC, "/admin/queues"))
    assert not validator.is_valid(
        {"nodes": {}, "unreachableNodes": [], "totals": {"queued": 3}}
    )  # a uint64 as a number
    assert not validator.is_valid({"nodes": {}, "unreachableNodes": [], "extra": 1})


async def test_the_gateway_serves_it(echo_gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{echo_gateway.address}{OPENAPI_PATH}") as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == ECHO
