"""HTTP request → request message, response message → JSON, as grpc-gateway transcodes them.

The body (a JSON document as ``gateway.body`` accepts it; only an object fills a message) fills
the whole request (``body: "*"``) or one top-level field (``body: "field"``); when that field is a
``google.api.HttpBody`` the raw bytes are its ``data`` and the Content-Type its
``content_type``, as grpc-gateway passes them; path bindings then
set their fields; query parameters set the fields neither binds, by proto or
lowerCamelCase name, dotted for nested fields, repeated for repeated fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from google.protobuf import descriptor, json_format, message

from gateway import body as json_body
from gateway.routes import Match, resolve_field

FD = descriptor.FieldDescriptor

# The wrapper types: their JSON form is the wrapped value.
WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# Well-known types whose JSON form is a single string or number, so a path or query value can set them.
_SCALAR_WKT = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    *WRAPPERS,
}
_TRUE = {"true", "t", "1"}
_FALSE = {"false", "f", "0"}


class BadRequest(ValueError):
    """The HTTP request cannot be turned into the request message (HTTP 400, INVALID_ARGUMENT)."""


def build_request(
    match: Match, query: Iterable[tuple[str, str]], body: bytes, content_type: str = ""
) -> message.Message:
    route = match.route
    request = route.request_class()
    if route.http_body is not None:
        http_body = getattr(request, route.body)
        http_body.content_type = content_type
        http_body.data = body
    elif route.body:
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
        data = json_body.parse(body)
    except json_body.InvalidJSON as e:
        raise BadRequest(str(e)) from None
    request_type = _descriptor(request)
    target = request_type if body_field == "*" else request_type.fields_by_name[body_field]
    if _takes_object(target) and not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object ({_type_name(target)}), not {_json_kind(data)}")
    try:
        json_format.ParseDict(
            data if body_field == "*" else {body_field: data},
            request,
            max_recursion_depth=json_body.MAX_DEPTH + 1,  # + 1: the wrapping field just above
        )
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise BadRequest(f"request body does not fit {request_type.full_name}: {e}") from e


def _takes_object(target: descriptor.Descriptor | descriptor.FieldDescriptor) -> bool:
    """Whether only a JSON object can fill ``target``: a message, or a singular message field,
    other than the well-known types with a JSON form of their own (Timestamp, Value, ...)."""
    if isinstance(target, descriptor.FieldDescriptor):
        if target.message_type is None or target.is_repeated:
            return False
        target = target.message_type
    return not target.full_name.startswith("google.protobuf.")


def _type_name(target: descriptor.Descriptor | descriptor.FieldDescriptor) -> str:
    if isinstance(target, descriptor.FieldDescriptor):
        assert target.message_type is not None  # _takes_object holds only for message fields
        return f"{target.name}: {target.message_type.full_name}"
    return target.full_name


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return "a number"


def _canonical_path(message_type: descriptor.Descriptor, key: str) -> str:
    """``shelf.displayName`` → ``shelf.display_name``; KeyError when a name matches no field,
    BadRequest when the path goes on past a repeated or map field (its elements have no names)."""
    names: list[str] = []
    current: descriptor.Descriptor | None = message_type
    for part in key.split("."):
        if current is None:
            raise KeyError(key)
        field = resolve_field(current, part)
        names.append(field.name)
        current = field.message_type
        if field.is_repeated and current is not None and len(names) < key.count(".") + 1:
            raise BadRequest(
                f"query parameter {key!r}: {field.name!r} is repeated; its elements cannot be named"
            )
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
    if response_body:
        field = _descriptor(response).fields_by_name[response_body]
        if field.message_type is not None and not field.is_repeated:
            # Unset, it is still the (empty) message the document describes, not null.
            return response_json(getattr(response, response_body))
        doc = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        return doc[field.json_name]
    return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
