"""docker-compose.yml's invariants (docker is not run here: the file is parsed), and the secrets
scripts/compose_secrets.py makes, read by the same loaders the services use."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from epoxi import settings
from epoxi.runtime.tls import TlsFiles
from epoxi.runtime.tokens import read_tokens
from services.ingress import users

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# What an operator needs, and nothing else: the gateway, SMTP, the router's gRPC for clients,
# and the Consul UI on this machine only.
PUBLISHED = {"gateway": ["8080:8080"], "ingress": ["587:587"], "router": ["50051:50051"]}
PUBLISHED_LOCALLY = {"consul": ["127.0.0.1:8500:8500"]}
# The Epoxi gRPC services: their healthcheck is a gRPC health check of their --listen port.
GRPC_SERVICES = ("node1", "node2", "router", "monitor", "ingress")
EPOXI_SERVICES = (*GRPC_SERVICES, "gateway")


def long_running() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in SERVICES.items() if s.get("restart") != "no"}


def command(service: dict[str, Any]) -> list[str]:
    raw = service["command"]
    return shlex.split(raw) if isinstance(raw, str) else list(raw)


def flag(service: dict[str, Any], name: str) -> str:
    args = command(service)
    return args[args.index(name) + 1]


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in long_running().items():
        assert service.get("healthcheck", {}).get("test"), name


def test_one_shot_jobs_are_waited_for_until_they_complete() -> None:
    for name, service in SERVICES.items():
        if service.get("restart") == "no":
            waiting = [s for s in SERVICES.values() if name in (s.get("depends_on") or {})]
            assert waiting, f"nothing waits for {name}"
            for other in waiting:
                assert other["depends_on"][name]["condition"] == "service_completed_successfully"


def test_grpc_services_are_checked_with_the_grpc_health_probe() -> None:
    for name in GRPC_SERVICES:
        service = SERVICES[name]
        port = flag(service, "--listen").rpartition(":")[2]
        assert service["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            "epoxi.runtime.probe",
            f"127.0.0.1:{port}",
        ], name
    assert "/healthz" in " ".join(SERVICES["gateway"]["healthcheck"]["test"])  # gRPC health of the monitor


def test_only_what_an_operator_needs_is_published() -> None:
    published = {name: s["ports"] for name, s in SERVICES.items() if s.get("ports")}
    assert published == {**PUBLISHED, **PUBLISHED_LOCALLY}
    for name, service in SERVICES.items():
        assert "network_mode" not in service, name


def test_every_registry_client_has_its_consul_token_from_a_file() -> None:
    for name in EPOXI_SERVICES:
        env = SERVICES[name]["environment"]
        assert env["CONSUL_HTTP_ADDR"] == "consul:8500", name
        token_file = env["CONSUL_HTTP_TOKEN_FILE"]
        assert "CONSUL_HTTP_TOKEN" not in env, name
        mounts = SERVICES[name]["volumes"]
        assert any(token_file.startswith(m.split(":")[1] + "/") and m.endswith(":ro") for m in mounts), name


def test_every_grpc_hop_is_mutual_tls_with_tokens() -> None:
    for name in EPOXI_SERVICES:
        env = SERVICES[name]["environment"]
        assert env["EPOXI_TLS_CLIENT_AUTH"] == "require", name
        for key in (
            "EPOXI_TLS_CA",
            "EPOXI_TLS_CERT",
            "EPOXI_TLS_KEY",
            "EPOXI_TOKENS_FILE",
            "EPOXI_TOKEN_FILE",
        ):
            secret = env[key].removeprefix("/run/secrets/")
            assert secret in SERVICES[name]["secrets"], (name, key)


def test_consul_enforces_acls_with_default_deny_and_tls_checks() -> None:
    agent = (ROOT / "compose" / "consul" / "agent.hcl").read_text()
    assert re.search(r"acl\s*\{[^}]*enabled\s*=\s*true[^}]*default_policy\s*=\s*\"deny\"", agent, re.S)
    assert re.search(r"^enable_agent_tls_for_checks\s*=\s*true", agent, re.M)
    script = SERVICES["consul"]["command"][0]
    assert "initial_management" in script and "/run/secrets/consul_management_token" in script


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def test_no_literal_secrets() -> None:
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search("TOKEN|PASSWORD|SECRET|KEY", key):
                assert str(value).startswith("/run/"), f"{name}: {key} holds a value, not a file"
    for text in _strings(COMPOSE):
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text), text
        assert not re.search(r"[A-Za-z0-9_-]{32,}", text.replace("/", " ")), text
    for secret in COMPOSE["secrets"].values():
        assert secret["file"].startswith("./secrets/")


def make_secrets(directory: Path) -> str:
    done = subprocess.run(
        [sys.executable, "scripts/compose_secrets.py", "--dir", str(directory)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def test_the_secrets_script_makes_every_secret_and_the_services_can_read_them(tmp_path: Path) -> None:
    assert make_secrets(tmp_path).startswith("made ")
    for name, secret in COMPOSE["secrets"].items():
        path = tmp_path / Path(secret["file"]).name
        assert path.is_file(), name
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    TlsFiles.read(tmp_path / "mesh.pem", tmp_path / "mesh-key.pem", tmp_path / "ca.pem")
    TlsFiles.read(tmp_path / "consul.pem", tmp_path / "consul-key.pem", tmp_path / "ca.pem")
    tokens = read_tokens(str(tmp_path / "epoxi-tokens"), "epoxi-tokens")
    assert set(tokens.names) == {"mesh", "operator"}
    assert users.load(str(tmp_path / "ingress-users.toml")) is not None
    # Made once: a second run keeps what is there.
    before = (tmp_path / "consul-management-token").read_text()
    assert make_secrets(tmp_path) == f"{tmp_path}: nothing missing\n"
    assert (tmp_path / "consul-management-token").read_text() == before


CONFIGS = {
    "node1": "services.node.main:NodeConfig",
    "node2": "services.node.main:NodeConfig",
    "router": "services.router.main:RouterConfig",
    "monitor": "services.monitor.main:MonitorConfig",
    "gateway": "gateway.main:GatewayConfig",
    "ingress": "services.ingress.main:IngressConfig",
}


@pytest.mark.parametrize("name", EPOXI_SERVICES)
def test_every_command_parses_with_the_service_s_own_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flag that does not exist (or a value it refuses) would stop the container at start."""
    service = SERVICES[name]
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, str(value))
    args = command(service)
    args = args[2:] if args[0] == "epoxi" else args[3:]  # "epoxi node ..." / "python -m services.ingress ..."
    module, _, cls = CONFIGS[name].partition(":")
    config = settings.parse(getattr(importlib.import_module(module), cls), args)
    assert config is not None
