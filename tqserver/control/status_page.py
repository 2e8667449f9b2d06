"""The status page: one self-contained HTML document (inline CSS and JavaScript, no build
step, nothing fetched from elsewhere) that renders the control plane's status stream
(server-sent ``status`` events carrying LiveStatus snapshots) and posts reloads.

Everything shown is drawn by the script from the snapshot, so the page is the same with
JavaScript's view of the JSON API: what the page shows, ``tqserver status --json`` has."""

from __future__ import annotations

import html
import json

_STYLE = """
:root{--fg:#1d2330;--mute:#667085;--line:#e3e6ea;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e}
body{font:14px system-ui,sans-serif;margin:20px;color:var(--fg);background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px}header p{margin:0;color:var(--mute)}
#ready{font-size:13px;font-weight:normal;margin-left:8px}
header{display:flex;justify-content:space-between;align-items:center;margin-bottom:14px}
button{font:inherit;padding:4px 10px;border:1px solid #c4c9d0;border-radius:6px;
background:#fff;cursor:pointer}button:disabled{opacity:.5;cursor:default}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 14px;
margin-bottom:14px}.top{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.top h2{font-size:16px;margin:0}.mute{color:var(--mute)}.right{margin-left:auto}
.healthy{color:var(--ok)}.degraded,.starting{color:var(--warn)}.failed,.stopped,.bad{color:var(--bad)}
.figs{display:flex;gap:22px;flex-wrap:wrap;margin:8px 0}.figs b{display:block;font-size:17px}
.charts{display:flex;gap:16px;flex-wrap:wrap}
.charts svg{background:#fafbfc;border:1px solid var(--line)}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px 3px 0;text-align:left;
font-variant-numeric:tabular-nums}th{color:var(--mute);font-weight:normal}
pre{background:#0f1419;color:#d7dae0;padding:8px;border-radius:6px;max-height:220px;
overflow:auto;font-size:12px;margin:6px 0;white-space:pre-wrap}
#conn{font-size:12px}
.banner{background:#fff4f4;border:1px solid #f3c2c2;padding:8px;border-radius:6px}
"""

_SCRIPT = r"""
"use strict";
const base = document.body.dataset.base;
const $ = (tag, attrs, ...kids) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v; else if (k.startsWith("on")) el[k] = v;
    else el.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined)
    el.append(kid instanceof Node ? kid : String(kid));
  return el;
};
const ms = v => v === null || v === undefined ? "—" :
  (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms";
const pct = v => v === null || v === undefined ? "—" : v.toFixed(1) + "%";
const mib = v => v === null || v === undefined ? "—" : (v / 1048576).toFixed(1) + " MiB";
const dur = s => {
  if (s === null || s === undefined) return "—";
  if (s < 60) return s.toFixed(0) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
};
const NS = "http://www.w3.org/2000/svg";
function chart(title, series, colors, unit) {
  // series: arrays of numbers (null = no data) over the same points, oldest first
  const w = 260, h = 64, svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 16);
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", title);
  let max = 0;
  for (const s of series) for (const v of s) if (v !== null && v > max) max = v;
  const n = Math.max(1, (series[0] || []).length - 1), top = max || 1;
  series.forEach((s, k) => {
    let d = "";
    s.forEach((v, i) => {
      if (v === null) return;
      const x = (i / n) * (w - 4) + 2, y = h - (v / top) * (h - 6) + 2;
      d += (d && s[i - 1] !== null ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
    });
    const path = document.createElementNS(NS, "path");
    path.setAttribute("d", d || "M0 0"); path.setAttribute("fill", "none");
    path.setAttribute("stroke", colors[k]); path.setAttribute("stroke-width", "1.5");
    svg.append(path);
  });
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", 4); label.setAttribute("y", h + 13);
  label.setAttribute("font-size", "11"); label.setAttribute("fill", "#667085");
  label.textContent = title + " (10 min) · max " + (max ? max.toFixed(max < 10 ? 2 : 0) : 0) + unit;
  svg.append(label);
  return svg;
}
async function reload(worker, button) {
  button.disabled = true;
  const url = base + "/api/reload" + (worker ? "/" + encodeURIComponent(worker) : "");
  try {
    const r = await fetch(url, {method: "POST", headers: {"X-TQServer-Page": "1"}});
    if (!r.ok) note("reload refused: " + r.status + " " + (await r.text()));
  } catch (e) { note("reload failed: " + e); }
  setTimeout(() => { button.disabled = false; }, 1000);
}
function note(text) { document.getElementById("conn").textContent = text; }
function card(name, w) {
  const r = w.requests, b = w.last_build;
  const restarts = Object.entries(w.restarts || {}).map(([k, v]) => k + " " + v)
    .join(", ") || "none";
  const inst = $("table", {class: "instances"},
    $("tr", {}, ...["instance", "pid", "port", "state", "uptime", "requests", "in flight",
                    "CPU", "RSS"].map(t => $("th", {}, t))),
    ...w.instances.map(i => $("tr", {"data-instance": i.id},
      $("td", {}, i.id + (i.serving ? "" : " (not serving)")), $("td", {class: "pid"}, i.pid),
      $("td", {}, i.port), $("td", {}, i.state), $("td", {}, dur(i.uptime_seconds)),
      $("td", {}, i.requests), $("td", {}, i.in_flight), $("td", {}, pct(i.cpu_percent)),
      $("td", {}, mib(i.rss_bytes)))));
  const hist = w.history || [];
  const build = b === null ? "none yet" :
    (b.cancelled ? "cancelled" : b.ok ? "ok" : "FAILED") + " in " + b.duration_seconds + "s at " +
    new Date(b.started * 1000).toLocaleTimeString() + (b.command ? " · " + b.command : "");
  return $("section", {class: "card", "data-worker": name},
    $("div", {class: "top"},
      $("h2", {}, name), $("span", {class: "mute"}, w.type + " · " + w.route),
      $("span", {class: "status " + w.status}, w.status),
      w.crash_loop ? $("span", {class: "bad"}, "crash loop") : null,
      w.deploying ? $("span", {class: "starting"}, "deploying") : null,
      w.revision ? $("span", {class: "mute"}, "rev " + w.revision) : null,
      $("button", {class: "reload right", "data-worker": name,
                   onclick: e => reload(name, e.target)}, "Reload")),
    w.error ? $("p", {class: "bad"}, w.error) : null,
    w.config_error ? $("p", {class: "bad"}, w.config_error) : null,
    $("div", {class: "figs"},
      $("span", {}, $("b", {class: "rate"}, r.rate.toFixed(2)), "req/s (1 min)"),
      $("span", {}, $("b", {class: r.errors ? "bad" : ""}, (r.error_rate * 100).toFixed(1) + "%"),
        "errors (5xx)"),
      $("span", {}, $("b", {}, ms(r.p50_ms)), "p50"),
      $("span", {}, $("b", {}, ms(r.p99_ms)), "p99"),
      $("span", {}, $("b", {}, restarts), "restarts")),
    $("div", {class: "charts"},
      chart("requests/s", [hist.map(p => p[0])], ["#2f6feb"], ""),
      chart("latency p50/p99", [hist.map(p => p[1]), hist.map(p => p[2])],
            ["#1a7f37", "#cf222e"], " ms")),
    inst,
    $("div", {}, $("span", {class: "mute"}, "last build: "), build),
    b && !b.ok && b.output ? $("pre", {class: "build-output"}, b.output) : null,
    w.start_output ? $("pre", {class: "start-output"}, w.start_output) : null,
    $("details", {open: ""}, $("summary", {class: "mute"}, "last log lines"),
      $("pre", {class: "log"}, (w.log || []).join("\n") || "(nothing yet)")));
}
let openDetails = {};
function render(s) {
  document.getElementById("meta").textContent = "mode " + s.mode + " · root " + s.root +
    (s.revision ? " · revision " + s.revision : "") + " · " +
    new Date(s.time * 1000).toLocaleTimeString();
  const ready = s.ready || {status: "ready", waiting_for: []};
  const badge = document.getElementById("ready");
  badge.className = ready.status === "ready" ? "healthy" : ready.status === "draining" ? "bad" :
    "starting";
  badge.textContent = ready.status === "ready" ? "ready" : "not ready: " + ready.status +
    (ready.waiting_for.length ? " (waiting for " + ready.waiting_for.join(", ") + ")" : "");
  const main = document.getElementById("workers");
  for (const d of main.querySelectorAll("section")) openDetails[d.dataset.worker] =
    d.querySelector("details").open;
  // Each Reload button outlives the re-render (moved into the new card): a click whose
  // press and release straddle a snapshot would otherwise land on two buttons, and count
  // on none.
  const buttons = {};
  for (const b of main.querySelectorAll("button.reload[data-worker]")) {
    buttons[b.dataset.worker] = b;
  }
  const errs = s.config_errors.map(e => $("li", {}, e));
  const watcher = s.watcher && s.watcher.status === "failed" ?
    $("p", {class: "banner"}, "The file watcher failed: " + (s.watcher.error || "") +
      "; it is restarting, edits are not seen until then.") : null;
  main.replaceChildren(...(watcher ? [watcher] : []),
    ...Object.entries(s.workers).map(([n, w]) => {
      const c = card(n, w);
      if (openDetails[n] === false) c.querySelector("details").open = false;
      if (buttons[n]) c.querySelector("button.reload").replaceWith(buttons[n]);
      return c;
    }),
    ...(errs.length ? [$("div", {class: "card banner"}, $("b", {}, "Configuration errors"),
                        $("ul", {}, ...errs))] : []));
}
function connect() {
  const source = new EventSource(base + "/api/stream");
  source.addEventListener("status", e => { render(JSON.parse(e.data)); note("live"); });
  source.onerror = () => note("disconnected, retrying…");
}
document.getElementById("reload-all").onclick = e => reload(null, e.target);
render(JSON.parse(document.getElementById("initial").textContent));
connect();
"""


def render(base: str, snapshot: dict) -> bytes:
    """The page, with ``base`` the admin area's path (the API is under it) and the
    ``snapshot`` it shows until the stream's first event."""
    initial = json.dumps(snapshot, separators=(",", ":")).replace("<", "\\u003c")
    page = f"""<!DOCTYPE html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width,initial-scale=1">
<title>TQServer status</title><style>{_STYLE}</style></head>
<body data-base="{html.escape(base.rstrip("/"))}">
<header><div><h1>TQServer <span id=ready></span></h1><p id=meta>connecting…</p></div>
<div><span id=conn class=mute></span> <button id=reload-all>Reload all</button></div></header>
<main id=workers></main>
<noscript>This page draws itself from the live status stream and needs JavaScript; the same
data is at <a href="{html.escape(base.rstrip("/"))}/api/status">api/status</a>.</noscript>
<script id=initial type="application/json">{initial}</script>
<script>{_SCRIPT}</script></body></html>"""
    return page.encode("utf-8")
