"""The ingress's /metrics after known SMTP sessions, in front of a real mesh in process (dev
registry, router, node, sink): sessions, messages by the reply they got, failed logins, and the
gRPC health checks it answered; and its registration naming where its metrics are."""

from __future__ import annotations

import base64
import smtplib

from devmesh.sink import Sink
from epoxi.observability.config import TelemetryConfig
from epoxi.registry.client import Consul
from services.ingress.main import RunningIngress
from tests.epoxi.runtime.certs import Pki
from tests.scrape import scrape
from tests.services.ingress.conftest import StartIngress
from tests.services.ingress.support import MESSAGE, client_tls, connect, host_port, in_thread

NO_HEADER = b"no header section, only a body line\r\n"


async def test_sessions_messages_and_failed_logins_are_counted(
    ingress: RunningIngress, pki: Pki, sink: Sink, consul: Consul
) -> None:
    def run() -> list[tuple[int, bytes]]:
        replies = []
        with connect(ingress.smtp_address, pki.ca) as smtp:  # session 1
            for data in (MESSAGE, MESSAGE, NO_HEADER):
                smtp.mail("alice@shop.test")
                smtp.rcpt("ann@a.test")
                replies.append(smtp.data(data))
        host, port = host_port(ingress.smtp_address)
        with smtplib.SMTP(host, port, local_hostname="client.test") as smtp:  # session 2
            smtp.starttls(context=client_tls(pki.ca))  # the same session still
            smtp.ehlo()
            for password in ("wrong", "also wrong"):  # one AUTH command each
                blob = base64.b64encode(f"\0alice\0{password}".encode()).decode()
                replies.append(smtp.docmd("AUTH", f"PLAIN {blob}"))
        return replies

    replies = await in_thread(run)
    assert [code for code, _ in replies] == [250, 250, 554, 535, 535], replies
    await sink.wait_for(1)  # the same message twice: the node spooled it once

    m = await scrape(f"http://{ingress.metrics_address}/metrics")
    assert m.value("epoxi_ingress_sessions_total") == 2
    assert m.value("epoxi_ingress_messages_total", outcome="accepted") == 2
    assert m.value("epoxi_ingress_messages_total", outcome="refused") == 1
    assert m.value("epoxi_ingress_messages_total", outcome="deferred") == 0
    assert m.value("epoxi_ingress_auth_failures_total") == 2
    assert m.value("epoxi_build_info", service="ingress") == 1
    # Its registry client answered (the router lookup) without an error.
    assert m.total("epoxi_registry_errors_total") == 0

    _, entries = await consul.health.service("epoxi-ingress")
    assert [e["Service"]["Meta"]["metrics"] for e in entries] == [ingress.metrics_address]


async def test_with_metrics_off_the_ingress_serves_none(start: StartIngress) -> None:
    ingress = await start(telemetry=TelemetryConfig(metrics_listen="off"))
    assert ingress.metrics_address == ""
    assert not ingress.handler.metrics.on
