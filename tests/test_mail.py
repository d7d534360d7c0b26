from __future__ import annotations

import email
import email.policy

import pytest

from epoxi import mail
from epoxi.v1 import email_pb2


def valid(**fields):
    fields = {"to": ["bob@example.org"], "subject": "Hi", "text": "hello", **fields}
    return mail.new_email("Ann <ann@example.com>", **fields)


def test_a_valid_email_has_no_problems():
    assert mail.validate(valid(cc=["c@example.net"], reply_to="r@example.com")) == []


@pytest.mark.parametrize(
    ("email_", "expected"),
    [
        (mail.new_email("", to=["b@example.org"]), "email.from is required"),
        (
            mail.new_email("not an address", to=["b@example.org"]),
            "email.from 'not an address' is not an email address",
        ),
        (valid(to=[]), "email has no recipients"),
        (valid(to=["bob@"]), "email.to[0] 'bob@' is not an email address"),
        (valid(to=["bob@localhost"]), "email.to[0] 'bob@localhost' has an invalid domain"),
        (valid(to=["b..b@example.org"]), "has an invalid local part"),
        (valid(cc=["x@exa mple.org"]), "email.cc[0]"),
        (valid(subject="a\r\nBcc: evil@example.org"), "email.subject contains CR or LF"),
        (
            valid(headers=[email_pb2.Header(name="X-Tag", value="a\nb")]),
            "email.headers[0] (X-Tag) value contains CR or LF",
        ),
        (valid(headers=[email_pb2.Header(name="Bad Name", value="v")]), "is not a valid header field name"),
        (valid(headers=[email_pb2.Header(name="Subject", value="v")]), "is set from the email's own fields"),
        (
            valid(delivery=email_pb2.Delivery(ip="300.1.1.1")),
            "email.delivery.ip '300.1.1.1' is not an IP address",
        ),
        (
            valid(attachments=[email_pb2.Attachment(content=b"x")]),
            "email.attachments[0].filename is required",
        ),
    ],
)
def test_invalid_emails_are_explained(email_, expected):
    problems = mail.validate(email_)
    assert any(expected in p for p in problems), problems


def test_oversized_email_is_rejected():
    big = valid(
        attachments=[email_pb2.Attachment(filename="a.bin", content=b"x" * (mail.MAX_MESSAGE_BYTES + 1))]
    )
    assert any("the limit is" in p for p in mail.validate(big))


def test_render_is_rfc5322_multipart_without_bcc():
    e = valid(
        bcc=["hidden@example.org"],
        html="<p>hello</p>",
        headers=[email_pb2.Header(name="X-Campaign", value="spring")],
        attachments=[email_pb2.Attachment(filename="r.pdf", content_type="application/pdf", content=b"%PDF")],
    )
    data = mail.render(e)
    assert b"\r\n" in data and b"hidden@example.org" not in data
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["From"] == "Ann <ann@example.com>"
    assert msg["X-Campaign"] == "spring"
    assert msg["Message-ID"].endswith("@example.com>")
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "hello"
    html = msg.get_body(("html",))
    assert html is not None and "<p>hello</p>" in html.get_content()
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "r.pdf" and attachment.get_content() == b"%PDF"


def test_render_keeps_a_given_message_id():
    msg = email.message_from_bytes(mail.render(valid(message_id="<abc@example.com>")))
    assert msg["Message-ID"] == "<abc@example.com>"
