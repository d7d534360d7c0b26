"""``python -m devmesh.registry``'s flags: Consul's names, defaults and Go durations (in nanoseconds).

Here rather than in registry/, whose contract tests run once per registry backend.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devmesh.registry.__main__ import main, parse
from devmesh.registry.app import create_app
from devmesh.registry.state import RegistryConfig
from epoxi import durations


def test_defaults_are_consuls() -> None:
    flags = parse([])
    assert flags.http_addr == ("127.0.0.1", 8500)
    assert flags.config == RegistryConfig()
    assert flags.config.node_name == socket.gethostname()
    assert flags.config.datacenter == "dc1"
    assert (
        flags.config.session_ttl_min,
        flags.config.check_deregister_interval_min,
        flags.config.check_reap_interval,
        flags.config.check_update_interval,
    ) == (10 * durations.SECOND, durations.MINUTE, 30 * durations.SECOND, 5 * durations.MINUTE)


def test_every_flag() -> None:
    flags = parse(
        [
            "--http-addr",
            "[::1]:0",
            "--node",
            "dev-node",
            "--datacenter",
            "dc2",
            "--session-ttl-min",
            "1s",
            "--check-deregister-interval-min",
            "0",
            "--check-reap-interval",
            "100ms",
            "--check-update-interval",
            "1m30s",
        ]
    )
    assert flags.http_addr == ("::1", 0)
    assert flags.config == RegistryConfig(
        node_name="dev-node",
        datacenter="dc2",
        session_ttl_min=durations.SECOND,
        check_deregister_interval_min=0,
        check_reap_interval=100 * durations.MILLISECOND,
        check_update_interval=90 * durations.SECOND,
    )


def test_no_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATACENTER", "dc9")
    monkeypatch.setenv("HTTP_ADDR", "127.0.0.1:1")
    flags = parse([])
    assert (flags.config.datacenter, flags.http_addr) == ("dc1", ("127.0.0.1", 8500))


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--http-addr", "8500"], "argument --http-addr: '8500' is not <host>:<port>"),
        (["--http-addr", "localhost:http"], "argument --http-addr: 'localhost:http' is not <host>:<port>"),
        (
            ["--check-reap-interval", "5"],
            'argument --check-reap-interval: time: missing unit in duration "5"',
        ),
        (["--session-ttl-min", "1x"], 'argument --session-ttl-min: time: unknown unit "x" in duration "1x"'),
    ],
)
def test_bad_values_are_refused_with_their_reason(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    assert exit.value.code == 2
    assert error in capsys.readouterr().err


def test_help_names_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--http-addr HTTP_ADDR",
        "--node NODE",
        "--datacenter DATACENTER",
        "--session-ttl-min DURATION",
        "--check-deregister-interval-min DURATION",
        "--check-reap-interval DURATION",
        "--check-update-interval DURATION",
        "--acl-enabled BOOL",
        "--acl-default-policy allow|deny",
        "--acl-initial-management-token-file FILE",
        "--enable-agent-tls-for-checks BOOL",
        "--tls-ca-file FILE",
        "--tls-cert-file FILE",
        "--tls-key-file FILE",
    ):
        assert flag in text


def test_acl_settings_from_flags(tmp_path: Path) -> None:
    token_file = tmp_path / "management"
    token_file.write_text("  c0ffee00-0000-4000-8000-000000000001\n")
    flags = parse(
        [
            "--acl-enabled",
            "true",
            "--acl-default-policy",
            "deny",
            "--acl-initial-management-token-file",
            str(token_file),
        ]
    )
    config = flags.config
    assert (config.acl_enabled, config.acl_default_policy) == (True, "deny")
    assert config.acl_initial_management_token == "c0ffee00-0000-4000-8000-000000000001"
    assert "c0ffee00" not in repr(config)  # a logged config never shows the token
    assert (parse([]).config.acl_enabled, parse([]).config.acl_default_policy) == (False, "allow")


def test_acl_and_tls_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One Mesh environment configures the registry: its own EPOXI_REGISTRY_* names, and for
    the gRPC checks' TLS the EPOXI_TLS_* every service reads."""
    token_file = tmp_path / "management"
    token_file.write_text("secret-token-1234\n")
    monkeypatch.setenv("EPOXI_REGISTRY_ACL_ENABLED", "1")
    monkeypatch.setenv("EPOXI_REGISTRY_ACL_DEFAULT_POLICY", "deny")
    monkeypatch.setenv("EPOXI_REGISTRY_ACL_INITIAL_MANAGEMENT_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("EPOXI_TLS_CA", "/ca.pem")
    monkeypatch.setenv("EPOXI_TLS_CERT", "/cert.pem")
    monkeypatch.setenv("EPOXI_TLS_KEY", "/key.pem")
    config = parse([]).config
    assert (config.acl_enabled, config.acl_default_policy, config.acl_initial_management_token) == (
        True,
        "deny",
        "secret-token-1234",
    )
    assert (config.tls_ca_file, config.tls_cert_file, config.tls_key_file) == (
        "/ca.pem",
        "/cert.pem",
        "/key.pem",
    )
    assert config.enable_agent_tls_for_checks is False  # Consul's default: the files are not used
    monkeypatch.setenv("EPOXI_REGISTRY_ENABLE_AGENT_TLS_FOR_CHECKS", "true")
    assert parse([]).config.enable_agent_tls_for_checks is True
    monkeypatch.setenv("EPOXI_REGISTRY_TLS_CA_FILE", "/registry-ca.pem")
    assert parse([]).config.tls_ca_file == "/registry-ca.pem"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--acl-enabled", "yes"], "argument --acl-enabled: 'yes' is not a boolean"),
        (
            ["--acl-default-policy", "extend-cache"],
            "argument --acl-default-policy: 'extend-cache' is not allow or deny",
        ),
        (["--acl-initial-management-token-file", "/nonexistent/t"], "cannot read /nonexistent/t"),
    ],
)
def test_bad_acl_values_are_refused(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)
    assert error in capsys.readouterr().err


def test_empty_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        parse(["--acl-initial-management-token-file", str(empty)])
    assert f"{empty} holds no token" in capsys.readouterr().err


def test_deny_without_a_management_token_is_refused() -> None:
    with pytest.raises(ValueError, match="need an initial management token"):
        create_app(RegistryConfig(acl_enabled=True, acl_default_policy="deny"))


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--acl-enabled", "true", "--acl-default-policy", "deny"],
            "registry: cannot start: ACLs with default policy deny need an initial management token",
        ),
        (
            ["--enable-agent-tls-for-checks", "true", "--tls-ca-file", "/nonexistent/ca.pem"],
            "registry: cannot start: tls.defaults.ca_file /nonexistent/ca.pem: cannot read it",
        ),
    ],
)
def test_unusable_settings_stop_the_cli_with_their_reason(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert error in capsys.readouterr().err
