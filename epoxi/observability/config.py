"""The telemetry settings every service shares: its log format and where it serves metrics.

Traces are configured by OpenTelemetry's own ``OTEL_*`` variables (``epoxi.observability.tracing``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from epoxi.settings import setting

LOG_FORMATS = ("text", "json")
OFF = "off"


def parse_log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"log format {text!r} is not one of {', '.join(LOG_FORMATS)}")
    return text


def parse_metrics_listen(text: str) -> str:
    if text == OFF:
        return text
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"metrics address {text!r} is not HOST:PORT or {OFF!r}")
    return text


@dataclass(frozen=True)
class TelemetryConfig:
    log_format: str = setting(
        "text",
        parse=parse_log_format,
        env="EPOXI_LOG_FORMAT",
        metavar="text|json",
        help="text: one readable line per record; json: one JSON object per line, with trace_id, "
        "routing_key and message_id where known",
    )
    metrics_listen: str = setting(
        "127.0.0.1:0",
        parse=parse_metrics_listen,
        env="EPOXI_METRICS_LISTEN",
        metavar="HOST:PORT|off",
        shown="127.0.0.1:0 (any free port)",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; off: collect and serve none",
    )

    @property
    def metrics_on(self) -> bool:
        return self.metrics_listen != OFF
