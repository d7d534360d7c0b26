"""Pipeline policy: the seed's knobs, with their defaults filled in.

``Policy`` is the one internal form. Each boundary converts it in one place: protobuf here
(``Policy.from_proto``, ``Policy.to_proto``, ``validate``), the KV store's JSON in
``epoxi.policy_store`` (``encode``, ``decode``), SQLite in the node's spool (its policy blob).
"""

from __future__ import annotations

from dataclasses import dataclass

from epoxi import proto_time
from epoxi.v1 import pipeline_pb2

DEFAULT_MAX_CONNECTIONS = 10
DEFAULT_MAX_RETRIES = 5
DEFAULT_BATCH_SIZE = 100
DEFAULT_BATCH_TIMEOUT = 5.0
DEFAULT_ALLOWED_MESSAGES = 1000
DEFAULT_MESSAGE_INTERVAL = 60.0


@dataclass(frozen=True)
class Policy:
    name: str
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_retries: int = DEFAULT_MAX_RETRIES
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_timeout: float = DEFAULT_BATCH_TIMEOUT
    allowed_messages: int = DEFAULT_ALLOWED_MESSAGES
    message_interval: float = DEFAULT_MESSAGE_INTERVAL

    @classmethod
    def from_proto(cls, p: pipeline_pb2.PipelinePolicy, default_name: str) -> Policy:
        return cls(
            name=p.name or default_name,
            max_connections=p.max_connections or DEFAULT_MAX_CONNECTIONS,
            max_retries=p.max_retries if p.HasField("max_retries") else DEFAULT_MAX_RETRIES,
            batch_size=p.batch_size or DEFAULT_BATCH_SIZE,
            batch_timeout=proto_time.seconds(p.batch_timeout)
            if p.HasField("batch_timeout")
            else DEFAULT_BATCH_TIMEOUT,
            allowed_messages=p.allowed_messages or DEFAULT_ALLOWED_MESSAGES,
            message_interval=(
                proto_time.seconds(p.message_interval)
                if p.HasField("message_interval")
                else DEFAULT_MESSAGE_INTERVAL
            ),
        )

    def to_proto(self) -> pipeline_pb2.PipelinePolicy:
        return pipeline_pb2.PipelinePolicy(
            name=self.name,
            max_connections=self.max_connections,
            max_retries=self.max_retries,
            batch_size=self.batch_size,
            batch_timeout=proto_time.duration(self.batch_timeout),
            allowed_messages=self.allowed_messages,
            message_interval=proto_time.duration(self.message_interval),
        )


def validate(p: pipeline_pb2.PipelinePolicy) -> list[str]:
    """Reasons ``p`` cannot be used; empty when it can."""
    problems = []
    for name in ("batch_timeout", "message_interval"):
        if p.HasField(name):
            d = getattr(p, name)
            if d.seconds < 0 or d.nanos < 0 or (d.seconds == 0 and d.nanos == 0):
                problems.append(f"policy.{name} must be a positive duration")
    return problems
