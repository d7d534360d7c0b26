"""What the router accepts: every problem named by its field."""

from __future__ import annotations

import argparse
from email.headerregistry import HeaderRegistry

import pytest

from epoxi import envelope, rendering, validation
from epoxi.excerpt import shown
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


def header(name: str, value: str = "v") -> email_pb2.Header:
    return email_pb2.Header(name=name, value=value)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Content-Type", "is written by the renderer; set the body with text/html and attachments"),
        (
            "content-transfer-encoding",
            "is written by the renderer; set the body with text/html and attachments",
        ),
        ("Content-Disposition", "is written by the renderer; set the body with text/html and attachments"),
        ("Content-ID", "is written by the renderer; set the body with text/html and attachments"),
        ("Content-Language", "is written by the renderer; set the body with text/html and attachments"),
        ("Resent-From", "is a Resent- field (RFC 5322 3.6.6), added by whoever resends a delivered message"),
        ("Resent-Date", "is a Resent- field (RFC 5322 3.6.6), added by whoever resends a delivered message"),
        ("Orig-Date", "is the Date field by another name; the renderer writes Date"),
        ("Return-Path", "is added by the server that delivers the message (RFC 5321 4.4)"),
        ("X-Tag\n", "is not a valid header field name"),
        ("X-" + "n" * 75, "is longer than 76 characters"),
    ],
)
def test_header_fields_the_renderer_owns_are_refused_by_name(name, reason):
    email_ = valid(
        html="<p>hi</p>", headers=[header("X-Ok"), header("X-Ok"), header(name, "multipart/mixed")]
    )
    [problem] = validation.validate(email_, "emails[0]")
    assert problem.startswith(f"emails[0].headers[2].name {shown(name)} {reason}")


def test_a_multipart_content_type_is_refused_with_the_way_to_set_the_body():
    email_ = valid(
        html="<p>hi</p>", headers=[header("X-A"), header("X-B"), header("Content-Type", "multipart/mixed")]
    )
    assert validation.validate(email_, "emails[0]") == [
        "emails[0].headers[2].name 'Content-Type' is written by the renderer; set the body with text/html "
        "and attachments"
    ]


def test_every_field_the_email_package_parses_is_refused_but_sender():
    for name in HeaderRegistry().registry:
        problems = validation.validate(valid(headers=[header(name.title(), "a@example.com")]))
        assert bool(problems) is (name != "sender"), (name, problems)


def test_sender_is_one_mailbox_set_once():
    assert validation.validate(valid(headers=[header("Sender", "用户 <用户@例子.广告>")])) == []
    assert validation.validate(valid(headers=[header("Sender", "not a mailbox")])) == [
        "email.headers[0] (Sender) value 'not a mailbox' is not an email address"
    ]
    twice = valid(headers=[header("Sender", "a@example.com"), header("SENDER", "b@example.com")])
    assert validation.validate(twice) == ["email.headers[1] is a second Sender; an email has at most one"]


@pytest.mark.parametrize("control", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\x00", "\x7f"])
def test_text_fields_are_one_line_of_text(control):
    code = f"U+{ord(control):04X}"
    email_ = valid(subject=f"a{control}b\tc", headers=[header("X-Tag", f"x{control}")])
    assert validation.validate(email_) == [
        f"email.subject contains the control character {code}",
        f"email.headers[0] (X-Tag) value contains the control character {code}",
    ]


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        (
            "text/plain\r\nX-Injected: yes",
            "is not a MIME type: type/subtype, RFC 2045 tokens, without parameters",
        ),
        ("text/csv; charset=utf-8", "is not a MIME type: type/subtype, RFC 2045 tokens, without parameters"),
        ("application/", "is not a MIME type"),
        ("text /plain", "is not a MIME type"),
        ("x" * 128 + "/y", "is not a MIME type"),
        ("Multipart/Mixed", "is a multipart type, which the renderer builds itself"),
        ("message/rfc822", "is a message type, which the renderer builds itself"),
    ],
)
def test_an_attachments_content_type_is_a_mime_type(content_type, reason):
    ok = email_pb2.Attachment(filename="a.txt", content_type="TEXT/x-C++", content=b"x")
    bad = email_pb2.Attachment(filename="b.bin", content_type=content_type, content=b"x")
    [problem] = validation.validate(valid(attachments=[ok, bad]))
    assert problem.startswith(f"email.attachments[1].content_type {shown(content_type)} {reason}")


@pytest.mark.parametrize("filename", ["../", "a/..", "C:\\dir\\", ".", " \t ", "\u202e\r\n"])
def test_a_filename_with_nothing_left_once_sanitised_is_refused(filename):
    ok = email_pb2.Attachment(filename="../../etc/passwd", content=b"x")
    bad = email_pb2.Attachment(filename=filename, content=b"x")
    assert validation.validate(valid(attachments=[ok, bad])) == [
        f"email.attachments[1].filename {shown(filename)} has no name left once directories, control "
        "characters and surrounding spaces are dropped"
    ]


@pytest.mark.parametrize(
    "message_id",
    [
        "<>",
        "<a b@example.com>",
        "a@example.com",
        "<a@example.com",
        "<a@b@example.com>",
        "<a..b@example.com>",
        "<@example.com>",
        "<a@>",
        "<a@[x]y]>",
        "<a@[x y]>",
        "<jörg@example.com>",
        "<a@example.com> ",
        "<a@example.com>\n",
        "<a@example.com>\t",
    ],
)
def test_a_message_id_is_an_rfc5322_msg_id(message_id):
    assert validation.validate(valid(message_id="<left.part@right.part>")) == []
    assert validation.validate(valid(message_id="<a!#$%&'*+/=?^_`{|}~-@[1.2.3.4]>")) == []
    [problem] = validation.validate(valid(message_id=message_id), "emails[0]")
    assert problem.startswith(
        f"emails[0].message_id {shown(message_id)} is not a Message-ID: <left@right>, each side "
        "dot-separated atoms (the right one may be a [literal]), printable ASCII without spaces (RFC 5322 3.6.4)"
    )


def test_a_message_id_fits_one_header_line():
    longest = "<" + "m" * (998 - len("Message-ID: ") - len("<@b.c>")) + "@b.c>"
    assert validation.validate(valid(message_id=longest)) == []
    [problem] = validation.validate(valid(message_id=longest.replace("<", "<m")))
    assert problem.endswith("is longer than 986 characters")


def test_generated_and_derived_message_ids_pass_the_rule():
    longest_domain = ".".join(["x" * 63] * 3) + "." + "x" * 61  # 253 characters
    idn = ".".join(["ü" * 20] * 6) + ".de"  # its A-label is longer
    for sender in ("Ann <ann@example.com>", "Jörg <jörg@bücher.de>", f"a@{longest_domain}", f"a@{idn}"):
        email_ = valid(sender)
        assert validation.validate(email_) == []
        for message_id in (rendering.new_message_id(sender), rendering.DerivedMessageIds().derive(email_)):
            assert validation.validate(valid(sender, message_id=message_id)) == []
            assert len(message_id) + 3 <= validation.MESSAGE_ID_ALLOWANCE
    assert rendering.DerivedMessageIds().derive(valid("Jörg <jörg@bücher.de>")).endswith("@xn--bcher-kva.de>")


def test_internationalised_addresses_are_accepted():
    email_ = valid(
        "Jörg <jörg@bücher.de>", to=["user@bücher.de", "用户@例子.广告"], reply_to="δοκιμή@παράδειγμα.δοκιμή"
    )
    assert validation.validate(email_) == []
    [problem] = validation.validate(valid(to=["user@bü_cher.de"]))
    assert problem.startswith(
        "email.to[0] 'user@bü_cher.de' has an invalid internationalised domain (IDNA 2008: "
    )


def test_every_problem_quotes_values_cut_short():
    huge = "x" * 100_000
    email_ = valid(
        "<" + huge,
        to=[huge + "@"],
        cc=["a@" + huge],
        reply_to=huge,
        subject="\n" + huge,
        message_id=huge,
        headers=[header(huge, huge), header("Sender", huge)],
        attachments=[email_pb2.Attachment(filename="/" * 100_000, content_type=huge)],
        delivery=email_pb2.Delivery(ip=huge),
    )
    problems = validation.validate(email_, max_bytes=10**7)
    assert len(problems) == 11  # all but the long header value, which is text like any other
    assert all(len(p) < 400 for p in problems), [len(p) for p in problems]
    assert all("more characters)" in p for p in problems if "subject" not in p), problems
