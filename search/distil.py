"""Recover accuracy by distillation from the original model: KD on logits, plus cross-entropy with labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DistilSettings:
    """How long and how hard to fine-tune a student."""

    epochs: float = 1.0
    """Passes over the training images (fractions allowed: 0.25 = a quarter of them)."""
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-5
    temperature: float = 2.0
    ce_weight: float = 0.5
    """Weight of cross-entropy on labels, when labels exist."""
    flip: bool = True
    """Random horizontal flips (teacher logits are cached for both orientations)."""
    clip_norm: float = 2.0
    optimizer: str = "adamw"
    """``adamw`` (robust from a least-squares start) or ``sgd`` (Nesterov)."""
    seed: int = 0


@dataclass
class Teacher:
    """The original model's logits on the training images, computed once (and on their mirror images)."""

    logits: torch.Tensor
    flipped: torch.Tensor | None


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, flip: bool = True, batch: int = 256) -> Teacher:
    """Logits of ``teacher`` on normalised NCHW ``images`` (and on their mirror images if ``flip``)."""
    teacher.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([teacher(x[i : i + batch]) for i in range(0, x.shape[0], batch)])

    return Teacher(run(images), run(images.flip(3)) if flip else None)


def distil(
    student: nn.Module,
    images: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor | None,
    settings: DistilSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Fine-tune ``student`` in place to match ``teacher`` on ``images`` (normalised NCHW).

    SGD with Nesterov momentum and a cosine schedule, in ``channels_last`` (faster on CPU).

    Returns:
        The student, in eval mode, contiguous again.
    """
    if settings.epochs <= 0:
        return student.eval()
    gen = torch.Generator().manual_seed(settings.seed)
    n = images.shape[0]
    total = max(1, int(round(settings.epochs * n / settings.batch_size)))
    params = [p for p in student.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=total, pct_start=0.15)
    student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    student.train()
    t = settings.temperature
    order = torch.randperm(n, generator=gen)
    cursor = 0
    for step in range(total):
        if cursor + settings.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        x, target = images[idx], teacher.logits[idx]
        if settings.flip and teacher.flipped is not None:
            mirror = torch.rand(idx.shape[0], generator=gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
            target = torch.where(mirror[:, None], teacher.flipped[idx], target)
        out = student(x.contiguous(memory_format=torch.channels_last))
        loss = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(target / t, 1), reduction="batchmean", log_target=True) * t * t
        if labels is not None and settings.ce_weight > 0:
            loss = loss + settings.ce_weight * F.cross_entropy(out, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation diverged at step {step} (loss {float(loss)})")
        nn.utils.clip_grad_norm_(params, settings.clip_norm)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step + 1, total)
    student.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return student.eval()
