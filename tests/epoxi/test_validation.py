"""What the router accepts: every problem named by its field."""

from __future__ import annotations

import argparse

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
        attachments=[email_pb2.Attachment(filename="a.bin", content=b"x" * (validation.MAX_EMAIL_BYTES + 1))]
    )
    assert any("the limit is" in p for p in validation.validate(big))


def test_the_size_limit_is_the_callers_and_named_in_the_problem():
    email_ = valid(
        message_id="<m@example.com>", attachments=[email_pb2.Attachment(filename="a", content=b"x" * 2048)]
    )
    assert validation.validate(email_, max_bytes=4096) == []
    [problem] = validation.validate(email_, "emails[3]", max_bytes=1024)
    assert problem == (
        f"emails[3] is {email_.ByteSize()} bytes; the limit is 1024 bytes (1 KiB, the max_email_bytes setting)"
    )


def test_an_email_without_a_message_id_keeps_room_for_the_one_the_router_adds():
    email_ = valid(message_id="<m@example.com>")
    exact = email_.ByteSize()
    assert validation.validate(email_, max_bytes=exact) == []
    email_.message_id = ""
    assert validation.validate(email_, max_bytes=exact) != []
    assert validation.validate(email_, max_bytes=email_.ByteSize() + validation.MESSAGE_ID_ALLOWANCE) == []


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("26214400", 25 * 1024 * 1024),
        ("25MiB", 25 * 1024 * 1024),
        ("25 mb", 25 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GB", 1024**3),
        ("7b", 7),
    ],
)
def test_sizes_parse_in_bytes_or_binary_units(text, size):
    assert validation.parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "", "25 TB", "1.5MiB", "MiB"])
def test_what_is_not_a_positive_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        validation.parse_size(text)


def test_sizes_are_written_in_the_largest_unit_that_divides_them():
    assert [validation.format_size(n) for n in (25 * 1024**2, 1024**3, 1536, 1000)] == [
        "25 MiB",
        "1 GiB",
        "1536 bytes",
        "1000 bytes",
    ]
