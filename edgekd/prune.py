"""``edgekd prune``: structured channel pruning with torch-pruning, recovered by KD fine-tuning from the teacher.

Whole channels are removed (not masked), so the pruned student is really smaller and faster on every runtime.
torch-pruning's dependency graph (``tp.pruner.BasePruner``) finds which layers must lose the same channels
(residual adds, depthwise convs, BatchNorms, the next layer's inputs); this module only chooses how much to
prune, protects the classifier and user-named layers, fine-tunes after each step and keeps the books.

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

Public API (used by the export stage and the benchmarks):

- :func:`load_pruned_model` ``(run_dir) -> nn.Module``: the pruned student of a run, in eval mode.
- :func:`load_pruned` ``(path) -> nn.Module``: the same from a ``student_pruned.pt`` path.
- :func:`prune_model`: prune a model in place (no data needed unless fine-tuning / Taylor importance).
- :func:`measure_latency`: median batch-1 latency of several models, interleaved, one thread.
- :func:`run_prune`: the whole stage on a run directory.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from pydantic import ValidationError
from torch import nn

from edgekd.errors import CheckpointError, ModelError, RecipeError, RunDirError
from edgekd.recipe import PruneConfig, Recipe, TrainConfig
from edgekd.run_dir import RunDir, read_json, sha256_file, write_json_atomic
# The pruned-model format lives in edgekd.models; these names stay importable from here.
from edgekd.models.pruned import (FORMAT, build_pruned, load_pruned, load_pruned_model,  # noqa: F401
                                  module_attributes, save_pruned)

STAGE = "prune"
ROLE = "student_pruned"
ARTIFACT = f"{ROLE}.pt"
# Resumable state of an unfinished prune (removed when a prune starts without --resume).
PROGRESS = "checkpoints/prune_progress.pt"  # the model of the last finished step, the step index, the schedule
OPTIONS = "checkpoints/prune_resume.json"  # the options the prune started with, and its planned channel ratio
IMPORTANCES = ("l1", "l2", "bn", "taylor")


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


# -- the pruning itself ----------------------------------------------------------------------------------

def make_importance(name: str):
    """The torch-pruning importance criterion for a recipe name."""
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise RecipeError(f"unknown importance {name!r}", f"choose one of {', '.join(IMPORTANCES)}")


def find_classifier(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the layer whose output is the model's output (its width is the number of classes).

    Found by identity of the output tensor with forward hooks; if the model post-processes the last layer's
    output (a reshape, say), the last Linear/Conv registered is taken instead.
    """
    outputs: list[tuple[Any, str]] = []  # holding the tensors keeps their identities unique

    def remember(name: str):
        def hook(module, inputs, output) -> None:  # returns None: a hook's return value replaces the output
            outputs.append((output, name))
        return hook

    hooks = [m.register_forward_hook(remember(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for tensor, name in reversed(outputs):
        if tensor is out:
            return name
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not layers:
        raise ModelError("the model has no Linear or Conv layer to prune")
    return layers[-1]


def resolve_protected(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Check that every protected name is a module of ``model``.

    Raises:
        RecipeError: A name is not a module, with the closest module names.
    """
    modules = [n for n, _ in model.named_modules() if n]
    names = list(names)
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, modules, n=3, cutoff=0.4)
            hint = (f"close names: {', '.join(close)}" if close
                    else f"module names look like: {', '.join(modules[:5])}…")
            raise RecipeError(f"protected layer {name!r} is not a module of the student", hint)
    return names


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels / features of every Conv and Linear layer (what pruning changes)."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


@dataclass
class PruneResult:
    """What :func:`prune_model` did."""

    ratio: float
    macs_before: int
    params_before: int
    macs: int
    params: int
    protected: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mac_reduction(self) -> float:
        return self.macs_before / max(self.macs, 1)

    @property
    def param_reduction(self) -> float:
        return self.params_before / max(self.params, 1)


def _count(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    from edgekd.models import count_macs_params

    return count_macs_params(model, input_shape)


def _pruner(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, ratio: float, steps: int,
            ignored: list[nn.Module]):
    import torch_pruning as tp

    # eval mode: building the dependency graph runs a forward pass, which would move BatchNorm statistics.
    model.eval()
    try:
        return tp.pruner.BasePruner(model, example, importance=make_importance(cfg.importance),
                                    global_pruning=cfg.global_pruning, pruning_ratio=ratio, iterative_steps=steps,
                                    ignored_layers=ignored)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        # Tracing failed on an operation torch-pruning cannot follow (custom ops, data-dependent control flow).
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"torch-pruning cannot trace the model's dependency graph ({type(e).__name__}: {first})",
                         "protect the layers it cannot follow with --protect, or prune a zoo model") from e


def _ignored(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]


def _reduction(macs: int, params: int, macs0: int, params0: int, cfg: PruneConfig) -> float:
    """How far a model is towards the config's target, as the reduction factor the target is about."""
    if cfg.target_params is not None:
        return params0 / max(params, 1)
    return macs0 / max(macs, 1)


def _dry_run(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, ratio: float, names: list[str],
             input_shape: tuple[int, ...]) -> tuple[int, int]:
    """MACs and params after one-shot pruning of a copy at ``ratio`` (the model itself is untouched)."""
    trial = copy.deepcopy(model)
    # deepcopy drops .grad, which Taylor importance reads.
    for p_trial, p in zip(trial.parameters(), model.parameters()):
        if p.grad is not None:
            p_trial.grad = p.grad.detach().clone()
    _pruner(trial, example, cfg, ratio, 1, _ignored(trial, names)).step()
    return _count(trial, input_shape)


def ratio_for_target(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, names: list[str],
                     input_shape: tuple[int, ...], target: float, grid: float = 0.1,
                     iterations: int = 7) -> float:
    """The smallest channel ratio whose one-shot pruning reduces MACs (or params) by at least ``target``.

    torch-pruning skips a layer whose every channel would go, so the reduction is not monotonic in the ratio
    near 1: a coarse scan finds the first grid ratio that reaches the target, then bisection refines it.

    Raises:
        RecipeError: No ratio reaches the target (too many protected layers, or a target beyond what removing
            channels can give).
    """
    macs0, params0 = _count(model, input_shape)
    what = "params" if cfg.target_params is not None else "MACs"
    lo, hi, best = 0.0, None, 1.0
    for k in range(1, round(1 / grid)):
        ratio = round(k * grid, 4)
        got = _reduction(*_dry_run(model, example, cfg, ratio, names, input_shape), macs0, params0, cfg)
        if got >= target:
            hi = ratio
            break
        lo, best = ratio, max(best, got)
    if hi is None:
        raise RecipeError(f"target {what} reduction {target:g}x is out of reach: pruning channels gives at most "
                          f"{best:.2f}x on this model", "lower the target or protect fewer layers")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if _reduction(*_dry_run(model, example, cfg, mid, names, input_shape), macs0, params0, cfg) >= target:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


def plan(model: nn.Module, input_shape: tuple[int, ...], cfg: PruneConfig,
         gradients: Callable[[nn.Module], None] | None = None) -> tuple[float, list[str]]:
    """Check a pruning config against a model and choose the channel ratio, without changing the model.

    Returns:
        ``(ratio, protected)``: the channel ratio (``cfg.ratio`` or the one found for the target) and the
        protected module names (the classifier first).

    Raises:
        RecipeError: Unknown protected layer, unreachable target, or an importance the model cannot use.
    """
    example = torch.zeros(1, *input_shape)
    protected = protected_layers(model, input_shape, cfg)
    if cfg.importance == "bn" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise RecipeError("importance 'bn' needs BatchNorm layers and this model has none",
                          "use importance l1, l2 or taylor")
    if cfg.importance == "taylor" and gradients is None:
        raise RecipeError("importance 'taylor' needs gradients from training data", "use l1, l2 or bn here")
    if cfg.ratio is not None:
        return cfg.ratio, protected
    if cfg.importance == "taylor":
        gradients(model)
    ratio = ratio_for_target(model, example, cfg, protected, input_shape, _target(cfg))
    model.zero_grad(set_to_none=True)
    return ratio, protected


def protected_layers(model: nn.Module, input_shape: tuple[int, ...], cfg: PruneConfig) -> list[str]:
    """The classifier (found by tracing) followed by ``cfg.protect``, each checked to exist."""
    names = resolve_protected(model, cfg.protect)
    return list(dict.fromkeys([find_classifier(model, torch.zeros(1, *input_shape)), *names]))


def _target(cfg: PruneConfig) -> float:
    return cfg.target_params if cfg.target_params is not None else cfg.target_macs


def prune_model(model: nn.Module, input_shape: tuple[int, ...], cfg: PruneConfig, *, ratio: float | None = None,
                gradients: Callable[[nn.Module], None] | None = None,
                finetune: Callable[[nn.Module, int], dict[str, Any] | None] | None = None,
                log: Callable[[str], None] | None = None,
                on_step: Callable[[nn.Module, dict[str, Any]], None] | None = None,
                progress: dict[str, Any] | None = None) -> PruneResult:
    """Prune ``model`` in place with torch-pruning in ``cfg.steps`` steps.

    Args:
        model: The model (its classifier and ``cfg.protect`` layers are never pruned).
        input_shape: Shape of one sample, for tracing and counting MACs.
        cfg: Ratio or target, steps, importance, global/local ranking, protected layers.
        ratio: The channel ratio from :func:`plan` (computed here if None).
        gradients: Fills ``.grad`` of the model's parameters (needed for ``taylor`` importance).
        finetune: Called as ``finetune(model, step)`` after each step (KD recovery); may return a dict that is
            added to the step's log.
        log: Receives one line per step.
        on_step: Called as ``on_step(model, progress)`` after each finished step (pruned and fine-tuned);
            ``progress`` is plain data (step index, torch-pruning schedule state, step log) that, with the
            model of that step, continues the pruning exactly when passed back as ``progress``.
        progress: Continue an interrupted pruning: ``model`` is the model of step ``progress["step"]`` and
            ``progress`` what ``on_step`` received for it (``ratio`` must then be given).

    Raises:
        RecipeError: Unknown protected layer, unreachable target, or an importance the model cannot use.
    """
    planned, protected = plan(model, input_shape, cfg, gradients) if ratio is None else (
        ratio, protected_layers(model, input_shape, cfg))
    example = torch.zeros(1, *input_shape)
    if progress is None:
        done, rows = 0, []
        macs0, params0 = _count(model, input_shape)
    else:
        done, rows = int(progress["step"]), [dict(r) for r in progress["log"]]
        macs0, params0 = int(progress["macs_before"]), int(progress["params_before"])
    result = PruneResult(ratio=planned, macs_before=macs0, params_before=params0, macs=macs0, params=params0,
                         protected=protected, steps=rows)
    if done:
        result.macs, result.params = _count(model, input_shape)

    def finished(step: int, pruner) -> None:
        if on_step is not None:
            on_step(model, {"step": step, "pruner": _pruner_state(pruner, model),
                            "log": [dict(r) for r in result.steps], "macs_before": macs0, "params_before": params0})

    if done < cfg.steps:
        pruner = _pruner(model, example, cfg, planned, cfg.steps, _ignored(model, protected))
        if done:  # the schedule continues from the original widths, as if it had never stopped
            _restore_pruner(pruner, model, progress["pruner"])
        for step in range(done + 1, cfg.steps + 1):
            result.steps.append(_one_step(model, pruner, step, input_shape, gradients, finetune, log, result))
            finished(step, pruner)

    # With global ranking the channels fall where the (fine-tuned) importance puts them, so a target met by
    # the plan can be missed by a little; one more step on the current model closes the gap.
    if cfg.ratio is None and done <= cfg.steps:
        now = _reduction(result.macs, result.params, macs0, params0, cfg)
        if now < _target(cfg):
            if cfg.importance == "taylor":
                gradients(model)
            extra = ratio_for_target(model, example, cfg, protected, input_shape, _target(cfg) / now)
            extra_pruner = _pruner(model, example, cfg, extra, 1, _ignored(model, protected))
            result.steps.append(_one_step(model, extra_pruner, cfg.steps + 1, input_shape, gradients, finetune,
                                          log, result))
            finished(cfg.steps + 1, extra_pruner)
    model.eval()
    return result


def _pruner_state(pruner, model: nn.Module) -> dict[str, Any]:
    """The schedule state of a torch-pruning pruner as plain data, modules by name."""
    names = {m: n for n, m in model.named_modules()}
    return {
        "current_step": int(pruner.current_step),
        "scope_initial_channels": {str(k): int(v) for k, v in pruner._scope_initial_channels.items()},
        "layer_init_out_ch": {names[m]: v for m, v in pruner.layer_init_out_ch.items() if m in names},
        "layer_init_in_ch": {names[m]: v for m, v in pruner.layer_init_in_ch.items() if m in names},
        "initial_total_channels": int(pruner.initial_total_channels),
        "initial_total_heads": int(pruner.initial_total_heads),
    }


def _restore_pruner(pruner, model: nn.Module, state: dict[str, Any]) -> None:
    """Put a pruner built on a partly pruned model back where the pruner of the original model was."""
    modules = dict(model.named_modules())
    pruner.current_step = int(state["current_step"])
    pruner._scope_initial_channels = dict(state["scope_initial_channels"])
    for attr in ("layer_init_out_ch", "layer_init_in_ch"):
        table = getattr(pruner, attr)
        for name, value in state[attr].items():
            if name not in modules:
                raise CheckpointError(f"prune resume state names module {name!r}, which the model does not have",
                                      "run `edgekd prune` without --resume to start over")
            table[modules[name]] = value
    pruner.initial_total_channels = int(state["initial_total_channels"])
    pruner.initial_total_heads = int(state["initial_total_heads"])


def _one_step(model: nn.Module, pruner, step: int, input_shape: tuple[int, ...], gradients, finetune, log,
              result: PruneResult) -> dict[str, Any]:
    if gradients is not None and isinstance(pruner.importance, _taylor_type()):
        gradients(model)
    model.eval()
    pruner.step()
    model.zero_grad(set_to_none=True)
    result.macs, result.params = _count(model, input_shape)
    row: dict[str, Any] = {"step": step, "macs": result.macs, "params": result.params,
                           "mac_reduction": round(result.mac_reduction, 4)}
    if finetune is not None:
        row.update(finetune(model, step) or {})
    if log is not None:
        extra = f"  val_acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
        log(f"prune step {step}: MACs {result.macs:,} ({result.mac_reduction:.2f}x fewer), "
            f"params {result.params:,} ({result.param_reduction:.2f}x fewer){extra}")
    return row


def _taylor_type():
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance


# -- latency --------------------------------------------------------------------------------------------

def measure_latency(models: dict[str, Callable[[torch.Tensor], Any]], input_shape: tuple[int, ...], runs: int = 300,
                    warmup: int = 30, threads: int = 1, batch: int = 1, rounds: int = 10) -> dict[str, float]:
    """Median wall-clock milliseconds of one forward pass of each model, measured side by side.

    The models are timed in interleaved rounds (``runs / rounds`` calls each per round) with the same input,
    thread count and code, so load from other processes hits all of them alike.

    Args:
        models: ``{name: model}``; PyTorch modules are put in eval mode, any other callable taking the input
            tensor (an ONNX Runtime session wrapper, say) is timed as it is.
        input_shape: Shape of one sample.
        runs: Timed calls per model.
        warmup: Untimed calls per model first.
        threads: PyTorch intra-op threads while timing (restored afterwards).
        batch: Batch size of the input.
        rounds: How many interleaved rounds the runs are split into.

    Returns:
        ``{name: median_ms}``.
    """
    x = torch.randn(batch, *input_shape)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for m in models.values():
                if isinstance(m, nn.Module):
                    m.eval()
                for _ in range(warmup):
                    m(x)
            per_round = max(1, math.ceil(runs / rounds))
            for _ in range(rounds):
                for name, m in models.items():
                    for _ in range(per_round):
                        t0 = time.perf_counter_ns()
                        m(x)
                        times[name].append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        torch.set_num_threads(previous)
    return {name: statistics.median(t) for name, t in times.items()}


# -- the stage ------------------------------------------------------------------------------------------

def _finetune_config(recipe: Recipe, cfg: PruneConfig) -> TrainConfig:
    d = recipe.distill
    # Fine-tuning starts from trained weights: no warm-up, a cosine decay from prune.lr. Its default is the
    # distillation peak rate: on the default recipe's student (cut by 50% in 4 steps of 2 epochs) 1e-3
    # recovered 0.747 test accuracy and 1e-2 (its distill.lr) 0.935.
    return TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.lr if cfg.lr is not None else d.lr, optimizer=d.optimizer,
                       weight_decay=d.weight_decay, momentum=d.momentum, scheduler="cosine", grad_clip=d.grad_clip,
                       amp=d.amp)


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
                           quiet=self.quiet or not self.main, cache_teacher=self.recipe.distill.cache_teacher)
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
