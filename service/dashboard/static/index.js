"use strict";
let models = {};

async function refreshJobs() {
  const [jobs, modelList] = await Promise.all([api("/jobs"), api("/models")]);
  models = Object.fromEntries(modelList.items.map((m) => [m.id, m]));
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.items.map((job) => {
    const model = models[job.model_id];
    const best = job.best ? (1 / job.best.latency_ratio).toFixed(2) + "x faster (" + fmt.pct(job.best.val_score) + ")" : "–";
    const actions = el("td", {},
      el("a", { class: "button", href: "/ui/jobs/" + job.id }, "open"), " ",
      ["queued", "running"].includes(job.status)
        ? el("button", { class: "cancel", onclick: () => act("/jobs/" + job.id + "/cancel", "POST") }, "cancel") : "",
      " ",
      job.status !== "running" ? el("button", { class: "delete", onclick: () => act("/jobs/" + job.id, "DELETE") }, "delete") : "");
    return el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: "/ui/jobs/" + job.id }, job.id)),
      el("td", {}, model ? el("a", { href: "/ui/models/" + model.id }, model.name) : job.model_id),
      el("td", {}, statusBadge(job.status)), el("td", {}, progressBar(job)), el("td", { class: "num" }, best), actions);
  }));
  document.getElementById("no-jobs").hidden = jobs.items.length > 0;
  return modelList;
}

async function act(path, method) {
  try { await api(path, { method }); } catch (e) { document.getElementById("job-msg").textContent = e.message; }
  await refreshJobs();
}

async function refreshChoices() {
  const [modelList, datasets] = await Promise.all([api("/models"), api("/datasets")]);
  const form = document.getElementById("job-form");
  const fill = (name, items, label, optional) => {
    const select = form.elements[name];
    const keep = select.value;
    select.replaceChildren(...(optional ? [el("option", { value: "" }, "none")] : []),
      ...items.map((i) => el("option", { value: i.id }, label(i))));
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
  };
  fill("model_id", modelList.items, (m) => m.name + " (" + m.input_shape.join("x") + ", " + fmt.mflops(m.flops) + ")");
  const dl = (d) => d.name + " (" + d.count + " × " + d.shape.join("x") + (d.has_labels ? ", labelled" : "") + ")";
  fill("calib_dataset_id", datasets.items, dl);
  fill("val_dataset_id", datasets.items, dl);
  fill("holdout_dataset_id", datasets.items, dl, true);
}

function upload(formId, path, msgId, describe) {
  const form = document.getElementById(formId);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = document.getElementById(msgId);
    msg.className = "msg muted"; msg.textContent = "uploading…";
    const data = new FormData(form);
    for (const [k, v] of [...data.entries()]) if (v === "") data.delete(k);
    try {
      const row = await api(path, { method: "POST", body: data });
      msg.className = "msg"; msg.textContent = describe(row);
      await refreshChoices();
    } catch (e) { msg.className = "msg err"; msg.textContent = e.message; }
  });
}

upload("model-form", "/models", "model-msg", (m) => "stored " + m.name + ": " + m.sites.length + " conv sites, " +
  fmt.mflops(m.flops) + ", " + fmt.int(m.params) + " params");
upload("dataset-form", "/datasets", "dataset-msg", (d) => "stored " + d.name + ": " + d.count + " images " +
  d.shape.join("x") + (d.has_labels ? ", labelled" : ", no labels"));

document.getElementById("job-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const msg = document.getElementById("job-msg");
  const body = {};
  for (const name of ["model_id", "calib_dataset_id", "val_dataset_id", "holdout_dataset_id", "runtime"]) {
    if (form.elements[name].value) body[name] = form.elements[name].value;
  }
  for (const name of ["threads", "batch", "trials", "final_candidates", "trial_images", "latency_rounds", "latency_runs",
                      "latency_warmup", "final_timing_repeats", "seed", "max_workers"]) {
    if (form.elements[name].value !== "") body[name] = parseInt(form.elements[name].value, 10);
  }
  for (const name of ["max_latency_ratio", "max_flops_ratio", "final_epochs", "final_lr", "final_mixup", "trial_epochs",
                      "time_budget_s"]) {
    if (form.elements[name].value !== "") body[name] = parseFloat(form.elements[name].value);
  }
  const steps = form.elements.latency_steps.value.trim();
  if (steps) body.latency_steps = steps.split(",").map((v) => Number(v.trim()));
  for (const name of ["blocks", "eval_runtimes"]) {  // none ticked before the defaults came: the API's default
    const ticked = [...form.querySelectorAll("input[name=" + name + "]:checked")].map((i) => i.value);
    if (ticked.length || form.dataset.defaults) body[name] = ticked;
  }
  try {
    const job = await api("/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    msg.className = "msg"; msg.replaceChildren("queued ", el("a", { href: "/ui/jobs/" + job.id, id: "new-job-link" }, job.id));
    await refreshJobs();
  } catch (e) { msg.className = "msg err"; msg.textContent = e.message; }
});

// The form's starting values are the API's own defaults (JobIn, from the OpenAPI schema), written nowhere else.
async function fillDefaults() {
  const form = document.getElementById("job-form");
  const fields = (await api("/openapi.json")).components.schemas.JobIn.properties;
  for (const [name, field] of Object.entries(fields)) {
    if (field.default === undefined || field.default === null || !form.elements[name]) continue;
    if (Array.isArray(field.default)) {
      for (const box of form.querySelectorAll("input[name=" + name + "]")) box.checked = field.default.includes(box.value);
    } else if (form.elements[name].tagName === "SELECT" || form.elements[name].value === "") {
      form.elements[name].value = String(field.default);
    }
  }
  form.dataset.defaults = "loaded";
}

fillDefaults().catch((e) => {
  const msg = document.getElementById("job-msg");
  msg.className = "msg err"; msg.textContent = "could not read the job defaults: " + e.message;
});
refreshJobs().then(refreshChoices);
setInterval(() => refreshJobs().catch(() => {}), 1000);
