"""``epoxi shaping ls|clear`` against a running mesh whose nodes deliver to a sink that answers
``421 4.7.0 Try again later``: mail sent through the router throttles each (site, source IP) it
went from, by the built-in rule ``try-again-later``. The mail goes by the catch-all route, so the
domain is a site of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from devmesh.sink import Sink
from devmesh.supervisor import Mesh
from tests.cli.support import NODES, Run, epoxi, store_fast_default_policy
from tests.support import eventually, unused_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRY_AGAIN = "421 4.7.0 Try again later"
# node1 alone sends from .3, node2 alone from .4.
SENT = [("throttle.test", "127.0.0.3", "node1"), ("throttle.test", "127.0.0.4", "node2")]


@dataclass
class Refusing:
    mesh: Mesh
    sink: Sink
    on: bool = True

    @property
    def site(self) -> str:
        return SENT[0][0]  # sent by the catch-all route: the domain is its own site

    def monitor(self) -> list[str]:
        return ["--monitor", self.mesh.address("monitor")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def refusing(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Refusing]:
    sink = await Sink().start()
    r = Refusing(Mesh(tmp_path_factory.mktemp("mesh"), nodes=list(NODES), check_interval="200ms"), sink)
    sink.reply_rule = lambda rcpt: TRY_AGAIN if r.on else None
    r.mesh.route = f"*={sink.address}"
    try:
        await r.mesh.start()
        await store_fast_default_policy(r.mesh.consul or "")
        yield r
    finally:
        await r.mesh.stop()
        await sink.stop()


def lines(run: Run) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in run.out.splitlines() if line.strip()]


async def listed(r: Refusing, count: int) -> list[dict[str, Any]] | None:
    run = await epoxi("shaping", "ls", "--json", *r.monitor())
    assert run.code == 0, run
    found: list[dict[str, Any]] = json.loads(run.out)["adjustments"]
    return found if len(found) == count else None


async def test_ls_shows_nothing_before_a_provider_says_slow_down(refusing: Refusing) -> None:
    run = await epoxi("shaping", "ls", *refusing.monitor())
    assert (run.code, run.out, run.err) == (0, "no shaping adjustments in force\n", "")


async def test_ls_then_clear_one_ip_then_the_site(refusing: Refusing) -> None:
    for domain, ip, _ in SENT:
        run = await epoxi(
            "send", "--router", refusing.mesh.address("router"), "--to", f"ann@{domain}", "--ip", ip
        )
        assert run.code == 0, run
    adjustments = await eventually(lambda: listed(refusing, len(SENT)))
    refusing.on = False  # mail retried from now on is accepted: nothing throttles again
    assert [(a["site"], a["sourceIp"], a["node"]) for a in adjustments] == [
        (refusing.site, ip, node) for _, ip, node in SENT
    ]
    assert {(a["rule"], a["action"], a["reply"]) for a in adjustments} == {
        ("try-again-later", "SHAPING_ACTION_THROTTLE", TRY_AGAIN)
    }

    run = await epoxi("shaping", "ls", *refusing.monitor())
    assert run.code == 0, run
    table = lines(run)
    assert table[0] == [
        "SITE",
        "SOURCE IP",
        "NODE",
        "RULE",
        "ACTION",
        "FACTOR",
        "LIMITS",
        "UNTIL",
        "REPLY",
        "ROUTING KEYS",
    ]
    for row, (domain, ip, node) in zip(table[1:], SENT, strict=True):
        assert row[:6] == [refusing.site, ip, node, "try-again-later", "throttle", "0.5"]
        assert re.fullmatch(r"\d+ connections?(, \d+ per [\d.]+s)?", row[6]), row
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", row[7]), row
        assert row[8:] == [TRY_AGAIN, f"{domain}_{ip.replace('.', '_')}"]
    # Columns start where their headers do.
    header, *rest = run.out.splitlines()
    for name in ("NODE", "RULE", "REPLY", "ROUTING KEYS"):
        column = header.index(name)
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in rest), (
            name,
            run.out,
        )

    site = refusing.site
    run = await epoxi("shaping", "clear", site, "--ip", "127.0.0.3", *refusing.monitor())
    assert run.code == 0, run
    assert [row[:3] for row in lines(run)[1:-1]] == [[site, "127.0.0.3", "node1"]]
    assert run.out.splitlines()[-1] == "cleared 1 adjustment(s)"
    assert [a["node"] for a in await eventually(lambda: listed(refusing, 1))] == ["node2"]

    run = await epoxi("shaping", "clear", site, "--ip", "127.0.0.3", *refusing.monitor())
    assert run.code == 3, run
    assert run.err == (
        f"epoxi shaping clear: NOT_FOUND: no shaping adjustment in force for site {site!r} "
        "from 127.0.0.3 on any node\n"
    )

    run = await epoxi("shaping", "clear", site, "--json", *refusing.monitor())
    assert run.code == 0, run
    cleared = json.loads(run.out)
    assert [(a["sourceIp"], a["node"]) for a in cleared["cleared"]] == [("127.0.0.4", "node2")]
    assert cleared["unreachableNodes"] == []
    assert (await epoxi("shaping", "ls", *refusing.monitor())).out == "no shaping adjustments in force\n"


async def test_refusals_have_the_exit_codes_of_the_other_commands(refusing: Refusing) -> None:
    run = await epoxi("shaping", "clear", "", *refusing.monitor())
    assert run.code == 2 and run.err.startswith("epoxi shaping clear: INVALID_ARGUMENT: site is empty"), run
    run = await epoxi("shaping", "clear", "x", "--ip", "not-an-ip", *refusing.monitor())
    assert run.code == 2 and "source_ip 'not-an-ip' is not an IP address" in run.err, run
    run = await epoxi("shaping", "clear", "nowhere.test", *refusing.monitor())
    assert run.code == 3 and run.err.startswith("epoxi shaping clear: NOT_FOUND: "), run
    run = await epoxi("shaping", "ls", "--monitor", unused_address())
    assert run.code == 4 and run.err.startswith("epoxi shaping ls: UNAVAILABLE: "), run
    run = await epoxi("shaping", *refusing.monitor())
    assert run.code == 2 and "ls|clear" in run.err
    run = await epoxi("shaping", "clear", *refusing.monitor())
    assert run.code == 2 and "SITE" in run.err
