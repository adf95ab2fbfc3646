"""``edgekd distill``: data → teacher → baseline → student, each resumable, all recorded in the run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import losses
from edgekd.distill import side
from edgekd.data import DataBundle, load_data
from edgekd.errors import RecipeError, RunDirError
from edgekd.models import load_weights, save_checkpoint
from edgekd.recipe import Recipe, load_recipe, save_recipe, without_execution_keys
from edgekd.run_dir import RunDir, atomic_path, write_json_atomic, write_text_atomic
from edgekd.training import FitConfig, HistoryFile, PeerTeacher, check_strategy, evaluate, fit, generation_roles
from edgekd.training.features import setup_feature_loss
from edgekd.training.roles import (build_model_for, build_teachers, describe_model, finish_role, train_role,
                                   train_teachers)

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
    saved = without_execution_keys(load_recipe(saved_path).to_dict())
    now = without_execution_keys(recipe.to_dict())
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


def _train_online(student: nn.Module, teacher: nn.Module, data: DataBundle, recipe: Recipe, rd: RunDir,
                  loss_fn: nn.Module, history: HistoryFile, resume: bool, quiet: bool) -> tuple[dict, dict]:
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
    config = FitConfig(role="student", train=recipe.distill, seed=recipe.seed, state_path=state_path, resume=resume,
                       quiet=quiet)
    result = fit(student, data, loss_fn, config, teacher=PeerTeacher(teacher), callbacks=[history])
    t_info = finish_role("teacher", result.peer, tcfg.model, tcfg.kwargs, data, rd, history, strategy="online",
                         **({"source": str(tcfg.checkpoint)} if tcfg.checkpoint else {}))
    s_info = finish_role("student", result, scfg.model, scfg.kwargs, data, rd, history)
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


class _Distill:
    """One distill run: the checked inputs, then the run directory and what each role produced."""

    def __init__(self, recipe: Recipe, allow_pickle: bool, resume: bool, quiet: bool):
        self.recipe, self.allow_pickle, self.resume, self.quiet = recipe, allow_pickle, resume, quiet
        self.data = load_data(recipe.data, recipe.seed)
        self.kd_loss = losses.build_from_config(recipe.distill.loss)
        self.ce = losses.build("ce")
        check_strategy(recipe, self.kd_loss)
        self.teachers = build_teachers(recipe, self.data, allow_pickle) if recipe.distill.strategy != "self" else {}
        roles = (["baseline"] if recipe.distill.baseline else []) + ["student"]
        self.students = {role: self.student_model() for role in roles}
        if losses.needs_features(self.kd_loss):
            # Module paths and feature shapes are checked now, not after the teacher has trained for an hour.
            reference = self.teachers["teacher"] if self.teachers else self.student_model()
            setup_feature_loss(self.kd_loss, self.students["student"], reference,
                               self.data.train[0][0].unsqueeze(0), recipe.seed)
        self.results: dict[str, dict[str, Any]] = {}
        self.models: dict[str, nn.Module] = {}
        self.ensemble: nn.Module | None = None

    def student_model(self) -> nn.Module:
        """A fresh student-architecture model (same initial weights every time), loaded if the recipe says so."""
        scfg = self.recipe.student
        model = build_model_for(scfg.model, scfg.kwargs, self.data, self.recipe.seed, "student")
        if scfg.checkpoint:
            load_weights(model, scfg.checkpoint, allow_pickle=self.allow_pickle)
        return model

    def open(self, out: str | Path) -> None:
        """Create (or reopen, with resume) the run directory and write the recipe and data files."""
        self.rd = rd = new_run_dir(out, self.recipe.name, self.resume)
        if rd.name != self.recipe.name:  # the name was taken: the saved recipe names the directory it lives in
            self.recipe = self.recipe.model_copy(update={"name": rd.name})
        if self.resume:
            _check_same_recipe(self.recipe, rd)
        rd.path.mkdir(parents=True, exist_ok=True)
        if not self.resume or not (rd / "recipe.yaml").exists():
            save_recipe(self.recipe, rd / "recipe.yaml")
            rd.record_artifacts("recipe.yaml")
        rd.stage_started(STAGE)
        write_data_files(self.data, rd)
        self.history = HistoryFile(rd / "history.csv")

    def train(self, role: str, model: nn.Module, loss_fn: nn.Module, teacher: nn.Module | None = None,
              first: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Train one student-architecture role (or load it on resume) and keep its results.

        ``first`` goes into its metrics before the model description, ``extra`` after it.
        """
        scfg = self.recipe.student
        info = train_role(role, model, scfg.model, scfg.kwargs, self.data, self.recipe, self.rd, self.recipe.distill,
                          loss_fn, self.history, self.resume, self.quiet, teacher=teacher)
        self.results[role] = {**info, **(first or {}), **describe_model(model, self.data, scfg.model), **extra}
        self.models[role] = model
        return info

    def offline(self) -> None:
        teacher, self.results = train_teachers(self.recipe, self.teachers, self.data, self.rd, self.history,
                                               self.resume, self.quiet)
        self.models.update(self.teachers)
        if len(self.teachers) > 1:
            self.ensemble = teacher
        if side.wanted(self.recipe) and not (self.resume and self.rd.stage_status("baseline") == "done"):
            self.side_by_side(teacher)
            return
        self.baseline()
        self.train("student", self.students["student"], self.kd_loss, teacher=teacher)

    def side_by_side(self, teacher: nn.Module) -> None:
        """The baseline in a second process while this one trains the KD student (see :mod:`.side`)."""
        process = side.BaselineProcess(self.recipe, self.rd, self.resume, self.allow_pickle)
        process.start()
        try:
            self.train("student", self.students["student"], self.kd_loss, teacher=teacher)
        except BaseException:
            process.stop()
            raise
        info = process.finish(self.history)
        model = self.students["baseline"]
        load_weights(model, self.rd / "baseline.pt")
        scfg = self.recipe.student
        self.results = {**{k: v for k, v in self.results.items() if k != "student"},
                        "baseline": {**info, **describe_model(model, self.data, scfg.model)},
                        "student": self.results["student"]}
        self.models = {**{k: v for k, v in self.models.items() if k != "student"}, "baseline": model,
                       "student": self.models["student"]}

    def online(self) -> None:
        self.baseline()
        teacher, student = self.teachers["teacher"], self.students["student"]
        info, t_info = _train_online(student, teacher, self.data, self.recipe, self.rd, self.kd_loss, self.history,
                                     self.resume, self.quiet)
        self.results["teacher"] = {**t_info, **describe_model(teacher, self.data, self.recipe.teacher.model)}
        self.results["student"] = {**info, **describe_model(student, self.data, self.recipe.student.model)}
        self.models = {"teacher": teacher, **self.models, "student": student}

    def born_again(self) -> None:
        """Generation 0 (``teacher``) on labels, then each generation distilled from the previous one."""
        self.baseline()
        scfg, dcfg = self.recipe.student, self.recipe.distill
        teacher = self.student_model()
        if "baseline" in self.students:  # generation 0 would repeat the baseline's training exactly
            t_info = _copy_role("teacher", "baseline", teacher, self.students["baseline"], scfg.model, scfg.kwargs,
                                self.data, self.rd, self.resume)
            self.results["teacher"] = {**t_info, **describe_model(teacher, self.data, scfg.model), "generation": 0}
            self.models = {"teacher": teacher, **self.models}
        else:
            self.train("teacher", teacher, self.ce, generation=0)
        for g, role in enumerate(generation_roles(dcfg.generations), start=1):
            if role == "student":
                self.train(role, self.students["student"], self.kd_loss, teacher=teacher, first={"generation": g})
            else:
                self.train(role, model := self.student_model(), self.kd_loss, teacher=teacher, generation=g)
                teacher = model

    def baseline(self) -> None:
        if "baseline" in self.students:
            self.train("baseline", self.students["baseline"], self.ce)

    def record(self, seconds: float) -> None:
        """Test metrics of every model into metrics.json, then the stage's manifest entry."""
        dcfg = self.recipe.distill
        self.results["student"].update({"loss": dcfg.loss, "strategy": dcfg.strategy})
        for role, model in self.models.items():
            self.rd.update_metrics(role, {**evaluate(model, self.data, "test"), **self.results[role]})
        if self.ensemble is not None:
            ens = self.ensemble
            self.rd.update_metrics("teacher_ensemble", {**evaluate(ens, self.data, "test"),
                                                        "teachers": list(self.teachers),
                                                        "weights": ens.weights.tolist(), "space": ens.space})
        self.rd.record_artifacts("history.csv")
        self.rd.stage_done(STAGE, seconds=round(seconds, 2),
                           artifacts=["recipe.yaml", "data.json", "labels.txt", "eval.npz", "history.csv",
                                      *[f"{r}.pt" for r in self.models]])


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
    run = _Distill(recipe, allow_pickle, resume, quiet)
    run.open(out)
    {"offline": run.offline, "online": run.online, "self": run.born_again}[recipe.distill.strategy]()
    run.record(time.perf_counter() - t_start)
    return run.rd
