"""The in-memory store: catalog, agent-local state, KV and sessions behind one Raft-like index.

Every write takes the next index, exactly as each Raft apply does in Consul, and stamps the
tables and per-service indexes it touched (``agent/consul/state``). Readers compute the index
of what they return from those stamps, and blocking queries wait on :meth:`Store.changed`.

Two layers mirror a Consul agent: ``local_services``/``local_checks`` are the agent's own view
(``/v1/agent/*``), ``services``/``checks`` the catalog (``/v1/catalog/*``, ``/v1/health/*``).
The agent syncs to the catalog at once, except output-only check changes, which wait for
``check_update_interval`` as Consul's anti-entropy does (``agent/local/state.go``).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from devmesh.registry.web import parse_bool
from epoxi import durations
from epoxi.settings import setting

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

SERF_CHECK_ID = "serfHealth"
CONSUL_VERSION = "1.21.0"
MAX_LOCK_DELAY = 60 * durations.SECOND  # structs.MaxLockDelay: the longest lock-delay applied


# The environment the registry's ACL settings are read from (``acl.environment`` builds one).
ACL_ENABLED_ENV = "EPOXI_REGISTRY_ACL_ENABLED"
ACL_DEFAULT_POLICY_ENV = "EPOXI_REGISTRY_ACL_DEFAULT_POLICY"
ACL_INITIAL_MANAGEMENT_TOKEN_FILE_ENV = "EPOXI_REGISTRY_ACL_INITIAL_MANAGEMENT_TOKEN_FILE"
TLS_FOR_CHECKS_ENV = "EPOXI_REGISTRY_ENABLE_AGENT_TLS_FOR_CHECKS"


class Secret(str):
    """A string that never shows in a repr (a config printed in a log keeps the token out)."""

    def __repr__(self) -> str:
        return "Secret(<hidden>)" if self else "Secret('')"


def read_secret(path: str) -> Secret:
    """The first line of a token file, stripped; ValueError naming the file if it has none."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ValueError(f"{path} holds no token")
    return Secret(secret)


def _policy(text: str) -> str:
    if text not in ("allow", "deny"):
        raise ValueError(f"{text!r} is not allow or deny")
    return text


def _duration(default: int, help: str) -> Any:
    """A duration setting in nanoseconds, written and parsed as Go does (``epoxi.durations``)."""
    return setting(
        default, parse=durations.parse, shown=durations.format(default), metavar="DURATION", help=help
    )


@dataclass
class RegistryConfig:
    """The agent settings the dev registry honours; defaults are Consul's (``agent/config/default.go``).

    Those with a ``setting`` are also flags of ``python -m devmesh.registry`` (durations in
    Go's form, like Consul's: ``10s``, ``1m``); the others are for in-process use.
    """

    node_name: str = setting(
        default_factory=socket.gethostname, flag="--node", shown="the host name", help="node name"
    )
    datacenter: str = setting("dc1", help="datacenter name")
    advertise_address: str = "127.0.0.1"
    session_ttl_min: int = _duration(10 * durations.SECOND, "shortest session TTL accepted")
    check_deregister_interval_min: int = _duration(
        durations.MINUTE, "shortest DeregisterCriticalServiceAfter honoured"
    )
    check_reap_interval: int = _duration(30 * durations.SECOND, "how often critical services are reaped")
    check_update_interval: int = _duration(
        5 * durations.MINUTE, "how long an output-only check change waits to reach the catalog"
    )
    default_query_time: int = 300 * durations.SECOND
    max_query_time: int = 600 * durations.SECOND
    # acl.enabled, acl.default_policy, acl.tokens.initial_management (read from a file, so the
    # token never shows in ps); each also from the environment, so one Mesh env configures it.
    acl_enabled: bool = setting(
        False,
        parse=parse_bool,
        env=ACL_ENABLED_ENV,
        metavar="BOOL",
        shown="false",
        help="enforce ACL tokens (acl.enabled)",
    )
    acl_default_policy: str = setting(
        "allow",
        parse=_policy,
        env=ACL_DEFAULT_POLICY_ENV,
        metavar="allow|deny",
        help="what a token may do where no policy says (acl.default_policy)",
    )
    acl_initial_management_token: Secret = setting(
        Secret(""),
        parse=read_secret,
        flag="--acl-initial-management-token-file",
        env=ACL_INITIAL_MANAGEMENT_TOKEN_FILE_ENV,
        metavar="FILE",
        shown="none",
        help="file holding the management token (acl.tokens.initial_management)",
    )
    # enable_agent_tls_for_checks, and tls.defaults.ca_file / cert_file / key_file: what TLS
    # gRPC checks verify servers with and present (see devmesh.registry.check_tls).
    enable_agent_tls_for_checks: bool = setting(
        False,
        parse=parse_bool,
        env=TLS_FOR_CHECKS_ENV,
        metavar="BOOL",
        shown="false",
        help="TLS gRPC checks use the --tls-* files below (enable_agent_tls_for_checks)",
    )
    tls_ca_file: str = setting(
        "",
        flag="--tls-ca-file",
        env=("EPOXI_REGISTRY_TLS_CA_FILE", "EPOXI_TLS_CA"),
        metavar="FILE",
        help="PEM CA bundle TLS gRPC checks verify servers with (tls.defaults.ca_file; default: the system's)",
    )
    tls_cert_file: str = setting(
        "",
        flag="--tls-cert-file",
        env=("EPOXI_REGISTRY_TLS_CERT_FILE", "EPOXI_TLS_CERT"),
        metavar="FILE",
        help="PEM client certificate TLS gRPC checks present (tls.defaults.cert_file)",
    )
    tls_key_file: str = setting(
        "",
        flag="--tls-key-file",
        env=("EPOXI_REGISTRY_TLS_KEY_FILE", "EPOXI_TLS_KEY"),
        metavar="FILE",
        help="PEM key of --tls-cert-file (tls.defaults.key_file)",
    )


@dataclass
class Service:
    """A service instance (Consul's ``NodeService``)."""

    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    kind: str = ""
    create_index: int = 0
    modify_index: int = 0

    def same(self, other: Service | None) -> bool:
        return other is not None and replace(other, create_index=0, modify_index=0) == replace(
            self, create_index=0, modify_index=0
        )


@dataclass
class Check:
    """A health check (Consul's ``HealthCheck``)."""

    node: str
    check_id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    type: str = ""
    interval: str = ""
    timeout: str = ""
    create_index: int = 0
    modify_index: int = 0

    def same(self, other: Check | None) -> bool:
        return other is not None and replace(other, create_index=0, modify_index=0) == replace(
            self, create_index=0, modify_index=0
        )


@dataclass
class CheckSpec:
    """How a check is run (the parts of Consul's ``CheckType`` the agent acts on); durations in ns."""

    ttl: int = 0
    grpc: str = ""
    grpc_use_tls: bool = False
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    interval: int = 0
    timeout: int = 0
    deregister_critical_service_after: int = 0
    success_before_passing: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0


@dataclass
class LocalCheck:
    check: Check
    spec: CheckSpec
    critical_since: float | None = None
    deferred_sync: asyncio.TimerHandle | None = None


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    flags: int = 0
    session: str = ""
    lock_index: int = 0
    create_index: int = 0
    modify_index: int = 0


@dataclass
class Session:
    id: str
    node: str
    name: str = ""
    lock_delay: int = 15 * durations.SECOND
    behavior: str = "release"
    ttl: str = ""
    node_checks: list[str] | None = None
    service_checks: list[dict[str, Any]] | None = None
    checks: list[str] | None = None
    create_index: int = 0
    modify_index: int = 0

    def check_ids(self) -> list[str]:
        """``Session.CheckIDs``: the deprecated ``Checks``, then ``NodeChecks``, then ``ServiceChecks``."""
        ids = list(self.checks or [])
        ids += list(self.node_checks or [])
        ids += [str(check.get("ID", "")) for check in self.service_checks or []]
        return ids

    def names_check(self, check_id: str) -> bool:
        """Whether the session is tied to this check (the ``session_checks`` index folds case)."""
        return check_id.lower() in (named.lower() for named in self.check_ids())


class StoreError(Exception):
    """An error a Consul server's state store or RPC layer returns; the HTTP layer answers 500."""


class Store:
    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config or RegistryConfig()
        self.index = 0
        self.tables: dict[str, int] = {}
        self.service_indexes: dict[str, int] = {}
        self.extinction_index = 0
        self.node_id = str(uuid.uuid4())
        self.node_created = 0
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.local_services: dict[str, Service] = {}
        self.local_checks: dict[str, LocalCheck] = {}
        self.kv: dict[str, KVEntry] = {}
        self.tombstones: dict[str, int] = {}
        self.lock_delays: dict[str, float] = {}
        self.sessions: dict[str, Session] = {}
        self.on_session_destroyed: list[Callable[[str], None]] = []
        self._changed = asyncio.Event()
        self._bootstrap()

    # --- index and change notification ---------------------------------------------------------

    @property
    def changed(self) -> asyncio.Event:
        """An event set by the next write; take it before reading so no change is missed."""
        return self._changed

    def record(self, table: str) -> int:
        """One write to ``table`` alone (e.g. an ACL token): its index."""
        return self._write((table,))

    def _write(self, tables: Iterable[str] = (), services: Iterable[str] = ()) -> int:
        self.index += 1
        for table in tables:
            self.tables[table] = self.index
        for name in services:
            self.service_indexes[name.lower()] = self.index
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self.index

    def table_index(self, *tables: str) -> int:
        return max((self.tables.get(table, 0) for table in tables), default=0)

    def service_index(self, name: str, with_checks: bool) -> int:
        """``maxIndexForService``: the service's own index, else the last extinction, else the catalog's."""
        index = self.service_indexes.get(name.lower())
        if index is not None:
            return index
        if self.extinction_index:
            return self.extinction_index
        tables = ("nodes", "services", "checks") if with_checks else ("nodes", "services")
        return self.table_index(*tables)

    # --- node -----------------------------------------------------------------------------------

    def _bootstrap(self) -> None:
        self._write(("raft",))  # Raft's own first entry: no user-visible query ever has index 1
        index = self._write(("nodes", "services", "checks"), ("consul",))
        self.node_created = index
        self.services["consul"] = Service(
            id="consul",
            name="consul",
            port=8300,
            meta={
                "non_voter": "false",
                "raft_version": "3",
                "read_replica": "false",
                "serf_protocol_current": "2",
                "serf_protocol_max": "5",
                "serf_protocol_min": "1",
                "version": CONSUL_VERSION,
            },
            create_index=index,
            modify_index=index,
        )
        self.checks[SERF_CHECK_ID] = Check(
            node=self.config.node_name,
            check_id=SERF_CHECK_ID,
            name="Serf Health Status",
            status=PASSING,
            output="Agent alive and reachable",
            create_index=index,
            modify_index=index,
        )

    def node_json(self) -> dict[str, Any]:
        address = self.config.advertise_address
        return {
            "ID": self.node_id,
            "Node": self.config.node_name,
            "Address": address,
            "Datacenter": self.config.datacenter,
            "TaggedAddresses": {"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address},
            "Meta": {"consul-network-segment": "", "consul-version": CONSUL_VERSION},
            "CreateIndex": self.node_created,
            "ModifyIndex": self.node_created,
        }

    # --- catalog ----------------------------------------------------------------------------------

    def instances(self, name: str) -> list[Service]:
        """Instances of a service name (case-insensitive, as Consul's index is), by service ID."""
        wanted = name.lower()
        return sorted((s for s in self.services.values() if s.name.lower() == wanted), key=lambda s: s.id)

    def checks_of(self, service_id: str) -> list[Check]:
        node_checks = [c for c in self.checks.values() if not c.service_id]
        own = [c for c in self.checks.values() if c.service_id == service_id]
        return sorted(node_checks, key=lambda c: c.check_id) + sorted(own, key=lambda c: c.check_id)

    def _catalog_register(self, service: Service | None, checks: list[Check]) -> None:
        """One ``Catalog.Register`` RPC: the service and its out-of-sync checks under one index."""
        existing = self.services.get(service.id) if service else None
        service_changed = service is not None and not service.same(existing)
        changed = [c for c in checks if not c.same(self.checks.get(c.check_id))]
        if not service_changed and not changed:
            return
        tables = (["services"] if service_changed else []) + (["checks"] if changed else [])
        names = self._names_touched_by(changed)
        if service is not None and service_changed:
            names.add(service.name)
        renamed = (
            existing.name if existing and service and existing.name.lower() != service.name.lower() else None
        )
        index = self._write(tables, names)
        if service is not None and service_changed:
            stored = replace(
                service, create_index=existing.create_index if existing else index, modify_index=index
            )
            self.services[service.id] = stored
        for check in changed:
            previous = self.checks.get(check.check_id)
            self.checks[check.check_id] = replace(
                check, create_index=previous.create_index if previous else index, modify_index=index
            )
        if renamed and not self.instances(renamed):
            self.extinction_index = index
            self.service_indexes.pop(renamed.lower(), None)
        for check in changed:
            if check.status == CRITICAL:
                self._invalidate_sessions_of_check(check.check_id)

    def _names_touched_by(self, checks: Iterable[Check]) -> set[str]:
        """Services whose index a check change moves: its own, or every service of the node for
        a node check (``updateAllServiceIndexesOfNode`` in ``agent/consul/state/catalog.go``)."""
        names: set[str] = set()
        for check in checks:
            if check.service_name:
                names.add(check.service_name)
            elif not check.service_id:
                names.update(s.name for s in self.services.values())
        return names

    def _catalog_deregister(self, service_id: str) -> None:
        service = self.services.get(service_id)
        if service is None:
            return
        index = self._write(("services", "checks"), (service.name,))
        del self.services[service_id]
        doomed = [c.check_id for c in self.checks.values() if c.service_id == service_id]
        for check_id in doomed:
            del self.checks[check_id]
        if not self.instances(service.name):
            self.extinction_index = index
            self.service_indexes.pop(service.name.lower(), None)
        for check_id in doomed:
            self._invalidate_sessions_of_check(check_id)

    def _catalog_deregister_check(self, check_id: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            return
        self._write(("checks",), self._names_touched_by([check]))
        del self.checks[check_id]
        self._invalidate_sessions_of_check(check_id)

    # --- agent-local state ------------------------------------------------------------------------

    def add_service(self, service: Service, checks: list[tuple[Check, CheckSpec]]) -> None:
        """``Agent.AddService``: keep state of re-registered checks, sync the catalog."""
        self.local_services[service.id] = service
        self._catalog_register(replace(service), self._add_local_checks(checks))

    def add_check(self, check: Check, spec: CheckSpec) -> None:
        """``Agent.AddCheck`` of one check (``/v1/agent/check/register``, maintenance mode):
        keep the state of a re-registered check, sync the catalog."""
        self._catalog_register(None, self._add_local_checks([(check, spec)]))

    def _add_local_checks(self, checks: list[tuple[Check, CheckSpec]]) -> list[Check]:
        """Store the agent's checks, carrying over the status and output of re-registered ones;
        copies to sync to the catalog."""
        synced: list[Check] = []
        for check, spec in checks:
            old = self.local_checks.get(check.check_id)
            if old is not None:
                check.status, check.output = old.check.status, old.check.output
                if old.deferred_sync is not None:
                    old.deferred_sync.cancel()
            local = LocalCheck(check=check, spec=spec)
            if old is not None:
                local.critical_since = old.critical_since
            self.local_checks[check.check_id] = local
            synced.append(replace(check))
        return synced

    def remove_service(self, service_id: str) -> bool:
        if self.local_services.pop(service_id, None) is None:
            return False
        for check_id in [cid for cid, lc in self.local_checks.items() if lc.check.service_id == service_id]:
            self._drop_local_check(check_id)
        self._catalog_deregister(service_id)
        return True

    def remove_check(self, check_id: str) -> None:
        if check_id in self.local_checks:
            self._drop_local_check(check_id)
            self._catalog_deregister_check(check_id)

    def _drop_local_check(self, check_id: str) -> None:
        local = self.local_checks.pop(check_id)
        if local.deferred_sync is not None:
            local.deferred_sync.cancel()

    def update_check(self, check_id: str, status: str, output: str) -> None:
        """``State.UpdateCheck``: track critical time, defer output-only changes, sync status at once."""
        local = self.local_checks.get(check_id)
        if local is None:
            return
        if status == CRITICAL:
            if local.critical_since is None:
                local.critical_since = time.monotonic()
        else:
            local.critical_since = None
        check = local.check
        if check.status == status and check.output == output:
            return
        interval = self.config.check_update_interval
        if interval > 0 and check.status == status:
            check.output = output
            if local.deferred_sync is None:
                delay = (interval / 2 + random.uniform(0, interval)) / durations.SECOND
                local.deferred_sync = asyncio.get_running_loop().call_later(
                    delay, self._deferred_sync, check_id
                )
            return
        check.status, check.output = status, output
        self._catalog_register(None, [replace(check)])

    def _deferred_sync(self, check_id: str) -> None:
        local = self.local_checks.get(check_id)
        if local is not None:
            local.deferred_sync = None
            self._catalog_register(None, [replace(local.check)])

    # --- KV (``agent/consul/state/kvs.go``) -------------------------------------------------------

    def kv_max_index(self) -> int:
        return self.table_index("kvs", "tombstones")

    def kv_list(self, prefix: str) -> tuple[int, list[KVEntry]]:
        entries = sorted((e for k, e in self.kv.items() if k.startswith(prefix)), key=lambda e: e.key)
        table = self.kv_max_index()
        if prefix == "":
            return table, entries
        index = max((e.modify_index for e in entries), default=0)
        index = max([index, *(i for k, i in self.tombstones.items() if k.startswith(prefix))])
        return (index or table), entries

    def _kv_store(self, entry: KVEntry, keep_session: bool) -> None:
        existing = self.kv.get(entry.key)
        if keep_session:
            entry.session = existing.session if existing else ""
        entry.create_index = existing.create_index if existing else 0
        if existing is not None and (
            existing.value or b"",
            existing.flags,
            existing.session,
            existing.lock_index,
        ) == (
            entry.value or b"",
            entry.flags,
            entry.session,
            entry.lock_index,
        ):
            self._write()  # the Raft entry is applied, but the row is unchanged
            return
        index = self._write(("kvs",))
        entry.create_index = entry.create_index or index
        entry.modify_index = index
        self.kv[entry.key] = entry

    def kv_set(self, key: str, value: bytes | None, flags: int) -> None:
        self._kv_store(KVEntry(key=key, value=value, flags=flags), keep_session=True)

    def kv_cas(self, key: str, value: bytes | None, flags: int, cas: int) -> bool:
        existing = self.kv.get(key)
        if (cas == 0 and existing is not None) or (
            cas != 0 and (existing is None or existing.modify_index != cas)
        ):
            self._write()
            return False
        self.kv_set(key, value, flags)
        return True

    def kv_lock_delay_active(self, key: str) -> bool:
        return self.lock_delays.get(key, 0.0) > time.monotonic()

    def kv_lock(self, key: str, value: bytes | None, flags: int, session: str) -> bool:
        if session == "":
            raise StoreError("missing session")
        if session not in self.sessions:
            raise StoreError(f"invalid session {durations.go_quote(session)}")
        existing = self.kv.get(key)
        lock_index = 1
        if existing is not None:
            if existing.session == session:
                lock_index = existing.lock_index
            elif existing.session:
                self._write()
                return False
            else:
                lock_index = existing.lock_index + 1
        self._kv_store(KVEntry(key, value, flags, session, lock_index), keep_session=False)
        return True

    def kv_unlock(self, key: str, value: bytes | None, flags: int, session: str) -> bool:
        if session == "":
            raise StoreError("missing session")
        existing = self.kv.get(key)
        if existing is None or existing.session != session:
            self._write()
            return False
        self._kv_store(KVEntry(key, value, flags, "", existing.lock_index), keep_session=False)
        return True

    def _kv_delete_locked(self, key: str, index: int) -> None:
        del self.kv[key]
        self.tombstones[key] = index

    def kv_delete(self, key: str) -> None:
        if key not in self.kv:
            self._write()
            return
        index = self._write(("kvs", "tombstones"))
        self._kv_delete_locked(key, index)

    def kv_delete_cas(self, key: str, cas: int) -> bool:
        existing = self.kv.get(key)
        if existing is None or existing.modify_index != cas:
            self._write()
            return existing is None
        self.kv_delete(key)
        return True

    def kv_delete_tree(self, prefix: str) -> None:
        doomed = [key for key in self.kv if key.startswith(prefix)]
        if not doomed:
            self._write()
            return
        index = self._write(("kvs", "tombstones") if prefix else ("kvs",))
        for key in doomed:
            del self.kv[key]
        if prefix:
            self.tombstones[prefix] = index

    # --- sessions (``agent/consul/state/session.go``) ---------------------------------------------

    def _catalog_check(self, check_id: str) -> Check | None:
        """A check of our node by ID, as the catalog's ``checks`` index finds it (case folded)."""
        check = self.checks.get(check_id)
        if check is None:
            check = next((c for c in self.checks.values() if c.check_id.lower() == check_id.lower()), None)
        return check

    def session_create(self, session: Session) -> None:
        """``sessionCreateTxn``: the node must exist and every check it names exist and not be
        critical (``validateSessionChecksTxn``), in ``Session.CheckIDs`` order."""
        if session.node.lower() != self.config.node_name.lower():
            raise StoreError("Missing node registration")
        for check_id in session.check_ids():
            check = self._catalog_check(check_id)
            if check is None:
                raise StoreError(f"Missing check '{check_id}' registration")
            if check.status == CRITICAL:
                raise StoreError(f"Check '{check_id}' is in {check.status} state")
        index = self._write(("sessions",))
        session.create_index = session.modify_index = index
        self.sessions[session.id] = session

    def session_destroy(self, session_id: str) -> None:
        """``deleteSessionTxn``: drop the session, release or delete its keys, arm their lock-delay
        (the session's, at most ``MAX_LOCK_DELAY``). An explicit ``?release`` arms none."""
        session = self.sessions.get(session_id)
        if session is None:
            self._write()
            return
        held = sorted(key for key, entry in self.kv.items() if entry.session == session_id)
        tables = ["sessions"]
        if held:
            tables += ["kvs", "tombstones"] if session.behavior == "delete" else ["kvs"]
        index = self._write(tables)
        del self.sessions[session_id]
        delay = min(session.lock_delay, MAX_LOCK_DELAY)
        expires = time.monotonic() + delay / durations.SECOND
        for key in held:
            if session.behavior == "delete":
                self._kv_delete_locked(key, index)
            else:
                entry = self.kv[key]
                entry.session = ""
                entry.modify_index = index
            if delay > 0:
                self.lock_delays[key] = expires
        for callback in self.on_session_destroyed:
            callback(session_id)

    def _invalidate_sessions_of_check(self, check_id: str) -> None:
        """``checkSessionsTxn``: a check that turns critical or is deleted ends the sessions tied
        to it (``ensureCheckTxn``, ``deleteCheckTxn``)."""
        for session in [s for s in self.sessions.values() if s.names_check(check_id)]:
            self.session_destroy(session.id)
