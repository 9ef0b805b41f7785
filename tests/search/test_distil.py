"""Distillation: precision choice and the time limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.distil import (
    DistilSettings,
    Teacher,
    _translate,
    distil,
    live_teacher,
    resolve_precision,
    teacher_logits,
)


def _nets() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return teacher, student, torch.randn(256, 3, 16, 16)


@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distillation_brings_the_student_closer(precision: str, shift: int) -> None:
    teacher, student, x = _nets()
    target = teacher_logits(teacher, x)
    assert target.logits is not None
    with torch.no_grad():
        before = (student.eval()(x) - target.logits).pow(2).mean()
    settings = DistilSettings(epochs=8, batch_size=32, lr=3e-3, precision=precision, shift=shift)
    report = distil(student, x, target if shift == 0 else live_teacher(teacher), None, settings)
    with torch.no_grad():
        after = (student(x) - target.logits).pow(2).mean()
    assert not student.training and report.precision == precision
    assert report.steps == 64 and report.epochs == pytest.approx(8.0) and not report.cut_by_time
    assert after < before


def test_auto_precision_is_decided_and_leaves_the_student_as_it_was() -> None:
    _, student, x = _nets()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    settings = resolve_precision(student, x, DistilSettings(batch_size=32))
    assert settings.precision in ("fp32", "bf16")
    for key, value in student.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed by the precision probe"
    with pytest.raises(ValueError, match="precision"):
        DistilSettings(precision="fp8")


def test_time_limit_shortens_the_schedule() -> None:
    teacher, student, x = _nets()
    report = distil(student, x, teacher_logits(teacher, x), None,
                    DistilSettings(epochs=10_000, batch_size=32, precision="fp32"), time_limit_s=1.5)
    assert report.cut_by_time and 8 < report.steps < 10_000 * 8
    assert report.seconds < 10  # generous: catches a limit that is ignored, not a slow machine


def test_teacher_logits_reuse_known_prefix() -> None:
    """Logits given for the first images are taken as they are; only the rest are computed."""
    teacher, _, x = _nets()
    fresh = teacher_logits(teacher, x)
    assert fresh.flipped is not None and fresh.logits.shape == (256, 10)
    marked = Teacher(torch.full((100, 10), 7.0), torch.full((100, 10), -7.0))
    reused = teacher_logits(teacher, x, known=marked)
    assert reused.flipped is not None
    assert torch.equal(reused.logits[:100], marked.logits) and torch.equal(reused.flipped[:100], marked.flipped)
    assert torch.allclose(reused.logits[100:], fresh.logits[100:], atol=1e-5)
    assert torch.allclose(reused.flipped[100:], fresh.flipped[100:], atol=1e-5)
    # Known logits without mirrors cannot serve a run that needs them: everything is computed.
    again = teacher_logits(teacher, x, known=Teacher(marked.logits, None))
    assert torch.allclose(again.logits, fresh.logits, atol=1e-5)
    # More known images than asked for: just the prefix is used.
    assert torch.equal(teacher_logits(teacher, x[:50], flip=False, known=marked).logits, marked.logits[:50])


def test_each_image_is_translated_within_the_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).reshape(16, 3, 8, 8) + 1
    out = _translate(x, 2, gen)
    assert out.shape == x.shape
    offsets = set()
    for i in range(16):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], padded[:, dy : dy + 8, dx : dx + 8])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 1  # each image its own offset


def test_distil_refuses_a_teacher_it_cannot_use() -> None:
    teacher, student, x = _nets()
    with pytest.raises(ValueError, match="live_teacher"):
        distil(student, x, Teacher(torch.zeros(256, 10), None), None, DistilSettings(shift=4))
    with pytest.raises(ValueError, match="teacher_logits"):
        distil(student, x, live_teacher(teacher), None, DistilSettings(shift=0))
    with pytest.raises(ValueError, match="shift"):
        DistilSettings(shift=-1)
