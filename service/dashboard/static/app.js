// slimconv dashboard: shared helpers and SVG charts (no dependencies, no network beyond this server).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";

async function api(path, options) {
  const res = await fetch(path, options);
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { detail: text }; }
  if (!res.ok) throw new Error((body && body.detail) || res.statusText);
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmt = {
  pct: (v) => (v == null ? "–" : v.toFixed(2) + " %"),
  ms: (v) => (v == null ? "–" : v.toFixed(3) + " ms"),
  x: (v) => (v == null ? "–" : v.toFixed(3) + "x"),
  mflops: (v) => (v == null ? "–" : (v / 1e6).toFixed(1) + " MFLOPs"),
  int: (v) => (v == null ? "–" : Number(v).toLocaleString("en")),
  count: (n, word) => n + " " + word + (n === 1 ? "" : "s"),
  eta: (s) => (s == null ? "" : s > 90 ? Math.round(s / 60) + " min left" : Math.round(s) + " s left"),
};

function choiceLabel(c) {
  if (!c || c.kind === "keep") return "keep";
  if (c.kind === "ds") return "DS m=" + c.depth_multiplier;
  if (c.kind === "ss") return "SS r=" + c.rank;
  if (c.kind === "ir") return "IR t=" + c.exp_ratio + ",k=" + c.kernel;
  return c.kind;
}

function choiceCell(c) {
  const kind = c ? c.kind : "keep";
  return el("span", { class: "cell " + kind }, choiceLabel(c));
}

function progressBar(job) {
  const p = job.progress;
  const share = p.trials_planned ? Math.min(1, p.trials_done / p.trials_planned) : 0;
  const done = job.status === "succeeded" ? 1 : share;
  return el("div", {},
    el("div", { class: "bar", title: p.trials_done + " / " + p.trials_planned + " trials", "data-share": done.toFixed(3) },
      el("span", { style: "width:" + (done * 100).toFixed(1) + "%" })),
    el("div", { class: "muted" }, p.trials_done + " / " + p.trials_planned + " trials · " + p.phase +
       (job.status === "running" && p.eta_s != null ? " · " + fmt.eta(p.eta_s) : "")));
}

function statusBadge(status) { return el("span", { class: "status " + status }, status); }

// Colour scale for FLOPs ratios: low (blue) to high (red).
function flopsColour(r) {
  const t = Math.max(0, Math.min(1, r));
  const hue = 220 - 220 * t;
  return "hsl(" + hue.toFixed(0) + ",70%,48%)";
}

// Scatter of trials: x = measured latency ratio, y = validation score; infeasible grey; Pareto front; budgets.
function scatter(container, trials, opts) {
  const W = 640, H = 380, L = 52, R = 16, T = 14, B = 40;
  const pts = trials.filter((t) => t.user_attrs && t.user_attrs.latency_ratio != null).map((t) => ({
    t, x: t.user_attrs.latency_ratio, y: t.values ? t.values[0] : t.user_attrs.val_score,
    feasible: t.state === "COMPLETE", flops: t.user_attrs.flops_ratio,
  }));
  container.replaceChildren();
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", id: "scatter-svg", role: "img" });
  const xs = pts.map((p) => p.x).concat([opts.maxLatency || 0, 1]);
  const ys = pts.filter((p) => p.y != null).map((p) => p.y);
  const x0 = 0, x1 = Math.max(...xs) * 1.08;
  const y0 = ys.length ? Math.max(0, Math.min(...ys) - 3) : 0, y1 = ys.length ? Math.min(100, Math.max(...ys) + 3) : 100;
  const sx = (v) => L + ((v - x0) / (x1 - x0 || 1)) * (W - L - R);
  const sy = (v) => H - B - ((v - y0) / (y1 - y0 || 1)) * (H - T - B);
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888" }),
              svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#888" }));
  for (let i = 0; i <= 5; i++) {
    const xv = x0 + ((x1 - x0) * i) / 5, yv = y0 + ((y1 - y0) * i) / 5;
    root.append(svg("text", { x: sx(xv), y: H - B + 14, "text-anchor": "middle" }, xv.toFixed(2) + "x"),
                svg("text", { x: L - 6, y: sy(yv) + 4, "text-anchor": "end" }, yv.toFixed(0)));
  }
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" },
                  "measured latency, fraction of the base (" + (opts.runtime || "") + ")"),
              svg("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`,
                            "text-anchor": "middle" }, opts.metric || "validation score (%)"));
  if (opts.maxLatency) {
    root.append(svg("line", { x1: sx(opts.maxLatency), x2: sx(opts.maxLatency), y1: T, y2: H - B, stroke: "#cf222e",
                              "stroke-dasharray": "5 4", class: "budget" }),
                svg("text", { x: sx(opts.maxLatency) + 4, y: T + 10, fill: "#cf222e" }, "latency budget"));
  }
  if (opts.baseScore != null && opts.baseScore >= y0 && opts.baseScore <= y1) {
    root.append(svg("line", { x1: L, x2: W - R, y1: sy(opts.baseScore), y2: sy(opts.baseScore), stroke: "#888",
                              "stroke-dasharray": "2 3" }),
                svg("text", { x: W - R - 4, y: sy(opts.baseScore) - 4, "text-anchor": "end" }, "base model"));
  }
  const front = pts.filter((p) => p.feasible && p.y != null).sort((a, b) => a.x - b.x || b.y - a.y);
  const pareto = [];
  for (const p of front) if (!pareto.length || p.y > pareto[pareto.length - 1].y) pareto.push(p);
  if (pareto.length > 1) {
    root.append(svg("polyline", { points: pareto.map((p) => sx(p.x) + "," + sy(p.y)).join(" "), fill: "none",
                                  stroke: "#1f6feb", "stroke-width": 1.5, class: "pareto" }));
  }
  for (const p of pts) {
    const y = p.y == null ? y0 : p.y;
    const c = svg("circle", { cx: sx(p.x), cy: sy(y), r: 5.5, class: "point", "data-trial": p.t.number,
                              fill: p.feasible ? flopsColour(p.flops) : "#bbb", "fill-opacity": p.feasible ? 0.9 : 0.6,
                              stroke: "#fff" });
    c.append(svg("title", {}, "trial " + p.t.number + ": " + fmt.x(p.x) + ", " + (p.y == null ? "infeasible" : fmt.pct(p.y))));
    c.addEventListener("click", () => {
      root.querySelectorAll(".point.selected").forEach((n) => n.classList.remove("selected"));
      c.classList.add("selected");
      opts.onSelect && opts.onSelect(p.t);
    });
    root.append(c);
  }
  container.append(root);
  return pts.length;
}

// Horizontal bars: rows of {label, values: [v...]} with one colour per series.
function bars(container, rows, series) {
  const W = 640, rowH = 22, L = 170, R = 60, H = rows.length * rowH + 30;
  container.replaceChildren();
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", id: "bars-svg" });
  const band = (rowH - 6) / series.length;
  rows.forEach((row, i) => {
    const y = 20 + i * rowH;
    root.append(svg("text", { x: L - 6, y: y + rowH / 2, "text-anchor": "end" }, row.label));
    series.forEach((s, j) => {
      const v = row.values[j];
      if (v == null) return;
      const w = Math.max(1, v * (W - L - R));
      const r = svg("rect", { x: L, y: y + j * band, width: w, height: band - 1, fill: s.colour, class: "bar-" + j });
      r.append(svg("title", {}, s.name + ": " + (v * 100).toFixed(1) + " %"));
      root.append(r, svg("text", { x: L + w + 4, y: y + j * band + band - 2 }, (v * 100).toFixed(1) + "%"));
    });
  });
  series.forEach((s, j) => root.append(svg("rect", { x: L + j * 160, y: 2, width: 10, height: 10, fill: s.colour }),
                                       svg("text", { x: L + j * 160 + 14, y: 11 }, s.name)));
  container.append(root);
}
