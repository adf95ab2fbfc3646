"""One training loop for the teacher, the scratch baseline and the distilled student.

Each epoch ends with an atomic checkpoint of everything needed to continue exactly (model, optimizer,
scheduler, RNG state, history, best weights); the shuffling order of epoch ``e`` depends only on the seed
and ``e``, so a run resumed after epoch ``e`` continues as if it had never stopped.
"""

from __future__ import annotations

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

    @property
    def epoch_seconds(self) -> list[float]:
        return [row["seconds"] for row in self.history]


@torch.no_grad()
def predict_logits(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader, in loader order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    outs, ys = [], []
    for x, y, _ in loader:
        outs.append(model(x))
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


def _augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return x
    if kind == "flip":
        flip = torch.rand(len(x), generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
    # "shift": translate each image by up to 2 px in each direction (zero fill).
    shifts = torch.randint(-2, 3, (len(x), 2), generator=gen)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, 2 + dy: 2 + dy + h, 2 + dx: 2 + dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
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
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def fit(role: str, model: nn.Module, data: DataBundle, cfg: TrainConfig, loss_fn: nn.Module, *, seed: int,
        state_path: Path, teacher: nn.Module | None = None, cache_teacher: bool = True, resume: bool = False,
        quiet: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs, keeping the weights with the best validation accuracy.

    Args:
        role: Name used in messages and history rows (``teacher``, ``baseline``, ``student``).
        model: The model to train (modified in place, then loaded with the best weights).
        data: The dataset; only the train and val splits are used.
        cfg: Optimizer, schedule and epoch budget.
        loss_fn: Called as ``loss_fn(logits, teacher_logits, labels)``.
        seed: Seeds shuffling and augmentation; epoch ``e`` uses ``seed`` and ``e`` only.
        state_path: Where the per-epoch resumable checkpoint lives.
        teacher: A frozen teacher whose logits feed ``loss_fn`` (None for supervised training).
        cache_teacher: Compute teacher logits once for the whole train split (only without augmentation).
        resume: Continue from ``state_path`` if it exists.
        quiet: No progress bar.
        on_epoch: Called with each epoch's history row (after the checkpoint is written).

    Raises:
        TrainingError: The loss became NaN or infinite; the previous epoch's checkpoint is kept.
    """
    from tqdm.auto import tqdm

    batch_size = data.batch_size
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    best_val, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    start_epoch = 0
    elapsed = 0.0

    if resume and state_path.exists():
        state = _load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history, start_epoch = state["history"], int(state["epoch"])
        best_val, best_epoch, best_state = float(state["best_val"]), int(state["best_epoch"]), state["best_model"]
        elapsed = float(state["elapsed"])

    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    cached = None
    if teacher is not None and cache_teacher and data.augment == "none" and start_epoch < cfg.epochs:
        cached, _ = predict_logits(teacher, data.loader("train", 512))

    gen = torch.Generator()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen.manual_seed(seed * 100_003 + epoch)
        loader = data.loader("train", batch_size, shuffle=True, generator=gen)
        model.train()
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"{role:>8} {epoch + 1}/{cfg.epochs}", leave=False, disable=quiet,
                   unit="batch", dynamic_ncols=True, mininterval=0.5)
        for x, y, idx in bar:
            x = _augment(x, data.augment, gen)
            logits = model(x)
            if teacher is None:
                t_logits = None
            elif cached is not None:
                t_logits = cached[idx]
            else:
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = loss_fn(logits, t_logits, y)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{role} training diverged: the loss became {loss.item()} at epoch {epoch + 1}",
                    f"epochs 1..{epoch} are kept in {state_path}; lower the learning rate or set grad_clip, then --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        seconds = time.perf_counter() - t0
        val_acc = evaluate(model, data, "val")["test_accuracy"]
        elapsed += seconds
        row = {"model": role, "epoch": epoch + 1, "train_loss": total / max(count, 1), "val_accuracy": val_acc,
               "lr": opt.param_groups[0]["lr"], "seconds": seconds}
        history.append(row)
        if val_acc > best_val:
            best_val, best_epoch, best_state = val_acc, epoch + 1, copy.deepcopy(model.state_dict())
        _save_state(state_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(), "history": history, "epoch": epoch + 1, "best_val": best_val,
            "best_epoch": best_epoch, "best_model": best_state, "elapsed": elapsed,
        })
        if not quiet:
            tqdm.write(f"{role:>8} epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                       f"val_acc {val_acc:.4f}  {seconds:.1f}s")
        if on_epoch is not None:
            on_epoch(row)

    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, history=history, seconds=elapsed, best_epoch=best_epoch,
                       best_val_accuracy=best_val)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"resume checkpoint {path} is unreadable ({type(e).__name__})",
                              "delete it to restart that model from scratch") from None
