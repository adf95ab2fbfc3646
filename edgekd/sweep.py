"""``edgekd sweep``: tune the distillation loss (temperature, alpha, optionally which loss) with Optuna.

Every trial distills the recipe's student from the recipe's teacher(s) with sampled loss settings and is scored
by its best **validation** accuracy; the test split is never read. Each epoch's validation accuracy is reported
to Optuna, whose median pruner stops trials that fall behind the trials before them at the same epoch.

The study lives in an Optuna storage (SQLite file ``<out>/study.db`` by default; any storage URL works, so
several machines can add trials to one study). Running the same command again continues the study until it has
``--trials`` finished trials. The teacher is trained once per sweep folder (``<out>/teacher.pt``) and reused.
Outputs next to the study: ``best_recipe.yaml`` (the recipe with the best loss settings), ``trials.png``,
``trials.csv`` and ``sweep.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekd import losses
from edgekd.errors import RecipeError, TrainingError
from edgekd.recipe import Recipe
from edgekd.run_dir import RunDir, atomic_path, write_json_atomic, write_text_atomic

DEFAULT_OUT = Path("sweeps")


@dataclass
class SweepResult:
    """What a sweep left behind."""

    study_name: str
    storage: str
    out: Path
    best_value: float | None
    best_loss: dict[str, Any] | None
    best_trial: int | None
    counts: dict[str, int] = field(default_factory=dict)
    ran: int = 0

    def summary(self) -> str:
        lines = [f"study {self.study_name!r} ({self.storage}): ran {self.ran} trials; "
                 + ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)]
        if self.best_value is not None:
            lines.append(f"best: trial {self.best_trial}, val accuracy {self.best_value:.4f}, loss {self.best_loss}")
        lines.append(f"best recipe: {self.out / 'best_recipe.yaml'}   plot: {self.out / 'trials.png'}")
        return "\n".join(lines)


def search_space(name: str) -> dict[str, tuple[float, float, bool]]:
    """The ``{kwarg: (low, high, log)}`` a sweep samples for loss ``name``.

    Raises:
        RecipeError: Unknown loss, or a loss with nothing to tune.
    """
    space = getattr(losses.get_loss(name), "search_space", None)  # unknown names: one-line error with a hint
    if not space:
        tunable = [n for n in losses.list_losses() if getattr(losses.get_loss(n), "search_space", None)]
        raise RecipeError(f"edgekd sweep cannot tune loss {name!r}", f"tunable losses: {', '.join(tunable)} (--losses)")
    return dict(space)


def suggest_loss(trial, loss_names: list[str], base: dict[str, Any]) -> dict[str, Any]:
    """Sample one ``distill.loss`` mapping; kwargs of the recipe's own loss that are not tuned are kept."""
    name = trial.suggest_categorical("loss", loss_names) if len(loss_names) > 1 else loss_names[0]
    # Per-loss parameter names when the loss is sampled too: `alpha` means different things in kd and dkd.
    prefix = f"{name}." if len(loss_names) > 1 else ""
    config = dict(base) if base.get("name") == name else {"name": name}
    for key, (low, high, log) in search_space(name).items():
        config[key] = round(trial.suggest_float(prefix + key, low, high, log=log), 6)
    return config


def _fingerprint(recipe: Recipe, loss_names: list[str]) -> str:
    """What must not change within one study: the recipe except its name, loss settings and later stages."""
    d = recipe.to_dict()
    d.pop("name", None)
    for key in ("prune", "export", "validate", "bench"):
        d.pop(key, None)
    d["distill"] = {k: v for k, v in d["distill"].items() if k != "loss"}
    d["sweep_losses"] = loss_names
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _open_storage(url: str):
    import warnings

    import optuna

    # The heartbeat is marked experimental in Optuna; its behaviour is what we want, the warning is noise.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if "://" in url and not url.startswith(("redis", "grpc")):
            # RDB storages (SQLite, PostgreSQL, MySQL) get a heartbeat: a trial whose process was killed is
            # marked failed by the next run instead of staying "running" forever.
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        return url
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors have many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(f"cannot open the study storage {url!r}: {first}",
                          "pass an Optuna storage URL such as sqlite:///study.db") from e


def run_sweep(recipe: Recipe, trials: int, out: str | Path | None = None, storage: str | None = None,
              study_name: str | None = None, loss_names: list[str] | None = None, quiet: bool = False,
              allow_pickle: bool = False, pruner=None, pruner_startup_trials: int = 3,
              pruner_warmup_epochs: int | None = None) -> SweepResult:
    """Run (or continue) a study until it holds ``trials`` finished trials; write the best recipe and plots.

    Args:
        recipe: The recipe to tune; its ``distill`` settings (epochs, lr...) are used for every trial.
        trials: Finished (complete or pruned) trials the study should hold when this returns.
        out: Folder for the study database, teacher, best recipe and plots (default ``sweeps/<study name>``).
        storage: Optuna storage URL (default: SQLite in ``out``).
        study_name: Default ``<recipe name>-sweep``.
        loss_names: Losses to choose from (default: the recipe's loss only).
        quiet: No progress lines.
        allow_pickle: Allow teacher checkpoints that need unpickling.
        pruner: An Optuna pruner (default: median pruner on per-epoch validation accuracy).
        pruner_startup_trials: Trials that finish before the median pruner starts pruning.
        pruner_warmup_epochs: Epochs of a trial before it may be pruned (default: a quarter of the epochs).

    Raises:
        RecipeError: Bad recipe for a sweep, untunable loss, a storage that cannot be opened, or a study that
            was started with another recipe.
        TrainingError: No trial completed, so there is no best recipe.
    """
    import optuna

    loss_names = _check_sweep(recipe, trials, loss_names)
    study_name = study_name or f"{recipe.name}-sweep"
    out = Path(out) if out is not None else DEFAULT_OUT / study_name
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    epochs = recipe.distill.epochs
    pruner = pruner or optuna.pruners.MedianPruner(
        n_startup_trials=pruner_startup_trials,
        n_warmup_steps=max(1, epochs // 4) if pruner_warmup_epochs is None else pruner_warmup_epochs)
    study = _open_study(recipe, loss_names, storage_url, study_name, pruner)

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    todo = trials - len(study.get_trials(deepcopy=False, states=finished_states))
    ran = 0
    if todo > 0:
        objective = _Objective(recipe, loss_names, out, allow_pickle, quiet)

        def progress(study_, frozen) -> None:
            nonlocal ran
            ran += 1
            if not quiet:
                value = "-" if frozen.value is None else f"{frozen.value:.4f}"
                last = max(frozen.intermediate_values) if frozen.intermediate_values else 0
                print(f"trial {frozen.number}: {frozen.state.name.lower()} val_acc {value} (epochs {last})  "
                      f"{frozen.user_attrs.get('loss')}", flush=True)

        study.optimize(objective, n_trials=todo, catch=(TrainingError,),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished_states), progress])

    return _write_outputs(study, recipe, out, storage_url, ran)


def _check_sweep(recipe: Recipe, trials: int, loss_names: list[str] | None) -> list[str]:
    """Refuse what a sweep cannot run; return the losses to choose from (default: the recipe's)."""
    from edgekd.training import check_strategy

    if trials < 1:
        raise RecipeError(f"--trials must be at least 1, got {trials}")
    if recipe.distill.strategy != "offline":
        raise RecipeError(f"edgekd sweep tunes offline distillation; the recipe uses strategy {recipe.distill.strategy}",
                          "run the sweep with --set distill.strategy=offline")
    base_loss = dict(recipe.distill.loss)
    check_strategy(recipe, losses.build_from_config(base_loss))
    loss_names = list(dict.fromkeys(loss_names or [base_loss["name"]]))
    for name in loss_names:
        search_space(name)
        if name != base_loss["name"]:
            try:  # a loss sampled besides the recipe's own starts from its defaults: they must be enough
                losses.build(name)
            except RecipeError as e:
                raise RecipeError(f"--losses {name}: {e.message}",
                                  f"make {name} the recipe's distill.loss (with its layers) to tune it") from e
    return loss_names


def _open_study(recipe: Recipe, loss_names: list[str], storage_url: str, study_name: str, pruner):
    """Create or load the study; a study started with another recipe or losses is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fingerprint = _fingerprint(recipe, loss_names)
    try:
        study = optuna.create_study(storage=_open_storage(storage_url), study_name=study_name, direction="maximize",
                                    pruner=pruner, load_if_exists=True)
    except RecipeError:
        raise
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(f"cannot open study {study_name!r} in {storage_url}: {first}") from e
    started_with = study.user_attrs.get("edgekd_fingerprint")
    if started_with is None:
        study.set_user_attr("edgekd_fingerprint", fingerprint)
        study.set_user_attr("recipe", recipe.to_dict())
    elif started_with != fingerprint:
        raise RecipeError(f"study {study_name!r} was started with another recipe or --losses",
                          "use the same recipe and options to continue it, or another --study-name / --out")
    # Seeded by the study's length so a continued study does not replay the first run's random start.
    study.sampler = optuna.samplers.TPESampler(seed=recipe.seed + len(study.trials))
    return study


class _Objective:
    """One trial: distill the recipe's student with sampled loss settings; its best validation accuracy.

    Built once per sweep run: the data are loaded and the teacher is trained once per sweep folder
    (``<out>/teacher.pt``; an interrupted teacher continues, a finished one is loaded).
    """

    def __init__(self, recipe: Recipe, loss_names: list[str], out: Path, allow_pickle: bool, quiet: bool):
        from edgekd.data import load_data
        from edgekd.training.callbacks import HistoryFile
        from edgekd.training.features import setup_feature_loss
        from edgekd.training.roles import build_model_for, build_teachers, train_teachers

        self.recipe, self.loss_names, self.out, self.allow_pickle = recipe, loss_names, out, allow_pickle
        self.base_loss = dict(recipe.distill.loss)
        self.data = data = load_data(recipe.data, recipe.seed)
        rd = RunDir(out)
        write_text_atomic(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        teachers = build_teachers(recipe, data, allow_pickle)
        scfg = recipe.student
        probe = losses.build_from_config(self.base_loss)
        if losses.needs_features(probe):  # wrong layer paths fail now, not after the teacher has trained
            setup_feature_loss(probe, build_model_for(scfg.model, scfg.kwargs, data, recipe.seed, "student"),
                               teachers["teacher"], data.train[0][0].unsqueeze(0), recipe.seed)
        self.teacher, _ = train_teachers(recipe, teachers, data, rd, HistoryFile(rd / "history.csv"), resume=True,
                                         quiet=quiet)

    def __call__(self, trial) -> float:
        from edgekd.models import load_weights
        from edgekd.training import FitConfig, OptunaPruning, loop
        from edgekd.training.roles import build_model_for

        recipe, scfg = self.recipe, self.recipe.student
        config = suggest_loss(trial, self.loss_names, self.base_loss)
        loss_fn = losses.build_from_config(config)
        trial.set_user_attr("loss", config)
        student = build_model_for(scfg.model, scfg.kwargs, self.data, recipe.seed, "student")
        if scfg.checkpoint:
            load_weights(student, scfg.checkpoint, allow_pickle=self.allow_pickle)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.out, prefix=".trial-") as tmp:
            fit_config = FitConfig(role="student", train=recipe.distill, seed=recipe.seed,
                                   state_path=Path(tmp) / "student.state.pt", quiet=True,
                                   cache_teacher=recipe.distill.cache_teacher)
            result = loop.fit(student, self.data, loss_fn, fit_config, teacher=self.teacher,
                              callbacks=[OptunaPruning(trial, "student", recipe.distill.epochs)])
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        return result.best_val_accuracy


def _write_outputs(study, recipe: Recipe, out: Path, storage_url: str, ran: int) -> SweepResult:
    import optuna

    states = optuna.trial.TrialState
    all_trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in all_trials)
              for s in (states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING)}
    _write_csv(all_trials, out / "trials.csv")
    plot_trials(all_trials, out / "trials.png")
    complete = [t for t in all_trials if t.state == states.COMPLETE]
    result = SweepResult(study.study_name, storage_url, out, None, None, None, counts, ran)
    if complete:
        best = study.best_trial
        result.best_value, result.best_loss, result.best_trial = best.value, best.user_attrs["loss"], best.number
        tuned = recipe.model_copy(deep=True)
        tuned.distill.loss = dict(best.user_attrs["loss"])
        header = (f"# edgekd sweep: best of study {study.study_name!r} ({len(all_trials)} trials): trial {best.number}, "
                  f"validation accuracy {best.value:.4f}.\n# Distill it with: edgekd distill {out / 'best_recipe.yaml'}\n")
        write_text_atomic(out / "best_recipe.yaml", header + yaml.safe_dump(tuned.to_dict(), sort_keys=False))
    write_json_atomic(out / "sweep.json", {
        "study": study.study_name, "storage": storage_url, "objective": "best validation accuracy (test split unused)",
        "counts": counts, "best": None if not complete else {
            "trial": result.best_trial, "val_accuracy": result.best_value, "loss": result.best_loss,
            "params": study.best_trial.params},
    })
    if not complete:
        raise TrainingError(f"none of the {len(all_trials)} trials of study {study.study_name!r} completed "
                            f"({counts['pruned']} pruned, {counts['fail']} failed), so there is no best recipe",
                            "run more trials, lower the learning rate, or loosen the pruner")
    return result


def _write_csv(trials, path: Path) -> None:
    keys = sorted({k for t in trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "val_accuracy", "epochs_run", *keys, "seconds"])
    for t in trials:
        w.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value,
                    max(t.intermediate_values) if t.intermediate_values else 0,
                    *[t.params.get(k, "") for k in keys], t.user_attrs.get("seconds", "")])
    write_text_atomic(path, buf.getvalue())


def plot_trials(trials, path: Path) -> None:
    """Two panels: validation accuracy by trial (pruned trials at their last reported value, running best as a
    line), and accuracy against the temperature (or the loss weight) coloured by alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="tab:blue")
    ax1.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                marker="x", color="tab:gray", label="pruned (last epoch reported)")
    best, xs, ys = -1.0, [], []
    for t in sorted(complete, key=lambda t: t.number):
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax1.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax1.set_xlabel("trial")
    ax1.set_ylabel("validation accuracy")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("trials")

    def param(t, key):
        return next((v for k, v in t.params.items() if k == key or k.endswith("." + key)), None)

    # The main knob on x: the temperature if sampled, else the first sampled weight; alpha (if any) as colour.
    names = [k for t in complete for k in t.params if k != "loss"]
    x_key = "temperature" if any(k.endswith("temperature") for k in names) else (names[0].split(".")[-1] if names else None)
    pts = [(param(t, x_key), t.value, param(t, "alpha")) for t in complete] if x_key else []
    pts = [p for p in pts if p[0] is not None]
    if pts:
        sc = ax2.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] if p[2] is not None else 0 for p in pts],
                         cmap="viridis")
        if any(p[2] is not None for p in pts):
            fig.colorbar(sc, ax=ax2, label="alpha")
        ax2.set_xlabel(x_key)
        if x_key != "temperature":
            ax2.set_xscale("log")
    else:
        ax2.text(0.5, 0.5, "no completed trial", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("validation accuracy")
    ax2.set_title(f"{x_key or 'parameter'} vs accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
