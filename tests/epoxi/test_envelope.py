"""Recipient domains: the one-recipient shortcut agrees with the general path."""

from __future__ import annotations

from epoxi.envelope import domain_of, domains, new_email, recipients, recipients_in, sender_address
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


def test_the_envelope_carries_a_labels_and_keeps_utf8_local_parts() -> None:
    e = new_email(
        "Jörg <jörg@Bücher.de>",
        to=["user@bücher.de", "Ann <ann@xn--bcher-kva.de>"],
        cc=["用户@例子.广告"],
        bcc=["Bob <bob@example.com> "],
    )
    assert sender_address(e) == "jörg@xn--bcher-kva.de"
    assert domains(e) == ["xn--bcher-kva.de", "xn--fsqu00a.xn--4rr70v", "example.com"]
    assert domains(new_email("a@x.test", to=["user@BÜCHER.de"])) == ["xn--bcher-kva.de"]
    assert recipients_in(e, "xn--bcher-kva.de") == ["user@xn--bcher-kva.de", "ann@xn--bcher-kva.de"]
    assert recipients_in(e, "xn--fsqu00a.xn--4rr70v") == ["用户@xn--fsqu00a.xn--4rr70v"]
    assert recipients_in(e, "example.com") == ["bob@example.com"]


def test_the_domain_is_the_addr_specs_whatever_surrounds_it() -> None:
    assert domain_of("Ann <a@Example.com> ") == domain_of("Ann < a@Example.com\t> ") == "example.com"
    assert domain_of('"b@other.test" <a@example.com>') == "example.com"
    assert domain_of("Zoë <a@bücher.de>") == "xn--bcher-kva.de"
