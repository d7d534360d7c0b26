from __future__ import annotations

from typing import Any

import pytest
from google.api import http_pb2
from google.protobuf import json_format

from epoxi.v1 import monitor_pb2
from gateway.main import MEDIA_TYPES, SERVICES
from gateway.routes import (
    Kind,
    Match,
    MethodNotAllowed,
    NoRoute,
    RouteTable,
    Variable,
    _route,
    parse_template,
)
from gateway.transcode import BadRequest, build_request
from tests.gateway.support import echo_service

MONITOR = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"]


def test_parse_template_with_literal_and_variable() -> None:
    t = parse_template("/admin/pipelines/{routing_key}")
    assert [s.kind for s in t.segments] == [Kind.LITERAL, Kind.LITERAL, Kind.STAR]
    assert t.variables == (Variable("routing_key", 2, 3),)
    assert t.verb == ""


def test_parse_template_with_pattern_double_star_and_verb() -> None:
    assert parse_template("/v1/{thing.name=things/*}").variables == (Variable("thing.name", 1, 3),)
    assert parse_template("/v1/files/{path=**}").variables == (Variable("path", 2, None),)
    assert parse_template("/v1/things/{name}:archive").verb == "archive"


@pytest.mark.parametrize(
    "template",
    ["v1/things", "/v1/{name", "/v1/name}", "/v1/**/x", "/v1/{a}/{a}", "/v1/x:", "/v1//x", "/v1/{a-b}"],
)
def test_malformed_templates_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="path template"):
        parse_template(template)


def test_the_mesh_routes_come_from_the_annotations() -> None:
    table = RouteTable.from_services(SERVICES, MEDIA_TYPES)
    assert sorted((r.http_method, r.template.source, r.method.name) for r in table.routes) == [
        ("DELETE", "/admin/pipelines/{routing_key}", "StopPipelineByRoutingKey"),
        ("GET", "/admin/messages/{message_id}", "GetQueuedMessage"),
        ("GET", "/admin/pipelines", "GetClusterStats"),
        ("GET", "/admin/pipelines/health", "HealthCheckAll"),
        ("GET", "/admin/pipelines/{routing_key}", "HealthCheckRoutingKey"),
        ("GET", "/admin/queues", "GetClusterQueueStats"),
        ("GET", "/admin/queues/{routing_key}/messages", "ListQueuedMessages"),
        ("GET", "/admin/shaping", "ListClusterShaping"),
        ("GET", "/v1/pipelines", "FindAllPipelines"),
        ("GET", "/v1/pipelines/{routing_key}", "FindPipelinesByRoutingKey"),
        ("GET", "/v1/pipelines:stats", "GetPipelineStats"),
        ("GET", "/v1/routing-keys/{routing_key}/node", "FindNodeForRoutingKey"),
        ("POST", "/admin/pipelines", "StartPipelineOptimal"),
        ("POST", "/admin/pipelines:rebalance", "Rebalance"),
        ("POST", "/admin/shaping:clear", "ClearClusterShaping"),
        ("POST", "/v1/emails", "RouteEmails"),
        ("POST", "/v1/emails:raw", "RouteRawEmail"),
    ]
    raw = table.match("POST", "/v1/emails:raw").route
    assert raw.http_body is not None and raw.http_body.name == "message"
    assert (raw.accepts, raw.response_body) == (("message/rfc822",), "summary")
    assert table.match("POST", "/v1/emails").route.http_body is None


def test_discovery_routes_keep_the_verb_apart_from_the_variable() -> None:
    table = RouteTable.from_services([MONITOR])
    assert table.match("GET", "/v1/pipelines:stats").route.method.name == "GetPipelineStats"
    assert table.match("GET", "/v1/pipelines").route.method.name == "FindAllPipelines"
    m = table.match("GET", "/v1/pipelines/gmail.com_192_168_1_1")
    assert (m.route.method.name, m.params) == (
        "FindPipelinesByRoutingKey",
        {"routing_key": "gmail.com_192_168_1_1"},
    )
    m = table.match("GET", "/v1/routing-keys/gmail.com_192_168_1_1/node")
    assert (m.route.method.name, m.params) == (
        "FindNodeForRoutingKey",
        {"routing_key": "gmail.com_192_168_1_1"},
    )
    with pytest.raises(NoRoute):
        table.match("GET", "/v1/routing-keys/gmail.com_192_168_1_1")


@pytest.mark.parametrize("reverse", [False, True])
def test_literal_segment_beats_variable_in_any_order(reverse: bool) -> None:
    routes = RouteTable.from_services([MONITOR]).routes
    table = RouteTable(reversed(routes) if reverse else routes)
    assert table.match("GET", "/admin/pipelines/health").route.method.name == "HealthCheckAll"
    m = table.match("GET", "/admin/pipelines/gmail.com_192_168_1_1")
    assert (m.route.method.name, m.params) == (
        "HealthCheckRoutingKey",
        {"routing_key": "gmail.com_192_168_1_1"},
    )
    assert table.match("GET", "/admin/pipelines").route.method.name == "GetClusterStats"


def test_unknown_path_and_wrong_method() -> None:
    table = RouteTable.from_services([MONITOR])
    with pytest.raises(NoRoute):
        table.match("GET", "/admin/nothing")
    with pytest.raises(NoRoute):
        table.match("GET", "/admin/pipelines/")  # a variable never binds an empty segment
    with pytest.raises(NoRoute):
        table.match("GET", "/admin/pipelines/a/b")
    with pytest.raises(MethodNotAllowed) as e:
        table.match("PUT", "/admin/pipelines/health")
    assert e.value.allowed == ["DELETE", "GET"]


def _match(method: str, path: str) -> tuple[str, dict[str, str]]:
    m = RouteTable.from_services([echo_service()]).match(method, path)
    return m.route.method.name, m.params


def test_echo_bindings() -> None:
    assert _match("GET", "/v1/things/special") == ("GetSpecial", {})
    assert _match("GET", "/v1/things/abc") == ("GetThing", {"name": "abc"})
    assert _match("GET", "/v1/items/abc") == ("GetThing", {"name": "abc"})  # additional_bindings
    assert _match("GET", "/v1/things/a%2Fb%20c") == ("GetThing", {"name": "a/b c"})
    assert _match("GET", "/v1/shelves/s1/things") == ("ListThings", {"shelf.id": "s1"})
    assert _match("PATCH", "/v1/things/abc") == ("UpdateThing", {"thing.name": "things/abc"})
    assert _match("PUT", "/v1/things/abc") == ("ReplaceThing", {"name": "abc"})
    assert _match("DELETE", "/v1/things/abc") == ("DeleteThing", {"name": "abc"})
    assert _match("POST", "/v1/things/abc:archive") == ("ArchiveThing", {"name": "abc"})
    assert _match("GET", "/v1/files/a/b/c.txt") == ("GetFile", {"path": "a/b/c.txt"})
    with pytest.raises(MethodNotAllowed) as e:
        _match("POST", "/v1/things/abc")
    assert e.value.allowed == ["DELETE", "GET", "PATCH", "PUT"]


def test_unannotated_methods_have_no_route() -> None:
    table = RouteTable.from_services([echo_service()])
    assert "Unannotated" not in {r.method.name for r in table.routes}


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        (http_pb2.HttpRule(get="/v1/{nope}"), "unknown field"),
        (http_pb2.HttpRule(get="/v1/{tags}"), "repeated field"),
        (http_pb2.HttpRule(post="/v1/x", body="nope"), "not a top-level request field"),
        (http_pb2.HttpRule(get="/v1/x", response_body="nope"), "not a response field"),
        (http_pb2.HttpRule(), "no pattern"),
    ],
)
def test_bad_annotations_fail_at_startup(rule: http_pb2.HttpRule, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        _route(echo_service().methods_by_name["GetThing"], rule)


def _request(
    method: str, path: str, query: list[tuple[str, str]] | None = None, body: bytes = b""
) -> dict[str, Any]:
    match: Match = RouteTable.from_services([echo_service()]).match(method, path)
    return json_format.MessageToDict(build_request(match, query or [], body))


def test_query_parameters_fill_unbound_fields() -> None:
    query = [
        ("tags", "a"),
        ("tags", "b"),
        ("page_size", "5"),
        ("kind", "KIND_DISC"),
        ("verbose", "true"),
        ("since", "2024-01-02T03:04:05Z"),
        ("shelf.displayName", "Top"),
        ("limit", "7"),
        ("ratio", "0.5"),
        ("weight", "18446744073709551615"),
        ("shelf.id", "ignored: bound by the path"),
        ("no_such_field", "ignored like grpc-gateway does"),
    ]
    assert _request("GET", "/v1/shelves/s1/things", query) == {
        "shelf": {"id": "s1", "displayName": "Top"},
        "tags": ["a", "b"],
        "pageSize": 5,
        "kind": "KIND_DISC",
        "verbose": True,
        "since": "2024-01-02T03:04:05Z",
        "limit": 7,
        "ratio": 0.5,
        "weight": "18446744073709551615",
    }
    assert _request("GET", "/v1/things/x", [("kind", "2")])["kind"] == "KIND_DISC"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("page_size", "five", "query parameter 'page_size'"),
        ("verbose", "maybe", "expected true or false"),
        ("kind", "KIND_NOPE", "query parameter 'kind'"),
        ("since", "yesterday", "query parameter 'since'"),
        ("ratio", "half", "not a number"),
        ("thing", "x", "is a message"),
        ("labels", "x", "map field"),
        ("labels.key", "x", "'labels' is repeated"),
        ("labels.value", "x", "'labels' is repeated"),
    ],
)
def test_bad_query_values_are_bad_requests(key: str, value: str, error: str) -> None:
    with pytest.raises(BadRequest, match=error):
        _request("GET", "/v1/things/x", [(key, value)])


def test_body_star_fills_the_request_and_path_overrides() -> None:
    body = b'{"name": "from-body", "thing": {"size": 3, "labels": ["x"]}, "pageSize": 2}'
    assert _request("POST", "/v1/things/abc:archive", [("verbose", "true")], body) == {
        "name": "abc",
        "thing": {"size": 3, "labels": ["x"]},
        "pageSize": 2,
    }


def test_body_field_fills_that_field_and_query_the_rest() -> None:
    assert _request("PATCH", "/v1/things/abc", [("page_size", "4"), ("thing.size", "9")], b'{"size": 2}') == {
        "thing": {"name": "things/abc", "size": 2},
        "pageSize": 4,
    }


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"nope": 1}', "nope"),
        (b'{"pageSize": "many"}', "pageSize"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_bodies_are_bad_requests(body: bytes, error: str) -> None:
    with pytest.raises(BadRequest, match=error):
        _request("POST", "/v1/things", body=body)
