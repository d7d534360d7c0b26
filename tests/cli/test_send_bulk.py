"""``epoxi send --file`` against one running mesh: 5,000 emails in JSON lines with bad lines
among them, an .eml directory, a retry from the failed file, and the exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devmesh.supervisor import Mesh
from tests.cli.support import delivered, epoxi, failed_entries
from tests.support import eventually, unused_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOMAINS = [f"d{i}.bulk.test" for i in range(8)]
# Line index -> a line that cannot be sent.
BAD = {
    7: "{not json",
    100: '["an", "array"]',
    1234: json.dumps({"from": "a@b.test", "to": ["not-an-address"], "subject": "x", "text": "x"}),
    2500: json.dumps({"from": "a@b.test", "to": [], "subject": "x", "text": "x"}),
    4999: json.dumps({"from": "a@b.test", "to": ["x@d0.bulk.test"], "subjekt": "typo"}),
}


def email_line(i: int) -> str:
    to = f"r{i}@{DOMAINS[i % len(DOMAINS)]}"
    return json.dumps(
        {"from": "Bulk <bulk@epoxi.dev>", "to": to, "subject": f"bulk {i}", "text": f"number {i}"}
    )


async def sent_to_sink(mesh: Mesh, expected: set[str]) -> list[str]:
    maildir = mesh.data_dir / "sink"

    async def arrived() -> list[str] | None:
        found = delivered(maildir)
        return found if expected <= set(found) else None

    return await eventually(arrived, seconds=90, step=0.2)


async def test_5000_json_lines_with_progress_summary_and_failed_file(mesh: Mesh, tmp_path: Path) -> None:
    path = tmp_path / "emails.jsonl"
    with path.open("w") as f:
        for i in range(5000):
            f.write((BAD.get(i) or email_line(i)) + "\n")
        f.write("\n")  # a blank line is no email
    run = await epoxi(
        "send",
        "--router",
        mesh.address("router"),
        "--file",
        str(path),
        "--json",
        "--batch-size",
        "400",
        "--concurrency",
        "3",
        "--progress-interval",
        "0",
    )
    assert run.code == 1, run  # some failed
    summary = json.loads(run.out)
    assert {k: summary[k] for k in ("total", "accepted", "failed", "batches", "failedBatches")} == {
        "total": 5000,
        "accepted": 4995,
        "failed": 5,
        "batches": 13,
        "failedBatches": 0,
    }
    assert summary["failedFile"] == f"{path}.failed"
    # Progress: a line per batch (interval 0), counting up to the total, with a rate and an ETA.
    progress = run.err.splitlines()
    assert len(progress) >= 13
    assert all(line.startswith("done ") and " emails/s  ETA " in line for line in progress)
    counts = [int(line.split()[1].split("/")[0]) for line in progress]
    assert counts == sorted(counts) and counts[-1] == 5000
    assert progress[-1].startswith("done 5000/5000 [####################] 100%")
    assert progress[-1].endswith("failed 5")

    failed = failed_entries(summary["failedFile"])
    assert [f["index"] for f in failed] == sorted(BAD)
    reasons = {f["index"]: f["reason"] for f in failed}
    assert reasons[7].startswith("not JSON: ")
    assert reasons[100] == "not a JSON object but list"
    assert reasons[1234] == "email.to[0] 'not-an-address' is not an email address"
    assert reasons[2500] == "email has no recipients (to, cc and bcc are empty)"
    assert reasons[4999].startswith("not an epoxi.v1.Email: ") and "subjekt" in reasons[4999]

    expected = {f"r{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(5000) if i not in BAD}
    found = await sent_to_sink(mesh, expected)
    assert len(found) == len(expected)  # each once, and none of the bad ones

    # A retry of just the failed lines: the same five fail again, and nothing else is sent.
    retry = await epoxi(
        "send",
        "--router",
        mesh.address("router"),
        "--file",
        str(path),
        "--only-indexes",
        summary["failedFile"],
        "--failed",
        str(tmp_path / "again.failed"),
    )
    assert retry.code == 1, retry
    assert retry.out.splitlines()[0].split() == ["accepted", "0", "of", "5"]
    again = [f["index"] for f in failed_entries(tmp_path / "again.failed")]
    assert again == sorted(BAD)


def eml(sender: str, to: str, subject: str, extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\n{extra}Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@eml.test>\r\n\r\nHello from {subject}.\r\n"
    ).encode()


async def test_an_eml_directory_is_sent_raw_with_its_envelope_from_the_header(
    mesh: Mesh, tmp_path: Path
) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir()
    (folder / "a.eml").write_bytes(
        eml("Ann <ann@eml.test>", "amy@e1.eml.test", "first", "Bcc: hid@e2.eml.test\r\n")
    )
    (folder / "b.eml").write_bytes(eml("ann@eml.test", "bea@e1.eml.test", "second"))
    (folder / "c.eml").write_bytes(b"no header here, just text\r\n")
    (folder / "notes.txt").write_text("not a message")
    run = await epoxi(
        "send", "--router", mesh.address("router"), "--file", str(folder), "--progress-interval", "0"
    )
    assert run.code == 1, run
    assert run.out.splitlines()[0].split() == ["accepted", "2", "of", "3"]
    failed = failed_entries(f"{folder}.failed")
    assert [(f["index"], f["file"]) for f in failed] == [(2, "c.eml")]
    assert failed[0]["reason"].startswith("the message does not start with a header field")

    found = await sent_to_sink(mesh, {"amy@e1.eml.test", "hid@e2.eml.test", "bea@e1.eml.test"})
    messages = [p.read_bytes() for p in (mesh.data_dir / "sink").glob("*.eml")]
    first = [m for m in messages if b"Subject: first" in m]
    assert len(first) == 2  # one per recipient domain
    assert all(b"Bcc:" not in m for m in first)  # the blind copy stays blind
    assert sorted(r for r in found if r.endswith("eml.test")) == [
        "amy@e1.eml.test",
        "bea@e1.eml.test",
        "hid@e2.eml.test",
    ]

    # --to overrides the header's recipients; sending the same batch again delivers nothing twice.
    (folder / "c.eml").unlink()
    (folder / "b.eml").unlink()
    args = [
        "send",
        "--router",
        mesh.address("router"),
        "--file",
        str(folder),
        "--to",
        "zed@e3.eml.test",
        "--json",
    ]
    for _ in range(2):
        run = await epoxi(*args)
        assert run.code == 0, run
        assert json.loads(run.out)["accepted"] == 1
    summary: dict[str, Any] = json.loads(run.out)
    assert failed_entries(summary["failedFile"]) == []
    # The second run's batch was the first's: the node recognised it, and the sink got it once.
    # (A later email of the same routing key, queued behind any duplicate, has arrived.)
    run = await epoxi(*args[:-3], "--to", "zed-later@e3.eml.test")
    assert run.code == 0, run
    await sent_to_sink(mesh, {"zed@e3.eml.test", "zed-later@e3.eml.test"})
    assert delivered(mesh.data_dir / "sink").count("zed@e3.eml.test") == 1


async def test_an_unreachable_router_and_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "two.jsonl"
    path.write_text(email_line(1) + "\n" + email_line(2) + "\n")
    run = await epoxi("send", "--router", unused_address(), "--file", str(path), "--json", "--timeout", "5")
    assert run.code == 4, run
    summary = json.loads(run.out)
    assert (summary["accepted"], summary["failed"]) == (0, 2)
    reasons = [f["reason"] for f in failed_entries(f"{path}.failed")]
    assert len(reasons) == 2 and all(r.startswith("UNAVAILABLE: ") for r in reasons)

    run = await epoxi("send", "--file", str(tmp_path / "missing.jsonl"))
    assert (run.code, run.err) == (
        2,
        f"epoxi send: --file {tmp_path / 'missing.jsonl'}: no such file or directory\n",
    )
    run = await epoxi("send", "--file", str(path), "--batch-size", "0")
    assert run.code == 2 and "--batch-size and --concurrency must be at least 1" in run.err
    (tmp_path / "bad.failed").write_text("nonsense\n")
    run = await epoxi("send", "--file", str(path), "--only-indexes", str(tmp_path / "bad.failed"))
    assert run.code == 2 and "is not a failed-file entry" in run.err and "Traceback" not in run.err
    run = await epoxi("send")
    assert run.code == 2 and "give --to" in run.err
