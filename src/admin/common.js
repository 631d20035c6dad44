"use strict";
// Helpers the operator page and the account/user pages share; each page's
// own script loads after this one. Everything shown is set as text, never
// as HTML.
const $ = (id) => document.getElementById(id);

async function api(path, opts = {}) {
  // The session cookie authenticates (same origin only).
  const resp = await fetch(path, { credentials: "same-origin", ...opts });
  const body = await resp.json().catch(() => ({}));
  if (resp.status === 401) { location.assign("/"); throw new Error(body.message || "signed out"); }
  if (!resp.ok) throw new Error(body.message || ("HTTP " + resp.status));
  return body;
}
function notice(text, kind) {
  const n = $("notice"); n.textContent = text; n.className = text ? "show " + kind : "";
}
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v); }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}
const when = (ms) => ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "";
const badge = (o) => el("span", { class: "badge " + o }, o);
// A link target for an account's or user's page; ids can be any text.
const entityHref = (kind, id) => "/" + kind + "/" + encodeURIComponent(id);
