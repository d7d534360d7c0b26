"""RouterService: validate, batch by routing key, find each key's node, enqueue, classify, summarise.

Sizes: every email is validated against ``max_email_bytes`` (INVALID_ARGUMENT naming the limit,
nothing routed), and batches are packed so that one EnqueueBatch carries at most
``epoxi.runtime.limits.batch_bytes`` of emails; see ``epoxi.runtime.limits``.

Where a batch goes (``services.router.owners``): first the node that runs its key (the owner
cache, else the key's placement record in KV), else the best node for its source IP by
``epoxi.placement``'s metric. The owners of all of a request's keys are looked up first; then
the keys nobody runs are placed in one pass without an await, each counted in the tally as it
is placed, so the new keys of one request spread over the nodes that own their IP. The node
starts the key's pipeline itself when EnqueueBatch reaches it (taking the key's record first),
and names the owner when another node has it.

RouteRawEmail takes one message as its author wrote it (``services.router.raw``) and routes it
as RouteEmails routes an ``Email`` with ``raw`` set. A call with ``idempotency-key`` metadata
(printable ASCII, at most ``MAX_CALL_KEY`` characters, else INVALID_ARGUMENT) folds it into
every batch's idempotency key: the same call with the same key spools nothing twice.

Each EnqueueBatch carries the batch's ``idempotency_key`` (``services.router.batching``), and
each attempt ends one of these ways:

- accepted: the batch is ACCEPTED there, and the node is cached as the key's owner;
- INVALID_ARGUMENT: the batch itself is wrong, so it is FAILED and no other node is tried. The
  router validated every email first (a request is routed whole or not at all), so this means
  router and node disagree (versions, settings), and the error says so;
- FAILED_PRECONDITION naming the owner (``epoxi-owner-node``, ``epoxi-owner-address``): the
  owner is cached and tried next, when it is passing and was not tried yet;
- an error carrying ``epoxi-refused``: the node spooled nothing; the next node is tried;
- UNAVAILABLE that never connected ("failed to connect"): nothing was sent; the next node;
- anything else (a deadline, a cancel, UNKNOWN, INTERNAL, any other UNAVAILABLE) is ambiguous:
  the node may have spooled the batch and lost the reply. It gets the batch again once, after
  ``retry_pause`` (a node that has it answers with the same message IDs, ``duplicate``), and
  then the next node is tried. Sending elsewhere is safe: a node only takes a key it owns, and
  mail handed between nodes keeps its batch key and index, by which the receiver knows it.

A batch is ACCEPTED when an attempt succeeded, else UNKNOWN when an attempt was ambiguous, else
FAILED. Its ``error`` lists every attempt that did not succeed, in order. Sending an UNKNOWN
or FAILED batch's emails again (the same emails, in the same order) gives the same Message-IDs
and the same idempotency key, so a node that has the batch does not spool it twice; to resend
only some emails of a request, give them the Message-IDs the response listed.

While tracing is on, each batch is a ``route batch`` span (``epoxi.routing_key``,
``epoxi.batch.emails``, ``epoxi.placement``, ``epoxi.node``: where it went), with a ``fallback``
event for each node it left, and its EnqueueBatch calls as children. Its figures go to
``services.router.metrics``, per batch and per call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from epoxi import validation
from epoxi.envelope import recipients_in
from epoxi.observability import tracing
from epoxi.registry import ownership
from epoxi.registry.ownership import Owner
from epoxi.runtime import limits, status
from epoxi.runtime.channels import RPC_TIMEOUT, Channels
from epoxi.runtime.status import abort
from epoxi.v1 import email_pb2, node_pb2, router_pb2, router_pb2_grpc
from services.router.batching import Batch, Unroutable, idempotency_key, plan
from services.router.discovery import ClusterSnapshot, ClusterView
from services.router.metrics import RouterMetrics
from services.router.owners import NewKeys, Owners
from services.router.raw import call_idempotency_key, raw_email

log = logging.getLogger(__name__)

# How long to wait before sending a batch again to a node whose reply was lost.
RETRY_PAUSE = 0.1
ENQUEUE_BATCH = f"/{node_pb2.DESCRIPTOR.services_by_name['NodeService'].full_name}/EnqueueBatch"

# Why a node's INVALID_ARGUMENT for a batch this router validated leaves the request's other
# batches as they went: each key's batch is its own, and validation is the contract.
DISAGREEMENT = (
    "this router validated the batch, so router and node disagree on what is valid (different "
    "versions, or max_email_bytes settings); the request's other batches were routed on their own; "
    "the node's emails[i] is the request's emails[email_indexes[i]]"
)

ACCEPTED = router_pb2.BATCH_STATUS_ACCEPTED
FAILED = router_pb2.BATCH_STATUS_FAILED
UNKNOWN = router_pb2.BATCH_STATUS_UNKNOWN


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    INVALID = "invalid"  # the batch is wrong: no node will take it
    REDIRECTED = "redirected"  # another node owns the key; nothing spooled
    REFUSED = "refused"  # refused on purpose; nothing spooled
    NOT_SENT = "not sent"  # never connected
    AMBIGUOUS = "ambiguous"  # may have been spooled

    @property
    def definite(self) -> bool:
        return self is not Outcome.AMBIGUOUS


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    reply: node_pb2.EnqueueBatchResponse | None = None
    error: str = ""
    owner: Owner | None = None


def classify(err: grpc.aio.AioRpcError) -> Attempt:
    """What a failed EnqueueBatch means for the batch (see the module docstring)."""
    code = err.code()
    details = err.details() or ""
    error = f"{code.name}: {details}"
    metadata = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return Attempt(Outcome.INVALID, error=error)
    owner = ownership.owner_from_metadata(metadata.items())
    if code == grpc.StatusCode.FAILED_PRECONDITION and owner is not None:
        return Attempt(Outcome.REDIRECTED, error=error, owner=owner)
    if ownership.REFUSED in metadata:
        return Attempt(Outcome.REFUSED, error=error)
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        return Attempt(Outcome.NOT_SENT, error=error)
    return Attempt(Outcome.AMBIGUOUS, error=error)


@dataclass
class _Target:
    node: node_pb2.NodeInfo
    # Placed here by this router (nobody ran the key): counted in the tally.
    placed: bool


@dataclass
class _Routed:
    result: router_pb2.BatchResult
    fallback: bool = False


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        view: ClusterView,
        channels: Channels,
        owners: Owners,
        max_batch: int = 500,
        concurrency: int = 32,
        max_email_bytes: int = validation.MAX_EMAIL_BYTES,
        retry_pause: float = RETRY_PAUSE,
        rpc_timeout: float = RPC_TIMEOUT,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._view = view
        self._channels = channels
        self.owners = owners
        self._max_batch = max_batch
        self._max_email_bytes = max_email_bytes
        self._retry_pause = retry_pause
        self._rpc_timeout = rpc_timeout
        self._limit = asyncio.Semaphore(concurrency)
        self.new_keys = NewKeys()
        self.metrics = metrics if metrics is not None else RouterMetrics(None)

    async def RouteEmails(
        self, request: router_pb2.RouteEmailsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteEmailsResponse:
        if not request.emails:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "emails is empty: send at least one email")
        return await self._route(request.emails, request.ip_pool, lambda i: f"emails[{i}]", context)

    async def RouteRawEmail(
        self, request: router_pb2.RouteRawEmailRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteRawEmailResponse:
        email, problems = raw_email(request)
        if problems:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, status.summary(problems))
        summary = await self._route([email], request.ip_pool, lambda _: "email", context)
        return router_pb2.RouteRawEmailResponse(summary=summary)

    async def _route(
        self,
        emails: Sequence[email_pb2.Email],
        ip_pool: str,
        label: Callable[[int], str],
        context: grpc.aio.ServicerContext,
    ) -> router_pb2.RouteEmailsResponse:
        """Validate ``emails`` (``label(i)`` names the i-th in problems), then plan and route them."""
        started = time.perf_counter()
        if tracing.enabled():
            trace.get_current_span().set_attribute("epoxi.emails", len(emails))
        call_key, key_problem = call_idempotency_key(context.invocation_metadata())
        if key_problem:
            self.metrics.invalid(len(emails))
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, key_problem)
        problems = [
            p for i, e in enumerate(emails) for p in validation.validate(e, label(i), self._max_email_bytes)
        ]
        if problems:
            # The count leads, so a message cut to fit still says it; and the prefix joins the
            # first problem, so the message is cut once and its note counts all that was cut.
            count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
            problems[0] = f"nothing was routed{count}: {problems[0]}"
            self.metrics.invalid(len(emails))
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, status.summary(problems))
        try:
            async with asyncio.timeout(RPC_TIMEOUT):
                await self._view.ready()
        except TimeoutError:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the registry has not answered yet; try again")

        snap = self._view.snapshot()
        self.new_keys.prune(snap)
        batches, unroutable = plan(
            emails,
            ip_pool,
            snap.pools,
            self._max_batch,
            limits.batch_bytes(self._max_email_bytes),
            call_key,
        )
        by_key: dict[str, list[Batch]] = defaultdict(list)
        for b in batches:
            by_key[b.routing_key].append(b)
        await self.owners.lookup_all(by_key, snap)
        # Every key nobody runs is placed before any batch goes out, and without an await in
        # between: each placement counts for the next.
        for key, key_batches in by_key.items():
            self._first_target(key, key_batches[0].source_ip, snap)
        results = await asyncio.gather(*(self._route_key(bs) for bs in by_key.values()))
        for u in unroutable:
            self.metrics.unroutable(len(u.emails))
        response = summarise(len(emails), unroutable, [r for rs in results for r in rs], call_key)
        self.metrics.routed(time.perf_counter() - started)
        return response

    async def _route_key(self, batches: list[Batch]) -> list[_Routed]:
        # Batches of one key go in order, so that they land on the same pipeline.
        async with self._limit:
            return [await self._route_batch(b) for b in batches]

    def _first_target(self, key: str, source_ip: str, snap: ClusterSnapshot) -> _Target | None:
        """The key's owner when it is cached and passing; else where this router placed it;
        else the best node for ``source_ip``, placed there now."""
        owner = self.owners.cached(key, snap)
        if owner is not None:
            return _Target(owner, placed=False)
        placed = self.new_keys.node_for(key)
        if placed is not None and placed in snap.nodes:
            return _Target(snap.nodes[placed], placed=True)
        ranked = self.new_keys.rank(snap, source_ip)
        if not ranked:
            return None
        self.new_keys.place(key, ranked[0])
        return _Target(ranked[0], placed=True)

    async def _route_batch(self, batch: Batch) -> _Routed:
        """Route ``batch``, in a ``route batch`` span while tracing is on: its EnqueueBatch calls
        are the span's children (each key's batches run in a task of their own, which has its
        own context)."""
        if not tracing.enabled():
            return await self._send_batch(batch, None)
        with tracing.span(
            "route batch",
            attributes={"epoxi.routing_key": batch.routing_key, "epoxi.batch.emails": len(batch.emails)},
        ) as span:
            routed = await self._send_batch(batch, span)
            result = routed.result
            if result.node:
                span.set_attribute("epoxi.node", result.node)
            if result.status != ACCEPTED:
                status = router_pb2.BatchStatus.Name(result.status).removeprefix("BATCH_STATUS_")
                span.set_status(Status(StatusCode.ERROR, f"{status}: {result.error}"))
            return routed

    async def _send_batch(self, batch: Batch, span: trace.Span | None) -> _Routed:
        key = batch.routing_key
        result = router_pb2.BatchResult(
            routing_key=key,
            email_count=len(batch.emails),
            recipient_count=sum(len(recipients_in(e, batch.domain)) for e in batch.emails),
            email_indexes=batch.indexes,
            email_message_ids=batch.message_ids,
            idempotency_key=batch.idempotency_key,
            status=FAILED,
        )
        first = self._first_target(key, batch.source_ip, self._view.snapshot())
        decision = "none" if first is None else "placed" if first.placed else "existing"
        self.metrics.placement(decision)
        if span is not None:
            span.set_attribute("epoxi.placement", decision)
        if first is None:
            result.error = f"no passing node owns source IP {batch.source_ip}"
            self.metrics.batch(result)
            return _Routed(result)
        request = batch.request()
        queue: deque[_Target] = deque([first])
        tried: list[str] = []
        failures: list[str] = []
        ambiguous = False
        ranked_fallbacks = False
        while queue or not ranked_fallbacks:
            if not queue:
                # The rest of the nodes for the IP, ranked now (the first is often enough).
                ranked_fallbacks = True
                snap = self._view.snapshot()
                queue.extend(_Target(n, placed=True) for n in self.new_keys.rank(snap, batch.source_ip))
                continue
            target = queue.popleft()
            node = target.node
            if node.id in tried:
                continue
            tried.append(node.id)
            if target.placed:
                self.new_keys.place(key, node)
            attempt = await self._send(node, request)
            node_ambiguous = attempt.outcome is Outcome.AMBIGUOUS
            if node_ambiguous:
                failures.append(f"node {node.id}: {attempt.error}; sent again")
                log.warning(
                    "batch %s: node %s may have it (%s); sending it again", key, node.id, attempt.error
                )
                await asyncio.sleep(self._retry_pause)
                attempt = await self._send(node, request)
            if attempt.outcome is Outcome.INVALID:
                failures.append(f"node {node.id}: {attempt.error} ({DISAGREEMENT})")
            elif attempt.outcome is not Outcome.ACCEPTED:
                failures.append(f"node {node.id}: {attempt.error}")
            ambiguous = ambiguous or node_ambiguous

            if attempt.outcome is Outcome.ACCEPTED:
                assert attempt.reply is not None
                reply = attempt.reply
                self.owners.learn(key, Owner(node.id, node.address))
                if target.placed:
                    if reply.pipeline_started:
                        self.new_keys.answered(key, node.id)
                    else:  # it ran there already: the node's registered count has it
                        self.new_keys.forget(key, node.id)
                result.status = ACCEPTED
                result.node = node.id
                result.new_pipeline = reply.pipeline_started
                result.message_ids.extend(reply.message_ids)
                break
            log.warning("batch %s not accepted by node %s: %s", key, node.id, attempt.error)
            if span is not None and attempt.outcome is not Outcome.INVALID:
                # The batch leaves this node for the next one (if there is one).
                span.add_event("fallback", {"epoxi.node": node.id, "epoxi.error": attempt.error})
            if target.placed:
                if node_ambiguous:  # it may have started the pipeline
                    self.new_keys.answered(key, node.id)
                else:
                    self.new_keys.forget(key, node.id)
            if attempt.outcome is Outcome.INVALID:
                break
            if attempt.outcome is Outcome.NOT_SENT:
                self.owners.forget(key, node.id)
            if attempt.outcome is Outcome.REDIRECTED and attempt.owner is not None:
                self.owners.learn(key, attempt.owner)
                owner = self._view.snapshot().nodes.get(attempt.owner.node)
                if owner is not None and owner.id not in tried:
                    queue.appendleft(_Target(owner, placed=False))
        if result.status != ACCEPTED:
            result.status = UNKNOWN if ambiguous else FAILED
        result.ok = result.status == ACCEPTED
        result.error = "; ".join(failures)
        routed = _Routed(result, fallback=result.ok and result.node != tried[0])
        self.metrics.batch(result, tried[-1] if tried else "", routed.fallback)
        return routed

    async def _send(self, node: node_pb2.NodeInfo, request: bytes) -> Attempt:
        """EnqueueBatch with ``request`` already serialized (``Batch.request``)."""
        enqueue = self._channels.get(node.address).unary_unary(
            ENQUEUE_BATCH, response_deserializer=node_pb2.EnqueueBatchResponse.FromString
        )
        try:
            reply = await enqueue(request, timeout=self._rpc_timeout)
        except grpc.aio.AioRpcError as err:
            return classify(err)
        return Attempt(Outcome.ACCEPTED, reply=reply)


def summarise(
    total_emails: int, unroutable: Iterable[Unroutable], routed: Iterable[_Routed], call_key: str = ""
) -> router_pb2.RouteEmailsResponse:
    response = router_pb2.RouteEmailsResponse(total_emails=total_emails)
    for u in unroutable:
        response.batches.append(
            router_pb2.BatchResult(
                email_count=len(u.emails),
                ok=False,
                status=FAILED,
                error=u.reason,
                email_indexes=u.indexes,
                email_message_ids=u.message_ids,
                idempotency_key=idempotency_key("", u.message_ids, call_key),
            )
        )
    for r in routed:
        response.batches.append(r.result)
        response.fallbacks_used += r.fallback
    for b in response.batches:
        response.total_batches += 1
        response.successful_batches += b.status == ACCEPTED
        response.failed_batches += b.status == FAILED
        response.unknown_batches += b.status == UNKNOWN
        response.new_pipelines_started += b.new_pipeline
        response.accepted_recipients += b.recipient_count if b.status == ACCEPTED else 0
    return response
