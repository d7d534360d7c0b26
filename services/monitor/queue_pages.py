"""Cluster-wide queue listings, a page at a time: the page token and the merge; no I/O here.

A listing walks every node's spool at once, oldest first. Its page token says where it stands
on each node: the node's own page token (opaque to the monitor; "" before the node's first
message), or done. A node the token does not name starts at its beginning (it joined the cluster
during the listing, or held nothing so far). The token is URL-safe base64 of JSON with the
listing's filter, so it only continues the listing it came from.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from epoxi.v1 import monitor_pb2, queue_pb2

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Spool IDs are what a node's spool assigns: 32 lower-case hex digits (a UUID4's hex).
SPOOL_ID = re.compile(r"[0-9a-f]{32}")
_VERSION = 1


class BadPageToken(ValueError):
    pass


def page_size(requested: int) -> int:
    """As the contract says: 0 means 50, more than 1000 means 1000; negative is a ValueError."""
    if requested < 0:
        raise ValueError(f"page_size must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def spool_id_problem(message_id: str) -> str | None:
    if SPOOL_ID.fullmatch(message_id):
        return None
    shown = repr(message_id) if len(message_id) <= 80 else repr(message_id[:80]) + "..."
    return f"message_id {shown} is not a spool ID: 32 lower-case hexadecimal digits, as RouteEmails returns"


@dataclass
class Position:
    """Where a listing of ``routing_key`` and ``state`` stands on each node."""

    routing_key: str
    state: int
    # Node ID to its page token ("" for its first page).
    nodes: dict[str, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def at(self, node: str) -> str:
        return self.nodes.get(node, "")

    def token(self) -> str:
        doc = {
            "v": _VERSION,
            "k": self.routing_key,
            "s": self.state,
            "p": dict(sorted(self.nodes.items())),
            "d": sorted(self.done),
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str, routing_key: str, state: int) -> Position:
        """The position ``token`` names; BadPageToken when it is not one this monitor issued for
        the same routing key and state."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            doc = json.loads(raw)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadPageToken("page_token is not a token the monitor issued") from None
        if not (
            isinstance(doc, dict)
            and doc.get("v") == _VERSION
            and isinstance(doc.get("k"), str)
            and type(doc.get("s")) is int
            and isinstance(doc.get("p"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in doc["p"].items())
            and isinstance(doc.get("d"), list)
            and all(isinstance(n, str) for n in doc["d"])
        ):
            raise BadPageToken("page_token is not a token the monitor issued")
        if (doc["k"], doc["s"]) != (routing_key, state):
            raise BadPageToken("page_token belongs to a listing with another routing_key or state")
        return cls(routing_key, state, dict(doc["p"]), set(doc["d"]))


def _age(message: queue_pb2.QueuedMessage) -> tuple[int, str]:
    return message.accepted_at.ToNanoseconds(), message.id


def _stream(
    node: str, messages: Sequence[queue_pb2.QueuedMessage]
) -> Iterable[tuple[tuple[int, str], str, queue_pb2.QueuedMessage]]:
    return [(_age(m), node, m) for m in messages]


def merge(
    pages: Mapping[str, Sequence[queue_pb2.QueuedMessage]], size: int
) -> tuple[list[monitor_pb2.NodeQueuedMessage], dict[str, int]]:
    """The ``size`` oldest of the nodes' pages (each oldest first), and how many each node gave."""
    streams = [_stream(node, messages) for node, messages in sorted(pages.items())]
    taken = dict.fromkeys(pages, 0)
    out: list[monitor_pb2.NodeQueuedMessage] = []
    for _, node, m in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
        if len(out) == size:
            break
        out.append(monitor_pb2.NodeQueuedMessage(node=node, message=m))
        taken[node] += 1
    return out, taken
