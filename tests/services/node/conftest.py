from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from epoxi import envelope
from epoxi.policy import Policy
from epoxi.v1 import email_pb2
from services.node.engine.spool import Spool

T = TypeVar("T")

SOURCE_IP = "127.0.0.2"
SENDER = "Ann <ann@sender.test>"


def email(*to: str, **fields: Any) -> email_pb2.Email:
    return envelope.new_email(SENDER, **{"to": list(to), "subject": "hi", "text": "hello", **fields})


def fast_policy(key: str = "example.com_127_0_0_2", **overrides: Any) -> Policy:
    """Small batches and timeouts so tests never wait on the defaults."""
    fields: dict[str, Any] = {
        "name": key,
        "batch_size": 10,
        "batch_timeout": 0.02,
        "max_retries": 2,
        **overrides,
    }
    return Policy(**fields)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = await Spool.open(tmp_path / "spool.db")
    yield s
    await s.close()
