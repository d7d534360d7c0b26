"""The SMTP reply, parsed once: code, enhanced code and text; and an outcome's recorded text."""

from __future__ import annotations

import pytest

from services.node.engine.reply import Reply
from services.node.engine.spool import Outcome, State


def test_the_enhanced_status_code_is_parsed_out_of_the_reply() -> None:
    assert Reply.parse(451, "4.3.0 try later").enhanced == "4.3.0"
    assert Reply.parse(550, "5.1.10 null MX").enhanced == "5.1.10"
    assert Reply.parse(250, "2.0.0 OK: queued").enhanced == "2.0.0"
    assert Reply.parse(550, "4.3.0 wrong class").enhanced == ""  # the classes must agree
    assert Reply.parse(550, "no such user").enhanced == ""
    assert Reply.parse(550, "no such user").status_code == "5.0.0"
    assert Reply.parse(421, "4.7.0 busy").status_code == "4.7.0"


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (550, "5.1.1 no such user", ("5.1.1", "no such user")),
        (451, "4.3.0", ("4.3.0", "")),
        (250, "2.0.0 OK: queued", ("2.0.0", "OK: queued")),
        (550, "4.1.1 wrong class", ("", "4.1.1 wrong class")),  # RFC 3463: the class must match
        (550, "no code here", ("", "no code here")),
        (550, "5.1.1x not a code", ("", "5.1.1x not a code")),
        (0, "4.4.2 connection lost", ("4.4.2", "connection lost")),  # the node's own: any class
        (0, "5.1.10 null MX", ("5.1.10", "null MX")),
        (0, "", ("", "")),
    ],
)
def test_a_reply_splits_into_enhanced_code_and_text(code: int, text: str, expected: tuple[str, str]) -> None:
    r = Reply.parse(code, text, "mx.example.com")
    assert (r.enhanced, r.text) == expected
    assert (r.code, r.host) == (code, "mx.example.com")


def test_the_status_of_a_reply_without_an_enhanced_code_comes_from_its_class() -> None:
    assert Reply.parse(554, "rejected").status_code == "5.0.0"
    assert Reply(421, "", "busy").status_code == "4.0.0"
    assert Reply(250, "", "OK").status_code == "2.0.0"
    assert Reply.local("connection lost", "4.4.2").status_code == "4.4.2"


def test_which_replies_deliver_bounce_or_defer() -> None:
    kinds = {
        code: (r.accepted, r.permanent, r.temporary)
        for code in (250, 451, 550, 0)
        for r in [Reply(code, "", "")]
    }
    assert kinds == {
        250: (True, False, False),
        451: (False, False, True),
        550: (False, True, False),
        0: (False, False, True),  # no server replied
    }


def test_the_nodes_own_reply_bounces_when_its_enhanced_code_is_permanent() -> None:
    refused = Reply.local("mx does not offer SMTPUTF8", "5.6.7")
    assert (refused.accepted, refused.permanent, refused.temporary) == (False, True, False)
    assert refused.status_code == "5.6.7"
    lost = Reply.local("connection lost", "4.4.2")
    assert (lost.permanent, lost.temporary) == (False, True)


def test_octets_that_are_not_utf8_become_replacement_characters() -> None:
    # aiosmtplib decodes a reply with surrogateescape; the spool stores UTF-8.
    r = Reply.parse(550, "5.1.1 Empf\udce4nger unbekannt")
    assert (r.enhanced, r.text) == ("5.1.1", "Empf\ufffdnger unbekannt")
    assert Reply.parse(550, "5.1.1 Empfänger").text == "Empfänger"


def test_the_line_puts_the_enhanced_code_back_in_front() -> None:
    assert Reply.parse(550, "5.1.1   no such user").line == "5.1.1 no such user"
    assert Reply.parse(451, "4.3.0").line == "4.3.0"
    assert Reply.parse(550, "no code").line == "no code"


@pytest.mark.parametrize(
    ("reply", "state", "recorded"),
    [
        (Reply.parse(451, "4.3.0 try later"), State.BOUNCED, "try later (gave up after 3 attempts)"),
        (Reply.parse(451, "4.3.0"), State.BOUNCED, "(gave up after 3 attempts)"),
        (Reply.parse(451, "try later"), State.BOUNCED, "try later (gave up after 3 attempts)"),
        (Reply.parse(451, ""), State.BOUNCED, " (gave up after 3 attempts)"),  # as the text once was
        (
            Reply.local("cannot connect: refused"),
            State.BOUNCED,
            "cannot connect: refused (gave up after 3 attempts)",
        ),
        (Reply.parse(451, "4.3.0 try later"), State.DEFERRED, "try later"),
        (Reply.parse(550, "5.1.1 no such user"), State.BOUNCED, "no such user"),  # bounced at once
        (Reply.parse(250, "2.0.0 OK"), State.DELIVERED, "OK"),
    ],
)
def test_a_bounce_after_temporary_failures_says_it_gave_up(reply: Reply, state: State, recorded: str) -> None:
    assert Outcome(1, state, 3, 0.0, reply).text == recorded
