"""The pipeline supervisor on its own: mail that hooks spool (DSNs), and resuming every routing key
with unfinished mail."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Container, Sequence

import pytest

from devmesh.sink import Sink
from epoxi import rendering
from epoxi.policy_store import PolicyTable
from epoxi.v1 import email_pb2
from services.node import supervisor as supervisor_module
from services.node.engine.hooks import PipelineHooks
from services.node.engine.pipeline import Pipeline
from services.node.engine.spool import Counts, NewMessage, Spool
from services.node.idle import IdleReaper
from services.node.supervisor import HandOff, PipelineSupervisor
from tests.services.node.support import (
    KEY,
    OTHER,
    SENDER_KEY,
    SOURCE_IP,
    MakeSupervisor,
    email,
    fast_policy,
    messages,
    settled,
)
from tests.support import eventually


async def test_mail_spooled_for_a_key_that_never_ran_is_resumed(
    make_supervisor: MakeSupervisor, spool: Spool, sink: Sink
) -> None:
    # A DSN spooled just before a crash, its pipeline never started: no pipelines row.
    [mid] = await spool.enqueue(SENDER_KEY, messages("ann@sender.test"))
    assert await spool.pipeline(SENDER_KEY) is None
    supervisor = make_supervisor()
    [p] = await supervisor.resume()
    assert (p.routing_key, p.domain, p.source_ip, p.policy.name) == (
        SENDER_KEY,
        "sender.test",
        SOURCE_IP,
        "default",
    )
    await sink.wait_for(1)
    assert sink.recipients() == ["ann@sender.test"]
    saved = await spool.pipeline(SENDER_KEY)  # a later restart resumes it like any other
    assert saved is not None and saved.policy == p.policy

    async def delivered() -> bool:
        return await p.counts() == Counts(delivered=1)

    await eventually(delivered)
    found = await spool.message(mid)
    assert found is not None


async def test_mail_spooled_by_a_hook_starts_or_wakes_its_pipeline(
    make_supervisor: MakeSupervisor, spool: Spool, sink: Sink
) -> None:
    supervisor = make_supervisor()
    await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy(batch_timeout=3600.0))
    await spool.enqueue(SENDER_KEY, messages("ann@sender.test"))
    supervisor.spooled.put_nowait(SENDER_KEY)  # not running: started

    async def started() -> Pipeline | None:
        return supervisor.pipeline(SENDER_KEY)

    await eventually(started)
    await sink.wait_for(1)
    await spool.enqueue(SENDER_KEY, messages("ann@sender.test"))
    supervisor.spooled.put_nowait(SENDER_KEY)  # running, waiting for mail: woken
    await sink.wait_for(2)
    assert sink.recipients() == ["ann@sender.test"] * 2
    assert supervisor.routing_keys() == [KEY, SENDER_KEY]


async def test_an_idle_stop_sees_mail_a_hook_spooled_and_a_stop_before_it_is_undone(
    make_supervisor: MakeSupervisor, spool: Spool, sink: Sink
) -> None:
    supervisor = make_supervisor()
    await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    p, _ = await supervisor.start_pipeline("sender.test", SOURCE_IP, fast_policy(SENDER_KEY))
    # Committed by a hook (a DSN) but not yet announced on `spooled`: the counts already show it.
    gate = threading.Event()
    blocked = asyncio.ensure_future(spool._run(gate.wait))  # the pipeline claims nothing meanwhile
    hooked = asyncio.ensure_future(spool.enqueue(SENDER_KEY, messages("ann@sender.test")))
    try:
        stop = asyncio.ensure_future(supervisor.stop_if_idle(SENDER_KEY, 0.0))

        async def decided() -> bool:  # and waits for the spool's thread to stop the pipeline
            return supervisor.pipeline(SENDER_KEY) is None

        await eventually(decided)
    finally:
        gate.set()
        await blocked
    # Committing, not committed: the stop went ahead (nothing was under way through enqueue).
    assert await stop is True
    await hooked
    assert supervisor.pipeline(SENDER_KEY) is None
    supervisor.spooled.put_nowait(SENDER_KEY)  # announced: the pipeline starts again and sends it

    async def sent() -> bool:
        restarted = supervisor.pipeline(SENDER_KEY)
        return restarted is not None and restarted is not p and (await restarted.counts()).delivered == 1

    await eventually(sent)
    # Committed and announced, with the pipeline running: an idle stop now keeps it.
    await spool.enqueue(SENDER_KEY, messages("ann@sender.test"))
    assert await supervisor.stop_if_idle(SENDER_KEY, 0.0) is False


class Events(PipelineHooks):
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    async def pipeline_started(self, pipeline: Pipeline) -> None:
        self.seen.append(f"{self.name} started {pipeline.routing_key}")

    async def pipeline_stopped(self, pipeline: Pipeline) -> None:
        self.seen.append(f"{self.name} stopped {pipeline.routing_key}")

    async def policy_changed(self, pipeline: Pipeline) -> None:
        self.seen.append(f"{self.name} policy {pipeline.policy.name}")


async def test_the_supervisor_tells_each_hook_in_order(make_supervisor: MakeSupervisor) -> None:
    seen: list[str] = []
    supervisor = make_supervisor(dsn=False, hooks=[Events("a", seen), Events("b", seen)])
    await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await supervisor.apply_policies(PolicyTable({"bulk": fast_policy("bulk")}, {KEY: "bulk"}))
    await supervisor.stop_pipeline(KEY)
    assert seen == [
        f"a started {KEY}",
        f"b started {KEY}",
        "a policy bulk",
        "b policy bulk",
        f"a stopped {KEY}",
        f"b stopped {KEY}",
    ]


def per_key_state(supervisor: PipelineSupervisor, key: str) -> list[str]:
    """The supervisor's maps that still hold ``key``."""
    maps: dict[str, Container[str]] = {
        "pipelines": supervisor.pipelines,
        "idle_stopped": supervisor.idle_stopped,
        "last_active": supervisor.last_active,
        "enqueues_begun": supervisor._enqueues_begun,
        "enqueuing": supervisor._enqueuing,
        "sites": supervisor.sites,
    }
    return [name for name, m in maps.items() if key in m]


async def test_a_key_idle_long_enough_is_forgotten_and_new_mail_still_starts_it(
    make_supervisor: MakeSupervisor, spool: Spool, sink: Sink
) -> None:
    supervisor = make_supervisor()
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy(batch_size=7))
    await supervisor.enqueue_rendered(p, messages("a@example.com"))
    await sink.wait_for(1)
    assert await settled(p) == Counts(delivered=1)
    reaper = IdleReaper(supervisor, 0.0, forget_after=0.0)
    assert await reaper.sweep() == [KEY]  # stopped, and then forgotten
    assert per_key_state(supervisor, KEY) == []
    again, started = await supervisor.pipeline_for_mail(KEY)  # from the spool's record
    assert started and again is not p and again.policy == p.policy
    await supervisor.enqueue_rendered(again, messages("b@example.com"))
    await sink.wait_for(2)
    assert sink.recipients() == ["a@example.com", "b@example.com"]
    assert await settled(again) == Counts(delivered=2)


async def test_only_keys_stopped_and_quiet_for_long_enough_are_forgotten(
    make_supervisor: MakeSupervisor, sink: Sink
) -> None:
    supervisor = make_supervisor()
    await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    p, _ = await supervisor.start_pipeline("example.org", SOURCE_IP, fast_policy(OTHER))
    await supervisor.enqueue_rendered(p, messages("a@example.org"))
    await sink.wait_for(1)
    await settled(p)
    assert await supervisor.stop_if_idle(OTHER, 0.0)
    assert supervisor.forget_idle(3600.0) == []  # it had mail a moment ago
    assert OTHER in supervisor.idle_stopped
    assert supervisor.forget_idle(0.0) == [OTHER]  # KEY runs: kept
    assert per_key_state(supervisor, KEY) == ["pipelines", "last_active", "sites"]
    assert per_key_state(supervisor, OTHER) == []


async def test_a_key_stopped_on_request_keeps_no_state_and_new_mail_starts_it(
    make_supervisor: MakeSupervisor, sink: Sink
) -> None:
    supervisor = make_supervisor()
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy())
    await supervisor.enqueue_rendered(p, messages("a@example.com"))
    await sink.wait_for(1)
    stopped = await supervisor.stop_pipeline(KEY)
    assert stopped.pipeline is p and stopped.handed == HandOff()  # nothing queued, nothing to hand over
    assert stopped.moved_with == []  # no other key of its site ran here
    assert per_key_state(supervisor, KEY) == []
    assert not supervisor.ownership.holds(KEY)
    again, started = await supervisor.pipeline_for_mail(KEY)  # a stop does not pin the key
    assert started and again is not p and supervisor.ownership.holds(KEY)
    assert await supervisor.pipeline_for_mail(KEY) == (again, False)


async def test_a_small_batch_is_rendered_on_the_loop_and_a_large_one_in_a_thread(
    make_supervisor: MakeSupervisor, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered_on: list[int] = []

    def rendered(domain: str, emails: Sequence[email_pb2.Email]) -> list[NewMessage]:
        rendered_on.append(threading.get_ident())
        return real(domain, emails)

    real = supervisor_module._rendered
    monkeypatch.setattr(supervisor_module, "_rendered", rendered)
    supervisor = make_supervisor()
    p, _ = await supervisor.start_pipeline("example.com", SOURCE_IP, fast_policy(batch_timeout=3600.0))
    small = [email("bob@example.com", text="hi")]
    large = [email("bob@example.com", text="x" * supervisor_module.RENDER_INLINE_BYTES)]
    spooled = [(await supervisor.enqueue_batch(p, batch)).ids[0] for batch in (small, large)]
    assert rendered_on[0] == threading.get_ident() != rendered_on[1]
    for mid, batch in zip(spooled, (small, large), strict=True):
        [body] = (await spool._run(spool._bodies, [mid])).values()
        # As rendered (its Message-ID, made at rendering, aside).
        assert body.partition(b"\r\n\r\n")[2] == rendering.render(batch[0]).partition(b"\r\n\r\n")[2]
