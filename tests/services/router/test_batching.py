from __future__ import annotations

from epoxi.envelope import new_email
from epoxi.runtime import limits
from epoxi.v1 import email_pb2, node_pb2
from services.router.batching import choose_ip, plan

POOLS = {"default": ["127.0.0.2", "127.0.0.4"], "bulk": ["127.0.0.9"]}


def email(to, ip="", pool="", message_id=""):
    return new_email(
        "a@example.com", to=to, message_id=message_id, delivery=email_pb2.Delivery(ip=ip, ip_pool=pool)
    )


def test_emails_are_grouped_by_domain_and_ip_in_first_seen_order():
    emails = [
        email(["x@gmail.com"], "127.0.0.2"),
        email(["y@yahoo.com"], "127.0.0.2"),
        email(["z@gmail.com"], "127.0.0.2"),
        email(["w@gmail.com"], "127.0.0.3"),
    ]
    batches, unroutable = plan(emails, "", POOLS, max_batch=100)
    assert unroutable == []
    assert [(b.routing_key, len(b.emails)) for b in batches] == [
        ("gmail.com_127_0_0_2", 2),
        ("yahoo.com_127_0_0_2", 1),
        ("gmail.com_127_0_0_3", 1),
    ]


def test_an_email_to_two_domains_lands_in_two_batches_with_one_message_id():
    batches, _ = plan([email(["x@gmail.com", "y@yahoo.com"], "127.0.0.2")], "", POOLS, max_batch=100)
    assert [b.domain for b in batches] == ["gmail.com", "yahoo.com"]
    ids = {b.emails[0].message_id for b in batches}
    assert len(ids) == 1 and ids.pop().startswith("<")


def test_a_given_message_id_is_kept():
    batches, _ = plan([email(["x@gmail.com"], "127.0.0.2", message_id="<m1@example.com>")], "", POOLS, 100)
    assert batches[0].emails[0].message_id == "<m1@example.com>"


def test_batches_are_split_at_max_batch():
    emails = [email([f"u{i}@gmail.com"], "127.0.0.2") for i in range(5)]
    batches, _ = plan(emails, "", POOLS, max_batch=2)
    assert [len(b.emails) for b in batches] == [2, 2, 1]
    assert {b.routing_key for b in batches} == {"gmail.com_127_0_0_2"}


def test_batches_are_split_so_that_no_request_exceeds_max_batch_bytes():
    emails = [
        new_email(
            "a@example.com",
            to=[f"u{i}@gmail.com"],
            message_id=f"<m{i}@example.com>",
            attachments=[email_pb2.Attachment(filename="a", content=b"x" * 1000)],
            delivery=email_pb2.Delivery(ip="127.0.0.2"),
        )
        for i in range(7)
    ]
    size = limits.encoded_size(emails[0])
    batches, _ = plan(emails, "", POOLS, max_batch=100, max_batch_bytes=3 * size)
    assert [len(b.emails) for b in batches] == [3, 3, 1]
    assert [b.size for b in batches] == [3 * size, 3 * size, size]
    for b in batches:
        request = node_pb2.EnqueueBatchRequest(routing_key=b.routing_key, emails=b.emails)
        assert request.ByteSize() <= 3 * size + limits.ENVELOPE_BYTES
    # An email larger than the budget still goes, alone.
    batches, _ = plan(emails[:2], "", POOLS, max_batch=100, max_batch_bytes=10)
    assert [len(b.emails) for b in batches] == [1, 1]


def test_pool_choice_is_stable_per_domain_and_stays_in_the_pool():
    first = choose_ip(email(["a@gmail.com"]), "", POOLS)
    again = choose_ip(email(["b@gmail.com"]), "", POOLS)
    assert first == again and first[0] in POOLS["default"]
    assert choose_ip(email(["a@gmail.com"], pool="bulk"), "", POOLS) == ("127.0.0.9", "")
    assert choose_ip(email(["a@gmail.com"]), "bulk", POOLS) == ("127.0.0.9", "")


def test_emails_without_ip_or_pool_are_reported_unroutable():
    batches, unroutable = plan([email(["a@gmail.com"], pool="nope")], "", POOLS, 100)
    assert batches == []
    assert [u.reason for u in unroutable] == ["no passing node sends from ip pool 'nope'"]
