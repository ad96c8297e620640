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

async function post(url, body, what) {
  if (!confirm(`Really ${what}?`)) return;
  $("result").textContent = `${what}: running...`;
  const resp = await fetch(url, {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": H.csrf}});
  const data = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
  $("result").textContent = resp.ok ? data.message : `${what} failed: ${data.error}`;
  $("result").className = resp.ok ? "" : "error";
}

async function act(guest, action, node) {
  const what = `${action} ${guest}${node ? " to " + node : ""}`;
  if (!confirm(`Really ${what}?`)) return;
  $("result").textContent = `${what}: running...`;
  const resp = await fetch(`/api/v1/guests/${encodeURIComponent(guest)}/${action}`, {
    method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": H.csrf},
    body: JSON.stringify(node ? {node} : {}),
  });
  const data = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
  $("result").textContent = resp.ok ? data.message : `${what} failed: ${data.error}`;
  $("result").className = resp.ok ? "" : "error";
}

function render(o) {
  if (o.error) { $("result").textContent = o.error; return; }
  const haGuests = Object.fromEntries((o.ha.guests || []).map((g) => [g.name, g]));
  const haNodes = Object.fromEntries((o.ha.nodes || []).map((n) => [n.name, n]));
  const running = o.guests.filter((g) => g.state === "running").length;
  const lost = (o.ha.nodes || []).filter((n) => n.state === "lost" || n.state === "fenced").length;
  $("summary").replaceChildren(
    el("div", {class: "tile"}, "Guests running", el("b", {}, `${running} / ${o.guests.length}`)),
    el("div", {class: "tile"}, "Nodes", el("b", {}, `${o.nodes.length}`)),
    el("div", {class: "tile"}, "Nodes lost", el("b", {class: lost ? "state-lost" : ""}, lost)),
    el("div", {class: "tile"}, "HA leader", el("b", {}, o.ha.leader || "none")),
  );
  const nodes = o.nodes.map((n) => n.name);
  $("guests").replaceChildren(...o.guests.map((g) => {
    const ha = haGuests[g.name];
    const acts = el("td");
    if (H.admin) {
      const running = g.state === "running";
      acts.append(el("button", {type: "button", onclick: () => act(g.name, "start"),
        "aria-label": `start ${g.name}`, ...(running ? {disabled: ""} : {})}, "Start"), " ",
        el("button", {type: "button", onclick: () => act(g.name, "stop"),
        "aria-label": `stop ${g.name}`, ...(running ? {} : {disabled: ""})}, "Stop"), " ");
      acts.append(el("button", {type: "button", onclick: () => openConsole(g.name),
        "aria-label": `console of ${g.name}`, ...(running ? {} : {disabled: ""})}, "Console"), " ");
      for (const n of nodes.filter((n) => n !== g.node)) {
        acts.append(el("button", {type: "button", onclick: () => act(g.name, "move", n),
          "aria-label": `move ${g.name} to ${n}`, ...(running ? {} : {disabled: ""})}, `Move to ${n}`), " ");
      }
    }
    return el("tr", {"data-guest": g.name}, el("td", {}, g.name), el("td", {}, state(g.state)),
      el("td", {}, g.node || "-"),
      el("td", {}, ha ? state(ha.state) : "-", ha ? el("div", {class: "muted"}, ha.reason) : ""),
      el("td", {}, g.safety ? state(g.safety.level) : "-",
        g.safety ? el("div", {class: "muted"}, g.safety.why) : ""),
      acts);
  }));
  $("nodes").replaceChildren(...o.nodes.map((n) => {
    const ha = haNodes[n.name];
    const guests = Object.entries(n.guests || {}).map(([g, s]) => `${g} (${s})`).join(", ") || "-";
    // Unreachable: one word in the table, the whole message (what to do) on hover/focus.
    const down = (why) => el("span", {class: "state-lost", title: why || "", tabindex: "0"},
      "unreachable");
    const rb = n.rblock ? Object.entries(n.rblock).map(([r, v]) => `${r} ${v.role}/${v.disk}`).join(", ")
      : down(n.rblock_error);
    const safe = (o.safe_to_stop || {})[n.name];
    const nacts = el("td");
    if (H.admin && ha) {
      const inMaint = ha.state === "maintenance";
      nacts.append(el("button", {type: "button", "aria-label": `maintenance ${inMaint ? "off" : "on"} for ${n.name}`,
        onclick: () => post(`/api/v1/nodes/${encodeURIComponent(n.name)}/maintenance`, {on: !inMaint},
          `maintenance ${inMaint ? "off" : "on"} for ${n.name}${inMaint ? "" : " (its HA guests move away)"}`)},
        inMaint ? "End maintenance" : "Maintenance"));
    }
    return el("tr", {"data-node": n.name}, el("td", {}, n.name), el("td", {}, ha ? state(ha.state) : "-"),
      el("td", {}, n.reachable ? `${n.libvirt_version || ""} up` : down(n.error)),
      el("td", {}, guests), el("td", {}, rb),
      el("td", {class: safe && !safe.safe ? "state-unprotected" : ""}, safe ? safe.text : "-"), nacts);
  }));
  const bytes = (n) => n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` :
    n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${Math.round(n / 1024)} KiB`;
  const rows = [];
  for (const [r, byNode] of Object.entries(o.storage || {})) {
    for (const [n, st] of Object.entries(byNode)) {
      const p = (st.peers || [])[0] || {};
      const syncing = (p.replication || "").startsWith("Sync");
      const sync = syncing ? el("span", {}, el("progress", {max: "100", value: String(p.sync_percent),
          "aria-label": `resync of ${r} on ${n}`}), ` ${p.sync_percent} %` +
          (p.eta_s ? `, ${Math.round(p.eta_s)} s left` : "") +
          (p.sync_rate_bytes_per_s ? `, ${bytes(p.sync_rate_bytes_per_s)}/s` : ""))
        : (st.role ? (p.split_brain ? state("split-brain") : "-") : "");
      rows.push(el("tr", {"data-resource": `${r}@${n}`}, el("td", {}, r), el("td", {}, n),
        el("td", {}, st.role || "unreachable"), el("td", {}, st.disk || "-"),
        el("td", {}, p.connection ? state(p.connection.toLowerCase()) : "-"),
        el("td", {}, st.role ? bytes(p.out_of_sync_bytes || 0) : "-"), el("td", {}, sync)));
    }
  }
  $("storage").replaceChildren(...rows);
  $("ha-leader").textContent = o.ha.note || `Leader: ${o.ha.leader || "none"}`;
  $("ha-log").replaceChildren(...(o.ha_log || []).slice().reverse().map((d) =>
    el("li", {}, `${new Date(d.time * 1000).toLocaleTimeString()} ${d.guest}: ${d.text}`)));
}

// The serial console: xterm.js on a websocket to the guest's console (libvirt's stream).
let consoleWs = null, term = null;
function openConsole(guest) {
  closeConsole();
  $("console-card").hidden = false;
  $("console-title").textContent = `Console of ${guest} (keys go to the guest)`;
  term = new Terminal({convertEol: false, rows: 24, cols: 100});
  term.open($("console"));
  const proto = location.protocol === "https:" ? "wss" : "ws";
  consoleWs = new WebSocket(`${proto}://${location.host}/api/v1/guests/${encodeURIComponent(guest)}/console`);
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
$("console-close").addEventListener("click", closeConsole);

render(H.overview);
const events = new EventSource("/api/v1/events");
events.addEventListener("overview", (ev) => render(JSON.parse(ev.data)));
