"""The one service lifecycle: the order of the steps on close, after a whole start or a failed one.

The server is a fake that records each call (and what the registry listed at that moment); the
registrations are real ones, against the dev registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import weakref
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epoxi.registry.client import Consul, RegistryError, connect
from epoxi.runtime.lifecycle import YOUNG_COLLECTION_EVERY, Service, advertised_address, settle_heap
from tests.support import unused_address


class FakeServer:
    """The lifecycle's ``Server``: records its calls, and which services were registered then."""

    def __init__(self, events: list[str], consul: Consul, fail_not_serving: bool = False) -> None:
        self.events = events
        self.consul = consul
        self.fail_not_serving = fail_not_serving

    async def registered(self) -> list[str]:
        return sorted(await self.consul.agent.services())

    async def serving(self) -> None:
        self.events.append("serving")

    async def not_serving(self) -> None:
        if self.fail_not_serving:
            raise RuntimeError("health is broken")
        self.events.append(f"not serving; registered {await self.registered()}")

    async def stop(self, grace: float) -> None:
        self.events.append(f"stop with grace {grace}; registered {await self.registered()}")


class Client:
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    async def close(self) -> None:
        self.events.append(f"close {self.name}")


@contextlib.asynccontextmanager
async def store(events: list[str]) -> AsyncIterator[str]:
    yield "store"
    events.append("exit store")


async def register_b(service: Service, consul: Consul, events: list[str]) -> None:
    """Service ``b``, registered through ``Service.register`` with a deregistration that is recorded."""

    async def deregister() -> None:
        events.append("deregister b")
        await consul.agent.service.deregister("b")

    await service.register(
        "service b", lambda: consul.agent.service.register("epoxi-test", service_id="b"), deregister
    )


async def test_close_turns_away_deregisters_stops_then_closes_in_that_order(consul: Consul) -> None:
    events: list[str] = []
    started = asyncio.Event()

    async def background() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("background task cancelled")
            raise

    service = Service("test", grace=2.5)
    async with service.starting():
        service.closing(Client("client", events))
        assert await service.open(store(events)) == "store"

        async def callback() -> None:
            events.append("close callback")

        service.on_close(callback)
        await service.attach(FakeServer(events, consul), "test.example:1")
        await service.register_service(consul, {"name": "epoxi-test", "service_id": "a"})
        await register_b(service, consul, events)
        service.run(background(), "background")
    await started.wait()
    assert service.address == "test.example:1"
    assert sorted(await consul.agent.services()) == ["a", "b"]
    assert events == ["serving"]

    await service.close()

    assert events == [
        "serving",
        "not serving; registered ['a', 'b']",  # 1. health first, still registered
        "background task cancelled",  # 2. nothing can re-register behind our back
        "deregister b",  # 3. newest first, then a
        "stop with grace 2.5; registered []",  # 4. the server stops once the registry has let go
        "close callback",  # 5. what was opened, newest first
        "exit store",
        "close client",
    ]
    await service.close()  # a second close does nothing
    assert len(events) == 8


async def test_a_failed_start_stops_what_was_started(consul: Consul) -> None:
    events: list[str] = []
    service = Service("test", grace=1.0)
    with pytest.raises(RuntimeError, match="half-way"):
        async with service.starting():
            service.closing(Client("client", events))
            await service.attach(FakeServer(events, consul), "test.example:1")
            await service.register_service(consul, {"name": "epoxi-test", "service_id": "a"})
            raise RuntimeError("half-way")

    assert events == [
        "serving",
        "not serving; registered ['a']",
        "stop with grace 1.0; registered []",
        "close client",
    ]
    assert await consul.agent.services() == {}


async def test_a_start_that_fails_before_serving_closes_what_was_opened() -> None:
    events: list[str] = []
    service = Service("test")
    with pytest.raises(RuntimeError, match="no server"):
        async with service.starting():
            service.closing(Client("first", events))
            service.closing(Client("second", events))
            raise RuntimeError("no server")

    assert events == ["close second", "close first"]


async def test_a_failed_registration_still_stops_the_server_and_closes_the_clients(
    consul: Consul, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    service = Service("test", grace=1.0)
    unreachable = connect(unused_address())
    with pytest.raises(RegistryError):
        async with service.starting():
            service.closing(unreachable)
            service.closing(Client("client", events))
            await service.attach(FakeServer(events, consul), "test.example:1")
            await service.register_service(unreachable, {"name": "epoxi-test", "service_id": "a"})

    assert events == [
        "serving",
        "not serving; registered []",
        "stop with grace 1.0; registered []",
        "close client",
    ]
    assert "test: deregistering service a failed" in caplog.text
    assert unreachable.http._session.closed


async def test_a_failing_step_is_logged_and_the_later_steps_still_run(
    consul: Consul, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    service = Service("test", grace=1.0)
    async with service.starting():
        service.closing(Client("client", events))
        await service.attach(FakeServer(events, consul, fail_not_serving=True), "test.example:1")
        await register_b(service, consul, events)

    with caplog.at_level(logging.ERROR):
        await service.close()

    assert events == ["serving", "deregister b", "stop with grace 1.0; registered []", "close client"]
    assert "test: turning health NOT_SERVING failed" in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "::", ""])
def test_a_wildcard_listen_address_advertises_the_hosts_name(host: str) -> None:
    assert advertised_address(f"{host}:0", 50051) == f"{socket.getfqdn()}:50051"


@pytest.mark.parametrize(
    ("listen", "advertised"),
    [
        ("127.0.0.1:0", "127.0.0.1:4242"),
        ("127.0.0.1:4242", "127.0.0.1:4242"),
        ("router.example:0", "router.example:4242"),
        ("[::1]:0", "[::1]:4242"),
    ],
)
def test_a_specific_listen_address_is_advertised_as_it_is(listen: str, advertised: str) -> None:
    assert advertised_address(listen, 4242) == advertised


async def test_listen_knows_the_address_before_the_server_starts() -> None:
    service = Service("bound")
    async with service.starting():
        server = service.listen("127.0.0.1:0")
        assert service.address == f"127.0.0.1:{server.port}"  # known before any servicer exists
        await service.serve([])
    async with grpc.aio.insecure_channel(service.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await service.close()


async def test_a_start_that_fails_after_listen_releases_the_port() -> None:
    service = Service("half-started")
    with pytest.raises(RuntimeError, match="before serving"):
        async with service.starting():
            port = service.listen("127.0.0.1:0").port
            raise RuntimeError("before serving")
    again = Service("again")
    async with again.starting():
        again.listen(f"127.0.0.1:{port}")  # free again: the half-started server was stopped
    await again.close()


def test_a_started_service_freezes_its_heap_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    ref = weakref.ref(Cycle())  # a cycle only a collection frees
    try:
        settle_heap()
        assert ref() is None  # collected before the freeze, not frozen for good
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class Cycle:
    def __init__(self) -> None:
        self.me = self
