"use strict";
const modelId = decodeURIComponent(location.pathname.split("/").pop());

async function start() {
  let m;
  try { m = await api("/models/" + modelId); }
  catch (e) { document.getElementById("model-error").textContent = e.message; return; }
  document.getElementById("model-name").textContent = m.name;
  document.getElementById("model-summary").textContent = "input " + m.input_shape.join("x") + " · " + fmt.mflops(m.flops) +
    " · " + fmt.int(m.params) + " params · " + m.sites.length + " conv sites · sha256 " + m.sha256.slice(0, 12);
  document.querySelector("#latency tbody").replaceChildren(...(m.latency.length ? m.latency.map((l) => el("tr", {},
    el("td", {}, l.runtime), el("td", { class: "num" }, l.threads), el("td", { class: "num" }, l.batch), el("td", {}, l.device),
    el("td", { class: "num" }, fmt.ms(l.median_ms)), el("td", { class: "num" }, l.runs)))
    : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "latency " + m.latency_status + (m.latency_error ? ": " + m.latency_error : "")))]));
  // Latency share per site comes from a job's per-site timing of this model (the latest one that has it).
  let keep = null, total = null, runtime = null;
  try {
    const jobs = (await api("/jobs")).items.filter((j) => j.model_id === m.id && j.base && j.base.site_keep_ms);
    if (jobs.length) { keep = jobs[0].base.site_keep_ms; total = jobs[0].base.table_base_ms; runtime = jobs[0].request.runtime; }
  } catch (e) { keep = null; }
  bars(document.getElementById("bars"), m.sites.map((s) => ({
    label: s.name, values: [s.flops_share, keep && keep[s.name] != null ? keep[s.name] / total : null] })),
    [{ name: "FLOPs share", colour: "#1f6feb" }, { name: "latency share", colour: "#d4a72c" }]);
  document.getElementById("latency-note").textContent = keep
    ? "latency share: each conv timed alone against the whole model, " + runtime + " (from job " + "timing)"
    : "latency share appears once a job has timed this model's convs on a runtime";
  document.getElementById("skipped").replaceChildren(...(m.skipped.length ? m.skipped.map((s) => el("li", {}, s.name + ": " + s.reason))
    : [el("li", { class: "muted" }, "none")]));
}
start();
