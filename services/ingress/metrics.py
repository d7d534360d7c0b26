"""The ingress's metrics: SMTP sessions, messages by what the ingress answered, failed logins.

- ``epoxi_ingress_sessions_total``: SMTP connections accepted (STARTTLS keeps its session);
- ``epoxi_ingress_messages_total{outcome}``: messages whose DATA ended, by the reply:
  ``accepted`` (250: every batch spooled), ``deferred`` (4xx: the client should try again) or
  ``refused`` (5xx). Mail refused before its DATA ended (a bad sender or recipient, a SIZE over
  the limit) is no message here: the client did not send one;
- ``epoxi_ingress_auth_failures_total``: AUTH attempts with credentials that do not match a user.

``IngressMetrics(None)`` (metrics off) creates nothing and records nothing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

OUTCOMES = {"2": "accepted", "4": "deferred", "5": "refused"}


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.on = registry is not None
        if registry is None:
            return
        self._sessions = Counter(
            "epoxi_ingress_sessions_total", "SMTP connections accepted.", registry=registry
        )
        messages = Counter(
            "epoxi_ingress_messages_total",
            "Messages whose DATA ended, by the ingress's reply: accepted, deferred (4xx), refused (5xx).",
            ["outcome"],
            registry=registry,
        )
        self._messages = {digit: messages.labels(outcome) for digit, outcome in OUTCOMES.items()}
        self._auth_failures = Counter(
            "epoxi_ingress_auth_failures_total",
            "AUTH attempts whose credentials match no user.",
            registry=registry,
        )

    def session(self) -> None:
        if self.on:
            self._sessions.inc()

    def message(self, reply: str) -> None:
        """A message's DATA was answered with ``reply`` (an SMTP reply line)."""
        if self.on:
            self._messages.get(reply[:1], self._messages["5"]).inc()

    def auth_failure(self) -> None:
        if self.on:
            self._auth_failures.inc()
