"""HTTP request → request message, response message → JSON, as grpc-gateway transcodes them.

The body fills the whole request (``body: "*"``) or one top-level field (``body: "field"``); path
bindings then set their fields; query parameters set the fields neither binds, by proto or
lowerCamelCase name, dotted for nested fields, repeated for repeated fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from google.protobuf import descriptor, json_format, message

from gateway.routes import Match, resolve_field

FD = descriptor.FieldDescriptor

# Well-known types whose JSON form is a single string or number, so a path or query value can set them.
_SCALAR_WKT = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}
_TRUE = {"true", "t", "1"}
_FALSE = {"false", "f", "0"}


class BadRequest(ValueError):
    """The HTTP request cannot be turned into the request message (HTTP 400, INVALID_ARGUMENT)."""


def build_request(match: Match, query: Iterable[tuple[str, str]], body: bytes) -> message.Message:
    route = match.route
    request = route.request_class()
    if route.body:
        _parse_body(request, route.body, body)
    for field_path, value in match.params.items():
        _set(request, field_path, value, f"path parameter {field_path!r}")
    if route.body != "*":
        bound = {_canonical_path(_descriptor(request), f) for f in route.bound_fields if f != "*"}
        for key, value in query:
            try:
                field_path = _canonical_path(_descriptor(request), key)
            except KeyError:
                continue  # grpc-gateway ignores parameters that name no field
            if field_path in bound or any(field_path.startswith(b + ".") for b in bound):
                continue
            _set(request, field_path, value, f"query parameter {key!r}")
    return request


def _parse_body(request: message.Message, body_field: str, body: bytes) -> None:
    if not body.strip():
        return
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    try:
        if body_field == "*":
            json_format.ParseDict(data, request)
        else:
            json_format.ParseDict({body_field: data}, request)
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise BadRequest(f"request body does not fit {_descriptor(request).full_name}: {e}") from e


def _canonical_path(message_type: descriptor.Descriptor, key: str) -> str:
    """``shelf.displayName`` → ``shelf.display_name``; KeyError when a name matches no field."""
    names: list[str] = []
    current: descriptor.Descriptor | None = message_type
    for part in key.split("."):
        if current is None:
            raise KeyError(key)
        field = resolve_field(current, part)
        names.append(field.name)
        current = field.message_type
    return ".".join(names)


def _set(request: message.Message, field_path: str, raw: str, what: str) -> None:
    """Set (or, for a repeated field, append) the field at ``field_path`` from a string."""
    field = resolve_field(_descriptor(request), field_path)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        raise BadRequest(f"{what}: map field {field.name!r} cannot be set from a path or query string")
    if field.message_type is not None and field.message_type.full_name not in _SCALAR_WKT:
        raise BadRequest(f"{what}: {field.name!r} is a message; set its fields as {field_path}.<field>")
    value = _json_value(field, raw, what)
    if field.is_repeated:
        value = [value]
    doc: Any = value
    for name in reversed(field_path.split(".")):
        doc = {name: doc}
    partial = type(request)()
    try:
        json_format.ParseDict(doc, partial)
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise BadRequest(f"{what}: invalid value {raw!r}: {e}") from e
    request.MergeFrom(partial)


def _json_value(field: descriptor.FieldDescriptor, raw: str, what: str) -> Any:
    """The JSON value json_format expects for ``raw`` in ``field``."""
    leaf = field
    if field.message_type is not None and field.message_type.full_name.endswith("Value"):  # in _SCALAR_WKT
        leaf = field.message_type.fields_by_name["value"]  # wrappers: the wrapped scalar's form
    if leaf.type == FD.TYPE_BOOL:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise BadRequest(f"{what}: invalid value {raw!r}: expected true or false")
    if leaf.type == FD.TYPE_ENUM and raw.lstrip("-").isdigit():
        return int(raw)
    if leaf.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT) and raw not in ("NaN", "Infinity", "-Infinity"):
        try:
            return float(raw)
        except ValueError as e:
            raise BadRequest(f"{what}: invalid value {raw!r}: not a number") from e
    return raw


def _descriptor(msg: message.Message) -> descriptor.Descriptor:
    return cast(descriptor.Descriptor, msg.DESCRIPTOR)


def response_json(response: message.Message, response_body: str = "") -> Any:
    """The JSON document for a response: lowerCamelCase names, zero values shown."""
    doc = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
    if response_body:
        return doc.get(_descriptor(response).fields_by_name[response_body].json_name)
    return doc
