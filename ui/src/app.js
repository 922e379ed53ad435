// forkbox's web console: one page, hash-routed, talking to the server it is served by
// (docs/ui.md). The API key, when the server needs one, is kept in sessionStorage (this
// browser tab only) and sent as `Authorization: Bearer` — or, for WebSockets, which
// cannot carry headers, as `?access_token=`.

import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "./style.css";

const KEY = "forkbox-key";
const state = { key: sessionStorage.getItem(KEY) || "", me: null, stop: [] };

// ---- small helpers -------------------------------------------------------------

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k.nodeType ? k : String(k));
  return e;
}

function say(msg, ok = false) {
  const s = document.getElementById("status");
  s.textContent = msg || "";
  s.className = ok ? "ok" : "";
}

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

// A fetch's options: the key, and `body` as JSON when there is one.
function request(method, body, signal) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return init;
}

async function api(method, path, body) {
  const r = await fetch(path, request(method, body));
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (!r.ok) {
    const err = new Error((json && json.error) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return json;
}

// Reads a streamed answer line by line (NDJSON) or event by event (SSE) until it ends
// or `signal` aborts it; calls `on` with each parsed item.
async function stream(path, { method = "GET", body, signal, sse = false }, on) {
  const r = await fetch(path, request(method, body, signal));
  if (!r.ok) {
    let msg = `${r.status}`;
    try { msg = (await r.json()).error || msg; } catch { /* not JSON */ }
    throw new Error(msg);
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    const sep = sse ? "\n\n" : "\n";
    let i;
    while ((i = buf.indexOf(sep)) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + sep.length);
      if (!chunk.trim()) continue;
      if (sse) {
        const ev = { event: "message", data: "" };
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event:")) ev.event = line.slice(6).trim();
          else if (line.startsWith("data:")) ev.data += line.slice(5).trimStart();
        }
        on(ev);
      } else {
        try { on(JSON.parse(chunk)); } catch { /* a partial line */ }
      }
    }
  }
}

// Work a page started (streams, sockets, timers) ends when the page changes.
function onLeave(fn) { state.stop.push(fn); }
function leave() { for (const f of state.stop.splice(0)) { try { f(); } catch { /* gone */ } } }

function follow(path, on, sse = true) {
  const ctl = new AbortController();
  onLeave(() => ctl.abort());
  stream(path, { signal: ctl.signal, sse }, on).catch((e) => {
    if (e.name !== "AbortError") say(`${path}: ${e.message}`);
  });
}

function button(label, onclick, cls, aria) {
  return el("button", { type: "button", class: cls, "aria-label": aria, onclick }, label);
}

function field(label, input) { return el("label", {}, label, input); }

function when(t) { return t ? t.replace("T", " ").slice(0, 19) : ""; }

// ---- sign-in ---------------------------------------------------------------------

async function whoami() {
  try { return await api("GET", "/v1/auth/whoami"); } catch (e) { if (e.status === 401) return null; throw e; }
}

function login(main, why) {
  document.getElementById("nav").hidden = true;
  const input = el("input", { id: "api-key", type: "password", autocomplete: "off", required: true, size: 48 });
  const form = el("form", { class: "row", "aria-label": "Sign in", onsubmit: async (ev) => {
    ev.preventDefault();
    state.key = input.value.trim();
    const me = await whoami().catch((e) => { say(e.message); return null; });
    if (!me) { state.key = ""; say("That key was not accepted."); return; }
    sessionStorage.setItem(KEY, state.key);
    state.me = me;
    say("");
    location.hash = "#/sandboxes";
    route();
  } }, field("API key", input), el("button", { type: "submit", class: "primary" }, "Sign in"));
  main.append(el("h1", {}, "Sign in"), el("p", { class: "muted" }, why || "This server needs an API key. It is kept for this browser tab only."), form);
  input.focus();
}

// ---- sandboxes -------------------------------------------------------------------

async function sandboxes(main) {
  main.append(el("h1", {}, "Sandboxes"));
  const [templates, health] = await Promise.all([
    api("GET", "/v1/templates").catch(() => ({ templates: [] })),
    api("GET", "/v1/healthz").catch(() => ({ runtimes: [] })),
  ]);
  const tpl = el("select", { id: "create-template" },
    templates.templates.filter((t) => t.status === "ready").map((t) => el("option", { value: t.name, selected: t.name === "python" }, t.name)));
  const rt = el("select", { id: "create-runtime" }, (health.runtimes || []).map((r) => el("option", { value: r.name }, r.name + (r.accelerator ? ` (${r.accelerator})` : ""))));
  const cpu = el("input", { id: "create-cpu", type: "number", min: "0.1", step: "0.1", value: "1" });
  const mem = el("input", { id: "create-memory", type: "number", min: "16", step: "16", value: "512" });
  const create = el("form", { class: "row", "aria-label": "Create a sandbox", onsubmit: async (ev) => {
    ev.preventDefault();
    say("Creating…", true);
    try {
      const s = await api("POST", "/v1/sandboxes", { template: tpl.value, runtime: rt.value || undefined, cpu: Number(cpu.value), memory_mb: Number(mem.value) });
      say(`Created ${s.id}`, true);
      refresh();
    } catch (e) { say(e.message); }
  } }, field("Template", tpl), field("Runtime", rt), field("CPUs", cpu), field("Memory (MiB)", mem), el("button", { type: "submit", class: "primary" }, "Create sandbox"));
  const filter = el("input", { id: "filter", type: "search", placeholder: "id, template or status" });
  const table = el("table", { id: "sandboxes", "aria-label": "Sandboxes" });
  main.append(create, el("div", { class: "row" }, field("Filter", filter)), table);
  const chart = el("div");
  main.append(el("h2", {}, "Over time"), chart);

  let rows = [];
  const draw = () => {
    const f = filter.value.trim().toLowerCase();
    const shown = rows.filter((s) => !f || [s.id, s.template, s.status].some((x) => x.toLowerCase().includes(f)));
    table.replaceChildren(
      el("thead", {}, el("tr", {}, ["Sandbox", "Template", "Runtime", "Status", "Parent", "Created", "Actions"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, shown.map((s) => el("tr", { "data-id": s.id },
        el("td", { class: "mono" }, el("a", { href: `#/sandbox/${s.id}` }, s.id)),
        el("td", {}, s.template), el("td", {}, s.runtime),
        el("td", { class: `status-${s.status}` }, s.status),
        el("td", { class: "mono" }, s.parent ? el("a", { href: `#/sandbox/${s.parent}` }, s.parent) : ""),
        el("td", {}, when(s.created_at)),
        el("td", { class: "actions" }, actions(s, refresh))))));
  };
  filter.addEventListener("input", draw);
  let pending = null;
  async function refresh() {
    try {
      rows = (await api("GET", "/v1/sandboxes?limit=500")).sandboxes;
      draw();
      sample(rows.length);
    } catch (e) { say(e.message); }
  }
  // Live: every lifecycle event of the workspace refreshes the list (at most every 150 ms).
  follow("/v1/events?follow=1", (ev) => {
    if (ev.event === "dropped" || ev.data) {
      clearTimeout(pending);
      pending = setTimeout(refresh, 150);
    }
  });
  onLeave(() => clearTimeout(pending));
  const samples = [];
  function sample(n) {
    samples.push({ t: Date.now(), n });
    if (samples.length > 120) samples.shift();
    chart.replaceChildren(plot(samples.map((s) => s.n), "sandboxes listed"));
  }
  const timer = setInterval(refresh, 5000);
  onLeave(() => clearInterval(timer));
  await refresh();
  metrics(main);
}

// A small line chart (SVG) of `values`.
function plot(values, label) {
  const w = 600, h = 120, max = Math.max(1, ...values);
  const pts = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * (w - 10) + 5},${h - 8 - (v / max) * (h - 20)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${label}: now ${values.at(-1) ?? 0}, at most ${max}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#0a58ca");
  line.setAttribute("stroke-width", "2");
  const text = document.createElementNS("http://www.w3.org/2000/svg", "text");
  text.setAttribute("x", "8"); text.setAttribute("y", "16"); text.setAttribute("font-size", "12");
  text.textContent = `${label}: ${values.at(-1) ?? 0} (max ${max})`;
  svg.append(line, text);
  return svg;
}

// Create and exec latency from /metrics (Prometheus text), for admins.
async function metrics(main) {
  const box = el("div", { class: "cards" });
  main.append(el("h2", {}, "Latency (from /metrics)"), box);
  const r = await fetch("/metrics", { headers: headers() });
  if (!r.ok) { box.append(el("p", { class: "muted" }, "Metrics need an admin key.")); return; }
  const text = await r.text();
  const sums = {};
  for (const line of text.split("\n")) {
    const m = line.match(/^(forkbox_[a-z_]+?)_(sum|count)(\{[^}]*\})?\s+([0-9.eE+-]+)/);
    if (!m || !/create|exec/.test(m[1])) continue;
    const k = m[1] + (m[3] || "");
    sums[k] = sums[k] || {};
    sums[k][m[2]] = Number(m[4]);
  }
  for (const [k, v] of Object.entries(sums)) {
    if (!v.count) continue;
    box.append(el("div", { class: "card" }, el("div", { class: "mono" }, k), el("div", {}, `${((v.sum / v.count) * 1000).toFixed(2)} ms mean over ${v.count}`)));
  }
  if (!box.children.length) box.append(el("p", { class: "muted" }, "No create or exec yet."));
}

// The lifecycle actions a sandbox in its state offers, as labelled buttons.
function actions(s, done) {
  const act = (label, method, path, body) => button(label, async () => {
    try { await api(method, path, body); say(`${label}: ${s.id}`, true); done && done(); } catch (e) { say(e.message); }
  }, label === "Delete" ? "danger" : undefined, `${label} ${s.id}`);
  const p = `/v1/sandboxes/${s.id}`;
  const out = [];
  if (s.status === "running") out.push(act("Pause", "POST", `${p}/pause`), act("Hibernate", "POST", `${p}/hibernate`), act("Fork", "POST", `${p}/fork`, { n: 2 }));
  if (s.status === "paused") out.push(act("Resume", "POST", `${p}/resume`));
  if (s.status === "hibernated") out.push(act("Wake", "POST", `${p}/wake`));
  if (s.status === "running" && s.parent) out.push(act("Merge into parent", "POST", `${p}/merge_into/${s.parent}`));
  if (["running", "paused", "hibernated"].includes(s.status)) out.push(act("Delete", "DELETE", p));
  return out;
}

// ---- one sandbox -------------------------------------------------------------------

async function sandbox(main, id) {
  let s;
  try { s = await api("GET", `/v1/sandboxes/${id}`); } catch (e) { main.append(el("h1", {}, id), el("p", {}, e.message)); return; }
  const head = el("div", { class: "row" });
  const drawHead = () => head.replaceChildren(el("span", { class: `status-${s.status}` }, s.status), ` ${s.template} · ${s.runtime} · ${s.cpu} CPU · ${s.memory_mb} MiB`, ...actions(s, reload));
  async function reload() {
    try { s = await api("GET", `/v1/sandboxes/${id}`); drawHead(); family(); } catch (e) { say(e.message); }
  }
  drawHead();
  main.append(el("h1", { class: "mono" }, id), head);

  // Fork family: its parent and children, live.
  const tree = el("div", { class: "tree", id: "family" });
  main.append(el("h2", {}, "Fork family"), tree);
  async function family() {
    const all = (await api("GET", "/v1/sandboxes?limit=500").catch(() => ({ sandboxes: [] }))).sandboxes;
    const kids = all.filter((x) => x.parent === id);
    tree.replaceChildren(
      s.parent ? el("div", {}, "Parent: ", el("a", { class: "mono", href: `#/sandbox/${s.parent}` }, s.parent)) : el("div", { class: "muted" }, "No parent"),
      el("div", {}, el("span", { class: "mono" }, id), el("ul", { "aria-label": "Children" }, kids.map((k) => el("li", {}, el("a", { class: "mono", href: `#/sandbox/${k.id}` }, k.id), ` ${k.status}`)))));
  }
  family();

  // Terminal.
  const term = el("div", { id: "terminal", "aria-label": "Terminal" });
  main.append(el("h2", {}, "Terminal"), term);
  if (s.status === "running") terminal(term, id); else term.append(el("p", { class: "muted" }, "The sandbox is not running."));

  // Files.
  const path = el("input", { id: "files-path", value: "/root", size: 40 });
  const list = el("table", { id: "files", "aria-label": "Files" });
  const upload = el("input", { id: "upload", type: "file" });
  const viewer = el("pre", { class: "out", id: "file-view", hidden: true, "aria-label": "File content" });
  // A file's first 64 KiB, as text.
  async function view(sid, f) {
    const r = await fetch(`/v1/sandboxes/${sid}/files?path=${encodeURIComponent(f.path)}`, { headers: headers() });
    if (!r.ok) { say(`View failed: ${r.status}`); return; }
    const bytes = new Uint8Array(await r.arrayBuffer());
    viewer.hidden = false;
    viewer.textContent = `${f.path}\n\n` + new TextDecoder().decode(bytes.slice(0, 65536)) + (bytes.length > 65536 ? "\n…" : "");
  }
  main.append(el("h2", {}, "Files"), el("form", { class: "row", "aria-label": "Folder", onsubmit: (e) => { e.preventDefault(); ls(); } }, field("Folder", path), el("button", { type: "submit" }, "List")),
    el("div", { class: "row" }, field("Upload a file into the folder", upload)), list, viewer);
  upload.addEventListener("change", async () => {
    const f = upload.files[0];
    if (!f) return;
    const target = `${path.value.replace(/\/$/, "")}/${f.name}`;
    const r = await fetch(`/v1/sandboxes/${id}/files?path=${encodeURIComponent(target)}`, { method: "PUT", headers: headers({ "Content-Type": "application/octet-stream" }), body: f });
    if (r.ok) { say(`Uploaded ${target}`, true); upload.value = ""; ls(); } else { say(`Upload failed: ${(await r.json().catch(() => ({}))).error || r.status}`); }
  });
  async function ls() {
    try {
      const l = await api("GET", `/v1/sandboxes/${id}/files/ls?path=${encodeURIComponent(path.value)}`);
      list.replaceChildren(el("thead", {}, el("tr", {}, ["Name", "Kind", "Size", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, l.entries.map((f) => el("tr", {},
          el("td", { class: "mono" }, f.type === "dir" ? el("a", { href: "#", onclick: (e) => { e.preventDefault(); path.value = f.path; ls(); } }, f.name + "/") : f.name),
          el("td", {}, f.type), el("td", {}, String(f.size)),
          el("td", {}, f.type === "file" ? [button("View", () => view(id, f), undefined, `View ${f.name}`), " ", button("Download", () => download(id, f), undefined, `Download ${f.name}`)] : "")))));
    } catch (e) { say(e.message); }
  }
  if (s.status === "running") ls();

  // Preview ports: what listens in the sandbox, opened through a public link (the page
  // cannot give a new tab its key).
  const ports = el("table", { id: "ports", "aria-label": "Ports" });
  main.append(el("h2", {}, "Ports"), ports);
  async function listPorts() {
    try {
      const p = await api("GET", `/v1/sandboxes/${id}/ports`);
      ports.replaceChildren(
        el("thead", {}, el("tr", {}, ["Port", "Address", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, p.ports.map((x) => el("tr", {}, el("td", { class: "mono" }, String(x.port)), el("td", { class: "mono" }, x.address),
          el("td", {}, button("Open", async () => {
            try {
              const link = await api("POST", `/v1/sandboxes/${id}/previews`, { port: x.port, expires_in: 3600 });
              window.open(link.url, "_blank", "noopener");
            } catch (e) { say(e.message); }
          }, undefined, `Open port ${x.port}`))))));
      if (!p.ports.length) ports.append(el("caption", { class: "muted" }, "Nothing listens yet."));
    } catch (e) { ports.replaceChildren(el("caption", {}, e.message)); }
  }
  if (s.status === "running") {
    listPorts();
    const t = setInterval(listPorts, 3000);
    onLeave(() => clearInterval(t));
  }

  // A run_code cell, streamed.
  const code = el("textarea", { id: "code", rows: 4, cols: 70, spellcheck: false }, "print('hello from forkbox')");
  const lang = el("select", { id: "language" }, ["python", "javascript", "bash"].map((l) => el("option", { value: l }, l)));
  const out = el("pre", { class: "out", id: "code-output", "aria-live": "polite" });
  main.append(el("h2", {}, "Run code"), el("form", { class: "row", "aria-label": "Run code", onsubmit: async (e) => {
    e.preventDefault();
    out.textContent = "";
    try {
      await stream(`/v1/sandboxes/${id}/exec`, { method: "POST", body: { code: code.value, language: lang.value } }, (ev) => {
        if (ev.type === "stdout" || ev.type === "stderr") out.textContent += ev.data;
        else if (ev.type === "exit") out.textContent += `\n[exit ${ev.data}]`;
      });
    } catch (err) { out.textContent += `\n${err.message}`; }
  } }, field("Code", code), field("Language", lang), el("button", { type: "submit", class: "primary" }, "Run")), out);

  // Logs and lifecycle events, live.
  const logs = el("pre", { class: "out", id: "logs" });
  const events = el("pre", { class: "out", id: "events" });
  main.append(el("h2", {}, "Lifecycle events"), events, el("h2", {}, "Logs"), logs);
  follow(`/v1/sandboxes/${id}/events?follow=1&tail=50`, (ev) => {
    if (!ev.data) return;
    try {
      const e = JSON.parse(ev.data);
      events.textContent += `${new Date(e.ts).toISOString().slice(11, 19)} ${ev.event} ${e.detail ? JSON.stringify(e.detail) : ""}\n`;
    } catch { events.textContent += `${ev.event}\n`; }
    if (ev.event !== "dropped") reload();
  });
  if (s.status === "running") follow(`/v1/sandboxes/${id}/logs?follow=1`, (ev) => { logs.textContent += `${ev.data}\n`; });
}

async function download(id, f) {
  const r = await fetch(`/v1/sandboxes/${id}/files?path=${encodeURIComponent(f.path)}`, { headers: headers() });
  if (!r.ok) { say(`Download failed: ${r.status}`); return; }
  const url = URL.createObjectURL(await r.blob());
  const a = el("a", { href: url, download: f.name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function terminal(box, id) {
  const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 13, screenReaderMode: true });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  const q = new URLSearchParams({ rows: String(term.rows), cols: String(term.cols) });
  if (state.key) q.set("access_token", state.key);
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/v1/sandboxes/${id}/exec/pty?${q}`);
  ws.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  ws.onmessage = (m) => {
    if (typeof m.data === "string") {
      const c = JSON.parse(m.data);
      if (c.type === "exit") term.write(`\r\n[exited ${c.code}]\r\n`);
      else if (c.type === "error") term.write(`\r\n[${c.message}]\r\n`);
    } else {
      term.write(new Uint8Array(m.data));
    }
  };
  ws.onclose = () => term.write("\r\n[disconnected]\r\n");
  term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(enc.encode(d)); });
  term.onResize(({ rows, cols }) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", rows, cols })); });
  const onResize = () => fit.fit();
  window.addEventListener("resize", onResize);
  onLeave(() => { window.removeEventListener("resize", onResize); ws.close(); term.dispose(); });
  term.focus();
}

// ---- templates, volumes, keys ------------------------------------------------------

async function templates(main) {
  main.append(el("h1", {}, "Templates"));
  const table = el("table", { "aria-label": "Templates" });
  const name = el("input", { id: "template-name", required: true });
  const dockerfile = el("textarea", { id: "dockerfile", rows: 6, cols: 70, spellcheck: false }, "FROM python\nRUN pip --version > /etc/pip-version\n");
  const log = el("pre", { class: "out", id: "build-log", "aria-live": "polite" });
  async function load() {
    const t = await api("GET", "/v1/templates");
    table.replaceChildren(el("thead", {}, el("tr", {}, ["Name", "Status", "Base", "Size", "Created", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, t.templates.map((x) => el("tr", {}, el("td", { class: "mono" }, x.name), el("td", {}, x.status), el("td", {}, x.base),
        el("td", {}, x.size ? `${Math.round(x.size / 1048576)} MiB` : ""), el("td", {}, when(x.created)),
        el("td", {}, button("Delete", async () => { try { await api("DELETE", `/v1/templates/${x.name}`); load(); } catch (e) { say(e.message); } }, "danger", `Delete template ${x.name}`))))));
  }
  main.append(table, el("h2", {}, "Build from a Dockerfile"), el("form", { class: "row", "aria-label": "Build a template", onsubmit: async (e) => {
    e.preventDefault();
    log.textContent = "";
    try {
      await stream("/v1/templates", { method: "POST", body: { name: name.value, dockerfile: dockerfile.value } }, (ev) => {
        if (ev.type === "progress") log.textContent += `${ev.data}\n`;
        else if (ev.type === "ready") log.textContent += "ready\n";
        else if (ev.type === "failed") log.textContent += `failed: ${ev.error}\n`;
        log.scrollTop = log.scrollHeight;
      });
      load();
    } catch (err) { say(err.message); }
  } }, field("Name", name), field("Dockerfile", dockerfile), el("button", { type: "submit", class: "primary" }, "Build")), log);
  await load();
}

async function volumes(main) {
  main.append(el("h1", {}, "Volumes"));
  const table = el("table", { "aria-label": "Volumes" });
  const name = el("input", { id: "volume-name", required: true });
  const size = el("input", { id: "volume-size", type: "number", min: "16", value: "256" });
  async function load() {
    const v = await api("GET", "/v1/volumes");
    table.replaceChildren(el("thead", {}, el("tr", {}, ["Id", "Name", "Size", "Used", "Created", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, v.volumes.map((x) => el("tr", {}, el("td", { class: "mono" }, x.id), el("td", {}, x.name), el("td", {}, `${x.size_mb} MiB`),
        el("td", {}, x.used_bytes == null ? "" : `${Math.round(x.used_bytes / 1024)} KiB`), el("td", {}, when(x.created_at)),
        el("td", {}, button("Delete", async () => { try { await api("DELETE", `/v1/volumes/${x.id}`); load(); } catch (e) { say(e.message); } }, "danger", `Delete volume ${x.name}`))))));
  }
  main.append(el("form", { class: "row", "aria-label": "Create a volume", onsubmit: async (e) => {
    e.preventDefault();
    try { await api("POST", "/v1/volumes", { name: name.value, size_mb: Number(size.value) }); load(); } catch (err) { say(err.message); }
  } }, field("Name", name), field("Size (MiB)", size), el("button", { type: "submit", class: "primary" }, "Create volume")), table);
  await load();
}

async function keys(main) {
  main.append(el("h1", {}, "API keys"));
  const table = el("table", { "aria-label": "API keys" });
  const name = el("input", { id: "key-name" });
  const admin = el("input", { id: "key-admin", type: "checkbox" });
  const shown = el("div", { "aria-live": "polite" });
  async function load() {
    try {
      const t = await api("GET", "/v1/auth/tokens");
      table.replaceChildren(el("thead", {}, el("tr", {}, ["Id", "Name", "Workspace", "Admin", "Created", "Revoked", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, t.tokens.map((x) => el("tr", {}, el("td", { class: "mono" }, x.id), el("td", {}, x.name), el("td", {}, x.workspace), el("td", {}, x.admin ? "yes" : ""),
          el("td", {}, when(x.created_at)), el("td", {}, when(x.revoked_at)),
          el("td", {}, x.revoked_at ? "" : button("Revoke", async () => { try { await api("DELETE", `/v1/auth/tokens/${x.id}`); load(); } catch (e) { say(e.message); } }, "danger", `Revoke key ${x.name}`))))));
    } catch (e) { table.replaceChildren(el("caption", {}, e.message)); }
  }
  main.append(el("form", { class: "row", "aria-label": "Create an API key", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const k = await api("POST", "/v1/auth/tokens", { name: name.value || undefined, admin: admin.checked });
      shown.replaceChildren(el("p", {}, "The new key — shown once, copy it now:"), el("div", { class: "key mono", id: "new-key" }, k.key));
      load();
    } catch (err) { say(err.message); }
  } }, field("Name", name), field("Admin", admin), el("button", { type: "submit", class: "primary" }, "Create key")), shown, table);
  await load();
}

// ---- routing ------------------------------------------------------------------------

async function nodes(main) {
  main.append(el("h1", {}, "Nodes"));
  const table = el("table", { "aria-label": "Nodes" });
  main.append(table);
  try {
    const n = await api("GET", "/v1/nodes");
    table.replaceChildren(el("thead", {}, el("tr", {}, ["Name", "State", "URL", "Runtimes", "Sandboxes", "CPUs", "Memory"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, n.nodes.map((x) => el("tr", {}, el("td", { class: "mono" }, x.name + (x.this ? " (this)" : "")), el("td", {}, x.state),
        el("td", { class: "mono" }, x.url), el("td", {}, x.runtimes.join(", ")), el("td", {}, String(x.sandboxes)),
        el("td", {}, String(x.cpus)), el("td", {}, `${x.memory_mb} MiB`)))));
    if (!n.nodes.length) table.append(el("caption", { class: "muted" }, "One server, no cluster."));
  } catch (e) { table.replaceChildren(el("caption", {}, e.message)); }
}

const pages = { sandboxes, templates, volumes, keys, nodes };

async function route(ev) {
  leave();
  say("");
  const main = document.getElementById("main");
  main.replaceChildren();
  if (!state.me) {
    state.me = await whoami().catch((e) => { say(e.message); return null; });
    if (!state.me) { sessionStorage.removeItem(KEY); state.key = ""; login(main); return; }
  }
  document.getElementById("nav").hidden = false;
  // (Without keys there is nothing to sign out of.)
  document.getElementById("signout").hidden = !state.me.auth_required;
  const [, page, arg] = (location.hash || "#/sandboxes").split("/");
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${page}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  try {
    if (page === "sandbox" && arg) await sandbox(main, arg);
    else await (pages[page] || sandboxes)(main);
  } catch (e) { say(e.message); }
  // Moving to another page moves focus to its content (a first load keeps the top).
  if (ev && ev.type === "hashchange") main.focus();
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  state.key = "";
  state.me = null;
  location.hash = "#/sandboxes";
  route();
});
// The skip link moves focus to the content (not the hash: that is the route).
document.querySelector(".skip").addEventListener("click", (e) => {
  e.preventDefault();
  document.getElementById("main").focus();
});
window.addEventListener("hashchange", route);
route();
