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
from edgekd.distill.features import setup_feature_loss
from edgekd.distill.strategies import TeacherEnsemble, check_strategy, generation_roles, teacher_roles
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
                teacher: nn.Module | None = None, seed: int | None = None, augment: Any = None) -> dict[str, Any]:
    """Train one model unless the run already holds it; save ``<role>.pt`` and return its metrics."""
    final = rd / f"{role}.pt"
    if resume and rd.stage_status(role) == "done" and final.exists():
        load_weights(model, final)
        return rd.manifest()["stages"][role].get("info", {})
    rd.stage_started(role)
    state_path = rd / "checkpoints" / f"{role}.state.pt"
    if not resume and state_path.exists():
        state_path.unlink()
    result: TrainResult = fit(role, model, data, cfg, loss_fn, seed=recipe.seed if seed is None else seed,
                              state_path=state_path, teacher=teacher, cache_teacher=recipe.distill.cache_teacher,
                              resume=resume, quiet=quiet, on_epoch=history.add, augment=augment)
    extra = {}
    if result.teacher_cache:  # size and one-off cost of the augmented-teacher cache (not the path: runs move)
        extra["teacher_cache"] = {k: result.teacher_cache[k] for k in ("views", "bytes", "build_seconds", "reused")}
    return _finish_role(role, result, spec, kwargs, data, rd, history, **extra)


def _finish_role(role: str, result: TrainResult, spec: str, kwargs: dict[str, Any], data: DataBundle, rd: RunDir,
                 history: _History, **extra: Any) -> dict[str, Any]:
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


def _given_teacher(role: str, model: nn.Module, tcfg, data: DataBundle, rd: RunDir) -> dict[str, Any]:
    """Record a teacher loaded from ``checkpoint`` as ``<role>.pt``."""
    save_checkpoint(rd / f"{role}.pt", model, tcfg.model, tcfg.kwargs, data.input_shape, data.num_classes,
                    source=str(tcfg.checkpoint))
    rd.record_artifacts(f"{role}.pt")
    rd.stage_done(role, artifact=f"{role}.pt", source=str(tcfg.checkpoint))
    return {"train_seconds": 0.0, "source": str(tcfg.checkpoint)}


def _describe_model(model: nn.Module, data: DataBundle, spec: str) -> dict[str, Any]:
    macs, params = count_macs_params(model, data.input_shape)
    return {"model": spec, "params": params, "macs": macs}


def build_teachers(recipe: Recipe, data: DataBundle, allow_pickle: bool = False) -> dict[str, nn.Module]:
    """The recipe's teachers by role (``teacher``, ``teacher2``...), built and loaded from their checkpoints.

    Each teacher ``i`` is initialized (and, if trained, shuffled) with ``seed + i`` so that teachers of the same
    architecture differ.
    """
    models = {}
    for i, (role, tcfg) in enumerate(zip(teacher_roles(len(recipe.teacher_configs())), recipe.teacher_configs())):
        model = _build(tcfg.model, tcfg.kwargs, data, recipe.seed + i, "teacher")
        if tcfg.checkpoint:
            load_weights(model, tcfg.checkpoint, allow_pickle=allow_pickle)
        models[role] = model
    return models


def train_teachers(recipe: Recipe, teachers: dict[str, nn.Module], data: DataBundle, rd: RunDir, history: _History,
                   resume: bool, quiet: bool) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Offline teachers: load or train each (cross-entropy), then freeze; return the one the student learns from.

    Returns:
        The teacher module for the student (a :class:`TeacherEnsemble` for several) and per-role training info.
    """
    ce = losses.build("ce")
    results: dict[str, dict[str, Any]] = {}
    for i, (tcfg, (role, model)) in enumerate(zip(recipe.teacher_configs(), teachers.items())):
        if tcfg.checkpoint:
            info = _given_teacher(role, model, tcfg, data, rd)
        else:
            info = _train_role(role, model, tcfg.model, tcfg.kwargs, data, recipe, rd, tcfg, ce, history, resume,
                               quiet, seed=recipe.seed + i, augment=tcfg.augment)
        results[role] = {**info, **_describe_model(model, data, tcfg.model)}
        model.eval()
    if len(teachers) == 1:
        return teachers["teacher"], results
    weights = [t.weight for t in recipe.teachers] if recipe.teachers[0].weight is not None else None
    return TeacherEnsemble(list(teachers.values()), weights, recipe.distill.ensemble).eval(), results


def _train_online(student: nn.Module, teacher: nn.Module, data: DataBundle, recipe: Recipe, rd: RunDir,
                  loss_fn: nn.Module, history: _History, resume: bool, quiet: bool) -> tuple[dict, dict]:
    """Deep mutual learning: teacher and student trained together; saves both. Returns their infos."""
    tcfg, scfg = recipe.teacher, recipe.student
    if resume and rd.stage_status("student") == "done" and (rd / "student.pt").exists() and (rd / "teacher.pt").exists():
        load_weights(student, rd / "student.pt")
        load_weights(teacher, rd / "teacher.pt")
        stages = rd.manifest()["stages"]
        return stages["student"].get("info", {}), stages["teacher"].get("info", {})
    rd.stage_started("teacher")
    rd.stage_started("student")
    state_path = rd / "checkpoints" / "student.state.pt"
    if not resume and state_path.exists():
        state_path.unlink()
    result = fit("student", student, data, recipe.distill, loss_fn, seed=recipe.seed, state_path=state_path,
                 teacher=teacher, resume=resume, quiet=quiet, on_epoch=history.add, train_teacher=True)
    t_info = _finish_role("teacher", result.peer, tcfg.model, tcfg.kwargs, data, rd, history, strategy="online",
                          **({"source": str(tcfg.checkpoint)} if tcfg.checkpoint else {}))
    s_info = _finish_role("student", result, scfg.model, scfg.kwargs, data, rd, history)
    return s_info, t_info


def _copy_role(role: str, source_role: str, model: nn.Module, source: nn.Module, spec: str, kwargs: dict[str, Any],
               data: DataBundle, rd: RunDir, resume: bool) -> dict[str, Any]:
    """``<role>.pt`` = the weights of an already trained role (same architecture, same training)."""
    if resume and rd.stage_status(role) == "done" and (rd / f"{role}.pt").exists():
        load_weights(model, rd / f"{role}.pt")
        return rd.manifest()["stages"][role].get("info", {})
    model.load_state_dict(source.state_dict())
    save_checkpoint(rd / f"{role}.pt", model, spec, kwargs, data.input_shape, data.num_classes, source=f"{source_role}.pt")
    info = {**rd.manifest()["stages"][source_role].get("info", {}), "source": f"{source_role}.pt"}
    rd.record_artifacts(f"{role}.pt")
    rd.stage_done(role, artifact=f"{role}.pt", info=info)
    return info


def run_distill(recipe: Recipe, out: str | Path = "exported", resume: bool = False, quiet: bool = False,
                allow_pickle: bool = False) -> RunDir:
    """Run the distill stage end to end and return its run directory.

    ``distill.strategy`` decides who teaches the student (``student.pt``):

    * ``offline``: the teacher (or each of ``teachers``) is loaded from its checkpoint or trained with
      cross-entropy, then frozen; the student learns from it (from their combined soft targets).
    * ``online``: teacher and student are trained together (deep mutual learning); both are saved.
    * ``self``: ``teacher.pt`` is generation 0, the student architecture trained on labels (the same training
      as the baseline, so its weights are copied when the baseline is trained); generations
      ``student_gen1.pt``... each learn from the previous one; the last is ``student.pt``.

    The student architecture is also trained from scratch (``baseline``) if the recipe asks. Everything that can
    be checked before training (data, models, checkpoints, loss, feature layers) is checked before the run
    directory is created, so bad input leaves nothing behind.
    """
    t_start = time.perf_counter()
    data = load_data(recipe.data, recipe.seed)
    dcfg, scfg = recipe.distill, recipe.student
    strategy = dcfg.strategy
    kd_loss = losses.build_from_config(dcfg.loss)
    ce = losses.build("ce")
    check_strategy(recipe, kd_loss)
    teachers = build_teachers(recipe, data, allow_pickle) if strategy != "self" else {}

    def student_model(role: str) -> nn.Module:
        model = _build(scfg.model, scfg.kwargs, data, recipe.seed, "student")
        if scfg.checkpoint:
            load_weights(model, scfg.checkpoint, allow_pickle=allow_pickle)
        return model

    roles = (["baseline"] if dcfg.baseline else []) + ["student"]
    students = {role: student_model(role) for role in roles}
    if losses.needs_features(kd_loss):
        # Module paths and feature shapes are checked now, not after the teacher has trained for an hour.
        reference = teachers["teacher"] if teachers else student_model("teacher")
        setup_feature_loss(kd_loss, students["student"], reference, data.train[0][0].unsqueeze(0), recipe.seed)

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
    models: dict[str, nn.Module] = {}
    ensemble = None

    if strategy == "offline":
        teacher, results = train_teachers(recipe, teachers, data, rd, history, resume, quiet)
        models.update(teachers)
        if len(teachers) > 1:
            ensemble = teacher
    if "baseline" in students:
        info = _train_role("baseline", students["baseline"], scfg.model, scfg.kwargs, data, recipe, rd, dcfg, ce,
                           history, resume, quiet)
        results["baseline"] = {**info, **_describe_model(students["baseline"], data, scfg.model)}
        models["baseline"] = students["baseline"]

    student = students["student"]
    if strategy == "offline":
        info = _train_role("student", student, scfg.model, scfg.kwargs, data, recipe, rd, dcfg, kd_loss, history,
                           resume, quiet, teacher=teacher)
    elif strategy == "online":
        teacher = teachers["teacher"]
        info, t_info = _train_online(student, teacher, data, recipe, rd, kd_loss, history, resume, quiet)
        results["teacher"] = {**t_info, **_describe_model(teacher, data, recipe.teacher.model)}
        models = {"teacher": teacher, **models}
    else:  # self: born-again generations of the student architecture
        teacher = student_model("teacher")
        if "baseline" in students:  # generation 0 would repeat the baseline's training exactly
            t_info = _copy_role("teacher", "baseline", teacher, students["baseline"], scfg.model, scfg.kwargs, data,
                                rd, resume)
        else:
            t_info = _train_role("teacher", teacher, scfg.model, scfg.kwargs, data, recipe, rd, dcfg, ce, history,
                                 resume, quiet)
        results["teacher"] = {**t_info, **_describe_model(teacher, data, scfg.model), "generation": 0}
        models = {"teacher": teacher, **models}
        for g, role in enumerate(generation_roles(dcfg.generations), start=1):
            model = student if role == "student" else student_model(role)
            info = _train_role(role, model, scfg.model, scfg.kwargs, data, recipe, rd, dcfg, kd_loss, history,
                               resume, quiet, teacher=teacher)
            if role != "student":
                results[role] = {**info, **_describe_model(model, data, scfg.model), "generation": g}
                models[role] = model
            teacher = model
        info = {**info, "generation": dcfg.generations}
    results["student"] = {**info, **_describe_model(student, data, scfg.model), "loss": dcfg.loss,
                          "strategy": strategy}
    models["student"] = student

    for role, model in models.items():
        rd.update_metrics(role, {**evaluate(model, data, "test"), **results[role]})
    if ensemble is not None:
        rd.update_metrics("teacher_ensemble", {**evaluate(ensemble, data, "test"), "teachers": list(teachers),
                                               "weights": ensemble.weights.tolist(), "space": ensemble.space})
    rd.record_artifacts("history.csv")
    rd.stage_done(STAGE, seconds=round(time.perf_counter() - t_start, 2),
                  artifacts=["recipe.yaml", "data.json", "labels.txt", "eval.npz", "history.csv",
                             *[f"{r}.pt" for r in models]])
    return rd
