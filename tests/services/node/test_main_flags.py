"""The node's idle flags, and the flags ``devmesh.supervisor`` passes."""

from __future__ import annotations

import pytest

from services.node.main import NodeConfig, parse_config


def parse(argv: list[str]) -> NodeConfig:
    return parse_config(argv)


def test_connection_and_pipeline_idle_timeouts_are_separate_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EPOXI_NODE_CONNECTION_IDLE_TIMEOUT", "EPOXI_NODE_PIPELINE_IDLE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    c = parse(["--egress-ip", "10.0.0.1"])
    assert (c.connection_idle_timeout, c.pipeline_idle_timeout) == (2.0, 300.0)
    c = parse(["--connection-idle-timeout", "0", "--pipeline-idle-timeout", "90s"])
    assert (c.connection_idle_timeout, c.pipeline_idle_timeout) == (0.0, 90.0)
    assert parse(["--pipeline-idle-timeout", "0"]).pipeline_idle_timeout == 0.0  # never stop

    monkeypatch.setenv("EPOXI_NODE_CONNECTION_IDLE_TIMEOUT", "500ms")
    monkeypatch.setenv("EPOXI_NODE_PIPELINE_IDLE_TIMEOUT", "2m")
    c = parse([])
    assert (c.connection_idle_timeout, c.pipeline_idle_timeout) == (0.5, 120.0)


def test_the_old_ambiguous_flag_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--idle-timeout", "5s"])
    assert "unrecognized arguments: --idle-timeout" in capsys.readouterr().err


def test_the_flags_the_mesh_passes_still_parse() -> None:
    # As devmesh.supervisor.Mesh.start_node builds them.
    c = parse(
        [
            *["--id", "node1", "--listen", "127.0.0.1:0", "--ip-pool", "default"],
            *["--egress-ip", "127.0.0.2", "--egress-ip", "127.0.0.3"],
            *["--spool", "var/node1/spool.db", "--route", "*=127.0.0.1:2525"],
            *["--consul", "127.0.0.1:8500", "--check-interval", "1s"],
        ]
    )
    assert (c.id, list(c.egress_ips), dict(c.routes), c.consul, c.check_interval) == (
        "node1",
        ["127.0.0.2", "127.0.0.3"],
        {"*": "127.0.0.1:2525"},
        "127.0.0.1:8500",
        1.0,
    )
