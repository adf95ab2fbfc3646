"""``edgekd prune``: structured channel pruning with torch-pruning, recovered by KD fine-tuning from the teacher.

The pruning itself (torch-pruning's dependency graph, the ratio for a target, the steps, side-by-side latency)
is the library :mod:`edgekd.models.pruning`; this stage reads the run, fine-tunes after each step by KD from
the run's teacher, resumes an interrupted prune, and keeps the books.

Pruning is iterative: ``steps`` rounds, each removing a further ``ratio / steps`` of the channels of every
layer (torch-pruning's linear schedule) and followed by ``finetune_epochs`` of knowledge distillation from the
run's teacher. With ``target_macs`` / ``target_params`` the channel ratio that reaches the target is found
first by bisection on a throw-away copy, then applied the same way.

Files written into the run directory:

- ``student_pruned.pt``: an edgekd checkpoint readable with ``torch.load(weights_only=True)``: the original
  ``model`` spec and kwargs, ``state_dict`` with the pruned shapes, and ``modules``: the plain-data attributes
  of every module (``in_channels``, ``out_channels``, ``groups``, ``num_features``, ``in_features``...) after
  pruning. :func:`load_pruned` builds the architecture from the spec, resizes each module to the recorded
  attributes and loads the weights: no code or object is ever unpickled, and the pruned widths need no support
  from the factory.
- ``metrics.json["student_pruned"]``: test metrics, params, MACs, the reduction factors and the batch-1 PyTorch
  CPU latency of the unpruned and pruned student measured side by side (``latency_ms_before`` /
  ``latency_ms_after``).
- ``checkpoints/prune_step<k>.state.pt``: resumable fine-tuning state of each step (one per epoch).
- ``checkpoints/prune_progress.pt``: the pruned model of the last finished step (saved like
  ``student_pruned.pt``), the step index and torch-pruning's schedule state; ``checkpoints/prune_resume.json``:
  the options and planned ratio of the prune, which ``--resume`` must match.

Public API: :func:`run_prune` (the whole stage on a run directory), :func:`resolve_config`, :func:`summary`.
The pruned checkpoint format (``load_pruned``, ``load_pruned_model``) is :mod:`edgekd.models.pruned`; the
algorithms (``prune_model``, ``measure_latency``) are :mod:`edgekd.models.pruning`.
"""

from __future__ import annotations

import copy
import difflib
import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from pydantic import ValidationError
from torch import nn

from edgekd.errors import CheckpointError, RecipeError, RunDirError
from edgekd.recipe import PruneConfig, Recipe, TrainConfig
from edgekd.results import PruneResult
from edgekd.run_dir import PRUNED_STUDENT, RunDir, read_json, sha256_file, write_json_atomic
# The pruned-model format lives in edgekd.models; these names stay importable from here.
from edgekd.models.pruned import (FORMAT, build_pruned, load_pruned, load_pruned_model,  # noqa: F401
                                  module_attributes, save_pruned)
from edgekd.models.pruning import IMPORTANCES, layer_widths, measure_latency, plan, prune_model, resolve_protected

STAGE = "prune"
ROLE = PRUNED_STUDENT
ARTIFACT = f"{ROLE}.pt"
# Resumable state of an unfinished prune (removed when a prune starts without --resume).
PROGRESS = "checkpoints/prune_progress.pt"  # the model of the last finished step, the step index, the schedule
OPTIONS = "checkpoints/prune_resume.json"  # the options the prune started with, and its planned channel ratio


# -- configuration -------------------------------------------------------------------------------------------

def resolve_config(recipe: Recipe, *, ratio: float | None = None, target_macs: float | None = None,
                   target_params: float | None = None, steps: int | None = None, importance: str | None = None,
                   finetune_epochs: int | None = None, protect: Iterable[str] = (),
                   global_pruning: bool | None = None, lr: float | None = None) -> PruneConfig:
    """The recipe's ``prune`` section (or the defaults) with command-line values on top.

    A ratio or target given on the command line replaces the recipe's ratio and targets together, so
    ``--ratio 0.3`` works on a recipe that asks for ``target_macs``. Protected names are added to the recipe's.

    Raises:
        RecipeError: A value is out of range, or more than one of ratio / target_macs / target_params is asked.
    """
    base = recipe.prune.model_dump() if recipe.prune is not None else PruneConfig().model_dump()
    goals = {"ratio": ratio, "target_macs": target_macs, "target_params": target_params}
    given = [k for k, v in goals.items() if v is not None]
    if len(given) > 1:
        raise RecipeError(f"give only one of --ratio, --target-macs, --target-params (got {', '.join(given)})")
    if given:
        base.update({"ratio": None, "target_macs": None, "target_params": None, **{given[0]: goals[given[0]]}})
    if ratio is not None and not 0 < ratio < 1:
        raise RecipeError(f"prune ratio must be between 0 and 1 exclusive (got {ratio})",
                          "it is the fraction of channels removed, e.g. --ratio 0.5")
    for name, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and value <= 1:
            raise RecipeError(f"{name} must be a reduction factor above 1 (got {value})", "e.g. 2.0 for half")
    if steps is not None and steps < 1:
        raise RecipeError(f"prune steps must be at least 1 (got {steps})")
    if finetune_epochs is not None and finetune_epochs < 0:
        raise RecipeError(f"finetune epochs must be 0 or more (got {finetune_epochs})")
    if importance is not None and importance not in IMPORTANCES:
        close = difflib.get_close_matches(importance, IMPORTANCES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(IMPORTANCES)}"
        raise RecipeError(f"unknown importance {importance!r}", hint)
    for key, value in (("steps", steps), ("importance", importance), ("finetune_epochs", finetune_epochs),
                       ("global_pruning", global_pruning), ("lr", lr)):
        if value is not None:
            base[key] = value
    base["protect"] = list(dict.fromkeys([*base.get("protect", []), *protect]))
    if base["target_macs"] is not None or base["target_params"] is not None:
        base["ratio"] = None  # the recipe default ratio does not compete with an explicit target
    if base["target_macs"] is not None and base["target_params"] is not None:
        raise RecipeError("prune: set only one of target_macs and target_params")
    if base["ratio"] is None and base["target_macs"] is None and base["target_params"] is None:
        raise RecipeError("prune: set ratio, target_macs or target_params")
    try:
        return PruneConfig.model_validate(base)
    except ValidationError as e:  # e.g. --lr 0 or a negative target: one line naming the key
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"prune.{key}: {err['msg']} (got {err.get('input')!r})") from e


# -- the stage ------------------------------------------------------------------------------------------

def _finetune_config(recipe: Recipe, cfg: PruneConfig) -> TrainConfig:
    d = recipe.distill
    # Fine-tuning starts from trained weights: no warm-up, a cosine decay from prune.lr. Its default is the
    # distillation peak rate: on the default recipe's student (cut by 50% in 4 steps of 2 epochs) 1e-3
    # recovered 0.747 test accuracy and 1e-2 (its distill.lr) 0.935.
    # A copy of the distill settings (not a bare TrainConfig) so that fine-tuning cycles through the same
    # `teacher_views` augmented views and replays the distill stage's augmented-teacher cache.
    return d.model_copy(update={"epochs": cfg.finetune_epochs, "lr": cfg.lr if cfg.lr is not None else d.lr,
                                "scheduler": "cosine", "ema": None})


def _load_role(rd: RunDir, role: str, allow_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    from edgekd.models import load_checkpoint, load_model

    path = rd / f"{role}.pt"
    if not path.is_file():
        raise RunDirError(f"{rd.path} has no {role}.pt", "run `edgekd distill` to completion first")
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    return load_model(path, checkpoint=ckpt), ckpt


def _load_teacher(rd: RunDir, recipe: Recipe) -> nn.Module:
    """The teacher the student was distilled from: ``teacher.pt``, or the recipe's ensemble of several."""
    several = getattr(recipe, "teachers", None)
    if not several or len(several) < 2:
        return _load_role(rd, "teacher")[0]
    from edgekd.training import TeacherEnsemble, teacher_roles

    # The same combination of soft targets as the distill stage used.
    models = [_load_role(rd, role)[0] for role in teacher_roles(len(several))]
    weights = [t.weight for t in several] if several[0].weight is not None else None
    return TeacherEnsemble(models, weights, recipe.distill.ensemble).eval()


def _normalized(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _options(cfg: PruneConfig, ft_cfg: TrainConfig, recipe: Recipe, rd: RunDir) -> dict[str, Any]:
    """Everything a resumed prune must share with the interrupted one to end with the same weights."""
    from edgekd.training import parallel as distributed

    return _normalized({
        "prune": cfg.model_dump(), "finetune": ft_cfg.model_dump(), "seed": recipe.seed,
        "loss": recipe.distill.loss, "cache_teacher": recipe.distill.cache_teacher,
        "world_size": distributed.world_size(), "student_sha256": sha256_file(rd / "student.pt"),
    })


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first option that differs, as ``key=old, not new`` (None: the same)."""
    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in d.items():
            if key == "prune" and isinstance(value, dict):
                out.update(value)
            elif key == "finetune" and isinstance(value, dict):
                out.update({f"finetune.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = flat(old), flat(new)
    for key in dict.fromkeys([*b, *a]):
        if a.get(key) != b.get(key):
            if key == "student_sha256":
                return "another student.pt (it changed since)"
            return f"{key}={json.dumps(a.get(key))}, not {json.dumps(b.get(key))}"
    return None


def _clear_progress(rd: RunDir) -> None:
    """Remove the resumable state of an earlier prune of this run (and temporary files a kill left behind)."""
    folder = rd / "checkpoints"
    if not folder.is_dir():
        return
    for pattern in ("prune_step*.state.pt", ".prune_step*", ".prune_progress.*", ".prune_resume.*"):
        for f in folder.glob(pattern):
            f.unlink(missing_ok=True)
    for name in (PROGRESS, OPTIONS):
        (rd / name).unlink(missing_ok=True)


def _resume_point(rd: RunDir, options: dict[str, Any], resume: bool | str, quiet: bool) -> dict[str, Any] | None:
    """Where an interrupted prune of ``rd`` stopped: ``{"ratio", "done", "model", "state"}``; None: start over.

    Raises:
        RecipeError: ``resume=True`` and the interrupted prune had other options.
        CheckpointError: The saved step does not belong to the interrupted prune, or is damaged.
    """
    from edgekd.models import load_checkpoint

    path = rd / OPTIONS
    if not path.is_file():
        if resume is True and not quiet:
            print(f"nothing to resume in {rd.path}: starting the prune", flush=True)
        return None
    recorded = read_json(path, dict)
    ratio = recorded.pop("planned_ratio", None)
    diff = _difference(recorded, options)
    if diff is not None:
        if resume == "auto":
            return None
        raise RecipeError(f"--resume: the prune of {rd.path} was started with {diff}",
                          "pass the options it started with, or drop --resume to start over")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise CheckpointError(f"{path} records no planned ratio: it was damaged or edited by hand",
                              "drop --resume to start the prune over")
    point = {"ratio": float(ratio), "done": 0, "model": None, "state": None}
    progress = rd / PROGRESS
    if not progress.is_file():  # stopped during the first step: its fine-tuning epochs are all there is
        return point
    ckpt = load_checkpoint(progress)  # weights_only=True
    state = ckpt.get("progress")
    if ckpt.get("options") != options or not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{progress} does not belong to the interrupted prune",
                              "drop --resume to start the prune over")
    point.update(done=int(state["step"]), model=build_pruned(ckpt, progress), state=state)
    return point


def run_prune(rd: RunDir | str | Path, *, ratio: float | None = None, target_macs: float | None = None,
              target_params: float | None = None, steps: int | None = None, importance: str | None = None,
              finetune_epochs: int | None = None, protect: Iterable[str] = (), global_pruning: bool | None = None,
              lr: float | None = None, quiet: bool = False, latency_runs: int = 300,
              device: str = "auto", resume: bool | str = False) -> RunDir | None:
    """Prune a run's distilled student, fine-tune it by KD from the teacher, and record everything.

    Every check that can fail on bad input (config, files, protected names, reachable target) runs before
    anything is written, so a failed call leaves the run directory exactly as it was.

    Under ``torchrun --nproc_per_node=N -m edgekd prune`` every rank loads the run, plans and prunes the same
    channels itself (see :func:`edgekd.training.parallel.sync_pruned`: rank 0's ratio and post-step weights
    are then broadcast, after checking the widths agree) and the KD fine-tuning runs under
    DistributedDataParallel with sharded sampling, ``data.batch_size`` staying the global batch. Only rank 0
    writes into the run directory; the other ranks keep their fine-tuning checkpoints in a scratch directory.

    Each finished step is saved atomically to ``checkpoints/prune_progress.pt`` (the pruned model of that step,
    rebuildable like ``student_pruned.pt``, with the step index and torch-pruning's schedule state), and each
    fine-tuning epoch to ``checkpoints/prune_step<k>.state.pt``. ``resume=True`` continues an interrupted prune
    from its last finished step and epoch, ending with the same weights as an uninterrupted run (same seed, CPU);
    the options must be those the interrupted prune recorded in ``checkpoints/prune_resume.json``. Without it,
    the prune starts clean. ``student_pruned.pt`` only appears once the whole prune has finished.

    Args:
        device: Fine-tuning device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.
        resume: Continue an interrupted prune (nothing to continue: start one). ``"auto"`` (``edgekd run``):
            continue it if its options are the same, else start over.

    Raises:
        RecipeError: ``resume=True`` with options other than the interrupted prune's, or under torchrun.

    Returns:
        The run directory, now holding ``student_pruned.pt`` and ``metrics.json["student_pruned"]``; None on
        ranks other than 0 under torchrun.
    """
    from edgekd.training import parallel

    options = dict(ratio=ratio, target_macs=target_macs, target_params=target_params, steps=steps,
                   importance=importance, finetune_epochs=finetune_epochs, protect=protect,
                   global_pruning=global_pruning, lr=lr)
    if parallel.is_distributed():  # the caller owns the process group
        return _Prune(rd, options, quiet, resume).run(latency_runs)
    if resume is True and parallel.env_world_size() > 1:
        # Refused before joining the process group: a rank that stopped after joining would leave the others
        # hanging in (or failing out of) the rendezvous instead of printing this line.
        raise RecipeError("prune --resume is not supported under torchrun",
                          "resume the prune with a single process, or run it again without --resume")
    info = parallel.setup(device)
    ok = False
    try:
        out = _Prune(rd, options, quiet, resume, launch=info).run(latency_runs)
        ok = True
        return out
    finally:
        if not ok and parallel.is_distributed():  # no barrier: the other ranks may never reach it
            torch.distributed.destroy_process_group()
        parallel.teardown()


class _Prune:
    """One prune of a run: load and check (nothing written), plan, prune with KD recovery, record."""

    def __init__(self, rd: RunDir | str | Path, options: dict[str, Any], quiet: bool, resume: bool | str,
                 launch: dict[str, Any] | None = None):
        from edgekd.training import parallel

        self.main, world = parallel.is_main(), parallel.world_size()
        if world > 1:
            if resume is True:
                raise RecipeError("prune --resume is not supported under torchrun",
                                  "resume the prune with a single process, or run it again without --resume")
            resume = False
        self.launch = launch or {"world_size": world, "backend": torch.distributed.get_backend() if world > 1 else None,
                                 "device": str(parallel.device())}
        self.quiet, self.resume = quiet, resume
        self.log = None if quiet or not self.main else (lambda line: print(line, flush=True))
        self._load(rd if isinstance(rd, RunDir) else RunDir(rd), options)

    def _load(self, rd: RunDir, options: dict[str, Any]) -> None:
        """Read and check the run, the recipe and the options (the order of model builds is the RNG's order)."""
        from edgekd import losses
        from edgekd.data import load_data
        from edgekd.recipe import load_recipe
        from edgekd.training import evaluate, parallel

        if not (rd / "recipe.yaml").is_file():
            raise RunDirError(f"{rd.path} has no recipe.yaml", "pass --run with a directory from `edgekd distill`")
        self.rd, self.recipe = rd, load_recipe(rd / "recipe.yaml")
        self.cfg = resolve_config(self.recipe, **options)
        self.student, ckpt = _load_role(rd, "student")
        self.spec, self.kwargs = ckpt["model"]["spec"], ckpt["model"].get("kwargs", {})
        self.input_shape = tuple(ckpt["input_shape"])
        resolve_protected(self.student, self.cfg.protect)  # fail before any work on a wrong name
        self.teacher = _load_teacher(rd, self.recipe)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.data = data = load_data(self.recipe.data, self.recipe.seed)
        if tuple(data.input_shape) != self.input_shape:
            raise RunDirError(f"student.pt expects inputs {self.input_shape} but the recipe's data gives "
                              f"{data.input_shape}", "the run directory was edited; distill again")
        parallel.local_batch_size(data.batch_size, len(data.train))  # splittable over the ranks? (before writing)
        kd_loss = self.make_loss()  # built here so a bad loss config fails before anything is written
        # Taylor scores need one backward pass outside the trainer, which alone collects intermediate features;
        # a feature loss is replaced there by logit KD on soft targets.
        self.grad_loss = kd_loss if not losses.needs_features(kd_loss) else losses.build("kd", temperature=4.0,
                                                                                         alpha=1.0)
        self.original = copy.deepcopy(self.student).eval()
        self.before = evaluate(self.student, data, "test")
        self.ft_cfg = _finetune_config(self.recipe, self.cfg)
        self.options = _options(self.cfg, self.ft_cfg, self.recipe, rd)
        self.progress = _resume_point(rd, self.options, self.resume, self.quiet) if self.resume else None

    def make_loss(self) -> nn.Module:
        """A fresh KD loss per fine-tuning step: feature losses size their projections to the (pruned) widths."""
        from edgekd import losses

        loss_kwargs = dict(self.recipe.distill.loss)
        return losses.build(loss_kwargs.pop("name"), **copy.deepcopy(loss_kwargs))

    def gradients(self, model: nn.Module, batches: int = 8) -> None:
        """Taylor importance: ``|w * dL/dw|`` with the KD loss over a few training batches, BN statistics frozen."""
        model.eval()
        model.zero_grad(set_to_none=True)
        for i, (x, y, _) in enumerate(self.data.loader("train", self.data.batch_size)):
            if i >= batches:
                break
            with torch.no_grad():
                t = self.teacher(x)
            self.grad_loss(model(x), t, y).backward()

    def plan(self) -> float:
        """The channel ratio: the interrupted prune's, or planned now (raises on bad input, changes nothing)."""
        from edgekd.training import parallel

        if self.progress is not None:  # the same: it is a function of student.pt and the options
            return self.progress["ratio"]
        ratio, _ = plan(self.student, self.input_shape, self.cfg, self.gradients)
        return parallel.broadcast_object(ratio)  # computed on every rank; rank 0's value is the one used

    def recover(self, model: nn.Module, step: int) -> dict[str, Any]:
        """KD fine-tuning after pruning step ``step`` (continued from its saved epochs when resuming it)."""
        from edgekd.training import FitConfig, evaluate, loop, parallel

        parallel.sync_pruned(model)  # every rank now holds rank 0's pruned weights
        if self.ft_cfg.epochs == 0:
            return {"val_accuracy": evaluate(model, self.data, "val")["test_accuracy"]}
        state_path = self.ckpt_dir / f"prune_step{step}.state.pt"
        cont = self.progress is not None and step == self.progress["done"] + 1
        if not cont and state_path.exists():
            state_path.unlink()
        # Each step's fine-tuning starts from its own seed (dropout, loss projections): the same whether or not
        # the run stopped before it.
        seed = self.recipe.seed + step
        torch.manual_seed(seed)
        config = FitConfig(role=f"prune{step}", train=self.ft_cfg, seed=seed, state_path=state_path, resume=cont,
                           quiet=self.quiet or not self.main, cache_teacher=self.recipe.distill.cache_teacher,
                           augment_seed=self.recipe.seed)  # the distill stage's views: its teacher cache
        res = loop.fit(model, self.data, self.make_loss(), config, teacher=self.teacher)
        return {"val_accuracy": res.best_val_accuracy, "finetune_seconds": round(res.seconds, 3)}

    def start(self, ratio: float) -> None:
        """The first write into the run directory: the stage starts, an old result and old progress go."""
        rd = self.rd
        rd.stage_started(STAGE)
        if (rd / ARTIFACT).exists():  # from an earlier prune: only a finished prune leaves student_pruned.pt
            (rd / ARTIFACT).unlink()
            rd.forget_artifacts(ARTIFACT)
        if self.progress is None:  # a fresh prune: no step file of an earlier one may be picked up later
            _clear_progress(rd)
            write_json_atomic(rd / OPTIONS, {**self.options, "planned_ratio": ratio})

    def run(self, latency_runs: int) -> RunDir | None:
        """Plan, prune step by step with recovery (saving each step), then record on rank 0."""
        import shutil
        import tempfile

        from edgekd.training import parallel

        # Other ranks fine-tune in step with rank 0 but keep their checkpoints out of the run directory.
        scratch = None if self.main else Path(tempfile.mkdtemp(prefix=f"edgekd-rank{parallel.rank()}-prune-"))
        self.ckpt_dir = self.rd / "checkpoints" if self.main else scratch
        t0 = time.perf_counter()
        self.ratio = self.plan()
        if self.main:  # nothing in the run directory has been touched up to here
            self.start(self.ratio)
        model = self.student
        if self.progress is not None and self.progress["model"] is not None:
            model = self.progress["model"]
            if self.log is not None:
                self.log(f"resuming the prune after step {self.progress['done']} ({self.rd / PROGRESS})")
        try:
            result = prune_model(model, self.input_shape, self.cfg, ratio=self.ratio, gradients=self.gradients,
                                 finetune=self.recover, log=self.log, on_step=self.save_step,
                                 progress=self.progress["state"] if self.progress else None)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.perf_counter() - t0
        if not self.main:
            return None
        self.record(model.eval(), result, seconds, latency_runs)
        return self.rd

    def save_step(self, model: nn.Module, state: dict[str, Any]) -> None:
        if self.main:
            save_pruned(self.rd / PROGRESS, model, self.spec, self.kwargs, self.input_shape, self.data.num_classes,
                        source="student.pt", ratio=self.ratio, progress=state, options=self.options)
        if self.log is not None:
            self.log(f"prune step {state['step']} saved to {self.rd / PROGRESS}")

    def record(self, student: nn.Module, result: PruneResult, seconds: float, latency_runs: int) -> None:
        """Measure the pruned student, write ``student_pruned.pt`` (last: an interrupted prune leaves none) and
        its metrics, and mark the stage done."""
        from edgekd.training import evaluate

        rd, cfg, launch = self.rd, self.cfg, self.launch
        after = evaluate(student, self.data, "test")
        latency = measure_latency({"before": self.original, "after": student}, self.input_shape, runs=latency_runs)
        save_pruned(rd / ARTIFACT, student, self.spec, self.kwargs, self.input_shape, self.data.num_classes,
                    source="student.pt", ratio=result.ratio, protected=result.protected)
        widths0, widths1 = layer_widths(self.original), layer_widths(student)
        metrics = {
            **after, "model": self.spec, "params": result.params, "macs": result.macs,
            "params_before": result.params_before, "macs_before": result.macs_before,
            "mac_reduction": round(result.mac_reduction, 4), "param_reduction": round(result.param_reduction, 4),
            "test_accuracy_before": self.before["test_accuracy"],
            "accuracy_drop": round(self.before["test_accuracy"] - after["test_accuracy"], 6),
            "latency_ms_before": round(latency["before"], 5), "latency_ms_after": round(latency["after"], 5),
            "latency_speedup": round(latency["before"] / latency["after"], 4),
            "latency": {"batch": 1, "threads": 1, "runs": latency_runs, "statistic": "median", "runtime": "pytorch"},
            "ratio": result.ratio, "target_macs": cfg.target_macs, "target_params": cfg.target_params,
            "steps": len(result.steps), "importance": cfg.importance, "global_pruning": cfg.global_pruning,
            "finetune_epochs": cfg.finetune_epochs, "lr": self.ft_cfg.lr, "protected": result.protected,
            "channels": {name: [widths0[name], widths1.get(name)] for name in widths0},
            "step_log": result.steps, "train_seconds": round(seconds, 3),
            "world_size": launch["world_size"], "backend": launch["backend"], "device": launch["device"],
        }
        rd.update_metrics(ROLE, metrics)
        rd.record_artifacts(ARTIFACT)
        rd.stage_done(STAGE, artifact=ARTIFACT, seconds=round(seconds, 2), ratio=result.ratio,
                      mac_reduction=metrics["mac_reduction"], world_size=launch["world_size"],
                      backend=launch["backend"], device=launch["device"])


def summary(rd: RunDir) -> str:
    """A few lines for the terminal: accuracy, size and speed before and after pruning."""
    m = rd.metrics().get(ROLE, {})
    return "\n".join([
        f"pruned student written to {rd / ARTIFACT}",
        f"  test accuracy  {m['test_accuracy_before']:.4f} -> {m['test_accuracy']:.4f}",
        f"  MACs           {m['macs_before']:,} -> {m['macs']:,}  ({m['mac_reduction']:.2f}x fewer)",
        f"  params         {m['params_before']:,} -> {m['params']:,}  ({m['param_reduction']:.2f}x fewer)",
        f"  latency (PyTorch CPU, batch 1, 1 thread, median)  {m['latency_ms_before']:.3f} ms -> "
        f"{m['latency_ms_after']:.3f} ms  ({m['latency_speedup']:.2f}x)",
    ])
