"""Build a replacement block for a conv site and carry the conv's weights over into it.

- ``ds``: per-input-channel SVD of the kernel ("network decoupling", Guo et al. 2018), then a
  least-squares refit of the pointwise weights and bias on calibration activations.
- ``ss``: SVD of the kernel reshaped to ``(cin*kh, cout*kw)``, then a least-squares refit of the 1xk.
- ``ir``: a short layer-wise distillation (MSE to the conv's output on calibration activations).

Fitted blocks are cached per ``(site, choice)``: no trial fits the same block twice.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from models import DepthwiseSeparable, InvertedResidual, SpatialSeparable
from search.errors import InvalidInputError
from search.plan import BlockChoice, Plan
from search.sites import Site, choice_problem, ir_padding


def _build_ds(site: Site, choice: BlockChoice) -> nn.Module:
    assert choice.depth_multiplier is not None
    return DepthwiseSeparable(
        site.in_channels, site.out_channels, site.kernel, site.stride, site.padding, site.dilation,
        depth_multiplier=choice.depth_multiplier, bias=True,
    )


def _build_ss(site: Site, choice: BlockChoice) -> nn.Module:
    assert choice.rank is not None
    return SpatialSeparable(
        site.in_channels, site.out_channels, site.kernel, site.stride, site.padding, site.dilation,
        rank=choice.rank, bias=True,
    )


def _build_ir(site: Site, choice: BlockChoice) -> nn.Module:
    assert choice.kernel is not None and choice.exp_ratio is not None
    padding = ir_padding(site, choice.kernel)
    assert padding is not None
    return InvertedResidual(
        site.in_channels, site.out_channels, choice.kernel, site.stride, padding, site.dilation,
        exp_ratio=choice.exp_ratio,
    )


def _build_keep(site: Site, choice: BlockChoice) -> nn.Module:
    return nn.Conv2d(
        site.in_channels, site.out_channels, site.kernel, site.stride, site.padding, site.dilation,
        bias=site.bias,
    )


_BUILDERS: dict[str, Callable[[Site, BlockChoice], nn.Module]] = {
    "keep": _build_keep,
    "ds": _build_ds,
    "ss": _build_ss,
    "ir": _build_ir,
}


def build_block(site: Site, choice: BlockChoice) -> nn.Module:
    """A freshly initialised module for ``choice`` at ``site`` (``keep``: a plain conv).

    Raises:
        InvalidInputError: the choice cannot keep the site's output shape.
    """
    problem = choice_problem(site, choice)
    if problem is not None:
        raise InvalidInputError(f"{site.name}: {problem}")
    return _BUILDERS[choice.kind](site, choice)


# -- SVD initialisation ------------------------------------------------------------------------


@torch.no_grad()
def init_ds_from_conv(block: DepthwiseSeparable, conv: nn.Conv2d) -> None:
    """Per input channel c, ``W[:, c]`` (cout x k²) = U S Vᵀ; depthwise filters from V, pointwise from U S."""
    w = conv.weight.detach().double()
    cout, cin, kh, kw = w.shape
    m = block.conv_dw.out_channels // cin
    per_channel = w.permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)
    u, s, vh = torch.linalg.svd(per_channel, full_matrices=False)  # (cin,cout,q) (cin,q) (cin,q,k²)
    q = s.shape[1]
    use = min(m, q)
    root = s[:, :use].sqrt()
    dw = torch.zeros(cin, m, kh * kw, dtype=torch.float64)
    dw[:, :use] = vh[:, :use] * root[:, :, None]
    pw = torch.zeros(cout, cin, m, dtype=torch.float64)
    pw[:, :, :use] = (u[:, :, :use] * root[:, None, :]).permute(1, 0, 2)
    block.conv_dw.weight.copy_(dw.reshape(cin * m, 1, kh, kw))
    block.conv_pw.weight.copy_(pw.reshape(cout, cin * m, 1, 1))
    if block.conv_pw.bias is not None:
        block.conv_pw.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(cout))


@torch.no_grad()
def init_ss_from_conv(block: SpatialSeparable, conv: nn.Conv2d) -> None:
    """SVD of the kernel as ``(cin*kh, cout*kw)``: the kx1 filters from U, the 1xk from S Vᵀ."""
    w = conv.weight.detach().double()
    cout, cin, kh, kw = w.shape
    r = block.conv_v.out_channels
    matrix = w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    use = min(r, s.shape[0])
    root = s[:use].sqrt()
    vertical = torch.zeros(r, cin * kh, dtype=torch.float64)
    vertical[:use] = (u[:, :use] * root).T
    horizontal = torch.zeros(r, cout * kw, dtype=torch.float64)
    horizontal[:use] = vh[:use] * root[:, None]
    block.conv_v.weight.copy_(vertical.reshape(r, cin, kh, 1))
    block.conv_h.weight.copy_(horizontal.reshape(r, cout, kw).permute(1, 0, 2).reshape(cout, r, 1, kw))
    if block.conv_h.bias is not None:
        block.conv_h.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(cout))


# -- least squares and distillation ------------------------------------------------------------


@torch.no_grad()
def refit_last_conv(
    last: nn.Conv2d, features: torch.Tensor, target: torch.Tensor, max_rows: int = 40_000, seed: int = 0
) -> None:
    """Least-squares refit of ``last``'s weights and bias so that ``last(features) ≈ target``.

    ``last`` must have ``groups == 1``. Rows are output positions, subsampled to ``max_rows``.
    """
    if isinstance(last.padding, str):
        raise ValueError("refit needs explicit padding")
    cols = F.unfold(features.double(), last.kernel_size, last.dilation, last.padding, last.stride)
    n, k, positions = cols.shape
    rows = cols.permute(0, 2, 1).reshape(n * positions, k)
    y = target.double().flatten(2).permute(0, 2, 1).reshape(n * positions, -1)
    if rows.shape[0] > max_rows:
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        rows, y = rows[pick], y[pick]
    has_bias = last.bias is not None
    a = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1) if has_bias else rows
    gram = a.T @ a
    ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    gram += ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram, a.T @ y)  # (k [+1], cout)
    weight = solution[:k].T.reshape(last.weight.shape)
    last.weight.copy_(weight)
    if has_bias:
        assert last.bias is not None
        last.bias.copy_(solution[k])


def _front(block: nn.Module) -> tuple[nn.Module, nn.Conv2d]:
    if isinstance(block, DepthwiseSeparable):
        return nn.Sequential(block.conv_dw, block.bn1, block.act1), block.conv_pw
    if isinstance(block, SpatialSeparable):
        return block.conv_v, block.conv_h
    raise TypeError(f"no least-squares refit for {type(block).__name__}")


def distil_block(
    block: nn.Module, inputs: torch.Tensor, target: torch.Tensor, steps: int, batch: int = 32, seed: int = 0
) -> None:
    """Fit ``block`` to ``target`` by MSE with Adam, then recompute its batch-norm statistics."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    scale = target.pow(2).mean().clamp_min(1e-12)
    block.train()
    for _ in range(steps):
        idx = torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
        loss = F.mse_loss(block(inputs[idx]), target[idx]) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    recalibrate_bn(block, inputs, batch)
    block.eval()


@torch.no_grad()
def recalibrate_bn(module: nn.Module, inputs: torch.Tensor, batch: int = 64) -> None:
    """Recompute batch-norm running statistics as exact averages over ``inputs``."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for start in range(0, inputs.shape[0], batch):
        module(inputs[start : start + batch])
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    module.eval()


@torch.no_grad()
def relative_error(block: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> float:
    """``||block(x) - target||² / ||target||²``."""
    out = torch.cat([block(inputs[i : i + 64]) for i in range(0, inputs.shape[0], 64)])
    return float((out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))


# -- the fitter --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSettings:
    """How blocks are fitted to their conv."""

    calib_images: int = 256
    least_squares: bool = True
    ir_steps: int = 80
    max_rows: int = 40_000
    seed: int = 0


@dataclass
class FittedBlock:
    module: nn.Module
    fit_error: float
    """Relative squared error against the conv on calibration activations held out from the fit."""


def fit_block(
    site: Site,
    choice: BlockChoice,
    conv: nn.Conv2d,
    inputs: torch.Tensor | None,
    settings: FitSettings = FitSettings(),  # noqa: B008 - frozen dataclass
) -> FittedBlock:
    """Build ``choice`` for ``site`` and carry ``conv``'s weights over.

    Args:
        site: the site's geometry.
        choice: the block to build.
        conv: the original convolution.
        inputs: calibration activations at the site's input, ``(N, cin, H, W)``; ``None`` means
            SVD initialisation only (no refit; an ``ir`` block then stays randomly initialised).
        settings: fitting settings.
    """
    block = build_block(site, choice)
    if choice.kind == "keep":
        block.load_state_dict(conv.state_dict())
        return FittedBlock(block.eval(), 0.0)
    torch.manual_seed(settings.seed)
    if isinstance(block, DepthwiseSeparable):
        init_ds_from_conv(block, conv)
    elif isinstance(block, SpatialSeparable):
        init_ss_from_conv(block, conv)
    if inputs is None:
        return FittedBlock(block.eval(), float("nan"))
    with torch.no_grad():
        target = torch.cat([conv(inputs[i : i + 64]) for i in range(0, inputs.shape[0], 64)])
    n_fit = max(1, int(inputs.shape[0] * 0.8)) if inputs.shape[0] > 4 else inputs.shape[0]
    fit_x, fit_y = inputs[:n_fit], target[:n_fit]
    check_x, check_y = (inputs[n_fit:], target[n_fit:]) if n_fit < inputs.shape[0] else (fit_x, fit_y)
    if isinstance(block, (DepthwiseSeparable, SpatialSeparable)):
        if settings.least_squares:
            before = copy.deepcopy(block.state_dict())
            error_before = relative_error(block, check_x, check_y)
            front, last = _front(block)
            with torch.no_grad():
                features = front(fit_x)
            refit_last_conv(last, features, fit_y, settings.max_rows, settings.seed)
            if relative_error(block, check_x, check_y) > error_before:
                block.load_state_dict(before)  # the refit overfitted: keep the SVD weights
    else:
        distil_block(block, fit_x, fit_y, settings.ir_steps, seed=settings.seed)
    block.eval()
    return FittedBlock(block, relative_error(block, check_x, check_y))


def _file_key(site: str, choice: BlockChoice) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{site}__{choice.key}")


class BlockFitter:
    """Fits blocks for the sites of one model on one calibration set, caching every fit.

    With ``cache_dir`` the fits are kept on disk as safetensors too, so other processes working on
    the same job (and a resumed job) reuse them.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        sites: list[Site],
        calib: torch.Tensor | None,
        settings: FitSettings = FitSettings(),  # noqa: B008 - frozen dataclass
        cache_dir: str | Path | None = None,
    ) -> None:
        self.module = module
        self.sites = {s.name: s for s in sites}
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache: dict[tuple[str, BlockChoice], FittedBlock] = {}
        self._inputs: dict[str, torch.Tensor] | None = None
        self._calib = calib[: settings.calib_images] if calib is not None else None
        self.fits = 0

    def site_inputs(self) -> dict[str, torch.Tensor]:
        """Calibration activations at every site's input (computed once)."""
        if self._inputs is None:
            self._inputs = {}
            if self._calib is not None:
                self._inputs = collect_site_inputs(self.module, list(self.sites), self._calib)
        return self._inputs

    def get(self, site_name: str, choice: BlockChoice) -> FittedBlock:
        """The fitted block (a fresh copy, safe to train) for ``choice`` at ``site_name``."""
        if site_name not in self.sites:
            raise InvalidInputError(f"unknown site {site_name!r}")
        key = (site_name, choice)
        if key not in self._cache:
            self._cache[key] = self._load_or_fit(site_name, choice)
        cached = self._cache[key]
        return FittedBlock(copy.deepcopy(cached.module), cached.fit_error)

    def _load_or_fit(self, site_name: str, choice: BlockChoice) -> FittedBlock:
        from safetensors.torch import load_file, save_file

        site = self.sites[site_name]
        path = self.cache_dir / f"{_file_key(site_name, choice)}.safetensors" if self.cache_dir else None
        if path is not None and path.exists():
            block = build_block(site, choice)
            state = load_file(str(path))
            error = float(state.pop("__fit_error__").item())
            block.load_state_dict(state)
            return FittedBlock(block.eval(), error)
        conv = self.module.get_submodule(site_name)
        assert isinstance(conv, nn.Conv2d)
        inputs = self.site_inputs().get(site_name)
        fitted = fit_block(site, choice, conv, inputs, self.settings)
        self.fits += 1
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in fitted.module.state_dict().items()}
            state["__fit_error__"] = torch.tensor(fitted.fit_error)
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp))
            tmp.replace(path)
        return fitted


@torch.no_grad()
def collect_site_inputs(
    module: nn.Module, site_names: list[str], images: torch.Tensor, batch: int = 64
) -> dict[str, torch.Tensor]:
    """Run ``images`` (normalised NCHW) through the model, keeping the input of each named conv."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in site_names}
    hooks = []
    for name in site_names:
        def hook(m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            store[name].append(args[0].detach().clone())
        hooks.append(module.get_submodule(name).register_forward_pre_hook(hook))
    try:
        module.eval()
        for start in range(0, images.shape[0], batch):
            module(images[start : start + batch])
    finally:
        for handle in hooks:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in store.items() if chunks}


def apply_plan(module: fx.GraphModule, plan: Plan, fitter: BlockFitter) -> fx.GraphModule:
    """A new model with every site in ``plan`` replaced by its fitted block; ``module`` is untouched.

    Raises:
        InvalidInputError: a site in the plan is unknown or the choice does not fit it.
    """
    new = copy.deepcopy(module)
    for site_name, choice in sorted(plan.items()):
        if choice.kind == "keep":
            continue
        new.set_submodule(site_name, fitter.get(site_name, choice).module)
    return new.eval()
