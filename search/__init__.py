"""Slim a trained CNN: load it safely, find conv sites, fit replacement blocks, measure, export.

Knows nothing about HTTP; settings come in as arguments and dataclasses.
"""

from search._pt2_reader import ReaderLimits
from search.costs import count_flops, count_params
from search.data import ImageSet, load_npz
from search.distil import DistilSettings, distil, teacher_logits
from search.engine import accuracy, agreement, analyse, export_candidate, predict
from search.errors import (
    BudgetInfeasibleError,
    InvalidInputError,
    RuntimeUnavailableError,
    SearchError,
    UnsafeArchiveError,
    UnsupportedModelError,
)
from search.latency import (
    Calibration,
    LatencyResult,
    LatencySpec,
    fit_calibration,
    measure_files,
    measure_models,
    predict_latency,
    scale_table,
    site_latency_table,
)
from search.loading import BaseModel, from_module, load_pt2, load_safetensors
from search.plan import BlockChoice, Plan, plan_from_dict, plan_from_json, plan_to_dict, plan_to_json
from search.sites import Site, SkippedConv, find_sites
from search.space import site_options, suggest_plan
from search.study import SlimConfig, SlimJob, run_slim
from search.transfer import BlockFitter, FitSettings, apply_plan, build_block, fit_block

__all__ = [
    "BaseModel",
    "BlockChoice",
    "BlockFitter",
    "BudgetInfeasibleError",
    "Calibration",
    "DistilSettings",
    "ImageSet",
    "FitSettings",
    "InvalidInputError",
    "LatencyResult",
    "LatencySpec",
    "Plan",
    "ReaderLimits",
    "RuntimeUnavailableError",
    "SearchError",
    "Site",
    "SkippedConv",
    "SlimConfig",
    "SlimJob",
    "UnsafeArchiveError",
    "UnsupportedModelError",
    "accuracy",
    "agreement",
    "analyse",
    "apply_plan",
    "build_block",
    "count_flops",
    "count_params",
    "distil",
    "export_candidate",
    "find_sites",
    "fit_calibration",
    "fit_block",
    "from_module",
    "load_npz",
    "load_pt2",
    "load_safetensors",
    "measure_files",
    "measure_models",
    "plan_from_dict",
    "plan_from_json",
    "plan_to_dict",
    "plan_to_json",
    "predict",
    "predict_latency",
    "run_slim",
    "scale_table",
    "site_latency_table",
    "site_options",
    "suggest_plan",
    "teacher_logits",
]
