"""The OpenAPI 3.1 document of a route table, from the same annotations and descriptors the
gateway routes by: nothing in it is written per RPC.

* one operation per route (``Service_Method``; an additional binding adds ``2``, ``3``, ...);
* path parameters for the template's variables, and query parameters for the request fields
  neither the path nor the body binds, flattened as grpc-gateway does (scalars, enums, repeated
  scalars and the scalar well-known types, dotted through nested messages by lowerCamelCase
  name; maps and repeated messages cannot be set from a query string);
* the request body: the request message (``body: "*"``) or one field of it, as JSON; a
  ``google.api.HttpBody`` field as the raw bytes of the route's media types;
* the 200 response in the proto3 JSON mapping (``gateway.schemas``), the ``response_body``
  field when the route names one, and every other response a ``google.rpc.Status``;
* ``X-Request-Id`` on every response;
* bearer security from each method's ``epoxi.v1.scope``: optional for SCOPE_READ (the operator
  may leave reading open), required otherwise; a method with no scope is open.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import descriptor
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2

from epoxi.v1 import access_pb2
from gateway.routes import Route, RouteTable, resolve_field
from gateway.schemas import FD, Schema, Schemas, scalar_output

VERSION = "3.1.0"
_VARIABLE = re.compile(r"\{([^}=]+)(?:=[^}]*)?\}")
_SCALAR_WKT = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string"},
}
_WRAPPER_SUFFIX = "Value"
BEARER = "bearerAuth"
_STATUS_REF = {"$ref": "#/components/responses/Status"}
_REQUEST_ID_REF = {"$ref": "#/components/headers/X-Request-Id"}


def document(
    routes: RouteTable,
    health_path: str,
    openapi_path: str,
    title: str = "Epoxi mesh HTTP API",
    version: str = "v1",
) -> dict[str, Any]:
    schemas = Schemas()
    paths: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for route in routes.routes:
        base = f"{route.method.containing_service.name}_{route.method.name}"
        seen[base] = seen.get(base, 0) + 1
        operation_id = base if seen[base] == 1 else f"{base}{seen[base]}"
        paths.setdefault(openapi_path_of(route), {})[route.http_method.lower()] = _operation(
            route, operation_id, schemas
        )
    health = schemas.output(health_pb2.HealthCheckResponse.DESCRIPTOR)
    paths[health_path] = {
        "get": {
            "operationId": "Gateway_Health",
            "tags": ["Gateway"],
            "summary": "Whether the monitor answers gRPC health SERVING (200) or not (503, saying why)",
            "security": [],
            "responses": {"200": _json_response("the monitor is serving", health), "default": _STATUS_REF},
        }
    }
    paths[openapi_path] = {
        "get": {
            "operationId": "Gateway_OpenApi",
            "tags": ["Gateway"],
            "summary": "This document",
            "security": [],
            "responses": {
                "200": _json_response("the OpenAPI document", {"type": "object"}),
                "default": _STATUS_REF,
            },
        }
    }
    status = schemas.output(status_pb2.Status.DESCRIPTOR)
    return {
        "openapi": VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "Every route is a gRPC method's google.api.http annotation; errors are "
            "google.rpc.Status bodies with the HTTP status grpc-gateway gives their code.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "responses": {
                "Status": {
                    "description": "an error: a google.rpc.Status",
                    "headers": {"X-Request-Id": _REQUEST_ID_REF},
                    "content": {"application/json": {"schema": status}},
                }
            },
            "headers": {
                "X-Request-Id": {
                    "description": "the request's X-Request-Id, or one the gateway made up for it",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_path_of(route: Route) -> str:
    """``/v1/{thing.name=things/*}`` → ``/v1/{thing.name}``."""
    return _VARIABLE.sub(lambda m: "{" + m.group(1) + "}", route.template.source)


def _json_response(description: str, schema: Schema) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": _REQUEST_ID_REF},
        "content": {"application/json": {"schema": schema}},
    }


def _operation(route: Route, operation_id: str, schemas: Schemas) -> dict[str, Any]:
    method = route.method
    scope = method.GetOptions().Extensions[access_pb2.scope]
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "tags": [method.containing_service.name],
        "summary": f"{method.containing_service.full_name}.{method.name}",
        "parameters": _path_parameters(route) + _query_parameters(route),
    }
    if scope == access_pb2.SCOPE_UNSPECIFIED:
        operation["security"] = []
    else:
        name = access_pb2.Scope.Name(scope)
        operation["x-epoxi-scope"] = name
        operation["description"] = f"Needs a bearer token with {name}."
        operation["security"] = [{BEARER: []}]
        if scope == access_pb2.SCOPE_READ:
            operation["description"] = (
                f"{name}: open when the operator leaves reading open, else a bearer token."
            )
            operation["security"] = [{}, {BEARER: []}]
    if route.body:
        operation["requestBody"] = _request_body(route, schemas)
    output = method.output_type
    if route.response_body:
        field = output.fields_by_name[route.response_body]
        schema = schemas.field_output(field)
    else:
        schema = schemas.output(output)
    operation["responses"] = {
        "200": _json_response(f"{output.full_name} as JSON", schema),
        "default": _STATUS_REF,
    }
    return operation


def _request_body(route: Route, schemas: Schemas) -> dict[str, Any]:
    if route.http_body is not None:
        types = route.accepts or ("application/octet-stream",)
        binary = {"type": "string", "format": "binary"}
        return {
            "required": True,
            "description": f"the raw body ({', '.join(route.accepts) or 'any media type'})",
            "content": {t: {"schema": binary} for t in types},
        }
    request = route.method.input_type
    if route.body == "*":
        schema = schemas.input(request)
    else:
        schema = schemas.field_input(request.fields_by_name[route.body])
    # An empty body is an empty request message.
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _path_parameters(route: Route) -> list[dict[str, Any]]:
    out = []
    for variable in route.template.variables:
        field = resolve_field(route.method.input_type, variable.field_path)
        schema = _query_schema(field) or {"type": "string"}
        if schema.get("type") == "string":
            schema = {**schema, "minLength": 1}  # a variable never binds an empty segment
        out.append({"name": variable.field_path, "in": "path", "required": True, "schema": schema})
    return out


def _query_parameters(route: Route) -> list[dict[str, Any]]:
    if route.body == "*":
        return []
    bound = route.bound_fields
    out: list[dict[str, Any]] = []

    def walk(
        message_type: descriptor.Descriptor, proto_prefix: str, json_prefix: str, trail: set[str]
    ) -> None:
        for field in message_type.fields:
            proto_path = proto_prefix + field.name
            if proto_path in bound or any(proto_path.startswith(b + ".") for b in bound):
                continue
            json_path = json_prefix + field.json_name
            schema = _query_schema(field)
            if schema is not None:
                if field.is_repeated:
                    out.append(
                        {
                            "name": json_path,
                            "in": "query",
                            "style": "form",
                            "explode": True,
                            "schema": {"type": "array", "items": schema},
                        }
                    )
                else:
                    out.append({"name": json_path, "in": "query", "schema": schema})
                continue
            nested = field.message_type
            if nested is None or field.is_repeated or nested.full_name in trail:
                continue  # maps, repeated messages and recursion cannot be set from a query
            walk(nested, proto_path + ".", json_path + ".", trail | {nested.full_name})

    walk(route.method.input_type, "", "", {route.method.input_type.full_name})
    return out


def _query_schema(field: FD) -> Schema | None:
    """A query (or path) parameter's schema for ``field``; None when a query cannot set it."""
    message_type = field.message_type
    if message_type is not None:
        name = message_type.full_name
        if name in _SCALAR_WKT:
            return dict(_SCALAR_WKT[name])
        if (
            name.startswith("google.protobuf.")
            and name.endswith(_WRAPPER_SUFFIX)
            and name != "google.protobuf.Value"
        ):
            return _query_schema(message_type.fields_by_name["value"])
        return None
    if field.type == FD.TYPE_ENUM:
        assert field.enum_type is not None
        names = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        return {"anyOf": [names, {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}]}
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return {"type": "number"}
    schema = scalar_output(field)
    if schema.get("type") == "string" and "pattern" in schema:  # 64-bit integers: a number here
        low, high = (0, 2**64 - 1) if schema["format"] == "uint64" else (-(2**63), 2**63 - 1)
        return {"type": "integer", "format": schema["format"], "minimum": low, "maximum": high}
    return schema
