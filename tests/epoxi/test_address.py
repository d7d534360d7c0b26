"""Mailbox parsing: the addr-spec shortcut agrees with the email package."""

from __future__ import annotations

import email.utils
import random

import pytest

from epoxi import address


@pytest.mark.parametrize(
    "mailbox",
    [
        "a@example.com",
        "first.last+tag@sub.example.co.uk",
        "o'brien@example.ie",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@-example.com",
        "a@example..com",
        "a@@example.com",
        "Ann <ann@example.com>",
        '"A, B" <ab@example.com>',
        "ann@example.com (Ann)",
        "a@exa mple.org",
        "a@example.com\n",
    ],
)
def test_the_plain_address_shortcut_agrees_with_parseaddr(mailbox: str) -> None:
    slow_written = mailbox[mailbox.find("<") + 1 : mailbox.rfind(">")] if "<" in mailbox else mailbox
    after = mailbox[mailbox.rfind(">") + 1 :] if "<" in mailbox else ""
    _, parsed = email.utils.parseaddr(mailbox)
    kept_whole = parsed == slow_written.strip() and not after.strip()
    slow = "" if "\r" in mailbox or "\n" in mailbox or not kept_whole else parsed
    assert address.addr_spec(mailbox) == slow


# Mailboxes for the shortcuts (addr_spec's and address_problem's single matches) to agree with
# the step-by-step path on: common shapes, and the edges of each check.
SHAPES = [
    "a@example.com",
    "Ann <ann@sender.test>",
    "Ann Lee <ann.lee@sub.example.org>",
    "<a@example.com>",
    "A  B <a@example.com>",
    " Ann <a@example.com>",
    "Ann <a@example.com> ",
    "Ann<a@example.com>",
    "A.B <a@example.com>",
    '"Lee, Ann" <a@example.com>',
    "Ann <a@localhost>",
    "a@localhost",
    "Ann <a@-x.example.com>",
    "Ann <a@x-.example.com>",
    "Ann <a@x..example.com>",
    "Ann <.a@example.com>",
    "Ann <a.@example.com>",
    "Ann <a..b@example.com>",
    "Ann <a@b@example.com>",
    "Ann <a@example.com",
    "Ann a@example.com>",
    "Ann <a@example.com>>",
    "Ann <<a@example.com>",
    "Ann <a@exa mple.com>",
    "Ann <a@example.com>\n",
    "Ann\r\n <a@example.com>",
    "=?utf-8?q?Ann?= <a@example.com>",
    "x" * 64 + "@example.com",
    "x" * 65 + "@example.com",
    "Ann <" + "x" * 64 + "@example.com>",
    "Ann <" + "x" * 65 + "@example.com>",
    "a@" + "x" * 63 + ".com",
    "a@" + "x" * 64 + ".com",
    "a@" + ".".join(["x" * 63] * 4),
    "a@" + ".".join(["x" * 63] * 3) + "." + "x" * 60,
    "Ann <a@" + ".".join(["x" * 63] * 3) + "." + "x" * 59 + ">",
    "Ann <a@" + ".".join(["x" * 63] * 3) + "." + "x" * 60 + ">",
    "a@example.com.",
    "a@.example.com",
    "a@1.2.3.4",
    "a@[1.2.3.4]",
    "",
    "Ann",
    "<>",
    "Ann <@example.com>",
]


@pytest.mark.parametrize("mailbox", SHAPES)
def test_the_shortcuts_agree_with_the_step_by_step_path(mailbox: str) -> None:
    assert address.addr_spec(mailbox) == address._parsed_addr_spec(mailbox)
    assert address.address_problem(mailbox) == address._checked_problem(mailbox)


def test_the_shortcuts_agree_on_random_mailboxes() -> None:
    rng = random.Random(7)
    alphabet = "ab-._@<> \"',()+x"
    for _ in range(20_000):
        mailbox = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 18)))
        assert address.addr_spec(mailbox) == address._parsed_addr_spec(mailbox), mailbox
        assert address.address_problem(mailbox) == address._checked_problem(mailbox), mailbox


@pytest.mark.parametrize(
    "mailbox",
    [
        "Ann <a@example.com> b@evil.example",
        "Ann <a@example.com>, b@evil.example",
        "Ann <a@example.com>b@evil.example",
        "Ann <a@example.com> (comment)",
    ],
)
def test_nothing_may_follow_the_angle_brackets(mailbox: str) -> None:
    # parseaddr reads a@example.com and drops the rest; routing read the domain off the end.
    assert address.addr_spec(mailbox) == ""
    assert address.address_problem(mailbox) == "is not an email address"
    assert address.addr_spec("Ann <a@example.com>  ") == "a@example.com"


@pytest.mark.parametrize(
    ("mailbox", "spec", "envelope", "domain"),
    [
        ("user@bücher.de", "user@bücher.de", "user@xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("Jörg <jörg@Bücher.DE>", "jörg@Bücher.DE", "jörg@xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("用户@例子.广告", "用户@例子.广告", "用户@xn--fsqu00a.xn--4rr70v", "xn--fsqu00a.xn--4rr70v"),
        ("jörg@example.de", "jörg@example.de", "jörg@example.de", "example.de"),
        ('"Lee, Ann" <a@straße.de>', "a@straße.de", "a@xn--strae-oqa.de", "xn--strae-oqa.de"),
        ("a@例子。广告", "a@例子。广告", "a@xn--fsqu00a.xn--4rr70v", "xn--fsqu00a.xn--4rr70v"),
    ],
)
def test_internationalised_addresses_are_accepted_by_their_a_label(
    mailbox: str, spec: str, envelope: str, domain: str
) -> None:
    assert address.address_problem(mailbox) is None
    assert address.addr_spec(mailbox) == spec
    assert address.envelope_address(mailbox) == envelope
    assert address.domain_of(mailbox) == domain


@pytest.mark.parametrize(
    ("mailbox", "problem"),
    [
        ("a@bü_cher.de", "has an invalid internationalised domain (IDNA 2008: Codepoint U+005F"),
        ("a@xn--zz.bücher.de", "has an invalid internationalised domain (IDNA 2008: "),
        ("a@١٢.de", "has an invalid internationalised domain (IDNA 2008: "),
        ("a@" + "ü" * 64 + ".de", "has an invalid internationalised domain (IDNA 2008: Label too long)"),
        ("jörg\u3000x@example.de", "has an invalid local part (an invisible or unassigned character)"),
        ("j\u200börg@example.de", "has an invalid local part (an invisible or unassigned character)"),
        ("Ann\x0b <a@example.com>", "contains the control character U+000B"),
        ("Ann\u2028 <a@example.com>", "contains the control character U+2028"),
        ("A" * 400 + " <a@example.com>", "is longer than 400 octets"),
        ("Ö" * 195 + " <a@example.com>", "is longer than 400 octets"),  # 211 characters
    ],
)
def test_what_cannot_be_sent_is_refused_with_the_reason(mailbox: str, problem: str) -> None:
    found = address.address_problem(mailbox)
    assert found is not None and found.startswith(problem)
    assert len(found) < 200
    assert address.address_problem(mailbox) == address._checked_problem(mailbox)


def test_a_utf8_local_part_is_a_dot_atom_of_at_most_64_octets() -> None:
    assert address.address_problem("ü" * 32 + "@example.de") is None
    assert address.address_problem("jö.rg@example.de") is None
    assert address.address_problem("ü" * 33 + "@example.de") == "has an invalid local part"  # 66 octets
    assert address.address_problem("jö..rg@example.de") == "has an invalid local part"
    assert address.address_problem(".jörg@example.de") == "has an invalid local part"


def test_only_a_utf8_local_part_needs_smtputf8() -> None:
    assert [
        address.needs_smtputf8(m)
        for m in (
            "a@example.com",
            "Zoë <a@example.com>",
            "user@bücher.de",
            "jörg@example.de",
            "Jörg <jörg@bücher.de>",
            "用户@例子.广告",
        )
    ] == [False, False, False, True, True, True]


def test_ascii_mailboxes_never_reach_the_idna_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(domain: str) -> str:
        raise AssertionError(f"IDNA for {domain}")

    monkeypatch.setattr(address, "_idna_a_label", refuse)
    for mailbox in ("a@Example.com", "Ann <ann@sender.test>", "a@xn--bcher-kva.de", "a@a_b.de"):
        address.address_problem(mailbox)
        address.domain_of(mailbox)
        address.envelope_address(mailbox)
    assert address.domain_of("Ann <a@xn--bcher-kva.DE>") == "xn--bcher-kva.de"
