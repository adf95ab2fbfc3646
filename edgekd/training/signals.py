"""Teacher signals: where the targets of each training batch come from, one small class per source.

The loop calls, in order: :meth:`TeacherSignal.setup` (before the optimizer exists: a feature loss creates its
projections there), :meth:`~TeacherSignal.prepare` (after a resume, before the first epoch: freeze, cache or
wrap the teacher), then per epoch :meth:`~TeacherSignal.start_epoch` and, inside :meth:`~TeacherSignal.batches`,
per batch :meth:`~TeacherSignal.targets` on the SAME (augmented) batch the student sees, and
:meth:`~TeacherSignal.losses`, one loss per trained model (the student's first).

* :class:`NoTeacher`: supervised training (the teacher, the baseline).
* :class:`CachedLogits`: a frozen teacher's logits computed once for the whole train split, looked up by sample
  index (only valid without augmentation: the cache holds the logits of the un-augmented samples).
* :class:`AugmentedCache`: with augmentation, a frozen teacher's logits for ``K`` seeded augmented views of every
  sample, computed once (:mod:`edgekd.training.teacher_cache`) and looked up by (epoch's view, sample index).
* :class:`LiveTeacher`: a frozen teacher run on every batch.
* :class:`FeatureTeacher`: a frozen teacher run on every batch with forward hooks on the layers a feature loss
  compares (hooks exist only while training batches run).
* :class:`PeerTeacher`: online distillation (deep mutual learning): the teacher trains at the same time with
  the mirrored loss; the loop gives it its own optimizer and history.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from edgekd import losses
from edgekd.data import DataBundle
from edgekd.data.augment import Augmenter
from edgekd.training import accel, parallel, teacher_cache
from edgekd.training.features import FeatureTap, setup_feature_loss
from edgekd.training.metrics import predict_logits


class TeacherSignal:
    """No teacher: the base class, and the signal of supervised training."""

    teacher: nn.Module | None = None
    trains_teacher = False  # True: the loop trains ``teacher`` too (its loss is the second of :meth:`losses`)
    role = "teacher"

    def setup(self, model: nn.Module, loss_fn: nn.Module, data: DataBundle, seed: int) -> None:
        """Before the optimizer is built (models still on the CPU)."""

    def prepare(self, data: DataBundle, device: torch.device, start_epoch: int, epochs: int) -> None:
        """After the models moved to ``device`` and a checkpoint was restored, before the first epoch."""

    def start_epoch(self, view: int = 0) -> None:
        """At the start of every epoch (train/eval modes); ``view`` is the epoch's augmented view."""

    def batches(self) -> contextlib.AbstractContextManager:
        """A context held while the epoch's training batches run."""
        return contextlib.nullcontext()

    def targets(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """The teacher's logits for the batch ``x`` (samples ``idx`` of the train split)."""
        return None

    def losses(self, loss_fn: nn.Module, logits: torch.Tensor, targets: torch.Tensor | None,
               y: torch.Tensor) -> list[torch.Tensor]:
        """One loss per trained model: the student's, then the co-trained teacher's if any."""
        return [loss_fn(logits, targets, y)]


NoTeacher = TeacherSignal


def _freeze(teacher: nn.Module) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


class LiveTeacher(TeacherSignal):
    """A frozen teacher run on every training batch."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def prepare(self, data: DataBundle, device: torch.device, start_epoch: int, epochs: int) -> None:
        _freeze(self.teacher)

    def targets(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return accel.teacher_logits(self.teacher, x, getattr(self, "amp", "off"))


class CachedLogits(LiveTeacher):
    """A frozen teacher's logits over the whole (un-augmented) train split, computed once, kept on the device.

    The teacher runs in float32 here whatever the recipe's ``amp`` (as in the augmented cache): the logits are
    computed once, so autocast would save little. Computing them iterates a DataLoader, which draws its base
    seed from the global RNG: the loop restores a resumed run's RNG after :meth:`prepare`, as an uninterrupted
    run has made that draw before epoch 1.
    """

    def __init__(self, teacher: nn.Module):
        super().__init__(teacher)
        self.cache: torch.Tensor | None = None

    def prepare(self, data: DataBundle, device: torch.device, start_epoch: int, epochs: int) -> None:
        _freeze(self.teacher)
        if start_epoch < epochs:  # a finished run needs no cache
            self.cache = predict_logits(self.teacher, data.loader("train", 512, device=device))[0].to(device)

    def targets(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.cache[torch.as_tensor(idx).to(self.cache.device)]


class AugmentedCache(LiveTeacher):
    """A frozen teacher's logits for views ``0..views-1`` of every sample, built once (or read from ``folder``).

    Epoch ``e`` shows view ``e mod views``; :meth:`targets` returns the logits the teacher gave for exactly the
    image of that view, which the loop's augmentation regenerates from its seed. ``info`` holds the cache's
    size and build time once prepared.
    """

    def __init__(self, teacher: nn.Module, augment: Augmenter, views: int, folder: Path):
        super().__init__(teacher)
        self.augment, self.views, self.folder = augment, views, folder
        self.cache: torch.Tensor | None = None
        self.info: dict | None = None
        self.view = 0

    def prepare(self, data: DataBundle, device: torch.device, start_epoch: int, epochs: int) -> None:
        _freeze(self.teacher)
        if start_epoch < epochs:  # a finished run needs no cache
            self.cache, self.info = teacher_cache.load_or_build(self.teacher, data, self.augment, self.views,
                                                                self.folder, device, write=parallel.is_main())

    def start_epoch(self, view: int = 0) -> None:
        self.view = view % self.views

    def targets(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.cache[self.view][torch.as_tensor(idx)].to(x.device)


class FeatureTeacher(LiveTeacher):
    """A frozen teacher run on every batch, with the layers a feature loss compares tapped in both models."""

    def __init__(self, teacher: nn.Module):
        super().__init__(teacher)
        self.model: nn.Module | None = None
        self.pairs: list[tuple[str, str]] = []
        self.taps: tuple[FeatureTap, FeatureTap] | None = None

    def setup(self, model: nn.Module, loss_fn: nn.Module, data: DataBundle, seed: int) -> None:
        # Projections depend on feature shapes: created before the optimizer sees the loss's parameters.
        setup_feature_loss(loss_fn, model, self.teacher, data.train[0][0].unsqueeze(0), seed)
        self.model, self.pairs = model, loss_fn.feature_layers()

    def targets(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # The tapped activations feed a trainable loss: no inference-mode tensors here.
        with torch.no_grad():
            return self.teacher(x)

    @contextlib.contextmanager
    def batches(self) -> Iterator[None]:
        # Hooks exist only for the training batches: evaluation and saving see the plain models.
        with FeatureTap(self.model, [s for s, _ in self.pairs], "student") as s_tap, \
                FeatureTap(self.teacher, [t for _, t in self.pairs], "teacher") as t_tap:
            self.taps = (s_tap, t_tap)
            try:
                yield
            finally:
                self.taps = None

    def losses(self, loss_fn: nn.Module, logits: torch.Tensor, targets: torch.Tensor | None,
               y: torch.Tensor) -> list[torch.Tensor]:
        s_tap, t_tap = self.taps
        feats = losses.Features(student=s_tap.take(), teacher=t_tap.take())
        return [loss_fn(logits, targets, y, features=feats)]


class PeerTeacher(TeacherSignal):
    """Deep mutual learning (Zhang et al. 2018): the teacher trains alongside, each model learning from the
    other's current (detached) predictions with the same loss, mirrored.

    Args:
        teacher: The co-trained teacher.
        role: Its name in history rows.
    """

    trains_teacher = True

    def __init__(self, teacher: nn.Module, role: str = "teacher"):
        self.teacher, self.role = teacher, role
        self.forward: nn.Module = teacher

    def prepare(self, data: DataBundle, device: torch.device, start_epoch: int, epochs: int) -> None:
        for p in self.teacher.parameters():
            p.requires_grad_(True)
        self.forward = parallel.wrap(self.teacher)  # after resuming: DDP broadcasts rank 0's weights

    def start_epoch(self, view: int = 0) -> None:
        self.teacher.train()

    def targets(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def losses(self, loss_fn: nn.Module, logits: torch.Tensor, targets: torch.Tensor | None,
               y: torch.Tensor) -> list[torch.Tensor]:
        return [loss_fn(logits, targets.detach(), y), loss_fn(targets, logits.detach(), y)]


def choose_signal(teacher: nn.Module | TeacherSignal | None, loss_fn: nn.Module, *, cache: bool,
                  augmented: bool, views: int | None = None, augment: Augmenter | None = None,
                  folder: Path | None = None) -> TeacherSignal:
    """The signal for a frozen ``teacher`` (a signal passes through unchanged).

    Args:
        teacher: None (supervised), a frozen teacher module, or a :class:`TeacherSignal`.
        loss_fn: The loss: one that needs features gets a :class:`FeatureTeacher`.
        cache: Whether cached logits may be used (``distill.cache_teacher``).
        augmented: Whether the batches are augmented (then only the augmented-teacher cache can be used).
        views: With augmentation: the number of views epochs cycle through (None: a fresh view every epoch,
            so no cache).
        augment: The augmentation (it regenerates the cached views).
        folder: Where the augmented-teacher cache lives.
    """
    if teacher is None:
        return NoTeacher()
    if isinstance(teacher, TeacherSignal):
        return teacher
    if losses.needs_features(loss_fn):
        return FeatureTeacher(teacher)
    if cache and not augmented:
        return CachedLogits(teacher)
    if cache and views and augment is not None and folder is not None:
        return AugmentedCache(teacher, augment, views, folder)
    return LiveTeacher(teacher)
