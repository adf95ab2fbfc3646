"""``edgekd distill``: data → teacher → baseline → student, each resumable, all recorded in the run directory."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import losses
from edgekd.data import DataBundle, load_data
from edgekd.distill.trainer import TrainResult, evaluate, fit
from edgekd.errors import DataError, RecipeError, RunDirError
from edgekd.models import build_model, count_macs_params, load_weights, save_checkpoint
from edgekd.recipe import Recipe, load_recipe, save_recipe
from edgekd.run_dir import RunDir, atomic_path, write_json_atomic, write_text_atomic

STAGE = "distill"


def new_run_dir(out: str | Path, name: str, resume: bool) -> RunDir:
    """``out/name`` for a new run (``name-2``, ``name-3``… if taken), or the existing one with ``resume``."""
    out = Path(out)
    rd = RunDir(out / name)
    if resume:
        if not rd.exists():
            raise RunDirError(f"nothing to resume: {rd.path} holds no run", "drop --resume to start a new run")
        return rd
    n = 2
    while rd.path.exists() and any(rd.path.iterdir()):
        rd = RunDir(out / f"{name}-{n}")
        n += 1
    return rd


def _check_same_recipe(recipe: Recipe, rd: RunDir) -> None:
    """Resuming with another recipe would mix two experiments in one run directory."""
    saved_path = rd / "recipe.yaml"
    if not saved_path.exists():
        return
    saved = load_recipe(saved_path).to_dict()
    now = recipe.to_dict()
    changed = [k for k in _flat(now) if _flat(now).get(k) != _flat(saved).get(k) and not k.startswith(_LATER_STAGES)]
    if changed:
        raise RecipeError(f"--resume: the recipe differs from the one {rd.path} started with ({', '.join(changed[:3])})",
                          f"resume with the same recipe and --set options, e.g. `edgekd distill {saved_path} --resume`")


# Sections read by later stages may change between stages; only what distill uses must match.
_LATER_STAGES = ("prune.", "export.", "validate.", "bench.")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("kwargs", "loss"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_data_files(data: DataBundle, rd: RunDir) -> None:
    """Write what later stages and devices need about the data: data.json, labels.txt, eval.npz."""
    write_json_atomic(rd / "data.json", data.describe())
    write_text_atomic(rd / "labels.txt", "\n".join(data.labels) + "\n")
    x, y = data.test.raw_arrays()
    with atomic_path(rd / "eval.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, x=x, y=y)
    rd.record_artifacts("data.json", "labels.txt", "eval.npz")


def _build(spec: str, kwargs: dict[str, Any], data: DataBundle, seed: int, role: str) -> nn.Module:
    torch.manual_seed(seed)  # the baseline and the student start from the same initial weights
    model = build_model(spec, data.input_shape, data.num_classes, kwargs)
    _check_fits(model, data, role)
    return model


def _check_fits(model: nn.Module, data: DataBundle, role: str) -> None:
    x = data.train[0][0].unsqueeze(0)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise DataError(f"the {role} model does not accept inputs of shape {tuple(x.shape)} ({first})",
                        f"pick a {role} model/kwargs that fit the data ({data.source})") from None
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise DataError(f"the {role} model outputs shape {tuple(out.shape)}, expected (1, {data.num_classes})",
                        "the model must return one logit per class")


class _History:
    """history.csv: every epoch of every trained model, rewritten atomically after each epoch."""

    FIELDS = ["model", "epoch", "train_loss", "val_accuracy", "lr", "seconds"]

    def __init__(self, rd: RunDir):
        self.path = rd / "history.csv"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def reset(self, role: str, rows: list[dict[str, Any]]) -> None:
        self.rows = [r for r in self.rows if r["model"] != role] + list(rows)
        self._write()

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if not (r["model"] == row["model"] and int(r["epoch"]) == row["epoch"])]
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())


def _train_role(role: str, model: nn.Module, spec: str, kwargs: dict[str, Any], data: DataBundle, recipe: Recipe,
                rd: RunDir, cfg, loss_fn: nn.Module, history: _History, resume: bool, quiet: bool,
                teacher: nn.Module | None = None) -> dict[str, Any]:
    """Train one model unless the run already holds it; save ``<role>.pt`` and return its metrics."""
    final = rd / f"{role}.pt"
    if resume and rd.stage_status(role) == "done" and final.exists():
        load_weights(model, final)
        return rd.manifest()["stages"][role].get("info", {})
    rd.stage_started(role)
    state_path = rd / "checkpoints" / f"{role}.state.pt"
    if not resume and state_path.exists():
        state_path.unlink()
    result: TrainResult = fit(role, model, data, cfg, loss_fn, seed=recipe.seed, state_path=state_path,
                              teacher=teacher, cache_teacher=recipe.distill.cache_teacher, resume=resume,
                              quiet=quiet, on_epoch=history.add)
    history.reset(role, result.history)
    save_checkpoint(final, model, spec, kwargs, data.input_shape, data.num_classes,
                    best_epoch=result.best_epoch, val_accuracy=result.best_val_accuracy)
    epoch_s = result.epoch_seconds
    info = {"train_seconds": round(result.seconds, 3), "epochs": len(result.history),
            "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
            "epoch_seconds_median": float(np.median(epoch_s)) if epoch_s else None}
    rd.record_artifacts(f"{role}.pt")
    rd.stage_done(role, artifact=f"{role}.pt", info=info)
    return info


def _describe_model(model: nn.Module, data: DataBundle, spec: str) -> dict[str, Any]:
    macs, params = count_macs_params(model, data.input_shape)
    return {"model": spec, "params": params, "macs": macs}


def run_distill(recipe: Recipe, out: str | Path = "exported", resume: bool = False, quiet: bool = False,
                allow_pickle: bool = False) -> RunDir:
    """Run the distill stage end to end and return its run directory.

    The teacher is loaded from ``teacher.checkpoint`` or trained; the student architecture is trained from
    scratch (``baseline``, if the recipe asks) and by distillation from the frozen teacher (``student``).
    Everything that can be checked before training (data, models, checkpoints, loss) is checked before the
    run directory is created, so bad input leaves nothing behind.
    """
    t_start = time.perf_counter()
    data = load_data(recipe.data, recipe.seed)
    tcfg, scfg = recipe.teacher, recipe.student
    teacher = _build(tcfg.model, tcfg.kwargs, data, recipe.seed, "teacher")
    if tcfg.checkpoint:
        load_weights(teacher, tcfg.checkpoint, allow_pickle=allow_pickle)
    students = {role: _build(scfg.model, scfg.kwargs, data, recipe.seed, "student")
                for role in (["baseline"] if recipe.distill.baseline else []) + ["student"]}
    if scfg.checkpoint:
        for model in students.values():
            load_weights(model, scfg.checkpoint, allow_pickle=allow_pickle)
    loss_kwargs = dict(recipe.distill.loss)
    kd_loss = losses.build(loss_kwargs.pop("name"), **loss_kwargs)
    ce = losses.build("ce")

    rd = new_run_dir(out, recipe.name, resume)
    if rd.name != recipe.name:  # the name was taken: the saved recipe names the directory it lives in
        recipe = recipe.model_copy(update={"name": rd.name})
    if resume:
        _check_same_recipe(recipe, rd)
    rd.path.mkdir(parents=True, exist_ok=True)
    if not resume or not (rd / "recipe.yaml").exists():
        save_recipe(recipe, rd / "recipe.yaml")
        rd.record_artifacts("recipe.yaml")
    rd.stage_started(STAGE)
    write_data_files(data, rd)
    history = _History(rd)
    results: dict[str, dict[str, Any]] = {}

    # Teacher: given weights, or trained here with plain cross-entropy.
    if tcfg.checkpoint:
        save_checkpoint(rd / "teacher.pt", teacher, tcfg.model, tcfg.kwargs, data.input_shape, data.num_classes,
                        source=str(tcfg.checkpoint))
        rd.record_artifacts("teacher.pt")
        rd.stage_done("teacher", artifact="teacher.pt", source=str(tcfg.checkpoint))
        info = {"train_seconds": 0.0, "source": str(tcfg.checkpoint)}
    else:
        info = _train_role("teacher", teacher, tcfg.model, tcfg.kwargs, data, recipe, rd, tcfg, ce, history,
                           resume, quiet)
    results["teacher"] = {**info, **_describe_model(teacher, data, tcfg.model)}
    teacher.eval()

    for role, model in students.items():
        is_kd = role == "student"
        info = _train_role(role, model, scfg.model, scfg.kwargs, data, recipe, rd, recipe.distill,
                           kd_loss if is_kd else ce, history, resume, quiet, teacher=teacher if is_kd else None)
        results[role] = {**info, **_describe_model(model, data, scfg.model)}
    results["student"]["loss"] = recipe.distill.loss

    models = {"teacher": teacher, **students}
    for role, model in models.items():
        rd.update_metrics(role, {**evaluate(model, data, "test"), **results[role]})
    rd.record_artifacts("history.csv")
    rd.stage_done(STAGE, seconds=round(time.perf_counter() - t_start, 2),
                  artifacts=["recipe.yaml", "data.json", "labels.txt", "eval.npz", "history.csv",
                             *[f"{r}.pt" for r in models]])
    return rd
