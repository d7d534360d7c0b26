"""Helpers for the router tests."""

from __future__ import annotations

from epoxi.envelope import new_email
from epoxi.runtime.channels import channel
from epoxi.v1 import email_pb2, router_pb2, router_pb2_grpc
from services.router.main import RunningRouter
from tests.support import eventually


async def route(
    router: RunningRouter, *emails: email_pb2.Email, ip_pool: str = ""
) -> router_pb2.RouteEmailsResponse:
    """One RouteEmails call to ``router`` over real gRPC."""
    async with channel(router.address) as ch:
        reply: router_pb2.RouteEmailsResponse = await router_pb2_grpc.RouterServiceStub(ch).RouteEmails(
            router_pb2.RouteEmailsRequest(emails=emails, ip_pool=ip_pool), timeout=30
        )
        return reply


def email(*to: str, ip: str = "", pool: str = "", **fields: object) -> email_pb2.Email:
    """An email the router accepts, to ``to``, from ``ip`` (or a pool) when given."""
    return new_email(
        "a@sender.test",
        to=list(to),
        subject="s",
        text="t",
        delivery=email_pb2.Delivery(ip=ip, ip_pool=pool),
        **fields,
    )


async def sees(router: RunningRouter, *node_ids: str) -> None:
    """Until ``router``'s view shows these nodes passing."""

    async def shown() -> bool:
        return set(node_ids) <= router.view.snapshot().nodes.keys()

    await eventually(shown)
