"""Distillation: precision choice and the time limit."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import nn

from search.distil import (
    DistilSettings,
    Teacher,
    _translate,
    distil,
    distil_group,
    live_teacher,
    resolve_precision,
    teacher_logits,
    teacher_runner,
)

distil_module = sys.modules["search.distil"]  # the package exports a function of the same name


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
    for lr in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            DistilSettings(lr=lr)


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


class _Sleepy(nn.Module):
    """A tiny student whose training steps take ``delay(call)`` seconds more, call counted from 1."""

    def __init__(self, delay: Callable[[int], float]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        self.delay = delay
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.delay(self.calls))
        return self.net(x)


def _slow_start() -> _Sleepy:
    """First training steps slow, as set-up and a cold cache make them."""
    return _Sleepy(lambda call: 0.05 if call <= 8 else 0.0)


def _slow_later() -> _Sleepy:
    """Steps six times slower after the 40th, as a machine that gets busy, or a cache that stops
    fitting, makes them."""
    return _Sleepy(lambda call: 0.01 if call <= 40 else 0.06)


def test_a_slow_start_does_not_cut_the_schedule_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit after 8 slow steps shortens the schedule; a later fit sees the steps got faster and
    lengthens it again, so the run does clearly more steps than with the first fit alone."""
    teacher, _, x = _nets()
    target = teacher_logits(teacher, x)
    settings = DistilSettings(epochs=10_000, batch_size=32, precision="fp32")
    steps = {}
    monkeypatch.setattr(distil_module, "PACE_EVERY", 10**9)  # the fits at PACE_STEPS alone
    monkeypatch.setattr(distil_module, "PACE_PARTS", 1)
    for paces in [(8,), (8, 32)]:
        monkeypatch.setattr(distil_module, "PACE_STEPS", paces)
        report = distil(_slow_start(), x, target, None, settings, time_limit_s=4.0)
        assert report.cut_by_time and report.seconds < 12  # generous: catches a limit that is ignored
        steps[paces] = report.steps
    assert steps[(8, 32)] > 1.4 * steps[(8,)]


def test_steps_that_slow_after_the_last_pace_point_do_not_overrun_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitted last at step 32 on 10 ms steps, a 2 s run that then slows to 60 ms a step takes about
    7 s; fitted again every 8 steps, or at each tenth of its schedule, on the steps since the previous
    fit, it ends near 2 s. One thread and a warm-up keep the sleeps, not the machine's load, deciding
    the steps' time."""
    teacher, _, x = _nets()
    target = teacher_logits(teacher, x)
    settings = DistilSettings(epochs=10_000, batch_size=32, precision="fp32")
    monkeypatch.setattr(distil_module, "PACE_STEPS", (8, 32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distil(_slow_later(), x, target, None, replace(settings, epochs=4))  # a fresh process's first steps are slow
        seconds = {}
        for every, parts in [(8, 1), (10**9, 10), (10**9, 1)]:
            monkeypatch.setattr(distil_module, "PACE_EVERY", every)
            monkeypatch.setattr(distil_module, "PACE_PARTS", parts)
            report = distil(_slow_later(), x, target, None, settings, time_limit_s=2.0)
            assert report.cut_by_time
            seconds[every, parts] = report.seconds
    finally:
        torch.set_num_threads(threads)
    assert max(seconds[8, 1], seconds[10**9, 10]) < 2.6 < 3.2 < seconds[10**9, 1], seconds


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


def test_a_second_student_reuses_the_teachers_logits_on_the_same_batches() -> None:
    """Same images, seed and batch settings: the same augmented batches, so the teacher runs once;
    the student ends exactly where a fresh teacher would have taken it."""
    teacher, student, x = _nets()
    settings = DistilSettings(epochs=2, batch_size=32, precision="fp32", shift=4)
    shared = live_teacher(teacher, onnxruntime=False)  # counted by a hook on the torch module
    calls = []
    assert shared.module is not None
    shared.module.register_forward_hook(lambda *_: calls.append(1))
    first = copy.deepcopy(student)
    distil(first, x, shared, None, settings)
    assert len(calls) == 16 and len(shared.batches.logits) == 16
    second, alone = copy.deepcopy(student), copy.deepcopy(student)
    distil(second, x, shared, None, settings)
    assert len(calls) == 16  # every batch's logits were kept
    distil(alone, x, live_teacher(teacher, onnxruntime=False), None, settings)
    for a, b in zip(second.state_dict().values(), alone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A longer run computes only the steps past the kept ones; another seed starts over.
    distil(copy.deepcopy(student), x, shared, None, replace(settings, epochs=3))
    assert len(calls) == 24
    distil(copy.deepcopy(student), x, shared, None, replace(settings, seed=1))
    assert len(calls) == 40 and len(shared.batches.logits) == 16


def test_pacing_counts_the_teacher_once_a_step() -> None:
    """A step on a batch kept by an earlier run skips the teacher's pass; any other step pays it
    once, whether the run's timed steps already paid it or not."""
    teacher = live_teacher(nn.Identity())
    teacher.batches.use(("k",))
    for _ in range(100):
        teacher.batches.add(torch.zeros(4, 10), 0.5)  # the teacher took 0.5 s a batch
    shifted = DistilSettings(shift=4)
    fit = distil_module._steps_that_fit
    # 100 batches kept before the run, 8 steps timed on them at 1 s: 92 kept steps left, then 1.5 s a step.
    assert fit(50.0, 1.0, 8, 100, teacher, shifted) == 50
    assert fit(92.0 + 15.0, 1.0, 8, 100, teacher, shifted) == 92 + 10
    # 200 steps timed, the last 100 past the kept batches: 1 s a step on average is 0.75 s of the
    # student's own and 1.25 s a step from now on.
    assert fit(100.0, 1.0, 200, 100, teacher, shifted) == 80
    # Nothing kept before the run, which kept its own batches: every timed step paid the teacher,
    # and so will every later one, at the same 1 s.
    assert fit(107.0, 1.0, 200, 0, teacher, shifted) == 107
    assert fit(107.0, 1.0, 8, 0, teacher, DistilSettings(shift=0)) == 107


class _SlowTeacher(nn.Module):
    """A teacher whose pass costs more than the student's step."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return self.net(x)


def test_a_live_teacher_run_fills_its_time_limit() -> None:
    """A run that computes its teacher's logits as it goes ends near its limit: counting the
    teacher's pass twice used about half of it here."""
    teacher, student, x = _nets()
    settings = DistilSettings(epochs=10_000, batch_size=32, precision="fp32", shift=4)
    report = distil(student, x, live_teacher(_SlowTeacher(teacher), onnxruntime=False), None, settings, time_limit_s=4.0)
    assert report.cut_by_time and 3.4 < report.seconds < 8  # generous upper bound: catches an ignored limit


def test_students_distilled_together_end_as_if_alone() -> None:
    """A group steps every student on the same batches: each ends exactly where it would alone, and
    a time limit gives them all the same steps."""
    teacher, student, x = _nets()
    settings = DistilSettings(epochs=2, batch_size=32, precision="fp32", shift=4)
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    pair = [copy.deepcopy(student), copy.deepcopy(other)]
    reports = distil_group(pair, x, live_teacher(teacher), None, settings)
    assert [r.steps for r in reports] == [16, 16] and [r.students for r in reports] == [2, 2]
    for together, net in zip(pair, (student, other), strict=True):
        alone = copy.deepcopy(net)
        distil(alone, x, live_teacher(teacher), None, settings)
        for a, b in zip(together.state_dict().values(), alone.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    limited = distil_group([copy.deepcopy(student), copy.deepcopy(other)], x, live_teacher(teacher), None,
                           replace(settings, epochs=10_000), time_limit_s=1.5)
    assert limited[0].cut_by_time and limited[0].steps == limited[1].steps < 10_000 * 8
    assert distil_group([], x, live_teacher(teacher), None, settings) == []


def test_each_student_in_a_group_trains_at_its_own_learning_rate() -> None:
    """``lrs`` gives each student its own peak rate: a student ends as it would alone at that rate
    (``settings.lr`` is then the other student's only), and a list that does not fit is refused."""
    teacher, student, x = _nets()
    settings = DistilSettings(epochs=1, batch_size=32, precision="fp32", shift=4)
    pair = [copy.deepcopy(student), copy.deepcopy(student)]
    distil_group(pair, x, live_teacher(teacher), None, settings, lrs=[settings.lr, 3 * settings.lr])
    for together, lr in zip(pair, (settings.lr, 3 * settings.lr), strict=True):
        alone = copy.deepcopy(student)
        distil(alone, x, live_teacher(teacher), None, replace(settings, lr=lr))
        for a, b in zip(together.state_dict().values(), alone.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(pair[0][0].weight, pair[1][0].weight)
    for bad in ([settings.lr], [settings.lr, 0.0]):
        with pytest.raises(ValueError, match="lrs must give each"):
            distil_group([copy.deepcopy(student), copy.deepcopy(student)], x, live_teacher(teacher), None, settings, lrs=bad)


def test_kept_teacher_logits_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student, x = _nets()
    monkeypatch.setattr(distil_module, "BATCH_CACHE_BYTES", 5 * 32 * 10 * 4)  # five batches of 32 x 10 logits
    shared = live_teacher(teacher)
    distil(student, x, shared, None, DistilSettings(epochs=2, batch_size=32, precision="fp32", shift=4))
    assert len(shared.batches.logits) == 5 and shared.batches.full


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


def test_mixup_blends_each_image_with_a_partner_and_the_teacher_sees_the_blend() -> None:
    teacher, _, x = _nets()
    settings = DistilSettings(batch_size=32, precision="fp32", shift=1, flip=False, mixup=0.3)
    shared = live_teacher(teacher)
    idx = torch.arange(32)
    batches = [distil_module._batch(x, idx, shared, settings, torch.Generator().manual_seed(5), 0) for _ in range(2)]
    (mixed, target, mix), (again, _, mix_again) = batches
    assert mix is not None and mix_again is not None
    partner, lam = mix
    assert torch.equal(mixed, again) and torch.equal(partner, mix_again[0])  # a function of the seed alone
    assert 0.0 < lam < 1.0 and not torch.equal(partner, idx)
    plain = distil_module._translate(x[idx], 1, torch.Generator().manual_seed(5))
    assert torch.allclose(mixed, lam * plain + (1 - lam) * plain[partner], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(target, teacher.eval()(mixed), atol=1e-5)


def test_mixup_distillation_with_labels_brings_the_student_closer() -> None:
    teacher, student, x = _nets()
    target = teacher_logits(teacher, x, flip=False)
    assert target.logits is not None
    labels = target.logits.argmax(1)  # the teacher's own classes: its logits here are near zero, so compare classes
    with torch.no_grad():
        before = (student.eval()(x).argmax(1) == labels).float().mean()
    distil(student, x, live_teacher(teacher), labels, DistilSettings(epochs=8, batch_size=32, lr=3e-3, precision="fp32", mixup=0.3))
    with torch.no_grad():
        after = (student(x).argmax(1) == labels).float().mean()
    assert after > before + 0.2
    with pytest.raises(ValueError, match="mixup"):
        DistilSettings(shift=0, mixup=0.3)
    with pytest.raises(ValueError, match="mixup"):
        DistilSettings(mixup=-1.0)


class _NoOnnx(nn.Module):
    """A teacher with an operator the ONNX exporter has no translation for (cummax)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.net(x), 1).values


def test_a_live_teacher_runs_float32_batches_in_onnxruntime_with_the_same_logits() -> None:
    teacher, student, x = _nets()
    shared = live_teacher(teacher)
    assert shared.module is not None
    batch = x[:32]
    runner = teacher_runner(shared.module, batch, "fp32")
    assert runner.name == "onnxruntime"
    with torch.no_grad():
        expected = teacher.eval()(x[32:64])
    assert torch.allclose(runner.run(x[32:64]), expected, atol=1e-5)  # any batch of that shape
    assert teacher_runner(shared.module, batch, "bf16").name == "torch"
    assert teacher_runner(shared.module, batch, "fp32", onnxruntime=False).name == "torch"
    odd = live_teacher(_NoOnnx(teacher))
    assert odd.module is not None and teacher_runner(odd.module, batch, "fp32").name == "torch"
    # A distillation picks it once per batch shape and ends where the torch teacher takes it.
    settings = DistilSettings(epochs=2, batch_size=32, precision="fp32", shift=4)
    via_ort, via_torch = copy.deepcopy(student), copy.deepcopy(student)
    distil(via_ort, x, shared, None, settings)
    assert [r.name for r in shared.runners.values()] == ["onnxruntime"]
    distil(via_torch, x, live_teacher(teacher, onnxruntime=False), None, settings)
    for a, b in zip(via_ort.state_dict().values(), via_torch.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)
