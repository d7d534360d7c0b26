"""What the router accepts: every problem named by its field."""

from __future__ import annotations

import pytest

from epoxi import envelope, validation
from epoxi.v1 import email_pb2
from tests.support import valid_email as valid


def test_a_valid_email_has_no_problems():
    assert validation.validate(valid(cc=["c@example.net"], reply_to="r@example.com")) == []


@pytest.mark.parametrize(
    ("email_", "expected"),
    [
        (envelope.new_email("", to=["b@example.org"]), "email.from is required"),
        (
            envelope.new_email("not an address", to=["b@example.org"]),
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
    problems = validation.validate(email_)
    assert any(expected in p for p in problems), problems


def test_oversized_email_is_rejected():
    big = valid(
        attachments=[
            email_pb2.Attachment(filename="a.bin", content=b"x" * (validation.MAX_MESSAGE_BYTES + 1))
        ]
    )
    assert any("the limit is" in p for p in validation.validate(big))
