"""The echo service of echo.proto: its descriptor, compiled with protoc at test time, and a servicer."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import google.api
import grpc
import grpc_tools
from google.api import (
    annotations_pb2,  # noqa: F401  (registers google.api.http before the echo file)
    httpbody_pb2,  # noqa: F401
)
from google.protobuf import (
    descriptor,
    descriptor_pb2,
    descriptor_pool,
    message,
    message_factory,
    timestamp_pb2,  # noqa: F401
    wrappers_pb2,  # noqa: F401
)
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

ECHO_PROTO = Path(__file__).with_name("echo.proto")
# The media types the echo gateway takes for EchoRequest.raw (Upload); blob (UploadAny) takes any.
ECHO_MEDIA_TYPES = {"epoxi.gatewaytest.v1.EchoRequest.raw": ["text/csv", "application/x-ndjson"]}


@functools.cache
def echo_service() -> descriptor.ServiceDescriptor:
    """Compile echo.proto with protoc and load it into the default descriptor pool, once."""
    includes = [
        ECHO_PROTO.parent,
        Path(grpc_tools.__file__).parent / "_proto",
        Path(google.api.__path__[0]).parent.parent,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "echo.pb"
        rc = protoc.main(
            ["protoc", *(f"-I{p}" for p in includes), f"--descriptor_set_out={out}", ECHO_PROTO.name]
        )
        assert rc == 0, f"protoc failed on {ECHO_PROTO}"
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.Default()
    for file in files.file:
        pool.Add(file)
    return pool.FindServiceByName("epoxi.gatewaytest.v1.EchoService")


def message_class(name: str) -> type[message.Message]:
    return message_factory.GetMessageClass(echo_service().file.pool.FindMessageTypeByName(name))


class EchoServicer:
    """Answers every method with the request it received; ``Fail`` aborts with the requested code
    (INVALID_ARGUMENT when it names no error status)."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, Any]] = []
        # Built at run time from the descriptor, so no stub types its fields.
        self.response_class: Any = message_class("epoxi.gatewaytest.v1.EchoResponse")

    def handler(self) -> grpc.GenericRpcHandler:
        service = echo_service()
        request_class = message_class("epoxi.gatewaytest.v1.EchoRequest")
        handlers = {
            m.name: grpc.unary_unary_rpc_method_handler(
                functools.partial(self._answer, m.name),
                request_deserializer=request_class.FromString,
                response_serializer=lambda r: r.SerializeToString(),
            )
            for m in service.methods
        }
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    async def _answer(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.metadata = list(context.invocation_metadata() or ())
        if method == "Fail":
            code = next(
                (c for c in grpc.StatusCode if c.value[0] == request.code and c is not grpc.StatusCode.OK),
                None,
            )
            if code is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"no error status has code {request.code}"
                )
            if request.verbose:
                detail = error_details_pb2.ErrorInfo(reason="ECHO_FAILED", domain="epoxi.test")
                status = status_pb2.Status(code=request.code, message=request.name)
                status.details.add().Pack(detail)
                rich = rpc_status.to_status(status)
                await context.abort(rich.code, rich.details, rich.trailing_metadata)
            await context.abort(code, request.name)
        return self.response_class(method=method, request=request)


class EchoServer:
    def __init__(self, server: grpc.aio.Server, servicer: EchoServicer, address: str) -> None:
        self.server = server
        self.servicer = servicer
        self.address = address
