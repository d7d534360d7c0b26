"""Helpers for the router tests."""

from __future__ import annotations

from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc
from services.router.main import RunningRouter


async def route(router: RunningRouter, *emails: email_pb2.Email) -> router_pb2.RouteEmailsResponse:
    """One RouteEmails call to ``router`` over real gRPC."""
    async with channel(router.address) as ch:
        reply: router_pb2.RouteEmailsResponse = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=emails), timeout=30
        )
        return reply
