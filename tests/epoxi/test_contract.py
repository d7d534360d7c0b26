"""The router's validation is the node's contract: what ``validate`` accepts, both renderers
render, and the message parses back to the same fields; what it refuses, it says so briefly.

Emails are generated from fields that are mostly well formed, with adversarial pieces mixed in:
line breaks and other controls, non-ASCII text, angle brackets, spaces, encoded-word look-alikes,
long runs, every header name the renderer or the email package cares about, and content types,
file names and Message-IDs of every shape.
"""

from __future__ import annotations

import email
import email.policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epoxi import attachments, envelope, rendering, validation
from epoxi.address import display_name, envelope_address, needs_smtputf8
from epoxi.message_id import MSG_ID
from epoxi.v1 import email_pb2

PIECES = [
    *("\r", "\n", "\r\n", "\t", "\0", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u2028", "\u200d", "\u202e"),
    *("<", ">", "<>", "@", "@@", " ", "  ", '"', "\\", "(", ")", ",", ";", ":", ".", "..", "/", "[", "]"),
    *("=?", "?=", "=?utf-8?q?caf=C3=A9?=", "é", "日本", "ü", "ß", "Ⅸ", "\u3002", "x" * 90, "y" * 1000),
    *("a", "hello", "Sale!", "--=_", "From ", "%", "'"),
]
# Header text as an email may have it: any character but the line breaks and other controls.
LINE_PIECES = [p for p in PIECES if p.isprintable() or p == "\t"]
text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=10).map("".join)
line = st.lists(
    st.one_of(
        st.sampled_from(LINE_PIECES),
        st.text(st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=6),
    ),
    max_size=10,
).map("".join)


# About one draw in sixteen (fair coins, which hypothesis does not bias towards an end).
rarely = st.tuples(*[st.booleans()] * 4).map(all)


def mostly(good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly ``good``, ``rarely`` ``bad``: emails with an odd field or two among sound ones."""
    return rarely.flatmap(lambda odd: bad if odd else good)


LOCAL = ["a", "ann.lee", "o'brien", "x+tag", "jörg", "用户", "δοκιμή", "a" * 64, "ü" * 32]
BAD_LOCAL = ["a..b", ".a", "ü\u3000", "ü" * 33, "a b", ""]
LABELS = ["example", "Example", "bücher", "xn--bcher-kva", "例子", "广告", "straße", "x" * 63, "Ⅸ", "ü" * 20]
BAD_LABELS = ["a_b", "ü" * 60, "-a", "xn--zz", "١٢", ""]
TLDS = ["com", "de", "ORG", "广告", "xn--4rr70v"]
NAMES = [
    "",
    "Ann",
    "Ann Lee",
    "Lee, Ann",
    "Zoë",
    "用户 名",
    "=?utf-8?q?Ann?=",
    'a"b',
    "a\\b",
    "(c)",
    "A" * 200,
]


@st.composite
def well_formed_mailbox(draw: st.DrawFn) -> str:
    local = draw(mostly(st.sampled_from(LOCAL), st.sampled_from(BAD_LOCAL)))
    labels = draw(
        st.lists(mostly(st.sampled_from(LABELS), st.sampled_from(BAD_LABELS)), min_size=1, max_size=3)
    )
    addr = f"{local}@{'.'.join(labels)}.{draw(st.sampled_from(TLDS))}"
    name = draw(mostly(st.sampled_from(NAMES), line))
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return draw(
        st.sampled_from([addr, f"<{addr}>", f"{name} <{addr}>", f"{quoted} <{addr}>", f"{quoted} <{addr}> "])
    )


mailbox = mostly(well_formed_mailbox(), text)

HEADER_NAMES = ["X-Tag", "X-Campaign", "List-Unsubscribe", "Received", "Keywords", "Sender", "X-" + "n" * 74]
BAD_HEADER_NAMES = [
    *sorted(HeaderRegistry().registry),
    *("Content-Language", "Content-ID", "Resent-Message-ID", "Return-Path", "MIME-Version", "Orig-Date"),
    *("X-A\n", "Bad Name", "X:Y", "", "X-" + "n" * 75, "X-É", "SUBJECT"),
]


@st.composite
def header(draw: st.DrawFn) -> email_pb2.Header:
    name = draw(mostly(st.sampled_from(HEADER_NAMES), st.one_of(st.sampled_from(BAD_HEADER_NAMES), text)))
    value = draw(mailbox if name.lower() == "sender" else mostly(line, text))
    return email_pb2.Header(name=name, value=value)


CONTENT_TYPES = [
    "",
    "application/pdf",
    "TEXT/Plain",
    "image/svg+xml",
    "application/vnd.ms-excel",
    "text/x-c++",
]
BAD_CONTENT_TYPES = [
    *("text/plain; charset=utf-8", "multipart/mixed", "Message/RFC822", "a/b\r\nX: y", "application/"),
    *("/pdf", "x" * 127 + "/y", "x" * 128 + "/y", "text /plain", "text/plain\n", "é/x"),
]
FILENAMES = [
    *("r.pdf", "../../etc/passwd", "C:\\Users\\x\\y.doc", "résumé.pdf", "日本語 ファイル.txt", "a\r\nb"),
    *("\u202egpj.exe", "x" * 300 + ".pdf", "日本" * 200, "a;b=c.txt", 'q"t.txt', "=?utf-8?q?x?=.txt"),
    *("\t.hidden", " spaced name .txt ", "ü" * 127 + "." + "é" * 16),
]
BAD_FILENAMES = ["", "..", "/", " ", "dir/", "a/..", "\r\n"]


@st.composite
def attachment(draw: st.DrawFn) -> email_pb2.Attachment:
    return email_pb2.Attachment(
        filename=draw(mostly(st.one_of(st.sampled_from(FILENAMES), line), st.sampled_from(BAD_FILENAMES))),
        content_type=draw(
            mostly(st.sampled_from(CONTENT_TYPES), st.one_of(st.sampled_from(BAD_CONTENT_TYPES), text))
        ),
        content=draw(st.binary(max_size=200)),
    )


MESSAGE_IDS = [
    *("", "<a@b>", "<a.b@example.com>", "<a@[1.2.3.4]>", "<a@[x]>", "<{x}/=?@~>", "<a@[]>"),
    *("<" + "m" * 980 + "@b.c>", "<a@[" + "1" * 900 + "]>"),
]
BAD_MESSAGE_IDS = [
    *("<>", "<a b@c>", "<a@[x y]>", "<a@[a]b]>", "abc", "<a@b>\n", "<é@b.de>", "<a@b.c> ", "<a@b@c>"),
    *("<a@b..c>", "<a@>", "<@b>", "<" + "m" * 990 + "@b.c>"),
]
bodies = st.one_of(st.just(""), text, st.sampled_from(["hello\n", "x" * 2000, "a\rb\r\nc\n", ".\nFrom x\n"]))


@st.composite
def emails(draw: st.DrawFn) -> email_pb2.Email:
    return envelope.new_email(
        draw(mailbox),
        to=draw(st.lists(mailbox, min_size=1, max_size=3)),
        cc=draw(st.lists(mailbox, max_size=2)),
        bcc=draw(st.lists(mailbox, max_size=2)),
        reply_to=draw(st.one_of(st.just(""), mailbox)),
        subject=draw(mostly(line, text)),
        text=draw(bodies),
        html=draw(st.one_of(st.just(""), bodies)),
        headers=draw(st.lists(header(), max_size=3)),
        attachments=draw(st.lists(attachment(), max_size=2)),
        message_id=draw(
            mostly(st.sampled_from(MESSAGE_IDS), st.one_of(st.sampled_from(BAD_MESSAGE_IDS), text))
        ),
    )


# Written by the renderer; the rest of a message's fields are the email's extra headers, in order.
RENDERED = {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "mime-version"}
RENDERED |= {"content-type", "content-transfer-encoding"}


def squeezed(value: str) -> str:
    """``value`` with runs of whitespace as one space, none around: how a reader compares it."""
    return " ".join(value.split())


def unescaped(value: str) -> str:
    """A header value as parsed from raw UTF-8: its undecodable bytes back as text."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8")


def canonical_body(value: str) -> str:
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    return value if value.endswith("\n") else value + "\n"


def addresses(msg: EmailMessage, name: str) -> list[tuple[str, str]]:
    header = msg[name]
    if header is None:
        return []
    return [(unescaped(a.display_name), unescaped(a.addr_spec)) for a in header.addresses]


def expected_addresses(mailboxes: list[str]) -> list[tuple[str, str]]:
    return [(display_name(m), envelope_address(m)) for m in mailboxes]


def assert_same_names(parsed: list[tuple[str, str]], given: list[tuple[str, str]]) -> None:
    """The same addr-specs, and display names alike but for whitespace: the email package reads
    a space between two encoded-words of a display name, where RFC 2047 6.2 ignores it."""
    assert [a for _, a in parsed] == [a for _, a in given]
    for (parsed_name, _), (given_name, _) in zip(parsed, given, strict=True):
        if "=?" not in given_name:  # a reader decodes encoded-words, wherever they came from
            assert "".join(parsed_name.split()) == "".join(given_name.split())


def assert_parses_back(e: email_pb2.Email, data: bytes) -> None:
    lines = data.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line) <= 998 for line in lines)
    assert not any(b"\r" in line or b"\n" in line for line in lines)
    head = data.split(b"\r\n\r\n", 1)[0]
    sender: str = getattr(e, "from")
    senders = [h.value for h in e.headers if h.name.lower() == "sender"]
    shown = [sender, *e.to, *e.cc, *([e.reply_to] if e.reply_to else []), *senders]
    assert head.isascii() is not any(needs_smtputf8(m) for m in shown)

    msg = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    if head.isascii():
        assert not [(k, v.defects) for k, v in msg.items() if v.defects]
    assert_same_names(addresses(msg, "From"), expected_addresses([sender]))
    assert_same_names(addresses(msg, "To"), expected_addresses(list(e.to)))
    assert_same_names(addresses(msg, "Cc"), expected_addresses(list(e.cc)))
    assert_same_names(addresses(msg, "Reply-To"), expected_addresses([e.reply_to] if e.reply_to else []))
    assert msg["Bcc"] is None
    if "=?" not in e.subject:
        assert squeezed(str(msg["Subject"])) == squeezed(e.subject)
    message_id = str(msg["Message-ID"]).strip()  # the email package may fold it onto a line of its own
    if e.message_id:
        assert message_id == e.message_id
    else:
        domain = envelope_address(sender).rpartition("@")[2]
        assert MSG_ID.match(message_id) and message_id.endswith(f"@{domain}>")

    extra = [(k, v) for k, v in msg.items() if k.lower() not in RENDERED]
    assert [k for k, _ in extra] == [h.name for h in e.headers]
    for (_, parsed), h in zip(extra, e.headers, strict=True):
        if h.name.lower() == "sender":
            parsed_sender = [(unescaped(a.display_name), unescaped(a.addr_spec)) for a in parsed.addresses]
            assert_same_names(parsed_sender, expected_addresses([h.value]))
        elif "=?" not in h.value:
            assert squeezed(str(parsed)) == squeezed(h.value)

    if e.text or not e.html:
        plain = msg.get_body(("plain",))
        assert plain is not None and plain.get_content().replace("\r\n", "\n") == canonical_body(e.text)
    if e.html:
        html = msg.get_body(("html",))
        assert html is not None and html.get_content().replace("\r\n", "\n") == canonical_body(e.html)
    parts = list(msg.iter_attachments())
    assert [(p.get_content_type(), p.get_payload(decode=True)) for p in parts] == [
        ("/".join(attachments.mime_type(a.content_type)), a.content) for a in e.attachments
    ]
    for part, a in zip(parts, e.attachments, strict=True):
        if "=?" not in a.filename:
            # The parameter as parsed (get_filename would also drop a pair of "<" ">" around it).
            filename = unescaped(part["Content-Disposition"].params["filename"])
            assert filename == attachments.safe_filename(a.filename)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(emails())
def test_what_validation_accepts_renders_and_parses_back(e: email_pb2.Email) -> None:
    problems = validation.validate(e)
    assert all(len(p) < 400 for p in problems), problems
    if problems:
        return
    # Routing and the envelope agree on every recipient's domain.
    for domain in envelope.domains(e):
        assert envelope.recipients_in(e, domain), domain
    assert sorted(r for d in envelope.domains(e) for r in envelope.recipients_in(e, d)) == sorted(
        envelope_address(r) for r in envelope.recipients(e)
    )
    fast = rendering.render_fast(e)
    if fast is not None:
        assert_parses_back(e, fast)
    assert_parses_back(e, rendering.render_slow(e))


def test_generated_emails_are_often_valid() -> None:
    """The strategies reach the renderers: a fair share of what they make passes validation."""
    valid = 0

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(emails())
    def count(e: email_pb2.Email) -> None:
        nonlocal valid
        valid += not validation.validate(e)

    count()
    assert valid >= 10  # about one in five
