"""One training loop for the teacher, the scratch baseline and the distilled student.

Each epoch ends with an atomic checkpoint of everything needed to continue exactly (model, optimizer,
scheduler, fp16 grad scaler, CPU/CUDA RNG state, history, best weights); the shuffling order of epoch ``e``
depends only on the seed and ``e``, so a run resumed after epoch ``e`` continues as if it had never stopped
(under torchrun too: every rank resumes from rank 0's checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgekd.data import DataBundle
from edgekd.data.augment import Augmenter
from edgekd.distill import distributed, teacher_cache
from edgekd.errors import CheckpointError, TrainingError
from edgekd.recipe import TrainConfig
from edgekd.run_dir import atomic_path


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


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader, in loader order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    outs, ys = [], []
    for x, y, _ in loader:
        outs.append(model(x.to(_model_device(model))).cpu())
        ys.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(outs), torch.cat(ys)


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 (classes absent from both sides are ignored)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=np.arange(num_classes), average="macro",
                                                 zero_division=0)
    return {"test_accuracy": float((pred == labels).mean()), "precision_macro": float(p),
            "recall_macro": float(r), "f1_macro": float(f)}


def evaluate(model: nn.Module, data: DataBundle, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Classification metrics of ``model`` on one split."""
    logits, labels = predict_logits(model, data.loader(split, batch_size))
    return classification_metrics(logits.argmax(1).numpy(), labels.numpy(), data.num_classes)


def _optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:  # trainable parts of the loss (FitNets projections) learn with the model
        params += [p for p in extra.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    total_steps = max(1, total_steps)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.scheduler == "warmup_cosine":  # linear warm-up, then cosine decay to 0
        warm = int(round(cfg.warmup * total_steps))
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm
            else 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total_steps - warm)))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class _Member:
    """One trained model with its optimizer, schedule, history and best weights."""

    def __init__(self, role: str, model: nn.Module, cfg: TrainConfig, total_steps: int, extra: nn.Module | None = None):
        self.role, self.model, self.extra = role, model, extra
        self.opt = _optimizer(model, cfg, extra)
        self.sched = _scheduler(self.opt, cfg, total_steps)
        self.history: list[dict[str, Any]] = []
        self.best_val, self.best_epoch, self.best_state = -1.0, 0, copy.deepcopy(model.state_dict())
        # EMA of the weights (and BatchNorm buffers): validated, kept as "best" and saved instead of the raw ones.
        self.ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
            cfg.ema), use_buffers=True) if getattr(cfg, "ema", None) else None)
        self.total, self.count = 0.0, 0

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

    def step(self, loss: torch.Tensor, cfg: TrainConfig, scaler=None) -> None:
        distributed.sync_grads(self.extra)  # loss projections live outside DDP
        if scaler is not None:
            scaler.unscale_(self.opt)  # clip the true gradients, not the loss-scaled ones
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(self.opt)  # skipped when fp16 gradients overflowed; update() then lowers the scale
            scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def end_epoch(self, data: DataBundle, epoch: int, seconds: float) -> dict[str, Any]:
        distributed.sync_buffers(self.model)  # BatchNorm statistics of rank 0 everywhere: same val, same best
        judged = self.ema.module if self.ema is not None else self.model
        val_acc = evaluate(judged, data, "val")["test_accuracy"]
        row = {"model": self.role, "epoch": epoch + 1, "train_loss": distributed.global_mean(self.total, self.count),
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


def _check_finite(loss: torch.Tensor, role: str, epoch: int, state_path: Path) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{role} training diverged: the loss became {loss.item()} at epoch {epoch + 1}",
            f"epochs 1..{epoch} are kept in {state_path}; lower the learning rate or set grad_clip, then --resume")


def fit(role: str, model: nn.Module, data: DataBundle, cfg: TrainConfig, loss_fn: nn.Module, *, seed: int,
        state_path: Path, teacher: nn.Module | None = None, cache_teacher: bool = True, resume: bool = False,
        quiet: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        train_teacher: bool = False, teacher_role: str = "teacher", augment: Any = None, augment_seed: int | None = None,
        views_cache: Path | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs, keeping the weights with the best validation accuracy.

    Args:
        role: Name used in messages and history rows (``teacher``, ``baseline``, ``student``).
        model: The model to train (modified in place, then loaded with the best weights).
        data: The dataset; only the train and val splits are used.
        cfg: Optimizer, schedule and epoch budget.
        loss_fn: Called as ``loss_fn(logits, teacher_logits, labels)``; a loss with ``needs_features`` is
            called with ``features=`` too, its trainable parts (projections) are optimized with the model and
            its ``on_epoch_start(epoch)`` is called if it has one.
        seed: Seeds shuffling and augmentation; epoch ``e`` uses ``seed`` and ``e`` only.
        state_path: Where the per-epoch resumable checkpoint lives.
        teacher: A frozen teacher whose logits feed ``loss_fn`` (None for supervised training).
        cache_teacher: Compute teacher logits once for the whole train split (only without augmentation, and
            only for losses on logits: feature losses need the teacher's activations of every batch).
        resume: Continue from ``state_path`` if it exists.
        quiet: No progress bar.
        on_epoch: Called with each epoch's history row (after the checkpoint is written).
        train_teacher: Online distillation (deep mutual learning): the teacher is trained at the same time
            with the same settings and the same loss, mirrored (``loss_fn(teacher_logits, student_logits, y)``).
            Its result is ``TrainResult.peer``.
        teacher_role: Name of the teacher in history rows when ``train_teacher``.
        augment: Augmentation for this run instead of ``data.augment`` (a teacher's own ``augment``).
        augment_seed: Seed of the augmented views (default ``seed``); prune fine-tuning passes the run's seed
            so that it replays the distill stage's teacher cache.
        views_cache: Folder of the augmented-teacher cache (default: next to ``state_path``).

    Raises:
        TrainingError: The loss became NaN or infinite; the previous epoch's checkpoint is kept.
        RecipeError: A feature loss names modules the models do not have, or shapes it cannot compare.
    """
    from tqdm.auto import tqdm

    from edgekd import losses
    from edgekd.distill.features import FeatureTap, setup_feature_loss

    use_features = teacher is not None and losses.needs_features(loss_fn)
    if use_features:  # projections depend on feature shapes; create them before the optimizer sees them
        setup_feature_loss(loss_fn, model, teacher, data.train[0][0].unsqueeze(0), seed)
    has_params = any(True for _ in loss_fn.parameters())
    dev = distributed.device()  # moved before the optimizers exist, so resumed optimizer state lands there too
    for m in (model, teacher, loss_fn):
        if m is not None:
            m.to(dev)

    # Under torchrun data.batch_size stays the global batch: each rank takes its share of every step.
    batch_size = distributed.local_batch_size(data.batch_size, len(data.train))
    steps_per_epoch = distributed.steps_per_epoch(len(data.train), batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    main = _Member(role, model, cfg, total_steps, loss_fn if has_params else None)
    peer = _Member(teacher_role, teacher, cfg, total_steps) if train_teacher and teacher is not None else None
    amp = getattr(cfg, "amp", "off")
    scaler = distributed.grad_scaler(amp)  # fp16 only: loss scaling of the student's (main) loss
    start_epoch = 0
    elapsed = 0.0
    rng = None

    if resume and state_path.exists():
        state = _load_state(state_path)
        main.load(state)
        if "loss_state" in state:
            loss_fn.load_state_dict(state["loss_state"])
        if peer is not None:
            if "peer" not in state:
                raise CheckpointError(f"resume checkpoint {state_path} has no co-trained teacher",
                                      "it was written by another strategy; delete it to restart the student")
            peer.load(state["peer"])
        rng = state  # restored just before the first epoch: see below
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        elapsed = float(state["elapsed"])

    if teacher is not None:
        trainable = peer is not None
        if not trainable:
            teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(trainable)
    # Wrapped after resuming: DDP broadcasts rank 0's weights, so every rank starts from the same state.
    ddp_model = distributed.wrap(model, amp)
    ddp_peer = distributed.wrap(teacher) if peer is not None else teacher
    # -- augmentation: teacher and student see the same augmented (and mixed) batch -----------------------
    augmenter = Augmenter(data.augment if augment is None else augment, data,
                          seed if augment_seed is None else augment_seed)
    # Distill settings (baseline, student, prune fine-tuning) cycle through `teacher_views` views so that the
    # baseline sees exactly the student's images; a teacher's own training sees a fresh view every epoch.
    cycle = getattr(cfg, "teacher_views", None) if augmenter.active else None
    soft_labels = losses.accepts_soft_labels(loss_fn)
    cached = cached_views = cache_info = None
    if (teacher is not None and peer is None and not use_features and cache_teacher and start_epoch < cfg.epochs):
        if not augmenter.active:
            cached, _ = predict_logits(teacher, data.loader("train", 512))
        elif cycle:
            cached_views, cache_info = teacher_cache.load_or_build(
                teacher, data, augmenter, cycle, views_cache or state_path.parent, dev, write=distributed.is_main())
    # -- end augmentation setup --------------------------------------------------------------------------
    pairs = loss_fn.feature_layers() if use_features else []
    if rng is not None:
        # After the teacher cache: iterating a DataLoader draws its base seed from the global RNG, which an
        # uninterrupted run did before epoch 1; restoring here makes dropout see the same random stream.
        torch.set_rng_state(rng["rng"])
        if "cuda_rng" in rng and dev.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], dev)

    gen = torch.Generator()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen.manual_seed(seed * 100_003 + epoch)
        view = epoch % cycle if cycle else epoch
        loader = distributed.train_loader(data, batch_size, gen)
        model.train()
        loss_fn.train()
        if peer is not None:
            teacher.train()
        if hasattr(loss_fn, "on_epoch_start"):
            loss_fn.on_epoch_start(epoch)
        # disable=None: no bar when the output is not a terminal (CI logs keep one line per epoch, below).
        bar = tqdm(loader, desc=f"{role:>8} {epoch + 1}/{cfg.epochs}", leave=False, disable=True if quiet else None,
                   unit="batch", dynamic_ncols=True, mininterval=0.5)
        # Hooks exist only for the training batches: evaluation and saving below see the plain models.
        with contextlib.ExitStack() as taps:
            if use_features:
                s_tap = taps.enter_context(FeatureTap(model, [s for s, _ in pairs], "student"))
                t_tap = taps.enter_context(FeatureTap(teacher, [t for _, t in pairs], "teacher"))
            for x, y, idx in bar:
                x, y = x.to(dev), torch.as_tensor(y).to(dev)
                x, y = augmenter(x, y, idx, view, soft_labels=soft_labels)
                logits = ddp_model(x)
                peer_loss = None
                if teacher is None:
                    t_logits = None
                elif peer is not None:
                    t_logits = ddp_peer(x)
                elif cached is not None:
                    t_logits = cached[idx].to(dev)
                elif cached_views is not None:
                    t_logits = cached_views[view][idx].to(dev)
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                if use_features:
                    feats = losses.Features(student=s_tap.take(), teacher=t_tap.take())
                    loss = loss_fn(logits, t_logits, y, features=feats)
                elif peer is not None:
                    # Deep mutual learning: each model learns from the other's current predictions.
                    loss = loss_fn(logits, t_logits.detach(), y)
                    peer_loss = loss_fn(t_logits, logits.detach(), y)
                else:
                    loss = loss_fn(logits, t_logits, y)
                _check_finite(loss, role, epoch, state_path)
                if peer_loss is not None:
                    _check_finite(peer_loss, teacher_role, epoch, state_path)
                main.opt.zero_grad(set_to_none=True)
                if peer is not None:
                    peer.opt.zero_grad(set_to_none=True)
                    # The two graphs share nothing (targets are detached); only the student's loss is scaled.
                    ((scaler.scale(loss) if scaler is not None else loss) + peer_loss).backward()
                    peer.step(peer_loss, cfg)
                    peer.total += peer_loss.item() * len(y)
                    peer.count += len(y)
                else:
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                main.step(loss, cfg, scaler)
                main.total += loss.item() * len(y)
                main.count += len(y)
                bar.set_postfix(loss=f"{main.total / main.count:.4f}")
        seconds = time.perf_counter() - t0
        elapsed += seconds
        row = main.end_epoch(data, epoch, seconds)
        peer_row = peer.end_epoch(data, epoch, seconds) if peer is not None else None
        state = {**main.state(), "rng": torch.get_rng_state(), "epoch": epoch + 1, "elapsed": elapsed,
                 "loss_state": loss_fn.state_dict()}
        if peer is not None:
            state["peer"] = peer.state()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if dev.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(dev)
        _save_state(state_path, state)
        if not quiet:
            tqdm.write(f"{role:>8} epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                       f"val_acc {row['val_accuracy']:.4f}  {seconds:.1f}s")
            if peer_row is not None:
                tqdm.write(f"{teacher_role:>8} epoch {epoch + 1}/{cfg.epochs}  loss {peer_row['train_loss']:.4f}  "
                           f"val_acc {peer_row['val_accuracy']:.4f}")
        if on_epoch is not None:
            on_epoch(row)
            if peer_row is not None:
                on_epoch(peer_row)

    for m in (model, teacher, loss_fn):  # later stages (evaluation, saving, export) work on the CPU
        if m is not None:
            m.to("cpu")
    result = main.result(elapsed)
    result.teacher_cache = cache_info
    if peer is not None:
        result.peer = peer.result(elapsed)
    return result


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"resume checkpoint {path} is unreadable ({type(e).__name__})",
                              "delete it to restart that model from scratch") from None
