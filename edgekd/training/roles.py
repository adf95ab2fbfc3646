"""Recipe-level building blocks shared by the distill stage and the sweep: build a recipe's models, train one
role into a run directory (``<role>.pt``, its manifest entry, its rows of ``history.csv``), train or load the
teachers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import losses
from edgekd.data import DataBundle
from edgekd.errors import DataError
from edgekd.models import build_model, count_macs_params, load_weights, save_checkpoint
from edgekd.recipe import Recipe
from edgekd.run_dir import RunDir
from edgekd.training import loop
from edgekd.training.callbacks import HistoryFile
from edgekd.training.strategies import TeacherEnsemble, teacher_roles


def build_model_for(spec: str, kwargs: dict[str, Any], data: DataBundle, seed: int, role: str) -> nn.Module:
    """Build model ``spec`` for ``data`` from ``seed`` and check it maps one input to one logit per class.

    The seed is set just before building, so models built with the same seed (the baseline and the student)
    start from the same weights.

    Raises:
        DataError: The model does not accept the data's inputs or does not output ``num_classes`` logits.
    """
    torch.manual_seed(seed)
    model = build_model(spec, data.input_shape, data.num_classes, kwargs)
    check_fits(model, data, role)
    return model


def check_fits(model: nn.Module, data: DataBundle, role: str) -> None:
    """One training sample through ``model`` (eval mode): it must give ``(1, num_classes)`` logits.

    Raises:
        DataError: With the model's own error as the cause.
    """
    x = data.train[0][0].unsqueeze(0)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise DataError(f"the {role} model does not accept inputs of shape {tuple(x.shape)} ({first})",
                        f"pick a {role} model/kwargs that fit the data ({data.source})") from e
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise DataError(f"the {role} model outputs shape {tuple(out.shape)}, expected (1, {data.num_classes})",
                        "the model must return one logit per class")


def describe_model(model: nn.Module, data: DataBundle, spec: str) -> dict[str, Any]:
    """``{"model", "params", "macs"}`` of a model for ``metrics.json``."""
    macs, params = count_macs_params(model, data.input_shape)
    return {"model": spec, "params": params, "macs": macs}


def train_role(role: str, model: nn.Module, spec: str, kwargs: dict[str, Any], data: DataBundle, recipe: Recipe,
               rd: RunDir, cfg, loss_fn: nn.Module, history: HistoryFile, resume: bool, quiet: bool,
               teacher: nn.Module | None = None, seed: int | None = None) -> dict[str, Any]:
    """Train one model unless the run already holds it; save ``<role>.pt`` and return its training info.

    Its per-epoch state lives in ``checkpoints/<role>.state.pt`` (continued with ``resume``, else removed).
    """
    final = rd / f"{role}.pt"
    if resume and rd.stage_status(role) == "done" and final.exists():
        load_weights(model, final)
        return rd.manifest()["stages"][role].get("info", {})
    rd.stage_started(role)
    state_path = rd / "checkpoints" / f"{role}.state.pt"
    if not resume and state_path.exists():
        state_path.unlink()
    config = loop.FitConfig(role=role, train=cfg, seed=recipe.seed if seed is None else seed, state_path=state_path,
                            resume=resume, quiet=quiet, cache_teacher=recipe.distill.cache_teacher)
    result = loop.fit(model, data, loss_fn, config, teacher=teacher, callbacks=[history])
    return finish_role(role, result, spec, kwargs, data, rd, history)


def finish_role(role: str, result: loop.TrainResult, spec: str, kwargs: dict[str, Any], data: DataBundle,
                rd: RunDir, history: HistoryFile, **extra: Any) -> dict[str, Any]:
    """Save a trained model as ``<role>.pt``, record it in the manifest and return its training info."""
    history.reset(role, result.history)
    save_checkpoint(rd / f"{role}.pt", result.model, spec, kwargs, data.input_shape, data.num_classes,
                    best_epoch=result.best_epoch, val_accuracy=result.best_val_accuracy)
    epoch_s = result.epoch_seconds
    info = {"train_seconds": round(result.seconds, 3), "epochs": len(result.history),
            "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
            "epoch_seconds_median": float(np.median(epoch_s)) if epoch_s else None, **extra}
    rd.record_artifacts(f"{role}.pt")
    rd.stage_done(role, artifact=f"{role}.pt", info=info)
    return info


def record_given_teacher(role: str, model: nn.Module, tcfg, data: DataBundle, rd: RunDir) -> dict[str, Any]:
    """Record a teacher loaded from ``checkpoint`` as ``<role>.pt``."""
    save_checkpoint(rd / f"{role}.pt", model, tcfg.model, tcfg.kwargs, data.input_shape, data.num_classes,
                    source=str(tcfg.checkpoint))
    rd.record_artifacts(f"{role}.pt")
    rd.stage_done(role, artifact=f"{role}.pt", source=str(tcfg.checkpoint))
    return {"train_seconds": 0.0, "source": str(tcfg.checkpoint)}


def build_teachers(recipe: Recipe, data: DataBundle, allow_pickle: bool = False) -> dict[str, nn.Module]:
    """The recipe's teachers by role (``teacher``, ``teacher2``...), built and loaded from their checkpoints.

    Each teacher ``i`` is initialized (and, if trained, shuffled) with ``seed + i`` so that teachers of the same
    architecture differ.
    """
    models = {}
    for i, (role, tcfg) in enumerate(zip(teacher_roles(len(recipe.teacher_configs())), recipe.teacher_configs())):
        model = build_model_for(tcfg.model, tcfg.kwargs, data, recipe.seed + i, "teacher")
        if tcfg.checkpoint:
            load_weights(model, tcfg.checkpoint, allow_pickle=allow_pickle)
        models[role] = model
    return models


def train_teachers(recipe: Recipe, teachers: dict[str, nn.Module], data: DataBundle, rd: RunDir,
                   history: HistoryFile, resume: bool, quiet: bool) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Offline teachers: load or train each (cross-entropy), then freeze; return the one the student learns from.

    Returns:
        The teacher module for the student (a :class:`TeacherEnsemble` for several) and per-role training info.
    """
    ce = losses.build("ce")
    results: dict[str, dict[str, Any]] = {}
    for i, (tcfg, (role, model)) in enumerate(zip(recipe.teacher_configs(), teachers.items())):
        if tcfg.checkpoint:
            info = record_given_teacher(role, model, tcfg, data, rd)
        else:
            info = train_role(role, model, tcfg.model, tcfg.kwargs, data, recipe, rd, tcfg, ce, history, resume,
                              quiet, seed=recipe.seed + i)
        results[role] = {**info, **describe_model(model, data, tcfg.model)}
        model.eval()
    if len(teachers) == 1:
        return teachers["teacher"], results
    weights = [t.weight for t in recipe.teachers] if recipe.teachers[0].weight is not None else None
    return TeacherEnsemble(list(teachers.values()), weights, recipe.distill.ensemble).eval(), results
