"""What a pipeline's owner hears about it, as no-op methods on a base class (dramatiq's middleware).

A pipeline tells its hooks when it crashed and which recipients bounced; its supervisor tells
them when a pipeline started, stopped or took a new policy. Neither holds whoever listens: the
registrar and the bouncer are hooks, handed to the supervisor when it is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.node.engine.pipeline import Pipeline
    from services.node.engine.spool import Job, Outcome


class PipelineHooks:
    """Every method does nothing; a hook overrides the ones it cares about."""

    async def pipeline_started(self, pipeline: Pipeline) -> None:
        """``pipeline`` runs now."""

    async def pipeline_stopped(self, pipeline: Pipeline) -> None:
        """``pipeline`` stopped; its unfinished mail stays spooled."""

    async def pipeline_failed(self, pipeline: Pipeline) -> None:
        """``pipeline`` crashed and restarts soon (``pipeline.state_line`` says why)."""

    async def policy_changed(self, pipeline: Pipeline) -> None:
        """``pipeline`` follows a new ``pipeline.policy`` from now on."""

    async def bounced(self, pipeline: Pipeline, job: Job, outcomes: Sequence[Outcome]) -> None:
        """These recipients of ``job`` bounced; their outcomes are recorded once this returns."""


class HookChain(PipelineHooks):
    """Several hooks as one: each event goes to each hook, in order."""

    def __init__(self, hooks: Sequence[PipelineHooks]) -> None:
        self.hooks = tuple(hooks)

    async def pipeline_started(self, pipeline: Pipeline) -> None:
        for h in self.hooks:
            await h.pipeline_started(pipeline)

    async def pipeline_stopped(self, pipeline: Pipeline) -> None:
        for h in self.hooks:
            await h.pipeline_stopped(pipeline)

    async def pipeline_failed(self, pipeline: Pipeline) -> None:
        for h in self.hooks:
            await h.pipeline_failed(pipeline)

    async def policy_changed(self, pipeline: Pipeline) -> None:
        for h in self.hooks:
            await h.policy_changed(pipeline)

    async def bounced(self, pipeline: Pipeline, job: Job, outcomes: Sequence[Outcome]) -> None:
        for h in self.hooks:
            await h.bounced(pipeline, job, outcomes)
