from __future__ import annotations

import re

from epoxi.envelope import new_email
from epoxi.runtime import limits
from epoxi.v1 import email_pb2, node_pb2
from services.router.batching import choose_ip, idempotency_key, plan

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


def test_an_email_to_two_domains_lands_in_two_batches_with_one_message_id_and_its_index():
    emails = [email(["x@gmail.com"], "127.0.0.2"), email(["x@gmail.com", "y@yahoo.com"], "127.0.0.2")]
    batches, _ = plan(emails, "", POOLS, max_batch=100)
    assert [(b.domain, b.indexes) for b in batches] == [("gmail.com", [0, 1]), ("yahoo.com", [1])]
    assert batches[0].message_ids[1] == batches[1].message_ids[0]


def test_a_missing_message_id_is_derived_from_the_email_the_same_way_every_time():
    emails = [email(["x@gmail.com"], "127.0.0.2"), email(["y@gmail.com"], "127.0.0.2")]
    [batch], _ = plan(emails, "", POOLS, max_batch=100)
    [again], _ = plan(emails, "", POOLS, max_batch=100)
    assert batch.message_ids == again.message_ids
    assert batch.idempotency_key == again.idempotency_key
    assert all(re.fullmatch(r"<[0-9a-f]{32}@example\.com>", m) for m in batch.message_ids)
    assert len(set(batch.message_ids)) == 2
    assert [e.message_id for e in emails] == ["", ""]  # the request itself is left as it was


def test_identical_emails_get_one_message_id_each_by_their_occurrence():
    same = [email(["x@gmail.com"], "127.0.0.2") for _ in range(3)]
    [batch], _ = plan(same, "", POOLS, max_batch=100)
    assert len(set(batch.message_ids)) == 3
    # The first of them is named as a lone copy would be; the second as the second copy.
    [lone], _ = plan(same[:1], "", POOLS, max_batch=100)
    assert lone.message_ids == batch.message_ids[:1]
    # An email that differs in any field is another message.
    changed = email(["x@gmail.com"], "127.0.0.2")
    changed.subject = "another"
    [changed_batch], _ = plan([changed], "", POOLS, max_batch=100)
    assert changed_batch.message_ids != lone.message_ids


def test_the_idempotency_key_names_the_routing_key_and_the_message_ids_in_order():
    assert idempotency_key("k", ["<a@x>", "<b@x>"]) == idempotency_key("k", ["<a@x>", "<b@x>"])
    assert idempotency_key("k", ["<a@x>", "<b@x>"]) != idempotency_key("k", ["<b@x>", "<a@x>"])
    assert idempotency_key("k", ["<a@x>"]) != idempotency_key("k2", ["<a@x>"])
    assert idempotency_key("k", ["ab", "c"]) != idempotency_key("k", ["a", "bc"])


def test_a_given_message_id_is_kept():
    batches, _ = plan([email(["x@gmail.com"], "127.0.0.2", message_id="<m1@example.com>")], "", POOLS, 100)
    assert batches[0].emails[0].message_id == "<m1@example.com>"


def test_batches_are_split_at_max_batch():
    emails = [email([f"u{i}@gmail.com"], "127.0.0.2") for i in range(5)]
    batches, _ = plan(emails, "", POOLS, max_batch=2)
    assert [b.indexes for b in batches] == [[0, 1], [2, 3], [4]]
    assert {b.routing_key for b in batches} == {"gmail.com_127_0_0_2"}
    assert len({b.idempotency_key for b in batches}) == 3


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


def test_a_batchs_request_is_put_together_from_each_email_serialized_once():
    emails = [
        email(["a@gmail.com", "b@yahoo.com"], ip="127.0.0.2"),  # derived Message-ID, two batches
        email(["c@gmail.com"], ip="127.0.0.2", message_id="<given@example.com>"),
        email_pb2.Email(
            raw=email_pb2.RawMessage(
                mail_from="r@example.com", rcpt_to=["d@gmail.com"], content=b"Subject: x\n\nbare LF\n"
            ),
            delivery=email_pb2.Delivery(ip="127.0.0.2"),
        ),
    ]
    batches, _ = plan(emails, "", POOLS, max_batch=100, call_key="call-1")
    assert len(batches) == 2
    for b in batches:
        sent = node_pb2.EnqueueBatchRequest.FromString(b.request())
        assert sent == node_pb2.EnqueueBatchRequest(
            routing_key=b.routing_key, emails=b.emails, idempotency_key=b.idempotency_key
        )
        assert all(e.message_id for e in sent.emails)
        assert b.size == sum(limits.encoded_size(e) for e in b.emails)
    gmail = node_pb2.EnqueueBatchRequest.FromString(batches[0].request())
    assert gmail.emails[2].raw.content == b"Subject: x\r\n\r\nbare LF\r\n"  # as planned: CRLF


def test_pool_choice_is_stable_per_domain_and_stays_in_the_pool():
    first = choose_ip(email(["a@gmail.com"]), "", POOLS)
    again = choose_ip(email(["b@gmail.com"]), "", POOLS)
    assert first == again and first[0] in POOLS["default"]
    assert choose_ip(email(["a@gmail.com"], pool="bulk"), "", POOLS) == ("127.0.0.9", "")
    assert choose_ip(email(["a@gmail.com"]), "bulk", POOLS) == ("127.0.0.9", "")


def test_emails_without_ip_or_pool_are_reported_unroutable_with_their_indexes():
    emails = [
        email(["a@gmail.com"], pool="nope"),
        email(["b@gmail.com"]),
        email(["c@gmail.com"], pool="nope"),
    ]
    batches, unroutable = plan(emails, "", POOLS, 100)
    assert [b.indexes for b in batches] == [[1]]
    assert [(u.reason, u.indexes, len(u.message_ids)) for u in unroutable] == [
        ("no passing node sends from ip pool 'nope'", [0, 2], 2)
    ]
