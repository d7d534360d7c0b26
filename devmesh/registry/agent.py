"""The agent endpoints: services, checks, TTL updates, maintenance, self, members and status.

Validation order and texts follow ``agent/agent_endpoint.go``, ``agent/acl.go`` (404s for unknown
IDs), ``agent/structs/check_type.go`` (``Validate``) and ``Agent.addServiceInternal`` (check IDs
``service:<id>`` or ``service:<id>:<n>``, default check names, carried-over check state).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import Any

from aiohttp import web

from devmesh.registry.acl import ACL, AGENT, NODE, READ, SERVICE, WRITE, Identity
from devmesh.registry.blocking import parse_query_options
from devmesh.registry.checks import CheckRunner
from devmesh.registry.codec import ListOf, MapOf, Struct
from devmesh.registry.filtering import refuse_filter
from devmesh.registry.state import (
    CONSUL_VERSION,
    CRITICAL,
    PASSING,
    STATUSES,
    WARNING,
    Check,
    CheckSpec,
    Service,
    Store,
)
from devmesh.registry.views import agent_service, health_check
from devmesh.registry.web import (
    Handler,
    HTTPError,
    bad_request,
    json_response,
    param,
    parse_bool,
    read_body,
)
from epoxi import durations

CHECK_TYPE = Struct(
    "CheckType",
    (
        ("CheckID", "str"),
        ("Name", "str"),
        ("Status", "str"),
        ("Notes", "str"),
        ("ScriptArgs", ListOf("str")),
        ("HTTP", "str"),
        ("H2PING", "str"),
        ("H2PingUseTLS", "bool"),
        ("Header", MapOf(ListOf("str"))),
        ("Method", "str"),
        ("Body", "str"),
        ("DisableRedirects", "bool"),
        ("TCP", "str"),
        ("TCPUseTLS", "bool"),
        ("UDP", "str"),
        ("Interval", "duration"),
        ("AliasNode", "str"),
        ("AliasService", "str"),
        ("DockerContainerID", "str"),
        ("Shell", "str"),
        ("GRPC", "str"),
        ("GRPCUseTLS", "bool"),
        ("OSService", "str"),
        ("TLSServerName", "str"),
        ("TLSSkipVerify", "bool"),
        ("Timeout", "duration"),
        ("TTL", "duration"),
        ("SuccessBeforePassing", "int"),
        ("FailuresBeforeWarning", "int"),
        ("FailuresBeforeCritical", "int"),
        ("ProxyHTTP", "str"),
        ("ProxyGRPC", "str"),
        ("DeregisterCriticalServiceAfter", "duration"),
        ("OutputMaxSize", "int"),
        # Consul's CheckType.UnmarshalJSON accepts these aliases and ignores ServiceID.
        ("args", ListOf("str")),
        ("script_args", ListOf("str")),
        ("deregister_critical_service_after", "duration"),
        ("docker_container_id", "str"),
        ("tls_server_name", "str"),
        ("tls_skip_verify", "bool"),
        ("grpc_use_tls", "bool"),
        ("h2ping_use_tls", "bool"),
        ("ServiceID", "str"),
        ("service_id", "str"),
    ),
)

# ``structs.CheckDefinition`` (``/v1/agent/check/register``): ID rather than CheckID, a ServiceID,
# then CheckType's fields; its UnmarshalJSON takes the same snake_case aliases.
CHECK_DEFINITION = Struct(
    "CheckDefinition",
    (
        ("ID", "str"),
        ("Name", "str"),
        ("Notes", "str"),
        ("ServiceID", "str"),
        ("Token", "str"),
        ("Status", "str"),
        *(
            (name, kind)
            for name, kind in CHECK_TYPE.fields
            if name not in ("CheckID", "Name", "Status", "Notes", "ServiceID")
        ),
    ),
)

SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_CHECK_ID = "_node_maintenance"
DEFAULT_NODE_MAINT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
DEFAULT_SERVICE_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)

_SERVICE_ADDRESS = Struct("ServiceAddress", (("Address", "str"), ("Port", "int")))

SERVICE_DEFINITION = Struct(
    "ServiceDefinition",
    (
        ("Kind", "str"),
        ("ID", "str"),
        ("Name", "str"),
        ("Tags", ListOf("str")),
        ("Address", "str"),
        ("TaggedAddresses", MapOf(_SERVICE_ADDRESS)),
        ("Meta", MapOf("str")),
        ("Port", "int"),
        ("SocketPath", "str"),
        ("Check", CHECK_TYPE),
        ("Checks", ListOf(CHECK_TYPE)),
        ("Weights", Struct("Weights", (("Passing", "int"), ("Warning", "int")))),
        ("Token", "str"),
        ("EnableTagOverride", "bool"),
        ("Locality", "any"),
        ("Proxy", "any"),
        ("Connect", "any"),
        ("enable_tag_override", "bool"),
        ("tagged_addresses", MapOf(_SERVICE_ADDRESS)),
    ),
)

CHECK_UPDATE = Struct("checkUpdate", (("Status", "str"), ("Output", "str")))

_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def check_type_of(definition: dict[str, Any]) -> str:
    """``CheckType.Type``."""
    interval = definition.get("Interval", 0) > 0
    script = bool(definition.get("ScriptArgs"))
    if definition.get("GRPC") and interval:
        return "grpc"
    if definition.get("HTTP") and interval:
        return "http"
    if definition.get("TTL", 0) > 0:
        return "ttl"
    if definition.get("TCP") and interval:
        return "tcp"
    if definition.get("UDP") and interval:
        return "udp"
    if definition.get("AliasNode") or definition.get("AliasService"):
        return "alias"
    if script and definition.get("DockerContainerID") and interval:
        return "docker"
    if script:
        return "script"
    if definition.get("H2PING") and interval:
        return "h2ping"
    if definition.get("OSService") and interval:
        return "os_service"
    return ""


def _merge_aliases(check: dict[str, Any]) -> dict[str, Any]:
    """Apply the snake_case aliases the way ``CheckType.UnmarshalJSON`` does."""
    out = dict(check)
    if "DeregisterCriticalServiceAfter" not in out and "deregister_critical_service_after" in out:
        out["DeregisterCriticalServiceAfter"] = out["deregister_critical_service_after"]
    if not out.get("ScriptArgs"):
        out["ScriptArgs"] = out.get("args") or out.get("script_args") or []
    for field, alias in (("DockerContainerID", "docker_container_id"), ("TLSServerName", "tls_server_name")):
        if not out.get(field) and out.get(alias):
            out[field] = out[alias]
    for field, alias in (("TLSSkipVerify", "tls_skip_verify"), ("GRPCUseTLS", "grpc_use_tls")):
        if out.get(alias):
            out[field] = True
    return out


def validate_check(check: dict[str, Any]) -> str | None:
    """``CheckType.Validate``: the error text, or ``None``."""
    interval, ttl = check.get("Interval", 0), check.get("TTL", 0)
    interval_check = bool(
        check.get("ScriptArgs")
        or check.get("HTTP")
        or check.get("TCP")
        or check.get("UDP")
        or check.get("GRPC")
        or check.get("H2PING")
        or check.get("OSService")
    )
    alias = bool(check.get("AliasNode") or check.get("AliasService"))
    if interval > 0 and ttl > 0:
        return "Interval and TTL cannot both be specified"
    if interval_check and interval <= 0:
        return "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
    if interval_check and alias:
        return "Interval cannot be set for Alias checks"
    if alias and ttl > 0:
        return "TTL must be not be set for Alias checks"
    if not interval_check and not alias and ttl <= 0:
        return "TTL must be > 0 for TTL checks"
    if check.get("OutputMaxSize", 0) < 0:
        return "MaxOutputMaxSize must be positive"
    if check.get("FailuresBeforeWarning", 0) > check.get("FailuresBeforeCritical", 0):
        return "FailuresBeforeWarning can't be higher than FailuresBeforeCritical"
    return None


def _validate_meta(meta: dict[str, str]) -> None:
    """``ValidateServiceMetadata``."""
    if len(meta) > 64:
        raise bad_request("Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs")
    for key, value in meta.items():
        problem = None
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            raise bad_request(
                f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): {problem}"
            )


def _validate_weights(weights: dict[str, int]) -> None:
    passing, warning = weights.get("Passing", 0), weights.get("Warning", 0)
    if passing < 1:
        raise bad_request("Invalid Weights: Passing must be greater than 0")
    if warning < 0:
        raise bad_request("Invalid Weights: Warning must be greater or equal than 0")
    if passing > 65535 or warning > 65535:
        raise bad_request("Invalid Weights: DNS Weight must be between 0 and 65535")


def _tagged_addresses(args: dict[str, Any], address: str, port: int) -> dict[str, dict[str, Any]]:
    """Given tagged addresses plus the ``lan_ipv4``/``wan_ipv4`` (or v6) ones Consul derives."""
    given = args.get("TaggedAddresses") or args.get("tagged_addresses") or {}
    tagged = {name: {"Address": a.get("Address", ""), "Port": a.get("Port", 0)} for name, a in given.items()}
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return tagged
    is_v4 = ip.version == 4 or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None)
    suffix = "ipv4" if is_v4 else "ipv6"
    for name in (f"lan_{suffix}", f"wan_{suffix}"):
        tagged.setdefault(name, {"Address": address, "Port": port})
    return tagged


def _scripts_disabled() -> HTTPError:
    """``Agent.addCheck`` refuses remote script checks unless ``enable_script_checks``."""
    return HTTPError(
        500,
        "Scripts are disabled on this agent from remote calls; to enable, configure "
        "'enable_script_checks' to true",
    )


def _enable_param(request: web.Request) -> bool:
    """The ``?enable`` of the maintenance endpoints: required, then ``strconv.ParseBool``."""
    if "enable" not in request.query:
        raise bad_request("Missing value for enable")
    raw = request.query["enable"]
    try:
        return parse_bool(raw)
    except ValueError:
        raise bad_request(f"Invalid value for enable: {durations.go_quote(raw)}") from None


def _unknown_service(service_id: str) -> HTTPError:
    """``vetServiceUpdateWithAuthorizer`` (``agent/acl.go``) for a service the agent lacks."""
    return HTTPError(
        404,
        f"Unknown service ID {durations.go_quote(service_id)}. "
        "Ensure that the service ID is passed, not the service name.",
    )


class AgentEndpoints:
    def __init__(self, store: Store, runner: CheckRunner, acl: ACL) -> None:
        self.store = store
        self.runner = runner
        self.acl = acl

    @property
    def node(self) -> str:
        return self.store.config.node_name

    # --- services -------------------------------------------------------------------------------

    async def register_service(self, request: web.Request) -> web.StreamResponse:
        args = await read_body(request, SERVICE_DEFINITION)
        name = args.get("Name", "")
        if not name:
            raise bad_request("Missing service name")
        address = args.get("Address", "")
        if address in ("0.0.0.0", "::", "[::]"):
            raise bad_request("Invalid service address")
        identity = self.acl.resolve(request)
        weights = args.get("Weights")
        if weights is not None:
            _validate_weights(weights)
        meta = args.get("Meta") or {}
        _validate_meta(meta)
        definitions = [args["Check"]] if args.get("Check") else []
        definitions += args.get("Checks") or []
        definitions = [_merge_aliases(d or {}) for d in definitions]
        for definition in definitions:
            problem = validate_check(definition)
            if problem:
                raise bad_request(f"Invalid check: {problem}")
        for definition in definitions:
            status = definition.get("Status", "")
            if status and status not in STATUSES:
                raise bad_request("Status for checks must 'passing', 'warning', 'critical'")
        service_id = args.get("ID") or name
        # vetServiceRegisterWithAuthorizer: the service, then any service it replaces.
        self.acl.require(identity, SERVICE, WRITE, name)
        existing = self.store.local_services.get(service_id)
        if existing is not None:
            self.acl.require(identity, SERVICE, WRITE, existing.name)
        if any(check_type_of(d) in ("script", "docker") for d in definitions):
            raise _scripts_disabled()
        port = args.get("Port", 0)
        service = Service(
            id=service_id,
            name=name,
            tags=list(args.get("Tags") or []),
            address=address,
            port=port,
            meta=dict(meta),
            tagged_addresses=_tagged_addresses(args, address, port),
            weights={"Passing": weights.get("Passing", 1), "Warning": weights.get("Warning", 0)}
            if weights is not None
            else {"Passing": 1, "Warning": 1},
            enable_tag_override=bool(args.get("EnableTagOverride") or args.get("enable_tag_override")),
            kind=args.get("Kind", ""),
        )
        checks = [self._check(service, d, i, len(definitions)) for i, d in enumerate(definitions)]
        replace_existing = "replace-existing-checks" in request.query and param(
            request, "replace-existing-checks"
        ) in (
            "",
            "true",
        )
        previous = [cid for cid, lc in self.store.local_checks.items() if lc.check.service_id == service.id]
        for check, _ in checks:
            self.runner.stop(check.check_id)
        self.store.add_service(service, checks)
        for check, _ in checks:
            self.runner.start(check.check_id)
        if replace_existing:
            kept = {c.check_id for c, _ in checks}
            for check_id in previous:
                if check_id not in kept:
                    self.runner.remove_check(check_id)
        return web.Response(status=200)

    def _check(
        self, service: Service, definition: dict[str, Any], position: int, count: int
    ) -> tuple[Check, CheckSpec]:
        check_id = definition.get("CheckID", "")
        if not check_id:
            check_id = f"service:{service.id}" + (f":{position + 1}" if count > 1 else "")
        name = definition.get("Name") or f"Service '{service.name}' check"
        return self._build_check(definition, check_id, name, service)

    def _build_check(
        self, definition: dict[str, Any], check_id: str, name: str, service: Service | None
    ) -> tuple[Check, CheckSpec]:
        """The check and how to run it, from a (validated, alias-merged) check definition."""
        interval, timeout = definition.get("Interval", 0), definition.get("Timeout", 0)
        check = Check(
            node=self.node,
            check_id=check_id,
            name=name,
            status=definition.get("Status") or CRITICAL,
            notes=definition.get("Notes", ""),
            service_id=service.id if service else "",
            service_name=service.name if service else "",
            service_tags=list(service.tags) if service else [],
            type=check_type_of(definition),
            interval=durations.format(interval) if interval else "",
            timeout=durations.format(timeout) if timeout else "",
        )
        spec = CheckSpec(
            ttl=definition.get("TTL", 0),
            grpc=definition.get("GRPC", "") if check.type == "grpc" else "",
            grpc_use_tls=bool(definition.get("GRPCUseTLS")),
            tls_server_name=definition.get("TLSServerName", ""),
            tls_skip_verify=bool(definition.get("TLSSkipVerify")),
            interval=interval,
            timeout=timeout,
            deregister_critical_service_after=definition.get("DeregisterCriticalServiceAfter", 0),
            success_before_passing=definition.get("SuccessBeforePassing", 0),
            # ``Agent.addCheck``: FailuresBeforeWarning defaults to FailuresBeforeCritical.
            failures_before_warning=definition.get("FailuresBeforeWarning", 0)
            or definition.get("FailuresBeforeCritical", 0),
            failures_before_critical=definition.get("FailuresBeforeCritical", 0),
        )
        return check, spec

    def _vet_service_update(self, identity: Identity, service_id: str) -> Service:
        """``vetServiceUpdateWithAuthorizer``: the service must exist, and be the token's to write."""
        existing = self.store.local_services.get(service_id)
        if existing is None:
            raise _unknown_service(service_id)
        self.acl.require(identity, SERVICE, WRITE, existing.name)
        return existing

    async def deregister_service(self, request: web.Request) -> web.StreamResponse:
        service_id = request.path.removeprefix("/v1/agent/service/deregister/")
        self._vet_service_update(self.acl.resolve(request), service_id)
        self.runner.remove_service(service_id)
        return web.Response(status=200)

    async def services(self, request: web.Request) -> web.StreamResponse:
        identity = self.acl.resolve(request)
        refuse_filter(request)
        dc = self.store.config.datacenter
        local = sorted(self.store.local_services.items())
        readable = {sid: agent_service(s, dc) for sid, s in local if identity.can(SERVICE, READ, s.name)}
        return json_response(readable, identity.filtered(len(readable) != len(local)))

    async def service(self, request: web.Request) -> web.StreamResponse:
        parse_query_options(request, self.store.config.datacenter)
        identity = self.acl.resolve(request)
        service_id = request.path.removeprefix("/v1/agent/service/")
        service = self.store.local_services.get(service_id)
        if service is None:
            raise HTTPError(404, f"unknown service ID: {service_id}")
        self.acl.require(identity, SERVICE, READ, service.name)
        body = agent_service(service, self.store.config.datacenter)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        body["ContentHash"] = digest
        return json_response(body, {"X-Consul-ContentHash": digest})

    # --- checks ---------------------------------------------------------------------------------

    async def checks(self, request: web.Request) -> web.StreamResponse:
        identity = self.acl.resolve(request)
        refuse_filter(request)
        local = sorted(self.store.local_checks.items())
        readable = {
            cid: health_check(lc.check) for cid, lc in local if self._can_read_check(identity, lc.check)
        }
        return json_response(readable, identity.filtered(len(readable) != len(local)))

    def _can_read_check(self, identity: Identity, check: Check) -> bool:
        """``filterChecksWithAuthorizer``: a service's check needs service:read, a node's node:read."""
        if check.service_name:
            return identity.can(SERVICE, READ, check.service_name)
        return identity.can(NODE, READ, self.node)

    def _require_check_write(self, identity: Identity, service_name: str) -> None:
        if service_name:
            self.acl.require(identity, SERVICE, WRITE, service_name)
        else:
            self.acl.require(identity, NODE, WRITE, self.node)

    def _vet_check(self, identity: Identity, check_id: str) -> None:
        """``vetCheckUpdateWithAuthorizer``: the check must exist, and be the token's to write."""
        local = self.store.local_checks.get(check_id)
        if local is None:
            raise HTTPError(
                404,
                f"Unknown check ID {json.dumps(check_id)}. Ensure that the check ID is passed, not the check name.",
            )
        self._require_check_write(identity, local.check.service_name)

    def _update_ttl(
        self, request: web.Request, check_id: str, status: str, output: str
    ) -> web.StreamResponse:
        self._vet_check(self.acl.resolve(request), check_id)
        if not self.runner.is_ttl(check_id):
            raise HTTPError(500, f"CheckID {json.dumps(check_id)} does not have associated TTL")
        self.runner.set_ttl_status(check_id, status, output)
        return web.Response(status=200)

    async def check_pass(self, request: web.Request) -> web.StreamResponse:
        return self._update_ttl(
            request, request.path.removeprefix("/v1/agent/check/pass/"), PASSING, param(request, "note")
        )

    async def check_warn(self, request: web.Request) -> web.StreamResponse:
        return self._update_ttl(
            request, request.path.removeprefix("/v1/agent/check/warn/"), WARNING, param(request, "note")
        )

    async def check_fail(self, request: web.Request) -> web.StreamResponse:
        return self._update_ttl(
            request, request.path.removeprefix("/v1/agent/check/fail/"), CRITICAL, param(request, "note")
        )

    async def check_update(self, request: web.Request) -> web.StreamResponse:
        update = await read_body(request, CHECK_UPDATE)
        status = update.get("Status", "")
        if status not in STATUSES:
            raise bad_request(f"Invalid check status: '{status}'")
        check_id = request.path.removeprefix("/v1/agent/check/update/")
        return self._update_ttl(request, check_id, status, update.get("Output", ""))

    async def register_check(self, request: web.Request) -> web.StreamResponse:
        """``AgentRegisterCheck``: decode, name, status, ``CheckType.Validate``, then the service."""
        args = await read_body(request, CHECK_DEFINITION)
        name = args.get("Name", "")
        if not name:
            raise bad_request("Missing check name")
        status = args.get("Status", "")
        if status and status not in STATUSES:
            raise bad_request("Bad check status")
        identity = self.acl.resolve(request)
        definition = _merge_aliases(args)
        problem = validate_check(definition)
        if problem:
            raise bad_request(f"Invalid check: {problem}")
        service_id = args.get("ServiceID") or args.get("service_id") or ""
        service = None
        if service_id:
            service = self.store.local_services.get(service_id)
            if service is None:
                raise HTTPError(404, f"ServiceID {durations.go_quote(service_id)} does not exist")
        # vetCheckRegisterWithAuthorizer: the check, then any check it replaces.
        self._require_check_write(identity, service.name if service else "")
        existing = self.store.local_checks.get(args.get("ID") or name)
        if existing is not None:
            self._require_check_write(identity, existing.check.service_name)
        if check_type_of(definition) in ("script", "docker"):
            raise _scripts_disabled()
        check, spec = self._build_check(definition, args.get("ID") or name, name, service)
        self.runner.stop(check.check_id)
        self.store.add_check(check, spec)
        self.runner.start(check.check_id)
        return web.Response(status=200)

    async def deregister_check(self, request: web.Request) -> web.StreamResponse:
        check_id = request.path.removeprefix("/v1/agent/check/deregister/")
        self._vet_check(self.acl.resolve(request), check_id)
        self.runner.remove_check(check_id)
        return web.Response(status=200)

    # --- maintenance (``Agent.EnableServiceMaintenance``, ``EnableNodeMaintenance``) -------------

    async def service_maintenance(self, request: web.Request) -> web.StreamResponse:
        service_id = request.path.removeprefix("/v1/agent/service/maintenance/")
        if not service_id:
            raise bad_request("Missing service ID")
        enable = _enable_param(request)
        service = self._vet_service_update(self.acl.resolve(request), service_id)
        self._set_maintenance(
            request,
            enable,
            SERVICE_MAINT_PREFIX + service_id,
            "Service Maintenance Mode",
            DEFAULT_SERVICE_MAINT_REASON,
            service,
        )
        return web.Response(status=200)

    async def node_maintenance(self, request: web.Request) -> web.StreamResponse:
        enable = _enable_param(request)
        self.acl.require(self.acl.resolve(request), NODE, WRITE, self.node)
        self._set_maintenance(
            request, enable, NODE_MAINT_CHECK_ID, "Node Maintenance Mode", DEFAULT_NODE_MAINT_REASON, None
        )
        return web.Response(status=200)

    def _set_maintenance(
        self,
        request: web.Request,
        enable: bool,
        check_id: str,
        name: str,
        default_reason: str,
        service: Service | None,
    ) -> None:
        if enable:
            self._enter_maintenance(check_id, name, param(request, "reason") or default_reason, service)
        else:
            self._leave_maintenance(check_id)

    def _enter_maintenance(self, check_id: str, name: str, reason: str, service: Service | None) -> None:
        """A critical check that takes the service (or the whole node) out of passing answers; a
        second enable keeps the first one's reason, as Consul does."""
        if check_id in self.store.local_checks:
            return
        check = Check(
            node=self.node,
            check_id=check_id,
            name=name,
            status=CRITICAL,
            notes=reason,
            service_id=service.id if service else "",
            service_name=service.name if service else "",
            service_tags=list(service.tags) if service else [],
            type="maintenance",
        )
        self.store.add_check(check, CheckSpec())

    def _leave_maintenance(self, check_id: str) -> None:
        if check_id in self.store.local_checks:
            self.runner.remove_check(check_id)

    # --- self, members, status ------------------------------------------------------------------

    def member(self) -> dict[str, Any]:
        config = self.store.config
        return {
            "Name": config.node_name,
            "Addr": config.advertise_address,
            "Port": 8301,
            "Tags": {
                "acls": "1" if self.acl.enabled else "0",
                "bootstrap": "1",
                "build": f"{CONSUL_VERSION}:epoxi-devregistry",
                "dc": config.datacenter,
                "id": self.store.node_id,
                "port": "8300",
                "raft_vsn": "3",
                "role": "consul",
                "segment": "",
                "vsn": "2",
                "vsn_max": "3",
                "vsn_min": "2",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    async def self_info(self, request: web.Request) -> web.StreamResponse:
        self.acl.require(self.acl.resolve(request), AGENT, READ, self.node)
        config = self.store.config
        return json_response(
            {
                "Config": {
                    "Datacenter": config.datacenter,
                    "PrimaryDatacenter": config.datacenter,
                    "NodeName": config.node_name,
                    "NodeID": self.store.node_id,
                    "Revision": "epoxi-devregistry",
                    "Server": True,
                    "Version": CONSUL_VERSION,
                    "BuildDate": "2025-01-01T00:00:00Z",
                },
                "DebugConfig": {
                    "Datacenter": config.datacenter,
                    "NodeName": config.node_name,
                    "NodeID": self.store.node_id,
                    "DevMode": True,
                    "ServerMode": True,
                    "ACLsEnabled": self.acl.enabled,
                    "ACLResolverSettings": {
                        "ACLDefaultPolicy": self.acl.default_policy,
                        "ACLDownPolicy": "extend-cache",
                        "ACLsEnabled": self.acl.enabled,
                        "Datacenter": config.datacenter,
                        "NodeName": config.node_name,
                    },
                    "AdvertiseAddrLAN": config.advertise_address,
                    "CheckDeregisterIntervalMin": durations.format(config.check_deregister_interval_min),
                    "CheckReapInterval": durations.format(config.check_reap_interval),
                    "CheckUpdateInterval": durations.format(config.check_update_interval),
                    "SessionTTLMin": durations.format(config.session_ttl_min),
                    "DefaultQueryTime": durations.format(config.default_query_time),
                    "MaxQueryTime": durations.format(config.max_query_time),
                },
                "Coord": {"Vec": [0, 0, 0, 0, 0, 0, 0, 0], "Error": 1.5, "Adjustment": 0, "Height": 1e-05},
                "Member": self.member(),
                "Stats": {
                    "agent": {
                        "check_monitors": "0",
                        "check_ttls": str(sum(1 for lc in self.store.local_checks.values() if lc.spec.ttl)),
                        "checks": str(len(self.store.local_checks)),
                        "services": str(len(self.store.local_services)),
                    },
                    "build": {"prerelease": "", "revision": "epoxi-devregistry", "version": CONSUL_VERSION},
                },
                "Meta": {"consul-network-segment": "", "consul-version": CONSUL_VERSION},
            }
        )

    async def members(self, request: web.Request) -> web.StreamResponse:
        identity = self.acl.resolve(request)
        readable = identity.can(NODE, READ, self.node)
        return json_response([self.member()] if readable else [], identity.filtered(not readable))

    async def status_leader(self, request: web.Request) -> web.StreamResponse:
        return json_response(f"{self.store.config.advertise_address}:8300")

    async def status_peers(self, request: web.Request) -> web.StreamResponse:
        return json_response([f"{self.store.config.advertise_address}:8300"])

    def routes(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        return [
            ("/v1/agent/self", ("GET",), self.self_info),
            ("/v1/agent/members", ("GET",), self.members),
            ("/v1/agent/services", ("GET",), self.services),
            ("/v1/agent/service/", ("GET",), self.service),
            ("/v1/agent/service/register", ("PUT",), self.register_service),
            ("/v1/agent/service/deregister/", ("PUT",), self.deregister_service),
            ("/v1/agent/service/maintenance/", ("PUT",), self.service_maintenance),
            ("/v1/agent/maintenance", ("PUT",), self.node_maintenance),
            ("/v1/agent/checks", ("GET",), self.checks),
            ("/v1/agent/check/register", ("PUT",), self.register_check),
            ("/v1/agent/check/deregister/", ("PUT",), self.deregister_check),
            ("/v1/agent/check/pass/", ("PUT",), self.check_pass),
            ("/v1/agent/check/warn/", ("PUT",), self.check_warn),
            ("/v1/agent/check/fail/", ("PUT",), self.check_fail),
            ("/v1/agent/check/update/", ("PUT",), self.check_update),
            ("/v1/status/leader", ("GET",), self.status_leader),
            ("/v1/status/peers", ("GET",), self.status_peers),
        ]
