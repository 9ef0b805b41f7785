"""Starting plans for the study: a greedy plan from per-site sensitivity, and a multiple-choice knapsack.

The knapsack follows LANA (Molchanov et al. 2022): choose one option per site to minimise the summed
per-site sensitivity subject to the summed per-site latency staying under the budget, solved exactly
by dynamic programming over discretised latency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from search.plan import KEEP, BlockChoice, Plan
from search.sites import Site

Table = dict[str, dict[str, float]]


def _conv_budget(base_ms: float, table: Table, target_ms: float) -> float:
    """Latency left for the conv sites once the rest of the network is paid for."""
    return target_ms - (base_ms - sum(row["keep"] for row in table.values()))


def greedy_plan(
    sites: Sequence[Site], options: dict[str, list[BlockChoice]], sensitivity: Table, table: Table,
    base_ms: float, target_ms: float,
) -> Plan:
    """From all-keep, repeatedly take the swap that saves the most latency per unit of added sensitivity."""
    current = {s.name: KEEP for s in sites}
    predicted = base_ms
    while predicted > target_ms:
        best = _best_swap(
            current, sites, options, sensitivity,
            lambda name, now, choice: table[name][now.key] - table[name][choice.key],
        )
        if best is None:
            break
        name, choice = best
        predicted -= table[name][current[name].key] - table[name][choice.key]
        current[name] = choice
    return {k: v for k, v in current.items() if v.kind != "keep"}


def knapsack_plan(
    sites: Sequence[Site], options: dict[str, list[BlockChoice]], sensitivity: Table, table: Table,
    base_ms: float, target_ms: float, bins: int = 400,
) -> Plan | None:
    """Minimum total sensitivity with predicted latency <= ``target_ms``; ``None`` if nothing fits.

    Sensitivities below zero count as zero (a KL divergence is not negative; below zero is rounding),
    and of equally sensitive plans the one predicted fastest wins: an exact but slower swap (SS of a
    3-channel first conv at rank >= 9) must not beat keeping the conv on float noise."""
    capacity = _conv_budget(base_ms, table, target_ms)
    if capacity <= 0:
        return None
    step = capacity / bins
    inf = math.inf
    # dp[j]: least sensitivity with weight exactly j bins (rounded up), plus the choices that got there.
    dp: list[float] = [0.0] + [inf] * bins
    picks: list[list[BlockChoice]] = [[] for _ in range(bins + 1)]
    for site in sites:
        items = [
            (math.ceil(table[site.name][c.key] / step - 1e-9),
             max(sensitivity.get(site.name, {}).get(c.key, 0.0 if c.kind == "keep" else inf), 0.0), c)
            for c in options[site.name]
            if c.key in table[site.name]
        ]
        new: list[float] = [inf] * (bins + 1)
        new_picks: list[list[BlockChoice]] = [[] for _ in range(bins + 1)]
        for j in range(bins + 1):
            if dp[j] == inf:
                continue
            for weight, cost, choice in items:
                k = j + weight
                if k <= bins and dp[j] + cost < new[k]:
                    new[k] = dp[j] + cost
                    new_picks[k] = [*picks[j], choice]
        dp, picks = new, new_picks
    best = min(range(bins + 1), key=lambda j: dp[j])
    if dp[best] == inf:
        return None
    return {s.name: c for s, c in zip(sites, picks[best], strict=True) if c.kind != "keep"}


def repair_plan(
    plan: Plan, sites: Sequence[Site], options: dict[str, list[BlockChoice]], sensitivity: Table, table: Table,
    block_flops: dict[str, dict[str, int]], base_ms: float, base_flops: int,
    target_ms: float | None, max_flops: int | None,
) -> Plan | None:
    """Bring an over-budget plan inside the FLOP and predicted-latency budgets by the cheapest swaps.

    Each step takes the swap (to a DS/SS option or keep, whose sensitivity is known) that removes the
    most budget excess per unit of added sensitivity. ``None`` if no swap helps any more.
    """
    current = {s.name: plan.get(s.name, KEEP) for s in sites}

    def totals() -> tuple[float, int]:
        ms = base_ms + sum(table[n][c.key] - table[n]["keep"] for n, c in current.items())
        flops = base_flops + sum(block_flops[n][c.key] - block_flops[n]["keep"] for n, c in current.items())
        return ms, flops

    for _ in range(4 * len(sites) * 16):
        ms, flops = totals()
        over_ms = max(ms - target_ms, 0.0) / base_ms if target_ms is not None else 0.0
        over_flops = max(flops - max_flops, 0) / base_flops if max_flops is not None else 0.0
        if over_ms <= 0 and over_flops <= 0:
            return {k: v for k, v in current.items() if v.kind != "keep"}
        def gain(name: str, now: BlockChoice, choice: BlockChoice, over_ms: float = over_ms,
                 over_flops: float = over_flops) -> float:
            total = 0.0
            if over_ms > 0:
                total += (table[name][now.key] - table[name][choice.key]) / base_ms
            if over_flops > 0:
                total += (block_flops[name][now.key] - block_flops[name][choice.key]) / base_flops
            return total

        best = _best_swap(current, sites, options, sensitivity, gain)
        if best is None:
            return None
        current[best[0]] = best[1]
    return None


def _best_swap(
    current: dict[str, BlockChoice], sites: Sequence[Site], options: dict[str, list[BlockChoice]],
    sensitivity: Table, gain: Callable[[str, BlockChoice, BlockChoice], float],
) -> tuple[str, BlockChoice] | None:
    """The swap with the largest positive ``gain`` per unit of added sensitivity (options of known sensitivity)."""
    best: tuple[float, str, BlockChoice] | None = None
    for site in sites:
        now = current[site.name]
        for choice in options[site.name]:
            if choice.key not in sensitivity.get(site.name, {}) or choice == now:
                continue
            value = gain(site.name, now, choice)
            if value <= 0:
                continue
            cost = max(sensitivity[site.name][choice.key] - sensitivity[site.name].get(now.key, 0.0), 0.0)
            score = value / (cost + 1e-6)
            if best is None or score > best[0]:
                best = (score, site.name, choice)
    return None if best is None else (best[1], best[2])
