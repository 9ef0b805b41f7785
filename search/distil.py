"""Recover accuracy by distillation from the original model: KD on logits, plus cross-entropy with labels."""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search._heap import kept_heap


@dataclass(frozen=True)
class DistilSettings:
    """How long and how hard to fine-tune a student."""

    epochs: float = 1.0
    """Passes over the training images (fractions allowed: 0.25 = a quarter of them)."""
    batch_size: int = 128
    lr: float = 1e-3
    """Peak learning rate of the one-cycle schedule. Which is best depends on the run's length and on how
    far the student starts from the teacher: vgg_seed, 2-core Xeon, bf16, seed 0, validation = first 5k
    of test, on train_0 (one trial's 2,000 images for 1 epoch, else all 10k). First conv kept,
    features.2 DS m=1, SS r=16 on the other four (60.82 % from least squares): 1 epoch 74.28 % at 1e-3
    vs 68.88 % at 3e-3; 8 epochs 82.70 vs 82.94 %; 30 epochs 84.18 vs 84.64 % (5e-4: 83.58 %; SGD
    0.05: 84.56 %); 100 epochs 84.40 vs 85.54 %. SS cout/4 on the last five (84.40 % from least
    squares): 1 epoch 83.70 vs 70.68 %; 8 epochs 86.26 vs 85.54 %; 30 epochs 86.80 vs 86.16 %. A whole
    vgg_seed onnxruntime job (0.24x budget, one final candidate, 86.6 / 96.0 epochs) picked the same
    plan either way: 86.36 / 86.32 % validation, 85.82 / 85.94 % held-out. So 1e-3 stays the default
    (and a trial's short fine-tune keeps it); a long final distillation of a plan far from the original
    may do better with 3e-3 (``--final-lr``)."""
    weight_decay: float = 5e-5
    temperature: float = 2.0
    ce_weight: float = 0.5
    """Weight of cross-entropy on labels, when labels exist."""
    flip: bool = True
    """Random horizontal flips."""
    shift: int = 4
    """Random translation of each image by up to this many pixels (zero padding), the usual CIFAR
    augmentation. The teacher then runs on each augmented batch (no grad, in the student's
    precision). 0: no translation, and the teacher's logits may be cached (``teacher_logits``).
    ``bench/distil_augment.py`` (vgg_seed SS plan, 30 epochs, bf16, 2-core Xeon, validation = first
    5k of test): 86.12 % with shift 4 in 237 s, 85.54 % with 0 in 177 s."""
    mixup: float = 0.0
    """Mix each augmented batch with a shuffled copy of itself, by a weight drawn from
    Beta(``mixup``, ``mixup``) once a batch, and match the teacher's logits on the mixed images
    (cross-entropy takes both labels, weighted alike). 0: no mixing. Needs ``shift > 0`` (a live teacher).
    Off by default: on vgg_seed's 0.194x ORT plan, 55 epochs, 2-core Xeon, validation = first 5k of
    test, 0.3 gave 85.46 / 85.36 % (seeds 0 / 1) against 85.28 / 85.22 % without, and 1.0 gave
    85.06 % (seed 0): a small gain. In whole jobs (``--final-mixup 0.3``, one candidate, 111-119
    epochs) the 0.19x plan lost 0.90-1.00 point held-out, against 1.02 for a near plan without it at 55."""
    clip_norm: float = 2.0
    optimizer: str = "adamw"
    """``adamw`` (robust from a least-squares start) or ``sgd`` (Nesterov)."""
    seed: int = 0
    precision: str = "auto"
    """``fp32``; ``bf16`` (autocast: bfloat16 convolutions, float32 weights, optimiser and loss); or
    ``auto``: bf16 when a probe of a few steps shows it at least ``BF16_MIN_GAIN`` times faster on
    this machine (CPUs with bfloat16 instructions: measured 1.7-2.2x on vgg_seed students), else fp32."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.shift <= 64:
            raise ValueError(f"shift must be 0..64 pixels, got {self.shift}")
        if self.mixup < 0 or (self.mixup > 0 and not self.shift):
            raise ValueError(f"mixup must be >= 0 and needs shift > 0 (a live teacher), got {self.mixup} with shift {self.shift}")


PRECISIONS = ("auto", "fp32", "bf16")
BF16_MIN_GAIN = 1.25
PACE_STEPS = (8, 64, 256, 1024, 2048)
"""Steps at which a time-limited distillation fits its schedule to the time left, from the time of
the steps after the first (which pays one-off set-up costs): the first fit shortens it, the later
ones correct it either way, never past the settings' epochs. A fit on 8 steps alone left 15 % of a
resnet20 group's limit unused; with the last fit at 256 steps a vgg_seed group of 3 still left 106 s
of 1005 s (its first tenth of steps ran 10 % slower than the rest)."""
PACE_EVERY = 1024
"""After the last of ``PACE_STEPS`` the schedule reaches, it is fitted again every this many steps
(or every ``PACE_PARTS``-th of the schedule, if that is fewer), from the time of the steps since the
previous fit alone: a resnet20 final distillation whose steps slowed after its last fit ran 1012 s of
a 949 s limit (2-core EPYC)."""
PACE_PARTS = 10
"""After its last pace step every schedule is fitted again at least at each this-many-th of it, so
one too short to reach the later ``PACE_STEPS`` (or ``PACE_EVERY``) still is: a vgg_seed final distillation of 888 steps, fitted last at step 256, ran 1.3 s a step at its end
against 0.9 s then, and overran its 819 s limit by about 110 s (2-core EPYC without bfloat16)."""
BATCH_CACHE_BYTES = 256 * 2**20
"""Most memory a live teacher keeps its logits on augmented batches in (``TeacherBatches``)."""


@dataclass(frozen=True)
class DistilReport:
    """What a distillation did: steps taken, the epochs they make, precision and wall time."""

    steps: int
    epochs: float
    precision: str
    seconds: float
    cut_by_time: bool = False
    """The time limit shortened the schedule below the settings' epochs."""
    students: int = 1
    """Students distilled together, on the same batches (``distil_group``); ``seconds`` is for all."""


@dataclass
class TeacherBatches:
    """A live teacher's logits on the augmented batches of one distillation, step by step.

    The batches depend only on the images, the seed and the batch settings, never on the student, so
    the next student distilled with the same ones (the next trial, the next final candidate) sees
    the very same batches: their logits are reused instead of running the teacher again. On vgg_seed
    the teacher's forward pass was a fifth to a quarter of a training step (2-core Xeon, bf16).

    Replaying one distillation's own batches after a few epochs, so that later steps skip the
    teacher, was tried and taken out again (305e140): more steps, no better student. vgg_seed, the
    two final plans of a 0.20x onnxruntime job, their fitted blocks, two students together, mixup
    0.3, 775 s each way on a 2-core EPYC Zen 3 in fp32, validation = first 5k of test: new batches
    throughout, 911 steps (11.7 epochs), 84.14 / 85.18 %; the first 4 epochs replayed, 1166 steps
    (14.9 epochs), 83.96 / 85.46 %."""

    key: tuple[object, ...] | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    """Time the teacher took to compute ``logits``."""
    full: bool = False
    """``BATCH_CACHE_BYTES`` reached: later steps are computed and not kept."""

    def use(self, key: tuple[object, ...]) -> None:
        """Keep the batches if they were made the same way, else start over."""
        if key != self.key:
            self.key, self.logits, self.seconds, self.full = key, [], 0.0, False

    def per_batch_s(self) -> float:
        return self.seconds / len(self.logits) if self.logits else 0.0

    def add(self, logits: torch.Tensor, seconds: float) -> None:
        if self.full or (len(self.logits) + 1) * logits.numel() * logits.element_size() > BATCH_CACHE_BYTES:
            self.full = True
            return
        self.logits.append(logits)
        self.seconds += seconds


@dataclass
class Teacher:
    """The original model for distillation: its logits on the training images, computed once (and on
    their mirror images), and/or the model itself (eval mode, ``channels_last``) to run on augmented
    batches, whose logits it keeps for the next student (``batches``)."""

    logits: torch.Tensor | None
    flipped: torch.Tensor | None
    module: nn.Module | None = None
    batches: TeacherBatches = field(default_factory=TeacherBatches)
    onnxruntime: bool = True
    """Run ``module`` on float32 batches through its ONNX export in onnxruntime (``teacher_runner``)."""
    runners: dict[tuple[object, ...], TeacherRunner] = field(default_factory=dict)
    """How ``module`` runs on live batches of one shape in one precision, set on the first of them."""


@dataclass(frozen=True)
class TeacherRunner:
    """The teacher's forward pass on one batch shape: eager torch, or its ONNX export in onnxruntime."""

    name: str
    """``torch`` or ``onnxruntime``."""
    run: Callable[[torch.Tensor], torch.Tensor]


def teacher_runner(module: nn.Module, x: torch.Tensor, precision: str, onnxruntime: bool = True) -> TeacherRunner:
    """How to run the teacher ``module`` (eval, ``channels_last``) on batches like ``x``.

    Float32 batches go through the module's ONNX export in onnxruntime (as many intra-op threads as
    torch has; no spin-waiting, which would take the cores from the students' steps), once its logits
    on ``x`` match torch's within 1e-3 of their largest magnitude. A teacher's pass at batch 128,
    2-core EPYC Zen 3, float32: vgg_seed 410-430 ms in torch (channels_last), 260 ms in onnxruntime;
    resnet20 170 ms and 81 ms. In a distillation of two vgg_seed students together the teacher took
    0.32-0.40 s a step in torch and 0.27-0.28 s in onnxruntime, of about 1.1 s.
    bfloat16 batches (``precision`` bf16), a failed export or a mismatch run eager torch.
    """

    def run_torch(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(precision):
            return module(batch.contiguous(memory_format=torch.channels_last)).float()

    if not onnxruntime or precision != "fp32":
        return TeacherRunner("torch", run_torch)
    try:
        run_ort = _ort_teacher(module, x)
        expected = run_torch(x)
        matches = float((run_ort(x) - expected).abs().max()) <= 1e-3 * max(1.0, float(expected.abs().max()))
    except Exception:  # an operator onnxruntime lacks, a failed export: the torch path works
        matches = False
    return TeacherRunner("onnxruntime", run_ort) if matches else TeacherRunner("torch", run_torch)


def _ort_teacher(module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import tempfile

    import onnxruntime as ort

    from search.export import INPUT_NAME, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, f"{tmp}/teacher.onnx", tuple(x.shape[1:]), fast=True, batch=x.shape[0])  # type: ignore[arg-type]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: batch.contiguous().numpy()})[0])

    return run


def live_teacher(teacher: nn.Module, onnxruntime: bool = True) -> Teacher:
    """A teacher run on every batch (what ``shift > 0`` needs), with no cached logits; on float32
    batches in onnxruntime unless ``onnxruntime`` is off (``teacher_runner``)."""
    return Teacher(None, None, _fast_copy(teacher), onnxruntime=onnxruntime)


def _fast_copy(teacher: nn.Module) -> nn.Module:
    fast = copy.deepcopy(teacher).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, images: torch.Tensor, flip: bool = True, batch: int = 256, known: Teacher | None = None
) -> Teacher:
    """Logits of ``teacher`` on normalised NCHW ``images`` (and on their mirror images if ``flip``).

    Float32, run on a ``channels_last`` copy of the teacher (faster on CPU; the logits are the same
    up to float rounding). ``known``: logits computed earlier for the first images of ``images``
    (with mirrors if ``flip``); only the images after them are run.
    """
    done = 0
    if known is not None and known.logits is not None and (known.flipped is not None or not flip):
        done = min(len(known.logits), len(images))
    fast = _fast_copy(teacher)

    def run(x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        parts = [] if prefix is None or done == 0 else [prefix[:done]]
        parts += [fast(x[i : i + batch].contiguous(memory_format=torch.channels_last))
                  for i in range(done, x.shape[0], batch)]
        return torch.cat(parts)

    prefix = known if done else None
    logits = run(images, prefix.logits if prefix else None)
    return Teacher(logits, run(images.flip(3), prefix.flipped if prefix else None) if flip else None, fast)


def _autocast(precision: str) -> contextlib.AbstractContextManager[None]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step_seconds(student: nn.Module, x: torch.Tensor, precision: str, steps: int) -> float:
    """Median time of a forward and backward pass (no optimiser step: the weights stay as they are)."""
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with _autocast(precision):
            out = student(x)
        out.float().square().mean().backward()
        if i:  # the first pass warms up
            times.append(time.perf_counter() - start)
    student.zero_grad(set_to_none=True)
    times.sort()
    return times[len(times) // 2]


def resolve_precision(student: nn.Module, images: torch.Tensor, settings: DistilSettings, steps: int = 3) -> DistilSettings:
    """``settings`` with ``precision`` decided: ``auto`` times a few fp32 and bf16 passes of ``student``
    on one batch of ``images`` and keeps bf16 only if it is clearly faster here."""
    if settings.precision != "auto":
        return settings
    x = images[: settings.batch_size].contiguous(memory_format=torch.channels_last)
    student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    was_training = student.training
    buffers = {name: b.clone() for name, b in student.named_buffers()}  # batch-norm statistics
    student.train()
    try:
        fp32 = _step_seconds(student, x, "fp32", steps)
        try:
            bf16 = _step_seconds(student, x, "bf16", steps)
        except RuntimeError:  # an operator without a bfloat16 kernel here
            bf16 = float("inf")
    finally:
        with torch.no_grad():
            for name, b in student.named_buffers():
                b.copy_(buffers[name])
        student.train(was_training)
        student.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return replace(settings, precision="bf16" if bf16 * BF16_MIN_GAIN <= fp32 else "fp32")


def distil(
    student: nn.Module,
    images: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor | None,
    settings: DistilSettings,
    on_step: Callable[[int, int], None] | None = None,
    time_limit_s: float | None = None,
) -> DistilReport:
    """Fine-tune ``student`` in place to match ``teacher`` on ``images`` (normalised NCHW).

    AdamW (or SGD with Nesterov momentum) and a one-cycle schedule, in ``channels_last`` (faster on
    CPU), in the settings' ``precision`` (``auto`` is resolved first, see ``resolve_precision``).
    With ``time_limit_s`` the steps are timed and the schedule is shortened, if needed, so that the
    whole run fits the limit (it is never lengthened past ``settings.epochs``; see ``PACE_STEPS``).
    The student is left in eval mode, contiguous again.
    """
    return distil_group([student], images, teacher, labels, settings, on_step, time_limit_s)[0]


@dataclass
class _Run:
    """One student's optimiser, schedule and precision inside a group."""

    student: nn.Module
    precision: str
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.OneCycleLR
    lr: float


@kept_heap()
def distil_group(
    students: Sequence[nn.Module],
    images: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor | None,
    settings: DistilSettings,
    on_step: Callable[[int, int], None] | None = None,
    time_limit_s: float | None = None,
    lrs: Sequence[float] | None = None,
) -> list[DistilReport]:
    """``distil`` for several students at once, step by step on the same batches: the teacher runs
    once a step for all of them, and a time limit gives every student the same number of steps.

    Each student gets its own optimiser, schedule and precision (``auto`` resolved for each) and
    its own peak learning rate from ``lrs`` (default: ``settings.lr`` for all); the teacher runs in
    the precision most of them use (float32 on a tie). Every report's ``seconds`` is the group's
    wall time.
    """
    started = time.perf_counter()
    if settings.epochs <= 0 or not students:
        for student in students:
            student.eval()
        return [DistilReport(0, 0.0, settings.precision, 0.0, students=len(students)) for _ in students]
    if (teacher.module if settings.shift else teacher.logits) is None:
        raise ValueError("shift > 0 needs the teacher model (live_teacher)" if settings.shift
                         else "shift = 0 needs the teacher's logits (teacher_logits)")
    lrs = [settings.lr] * len(students) if lrs is None else list(lrs)
    if len(lrs) != len(students) or not all(lr > 0 for lr in lrs):
        raise ValueError(f"lrs must give each of the {len(students)} students a learning rate > 0, got {lrs}")
    precisions = [resolve_precision(student, images, settings).precision for student in students]
    batch_settings = replace(settings, precision="bf16" if 2 * precisions.count("bf16") > len(precisions) else "fp32")
    gen = torch.Generator().manual_seed(settings.seed)
    n = images.shape[0]
    total = asked = max(1, int(round(settings.epochs * n / settings.batch_size)))
    runs = [_start(student, precision, settings, total, lr) for student, precision, lr in zip(students, precisions, lrs, strict=True)]
    since, since_at = 1, started  # the window the next fit times: steps after ``since``, from ``since_at``
    t = settings.temperature
    kept = 0
    if settings.shift:
        teacher.batches.use(_batches_key(images, batch_settings))
        kept = len(teacher.batches.logits)  # batches whose teacher pass an earlier run paid for
    order = torch.randperm(n, generator=gen)
    cursor = 0
    step = 0
    while step < total:
        if cursor + settings.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        x, target, mix = _batch(images, idx, teacher, batch_settings, gen, step)
        x = x.contiguous(memory_format=torch.channels_last)
        soft_target = F.log_softmax(target / t, 1)
        y = labels[idx] if labels is not None and settings.ce_weight > 0 else None  # once a batch, for every student
        for run in runs:
            with _autocast(run.precision):
                out = run.student(x).float()
            loss = F.kl_div(F.log_softmax(out / t, 1), soft_target, reduction="batchmean", log_target=True) * t * t
            if y is not None:
                ce = F.cross_entropy(out, y)
                if mix is not None:
                    partner, lam = mix
                    ce = lam * ce + (1 - lam) * F.cross_entropy(out, y[partner])
                loss = loss + settings.ce_weight * ce
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distillation diverged at step {step} (loss {float(loss)})")
            nn.utils.clip_grad_norm_(run.params, settings.clip_norm)
            run.opt.step()
            run.sched.step()
        step += 1
        if step == 1:
            since_at = time.perf_counter()
        if time_limit_s is not None and step < total and _pace_point(step, total):
            now = time.perf_counter()
            fits = min(asked, step + max(1, _steps_that_fit(time_limit_s - (now - started), (now - since_at) / (step - since),
                                                            step, kept, teacher, batch_settings, since)))
            if step >= _last_pace_step(total):
                since, since_at = step, now
            if fits != total:
                total = fits
                for run in runs:
                    run.sched = _one_cycle_from(run.opt, run.lr, total, step)
        if on_step is not None:
            on_step(step, total)
    seconds = time.perf_counter() - started
    for run in runs:
        run.student.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        run.student.eval()
    return [DistilReport(step, step * settings.batch_size / n, run.precision, seconds, step < asked, len(runs))
            for run in runs]


def _start(student: nn.Module, precision: str, settings: DistilSettings, total: int, lr: float) -> _Run:
    params = [p for p in student.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    student.train()
    return _Run(student, precision, params, opt,
                torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=0.15), lr)


def _batches_key(images: torch.Tensor, settings: DistilSettings) -> tuple[object, ...]:
    """What decides the augmented batches and the teacher's logits on them (a sample of the pixels
    stands for the images themselves)."""
    sample = images.reshape(-1)[:: max(1, images.numel() // 4096)]
    return (images.data_ptr(), tuple(images.shape), hash(sample.float().numpy().tobytes()), settings.seed,
            settings.batch_size, settings.shift, settings.flip, settings.mixup, settings.precision)


def _last_pace_step(total: int) -> int:
    """The last of ``PACE_STEPS`` a schedule of ``total`` steps reaches; fits after it time the steps
    since the previous fit alone."""
    return max([p for p in PACE_STEPS if p < total], default=PACE_STEPS[0])


def _pace_point(step: int, total: int) -> bool:
    last = _last_pace_step(total)
    every = min(PACE_EVERY, max(PACE_STEPS[0], total // PACE_PARTS))
    return step in PACE_STEPS or (step > last and (step - last) % every == 0)


def _steps_that_fit(seconds: float, per_step: float, step: int, kept: int, teacher: Teacher,
                    settings: DistilSettings, since: int = 1) -> int:
    """Steps after ``step`` that fit in ``seconds``, from ``per_step``, the mean time of the steps
    after ``since`` (1 at first: the first step paid one-off costs) up to ``step``. With a live
    teacher a step on one of the ``kept`` batches (logits kept by an earlier run) skips the
    teacher's pass and every other step pays it, timed or to come: the student's own share of a
    step is ``per_step`` less the passes the timed steps in the window paid. (Counting
    the pass on top of timed steps that had paid it left a fifth of a vgg_seed candidate's
    1190 s unused.)"""
    if not settings.shift:
        return int(seconds / per_step)
    teacher_s = teacher.batches.per_batch_s()
    timed = step - since
    paid = max(0, step - max(kept, since))
    student_s = max(per_step * 0.1, (per_step * timed - paid * teacher_s) / timed)
    cheap = max(0, kept - step)
    if seconds <= cheap * student_s:
        return int(seconds / student_s)
    return cheap + int((seconds - cheap * student_s) / (student_s + teacher_s))


def _batch(
    images: torch.Tensor, idx: torch.Tensor, teacher: Teacher, settings: DistilSettings, gen: torch.Generator,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, float] | None]:
    """One training batch, augmented, and the teacher's logits on exactly those images (those kept
    from an earlier distillation for this ``step``, when there are); with mixup, also the partner
    of each image (an index into the batch) and the weight of the image itself."""
    x = images[idx]
    mirror = torch.rand(idx.shape[0], generator=gen) < 0.5 if settings.flip else None
    if not settings.shift:
        assert teacher.logits is not None
        target = teacher.logits[idx]
        if mirror is not None and teacher.flipped is not None:
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
            target = torch.where(mirror[:, None], teacher.flipped[idx], target)
        return x, target, None
    x = _translate(x, settings.shift, gen)
    if mirror is not None:
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    mix = None
    if settings.mixup > 0:
        lam = _beta(settings.mixup, gen)
        partner = torch.randperm(idx.shape[0], generator=gen)
        x = lam * x + (1 - lam) * x[partner]
        mix = (partner, lam)
    kept = teacher.batches.logits
    if step < len(kept):
        return x, kept[step], mix
    assert teacher.module is not None
    key = (settings.precision, *x.shape)
    if key not in teacher.runners:
        teacher.runners[key] = teacher_runner(teacher.module, x, settings.precision, teacher.onnxruntime)
    start = time.perf_counter()
    target = teacher.runners[key].run(x)
    if step == len(kept):
        teacher.batches.add(target, time.perf_counter() - start)
    return x, target, mix


def _beta(alpha: float, gen: torch.Generator) -> float:
    """A draw from Beta(alpha, alpha) that depends on ``gen`` alone, so the batches stay a function of
    the seed (``torch.distributions`` draws from the global generator)."""
    seed = int(torch.randint(2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _translate(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to ``shift`` pixels each way, zeros filling in."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    # Advanced indexing puts the indexed dimensions first: (n, h, w, c), which is channels_last.
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _one_cycle_from(opt: torch.optim.Optimizer, lr: float, total: int, done: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """A one-cycle schedule of ``total`` steps, already advanced past the first ``done``."""
    for group in opt.param_groups:  # OneCycleLR reads these back when built a second time
        group.pop("initial_lr", None)
        group.pop("max_lr", None)
        group.pop("min_lr", None)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=0.15)
    with warnings.catch_warnings():  # stepping the schedule alone, on purpose
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            sched.step()
    return sched
