"""The status page at the gateway's ``/``, in a real browser: Debian's Chromium driven by Playwright.

A whole mesh (``devmesh.supervisor.Mesh``: registry, two nodes, router, monitor, gateway, each a
process, delivering to a sink in this process) runs with bearer tokens and open reads
(``EPOXI_OPEN_READ=1``). Known mail goes to two routing keys, one on each node; the page, loaded
with no token, shows both pipelines on their nodes with their delivered counts and throughput,
from scope-read calls alone (the shaping call, scope admin, is refused once and not asked again).
A pasted token goes with every call. Mail the sink answers ``421 4.7.0 Try again later`` puts a
shaping adjustment in force, and the page shows it. Then a node dies, and it and its pipeline
move to the top as problems. A gateway whose monitor is not there shows the error banner. The page's own answers
(headers, 304, 404, 405) are checked over plain HTTP.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from devmesh.sink import Sink
from devmesh.supervisor import Mesh
from epoxi.registry import client, services
from epoxi.v1 import pipeline_pb2
from gateway.app import Backend, Gateway, start_gateway
from gateway.main import MONITOR
from gateway.upstream import StaticUpstream
from tests.epoxi.runtime.certs import new_token, tokens_file
from tests.support import batch_without_waiting, eventually, unused_address

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Long enough for a loaded machine to run a few registry rounds and polls; only failures wait it out.
UI_TIMEOUT_MS = 30_000
MESH_TOKEN, OPS_TOKEN, APP_TOKEN = new_token(), new_token(), new_token()
# Two routing keys, one per node of devmesh's default nodes (node1 sends from .2, node2 from .4).
ORG = ("example.org", "127.0.0.2", "example.org_127_0_0_2", "node1")
NET = ("example.net", "127.0.0.4", "example.net_127_0_0_4", "node2")
SENT = {ORG[2]: 3, NET[2]: 5}
NO_VALUE = "\u2013"  # an en dash: what the page shows for a value it does not have
MARKUP = '<img src="/x" onerror="window.injected = 1">'
# Mail to this domain is answered with a provider's "slow down" (and markup, shown as text);
# node1 alone sends from .3, so the adjustment is node1's, and the other keys' budgets are not.
SLOW = ("slow.example", "127.0.0.3", "slow.example_127_0_0_3", "node1")
TRY_AGAIN = "421 4.7.0 Try again later"
SLOW_REPLY = f"{TRY_AGAIN} {MARKUP}"

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@dataclass
class LiveGateway:
    mesh: Mesh
    url: str
    http: aiohttp.ClientSession
    sink: Sink


async def send(http: aiohttp.ClientSession, url: str, domain: str, ip: str, count: int, tag: str) -> None:
    emails = [
        {
            "from": "ops@sender.test",
            "to": [f"rcpt{i}@{domain}"],
            "subject": f"status page {tag} {i}",
            "text": "hello",
            "delivery": {"ip": ip},
        }
        for i in range(count)
    ]
    headers = {"Authorization": f"Bearer {APP_TOKEN}"}
    async with http.post(f"{url}/v1/emails", json={"emails": emails}, headers=headers) as resp:
        reply = await resp.json()
    assert resp.status == 200 and reply["successfulBatches"] == 1, reply


async def delivered(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], int]:
    """(node, routing key) → delivered, from the cluster's stats: the page's source, read with no
    token (open reads)."""
    async with http.get(f"{url}/admin/pipelines") as resp:
        stats = await resp.json()
    assert resp.status == 200, stats
    return {(p["node"], p["routingKey"]): int(p["counters"]["delivered"]) for p in stats["pipelines"]}


async def wait_delivered(live: LiveGateway, want: dict[tuple[str, str], int]) -> None:
    async def done() -> bool:
        got = await delivered(live.http, live.url)
        return all(got.get(k, 0) >= n for k, n in want.items())

    await eventually(done)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveGateway]:
    data = tmp_path_factory.mktemp("status-page")
    tokens = tokens_file(
        data / "tokens",
        {"mesh": ("mesh", MESH_TOKEN), "ops": ("read,admin", OPS_TOKEN), "app": ("submit", APP_TOKEN)},
    )
    env = {"EPOXI_TOKENS_FILE": str(tokens), "EPOXI_TOKEN": MESH_TOKEN, "EPOXI_OPEN_READ": "1"}
    sink = await Sink(reply_rule=lambda rcpt: SLOW_REPLY if rcpt.endswith("@" + SLOW[0]) else None).start()
    mesh = Mesh(data / "mesh", check_interval="200ms", env=env, route=f"*={sink.address}")
    try:
        await mesh.start()
        assert mesh.consul is not None
        await batch_without_waiting(mesh.consul)
        async with aiohttp.ClientSession() as http:
            gateway = LiveGateway(mesh, f"http://{mesh.address('gateway')}", http, sink)
            for domain, ip, key, _ in (ORG, NET):
                await send(http, gateway.url, domain, ip, SENT[key], "first")
            await wait_delivered(gateway, {(ORG[3], ORG[2]): SENT[ORG[2]], (NET[3], NET[2]): SENT[NET[2]]})
            yield gateway
    finally:
        await mesh.stop()
        await sink.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BrowserContext]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1366, "height": 860},
        )
        try:
            yield context
        finally:
            await context.close()


@dataclass
class Tab:
    page: Page
    # Uncaught script errors and Content-Security-Policy violations: the page must have none.
    faults: list[str]
    # Paths of the API calls the page made.
    calls: list[str]


@pytest_asyncio.fixture(loop_scope="module")
async def tab(browser: BrowserContext) -> AsyncIterator[Tab]:
    page = await browser.new_page()
    tab = Tab(page, [], [])
    page.on(
        "request", lambda r: tab.calls.append(urlsplit(r.url).path) if r.resource_type == "fetch" else None
    )
    page.on("pageerror", lambda e: tab.faults.append(f"script error: {e}"))
    page.on(
        "console",
        lambda m: tab.faults.append(m.text) if "Content Security Policy" in m.text else None,
    )
    try:
        yield tab
    finally:
        await page.close()
    assert tab.faults == []


def pipeline_row(page: Page, node: str, key: str) -> Any:
    return page.locator(f'#pipelines tbody[data-node="{node}"] tr[data-routing-key="{key}"]')


def cell(page: Page, node: str, key: str, field: str) -> Any:
    return pipeline_row(page, node, key).locator(f'[data-field="{field}"]')


async def use_token(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#token-form button[type=submit]")


async def test_the_page_shows_the_pipelines_and_their_delivered_counts(
    live: LiveGateway, tab: Tab, tmp_path: Path
) -> None:
    page = tab.page
    await page.goto(live.url + "/")
    await expect(page).to_have_title("Epoxi mesh status")
    # No token, and reads are open: everything shows, counters included.
    for _, _, key, node in (ORG, NET):
        await expect(cell(page, node, key, "delivered")).to_have_text(str(SENT[key]), timeout=UI_TIMEOUT_MS)
        await expect(cell(page, node, key, "state")).to_have_text("running")
        await expect(cell(page, node, key, "bounced")).to_have_text("0")
        await expect(cell(page, node, key, "queued")).to_have_text("0")
    await expect(page.locator("#updated time")).to_have_count(1)
    await expect(page.locator("#error")).to_be_hidden()
    await expect(page.locator('#nodes tr[data-node="node1"]')).to_contain_text("127.0.0.2, 127.0.0.3")
    await expect(page.locator('#nodes tr[data-node="node2"] .badge')).to_have_text("passing")
    await expect(page.locator("#totals [data-total=Delivered]")).to_have_text(str(sum(SENT.values())))
    await expect(page.locator("#problem-list li")).to_have_count(0)
    await expect(page.locator("#no-problems")).to_be_visible()
    # Scope read is all it needs: the shaping call (scope admin) is refused once, not asked again
    # (the next poll draws without it), and the section says why it is empty.
    drawn = await page.locator("#updated time").get_attribute("datetime")
    await expect(page.locator("#updated time")).not_to_have_attribute(
        "datetime", drawn or "", timeout=UI_TIMEOUT_MS
    )
    assert set(tab.calls) == {"/admin/pipelines", "/admin/pipelines/health", "/admin/shaping"}, tab.calls
    assert tab.calls.count("/admin/shaping") == 1 < tab.calls.count("/admin/pipelines"), tab.calls
    await expect(page.locator("#shaping-state")).to_contain_text("Not shown: GET /admin/shaping: HTTP 401: ")
    await expect(page.locator("#shaping-state")).to_contain_text("Paste a token with scope admin")
    await expect(page.locator("#shaping")).to_be_hidden()

    # A pasted token stays in the tab and goes with every call.
    async with page.expect_request(lambda r: urlsplit(r.url).path == "/admin/pipelines") as sent:
        await use_token(page, OPS_TOKEN)
    assert (await sent.value).headers.get("authorization") == f"Bearer {OPS_TOKEN}"
    assert await page.evaluate("sessionStorage.getItem('epoxi.status.token')") == OPS_TOKEN
    await expect(page.locator("#token-state")).to_have_text("A token is set for this tab.")
    # With scope admin the shaping call is asked again: nothing is in force.
    await expect(page.locator("#shaping-state")).to_have_text(
        "None: no provider's reply has slowed the mesh down.", timeout=UI_TIMEOUT_MS
    )

    # More mail while the page watches: the counter follows and the throughput shows it.
    more = 4
    await send(live.http, live.url, ORG[0], ORG[1], more, "second")
    await expect(cell(page, ORG[3], ORG[2], "delivered")).to_have_text(
        str(SENT[ORG[2]] + more), timeout=UI_TIMEOUT_MS
    )
    await expect(cell(page, ORG[3], ORG[2], "rate")).not_to_have_text("0.0/s")
    await expect(pipeline_row(page, ORG[3], ORG[2]).locator("svg.spark polyline")).to_have_count(1)
    assert await pipeline_row(page, NET[3], NET[2]).locator("svg.spark").get_attribute("role") == "img"

    shot = tmp_path / "status.png"
    await page.screenshot(path=shot, full_page=True)
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


async def test_values_from_the_api_are_shown_as_text_never_as_markup(live: LiveGateway, tab: Tab) -> None:
    # A pipeline in the registry whose routing key, node and check output are markup.
    info = pipeline_pb2.PipelineInfo(
        name="epoxi-pipeline-ghost", routing_key=f"{MARKUP}_1", node=MARKUP, address="127.0.0.1:9"
    )
    consul = client.connect(live.mesh.consul)
    try:
        await consul.agent.service.register(**services.pipeline_registration(info, "1h", "1m"))
        check = services.pipeline_check_id(info.name)
        # Each a status change, which the registry shows at once (an output alone may wait for
        # its check_update_interval, as Consul's does).
        await consul.agent.check.ttl_pass(check, notes="fine")
        await consul.agent.check.ttl_fail(check, notes=MARKUP)
        page = tab.page
        await page.goto(live.url + "/")
        problem = page.locator('#problem-list li[data-kind="pipeline"]')
        await expect(problem).to_contain_text(f"{MARKUP}_1", timeout=UI_TIMEOUT_MS)
        await expect(problem.locator("pre.output")).to_have_text(MARKUP)
        # Its node is in no registry entry of its own: a problem too, named as text.
        node = page.locator('#problem-list li[data-kind="node"]').filter(has_text=MARKUP)
        await expect(node.locator(".name")).to_have_text(MARKUP)
        await expect(node.locator(".badge")).to_have_text("unregistered")
        await expect(page.locator("#pipelines tbody").first.locator("tr.group")).to_contain_text(MARKUP)
        assert await page.locator("main img").count() == 0
        assert await page.evaluate("window.injected") is None
    finally:
        await consul.agent.service.deregister(info.name)
        await consul.close()


async def shaping_in_force(live: LiveGateway) -> list[dict[str, Any]] | None:
    headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
    async with live.http.get(f"{live.url}/admin/shaping", headers=headers) as resp:
        listed = await resp.json()
    assert resp.status == 200, listed
    found: list[dict[str, Any]] = listed["adjustments"]
    return found or None


async def test_a_shaping_adjustment_in_force_is_shown(live: LiveGateway, tab: Tab, tmp_path: Path) -> None:
    domain, ip, key, node = SLOW
    await send(live.http, live.url, domain, ip, 1, "slow")
    [adjustment] = await eventually(lambda: shaping_in_force(live))
    site = domain  # sent by the catch-all route: the domain is its own site
    assert (adjustment["site"], adjustment["sourceIp"], adjustment["node"]) == (site, ip, node)
    assert adjustment["routingKeys"] == [key]
    page = tab.page
    await page.goto(live.url + "/")
    await use_token(page, OPS_TOKEN)
    row = page.locator(f'#shaping tr[data-site="{site}"][data-source-ip="{ip}"][data-node="{node}"]')
    await expect(row).to_have_count(1, timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#shaping tbody tr")).to_have_count(1)

    def field(name: str) -> Any:
        return row.locator(f'[data-field="{name}"]')

    await expect(field("site")).to_have_text(site)
    await expect(field("sourceIp")).to_have_text(ip)
    await expect(field("node")).to_have_text(node)
    await expect(field("rule")).to_have_text("try-again-later")
    await expect(field("action").locator(".badge")).to_have_text("throttle")
    await expect(field("factor")).to_have_text("0.5")
    await expect(field("until").locator("time")).to_have_attribute("datetime", adjustment["until"])
    await expect(field("until")).not_to_be_empty()
    # A provider's words are text, never markup.
    await expect(field("reply")).to_have_text(SLOW_REPLY)
    assert await page.locator("main img").count() == 0
    assert await page.evaluate("window.injected") is None
    await expect(page.locator("#shaping-state")).to_contain_text("1 adjustment")
    # Health problems still come first; an adjustment is not one.
    assert await page.evaluate(
        "Boolean(document.getElementById('problems').compareDocumentPosition("
        "document.getElementById('shaping-section')) & Node.DOCUMENT_POSITION_FOLLOWING)"
    )
    await expect(page.locator("#no-problems")).to_be_visible()
    await page.screenshot(path=tmp_path / "shaping.png", full_page=True)


async def test_a_dead_node_and_its_pipeline_are_listed_first_as_problems(
    live: LiveGateway, tab: Tab, tmp_path: Path
) -> None:
    page = tab.page
    await page.goto(live.url + "/")
    await expect(cell(page, NET[3], NET[2], "delivered")).to_have_text(
        str(SENT[NET[2]]), timeout=UI_TIMEOUT_MS
    )
    await expect(page.locator("#pipelines tbody").first).to_have_attribute("data-node", "node1")

    await live.mesh.stop_process(NET[3], signal.SIGKILL)

    problems = page.locator("#problem-list li")
    await expect(problems.first).to_have_attribute("data-node", NET[3], timeout=UI_TIMEOUT_MS)
    await expect(
        page.locator(f'#problem-list li[data-kind="pipeline"][data-routing-key="{NET[2]}"]')
    ).to_have_count(1, timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#no-problems")).to_be_hidden()
    # The node's own problem says why: it did not answer, then (its TTL expired) its check output.
    await expect(problems.first.locator("pre.output").first).not_to_be_empty()
    await expect(page.locator(f'#nodes tr[data-node="{NET[3]}"] .badge')).to_have_text(
        "critical", timeout=UI_TIMEOUT_MS
    )
    # The problem rows come first in both tables, marked, with the check's output.
    await expect(page.locator("#nodes tbody tr").first).to_have_attribute("data-node", NET[3])
    await expect(page.locator("#pipelines tbody").first).to_have_attribute("data-node", NET[3])
    dead = pipeline_row(page, NET[3], NET[2])
    await expect(dead).to_have_class("problem")
    await expect(dead.locator("pre.output")).not_to_have_count(0)
    await expect(cell(page, NET[3], NET[2], "state").locator(".badge")).to_have_text("critical")
    await expect(dead.locator("pre.output")).to_contain_text("TTL expired")
    # No counters from a node that does not answer; the living node's pipeline still has its own.
    await expect(cell(page, NET[3], NET[2], "delivered")).to_have_text(NO_VALUE)
    await expect(cell(page, ORG[3], ORG[2], "state").locator(".badge")).to_have_text("running")
    await expect(cell(page, ORG[3], ORG[2], "delivered")).not_to_have_text(NO_VALUE)
    await page.screenshot(path=tmp_path / "problem.png", full_page=True)


@pytest_asyncio.fixture(loop_scope="module")
async def monitorless() -> AsyncIterator[Gateway]:
    """A gateway whose monitor is not there: every read is 503."""
    backend = Backend(MONITOR, StaticUpstream(unused_address()))
    gateway = await start_gateway("127.0.0.1:0", [backend], rpc_timeout=2)
    yield gateway
    await gateway.close()


async def test_the_error_banner_says_which_call_failed(monitorless: Gateway, tab: Tab) -> None:
    page = tab.page
    await page.goto(f"http://{monitorless.address}/")
    error = page.locator("#error")
    await expect(error).to_be_visible(timeout=UI_TIMEOUT_MS)
    await expect(error).to_contain_text("GET /admin/pipelines: HTTP 503")
    await expect(error).to_have_attribute("role", "alert")
    await expect(page.locator("#updated")).to_contain_text("Waiting")


async def test_the_page_and_its_assets_carry_their_types_and_policy(monitorless: Gateway) -> None:
    base = f"http://{monitorless.address}"
    async with aiohttp.ClientSession() as http:
        for path, media_type in [
            ("/", "text/html"),
            ("/static/status.js", "text/javascript"),
            ("/static/status.css", "text/css"),
        ]:
            async with http.get(base + path) as resp:
                body = await resp.read()
                assert resp.status == 200 and resp.content_type == media_type, path
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "default-src 'none'" in csp
                assert resp.headers["Cache-Control"] == "no-cache"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert resp.headers["X-Request-Id"]
                etag = resp.headers["ETag"]
            assert body
            async with http.get(base + path, headers={"If-None-Match": etag}) as again:
                assert again.status == 304 and await again.read() == b""
        async with http.get(base + "/static/status.html") as resp:
            assert resp.status == 404
            assert json.loads(await resp.read())["code"] == 5
        async with http.post(base + "/", data=b"x", headers={"X-Request-Id": "mine"}) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET"
            assert resp.headers["X-Request-Id"] == "mine"
            assert (await resp.json())["code"] == 12
        async with http.get(base + "/", headers={"X-Request-Id": "é"}) as resp:
            assert resp.status == 400 and (await resp.json())["code"] == 3
