// The dashboard, kept live by server-sent events (/api/v1/events); actions go to the API
// with the session's CSRF token. No framework: the page is small.
"use strict";
const H = window.HVCTL;
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k ?? "")));
  return e;
};
const state = (s) => el("span", {class: `state-${s}`}, s);

const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "-";
const bytes = (n) => n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` :
  n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(0)} KiB`
  : `${n} bytes`;  // never "0.0 MiB" for a few blocks out of sync
const button = (label, text, onclick, enabled = true) =>
  el("button", {type: "button", "aria-label": label, onclick, ...(enabled ? {} : {disabled: ""})}, text);

// Every action: a confirmation, then the API's answer (the CLI's one-line message) in #result.
async function post(url, body, what, ask = true) {
  if (ask && !confirm(`Really ${what}?`)) return null;
  const out = $("result");
  if (out) { out.textContent = `${what}: running...`; out.className = "result"; }
  const resp = await fetch(url, {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": H.csrf}});
  const data = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
  if (out) {
    out.textContent = resp.ok ? data.message : `${what} failed: ${data.error}`;
    out.className = resp.ok ? "result" : "result error";
  }
  return resp.ok ? data : null;
}
const act = (guest, action, node, ask = true) => post(`/api/v1/guests/${encodeURIComponent(guest)}/${action}`,
  node ? {node} : {}, `${action} ${guest}${node ? " to " + node : ""}`, ask);
const resAct = (res, action, node, what) =>
  post(`/api/v1/resources/${encodeURIComponent(res)}/${action}`, {node}, what);

function summary(o) {
  const ha = o.ha || {};
  const haNodes = ha.nodes || [];
  const count = (xs, f) => xs.filter(f).length;
  const running = count(o.guests, (g) => g.state === "running");
  const stopped = count(o.guests, (g) => g.state === "stopped" || g.state === "undefined");
  const bad = count(o.guests, (g) => ["conflict", "unknown", "crashed"].includes(g.state)) +
    count(ha.guests || [], (g) => g.state === "error");
  const lost = count(haNodes, (n) => n.state === "lost" || n.state === "fenced");
  const maint = count(haNodes, (n) => n.state === "maintenance");
  const up = haNodes.length ? count(haNodes, (n) => n.state === "online") : count(o.nodes, (n) => n.reachable);
  let degraded = 0, syncing = 0;
  for (const byNode of Object.values(o.storage || {})) {
    const sts = Object.values(byNode).filter((s) => s.role);
    const p = sts.flatMap((s) => s.peers || []);
    if (p.some((x) => (x.replication || "").startsWith("Sync"))) syncing++;
    else if (!sts.length || p.some((x) => x.connection !== "Connected" || x.disk !== "UpToDate")) degraded++;
  }
  const tile = (label, value, cls = "") => el("div", {class: "tile"}, label, el("b", {class: cls}, value));
  $("summary").replaceChildren(
    tile("Nodes up", `${up} / ${o.nodes.length}`),
    tile("Nodes lost", lost, lost ? "state-lost" : ""),
    tile("In maintenance", maint, maint ? "state-maintenance" : ""),
    tile("Quorum (etcd)", o.etcd ? (o.etcd.quorum ? "yes" : "NO") : "no etcd",
      o.etcd && !o.etcd.quorum ? "state-lost" : ""),
    tile("Guests running", `${running} / ${o.guests.length}`),
    tile("Guests stopped", stopped),
    tile("Guests in error", bad, bad ? "state-error" : ""),
    tile("Resources degraded", degraded, degraded ? "state-degraded" : ""),
    tile("Resyncing", syncing, syncing ? "state-degraded" : ""),
    tile("HA leader", ha.leader || "none"),
  );
}

function guests(o) {
  const haGuests = Object.fromEntries(((o.ha || {}).guests || []).map((g) => [g.name, g]));
  const nodes = o.nodes.map((n) => n.name);
  $("guests").replaceChildren(...o.guests.map((g) => {
    const ha = haGuests[g.name];
    const acts = el("td");
    if (H.admin) {
      const running = g.state === "running";
      acts.append(button(`start ${g.name}`, "Start", () => startWatching(g.name), !running), " ",
        button(`stop ${g.name}`, "Stop", () => act(g.name, "stop"), running), " ",
        button(`console of ${g.name}`, "Console", () => openConsole(g.name), running), " ");
      if (g.graphics) {  // vnc.js (a module, loaded after this file): noVNC on a one-time ticket
        acts.append(button(`screen of ${g.name}`, "Screen", () => H.openScreen ? H.openScreen(g.name)
          : (H.screenWanted = g.name), running), " ");
      }
      for (const n of nodes.filter((n) => n !== g.node)) {
        acts.append(button(`move ${g.name} to ${n}`, `Move to ${n}`, () => act(g.name, "move", n), running), " ");
      }
    }
    return el("tr", {"data-guest": g.name}, el("td", {}, g.name), el("td", {}, state(g.state)),
      el("td", {}, g.node || "-"),
      el("td", {}, ha ? state(ha.state) : "-", ha ? el("div", {class: "muted"}, ha.reason) : ""),
      el("td", {}, g.safety ? state(g.safety.level) : "-",
        g.safety ? el("div", {class: "muted"}, g.safety.why) : ""),
      acts);
  }));
}

// Unreachable: one word in a table, the whole message (what to do) on hover/focus.
const down = (why) => el("span", {class: "state-lost", title: why || "", tabindex: "0"}, "unreachable");

function nodes(o) {
  const haNodes = Object.fromEntries(((o.ha || {}).nodes || []).map((n) => [n.name, n]));
  $("nodes").replaceChildren(...o.nodes.map((n) => {
    const ha = haNodes[n.name];
    const gs = Object.entries(n.guests || {}).map(([g, s]) => `${g} (${s})`).join(", ") || "-";
    const rb = n.rblock ? Object.entries(n.rblock).map(([r, v]) => `${r} ${v.role}/${v.disk}`).join(", ")
      : down(n.rblock_error);
    const safe = (o.safe_to_stop || {})[n.name];
    const nacts = el("td");
    if (H.admin && ha) {
      const inMaint = ha.state === "maintenance";
      nacts.append(button(`maintenance ${inMaint ? "off" : "on"} for ${n.name}`,
        inMaint ? "End maintenance" : "Maintenance (evacuate)",
        () => post(`/api/v1/nodes/${encodeURIComponent(n.name)}/maintenance`, {on: !inMaint},
          `maintenance ${inMaint ? "off" : "on"} for ${n.name}${inMaint ? "" : " (its HA guests move away)"}`)));
    }
    return el("tr", {"data-node": n.name}, el("td", {}, n.name), el("td", {}, ha ? state(ha.state) : "-"),
      el("td", {}, n.reachable ? `${n.libvirt_version || ""} up` : down(n.error)),
      el("td", {}, gs), el("td", {}, rb),
      el("td", {class: safe && !safe.safe ? "state-unprotected" : ""}, safe ? safe.text : "-"), nacts);
  }));
}

function etcd(o) {
  const e = o.etcd;
  $("etcd-quorum").textContent = e ? e.text : "No [cluster] etcd: no fencing, no HA.";
  $("etcd-quorum").className = e && !e.quorum ? "error" : "";
  $("etcd").replaceChildren(...(e ? e.members : []).map((m) => el("tr", {"data-member": m.name},
    el("td", {}, m.name), el("td", {}, m.endpoint),
    el("td", {}, m.ok ? state("online") : el("span", {class: "state-lost", title: m.error || ""}, "unreachable")),
    el("td", {}, m.leader ? "yes" : ""))));
  $("leases").replaceChildren(...((o.ha || {}).nodes || []).map((n) => el("tr", {"data-lease": n.name},
    el("td", {}, n.name), el("td", {}, state(n.state)), el("td", {}, n.why),
    el("td", {}, n.lease || "none"), el("td", {}, n.lease_left_s ?? "-"))));
}

function storage(o) {
  const rows = [], split = [];
  const withActions = $("storage").dataset.actions === "1";  // the Storage page; not the dashboard
  for (const [r, byNode] of Object.entries(o.storage || {})) {
    const sides = [];
    for (const [n, st] of Object.entries(byNode)) {
      const p = (st.peers || [])[0] || {};
      if (p.split_brain) sides.push([n, st, p]);
      const syncing = (p.replication || "").startsWith("Sync") || (p.replication || "").startsWith("Verify");
      const sync = syncing ? el("span", {}, el("progress", {max: "100", value: String(p.sync_percent),
          "aria-label": `resync of ${r} on ${n}`}), ` ${p.sync_percent} %` +
          (p.eta_s ? `, ${Math.round(p.eta_s)} s left` : "") +
          (p.sync_rate_bytes_per_s ? `, ${bytes(p.sync_rate_bytes_per_s)}/s` : ""))
        : (st.role ? (p.split_brain ? state("split-brain") : "-") : "");
      const acts = el("td");
      if (withActions && H.admin && st.role) {
        const standalone = p.connection === "StandAlone";
        acts.append(
          standalone && !p.split_brain
            ? button(`connect ${r} on ${n}`, "Connect", () => resAct(r, "connect", n, `connect ${r} on ${n}`))
            : button(`disconnect ${r} on ${n}`, "Disconnect", () => resAct(r, "disconnect", n,
              `disconnect ${r} on ${n} (its writes stop reaching the peer)`), !standalone), " ",
          button(`verify ${r} on ${n}`, "Verify", () => resAct(r, "verify", n,
            `verify ${r} on ${n} against its peer`), p.connection === "Connected"), " ",
          button(`invalidate ${r} on ${n}`, "Invalidate", () => resAct(r, "invalidate", n,
            `invalidate ${r} on ${n}: throw away its data and resync it from the peer`),
            st.role !== "Primary"));
      }
      rows.push(el("tr", {"data-resource": `${r}@${n}`}, el("td", {}, r), el("td", {}, n),
        el("td", {}, st.role || "unreachable"), el("td", {}, st.disk || "-"),
        el("td", {}, p.connection ? state(p.connection.toLowerCase()) : "-",
          p.refusal ? el("div", {class: "muted"}, p.refusal) : ""),
        el("td", {}, st.role ? bytes(p.out_of_sync_bytes || 0) : "-"), el("td", {}, sync),
        ...(withActions ? [acts] : [])));
    }
    if (sides.length) split.push([r, byNode]);
  }
  $("storage").replaceChildren(...rows);
  const card = $("splitbrain-card");
  if (!card) return;
  card.hidden = !split.length;
  $("splitbrain").replaceChildren(...split.map(([r, byNode]) => el("div", {class: "split", "data-split": r},
    el("h3", {}, r), el("div", {class: "sides"}, ...Object.entries(byNode).map(([n, st]) => {
      const p = (st.peers || [])[0] || {};
      return el("div", {class: "side", "data-side": n}, el("h4", {}, n),
        el("p", {}, `${st.role || "unreachable"}, disk ${st.disk || "?"}`),
        el("p", {}, `Changed here since they parted: ${bytes(p.out_of_sync_bytes || 0)}`),
        el("p", {class: "muted"}, `data generation ${(st.generation || {}).current || "?"}; ${p.last_decision || ""}`),
        H.admin ? button(`keep ${n}'s data of ${r}`, `Keep ${n}'s data`, () =>
          post(`/api/v1/resources/${encodeURIComponent(r)}/resolve`, {keep: n},
            `keep ${n}'s data of ${r} and discard what the other node wrote since the split`)) : "");
    })))));
}

function haLog(o) {
  $("ha-leader").textContent = (o.ha || {}).note || `Leader: ${(o.ha || {}).leader || "none"}`;
  $("ha-log").replaceChildren(...(o.ha_log || []).slice().reverse().map((d) =>
    el("li", {}, `${when(d.time)} ${d.guest}: ${d.text}`)));
}

const target = (t) => [t.guest, t.resource, t.node && `on ${t.node}`].filter(Boolean).join(" ");

function tasks(o) {
  $("tasks").replaceChildren(...(o.tasks || []).slice().reverse().map((t) => el("tr", {"data-task": t.id},
    el("td", {}, t.id), el("td", {}, when(t.started)), el("td", {}, t.user), el("td", {}, t.action),
    el("td", {}, target(t)), el("td", {}, state(t.state)), el("td", {}, t.result || ""))));
}

function failovers(o) {
  $("failovers").replaceChildren(...(o.failovers || []).map((f) => el("tr", {},
    el("td", {}, when(f.began)), el("td", {}, f.guest), el("td", {}, f.from || "?"),
    el("td", {}, f.to || "-"), el("td", {}, f.seconds != null ? `${f.seconds} s` : "..."),
    el("td", {}, state(f.outcome)), el("td", {}, f.why))));
}

function events(o) {
  const items = [...(o.tasks || []).map((t) => [t.started, `${t.user}: ${t.action} ${target(t)}: ${t.state}` +
    (t.result ? ` (${t.result})` : "")]), ...(o.ha_log || []).map((d) => [d.time, `HA ${d.guest}: ${d.text}`])];
  items.sort((a, b) => b[0] - a[0]);
  $("events").replaceChildren(...items.slice(0, 15).map(([t, text]) => el("li", {}, `${when(t)} ${text}`)));
}

const SECTIONS = {summary, guests, nodes, etcd, storage, "ha-log": haLog, tasks, failovers, events};
function render(o) {
  if (o.error) { const r = $("result"); if (r) { r.textContent = o.error; r.className = "result error"; } return; }
  for (const [id, f] of Object.entries(SECTIONS)) if ($(id)) f(o);
  for (const f of H.listeners || []) f(o);  // e.g. charts.js
}

// The serial console: xterm.js on a websocket to the guest's console (libvirt's stream).
let consoleWs = null, term = null;
function openConsole(guest, wait = false) {
  closeConsole();
  $("console-card").hidden = false;
  $("console-title").textContent = `Console of ${guest} (keys go to the guest)`;
  term = new Terminal({convertEol: false, rows: 24, cols: 100});
  term.open($("console"));
  const proto = location.protocol === "https:" ? "wss" : "ws";
  consoleWs = new WebSocket(`${proto}://${location.host}/api/v1/guests/${encodeURIComponent(guest)}/console` +
    (wait ? "?wait=1" : ""));
  if (wait) term.write(`[waiting for ${guest} to start]\r\n`);
  consoleWs.binaryType = "arraybuffer";
  consoleWs.onmessage = (ev) => term.write(new Uint8Array(ev.data));
  consoleWs.onclose = () => term && term.write("\r\n[console closed]\r\n");
  term.onData((d) => consoleWs && consoleWs.readyState === 1 && consoleWs.send(d));
  term.focus();
}
function closeConsole() {
  if (consoleWs) consoleWs.close();
  if (term) term.dispose();
  consoleWs = term = null;
  $("console-card").hidden = true;
}
// Start with its console open first, so the page shows the guest's boot from its first line.
function startWatching(guest) {
  if (!confirm(`Really start ${guest}?`)) return;
  openConsole(guest, true);
  act(guest, "start", null, false);
}
if ($("console-close")) $("console-close").addEventListener("click", closeConsole);

render(H.overview);
const stream = new EventSource("/api/v1/events");
stream.addEventListener("overview", (ev) => render(JSON.parse(ev.data)));
