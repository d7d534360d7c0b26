"""RFC 5322 rendering: the fast writer against the email package, and the fallback."""

from __future__ import annotations

import email
import email.policy
import email.utils
import random
import time
from email.parser import BytesParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epoxi import envelope, rendering
from epoxi.v1 import email_pb2
from tests.support import valid_email as valid


def test_render_is_rfc5322_multipart_without_bcc():
    e = valid(
        bcc=["hidden@example.org"],
        html="<p>hello</p>",
        headers=[email_pb2.Header(name="X-Campaign", value="spring")],
        attachments=[email_pb2.Attachment(filename="r.pdf", content_type="application/pdf", content=b"%PDF")],
    )
    data = rendering.render(e)
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
    msg = email.message_from_bytes(rendering.render(valid(message_id="<abc@example.com>")))
    assert msg["Message-ID"] == "<abc@example.com>"


# render: the fast path against the EmailMessage path.

ANN = "Ann <ann@example.com>"
PARSER = BytesParser(policy=email.policy.default)
# Headers compared apart: Date (the clock), the MIME headers (the two paths pick encodings and
# boundaries differently; the parts are compared decoded instead).
_MIME_OR_DATE = {"date", "mime-version", "content-type", "content-transfer-encoding"}


def email_(sender=ANN, **fields):
    fields = {"to": ["bob@example.org"], "subject": "Hi", "message_id": "<m1@example.com>", **fields}
    return envelope.new_email(sender, **fields)


def header(name, value):
    return email_pb2.Header(name=name, value=value)


def parsed_view(data, generated_id=False):
    """What a reader sees: the headers (but Date and MIME framing) and each leaf part, decoded."""
    msg = PARSER.parsebytes(data)
    assert not msg.defects
    # Runs of whitespace compare as one: where the slow path folds a long word into encoded-words
    # it keeps the space before the fold as well (a stdlib quirk; the fast path keeps the word).
    headers = [
        (k.lower(), " ".join(str(v).split())) for k, v in msg.items() if k.lower() not in _MIME_OR_DATE
    ]
    if generated_id:  # random but for the domain
        headers = [(k, v.partition("@")[2] if k == "message-id" else v) for k, v in headers]
    for k, v in msg.items():
        assert not v.defects, (k, v.defects)
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime is not None
    parts = []
    for part in msg.walk():
        assert not part.defects
        if not part.is_multipart():
            # 7bit and 8bit content keeps the wire's CRLF; quoted-printable decodes to LF.
            content = part.get_content().replace("\r\n", "\n")
            parts.append((part.get_content_type(), part.get_content_charset(), content))
    return headers, msg.get_content_type(), parts


def header_lines(data):
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def assert_wire_format(data):
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    for line in lines:
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998
    for line in header_lines(data):
        # Longer than 78 only for one word that cannot be folded: after "Name:", or alone.
        words = line.split()
        assert len(line) <= 78 or len(words) <= (1 if line[:1] == b" " else 2), line


def assert_equivalent(e):
    """The fast path is taken and says what the slow path says."""
    fast = rendering.render_fast(e)
    assert fast is not None, "fast path not taken"
    slow = rendering.render_slow(e)
    assert_wire_format(fast)
    generated = not e.message_id
    assert parsed_view(fast, generated) == parsed_view(slow, generated)
    # And exactly: a reader gets the subject and extra headers as given (less leading spaces).
    msg = PARSER.parsebytes(fast)
    for name, value in [("Subject", e.subject), *((h.name, h.value) for h in e.headers)]:
        if "=?" not in value:
            assert value.lstrip(" ") in [str(v) for v in msg.get_all(name, [])]
    slow_head = header_lines(slow)
    if max(map(len, slow_head)) <= 78 and b"=?" not in b"".join(slow_head):
        # The slow path folded at spaces and commas alone; so must the fast one.
        assert max(map(len, header_lines(fast))) <= 78
    return fast


LONG_SUBJECT = " ".join(f"word{i}" for i in range(60))
MANY = [f"user{i}@example.org" for i in range(40)] + [
    f"User Number {i} <u{i}@example.net>" for i in range(20)
]
LONG_URL = "<https://example.com/unsubscribe/" + "z" * 120 + ">"
FAST_CASES = {
    "ascii text": email_(text="hello\nworld\n"),
    "long subject": email_(subject=LONG_SUBJECT),
    "long subject, odd spacing": email_(subject="  lead  " + LONG_SUBJECT + "  trail  "),
    "long subject, leading spaces": email_(subject="   " + "w" * 90 + " x"),
    "many recipients": email_(to=MANY, cc=list(reversed(MANY)), bcc=["hidden@example.org"]),
    "quoted display names": email_(
        '"Lee, Ann" <ann@example.com>', to=["<b@example.org>", '"O\'Brien, B" <b@x.org>']
    ),
    "reply-to and generated message-id": email_(reply_to="Replies <r@example.com>", message_id=""),
    "text only, no trailing newline": email_(text="one\ntwo"),
    "html only": email_(text="", html="<p>hello</p>"),
    "text and html": email_(text="hello", html="<p>hello</p>"),
    "no body": email_(text="", html=""),
    "unicode body": email_(text="héllo wörld ✓\nnaïve café\n", html="<p>€ 5</p>"),
    "cjk body (base64)": email_(text="日本語のテキストです。" * 40),
    "body line over 998": email_(text="x" * 999 + "\nshort\n" + "y" * 5000),
    "body line of exactly 998": email_(text="x" * 998 + "\n"),
    "dot and From lines": email_(text=".\n.hidden\nFrom here\n..\nend\n", html=".\n<p>x</p>\nFrom "),
    "CR, CRLF and LF": email_(text="a\r\nb\rc\nd\r\n\r\n"),
    "trailing whitespace and controls": email_(text="a  \nb\t\nc\0d\x0c\n \n", html="x \t"),
    "boundary-like body": email_(text="--=_\n--=_0\n", html="--=_abc--"),
    "extra headers": email_(
        headers=[
            header("X-Campaign", "spring"),
            header("X-Empty", ""),
            header("List-Unsubscribe", LONG_URL + ", <mailto:unsub@example.com>"),
            header("X-Campaign", "again"),
        ]
    ),
    "encoded-word look-alike": email_(subject="=?utf-8?q?caf=C3=A9?= x", headers=[header("X-E", "=?x?")]),
    "long unbroken subject word": email_(subject="see " + "w" * 200 + " now"),
}
SLOW_CASES = {
    "unicode subject": email_(subject="Grüße"),
    "unicode display name": email_("Zoë <zoe@example.com>"),
    "unicode extra header": email_(headers=[header("X-Name", "Zoë")]),
    "tab in header": email_(headers=[header("X-Tab", "a\tb")]),
    "attachment": email_(attachments=[email_pb2.Attachment(filename="r.pdf", content=b"%PDF")]),
    "address with a comment": email_(to=["b@example.org (Bob)"]),
    "dotted display name": email_(to=["Bob.B <b@example.org>"]),
    "content header": email_(headers=[header("Content-Language", "en")]),
    "structured header": email_(headers=[header("Sender", "s@example.com")]),
    "subject word over 998": email_(subject="x" * 1000),
    "odd message-id": email_(message_id="<a b@example.com>"),
    "long display name": email_("A" * 80 + " <ann@example.com>"),
}


@pytest.mark.parametrize("case", FAST_CASES)
def test_fast_render_matches_the_email_package(case):
    assert_equivalent(FAST_CASES[case])


@pytest.mark.parametrize("case", SLOW_CASES)
def test_what_the_fast_path_cannot_prove_safe_falls_back(case):
    e = SLOW_CASES[case]
    assert rendering.render_fast(e) is None
    msg = PARSER.parsebytes(rendering.render(e))
    assert msg["Message-ID"] == "<m1@example.com>" or case == "odd message-id"


def test_render_takes_the_fast_path_for_ascii_mail(monkeypatch):
    def slow(e):
        raise AssertionError("slow path taken")

    monkeypatch.setattr(rendering, "render_slow", slow)
    data = rendering.render(email_(text="hello", html="<p>hello</p>", bcc=["hidden@example.org"]))
    assert b"hidden@example.org" not in data
    assert data.startswith(b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: Hi\r\nDate: ")
    date = PARSER.parsebytes(data)["Date"]
    assert str(date).endswith(" +0000") and abs(date.datetime.timestamp() - time.time()) < 5


def test_fast_render_encodes_bodies_safely():
    ascii_ = rendering.render_fast(email_(text="plain\n.line\n"))
    assert ascii_ is not None and b"Content-Transfer-Encoding: 7bit\r\n\r\nplain\r\n.line\r\n" in ascii_
    unicode_ = rendering.render_fast(email_(text="café"))
    assert (
        unicode_ is not None
        and b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n" in unicode_
    )
    long_ = rendering.render_fast(email_(text="x" * 999))
    assert long_ is not None and b"quoted-printable" in long_
    empty = rendering.render_fast(email_(subject="", headers=[header("X-Empty", "")]))
    assert empty is not None and b"\r\nSubject:\r\n" in empty and b"\r\nX-Empty:\r\n" in empty
    # A generated Message-ID takes the sender's domain, as the slow path's does.
    generated = PARSER.parsebytes(rendering.render_fast(email_(message_id="")) or b"")
    assert generated["Message-ID"].endswith("@example.com>")


def test_fast_render_boundary_is_not_in_the_bodies(monkeypatch):
    # The first boundary drawn is in the text; the renderer must draw again.
    draws = iter([0xAB, 0xCD])
    monkeypatch.setattr(random, "getrandbits", lambda bits: next(draws))
    e = email_(text=f"--=_{0xAB:032x}\n", html="<p>x</p>")
    data = assert_equivalent(e)
    assert f'boundary="=_{0xCD:032x}"'.encode() in data


def _random_email(rng):
    """An email whose headers are random printable ASCII and whose bodies are random text."""
    words = ["a", "hello", "Sale!", "50%", "x" * 90, "=?", ".", "(c)", "'q'", '"', "a,b", "--=_"]

    def phrase(n):
        return " ".join(rng.choice(words) for _ in range(n)) if n else ""

    def body():
        pieces = ["line", "\n", "\r\n", "\r", ".", "From ", " ", "\t", "é", "✓", "=", "\0", "x" * 1000]
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))

    def mailbox(i):
        return rng.choice([f"u{i}@example.org", f"<u{i}@example.org>", f"User {i} <u{i}@example.org>"])

    return email_(
        to=[mailbox(i) for i in range(rng.randrange(1, 30))],
        cc=[mailbox(i) for i in range(rng.randrange(0, 5))],
        subject=phrase(rng.randrange(0, 30)),
        text=body() if rng.random() < 0.8 else "",
        html=body() if rng.random() < 0.5 else "",
        headers=[header(f"X-H{i}", phrase(rng.randrange(0, 20))) for i in range(rng.randrange(0, 4))],
    )


def test_fast_render_matches_the_email_package_on_random_mail():
    rng = random.Random(5322)
    for _ in range(150):
        assert_equivalent(_random_email(rng))


# What the slow path writes itself: addresses from what epoxi.address reads, text folded exactly.

SMTPUTF8 = BytesParser(policy=email.policy.SMTPUTF8)


def head_of(data):
    return data.split(b"\r\n\r\n", 1)[0]


def raw_text(value):
    """A value parsed from raw UTF-8, its undecodable bytes back as text."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8")


def test_idn_addresses_are_written_by_their_a_labels_and_the_message_stays_ascii():
    e = email_(
        "Zoë <zoe@Bücher.de>",
        to=["user@bücher.de", "Ann <ann@例子.广告>"],
        headers=[header("Sender", "s@straße.de")],
        message_id="",
    )
    data = rendering.render(e)
    assert head_of(data).isascii()
    msg = SMTPUTF8.parsebytes(data)
    assert [a.addr_spec for a in msg["To"].addresses] == [
        "user@xn--bcher-kva.de",
        "ann@xn--fsqu00a.xn--4rr70v",
    ]
    assert msg["From"].addresses[0].display_name == "Zoë"
    assert msg["From"].addresses[0].addr_spec == "zoe@xn--bcher-kva.de"
    assert msg["Sender"].address.addr_spec == "s@xn--strae-oqa.de"
    assert msg["Message-ID"].strip().endswith("@xn--bcher-kva.de>")


def test_a_utf8_local_part_makes_the_header_utf8():
    for e in (
        email_("Jörg <jörg@bücher.de>", subject="Grüße"),
        email_(headers=[header("Sender", "用户 <用户@例子.广告>")], subject="Grüße"),
    ):
        data = rendering.render(e)
        head = head_of(data)
        assert not head.isascii() and "Subject: Grüße".encode() in head  # RFC 6532: UTF-8 as it is
        msg = SMTPUTF8.parsebytes(data)
        name = "From" if getattr(e, "from").startswith("J") else "Sender"
        [address] = msg[name].addresses
        assert raw_text(address.addr_spec) in ("jörg@xn--bcher-kva.de", "用户@xn--fsqu00a.xn--4rr70v")


def test_the_slow_path_keeps_every_address_of_a_folded_list():
    # The email package's folder once put the comma between these two inside an encoded-word.
    long_domain = "example.example." + "x" * 63 + ".com"
    e = email_(cc=[f"a@{long_domain}", "=?utf-8?q?caf=C3=A9?= <b@example.com>", "日本 <c@example.com>"])
    data = rendering.render_slow(e)
    msg = SMTPUTF8.parsebytes(data)
    assert not msg["Cc"].defects
    assert [a.addr_spec for a in msg["Cc"].addresses] == [
        f"a@{long_domain}",
        "b@example.com",
        "c@example.com",
    ]
    assert [a.display_name for a in msg["Cc"].addresses] == ["", "café", "日本"]
    assert_wire_format(data)


def test_the_slow_path_keeps_text_exactly():
    # The email package's folder once dropped the space of "é ¡" after a long field name.
    long_name = "X-" + "n" * 74
    values = ["é ¡", "a\tb", " lead é", "é" * 600, "x" * 2000, "Grüße " * 40]
    e = email_(subject="é\t¡", headers=[header(long_name, v) for v in values])
    data = rendering.render_slow(e)
    assert_wire_format(data)
    msg = SMTPUTF8.parsebytes(data)
    assert str(msg["Subject"]) == "é\t¡"
    assert [str(v) for v in msg.get_all(long_name, [])] == values  # encoded-words keep even the spaces


def test_attachment_filenames_are_sanitised():
    names = {
        "../../etc/passwd": "passwd",
        "C:\\Users\\ann\\report.doc": "report.doc",
        "\u202egpj.exe": "gpj.exe",
        " a\r\nb.txt ": "ab.txt",
        "résumé 日本.pdf": "résumé 日本.pdf",
        "ü" * 300 + ".pdf": "ü" * 125 + ".pdf",
        "x" * 300: "x" * 255,
    }
    e = email_(attachments=[email_pb2.Attachment(filename=n, content=b"%PDF") for n in names])
    data = rendering.render(e)
    assert head_of(data).isascii()
    assert_wire_format(data)
    msg = SMTPUTF8.parsebytes(data)
    rendered = [p["Content-Disposition"].params["filename"] for p in msg.iter_attachments()]
    assert rendered == list(names.values())
    assert all(len(n.encode()) <= 255 for n in rendered)
    assert b"filename*=utf-8''r%C3%A9sum%C3%A9" in data  # RFC 2231


def test_a_message_with_an_ascii_header_is_all_ascii_so_it_needs_no_8bitmime() -> None:
    # The node bounces 8-bit mail to a server without 8BITMIME (5.6.3); the slow path used to
    # write non-ASCII text with attachments as "Content-Transfer-Encoding: 8bit".
    e = envelope.new_email(
        "b@example.org",
        to=["a@example.org"],
        subject="Grüße",
        text="Grüße aus Köln\n" * 3,
        html="<p>Grüße</p>",
        attachments=[
            email_pb2.Attachment(filename="bericht ä.txt", content_type="text/plain", content="ä".encode())
        ],
    )
    data = rendering.render(e)
    assert data.isascii()
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, email.message.EmailMessage)
    body = parsed.get_body(("plain",))
    assert body is not None and body.get_content() == "Grüße aus Köln\r\n" * 3


# Lines of 0 to 12 characters around the limit of 10 used here, in any order.
@given(st.lists(st.integers(min_value=0, max_value=12), max_size=30), st.booleans())
def test_line_lengths_are_checked_as_splitting_the_text_would(lengths: list[int], ended: bool) -> None:
    text = "\n".join("x" * n for n in lengths) + ("\n" if ended else "")
    assert rendering._lines_fit(text, 10) == (max(map(len, text.split("\n"))) <= 10)
