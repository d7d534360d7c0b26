"""The route table: ``google.api.http`` annotations → (HTTP method, path template) → gRPC method.

Path templates follow ``google/api/http.proto``::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

When several templates match a path the most specific wins, segment by segment: a literal
beats a single-segment wildcard, which beats ``**``; so ``/admin/pipelines/health`` is its own
route and not ``/admin/pipelines/{routing_key}`` with ``routing_key="health"``.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message, message_factory

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
HTTP_BODY = "google.api.HttpBody"


class Kind(IntEnum):
    """Segment kinds, in order of precedence (lower wins)."""

    LITERAL = 0
    STAR = 1
    DOUBLE_STAR = 2


@dataclass(frozen=True)
class Segment:
    kind: Kind
    text: str = ""


@dataclass(frozen=True)
class Variable:
    """A path binding: ``field_path`` takes path segments ``[start, end)``; ``end`` None means to the end."""

    field_path: str
    start: int
    end: int | None


@dataclass(frozen=True)
class PathTemplate:
    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str = ""

    @property
    def rank(self) -> tuple[int, ...]:
        """Sort key: smaller is more specific."""
        return (*(s.kind for s in self.segments), 0 if self.verb else 1)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """Bindings for ``parts`` (raw, still percent-encoded path segments), or None."""
        if self.verb:
            if not parts or not parts[-1].endswith(":" + self.verb):
                return None
            parts = [*parts[:-1], parts[-1][: -len(self.verb) - 1]]
        decoded = [urllib.parse.unquote(p) for p in parts]
        tail = self.segments and self.segments[-1].kind is Kind.DOUBLE_STAR
        if len(decoded) < len(self.segments) - (1 if tail else 0):
            return None
        if not tail and len(decoded) != len(self.segments):
            return None
        for seg, part in zip(self.segments, decoded, strict=False):
            if seg.kind is Kind.LITERAL and part != seg.text:
                return None
            if seg.kind is Kind.STAR and not part:
                return None
        return {v.field_path: "/".join(decoded[v.start : v.end]) for v in self.variables}


def parse_template(source: str) -> PathTemplate:
    """Parse a ``google.api.http`` path template; ValueError when it is malformed."""
    if not source.startswith("/"):
        raise ValueError(f"path template {source!r} does not start with '/'")
    body, verb = source[1:], ""
    # A verb follows the last segment, outside any variable.
    last_colon = body.rfind(":")
    if last_colon > body.rfind("}") and last_colon > body.rfind("/"):
        body, verb = body[:last_colon], body[last_colon + 1 :]
        if not verb:
            raise ValueError(f"path template {source!r} has an empty verb")
    segments: list[Segment] = []
    variables: list[Variable] = []
    for token in _split_top_level(body, source):
        if token.startswith("{"):
            if not token.endswith("}"):
                raise ValueError(f"path template {source!r}: unterminated variable {token!r}")
            field_path, _, pattern = token[1:-1].partition("=")
            if not field_path or not all(p.isidentifier() for p in field_path.split(".")):
                raise ValueError(f"path template {source!r}: bad field path {field_path!r}")
            if any(v.field_path == field_path for v in variables):
                raise ValueError(f"path template {source!r} binds {field_path!r} twice")
            start = len(segments)
            inner = [_segment(t, source) for t in (pattern or "*").split("/")]
            segments.extend(inner)
            end = None if inner[-1].kind is Kind.DOUBLE_STAR else len(segments)
            variables.append(Variable(field_path, start, end))
        else:
            segments.append(_segment(token, source))
    for i, seg in enumerate(segments):
        if seg.kind is Kind.DOUBLE_STAR and i != len(segments) - 1:
            raise ValueError(f"path template {source!r}: '**' must be the last segment")
    return PathTemplate(source, tuple(segments), tuple(variables), verb)


def _split_top_level(body: str, source: str) -> list[str]:
    """Split on '/' outside braces."""
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"path template {source!r} has unbalanced braces")
        if ch == "/" and depth == 0:
            tokens.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"path template {source!r} has unbalanced braces")
    tokens.append("".join(current))
    return tokens


def _segment(token: str, source: str) -> Segment:
    if token == "*":
        return Segment(Kind.STAR)
    if token == "**":
        return Segment(Kind.DOUBLE_STAR)
    if not token or any(c in token for c in "{}*="):
        raise ValueError(f"path template {source!r}: bad segment {token!r}")
    return Segment(Kind.LITERAL, token)


@dataclass(frozen=True)
class Route:
    http_method: str  # upper case, e.g. "GET"
    template: PathTemplate
    method: descriptor.MethodDescriptor
    body: str = ""
    response_body: str = ""
    # Media types a google.api.HttpBody body may have (lower case, no parameters); empty: any.
    accepts: tuple[str, ...] = ()

    @property
    def rpc(self) -> str:
        """The gRPC method path, ``/package.Service/Method``."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    @property
    def http_body(self) -> descriptor.FieldDescriptor | None:
        """The ``google.api.HttpBody`` field the raw request body fills, if the body is one."""
        if not self.body or self.body == "*":
            return None
        field = self.method.input_type.fields_by_name[self.body]
        if field.message_type is None or field.message_type.full_name != HTTP_BODY or field.is_repeated:
            return None
        return field

    @property
    def bound_fields(self) -> set[str]:
        """Field paths set from the path or the body; query parameters cannot set these."""
        return {v.field_path for v in self.template.variables} | ({self.body} if self.body else set())


@dataclass(frozen=True)
class Match:
    route: Route
    params: dict[str, str]


class NoRoute(LookupError):
    """No template matches the path."""


class MethodNotAllowed(LookupError):
    """A template matches the path, but not for this HTTP method."""

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(allowed)
        self.allowed = allowed


class RouteTable:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)

    @classmethod
    def from_services(
        cls,
        services: Iterable[descriptor.ServiceDescriptor],
        media_types: Mapping[str, Sequence[str]] | None = None,
    ) -> RouteTable:
        """The routes of every annotated method; ``media_types`` maps a ``google.api.HttpBody``
        request field's full name to the media types its routes take."""
        media_types = media_types or {}
        routes = [r for s in services for m in s.methods for r in routes_for_method(m)]
        for i, r in enumerate(routes):
            if r.http_body is not None and r.http_body.full_name in media_types:
                accepts = tuple(t.lower() for t in media_types[r.http_body.full_name])
                routes[i] = dataclasses.replace(r, accepts=accepts)
        return cls(routes)

    def match(self, http_method: str, path: str) -> Match:
        """The most specific route for ``path`` (raw, percent-encoded, without the query).

        Raises NoRoute, or MethodNotAllowed when only other HTTP methods match.
        """
        if not path.startswith("/"):
            raise NoRoute(path)
        parts = path.split("/")[1:]
        best: Match | None = None
        allowed: list[str] = []
        for route in self.routes:
            params = route.template.match(parts)
            if params is None:
                continue
            if route.http_method != http_method.upper():
                allowed.append(route.http_method)
            elif best is None or route.template.rank < best.route.template.rank:
                best = Match(route, params)
        if best is not None:
            return best
        if allowed:
            raise MethodNotAllowed(sorted(set(allowed)))
        raise NoRoute(path)


def routes_for_method(method: descriptor.MethodDescriptor) -> list[Route]:
    """The routes one method's ``google.api.http`` option declares (none when it has no option)."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    routes = [_route(method, rule)]
    for extra in rule.additional_bindings:
        if extra.additional_bindings:
            raise ValueError(f"{method.full_name}: additional_bindings must not nest")
        routes.append(_route(method, extra))
    return routes


def _route(method: descriptor.MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    kind = rule.WhichOneof("pattern")
    if kind in HTTP_METHODS:
        verb, path = kind.upper(), getattr(rule, kind)
    elif kind == "custom":
        verb, path = rule.custom.kind.upper(), rule.custom.path
    else:
        raise ValueError(f"{method.full_name}: google.api.http has no pattern")
    template = parse_template(path)
    for v in template.variables:
        try:
            field = resolve_field(method.input_type, v.field_path)
        except KeyError as e:
            raise ValueError(f"{method.full_name}: path {path!r} binds an unknown field: {e}") from None
        if field.is_repeated:
            raise ValueError(f"{method.full_name}: path binds repeated field {v.field_path!r}")
    if rule.body and rule.body != "*" and rule.body not in method.input_type.fields_by_name:
        raise ValueError(f"{method.full_name}: body {rule.body!r} is not a top-level request field")
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise ValueError(f"{method.full_name}: response_body {rule.response_body!r} is not a response field")
    return Route(verb, template, method, rule.body, rule.response_body)


def resolve_field(message_type: descriptor.Descriptor, field_path: str) -> descriptor.FieldDescriptor:
    """The field a dotted path names, by proto or JSON name; KeyError when there is none."""
    current: descriptor.Descriptor | None = message_type
    field: descriptor.FieldDescriptor | None = None
    for name in field_path.split("."):
        if current is None or (field is not None and field.is_repeated):
            raise KeyError(f"{field_path!r}: {field.name if field else name!r} has no fields")
        field = current.fields_by_name.get(name) or next(
            (f for f in current.fields if f.json_name == name), None
        )
        if field is None:
            raise KeyError(f"{current.full_name} has no field {name!r}")
        current = field.message_type
    assert field is not None
    return field
