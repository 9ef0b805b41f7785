"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Screenshots of every page land in test-artifacts/ (not committed).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.db import CandidateRow, JobRow, make_engine, session_factory
from service.schemas import JobIn
from tests.service.conftest import REPO, Server, npz_bytes, world_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ui_server() -> Iterator[Server]:
    srv = Server(world_dir("slimconv-ui-"), workers=1)
    yield srv
    srv.stop()


class Console:
    """Errors the page printed or threw."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_empty_home_and_optuna_dashboard(browser, ui_server: Server) -> None:
    page = browser.new_page()
    console = Console(page)
    page.goto(ui_server.url + "/")
    page.wait_for_selector("#no-jobs:not([hidden])")
    shot(page, "home-empty")
    page.goto(ui_server.url + "/optuna")
    assert page.url.rstrip("/").endswith("/dashboard")
    page.wait_for_function("document.body.innerText.length > 0")
    page.wait_for_timeout(1500)
    assert "optuna" in (page.title() + page.content()).lower()
    assert page.locator("script[src*='bundle']").count() == 1
    shot(page, "optuna-dashboard")
    assert console.errors == []
    page.close()


def test_upload_run_watch_download(browser, ui_server: Server, zoo_pt2: Callable[[str], bytes], tmp_path) -> None:
    (tmp_path / "tiny.pt2").write_bytes(zoo_pt2("tiny_vgg"))
    (tmp_path / "calib.npz").write_bytes(npz_bytes(96, seed=5))
    page = browser.new_page(accept_downloads=True)
    console = Console(page)
    page.goto(ui_server.url + "/")
    page.set_input_files("#model-form input[name=file]", str(tmp_path / "tiny.pt2"))
    page.fill("#model-form input[name=input_shape]", "3,16,16")
    page.fill("#model-form input[name=name]", "tiny vgg")
    page.click("#model-form button[type=submit]")
    page.wait_for_selector("#model-msg:has-text('stored tiny vgg')", timeout=120_000)
    page.set_input_files("#dataset-form input[name=file]", str(tmp_path / "calib.npz"))
    page.click("#dataset-form button[type=submit]")
    try:
        page.wait_for_selector("#dataset-msg:has-text('96 images')", timeout=120_000)
    finally:
        shot(page, "home-uploaded")
    page.wait_for_function("document.querySelector('#job-form select[name=val_dataset_id]').options.length > 0")
    form = "#job-form "
    page.wait_for_selector("#job-form[data-defaults=loaded]")  # the form starts at JobIn's defaults
    defaults = {name: page.input_value(form + f"[name={name}]") for name in ("trials", "final_lr", "final_epochs")}
    assert defaults == {name: "" if (d := JobIn.model_fields[name].default) is None else str(d).removesuffix(".0")
                        for name in ("trials", "final_lr", "final_epochs")}  # final_lr: none, the rule by plan
    assert page.is_checked(form + "input[name=blocks][value=ir]")
    page.fill(form + "input[name=max_latency_ratio]", "5")  # generous: the tiny net's plans all fit
    page.fill(form + "input[name=max_flops_ratio]", "0.9")
    page.fill(form + "input[name=trials]", "5")
    page.fill(form + "input[name=threads]", "1")
    page.uncheck(form + "input[name=blocks][value=ir]")
    page.click(form + "details summary")
    for name, value in {"final_epochs": "0.2", "final_candidates": "2", "latency_steps": "4", "trial_epochs": "0.1",
                        "trial_images": "64",
                        "latency_rounds": "2", "latency_runs": "5", "latency_warmup": "2",
                        "final_timing_repeats": "2", "final_lr": "0.002", "final_mixup": "0.2", "seed": "3"}.items():
        page.fill(form + f"input[name={name}]", value)
    page.uncheck(form + "input[name=eval_runtimes][value=torch]")
    shot(page, "home-form")
    page.click(form + "button[type=submit]")
    page.wait_for_selector("#new-job-link")
    page.wait_for_selector("#jobs tbody tr")
    page.click("#new-job-link")
    page.wait_for_selector("#job-id:not(:empty)")
    request = ui_server.client.get("/jobs/" + page.locator("#job-id").inner_text()).json()["request"]
    assert (request["final_lr"], request["final_mixup"], request["seed"], request["max_workers"]) == (0.002, 0.2, 3, 1)
    assert request["latency_steps"] == [4.0]
    assert request["time_budget_s"] is None  # left empty: none
    assert page.locator("#job-settings").inner_text() == \
        "blocks DS, SS · 5 trials (0.1 epochs on 64 images) · final: 2 candidates, steps 4.000x, 0.2 epochs, lr 0.002, " \
        "mixup 0.2 · seed 3"
    page.wait_for_function("Number(document.querySelector('#job-progress .bar').dataset.share) > 0", timeout=300_000)
    page.wait_for_selector("#scatter circle.point", timeout=300_000)
    shot(page, "job-running")
    # The last point is drawn on top: two trials with near figures overlap, and the one under the
    # other cannot be clicked (the first point did not take the click in one run out of many).
    page.locator("#scatter circle.point").last.click()
    page.wait_for_selector("#selected-title:has-text('Trial')")
    page.wait_for_selector("#job-status .status.succeeded", timeout=300_000)
    page.wait_for_selector("#candidates tbody tr")
    counts = page.locator("#trial-count").inner_text()
    assert re.fullmatch(r"5 trials measured, (1 plan|\d+ plans) screened out before timing, (1 repeat|\d+ repeats) of "
                        r"a measured plan \(not measured again\)", counts), counts
    row = page.locator("#candidates tbody tr").first.inner_text()
    # "inside the ..." or "over the ...": the tiny net's plans all verify well under the 4x step
    assert "over 2 timings" in row and "4.000x step (job budget 5.000x)" in row
    assert page.locator("#site-map tbody tr").count() >= 2
    shot(page, "job-done")
    with page.expect_download() as info:
        page.click("#candidates a.download[data-format=onnx]")
    path = tmp_path / "cand.onnx"
    info.value.save_as(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 16, 16), np.float32)})[0]
    assert out.shape == (1, 10)
    page.click("header a[href='/']")
    page.wait_for_selector("#jobs tbody tr .status.succeeded")
    model_link = page.locator("#jobs tbody tr td:nth-child(2) a").first
    model_link.click()
    page.wait_for_selector("#bars rect")
    shot(page, "model")
    assert console.errors == []
    page.close()


def test_failed_and_cancelled_jobs_render(browser, zoo_pt2: Callable[[str], bytes]) -> None:
    server = Server(world_dir("slimconv-ui2-"), workers=0)
    try:
        c = server.client
        model = c.post("/models", files={"file": ("m.pt2", zoo_pt2("tiny_vgg"))}, data={"input_shape": "3,16,16"}).json()
        data = c.post("/datasets", files={"file": ("d.npz", npz_bytes(32))}).json()
        body = {"model_id": model["id"], "calib_dataset_id": data["id"], "val_dataset_id": data["id"], "trials": 2}
        cancelled = c.post("/jobs", json=body).json()["id"]
        assert c.post(f"/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
        # A finished job whose candidate's final timings landed over the budget (a worker stores such a row
        # when the scatter between processes puts the final median over it): the page says so, in red.
        # Stored before any worker runs, so none claims it.
        over = c.post("/jobs", json={**body, "max_latency_ratio": 0.24}).json()["id"]
        with session_factory(make_engine(f"sqlite:///{server.data_dir / 'slimconv.db'}")).begin() as session:
            job_row = session.get(JobRow, over)
            job_row.status, job_row.phase = "succeeded", "done"
            # ... and stored by an older version, whose requests lacked these fields
            job_row.request = {k: v for k, v in job_row.request.items()
                               if k not in ("final_lr", "final_mixup", "seed", "max_workers", "time_budget_s",
                                            "latency_steps")}
            latency = {"runtime": "onnxruntime", "latency_ms": 0.25, "base_latency_ms": 1.0, "ratio": 0.248,
                       "threads": 1, "batch": 1, "repeats": 5, "ratio_min": 0.240, "ratio_max": 0.255}
            # ... and whose torch timings scattered (search.engine.UNSTEADY_SPREAD): the page shows the warning
            unsteady = {**latency, "runtime": "torch", "ratio": 0.303, "ratio_min": 0.245, "ratio_max": 0.419,
                        "warning": "the 5 timings' ratios spread 0.245-0.419x, 57% of their median"}
            session.add(CandidateRow(job_id=over, index=0, trial=3, report={
                "plan": {}, "flops": 1000, "params": 10, "latency": [latency, unsteady], "accuracy": {},
                "latency_budget": {"max_latency": 0.24, "ratio": 0.248, "within": False, "verified_in_search": 0.226,
                                   "verified_timings": 3}}))
            # ... and a candidate held to a latency step under the job's budget (picked inside it)
            session.add(CandidateRow(job_id=over, index=1, trial=4, report={
                "plan": {}, "flops": 900, "params": 9, "latency": [{**latency, "ratio": 0.19}], "accuracy": {},
                "latency_budget": {"max_latency": 0.18, "job_max_latency": 0.24, "ratio": 0.19, "within": False,
                                   "verified_in_search": 0.176}}))
        failed = c.post("/jobs", json=body).json()["id"]
        blob = server.data_dir / "blobs" / data["sha256"][:2] / f"{data['sha256']}.npz"
        blob.unlink()  # the job cannot read its images: it fails in the worker
        server.start_worker()
        job = server.wait_job(failed, timeout=300)
        assert job["status"] == "failed" and job["error"]
        page = browser.new_page()
        console = Console(page)
        for job_id, status in ((failed, "failed"), (cancelled, "cancelled")):
            page.goto(f"{server.url}/ui/jobs/{job_id}")
            page.wait_for_selector(f"#job-status .status.{status}")
            page.wait_for_selector("#trial-count:not(:empty)")
            shot(page, f"job-{status}")
            assert bool(page.locator("#job-error").inner_text().strip()) == (status == "failed")
        page.goto(f"{server.url}/ui/jobs/{over}")
        page.wait_for_selector("#candidates tbody tr .budget")
        assert page.locator("#candidates .budget.err").all_inner_texts() == [
            "over the 0.240x budget in these timings (verified at 0.226x, median of 3, in the search)",
            "over the 0.180x step (job budget 0.240x) in these timings (verified at 0.176x, in the search)"]
        assert page.locator("#candidates .unsteady").inner_text() == "torch: " + unsteady["warning"]
        assert page.locator("#job-settings").inner_text() == \
            "blocks DS, SS, IR · 2 trials (1 epoch on 2000 images) · final: 3 candidates, 8 epochs"
        page.goto(server.url + "/")
        page.wait_for_selector(".status.failed")
        page.wait_for_selector(".status.cancelled")
        shot(page, "home-failed-cancelled")
        page.goto(f"{server.url}/ui/models/{model['id']}")
        page.wait_for_selector("#bars rect")
        assert console.errors == []
        page.close()
    finally:
        server.stop()
