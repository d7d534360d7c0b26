"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of messages in the proto3 JSON mapping.

Two schemas per message, because the gateway is strict in what it sends and protobuf's
``json_format`` lenient in what it takes:

* **output** (``<full name>``): exactly what ``gateway.transcode.response_json`` emits.
  lowerCamelCase ``json_name`` keys, every field without presence ``required`` (zero values are
  printed), no other keys; 64-bit integers as decimal strings, enums by name, bytes as base64,
  ``Timestamp`` as an RFC 3339 string, ``Duration`` as ``"1.5s"``, maps as objects.
* **input** (``<full name>.input``): everything ``json_format.ParseDict`` accepts, so that what
  the schema calls invalid is refused (400) and never taken. Any field may be ``null`` (unset),
  integers may also be strings, enums also numbers, and keys go by their proto name too (so
  other keys are not forbidden here; the gateway refuses unknown ones).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor

from gateway.transcode import WRAPPERS

FD = descriptor.FieldDescriptor
Schema = dict[str, Any]

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_UINT64, FD.TYPE_FIXED64}
_FLOATS = {FD.TYPE_DOUBLE, FD.TYPE_FLOAT}
_NON_FINITE = ["NaN", "Infinity", "-Infinity"]
_NULL: Schema = {"type": "null"}
INPUT_SUFFIX = ".input"


def _int_schema(kind: int) -> Schema:
    low, high = _INT_RANGES[kind]
    return {"type": "integer", "minimum": low, "maximum": high}


def _format(kind: int) -> str:
    return {
        FD.TYPE_INT32: "int32",
        FD.TYPE_SINT32: "int32",
        FD.TYPE_SFIXED32: "int32",
        FD.TYPE_UINT32: "uint32",
        FD.TYPE_FIXED32: "uint32",
        FD.TYPE_INT64: "int64",
        FD.TYPE_SINT64: "int64",
        FD.TYPE_SFIXED64: "int64",
        FD.TYPE_UINT64: "uint64",
        FD.TYPE_FIXED64: "uint64",
        FD.TYPE_DOUBLE: "double",
        FD.TYPE_FLOAT: "float",
    }[kind]


def scalar_input(field: FD) -> Schema:
    """What ``json_format`` takes for one value of a scalar or enum field (not repeated)."""
    kind = field.type
    if kind in _INT_RANGES:
        number = {**_int_schema(kind), "format": _format(kind)}
        return {"anyOf": [number, {"type": "string", "description": "the integer in decimal"}]}
    if kind in _FLOATS:
        return {"anyOf": [{"type": "number", "format": _format(kind)}, {"type": "string"}]}
    if kind == FD.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FD.TYPE_BYTES:
        return {"type": "string", "format": "byte", "description": "base64"}
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        # json_format also takes a number (proto3 enums are open) or a string holding one.
        return {
            "anyOf": [
                {"type": "string", "enum": [v.name for v in field.enum_type.values]},
                {"type": "number"},
                {"type": "string", "pattern": "^[-+]?[0-9]+$"},
            ]
        }
    return {"type": "string"}


def scalar_output(field: FD) -> Schema:
    """What ``json_format.MessageToDict`` emits for one value of a scalar or enum field."""
    kind = field.type
    if kind in _INT64:
        pattern = "^[0-9]+$" if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64) else "^-?[0-9]+$"
        return {"type": "string", "format": _format(kind), "pattern": pattern}
    if kind in _INT_RANGES:
        return {**_int_schema(kind), "format": _format(kind)}
    if kind in _FLOATS:
        return {"anyOf": [{"type": "number", "format": _format(kind)}, {"enum": _NON_FINITE}]}
    if kind == FD.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FD.TYPE_BYTES:
        return {"type": "string", "format": "byte", "contentEncoding": "base64"}
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    return {"type": "string"}


def _well_known(message_type: descriptor.Descriptor, output: bool) -> Schema | None:
    """The JSON form of a well-known type that is not an object of its fields."""
    name = message_type.full_name
    if name == "google.protobuf.Timestamp":
        return {"type": "string", "format": "date-time"}
    if name == "google.protobuf.Duration":
        if output:
            return {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$", "example": "1.5s"}
        return {"type": "string", "example": "1.5s"}
    if name == "google.protobuf.FieldMask":
        return {"type": "string"}
    if name in WRAPPERS:
        value = message_type.fields_by_name["value"]
        return scalar_output(value) if output else scalar_input(value)
    if name == "google.protobuf.Struct":
        return {"type": "object"}
    if name == "google.protobuf.ListValue":
        return {"type": "array"}
    if name == "google.protobuf.Value":
        return {}
    if name == "google.protobuf.Any":
        return {
            "type": "object",
            "properties": {"@type": {"type": "string"}},
            "required": ["@type"],
            "additionalProperties": True,
        }
    return None


class Schemas:
    """Builds the component schemas a document refers to, each once."""

    def __init__(self, ref_prefix: str = "#/components/schemas/") -> None:
        self.components: dict[str, Schema] = {}
        self.ref_prefix = ref_prefix

    def output(self, message_type: descriptor.Descriptor) -> Schema:
        return self._message(message_type, output=True)

    def input(self, message_type: descriptor.Descriptor) -> Schema:
        return self._message(message_type, output=False)

    def field_output(self, field: FD) -> Schema:
        """What a response shows for ``field`` (``response_body: "field"``)."""
        return self._field(field, output=True)

    def field_input(self, field: FD) -> Schema:
        """What a request body may give for ``field`` (``body: "field"``), including null."""
        return self._nullable(self._field(field, output=False))

    def _message(self, message_type: descriptor.Descriptor, output: bool) -> Schema:
        known = _well_known(message_type, output)
        if known is not None:
            return known
        name = message_type.full_name + ("" if output else INPUT_SUFFIX)
        if name not in self.components:
            self.components[name] = {}  # placed first: a message may refer to itself
            self.components[name] = self._object(message_type, output)
        return {"$ref": self.ref_prefix + name}

    def _object(self, message_type: descriptor.Descriptor, output: bool) -> Schema:
        properties = {}
        required = []
        for field in message_type.fields:
            schema = self._field(field, output)
            if output:
                if not field.has_presence:
                    required.append(field.json_name)
                properties[field.json_name] = schema
            else:
                properties[field.json_name] = self._nullable(schema)
        out: Schema = {"type": "object", "title": message_type.full_name, "properties": properties}
        if output:
            out["required"] = required
            out["additionalProperties"] = False
        return out

    def _field(self, field: FD, output: bool) -> Schema:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value, output)}
        if field.is_repeated:
            return {"type": "array", "items": self._single(field, output)}
        return self._single(field, output)

    def _single(self, field: FD, output: bool) -> Schema:
        if field.message_type is not None:
            return self._message(field.message_type, output)
        return scalar_output(field) if output else scalar_input(field)

    @staticmethod
    def _nullable(schema: Schema) -> Schema:
        return {"anyOf": [schema, _NULL]}
