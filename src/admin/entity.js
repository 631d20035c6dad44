"use strict";
// The page of one account (/accounts/{id}) or user (/users/{id}); its data
// comes from /api/accounts/{id} or /api/users/{id}. Everything shown is set
// as text, never as HTML.
let cursor = null, next = null;

// A link to an entity's page; ids can be any text.
const entityLink = (kind, id) => id == null ? "" : el("a", { href: entityHref(kind, id), onclick: (e) => e.stopPropagation() }, id);
const lastError = (m) => {
  const r = m.last_response;
  const answer = r ? [r.status ? "HTTP " + r.status : "", r.error ?? "", r.body ?? ""].filter(Boolean).join(" · ") : "";
  return [m.code ? m.code + ": " + (m.reason ?? "") : "", answer].filter(Boolean).join(" — ");
};

// Which entity: the path's last segment, percent-decoded.
function which() {
  const m = location.pathname.match(/^\/(accounts|users)\/(.+)$/);
  if (!m) return null;
  try { return { kind: m[1], id: decodeURIComponent(m[2]) }; } catch { return null; }
}
const entity = which();

function showAttributes(list) {
  const rows = $("attribute-rows"); rows.replaceChildren();
  for (const a of list) {
    rows.append(el("tr", { "data-name": a.name },
      el("td", {}, a.service_id), el("td", { class: "mono" }, a.name), el("td", { class: "mono value" }, a.value),
      el("td", {}, when(a.sent_at)), el("td", {}, String(a.message))));
  }
  if (!list.length) rows.append(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No attribute sent to Totango yet.")));
}
function showActivity(a) {
  $("activity-total").textContent = a.total + " activities sent in the last " + a.days + " days";
  // Days with activities, newest first (the JSON has every day).
  const rows = $("activity-rows"); rows.replaceChildren();
  for (const d of [...a.per_day].reverse().filter((d) => d.activities > 0)) rows.append(el("tr", { "data-day": d.day }, el("td", {}, d.day), el("td", {}, String(d.activities))));
  if (!rows.children.length) rows.append(el("tr", {}, el("td", { colspan: "2", class: "muted" }, "No activity sent in these days.")));
}
function showFailures(f) {
  const rows = $("failure-rows"); rows.replaceChildren();
  for (const m of [...f.dead, ...f.failing]) {
    rows.append(el("tr", { "data-id": m.id, onclick: () => show(m.id) },
      el("td", {}, String(m.id)), el("td", {}, when(m.received_at)), el("td", {}, m.call), el("td", {}, badge(m.outcome)),
      el("td", {}, String(m.attempts)), el("td", { class: "reason", title: lastError(m) }, lastError(m))));
  }
  if (!rows.children.length) rows.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "No dead messages and no failed attempts.")));
}
function showMessages(list) {
  const rows = $("message-rows"); rows.replaceChildren();
  for (const m of list) {
    rows.append(el("tr", { "data-id": m.id, onclick: () => show(m.id) },
      el("td", {}, String(m.id)), el("td", {}, when(m.received_at)), el("td", {}, m.call),
      el("td", {}, entityLink("users", m.user_id)), el("td", {}, entityLink("accounts", m.account_id)),
      el("td", {}, badge(m.outcome)),
      el("td", { class: "reason", title: m.reason ?? "" }, m.code ? m.code + ": " + (m.reason ?? "") : ""),
      el("td", {}, String(m.attempts))));
  }
  if (!list.length) rows.append(el("tr", {}, el("td", { colspan: "8", class: "muted" }, "No messages.")));
}

async function show(id) {
  for (const tr of document.querySelectorAll("#message-rows tr, #failure-rows tr")) tr.classList.toggle("selected", tr.dataset.id == id);
  const m = await api("/api/messages/" + encodeURIComponent(id)).catch((e) => { notice(e.message, "error"); return null; });
  if (!m) return;
  const d = $("message-detail"); d.replaceChildren();
  d.append(el("h2", {}, "Message " + m.id + " ", badge(m.outcome)));
  d.append(el("div", { class: "muted" }, m.call + " · messageId " + m.message_id + " · received " + when(m.received_at)));
  if (m.code) d.append(el("p", {}, el("b", {}, m.code), " " + (m.reason ?? "")));
  for (const w of m.warnings || []) d.append(el("p", { class: "warning" }, "⚠ " + w));
  d.append(el("h3", {}, "Segment input"), el("pre", {}, JSON.stringify(m.payload, null, 2)));
  d.append(el("h3", {}, "Sent to Totango"));
  for (const [i, r] of (m.requests || []).entries()) {
    d.append(el("div", { class: "muted" }, "request " + (i + 1) + (i < m.sent ? " · accepted" : " · not yet accepted")));
    const t = el("table", { class: "params" });
    for (const [k, v] of Object.entries(r.params || {})) t.append(el("tr", {}, el("td", {}, k), el("td", {}, v)));
    d.append(t);
  }
  if (!(m.requests || []).length) d.append(el("p", { class: "muted" }, "Nothing sent."));
  const r = m.last_response;
  d.append(el("h3", {}, "Totango's answer"), r ? el("pre", {}, (r.status ? "HTTP " + r.status + "\n" : "") + (r.error ?? "") + (r.body ?? "")) : el("p", { class: "muted" }, "No answer yet."));
}

async function load() {
  if (!entity) { notice("No account or user in this address.", "error"); return; }
  const singular = entity.kind === "accounts" ? "Account" : "User";
  $("entity-kind-shown").textContent = singular;
  $("entity-name").textContent = entity.id;
  document.title = singular + " " + entity.id + " · totango-destination";
  $("entity-kind").value = entity.kind;
  const q = new URLSearchParams(); if (cursor) q.set("before", cursor);
  try {
    const e = await api("/api/" + entity.kind + "/" + encodeURIComponent(entity.id) + (cursor ? "?" + q : ""));
    $("entity-empty").hidden = e.found;
    $("entity-empty").textContent = "Nothing was received for this " + singular.toLowerCase() + ".";
    next = e.next; $("messages-older").disabled = !next;
    showAttributes(e.attributes); showActivity(e.activity); showFailures(e.failures); showMessages(e.messages);
    notice("");
  } catch (err) { notice(err.message, "error"); }
}

$("entity-search").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("entity-id").value;
  if (id) location.assign(entityHref($("entity-kind").value, id));
});
$("messages-older").addEventListener("click", () => { cursor = next; load(); });
$("messages-newest").addEventListener("click", () => { cursor = null; load(); });
load();
