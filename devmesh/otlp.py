"""A small OTLP trace receiver: the collector end of OTLP/gRPC, keeping the spans it is sent.

Tests point services at it (``OTEL_EXPORTER_OTLP_ENDPOINT=http://<address>``) and read
``spans``; benchmarks run it as a process of its own (``python -m devmesh.otlp``) so exporting
costs what it costs against a real collector. It answers ``Export`` as a collector does, after
decoding every span, with the protobuf types of ``opentelemetry-proto``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from epoxi.runtime.lifecycle import run_until_signalled


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex, as W3C writes it
    span_id: str
    parent_span_id: str  # empty for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int  # Status.StatusCode: 0 unset, 1 ok, 2 error
    status_message: str
    events: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """With ``keep=False`` it only counts the spans (``count``): a benchmark's receiver, which
    should take as little of the machine as a collector elsewhere would."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.count = 0
        self.requests = 0
        self.address = ""
        self._added = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        if not self.keep:
            self.count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes=_attributes(s.attributes),
                            resource=resource,
                            status_code=s.status.code,
                            status_message=s.status.message,
                            events=[e.name for e in s.events],
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        )
                    )
                    self.count += 1
        self._added.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self, listen: str = "127.0.0.1:0") -> str:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        self._server = server
        self.address = f"{listen.rpartition(':')[0]}:{port}"
        return self.address

    @property
    def endpoint(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set to for the exporter to reach this receiver."""
        return f"http://{self.address}"

    async def wait_for(self, done: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
        """Wait until ``done(spans)`` (bound it with ``asyncio.timeout``); the spans then."""
        while not done(self.spans):
            self._added.clear()
            await self._added.wait()
        return self.spans

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devmesh.otlp", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:4317", help="host:port for OTLP/gRPC (port 0: any)")
    parser.add_argument("--count-only", action="store_true", help="count the spans, keep nothing")
    args = parser.parse_args(argv)

    async def serve(stop: asyncio.Event) -> None:
        receiver = OtlpReceiver(keep=not args.count_only)
        print(f"otlp listening on {await receiver.start(args.listen)}", flush=True)
        try:
            await stop.wait()
        finally:
            await receiver.close()
            print(f"otlp received {receiver.count} spans in {receiver.requests} requests", flush=True)

    asyncio.run(run_until_signalled(serve))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
