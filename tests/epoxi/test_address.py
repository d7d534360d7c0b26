"""Mailbox parsing: the addr-spec shortcut agrees with the email package."""

from __future__ import annotations

import email.utils

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
