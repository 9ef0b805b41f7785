"""Request and response bodies (pydantic); every field says its unit."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.distil import DistilSettings
from search.study import (
    FAR_PLAN_DROP,
    FAR_PLAN_LR,
    FINAL_EPOCHS,
    MAX_RATIO,
    TRIAL_EPOCHS,
    SlimConfig,
    latency_steps_problem,
)

Runtime = Literal["onnxruntime", "torch", "cuda"]
BlockKind = Literal["ds", "ss", "ir"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorOut(BaseModel):
    detail: str = Field(description="what was wrong with the request")


class SiteOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(description="the conv's module path in the model")
    in_channels: int
    out_channels: int
    kernel: list[int] = Field(description="kernel height, width")
    flops: int = Field(description="FLOPs of this conv for one image (multiply-adds counted as 2)")
    flops_share: float = Field(description="fraction of the whole model's FLOPs (0..1)")


class LatencyOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    runtime: str = Field(description="onnxruntime, torch (eager) or cuda")
    threads: int = Field(description="intra-op threads")
    batch: int = Field(description="images per call")
    device: str = Field(description="the processor or GPU it was measured on")
    median_ms: float = Field(description="median latency of one call, milliseconds")
    runs: int = Field(description="timed runs behind the median")


class ModelOut(BaseModel):
    id: str
    name: str
    sha256: str = Field(description="SHA-256 of the uploaded archive")
    size_bytes: int = Field(description="size of the uploaded archive, bytes")
    input_shape: list[int] = Field(description="C, H, W of one input image")
    mean: list[float] | None = Field(description="per-channel mean subtracted from images scaled to [0, 1]")
    std: list[float] | None = Field(description="per-channel std images scaled to [0, 1] are divided by")
    flops: int = Field(description="FLOPs for one image (multiply-adds counted as 2)")
    params: int = Field(description="number of parameters")
    sites: list[SiteOut] = Field(description="conv layers the search may replace, in order")
    skipped: list[dict[str, Any]] = Field(description="convs kept as they are, with the reason")
    min_flops: dict[str, dict[str, int]] = Field(
        description="per site and block type, the fewest FLOPs reachable (one image)")
    latency_status: Literal["pending", "measuring", "measured", "failed", "skipped"] = Field(
        description="baseline latency is measured by a worker after upload")
    latency: list[LatencyOut] = Field(description="baseline latency on the server's runtimes (median)")
    latency_error: str | None = None
    created_at: dt.datetime


class ItemsOut(BaseModel):
    items: list[Any]


class DatasetOut(BaseModel):
    id: str
    name: str
    sha256: str = Field(description="SHA-256 of the stored .npz")
    size_bytes: int = Field(description="size of the stored .npz, bytes")
    count: int = Field(description="number of images")
    shape: list[int] = Field(description="H, W, C of every image (uint8)")
    has_labels: bool = Field(description="whether the images carry class labels")
    classes: list[str] | None = Field(description="class folder names (zip uploads), in label order")
    created_at: dt.datetime


class JobIn(BaseModel):
    """A slimming job. Budgets: give a ratio of the base model's figure, an absolute figure, or both."""

    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(description="id of an uploaded model")
    calib_dataset_id: str = Field(description="dataset for weight fitting and distillation")
    val_dataset_id: str = Field(description="dataset the search scores trials on")
    holdout_dataset_id: str | None = Field(None, description="dataset scored once, after the search")
    max_flops_ratio: float | None = Field(None, gt=0, le=MAX_RATIO, description="FLOP budget, fraction of the base")
    max_latency_ratio: float | None = Field(None, gt=0, le=MAX_RATIO,
                                            description="latency budget, fraction of the base on `runtime`")
    max_flops: int | None = Field(None, gt=0, description="FLOP budget, FLOPs for one image")
    max_latency_ms: float | None = Field(None, gt=0, lt=1e6, description="latency budget on `runtime`, ms")
    runtime: Runtime = Field("onnxruntime", description="runtime latency is measured on")
    threads: int = Field(SlimConfig.threads, ge=1, le=256, description="intra-op threads for latency measurements")
    batch: int = Field(SlimConfig.batch, ge=1, le=4096, description="images per call for latency measurements")
    blocks: list[BlockKind] = Field(["ds", "ss", "ir"], min_length=1, description="allowed replacement blocks")
    trials: int = Field(SlimConfig.trials, ge=1, le=10_000, description="trials to run (plans measured and scored)")
    time_budget_s: float | None = Field(None, gt=0, le=7 * 86400,
                                        description="wall-clock budget of the whole job, s: no trial starts after 40% "
                                                    "of it, and the final distillations are shortened to fit")
    final_candidates: int = Field(SlimConfig.final_candidates, ge=1, le=20, description=(
        "Pareto plans given the long distillation, at most: the most accurate inside the budgets, then the most "
        "accurate inside each of `latency_steps`, then each the most accurate at least 10% faster than the fastest pick"))
    latency_steps: list[Annotated[float, Field(gt=0, le=MAX_RATIO)]] = Field([], max_length=10, description=(
        "further latency ratios under the latency budget: the most accurate plan inside each is a final candidate "
        "too (e.g. budget 0.20 with steps [0.18]); needs a latency budget and a final candidate for each"))
    final_epochs: float = Field(FINAL_EPOCHS, ge=0, le=500,
                                description="epochs of distillation for each final candidate")
    final_mixup: float = Field(DistilSettings.mixup, ge=0, le=10, description=(
        "mixup strength (Beta alpha) in the final distillation; 0 = none"))
    final_lr: float | None = Field(None, gt=0, le=1, description=(
        f"peak learning rate of every final candidate's distillation (one-cycle); unset: {DistilSettings.lr:g}, or "
        f"{FAR_PLAN_LR:g} for a plan whose trial scored {FAR_PLAN_DROP:g} points or more under the base (far from the "
        "original: 3e-3 did better on such a vgg_seed plan over 30-100 epochs, and worse over 30 on a plan close to it)"))
    trial_epochs: float = Field(TRIAL_EPOCHS, ge=0, le=50, description="epochs of distillation inside each trial")
    trial_images: int = Field(SlimConfig.trial_images, ge=1, le=1_000_000,
                              description="calibration images a trial fine-tunes on")
    latency_rounds: int = Field(SlimConfig.latency_rounds, ge=1, le=100,
                                description="rounds of interleaved timing per measurement")
    latency_runs: int = Field(SlimConfig.latency_runs, ge=1, le=10_000, description="timed runs per round")
    latency_warmup: int = Field(SlimConfig.latency_warmup, ge=0, le=10_000, description="untimed runs before timing")
    final_timing_repeats: int = Field(SlimConfig.final_timing_repeats, ge=1, le=50, description=(
        "times each final candidate is timed on each runtime, each in a fresh process (median and range reported)"))
    eval_runtimes: list[Runtime] = Field(["onnxruntime", "torch"],
                                         description="runtimes each final candidate is also timed on")
    seed: int = Field(SlimConfig.seed, ge=0, le=2**31 - 1, description="sampler seed")
    max_workers: int = Field(1, ge=1, le=64, description=(
        "workers that may run this job's trials at once, sharing its study; each times latency on its own "
        "`threads`, so keep workers x threads within the machine's cores or the timings disturb each other"))

    @model_validator(mode="after")
    def _unique_blocks(self) -> JobIn:
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError("blocks lists a type twice")
        return self

    @model_validator(mode="after")
    def _latency_steps_fit(self) -> JobIn:
        if problem := latency_steps_problem(self.latency_steps, self.max_latency_ratio, self.max_latency_ms,
                                            self.final_candidates):
            raise ValueError(problem)
        return self


def with_defaults(request: dict[str, Any]) -> dict[str, Any]:
    """A stored job request with the fields it lacks (stored by a version without them) at today's defaults."""
    defaults = {name: f.get_default(call_default_factory=True) for name, f in JobIn.model_fields.items()
                if not f.is_required()}
    return {**defaults, **request}


class ProgressOut(BaseModel):
    trials_done: int = Field(description="trials finished (measured), counted against `trials_planned`")
    trials_planned: int
    phase: str = Field(description="what the job is doing now")
    eta_s: float | None = Field(description="estimated seconds until the search phase ends")


class LatencyBudgetOut(BaseModel):
    max_latency: float = Field(description="the latency budget the candidate is held to, a fraction of the base's "
                               "latency: the job's (the tighter of max_latency_ratio and max_latency_ms over the base's "
                               "median), or the tightest of its latency_steps the candidate's verification timings are inside "
                               "(in 4 of 5, or all of 3)")
    job_max_latency: float | None = Field(None, description="the job's latency budget, where max_latency is a latency step")
    ratio: float = Field(description="the candidate's median latency over the base's in its final timings (job runtime)")
    within: bool = Field(description="ratio <= max_latency: final timings are new samples and may land over")
    verified_in_search: float | None = Field(
        description="median ratio of the timings that verified the plan during the search (None if it was not verified)")
    verified_timings: int | None = Field(
        None, description="how many fresh-process timings verified the plan during the search (0 if it was not verified)")


class CandidateOut(BaseModel):
    id: int = Field(description="candidate number within the job")
    trial: int = Field(description="the study trial it comes from")
    plan: dict[str, dict[str, Any]] = Field(description="per-site choice; sites not listed are kept")
    flops: int = Field(description="FLOPs for one image")
    params: int
    latency_ms: float | None = Field(description="median latency on the job's runtime, threads and batch, ms")
    base_latency_ms: float | None = Field(description="the base model's median latency, same runtime, ms")
    latency: list[dict[str, Any]] = Field(description=(
        "latency on every runtime timed (median, ms, with ratio; `warning` when its repeated timings scattered)"))
    val_accuracy: float | None = Field(description="validation accuracy, percent (None without labels)")
    holdout_accuracy: float | None = Field(description="held-out accuracy, percent (None without held-out labels)")
    val_agreement: float | None = Field(None, description="agreement with the base on validation, percent")
    holdout_agreement: float | None = Field(None, description="agreement with the base on held-out, percent")
    latency_budget: LatencyBudgetOut | None = Field(
        None, description="where the final timings fell against the job's latency budget (None without a budget)")
    downloads: dict[str, str] = Field(description="download URLs per format")


class JobOut(BaseModel):
    id: str
    model_id: str
    status: JobStatus
    request: dict[str, Any]
    progress: ProgressOut
    candidates: list[CandidateOut]
    base: dict[str, Any] | None = Field(description="base model figures measured by the job")
    best: dict[str, Any] | None = Field(
        description="fastest trial inside the budgets so far: trial, latency_ratio (of the base), val_score (%)")
    error: str | None
    attempts: int = Field(description="times a worker started this job (more than 1 after a takeover)")
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class CreatedOut(BaseModel):
    id: str
    status: JobStatus


class TrialOut(BaseModel):
    number: int
    state: str = Field(description="COMPLETE, PRUNED (over a budget or screened) or FAIL")
    plan: dict[str, dict[str, Any]]
    values: list[float] | None = Field(description="[validation score (%), latency ratio] for complete trials")
    user_attrs: dict[str, Any] = Field(description="everything measured in the trial; `duplicate_of` names the trial "
                                       "whose outcome a plan proposed again took (it was not measured again)")
