"""One training loop for every model edgekd trains: teachers, baselines, students, pruned students.

``fit`` is a short loop over small parts: a teacher signal (:mod:`edgekd.training.signals`) supplies each
batch's targets, an augmentation hook (:mod:`edgekd.training.augment`) transforms the batch first, a
:class:`~edgekd.training.checkpoint.Checkpointer` saves everything needed to continue exactly after each epoch
(model, optimizer, scheduler, fp16 grad scaler, CPU/CUDA RNG state, history, best weights), and callbacks
(:mod:`edgekd.training.callbacks`) do the rest. The shuffling order of epoch ``e`` depends only on the seed and
``e``, so a run resumed after epoch ``e`` continues as if it had never stopped (under torchrun too: every rank
resumes from rank 0's checkpoint).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from edgekd import losses
from edgekd.data import DataBundle
from edgekd.errors import CheckpointError, TrainingError
from edgekd.recipe import TrainConfig
from edgekd.training import accel, parallel
from edgekd.training.augment import Augmenter
from edgekd.training.callbacks import Callback, ConsoleLog
from edgekd.training.checkpoint import Checkpointer, restore_rng, rng_state
from edgekd.training.metrics import evaluate
from edgekd.training.signals import TeacherSignal, choose_signal

AugmentFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]  # (x, y, idx, view, soft_labels=) -> (x, y)


@dataclass
class FitConfig:
    """How one model is trained, besides the model, data and loss.

    Attributes:
        role: Name in messages and history rows (``teacher``, ``baseline``, ``student``, ``prune2``...).
        train: Optimizer, schedule, epochs, gradient clipping and mixed precision.
        seed: Seeds shuffling and augmentation; epoch ``e`` uses ``seed`` and ``e`` only.
        state_path: Where the per-epoch resumable checkpoint lives.
        resume: Continue from ``state_path`` if it exists.
        quiet: No progress bar and no epoch lines.
        cache_teacher: Compute a frozen teacher's logits once and replay them (losses on logits): for the
            plain train split without augmentation, else for ``train.teacher_views`` augmented views.
        augment_seed: Seed of the augmented views (default ``seed``); prune fine-tuning passes the run's seed
            so that it replays the distill stage's augmented-teacher cache.
        views_cache: Folder of the augmented-teacher cache (default: next to ``state_path``).
    """

    role: str
    train: TrainConfig
    seed: int
    state_path: Path
    resume: bool = False
    quiet: bool = False
    cache_teacher: bool = True
    augment_seed: int | None = None
    views_cache: Path | None = None


@dataclass
class TrainResult:
    """What a training run produced."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    peer: "TrainResult | None" = None  # the co-trained teacher of online distillation
    teacher_cache: dict[str, Any] | None = None  # facts about the augmented-teacher cache, when one was used

    @property
    def epoch_seconds(self) -> list[float]:
        return [row["seconds"] for row in self.history]


def _optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:  # trainable parts of the loss (FitNets projections) learn with the model
        params += [p for p in extra.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def onecycle_warmup(total_steps: int, pct_start: float = 0.25) -> float:
    """OneCycleLR's ``pct_start`` for ``total_steps``: ``pct_start`` unless its warm-up is exactly one step.

    torch divides by the warm-up length minus one (``pct_start * total_steps - 1``), so a one-step warm-up
    (e.g. 4 steps in all: one epoch of 4 batches) raises ZeroDivisionError; two warm-up steps avoid it.
    """
    return 2.0 / total_steps if float(pct_start * total_steps) - 1 == 0 else pct_start


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    total_steps = max(1, total_steps)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                   pct_start=onecycle_warmup(total_steps))
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.scheduler == "warmup_cosine":  # linear warm-up, then cosine decay to 0
        warm = int(round(cfg.warmup * total_steps))
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm
            else 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total_steps - warm)))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class _Member:
    """One trained model with its optimizer, schedule, running loss, history and best weights."""

    def __init__(self, role: str, model: nn.Module, cfg: TrainConfig, total_steps: int, extra: nn.Module | None = None):
        self.role, self.model, self.extra, self.cfg = role, model, extra, cfg
        self.opt = _optimizer(model, cfg, extra)
        self.sched = _scheduler(self.opt, cfg, total_steps)
        self.history: list[dict[str, Any]] = []
        self.best_val, self.best_epoch, self.best_state = -1.0, 0, copy.deepcopy(model.state_dict())
        self.total, self.count = 0.0, 0
        # EMA of the weights (and BatchNorm buffers): validated, kept as "best" and saved instead of the raw ones.
        self.ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
            cfg.ema), use_buffers=True) if getattr(cfg, "ema", None) else None)

    def params(self) -> list[torch.Tensor]:
        ps = list(self.model.parameters())
        return ps + (list(self.extra.parameters()) if self.extra is not None else [])

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "history": self.history, "best_val": self.best_val,
                "best_epoch": self.best_epoch, "best_model": self.best_state,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.best_val, self.best_epoch = float(state["best_val"]), int(state["best_epoch"])
        self.best_state = state["best_model"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def step(self, loss: torch.Tensor, n: int, scaler=None) -> None:
        parallel.sync_grads(self.extra)  # loss projections live outside DDP
        if scaler is not None:
            scaler.unscale_(self.opt)  # clip the true gradients, not the loss-scaled ones
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params(), self.cfg.grad_clip)
        if scaler is not None:
            scaler.step(self.opt)  # skipped when fp16 gradients overflowed; update() then lowers the scale
            scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.total += loss.item() * n
        self.count += n

    def end_epoch(self, data: DataBundle, epoch: int, seconds: float) -> dict[str, Any]:
        parallel.sync_buffers(self.model)  # BatchNorm statistics of rank 0 everywhere: same val, same best
        judged = self.ema.module if self.ema is not None else self.model
        val_acc = evaluate(judged, data, "val")["test_accuracy"]
        row = {"model": self.role, "epoch": epoch + 1, "train_loss": parallel.global_mean(self.total, self.count),
               "val_accuracy": val_acc, "lr": self.opt.param_groups[0]["lr"], "seconds": seconds}
        self.history.append(row)
        if val_acc > self.best_val:
            self.best_val, self.best_epoch, self.best_state = val_acc, epoch + 1, copy.deepcopy(judged.state_dict())
        self.total, self.count = 0.0, 0
        return row

    def result(self, seconds: float) -> TrainResult:
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(model=self.model, history=self.history, seconds=seconds, best_epoch=self.best_epoch,
                           best_val_accuracy=self.best_val)


class _Run:
    """The state of one ``fit`` that the checkpoint holds: members (student first), loss, scaler, clock."""

    def __init__(self, members: list[_Member], loss_fn: nn.Module, scaler, callbacks: Sequence[Callback]):
        self.members, self.loss_fn, self.scaler, self.callbacks = members, loss_fn, scaler, callbacks
        self.start_epoch, self.elapsed, self.batch_size = 0, 0.0, 0

    def state(self, epoch: int, device: torch.device) -> dict[str, Any]:
        main, *peers = self.members
        state = {**main.state(), **rng_state(device), "epoch": epoch, "elapsed": self.elapsed,
                 "loss_state": self.loss_fn.state_dict()}
        if peers:
            state["peer"] = peers[0].state()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        kept = {i: s for i, cb in enumerate(self.callbacks) if (s := cb.state_dict())}
        if kept:
            state["callbacks"] = kept
        return state

    def load(self, state: dict[str, Any], path: Path) -> None:
        main, *peers = self.members
        main.load(state)
        if "loss_state" in state:
            self.loss_fn.load_state_dict(state["loss_state"])
        if peers:
            if "peer" not in state:
                raise CheckpointError(f"resume checkpoint {path} has no co-trained teacher",
                                      "it was written by another strategy; delete it to restart the student")
            peers[0].load(state["peer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        for i, s in state.get("callbacks", {}).items():
            self.callbacks[int(i)].load_state_dict(s)
        self.start_epoch, self.elapsed = int(state["epoch"]), float(state["elapsed"])


def _check_finite(loss: torch.Tensor, role: str, epoch: int, state_path: Path) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{role} training diverged: the loss became {loss.item()} at epoch {epoch + 1}",
            f"epochs 1..{epoch} are kept in {state_path}; lower the learning rate or set grad_clip, then --resume")


def _move(device: torch.device | str, *modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.to(device)


def fit(model: nn.Module, data: DataBundle, loss_fn: nn.Module, config: FitConfig, *,
        teacher: nn.Module | TeacherSignal | None = None, callbacks: Iterable[Callback] = (),
        augment: AugmentFn | None = None) -> TrainResult:
    """Train ``model`` for ``config.train.epochs`` epochs, keeping the weights with the best validation accuracy.

    Args:
        model: The model to train (modified in place, then loaded with the best weights; returned on the CPU).
        data: The dataset; only the train and val splits are used.
        loss_fn: Called as ``loss_fn(logits, teacher_logits, labels)``; a loss with ``needs_features`` is
            called with ``features=`` too, its trainable parts (projections) are optimized with the model and
            its ``on_epoch_start(epoch)`` is called if it has one.
        config: Role, schedule, seed, checkpoint path, resume, quiet, teacher caching.
        teacher: None (supervised), a frozen teacher (cached logits, live or with feature hooks, chosen from
            the loss, ``config.cache_teacher`` and the augmentation), or any
            :class:`~edgekd.training.signals.TeacherSignal` (e.g. ``PeerTeacher`` for online distillation,
            whose result is ``TrainResult.peer``).
        callbacks: Called after each epoch's checkpoint is written (console lines are added unless quiet).
        augment: The batch augmentation (:mod:`edgekd.training.augment`; default: ``data.augment`` seeded by
            ``config.augment_seed`` or ``config.seed``). Distill settings (``train.teacher_views``) cycle
            through that many views, so that the baseline sees exactly the student's images; other settings (a
            teacher's own training) see a fresh view every epoch.

    Raises:
        TrainingError: The loss became NaN or infinite; the previous epoch's checkpoint is kept.
        RecipeError: A feature loss names modules the models do not have, or shapes it cannot compare.
    """
    if augment is None:
        augment = Augmenter(data.augment, data, config.seed if config.augment_seed is None else config.augment_seed)
    active = getattr(augment, "active", True)
    views = getattr(config.train, "teacher_views", None) if active else None
    signal = choose_signal(teacher, loss_fn, cache=config.cache_teacher, augmented=active, views=views,
                           augment=augment, folder=config.views_cache or config.state_path.parent)
    soft_labels = losses.accepts_soft_labels(loss_fn)
    callbacks = ([] if config.quiet else [ConsoleLog()]) + list(callbacks)
    signal.setup(model, loss_fn, data, config.seed)
    run = _start(model, data, loss_fn, config, signal, callbacks)
    dev = parallel.device()
    ddp_model = parallel.wrap(model, config.train.amp)  # after resuming: DDP broadcasts rank 0's weights
    ddp_model = accel.prepare(model, ddp_model, config.train, signal.teacher)  # channels_last, compile
    signal.amp = config.train.amp  # a frozen teacher runs under the same autocast
    gen = torch.Generator()
    for epoch in range(run.start_epoch, config.train.epochs):
        t0 = time.perf_counter()
        gen.manual_seed(config.seed * 100_003 + epoch)
        view = epoch % views if views else epoch
        loader = parallel.train_loader(data, run.batch_size, gen, dev)
        model.train()
        loss_fn.train()
        signal.start_epoch(view)
        if hasattr(loss_fn, "on_epoch_start"):
            loss_fn.on_epoch_start(epoch)
        with signal.batches():
            for x, y, idx in _progress(loader, config, epoch):
                x, y = augment(x.to(dev), torch.as_tensor(y).to(dev), idx, view, soft_labels=soft_labels)
                x = accel.as_input(x, config.train)
                _train_step(run, ddp_model, signal, x, y, idx, epoch, config.state_path)
        seconds = time.perf_counter() - t0
        run.elapsed += seconds
        rows = [m.end_epoch(data, epoch, seconds) for m in run.members]
        Checkpointer(config.state_path).save(run.state(epoch + 1, dev))
        for cb in callbacks:
            for row in rows:
                cb.on_epoch_end(row)
    return _finish(run, signal, model, loss_fn)


def _start(model: nn.Module, data: DataBundle, loss_fn: nn.Module, config: FitConfig, signal: TeacherSignal,
           callbacks: list[Callback]) -> _Run:
    """Members, optimizers and scaler on the training device, a checkpoint restored, the teacher prepared."""
    cfg = config.train
    has_params = any(True for _ in loss_fn.parameters())
    dev = parallel.device()  # moved before the optimizers exist, so resumed optimizer state lands there too
    _move(dev, model, signal.teacher, loss_fn)
    # Under torchrun the batch stays the global batch: each rank takes its share of every step.
    batch_size = parallel.local_batch_size(getattr(cfg, "batch_size", None) or data.batch_size, len(data.train))
    total_steps = cfg.epochs * parallel.steps_per_epoch(len(data.train), batch_size)
    members = [_Member(config.role, model, cfg, total_steps, loss_fn if has_params else None)]
    if signal.trains_teacher:
        members.append(_Member(signal.role, signal.teacher, cfg, total_steps))
    run = _Run(members, loss_fn, parallel.grad_scaler(cfg.amp), callbacks)  # scaler: fp16 only
    run.batch_size = batch_size
    state = Checkpointer(config.state_path, config.resume).load()
    if state is not None:
        run.load(state, config.state_path)
    signal.prepare(data, dev, run.start_epoch, cfg.epochs)
    if state is not None:
        # After the teacher cache: iterating a DataLoader draws its base seed from the global RNG, which an
        # uninterrupted run did before epoch 1; restoring here makes dropout see the same random stream.
        restore_rng(state, dev)
    for cb in callbacks:
        cb.on_fit_start(config.role, cfg.epochs)
    return run


def _progress(loader, config: FitConfig, epoch: int):
    from tqdm.auto import tqdm

    # disable=None: no bar when the output is not a terminal (CI logs keep one line per epoch).
    return tqdm(loader, desc=f"{config.role:>8} {epoch + 1}/{config.train.epochs}", leave=False,
                disable=True if config.quiet else None, unit="batch", dynamic_ncols=True, mininterval=0.5)


def _train_step(run: _Run, ddp_model: nn.Module, signal: TeacherSignal, x: torch.Tensor, y: torch.Tensor,
                idx: torch.Tensor, epoch: int, state_path: Path) -> None:
    """One optimizer step of every member on one batch."""
    if signal.trains_teacher:  # a co-trained teacher runs after the student (their dropout draws keep this order)
        logits = ddp_model(x)
        targets = signal.targets(x, idx)
    else:  # a frozen teacher first: its activations are freed before the student's, kept for backward, fill memory
        targets = signal.targets(x, idx)
        logits = ddp_model(x)
    step_losses = signal.losses(run.loss_fn, logits, targets, y)
    for member, loss in zip(run.members, step_losses):
        _check_finite(loss, member.role, epoch, state_path)
    for member in run.members:
        member.opt.zero_grad(set_to_none=True)
    main_loss, *peer_losses = step_losses
    total = run.scaler.scale(main_loss) if run.scaler is not None else main_loss
    for loss in peer_losses:  # the graphs share nothing (targets are detached); only the student's loss is scaled
        total = total + loss
    total.backward()
    for i, (member, loss) in enumerate(zip(run.members, step_losses)):
        member.step(loss, len(y), run.scaler if i == 0 else None)


def _finish(run: _Run, signal: TeacherSignal, model: nn.Module, loss_fn: nn.Module) -> TrainResult:
    accel.release(model, signal.teacher)
    _move("cpu", model, signal.teacher, loss_fn)  # later stages (evaluation, saving, export) work on the CPU
    main, *peers = run.members
    result = main.result(run.elapsed)
    result.teacher_cache = getattr(signal, "info", None)
    if peers:
        result.peer = peers[0].result(run.elapsed)
    return result
