"""Client channels: one long-lived channel per target, retrying what never reached a handler.

A channel is built with the process's ``Security`` (``epoxi.runtime.security``): over TLS (mTLS
when the process has a certificate) when it has TLS material, and sending its bearer token on
every call when it has one. Without one it is plaintext and sends no token.
"""

from __future__ import annotations

import asyncio
import json

import grpc

from epoxi.observability import grpc_tracing
from epoxi.runtime.limits import grpc_options, message_limit
from epoxi.runtime.security import PLAINTEXT, Security

RPC_TIMEOUT = 10.0

# Retry only what never reached a handler; everything else is the caller's decision.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel(
    target: str, max_message_bytes: int | None = None, security: Security = PLAINTEXT
) -> grpc.aio.Channel:
    """A channel to ``target`` that retries UNAVAILABLE, sends and receives messages up to
    ``max_message_bytes`` (default: ``limits.message_limit()`` of the default email limit),
    travels and authenticates as ``security`` says, and is traced while tracing is on."""
    limit = message_limit() if max_message_bytes is None else max_message_bytes
    options: list[tuple[str, str | int]] = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        *grpc_options(limit),
        *security.channel_options(),
    ]
    interceptors = [*grpc_tracing.client_interceptors(target), *security.client_interceptors()] or None
    credentials = security.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


class Channels:
    """Caches one channel per target for the life of a service."""

    def __init__(self, max_message_bytes: int | None = None, security: Security = PLAINTEXT) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._max_message_bytes = max_message_bytes
        self.security = security

    def get(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = channel(target, self._max_message_bytes, self.security)
        return ch

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close() for ch in channels))
