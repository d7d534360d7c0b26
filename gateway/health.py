"""``GET /healthz``: 200 when the upstream answers gRPC health SERVING for its service, else 503.

The body of a 200 is ``{"status": "SERVING"}`` (``grpc.health.v1.HealthCheckResponse`` as JSON);
a 503 is a ``google.rpc.Status`` (UNAVAILABLE) saying why: no instance in the registry, no
answer, or the status it answered.
"""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import status_response
from gateway.upstream import NoUpstream, Upstream

# A health check answers at once or not at all; never wait the full RPC timeout for it.
MAX_PROBE_SECONDS = 5.0


class HealthProbe:
    def __init__(self, upstream: Upstream, service: str, timeout: float) -> None:
        self.upstream = upstream
        self.service = service
        self.timeout = min(timeout, MAX_PROBE_SECONDS)

    async def check(self) -> web.Response:
        try:
            channel = await self.upstream.channel()
        except NoUpstream as e:
            return _unavailable(str(e))
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.upstream.unavailable()
            return _unavailable(f"{self.service} health check failed: {e.code().name}: {e.details()}")
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return _unavailable(f"{self.service} answers health {status}")
        return web.json_response({"status": status})


def _unavailable(message: str) -> web.Response:
    return status_response(grpc.StatusCode.UNAVAILABLE, message)
