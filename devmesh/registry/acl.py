"""ACL enforcement as a Consul server with ``acl.enabled`` applies it to the endpoints we serve.

The token of a request is read as ``agent/http.go`` ``parseTokenInternal`` reads it: ``?token=``
first, then ``X-Consul-Token``, then ``Authorization: Bearer <token>`` (the scheme in any case,
the first word after it); none (or an empty one) is the anonymous token, whose SecretID is also
``anonymous``. Tokens the registry knows:

* the **initial management token** (``acl.tokens.initial_management``): every permission;
* the **anonymous token** (AccessorID ``00000000-0000-0000-0000-000000000002``): no policy, so
  it can do what ``acl.default_policy`` allows: everything under ``allow``, nothing under ``deny``;
* tokens made with ``PUT /v1/acl/token`` (``devmesh.registry.acl_tokens``) from service and node
  identities, whose rules are Consul's templated ones; what no rule covers falls to
  ``acl.default_policy``. A rule for a name beats every prefix rule, a longer prefix a shorter
  one, and ``write`` grants ``read`` and ``list``.

Any other secret is ``403 ACL not found`` (``acl.ErrNotFound``). A known token without the
permission an endpoint needs is ``403`` with ``acl.PermissionDeniedError``'s text, e.g.
``Permission denied: anonymous token lacks permission 'service:write' on "web". The anonymous
token is used implicitly when a request does not specify a token.``; both are written by
``HTTPHandlers.wrap`` as plain text (``text/plain; charset=utf-8``). List endpoints filter what
the token cannot read instead of refusing, and send ``X-Consul-Results-Filtered-By-ACLs: true``
when they dropped something, but only to a request that named a token
(``maskResultsFilteredByACLs``). With ACLs disabled every request is allowed everything.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from devmesh.registry.blocking import parse_query_options
from devmesh.registry.state import (
    ACL_DEFAULT_POLICY_ENV,
    ACL_ENABLED_ENV,
    ACL_INITIAL_MANAGEMENT_TOKEN_FILE_ENV,
    RegistryConfig,
)
from devmesh.registry.web import HTTPError

ANONYMOUS_ACCESSOR_ID = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
NOT_FOUND = "ACL not found"
FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"
DEFAULT_POLICY_HEADER = "X-Consul-Default-ACL-Policy"
POLICIES = ("allow", "deny")

# Resources and access levels, spelled as acl.Resource and acl.AccessLevel.String() spell them.
ACL_RESOURCE, AGENT, KEY, NODE, SERVICE, SESSION = "acl", "agent", "key", "node", "service", "session"
LIST, READ, WRITE = "list", "read", "write"
_RANK = {LIST: 1, READ: 2, WRITE: 3}


@dataclass(frozen=True)
class Rule:
    """One policy rule: ``service "web" { policy = "write" }`` or ``service_prefix "" {...}``."""

    resource: str
    name: str
    prefix: bool
    level: str

    def covers(self, resource: str, name: str) -> bool:
        if resource != self.resource:
            return False
        return name.startswith(self.name) if self.prefix else name == self.name


def environment(management_token_file: Path, default_policy: str = "deny") -> dict[str, str]:
    """The environment that makes ``python -m devmesh.registry`` enforce ACLs with this token
    (e.g. ``devmesh.supervisor.Mesh(env=...)``; services then need ``CONSUL_HTTP_TOKEN[_FILE]``)."""
    return {
        ACL_ENABLED_ENV: "true",
        ACL_DEFAULT_POLICY_ENV: default_policy,
        ACL_INITIAL_MANAGEMENT_TOKEN_FILE_ENV: str(management_token_file),
    }


def request_token(request: web.Request) -> str:
    """The token a request presents (``""`` for none), as ``parseTokenInternal`` finds it."""
    query = request.query.get("token", "")
    if query:
        return query
    header = request.headers.get("X-Consul-Token", "")
    if header:
        return header
    authorization = request.headers.get("Authorization", "")
    parts = authorization.split(" ")
    if len(parts) > 1 and parts[0].lower() == "bearer":
        value = " ".join(parts[1:]).strip()
        return value.split(" ")[0].strip()
    return ""


@dataclass(frozen=True)
class Identity:
    """A resolved token: who it is and what it may do."""

    accessor_id: str
    management: bool
    default_allow: bool
    # A token was named in the request (the filtered-results header is only sent then).
    named: bool
    rules: tuple[Rule, ...] = ()

    def can(self, resource: str, level: str, name: str) -> bool:
        if self.management:
            return True
        matching = [r for r in self.rules if r.covers(resource, name)]
        if not matching:
            return self.default_allow
        rule = max(matching, key=lambda r: (not r.prefix, len(r.name)))
        return _RANK[rule.level] >= _RANK[level]

    def filtered(self, removed: bool) -> dict[str, str]:
        """The header that says results were filtered, when Consul would send it."""
        return {FILTERED_HEADER: "true"} if removed and self.named else {}


ALLOW_ALL = Identity(accessor_id="", management=True, default_allow=True, named=False)


def permission_denied(identity: Identity, resource: str, level: str, name: str) -> HTTPError:
    """``acl.PermissionDeniedByACL(...).Error()`` as a 403."""
    anonymous = identity.accessor_id == ANONYMOUS_ACCESSOR_ID
    who = "anonymous token" if anonymous else f"token with AccessorID '{identity.accessor_id}'"
    text = f"Permission denied: {who} lacks permission '{resource}:{level}'"
    if name:  # PermissionDeniedByACLUnnamed (acl:write, ...) names none
        text += f' on "{name}"'
    if anonymous:
        text += ". The anonymous token is used implicitly when a request does not specify a token."
    return HTTPError(403, text)


class ACL:
    """Resolves the token of each request and enforces what it may do."""

    def __init__(self, config: RegistryConfig) -> None:
        if config.acl_default_policy not in POLICIES:
            raise ValueError(f"acl.default_policy must be allow or deny, not {config.acl_default_policy!r}")
        if (
            config.acl_enabled
            and config.acl_default_policy == "deny"
            and not config.acl_initial_management_token
        ):
            # Consul would wait for /v1/acl/bootstrap, which the dev registry does not serve.
            raise ValueError("ACLs with default policy deny need an initial management token")
        self.enabled = config.acl_enabled
        self.default_policy = config.acl_default_policy
        self._management = config.acl_initial_management_token
        self.management_accessor_id = str(uuid.uuid4())
        # Tokens made through the API, by SecretID: (AccessorID, rules).
        self.tokens: dict[str, tuple[str, tuple[Rule, ...]]] = {}

    @property
    def headers(self) -> dict[str, str]:
        """Headers ``wrap`` sets on every answer of an API endpoint."""
        return {DEFAULT_POLICY_HEADER: self.default_policy} if self.enabled else {}

    def is_management(self, secret: str) -> bool:
        return bool(self._management) and hmac.compare_digest(secret.encode(), self._management.encode())

    def resolve(self, request: web.Request) -> Identity:
        """``ResolveTokenAndDefaultMeta``: the request's identity, or ``403 ACL not found``."""
        if not self.enabled:
            return ALLOW_ALL
        secret = request_token(request)
        named = secret != ""
        if secret in ("", ANONYMOUS_SECRET):
            return Identity(ANONYMOUS_ACCESSOR_ID, False, self.default_policy == "allow", named)
        if self.is_management(secret):
            return Identity(self.management_accessor_id, True, True, named)
        made = self.tokens.get(secret)
        if made is not None:
            accessor_id, rules = made
            return Identity(accessor_id, False, self.default_policy == "allow", named, rules)
        raise HTTPError(403, NOT_FOUND)

    def resolve_query(self, request: web.Request, datacenter: str) -> Identity:
        """For blocking queries: the query options are checked first (their 400s win), as the
        HTTP handler parses them before the RPC resolves the token."""
        parse_query_options(request, datacenter)
        return self.resolve(request)

    def require(self, identity: Identity, resource: str, level: str, name: str) -> None:
        if not identity.can(resource, level, name):
            raise permission_denied(identity, resource, level, name)
