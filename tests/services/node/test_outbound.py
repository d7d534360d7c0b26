"""The node's delivery flags (``services.node.outbound``), and the sender and bouncer built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmesh.sink import Sink
from services.node.engine.smtp import SmtpSender
from services.node.engine.tls import TlsMode
from services.node.main import NodeConfig, parse_config, start_node
from services.node.outbound import DeliveryConfig
from tests.services.node.support import SOURCE_IP


def parse(argv: list[str]) -> NodeConfig:
    return parse_config(argv)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DNS", "TLS", "TLS_CAFILE", "HOST_BACKOFF", "DSN_FROM", "MAX_MESSAGES_PER_CONNECTION"):
        monkeypatch.delenv(f"EPOXI_NODE_{name}", raising=False)


def test_delivery_flags() -> None:
    args = parse(
        [
            "--dns=127.0.0.1:5353",
            "--ehlo=127.0.0.2=mta2.example.net",
            "--ehlo=::1=mta6.example.net",
            "--max-messages-per-connection=7",
            "--tls=verify",
            "--tls-cafile=/etc/ca.pem",
            "--host-backoff=2m",
            "--dsn-from=MAILER-DAEMON@node.example",
        ]
    )
    assert args.delivery == DeliveryConfig(
        dns="127.0.0.1:5353",
        ehlo_names={"127.0.0.2": "mta2.example.net", "::1": "mta6.example.net"},
        max_messages_per_connection=7,
        tls=TlsMode.VERIFY,
        tls_cafile="/etc/ca.pem",
        host_backoff=120.0,
        dsn_from="MAILER-DAEMON@node.example",
    )


def test_delivery_flags_default_to_the_environment_then_to_production_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse([]).delivery == DeliveryConfig()
    assert DeliveryConfig().max_messages_per_connection == 100
    assert DeliveryConfig().tls is TlsMode.OPPORTUNISTIC
    monkeypatch.setenv("EPOXI_NODE_DSN_FROM", "postmaster@node.example")
    monkeypatch.setenv("EPOXI_NODE_TLS", "required")
    d = parse([]).delivery
    assert (d.dsn_from, d.tls) == ("postmaster@node.example", TlsMode.REQUIRED)


@pytest.mark.parametrize(
    "flag",
    [
        "--ehlo=mta.example.net",
        "--ehlo=not-an-ip=mta.example.net",
        "--ehlo=127.0.0.2=not a name",
        "--dns=dns.example:53",
        "--max-messages-per-connection=0",
        "--tls=sometimes",
        "--dsn-from=MAILER-DAEMON",
    ],
)
def test_bad_delivery_flags_are_refused(flag: str) -> None:
    with pytest.raises(SystemExit):
        parse([flag])


async def test_the_node_sends_as_its_delivery_config_says(tmp_path: Path, sink: Sink) -> None:
    config = NodeConfig(
        id="n1",
        egress_ips=[SOURCE_IP],
        spool=tmp_path / "spool.db",
        routes={"*": sink.address},
        ehlo_name="n1.epoxi.test",
        delivery=DeliveryConfig(
            ehlo_names={SOURCE_IP: "mta2.epoxi.test"},
            max_messages_per_connection=3,
            dsn_from="MAILER-DAEMON@n1.epoxi.test",
        ),
    )
    running = await start_node(config)
    try:
        sender = running.supervisor.sender
        assert isinstance(sender, SmtpSender)
        assert (sender.ehlo_for(SOURCE_IP), sender.ehlo_for("127.0.0.3")) == (
            "mta2.epoxi.test",
            "n1.epoxi.test",
        )
        assert sender.max_messages_per_connection == 3
        bouncer = running.bouncer
        assert bouncer is not None
        assert (bouncer.dsn_from, bouncer.reporting_mta) == ("MAILER-DAEMON@n1.epoxi.test", "n1.epoxi.test")
    finally:
        await running.close()
    async with await start_node(NodeConfig(id="n2", spool=tmp_path / "n2.db")) as plain:
        assert plain.bouncer is None  # no --dsn-from: no DSNs
