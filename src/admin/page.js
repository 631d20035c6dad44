"use strict";
const OUTCOMES = ["pending","delivered","filtered","unsupported","duplicate","rejected","dead"];
let cursor = null, next = null, selected = null;

function filters() {
  const q = new URLSearchParams();
  for (const k of ["outcome", "messageId", "userId", "groupId"]) { const v = $("f-" + k).value.trim(); if (v) q.set(k, v); }
  return q;
}

async function loadStats() {
  const s = await api("/api/stats");
  const cards = $("cards"); cards.replaceChildren();
  const current = $("f-outcome").value;
  for (const o of OUTCOMES) {
    const c = el("div", { class: "card" + (current === o ? " selected" : ""), "data-outcome": o, title: "show " + o + " messages",
      onclick: () => { $("f-outcome").value = current === o ? "" : o; cursor = null; refresh(); } },
      el("b", {}, String(s.outcomes[o] ?? 0)), badge(o));
    cards.append(c);
  }
  const age = s.queue.oldest_pending_age_seconds;
  $("queue").textContent = "queue: " + s.queue.depth + (age != null ? " · oldest " + age.toFixed(1) + " s" : "");
  showDelivery(s.delivery);
  showHealth(s.totango);
}
function showDelivery(d) {
  if (!d) return;
  const rtt = d.rtt_ms != null ? " · RTT " + d.rtt_ms.toFixed(1) + " ms" : "";
  $("delivery").textContent = "delivery: " + d.in_flight + " in flight of " + d.concurrency_limit + rtt;
}

async function loadMessages() {
  const q = filters(); q.set("limit", "50"); if (cursor) q.set("before", cursor);
  const page = await api("/api/messages?" + q);
  next = page.next; $("older").disabled = !next;
  const rows = $("rows"); rows.replaceChildren();
  for (const m of page.messages) {
    const tr = el("tr", { "data-id": m.id, class: selected === m.id ? "selected" : "", onclick: () => show(m.id) },
      el("td", {}, String(m.id)), el("td", {}, when(m.received_at)), el("td", {}, m.call),
      el("td", {}, entityLink("users", m.user_id)), el("td", {}, entityLink("accounts", m.account_id)), el("td", {}, badge(m.outcome)),
      el("td", { class: "reason", title: m.reason ?? "" }, m.code ? m.code + ": " + (m.reason ?? "") : ""),
      el("td", {}, String(m.attempts)));
    rows.append(tr);
  }
  if (!page.messages.length) rows.append(el("tr", {}, el("td", { colspan: "8", class: "muted" }, "No messages match.")));
  $("count").textContent = page.messages.length + " shown";
  $("replay-all").hidden = $("f-outcome").value !== "dead" || !page.messages.length;
}

function paramsTable(params) {
  const t = el("table", { class: "params" });
  for (const [k, v] of Object.entries(params)) t.append(el("tr", {}, el("td", {}, k), el("td", {}, v)));
  return t;
}

async function show(id) {
  selected = id;
  for (const tr of document.querySelectorAll("#rows tr")) tr.classList.toggle("selected", tr.dataset.id == id);
  const m = await api("/api/messages/" + id);
  const d = $("detail"); d.replaceChildren();
  d.append(el("h2", {}, "Message " + m.id + " ", badge(m.outcome)));
  d.append(el("div", { class: "muted" }, m.call + " · messageId " + m.message_id + " · source " + m.source + " · received " + when(m.received_at)));
  d.append(entityLinks(m));
  if (m.code) d.append(el("p", {}, el("b", {}, m.code), " " + (m.reason ?? "")));
  for (const w of m.warnings || []) d.append(el("p", { class: "warning" }, "⚠ " + w));
  if (m.outcome === "dead") d.append(el("button", { class: "danger", id: "replay", onclick: () => replay(m.id) }, "Replay"));
  d.append(el("h3", {}, "Segment input"), el("pre", { id: "input" }, JSON.stringify(m.payload, null, 2)));
  d.append(el("h3", {}, "Sent to Totango"));
  if (m.requests && m.requests.length) {
    m.requests.forEach((r, i) => {
      d.append(el("div", { class: "muted" }, "request " + (i + 1) + (i < m.sent ? " · accepted" : " · not yet accepted")));
      if (r.url) d.append(el("pre", {}, "GET " + r.url));
      d.append(paramsTable(r.params));
    });
  } else d.append(el("p", { class: "muted" }, m.outcome === "pending" ? "Not translated yet." : "Nothing sent."));
  d.append(el("h3", {}, "Totango's answer"));
  const r = m.last_response;
  d.append(r ? el("pre", { id: "response" }, (r.status ? "HTTP " + r.status + "\n" : "") + (r.error ?? "") + (r.body ?? ""))
             : el("p", { class: "muted" }, "No answer yet."));
  d.append(el("div", { class: "muted" }, "attempts: " + m.attempts + (m.next_attempt_at ? " · next attempt " + when(m.next_attempt_at) : "")));
}

// Pages per account and per user (/accounts/{id}, /users/{id}): ids are any
// text, so they are percent-encoded; a link in a table row does not select it.
function entityLink(kind, id) {
  return id == null ? "" : el("a", { href: entityHref(kind, id), class: "entity", onclick: (e) => e.stopPropagation() }, id);
}
function entityLinks(m) {
  const p = el("div", { id: "entity-links" });
  if (m.user_id != null) p.append("user ", entityLink("users", m.user_id), " ");
  if (m.account_id != null) p.append("account ", entityLink("accounts", m.account_id));
  return p;
}
function entitySearch() {
  $("entity-search").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("entity-id").value;
    if (id) location.assign(entityHref($("entity-kind").value, id));
  });
}

async function replay(id) {
  try { const r = await api("/api/messages/" + id + "/replay", { method: "POST" }); notice("Replayed message " + r.ids.join(", "), "info"); await refresh(); await show(id); }
  catch (e) { notice(e.message, "error"); }
}

// Account insights sync runs (Totango -> Salesforce), newest first.
async function loadRuns() {
  const r = await api("/api/insights/runs?limit=5");
  const box = $("runs");
  box.hidden = !r.runs.length;
  const rows = $("run-rows"); rows.replaceChildren();
  for (const run of r.runs) {
    rows.append(el("tr", {},
      el("td", {}, when(run.started_at)), el("td", {}, run.dry_run ? "dry run" : "sync"),
      el("td", {}, el("span", { class: "badge " + (run.status === "ok" ? "delivered" : run.status === "failed" ? "dead" : "pending") }, run.status)),
      el("td", {}, String(run.accounts_read)), el("td", {}, String(run.records_updated)),
      el("td", {}, String(run.records_failed)), el("td", {}, run.message || "")));
  }
}

// The audit trail of operator actions, newest first, paged with `before`.
let auditCursor = null, auditNext = null;
async function loadAudit() {
  const q = new URLSearchParams({ limit: "20" }); if (auditCursor) q.set("before", auditCursor);
  const r = await api("/api/audit?" + q);
  auditNext = r.next; $("audit-older").disabled = !auditNext;
  const rows = $("audit-rows"); rows.replaceChildren();
  for (const a of r.entries) {
    rows.append(el("tr", {},
      el("td", {}, when(a.at)), el("td", {}, a.actor), el("td", {}, a.address ?? ""),
      el("td", {}, a.action), el("td", { class: "reason" }, JSON.stringify(a.detail ?? {})),
      el("td", {}, a.count != null ? String(a.count) : "")));
  }
  if (!r.entries.length) rows.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "No operator actions recorded yet.")));
}
$("audit-older").addEventListener("click", () => { auditCursor = auditNext; loadAudit().catch((e) => notice(e.message, "error")); });
$("audit-newest").addEventListener("click", () => { auditCursor = null; loadAudit().catch((e) => notice(e.message, "error")); });

// Totango's health (GET /api/stats "totango"), the banner at the top.
const HEALTH_LABELS = { idle: "Totango: nothing sent yet", normal: "Totango answers normally", slow: "Totango is slow",
  refusing: "Totango refuses requests", paused: "Totango paused us (429)", unreachable: "Totango is unreachable" };
function showHealth(t) {
  if (!t) return;
  const box = $("totango-health");
  box.dataset.state = t.state;
  box.className = "health " + t.state;
  let label = HEALTH_LABELS[t.state] || ("Totango: " + t.state);
  if (t.state === "paused" && t.until) label += " until " + when(t.until) + " UTC";
  if (t.state === "unreachable" && t.since) label += " since " + when(t.since) + " UTC";
  if (t.state === "refusing" && t.since) label += " since " + when(t.since) + " UTC";
  $("totango-state").textContent = label;
  const rtt = t.rtt_p50_ms != null ? "median round trip " + (t.rtt_p50_ms >= 1000 ? (t.rtt_p50_ms / 1000).toFixed(1) + " s" : t.rtt_p50_ms.toFixed(0) + " ms") : "";
  $("totango-summary").textContent = t.last_error ? "· last error: " + t.last_error : rtt ? "· " + rtt : "";
  box.title = t.summary || "";
  const troubled = !["idle", "normal"].includes(t.state);
  $("totango-waiting").textContent = troubled && t.waiting ? "· " + t.waiting + " message(s) wait for it" : "";
}

// History charts (GET /api/history, uPlot). Each chart's container keeps
// `data-points`: the buckets with at least one value.
const HISTORY_CHARTS = [
  { id: "chart-throughput", axes: [{ label: "messages" }], series: [
    ["accepted", "#3b5bdb"], ["delivered", "#2b8a3e"], ["failed", "#e8590c", "failed attempts"], ["rejected", "#c92a2a"],
    ["duplicate", "#b35c00"], ["dead", "#862e9c"], ["filtered", "#868e96"]] },
  { id: "chart-queue", axes: [{ label: "messages", scale: "n" }, { label: "seconds", scale: "s", side: 1 }], series: [
    ["queue_depth", "#3b5bdb", "queue depth", "n"], ["oldest_pending_age_seconds", "#c92a2a", "oldest pending (s)", "s"]] },
  { id: "chart-totango", axes: [{ label: "ms", scale: "ms" }, { label: "limit", scale: "n", side: 1 }], series: [
    ["rtt_p50_ms", "#2b8a3e", "round trip p50 (ms)", "ms"], ["rtt_p99_ms", "#e8590c", "round trip p99 (ms)", "ms"],
    ["concurrency_limit", "#3b5bdb", "concurrency limit", "n"]] },
];
const historyPlots = {};
function historyOptions(chart, width) {
  const axes = [{}].concat(chart.axes.map((a) => ({ label: a.label, scale: a.scale || "y", side: a.side ?? 3, grid: { show: !a.side } })));
  const series = [{}].concat(chart.series.map(([key, stroke, label, scale]) => ({
    label: label || key, stroke, scale: scale || "y", width: 1.5, spanGaps: false,
    // Points too: a minute between two gaps (or the first one) shows.
    points: { show: true, size: 5, fill: stroke } })));
  const scales = { x: { time: true } };
  for (const a of chart.axes) scales[a.scale || "y"] = { range: (u, min, max) => [0, Math.max(1, max)] };
  return { width, height: 200, axes, series, scales, legend: { live: false } };
}
async function loadHistory() {
  if (typeof uPlot === "undefined") { $("history-note").textContent = "charts unavailable"; return; }
  const range = $("history-range").value;
  const h = await api("/api/history?range=" + encodeURIComponent(range));
  const s = h.series;
  const xs = s.time.map((t) => t / 1000);
  $("history-note").textContent = "one point per " + (h.step_seconds >= 120 ? h.step_seconds / 60 + " minutes" : "minute");
  for (const chart of HISTORY_CHARTS) {
    const box = $(chart.id);
    const data = [xs].concat(chart.series.map(([key]) => s[key]));
    box.dataset.points = String(xs.filter((_, i) => data.slice(1).some((ys) => ys[i] != null)).length);
    box.dataset.range = range;
    const width = Math.max(300, box.clientWidth || 600);
    if (!historyPlots[chart.id]) historyPlots[chart.id] = new uPlot(historyOptions(chart, width), data, box);
    else { historyPlots[chart.id].setData(data); historyPlots[chart.id].setSize({ width, height: 200 }); }
  }
}
function startHistory() {
  const load = () => loadHistory().catch((e) => notice(e.message, "error"));
  $("history-range").addEventListener("change", load);
  window.addEventListener("resize", () => {
    for (const chart of HISTORY_CHARTS) {
      const p = historyPlots[chart.id];
      if (p) p.setSize({ width: Math.max(300, $(chart.id).clientWidth || 600), height: 200 });
    }
  });
  setInterval(() => { if ($("auto").checked) load(); }, 15000);
  load();
}

async function refresh() {
  try { await loadStats(); await loadMessages(); await loadRuns(); if (!auditCursor) await loadAudit(); }
  catch (e) { notice(e.message, "error"); }
}

$("filters").addEventListener("submit", (e) => { e.preventDefault(); cursor = null; notice(""); refresh(); });
$("clear").addEventListener("click", () => { for (const k of ["outcome","messageId","userId","groupId"]) $("f-" + k).value = ""; cursor = null; refresh(); });
$("older").addEventListener("click", () => { cursor = next; loadMessages().catch((e) => notice(e.message, "error")); });
$("newest").addEventListener("click", () => { cursor = null; refresh(); });
$("replay-all").addEventListener("click", async () => {
  const q = filters();
  if (!confirm("Replay every dead message matching these filters?")) return;
  try { const r = await api("/api/replay?" + q, { method: "POST" }); notice("Replayed " + r.replayed + " message(s)", "info"); await refresh(); }
  catch (e) { notice(e.message, "error"); }
});
entitySearch();
setInterval(() => { if ($("auto").checked && !cursor) refresh(); }, 5000);
refresh();
startHistory();
