// recvault coaching page: log in with a coach token, search or draw a
// sample, then play recordings (with seeking), read redacted transcripts
// and view images side by side. Everything goes through the JSON API of
// the HTTP port, which calls the same handlers as gRPC; content comes
// through short-lived signed links. Data is only ever put into the page
// as text (textContent), never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "recvault.token";

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function status(text, error = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

async function api(path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const init = { headers: { authorization: "Bearer " + token } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) {
    if (r.status === 401) showLogin();
    throw new Error(data.error || r.statusText);
  }
  return data;
}

function showLogin() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("#login").hidden = false;
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
}

async function login(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    const me = await api("/api/whoami");
    $("#who").textContent = `${me.principal} (${me.roles.join(", ")}${me.unredacted ? ", unredacted" : ""})`;
    $("#login").hidden = true;
    $("#app").hidden = false;
    $("#logout").hidden = false;
    status("Search, or draw a sample.");
  } catch (e) {
    showLogin();
    status(e.message, true);
    $("#login").after($("#status"));
  }
}

function filter() {
  const f = new FormData($("#filter"));
  const out = {};
  for (const k of ["queue", "agent_id", "channel", "kind", "started_after", "started_before"]) {
    const v = (f.get(k) || "").trim();
    if (v) out[k] = v;
  }
  for (const [k, field] of [["min_duration", "min_duration_ms"], ["max_duration", "max_duration_ms"]]) {
    const v = (f.get(k) || "").trim();
    if (v) out[field] = Math.round(Number(v) * 1000);
  }
  const tag = (f.get("tag") || "").trim();
  if (tag) {
    const i = tag.indexOf("=");
    if (i < 1) throw new Error("tag: write key=value");
    out.tags = { [tag.slice(0, i)]: tag.slice(i + 1) };
  }
  return out;
}

function purpose() {
  return new FormData($("#filter")).get("purpose");
}

function describe(o) {
  const i = o.interaction;
  const lasted = i.duration_ms ? `${Math.round(i.duration_ms / 1000)} s` : "";
  return [i.queue && `queue ${i.queue}`, i.agent_id && `agent ${i.agent_id}`, i.channel, lasted, (i.started_at || o.created_at)]
    .filter(Boolean)
    .join(" · ");
}

function showGroups(groups) {
  const list = $("#results");
  list.replaceChildren();
  $("#detail").replaceChildren();
  for (const g of groups) {
    const kinds = g.objects.map((o) => o.kind).join(", ");
    const li = el("li", { tabindex: "0", "data-interaction": g.interaction_id },
      el("strong", { text: g.interaction_id }),
      el("small", { text: g.objects[0] ? describe(g.objects[0]) : "" }),
      el("small", { text: (g.stratum ? `drawn for ${g.stratum} · ` : "") + kinds }));
    const open = () => {
      for (const x of list.children) x.classList.remove("selected");
      li.classList.add("selected");
      showGroup(g).catch((e) => status(e.message, true));
    };
    li.addEventListener("click", open);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    list.append(li);
  }
}

// Search results are objects; show them grouped by interaction like a sample.
function groupObjects(objects) {
  const groups = new Map();
  for (const o of objects) {
    const key = o.interaction.interaction_id || o.object_id;
    if (!groups.has(key)) groups.set(key, { interaction_id: key, stratum: "", objects: [] });
    groups.get(key).objects.push(o);
  }
  return [...groups.values()];
}

function transcriptText(text) {
  // Typed placeholders left by redaction stand out.
  const pre = el("pre", { class: "transcript" });
  const re = /\[(card|iban|email|phone|national-id)\]/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    pre.append(text.slice(last, m.index), el("mark", { text: m[0] }));
    last = m.index + m[0].length;
  }
  pre.append(text.slice(last));
  return pre;
}

async function showGroup(g) {
  const detail = $("#detail");
  detail.replaceChildren(el("h2", { text: `Interaction ${g.interaction_id}` }));
  const p = purpose();
  // Recordings first, then transcripts, then images.
  const order = { "call-recording": 0, "chat-transcript": 1, image: 2 };
  const objects = [...g.objects].sort((a, b) => (order[a.kind] ?? 3) - (order[b.kind] ?? 3));
  for (const o of objects) {
    const box = el("section", { "data-kind": o.kind, "data-object": o.object_id },
      el("h3", { text: `${o.kind} · ${o.content_type} · ${o.size} bytes` }));
    detail.append(box);
    let link;
    try {
      link = await api("/api/links", { object_id: o.object_id, purpose: p });
    } catch (e) {
      box.append(el("p", { class: "spans", text: e.message }));
      continue;
    }
    if (o.kind === "call-recording") {
      box.append(el("audio", { class: "recording", controls: "", preload: "metadata", src: link.path }));
      if (o.sensitive_spans.length) {
        const spans = o.sensitive_spans.map((s) => `${(s.start_ms / 1000).toFixed(1)}–${(s.end_ms / 1000).toFixed(1)} s`);
        box.append(el("p", { class: "spans", text: `Silenced for coaching: ${spans.join(", ")}` }));
      }
    } else if (o.kind === "chat-transcript") {
      const r = await fetch(link.path);
      if (!r.ok) {
        box.append(el("p", { class: "spans", text: (await r.json().catch(() => ({}))).error || r.statusText }));
        continue;
      }
      let text = await r.text();
      if ((r.headers.get("content-type") || "").startsWith("application/json")) {
        try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* shown as is */ }
      }
      box.append(transcriptText(text));
    } else if (o.kind === "image") {
      box.append(el("img", { class: "image", alt: `image ${o.object_id}`, src: link.path }));
    }
  }
  status(`Interaction ${g.interaction_id}: links valid until ${new Date(Date.now() + 600e3).toLocaleTimeString()}.`);
}

async function search(e) {
  e.preventDefault();
  try {
    const r = await api("/api/search", { filter: filter(), page_size: 200 });
    const groups = groupObjects(r.objects);
    showGroups(groups);
    status(`${r.total} objects match; ${groups.length} interactions shown.`);
  } catch (err) {
    status(err.message, true);
  }
}

async function draw() {
  try {
    const f = new FormData($("#filter"));
    const n = Number(f.get("n")) || 1;
    const body = { filter: filter(), seed: Number(f.get("seed")) || 0 };
    const strata = f.get("strata");
    if (strata === "agent") body.per_agent = n;
    else if (strata === "queue") body.per_queue = n;
    else body.count = n;
    const r = await api("/api/sample", body);
    showGroups(r.groups);
    status(`Drew ${r.groups.length} of ${r.population} interactions (seed ${body.seed}).`);
  } catch (err) {
    status(err.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    login($("#token").value.trim());
    $("#token").value = "";
  });
  $("#logout").addEventListener("click", () => { showLogin(); status(""); });
  $("#filter").addEventListener("submit", search);
  $("#draw").addEventListener("click", draw);
  if (sessionStorage.getItem(TOKEN_KEY)) login(sessionStorage.getItem(TOKEN_KEY));
});
