"""``python -m devmesh.registry``'s flags: Consul's names, defaults and Go durations (in nanoseconds).

Here rather than in registry/, whose contract tests run once per registry backend.
"""

from __future__ import annotations

import socket

import pytest

from devmesh.registry.__main__ import parse
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
    ):
        assert flag in text
