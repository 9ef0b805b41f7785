"""The search space: per conv site, keep it or one of the block choices; a pure function of a trial."""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from search.errors import InvalidInputError
from search.plan import KEEP, BlockChoice, Plan
from search.sites import Site, choice_problem

BLOCK_KINDS = ("ds", "ss", "ir")
DEPTH_MULTIPLIERS = (1, 2, 4)
RANK_DIVISORS = (2, 4, 8, 16)
EXP_RATIOS = (1.0, 3.0, 6.0)
IR_KERNELS = (3, 5)


def site_options(site: Site, blocks: Sequence[str] = BLOCK_KINDS) -> list[BlockChoice]:
    """Every valid choice at ``site``: keep, DS(m in 1,2,4), SS(r in cout/2../16), IR(t in 1,3,6; k in 3,5)."""
    unknown = set(blocks) - set(BLOCK_KINDS)
    if unknown:
        raise InvalidInputError(f"unknown block types {sorted(unknown)}; known: {', '.join(BLOCK_KINDS)}")
    options = [KEEP]
    if "ds" in blocks:
        options += [BlockChoice("ds", depth_multiplier=m) for m in DEPTH_MULTIPLIERS]
    if "ss" in blocks:
        ranks = sorted({max(1, site.out_channels // d) for d in RANK_DIVISORS}, reverse=True)
        options += [BlockChoice("ss", rank=r) for r in ranks]
    if "ir" in blocks:
        options += [BlockChoice("ir", exp_ratio=t, kernel=k) for t in EXP_RATIOS for k in IR_KERNELS]
    return [c for c in options if choice_problem(site, c) is None]


def param_name(site: Site) -> str:
    return f"site:{site.name}"


def suggest_plan(trial: optuna.trial.BaseTrial, sites: Sequence[Site], options: dict[str, list[BlockChoice]]) -> Plan:
    """Ask ``trial`` for one choice per site (sites with a single option are kept without asking)."""
    plan: Plan = {}
    for site in sites:
        keys = [c.key for c in options[site.name]]
        if len(keys) < 2:
            continue
        key = trial.suggest_categorical(param_name(site), keys)
        choice = BlockChoice.parse(str(key))
        if choice.kind != "keep":
            plan[site.name] = choice
    return plan


def plan_params(plan: Plan, sites: Sequence[Site], options: dict[str, list[BlockChoice]]) -> dict[str, str]:
    """The trial parameters that make ``suggest_plan`` return ``plan`` (for ``enqueue_trial``)."""
    params = {}
    for site in sites:
        if len(options[site.name]) < 2:
            continue
        choice = plan.get(site.name, KEEP)
        if choice not in options[site.name]:
            raise InvalidInputError(f"{site.name}: {choice.key} is not an option here")
        params[param_name(site)] = choice.key
    return params
