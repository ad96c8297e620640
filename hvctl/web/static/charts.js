// The Storage page's charts (uPlot, vendored): per resource and node, write IOPS, mean write
// latency and resync rate over the last minutes. The points so far come from
// /api/v1/charts; each overview on the live stream carries the newest point of each.
"use strict";
(() => {
  const box = document.getElementById("charts");
  if (!box) return;
  const plots = {};  // "r0@alpha" -> {plot, data, now}
  const width = (fig) => Math.max(260, fig.clientWidth - 20);  // the figure's grid cell
  const mib = (v) => v == null ? "-" : `${(v / 1048576).toFixed(1)} MiB/s`;

  function make(key, s) {
    const [res, node] = key.split("@");
    const wrap = document.createElement("figure");
    wrap.className = "chart";
    wrap.dataset.chart = key;
    const cap = document.createElement("figcaption");
    cap.textContent = `${res} on ${node}`;
    const now = document.createElement("p");
    now.className = "muted";
    now.setAttribute("aria-live", "polite");
    const area = document.createElement("div");
    area.setAttribute("role", "img");
    area.setAttribute("aria-label", `${res} on ${node}: write IOPS, write latency and resync rate`);
    wrap.append(cap, area, now);
    box.append(wrap);
    const data = [s.t.slice(), s.write_iops.slice(), s.write_latency_ms.slice(), s.sync_bytes_per_s.slice()];
    const plot = new uPlot({
      width: width(wrap), height: 180, legend: {live: false}, cursor: {points: {show: false}},
      scales: {x: {time: true}, iops: {}, ms: {}, rate: {}},
      series: [{},
        {label: "write IOPS", scale: "iops", stroke: "#2f6fde", width: 2, points: {show: false}},
        {label: "latency ms", scale: "ms", stroke: "#b7791f", width: 1.5, points: {show: false}},
        {label: "resync rate", scale: "rate", stroke: "#1f8a4c", width: 2, points: {show: false}}],
      axes: [{}, {scale: "iops", label: "IOPS"}, {scale: "ms", side: 1, label: "ms", grid: {show: false}},
        {scale: "rate", show: false}],
    }, data, area);
    plots[key] = {plot, data, now, wrap};
    say(key);
  }

  function say(key) {
    const {data, now} = plots[key];
    const i = data[0].length - 1;
    now.textContent = i < 0 ? "no points yet" :
      `now: ${data[1][i]} write IOPS, latency ${data[2][i] ?? "-"} ms, resync ${mib(data[3][i])}`;
  }

  function add(o) {
    for (const [key, p] of Object.entries(o.charts || {})) {
      if (!plots[key]) make(key, {t: [], write_iops: [], write_latency_ms: [], sync_bytes_per_s: []});
      const {plot, data} = plots[key];
      if (data[0].length && p.t <= data[0][data[0].length - 1]) continue;
      data[0].push(p.t); data[1].push(p.write_iops); data[2].push(p.write_latency_ms);
      data[3].push(p.sync_bytes_per_s);
      const cut = data[0].findIndex((t) => t >= p.t - 600);
      if (cut > 0) for (const col of data) col.splice(0, cut);
      plot.setData(data);
      say(key);
    }
  }

  fetch("/api/v1/charts").then((r) => r.ok ? r.json() : {}).then((series) => {
    for (const [key, s] of Object.entries(series)) if (!plots[key]) make(key, s);
    (window.HVCTL.listeners ||= []).push(add);
  });
  addEventListener("resize", () => {
    for (const {plot, wrap} of Object.values(plots)) plot.setSize({width: width(wrap), height: 180});
  });
})();
