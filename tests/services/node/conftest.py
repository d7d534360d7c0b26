"""Fixtures for the node's tests: real spools, pipelines and supervisors, closed at the end.

``make_pipeline`` and ``make_supervisor`` build over ``spool``: a module that needs another
spool (one that records its claims, or fails) overrides ``spool``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from devmesh.sink import Sink
from epoxi.policy import Policy
from epoxi.policy_store import PolicyTable
from services.node.engine.dsn import Bouncer
from services.node.engine.hooks import PipelineHooks
from services.node.engine.pipeline import Pipeline
from services.node.engine.retry import Retry
from services.node.engine.smtp import DEFAULT_MAX_MESSAGES_PER_CONNECTION, Sender
from services.node.engine.spool import Spool
from services.node.supervisor import PipelineSupervisor
from tests.services.node.support import (
    KEY,
    SOURCE_IP,
    MakePipeline,
    MakeSupervisor,
    RecordingSpool,
    fast_policy,
    smtp_to,
)

FAST_RETRY = Retry(base=0.01, cap=0.05)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = await Spool.open(tmp_path / "spool.db")
    yield s
    await s.close()


@pytest.fixture
async def recording_spool(tmp_path: Path) -> AsyncIterator[RecordingSpool]:
    s = await RecordingSpool.open(tmp_path / "recording.db")
    assert isinstance(s, RecordingSpool)
    yield s
    await s.close()


@pytest.fixture
async def make_pipeline(spool: Spool, sink: Sink) -> AsyncIterator[MakePipeline]:
    """Started pipelines for ``KEY`` over ``spool``, sending to ``sink`` with fast retries;
    ``make(policy, sender=..., hooks=..., ...)`` passes the rest on to ``Pipeline``."""
    started: list[Pipeline] = []

    def make(
        policy: Policy | None = None,
        *,
        max_messages_per_connection: int = DEFAULT_MAX_MESSAGES_PER_CONNECTION,
        **kwargs: Any,
    ) -> Pipeline:
        kwargs.setdefault("sender", smtp_to(sink, max_messages_per_connection=max_messages_per_connection))
        p = Pipeline(
            routing_key=KEY,
            domain="example.com",
            source_ip=SOURCE_IP,
            policy=policy or fast_policy(),
            spool=spool,
            retry=FAST_RETRY,
            **kwargs,
        )
        p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop(grace=1)


@pytest.fixture
async def make_supervisor(spool: Spool, sink: Sink) -> AsyncIterator[MakeSupervisor]:
    """Supervisors of node n1 over ``spool`` (or another), sending from SOURCE_IP to ``sink``, with a bouncer
    (``dsn=False``: none) before any other ``hooks``. A pipeline started without a policy (a
    DSN's) takes the stored ``default``: ``fast_policy``."""
    made: list[PipelineSupervisor] = []

    def make(
        *,
        dsn: bool = True,
        hooks: Sequence[PipelineHooks] = (),
        sender: Sender | None = None,
        spool: Spool = spool,
        **kwargs: Any,
    ) -> PipelineSupervisor:
        spooled: asyncio.Queue[str] = asyncio.Queue()
        bouncer = [Bouncer(spool, spooled, "MAILER-DAEMON@n1.epoxi.test", "n1.epoxi.test")] if dsn else []
        kwargs.setdefault("policies", PolicyTable({"default": fast_policy("default")}))
        s = PipelineSupervisor(
            id="n1",
            address="127.0.0.1:1",
            egress_ips=[SOURCE_IP],
            ip_pool="default",
            spool=spool,
            sender=sender or smtp_to(sink),
            hooks=[*bouncer, *hooks],
            spooled=spooled,
            retry=FAST_RETRY,
            stop_grace=1.0,
            **kwargs,
        )
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()
