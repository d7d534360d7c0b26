// The Epoxi status page: polls the gateway's own HTTP API and draws the mesh.
//
// Every POLL_MS it asks, at once (the first two scope read, so open reads need no token):
//   GET /admin/pipelines         nodes (address, egress IPs, load), mesh totals, every pipeline
//                                with its node's live status and counters, and each node's
//                                health: its registry checks and whether it answered
//   GET /admin/pipelines/health  each pipeline's registry check status and outputs: the words
//                                shown with an unhealthy pipeline
//   GET /admin/shaping           the shaping adjustments in force on every node (scope admin).
//                                Refused (401/403), it is not asked again until the token changes:
//                                the section says why it is empty instead.
// Throughput is computed here: the delivered counter of successive polls, per pipeline, drawn
// as an SVG sparkline.
//
// Nothing from the API is ever parsed as HTML: every value goes in as a text node or an
// attribute value (the page's CSP allows no inline script either).
"use strict";

(() => {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 8000;
  const HISTORY_MS = 5 * 60 * 1000;
  const SPARK_MIN_MS = 30 * 1000;
  // The "now" rate: delivered over about this long, so one poll's jitter does not show.
  const RATE_WINDOW_MS = 10 * 1000;
  const TOKEN_KEY = "epoxi.status.token";
  const SVG = "http://www.w3.org/2000/svg";
  const SPARK_W = 120;
  const SPARK_H = 28;
  const COLUMNS = 8; // of the pipelines table

  // Pipeline ("node routing-key") to its samples [{t, delivered}], oldest first.
  const history = new Map();
  let lastUpdated = null;
  // {token, failure}: GET /admin/shaping refused this token; asked again once the token changes.
  let shapingRefused = null;

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttributes(e, attrs);
    for (const c of children.flat()) {
      if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    setAttributes(e, attrs);
    return e;
  }

  function setAttributes(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : String(v));
    }
  }

  // --- the token --------------------------------------------------------------------------------

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  function setToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // sessionStorage refused (a private mode): the token lasts until the page is left.
    }
    showTokenState();
  }

  function showTokenState() {
    $("token-state").textContent = token()
      ? "A token is set for this tab."
      : "No token: reads are sent without one.";
  }

  // --- the API ----------------------------------------------------------------------------------

  // {ok: true, body} or {ok: false, status, message}; status 0 when the gateway did not answer.
  async function getJson(path) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    let response;
    try {
      response = await fetch(path, {
        headers,
        cache: "no-store",
        credentials: "omit",
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
    } catch (e) {
      return { ok: false, status: 0, path, message: "no answer from the gateway (" + e.message + ")" };
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (response.ok && body) return { ok: true, status: response.status, path, body };
    // Errors are google.rpc.Status: {code, message, details}.
    const message = body && typeof body.message === "string" && body.message ? body.message : response.statusText;
    return { ok: false, status: response.status, path, message };
  }

  // The token was missing, or not one that may make the call.
  const refused = (answer) => answer.status === 401 || answer.status === 403;

  const num = (v) => {
    const n = Number(v);
    return Number.isFinite(n) ? n : 0;
  };

  // --- the model: what the two answers say together --------------------------------------------

  const NOT_ANSWERED = "passing in the registry, but it did not answer GetNodeState";

  // A node's health from GetClusterStats.nodeHealth: its registry checks, and whether it
  // answered; {state, outputs, answered}.
  function nodeHealth(entry) {
    if (!entry) return { state: "unregistered", outputs: ["the registry shows pipelines on this node, but not the node"], answered: false };
    const outputs = (entry.outputs || []).filter((o) => o);
    if (!entry.healthy) return { state: entry.status || "critical", outputs, answered: false };
    if (!entry.answered) return { state: "unreachable", outputs: [NOT_ANSWERED], answered: false };
    return { state: "passing", outputs: [], answered: true };
  }

  // "PIPELINE_STATUS_RUNNING" → "running".
  const statusName = (s) => String(s || "PIPELINE_STATUS_UNSPECIFIED").replace(/^PIPELINE_STATUS_/, "").toLowerCase();

  function countersOf(c) {
    c = c || {};
    return {
      queued: num(c.queued),
      inFlight: num(c.inFlight),
      deferred: num(c.deferred),
      delivered: num(c.delivered),
      bounced: num(c.bounced),
    };
  }

  // cluster: GET /admin/pipelines; health: GET /admin/pipelines/health, or null when it failed
  // (the problems then show without their check outputs).
  function buildModel(cluster, health) {
    const healthOf = new Map((cluster.nodeHealth || []).map((e) => [e.node, nodeHealth(e)]));
    const nodes = new Map();
    const addNode = (n) => {
      nodes.set(n.id, {
        id: n.id,
        address: n.address || "",
        egressIps: n.egressIps || [],
        ipPool: n.ipPool || "",
        pipelineCount: num(n.pipelineCount),
        load: num(n.load),
        health: healthOf.get(n.id) || nodeHealth(null),
      });
    };
    for (const n of cluster.nodes || []) addNode(n);
    for (const e of cluster.nodeHealth || []) if (!nodes.has(e.node)) addNode({ id: e.node });

    const pipelines = new Map();
    const pipeline = (node, routingKey) => {
      const id = node + " " + routingKey;
      if (!pipelines.has(id)) {
        pipelines.set(id, { id, node, routingKey, healthy: false, status: "", counters: null, registry: null });
      }
      return pipelines.get(id);
    };
    for (const info of cluster.pipelines || []) {
      const p = pipeline(info.node || "", info.routingKey || "");
      p.healthy = Boolean(info.healthy);
      p.status = statusName(info.status);
      // Zeros as registered unless its node answered: then they are the node's live counters.
      const live = healthOf.get(p.node);
      p.counters = live && live.answered ? countersOf(info.counters) : null;
    }
    for (const r of (health && health.results) || []) {
      const info = r.pipeline || {};
      const p = pipeline(info.node || "", info.routingKey || "");
      if (!p.status) p.healthy = Boolean(r.healthy); // registered between the two calls
      p.registry = { status: r.status || "critical", outputs: (r.outputs || []).filter((o) => o) };
    }
    for (const p of pipelines.values()) {
      if (!nodes.has(p.node)) addNode({ id: p.node });
      p.state = pipelineState(p);
      p.problem = !p.healthy || p.state === "failed";
      p.outputs = p.problem && p.registry ? p.registry.outputs : [];
    }
    for (const n of nodes.values()) n.problem = n.health.state !== "passing";
    return { nodes, pipelines, cluster };
  }

  // Unhealthy: the registry's worst check status; healthy: what its node reports.
  function pipelineState(p) {
    if (!p.healthy) return p.registry ? p.registry.status : "critical";
    return p.status || "running";
  }

  // Problems first, then by name.
  const byProblemThen = (name) => (a, b) => Number(b.problem) - Number(a.problem) || name(a).localeCompare(name(b));

  // --- throughput --------------------------------------------------------------------------------

  function record(pipelines, now) {
    for (const p of pipelines.values()) {
      if (!p.counters) continue;
      const samples = history.get(p.id) || [];
      const last = samples[samples.length - 1];
      // A counter that went down (the spool purged finished mail, or was replaced) starts anew.
      if (last && p.counters.delivered < last.delivered) samples.length = 0;
      samples.push({ t: now, delivered: p.counters.delivered });
      while (samples.length > 2 && now - samples[0].t > HISTORY_MS) samples.shift();
      history.set(p.id, samples);
    }
    for (const id of history.keys()) {
      if (!pipelines.has(id) || !pipelines.get(id).counters) history.delete(id);
    }
  }

  // [{t, rate}] between successive samples, in messages per second.
  function rates(samples) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const dt = (samples[i].t - samples[i - 1].t) / 1000;
      if (dt > 0) out.push({ t: samples[i].t, rate: (samples[i].delivered - samples[i - 1].delivered) / dt });
    }
    return out;
  }

  function currentRate(samples) {
    if (samples.length < 2) return null;
    const last = samples[samples.length - 1];
    const first = samples.find((s) => last.t - s.t <= RATE_WINDOW_MS) || samples[0];
    const from = first === last ? samples[samples.length - 2] : first;
    return (last.delivered - from.delivered) / ((last.t - from.t) / 1000);
  }

  const formatRate = (r) => (r >= 10 ? r.toFixed(0) : r.toFixed(1)) + "/s";

  function sparkline(samples, now) {
    const series = rates(samples);
    const peak = Math.max(...series.map((s) => s.rate), 0);
    const now_ = currentRate(samples);
    const label =
      now_ === null
        ? "No throughput yet: it needs two polls."
        : "Delivered per second over the last 5 minutes: now " + formatRate(now_) + ", peak " + formatRate(peak) + ".";
    const chart = svg("svg", {
      class: "spark",
      width: SPARK_W,
      height: SPARK_H,
      viewBox: "0 0 " + SPARK_W + " " + SPARK_H,
      role: "img",
      "aria-label": label,
    });
    const title = svg("title");
    title.textContent = label;
    chart.append(title);
    chart.append(svg("line", { class: "base", x1: 0, y1: SPARK_H - 1, x2: SPARK_W, y2: SPARK_H - 1 }));
    if (series.length) {
      // The x axis spans the history there is (at least SPARK_MIN_MS), up to HISTORY_MS.
      const span = Math.min(HISTORY_MS, Math.max(SPARK_MIN_MS, now - samples[0].t));
      const x = (t) => Math.max(0, SPARK_W - ((now - t) / span) * SPARK_W);
      const y = (r) => SPARK_H - 2 - (peak > 0 ? (r / peak) * (SPARK_H - 4) : 0);
      const points = series.map((s) => [x(s.t), y(s.rate)]);
      points.unshift([x(samples[0].t), points[0][1]]);
      const text = (ps) => ps.map(([px, py]) => px.toFixed(1) + "," + py.toFixed(1)).join(" ");
      const floor = SPARK_H - 1;
      const area = [[points[0][0], floor], ...points, [points[points.length - 1][0], floor]];
      chart.append(svg("polygon", { class: "area", points: text(area) }));
      chart.append(svg("polyline", { class: "line", points: text(points) }));
    }
    return h("span", { class: "throughput" }, chart, h("span", { class: "rate", "data-field": "rate" }, now_ === null ? "–" : formatRate(now_)));
  }

  // --- drawing -----------------------------------------------------------------------------------

  const badgeClass = {
    passing: "ok",
    running: "ok",
    stopped: "idle",
    unspecified: "idle",
    starting: "warn",
    stopping: "warn",
    warning: "warn",
  };
  const badge = (state) => h("span", { class: "badge " + (badgeClass[state] || "bad") }, state);
  const count = (field, value) => h("td", { class: "number", "data-field": field }, value === null ? "–" : value.toLocaleString("en"));

  function drawTotals(cluster) {
    const stats = cluster.pipelineStats || {};
    const totals = stats.totals || {};
    const summary = cluster.healthSummary || {};
    const items = [
      ["Nodes", num(stats.totalNodes)],
      ["Pipelines", num(stats.totalPipelines)],
      ["Healthy", num(summary.healthy)],
      ["Unhealthy", num(summary.unhealthy)],
      ["Queued", num(totals.queued)],
      ["In flight", num(totals.inFlight)],
      ["Deferred", num(totals.deferred)],
      ["Delivered", num(totals.delivered)],
      ["Bounced", num(totals.bounced)],
    ];
    $("totals").replaceChildren(
      ...items.map(([name, value]) =>
        h("div", { class: name === "Unhealthy" && value > 0 ? "bad" : null }, h("dt", {}, name), h("dd", { "data-total": name }, value.toLocaleString("en")))
      )
    );
  }

  function drawProblems(model) {
    const items = [];
    for (const n of [...model.nodes.values()].filter((n) => n.problem).sort(byProblemThen((n) => n.id))) {
      items.push(
        h(
          "li",
          { class: "problem", "data-kind": "node", "data-node": n.id },
          h("strong", {}, "Node ", h("span", { class: "name" }, n.id)),
          " ",
          badge(n.health.state),
          n.health.outputs.map((o) => h("pre", { class: "output" }, o))
        )
      );
    }
    const bad = [...model.pipelines.values()].filter((p) => p.problem);
    for (const p of bad.sort(byProblemThen((p) => p.routingKey + " " + p.node))) {
      items.push(
        h(
          "li",
          { class: "problem", "data-kind": "pipeline", "data-node": p.node, "data-routing-key": p.routingKey },
          h("strong", {}, "Pipeline ", h("span", { class: "name" }, p.routingKey)),
          " on node ",
          h("span", { class: "name" }, p.node),
          " ",
          badge(p.state),
          p.outputs.map((o) => h("pre", { class: "output" }, o))
        )
      );
    }
    $("problem-list").replaceChildren(...items);
    $("no-problems").hidden = items.length > 0;
    $("problems").classList.toggle("has-problems", items.length > 0);
  }

  function drawNodes(model) {
    const rows = [...model.nodes.values()].sort(byProblemThen((n) => n.id)).map((n) =>
      h(
        "tr",
        { "data-node": n.id, class: n.problem ? "problem" : null },
        h("th", { scope: "row" }, n.id),
        h("td", {}, badge(n.health.state), n.health.outputs.map((o) => h("div", { class: "detail" }, o))),
        h("td", {}, n.address),
        h("td", {}, n.egressIps.join(", ")),
        h("td", {}, n.ipPool),
        h("td", { class: "number", "data-field": "pipelines" }, n.pipelineCount.toLocaleString("en")),
        h("td", { class: "number", "data-field": "load" }, n.load.toLocaleString("en"))
      )
    );
    $("nodes").tBodies[0].replaceChildren(...rows);
  }

  function drawPipelines(model, now) {
    const table = $("pipelines");
    const byNode = new Map([...model.nodes.keys()].map((id) => [id, []]));
    for (const p of model.pipelines.values()) byNode.get(p.node).push(p);
    const groups = [...model.nodes.values()]
      .map((n) => ({ node: n, pipelines: byNode.get(n.id), problem: n.problem || byNode.get(n.id).some((p) => p.problem) }))
      .sort(byProblemThen((g) => g.node.id));
    const bodies = groups.map((g) => {
      const head = h(
        "tr",
        { class: "group" },
        h("th", { scope: "rowgroup", colspan: COLUMNS }, "Node ", g.node.id, " ", badge(g.node.health.state), " ", g.pipelines.length === 1 ? "1 pipeline" : g.pipelines.length + " pipelines")
      );
      const rows = g.pipelines.sort(byProblemThen((p) => p.routingKey)).map((p) => {
        const q = p.counters;
        return h(
          "tr",
          { "data-node": p.node, "data-routing-key": p.routingKey, class: p.problem ? "problem" : null },
          h("th", { scope: "row" }, p.routingKey),
          h(
            "td",
            { "data-field": "state" },
            badge(p.state),
            p.outputs.map((o) => h("pre", { class: "output" }, o))
          ),
          count("queued", q ? q.queued : null),
          count("inFlight", q ? q.inFlight : null),
          count("delivered", q ? q.delivered : null),
          count("deferred", q ? q.deferred : null),
          count("bounced", q ? q.bounced : null),
          h("td", {}, q ? sparkline(history.get(p.id) || [], now) : "–")
        );
      });
      if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: COLUMNS, class: "empty" }, "No pipelines.")));
      return h("tbody", { "data-node": g.node.id }, head, rows);
    });
    for (const old of [...table.tBodies]) old.remove();
    table.append(...bodies);
  }

  // "SHAPING_ACTION_THROTTLE" → "throttle".
  const actionName = (a) => String(a || "SHAPING_ACTION_UNSPECIFIED").replace(/^SHAPING_ACTION_/, "").toLowerCase();
  const actionClass = { throttle: "warn", suspend: "warn", bounce: "bad" };
  const formatFactor = (f) => String(Number(num(f).toFixed(4)));

  // An RFC 3339 timestamp (nanoseconds cut to milliseconds, which Date reads) as a <time>.
  function when(stamp) {
    if (!stamp) return "–";
    const at = new Date(String(stamp).replace(/(\.\d{3})\d+/, "$1"));
    if (Number.isNaN(at.getTime())) return String(stamp);
    return h("time", { datetime: String(stamp), title: String(stamp) }, at.toLocaleString("en-GB"));
  }

  // shaping: the answer of GET /admin/shaping ({ok, body} or a failure).
  function drawShaping(shaping) {
    const table = $("shaping");
    const state = $("shaping-state");
    if (!shaping.ok) {
      table.hidden = true;
      table.tBodies[0].replaceChildren();
      $("shaping-unreachable").replaceChildren();
      state.textContent = "Not shown: " + describe(shaping) + (refused(shaping) ? ". Paste a token with scope admin above to see them." : "");
      return;
    }
    const adjustments = shaping.body.adjustments || [];
    const rows = adjustments.map((a) => {
      const action = actionName(a.action);
      return h(
        "tr",
        { "data-site": a.site || "", "data-source-ip": a.sourceIp || "", "data-node": a.node || "" },
        h("th", { scope: "row", "data-field": "site" }, a.site || ""),
        h("td", { "data-field": "sourceIp" }, a.sourceIp || ""),
        h("td", { "data-field": "node" }, a.node || ""),
        h("td", { "data-field": "rule" }, a.rule || ""),
        h("td", { "data-field": "action" }, h("span", { class: "badge " + (actionClass[action] || "idle") }, action)),
        h("td", { class: "number", "data-field": "factor" }, formatFactor(a.factor)),
        h("td", { "data-field": "until" }, when(a.until)),
        h("td", { "data-field": "reply" }, h("span", { class: "detail" }, a.reply || ""))
      );
    });
    table.tBodies[0].replaceChildren(...rows);
    table.hidden = rows.length === 0;
    state.textContent = rows.length
      ? (rows.length === 1 ? "1 adjustment" : rows.length + " adjustments") + ": providers' replies have slowed or held these sites and source IPs."
      : "None: no provider's reply has slowed the mesh down.";
    $("shaping-unreachable").replaceChildren(
      ...(shaping.body.unreachableNodes || []).map((u) =>
        h("li", { "data-node": u.node || "" }, "Node ", h("span", { class: "name" }, u.node || ""), " did not answer: ", (u.errorCode || "") + ": " + (u.errorMessage || ""))
      )
    );
  }

  // --- the banners and "last updated" ------------------------------------------------------------

  function describe(failure) {
    const what = failure.status ? "HTTP " + failure.status : "no answer";
    return "GET " + failure.path + ": " + what + ": " + failure.message;
  }

  // drawn: this poll drew the page (only the check outputs were missing).
  function showError(failures, drawn) {
    const box = $("error");
    if (!failures.length) {
      box.hidden = true;
      box.replaceChildren();
      $("main").classList.remove("stale");
      return;
    }
    const lines = failures.map((f) => h("p", {}, describe(f)));
    if (failures.some(refused)) {
      lines.push(h("p", {}, "Paste a bearer token with scope read above."));
    }
    if (drawn) {
      lines.push(h("p", {}, "Unhealthy pipelines are shown without their check outputs."));
    } else if (lastUpdated) {
      lines.push(h("p", {}, "Showing what the mesh looked like at " + lastUpdated.toLocaleTimeString("en-GB") + "."));
    }
    box.replaceChildren(h("strong", {}, "The API did not answer as it should."), ...lines);
    box.hidden = false;
    $("main").classList.toggle("stale", !drawn && Boolean(lastUpdated));
  }

  function showUpdated(now) {
    lastUpdated = new Date(now);
    const time = h("time", { datetime: lastUpdated.toISOString() }, lastUpdated.toLocaleTimeString("en-GB"));
    $("updated").replaceChildren("Last updated ", time, " · every " + POLL_MS / 1000 + " s");
  }

  // --- the loop ----------------------------------------------------------------------------------

  async function askShaping() {
    const t = token();
    if (shapingRefused && shapingRefused.token === t) return shapingRefused.failure;
    const answer = await getJson("/admin/shaping");
    shapingRefused = refused(answer) ? { token: t, failure: answer } : null;
    return answer;
  }

  async function refresh() {
    const [cluster, health, shaping] = await Promise.all([
      getJson("/admin/pipelines"),
      getJson("/admin/pipelines/health"),
      askShaping(),
    ]);
    showError([cluster, health].filter((r) => !r.ok), cluster.ok);
    if (!cluster.ok) return;
    const now = Date.now();
    const model = buildModel(cluster.body, health.ok ? health.body : null);
    record(model.pipelines, now);
    drawProblems(model);
    drawShaping(shaping);
    drawTotals(model.cluster);
    drawNodes(model);
    drawPipelines(model, now);
    showUpdated(now);
  }

  let busy = false;
  let again = false;
  let timer = 0;

  async function poll() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    clearTimeout(timer);
    try {
      await refresh();
    } catch (e) {
      showError([{ status: 0, path: "(the page)", message: "the page failed to draw: " + e.message }]);
    } finally {
      busy = false;
    }
    if (again) {
      again = false;
      poll();
    } else {
      timer = setTimeout(poll, POLL_MS);
    }
  }

  function start() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      const value = input.value.trim().replace(/^bearer\s+/i, "");
      input.value = "";
      if (value) setToken(value);
      poll();
    });
    $("forget-token").addEventListener("click", () => {
      setToken("");
      poll();
    });
    showTokenState();
    poll();
  }

  start();
})();
