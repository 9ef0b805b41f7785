"use strict";
const jobId = decodeURIComponent(location.pathname.split("/").pop());
let job = null, model = null, trials = [], selected = null, loadingTrials = false, pendingTrials = false;

function showJob(j) {
  job = j;
  document.getElementById("job-id").textContent = j.id;
  document.getElementById("job-status").replaceChildren(statusBadge(j.status));
  const r = j.request;
  const budgets = [r.max_latency_ratio != null ? "latency ≤ " + r.max_latency_ratio + "x" : null,
                   r.max_latency_ms != null ? "latency ≤ " + r.max_latency_ms + " ms" : null,
                   r.resolved_max_flops_ratio != null ? "FLOPs ≤ " + r.resolved_max_flops_ratio.toFixed(3) + "x" : null]
                  .filter(Boolean).join(", ") || "no budget";
  document.getElementById("job-summary").textContent = (model ? model.name + " · " : "") + r.runtime + ", " + r.threads +
    " threads, batch " + r.batch + " · " + budgets + (j.base && j.base.latency_ms ? " · base " + fmt.ms(j.base.latency_ms) + " (median)" : "");
  document.getElementById("job-settings").textContent = jobSettings(r);
  document.getElementById("job-progress").replaceChildren(progressBar(j));
  document.getElementById("cancel").hidden = !["queued", "running"].includes(j.status);
  document.getElementById("job-error").textContent = j.error || "";
  showCandidates();
  showSiteMap();
}

function jobSettings(r) {
  // Jobs stored by older versions lack some fields: name only what the request holds.
  const has = (k) => r[k] !== undefined && r[k] !== null;
  const final = [has("final_candidates") ? fmt.count(r.final_candidates, "candidate") : null,
                 has("latency_steps") && r.latency_steps.length ? "steps " + r.latency_steps.map(fmt.x).join(", ") : null,
                 has("final_epochs") ? fmt.count(r.final_epochs, "epoch") : null, has("final_lr") ? "lr " + r.final_lr : r.final_lr === null ? "lr by plan" : null,
                 has("final_mixup") && r.final_mixup > 0 ? "mixup " + r.final_mixup : null].filter(Boolean).join(", ");
  return [has("blocks") ? "blocks " + r.blocks.join(", ").toUpperCase() : null,
          has("trials") ? fmt.count(r.trials, "trial") + (has("trial_epochs") && has("trial_images")
            ? " (" + fmt.count(r.trial_epochs, "epoch") + " on " + fmt.count(r.trial_images, "image") + ")" : "") : null,
          final ? "final: " + final : null, has("time_budget_s") ? "time budget " + r.time_budget_s + " s" : null,
          has("seed") ? "seed " + r.seed : null, has("max_workers") && r.max_workers > 1 ? "up to " + r.max_workers + " workers" : null]
    .filter(Boolean).join(" · ");
}

function showCandidates() {
  const body = document.querySelector("#candidates tbody");
  body.replaceChildren(...job.candidates.map((c) => el("tr", { "data-candidate": c.id },
    el("td", {}, c.id), el("td", {}, c.trial), el("td", { class: "num" }, fmt.mflops(c.flops)),
    el("td", { class: "num" }, fmt.int(c.params)),
    el("td", { class: "num" }, fmt.ms(c.latency_ms) + (c.latency.length && c.latency[0].ratio != null ? " (" + fmt.x(c.latency[0].ratio) + ")" : ""),
      budgetNote(c.latency_budget)),
    el("td", {}, c.latency.map((l) => l.runtime + " " + fmt.ms(l.latency_ms) + " = " + fmt.x(l.ratio)
      + (l.repeats > 1 ? " [" + fmt.x(l.ratio_min) + "–" + fmt.x(l.ratio_max) + " over " + l.repeats + " timings]" : "")
      + " (" + l.threads + " thr, b" + l.batch + ")").join("; "),
      ...c.latency.filter((l) => l.warning).map((l) => el("div", { class: "err unsteady" }, l.runtime + ": " + l.warning))),
    el("td", { class: "num" }, fmt.pct(c.val_accuracy != null ? c.val_accuracy : c.val_agreement)),
    el("td", { class: "num" }, fmt.pct(c.holdout_accuracy != null ? c.holdout_accuracy : c.holdout_agreement)),
    el("td", {}, ...["pt2", "onnx", "safetensors", "report"].map((f) =>
      el("a", { class: "button download", href: c.downloads[f], "data-format": f, download: "" }, f))))));
  document.getElementById("no-candidates").hidden = job.candidates.length > 0;
}

function budgetNote(b) {
  // The final timings are new samples of the candidate's latency: say where they fell against the budget.
  if (!b) return null;
  const what = b.job_max_latency != null ? " step (job budget " + fmt.x(b.job_max_latency) + ")" : " budget";
  if (b.within) return el("div", { class: "muted budget" }, "inside the " + fmt.x(b.max_latency) + what);
  return el("div", { class: "err budget" }, "over the " + fmt.x(b.max_latency) + what + " in these timings" +
    (b.verified_in_search != null ? " (verified at " + fmt.x(b.verified_in_search) +
      (b.verified_timings ? ", median of " + b.verified_timings : "") + ", in the search)" : ""));
}

function showSiteMap() {
  if (!model) return;
  const columns = job.candidates.length
    ? job.candidates.map((c) => ({ name: "cand " + c.id, plan: c.plan }))
    : trials.filter((t) => t.state === "COMPLETE").slice(-6).map((t) => ({ name: "trial " + t.number, plan: t.plan }));
  if (selected && !columns.some((c) => c.name === "trial " + selected.number)) {
    columns.push({ name: "trial " + selected.number, plan: selected.plan });
  }
  const keep = job.base && job.base.site_keep_ms, total = job.base && job.base.table_base_ms;
  document.querySelector("#site-map thead").replaceChildren(el("tr", {}, el("th", {}, "site"),
    el("th", { class: "num" }, "FLOPs share"), el("th", { class: "num" }, "latency share"),
    ...columns.map((c) => el("th", {}, c.name))));
  document.querySelector("#site-map tbody").replaceChildren(...model.sites.map((s) => el("tr", {},
    el("td", {}, s.name + " ", el("span", { class: "muted" }, s.in_channels + "→" + s.out_channels + " " + s.kernel.join("x"))),
    el("td", { class: "num" }, (s.flops_share * 100).toFixed(1) + " %"),
    el("td", { class: "num" }, keep && total && keep[s.name] != null ? (keep[s.name] / total * 100).toFixed(1) + " %" : "–"),
    ...columns.map((c) => el("td", {}, choiceCell(c.plan[s.name]))))));
}

function showSelected(t) {
  selected = t;
  const a = t.user_attrs;
  const rows = [["state", t.state + (a.infeasible ? " — " + a.infeasible : "")],
    ["validation score", fmt.pct(t.values ? t.values[0] : a.val_score)],
    ["latency", fmt.ms(a.latency_ms) + " vs base " + fmt.ms(a.base_latency_ms) + " = " + fmt.x(a.latency_ratio) + " (median)"],
    ["predicted latency", fmt.x(a.predicted_latency_ratio)], ["FLOPs", fmt.int(a.flops) + " = " + fmt.x(a.flops_ratio)],
    ["params", fmt.int(a.params)], ["origin", a.seed || "sampler"]];
  const box = document.getElementById("selected");
  box.className = "card";
  box.replaceChildren(el("strong", { id: "selected-title" }, "Trial " + t.number),
    el("table", {}, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))),
    el("div", { class: "muted" }, "plan (sites not listed are kept):"),
    el("div", {}, ...Object.entries(t.plan).map(([site, c]) => el("div", {}, site + " ", choiceCell(c)))));
  showSiteMap();
}

async function loadTrials() {
  if (loadingTrials) { pendingTrials = true; return; }
  loadingTrials = true;
  try {
    trials = (await api("/jobs/" + jobId + "/trials")).items;
    const count = scatter(document.getElementById("scatter"), trials, {
      maxLatency: job && job.request.max_latency_ratio, runtime: job && job.request.runtime,
      baseScore: job && job.base ? job.base.val_score : null, onSelect: showSelected,
    });
    document.getElementById("trial-count").textContent = fmt.count(count, "trial") + " measured, " +
      fmt.count(trials.filter((t) => t.user_attrs.screened).length, "plan") + " screened out before timing, " +
      fmt.count(trials.filter((t) => t.user_attrs.duplicate_of != null).length, "repeat") +
      " of a measured plan (not measured again)";
    if (selected) {
      const again = document.querySelector('#scatter circle[data-trial="' + selected.number + '"]');
      if (again) again.classList.add("selected");
    }
    showSiteMap();
  } finally {
    loadingTrials = false;
    if (pendingTrials) { pendingTrials = false; loadTrials(); }
  }
}

document.getElementById("cancel").addEventListener("click", async () => {
  try { showJob(await api("/jobs/" + jobId + "/cancel", { method: "POST" })); }
  catch (e) { document.getElementById("job-error").textContent = e.message; }
});

async function start() {
  try { job = await api("/jobs/" + jobId); }
  catch (e) { document.getElementById("job-error").textContent = e.message; return; }
  try { model = await api("/models/" + job.model_id); } catch (e) { model = null; }
  showJob(job);
  await loadTrials();
  if (["succeeded", "failed", "cancelled"].includes(job.status)) return;
  const events = new EventSource("/jobs/" + jobId + "/events");
  let lastDone = -1;
  events.addEventListener("progress", (ev) => {
    const j = JSON.parse(ev.data);
    showJob(j);
    const key = j.progress.trials_done + ":" + j.status;
    if (key !== lastDone) { lastDone = key; loadTrials(); }
  });
  events.addEventListener("end", () => { events.close(); loadTrials(); });
  events.addEventListener("deleted", () => events.close());
}
start();
