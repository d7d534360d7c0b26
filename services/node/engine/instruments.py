"""What the engine tells whoever measures it, as no-op methods on small base classes (like ``hooks``).

The engine counts where things happen — a batch spooled, an attempt's outcomes, a connection
opened or reused, a host put to rest, a spool commit, a DSN — and knows no metrics library:
``services.node.metrics.NodeMetrics`` overrides these methods with Prometheus counters. The
per-routing-key half (``KeyInstruments``) is looked up once per pipeline or connection, never
per message, so a measurer can bind its labelled children there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.node.engine.spool import Job, Outcome


class KeyInstruments:
    """One routing key's measurements; every method does nothing."""

    def accepted(self, messages: int) -> None:
        """``messages`` were spooled for the key (a batch accepted)."""

    def attempted(self, job: Job, outcomes: Sequence[Outcome], now: float) -> None:
        """One attempt's ``outcomes`` (a recipient each) for ``job``, decided at ``now``."""

    def connection_opened(self, tls: bool) -> None:
        """A connection was opened (and upgraded with STARTTLS when ``tls``)."""

    def connection_reused(self) -> None:
        """A message went over a connection opened for an earlier one."""

    def host_backoff(self) -> None:
        """A host refused a connection and now rests (``HostBackoff``)."""


NO_KEY_INSTRUMENTS = KeyInstruments()


class Instruments:
    """The engine's measurements; every method does nothing."""

    def key(self, routing_key: str) -> KeyInstruments:
        """The measurements of ``routing_key`` (cached by whoever overrides this)."""
        return NO_KEY_INSTRUMENTS

    def committed(self, operation: str, seconds: float, *, synced: bool = True) -> None:
        """A spool transaction that wrote rows committed in ``seconds``: with one fsync of the WAL
        when ``synced`` (a claim's is not). Called on the spool's thread."""

    def dsn(self) -> None:
        """A DSN was spooled."""


NO_INSTRUMENTS = Instruments()
