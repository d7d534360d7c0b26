"""Recipient domains: the one-recipient shortcut agrees with the general path."""

from __future__ import annotations

from epoxi.envelope import domain_of, domains, new_email, recipients
from epoxi.v1 import email_pb2


def general(e: email_pb2.Email) -> list[str]:
    return list(dict.fromkeys(domain_of(r) for r in recipients(e)))


def test_domains_of_one_recipient_and_of_many_agree_with_the_general_path() -> None:
    cases = [
        new_email("a@x.test", to=["Bob <bob@Example.COM>"]),
        new_email("a@x.test", to=["bob@example.com"], cc=["c@other.test"]),
        new_email("a@x.test", to=["bob@example.com"], bcc=["d@example.com"]),
        new_email("a@x.test", to=["b@one.test", "c@two.test", "d@one.test"]),
    ]
    for e in cases:
        assert domains(e) == general(e)
    assert domains(cases[0]) == ["example.com"]
    assert domains(cases[1]) == ["example.com", "other.test"]
