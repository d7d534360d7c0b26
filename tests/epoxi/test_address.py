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
    _, parsed = email.utils.parseaddr(mailbox)
    slow = "" if "\r" in mailbox or "\n" in mailbox or parsed != slow_written.strip() else parsed
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
