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
- ``checkpoints/prune_step<k>.state.pt``: resumable fine-tuning state of each step.

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
from edgekd.run_dir import RunDir, atomic_path

STAGE = "prune"
ROLE = "student_pruned"
ARTIFACT = f"{ROLE}.pt"
FORMAT = "edgekd-pruned/1"
IMPORTANCES = ("l1", "l2", "bn", "taylor")
# Plain-data attribute types recorded per module; anything else (tensors, modules, callables) is not saved.
_PLAIN = (bool, int, float, str, type(None))


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
        raise RecipeError(f"prune.{key}: {err['msg']} (got {err.get('input')!r})") from None


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
                         "protect the layers it cannot follow with --protect, or prune a zoo model") from None


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
                log: Callable[[str], None] | None = None) -> PruneResult:
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

    Raises:
        RecipeError: Unknown protected layer, unreachable target, or an importance the model cannot use.
    """
    planned, protected = plan(model, input_shape, cfg, gradients) if ratio is None else (
        ratio, protected_layers(model, input_shape, cfg))
    example = torch.zeros(1, *input_shape)
    macs0, params0 = _count(model, input_shape)
    pruner = _pruner(model, example, cfg, planned, cfg.steps, _ignored(model, protected))
    result = PruneResult(ratio=planned, macs_before=macs0, params_before=params0, macs=macs0, params=params0,
                         protected=protected)
    for step in range(1, cfg.steps + 1):
        result.steps.append(_one_step(model, pruner, step, input_shape, gradients, finetune, log, result))

    # With global ranking the channels fall where the (fine-tuned) importance puts them, so a target met by
    # the plan can be missed by a little; one more step on the current model closes the gap.
    if cfg.ratio is None:
        now = _reduction(result.macs, result.params, macs0, params0, cfg)
        if now < _target(cfg):
            if cfg.importance == "taylor":
                gradients(model)
            extra = ratio_for_target(model, example, cfg, protected, input_shape, _target(cfg) / now)
            extra_pruner = _pruner(model, example, cfg, extra, 1, _ignored(model, protected))
            result.steps.append(_one_step(model, extra_pruner, cfg.steps + 1, input_shape, gradients, finetune,
                                          log, result))
    model.eval()
    return result


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


# -- saving and loading ---------------------------------------------------------------------------------

def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def module_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The public plain-data attributes of every module (what pruning rewrites: channel counts, groups...)."""
    out = {}
    for name, m in model.named_modules():
        out[name] = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and _plain(v)}
    return out


def save_pruned(path: str | Path, model: nn.Module, spec: str, kwargs: dict[str, Any],
                input_shape: tuple[int, ...], num_classes: int, **extra: Any) -> None:
    """Save a pruned model so :func:`load_pruned` can rebuild it; every value is a tensor or plain data."""
    payload = {
        "format": FORMAT, "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model": {"spec": spec, "kwargs": dict(kwargs)}, "input_shape": list(input_shape),
        "num_classes": int(num_classes), "modules": module_attributes(model), **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned`, in eval mode.

    The architecture comes from the recorded spec; each module is then resized to its recorded attributes and
    the shapes of its saved tensors, so widths the factory cannot express are restored exactly.

    Raises:
        CheckpointError: Missing, corrupt, not a pruned checkpoint, or not matching the recorded model.
    """
    from edgekd.models import build_model, load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)  # weights_only=True: no object is unpickled
    if ckpt.get("format") != FORMAT or "modules" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a pruned edgekd checkpoint (format {ckpt.get('format')!r})",
                              "write it with `edgekd prune`")
    spec, kwargs = ckpt["model"]["spec"], ckpt["model"].get("kwargs", {})
    model = build_model(spec, tuple(ckpt["input_shape"]), int(ckpt["num_classes"]), kwargs)
    modules = dict(model.named_modules())
    attrs: dict[str, dict[str, Any]] = ckpt["modules"]
    missing = sorted(set(attrs) - set(modules))
    if missing:
        raise CheckpointError(f"{path} does not fit model {spec!r}: it has no module {missing[0]!r}",
                              "the model code changed since pruning; prune again")
    for name, values in attrs.items():
        for key, value in values.items():
            setattr(modules[name], key, value)
    state = ckpt["state_dict"]
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            raise CheckpointError(f"{path} does not fit model {spec!r}: unexpected tensor {key!r}",
                                  "the model code changed since pruning; prune again")
        # Replace each tensor with an empty one of the saved shape so load_state_dict can fill it.
        if attr in owner._parameters and owner._parameters[attr] is not None:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(torch.empty_like(tensor), requires_grad=old.requires_grad)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            owner._buffers[attr] = torch.empty_like(tensor)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path} does not fit model {spec!r} ({' '.join(first[:2])[:200]})",
                              "the model code changed since pruning; prune again") from None
    return model.eval()


def load_pruned_model(run_dir: str | Path | RunDir) -> nn.Module:
    """The pruned student of a run directory (``student_pruned.pt``), in eval mode.

    Raises:
        RunDirError: The run has not been pruned (run ``edgekd prune`` first).
        CheckpointError: The file is damaged or does not fit the model.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    path = rd / ARTIFACT
    if not path.is_file():
        raise RunDirError(f"{rd.path} has no {ARTIFACT}", "run `edgekd prune --run <dir>` first")
    return load_pruned(path)


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
                       weight_decay=d.weight_decay, momentum=d.momentum, scheduler="cosine", grad_clip=d.grad_clip)


def _load_role(rd: RunDir, role: str, allow_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    from edgekd.models import build_model, load_checkpoint

    path = rd / f"{role}.pt"
    if not path.is_file():
        raise RunDirError(f"{rd.path} has no {role}.pt", "run `edgekd distill` to completion first")
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    info = ckpt.get("model")
    if not isinstance(info, dict) or "spec" not in info or "input_shape" not in ckpt:
        raise CheckpointError(f"{path} does not record its model spec", "it must be written by `edgekd distill`")
    model = build_model(info["spec"], tuple(ckpt["input_shape"]), int(ckpt["num_classes"]), info.get("kwargs"))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise CheckpointError(f"{path} does not fit its recorded model {info['spec']!r}",
                              "the model code changed since distillation") from None
    return model.eval(), ckpt


def _load_teacher(rd: RunDir, recipe: Recipe) -> nn.Module:
    """The teacher the student was distilled from: ``teacher.pt``, or the recipe's ensemble of several."""
    several = getattr(recipe, "teachers", None)
    if not several or len(several) < 2:
        return _load_role(rd, "teacher")[0]
    from edgekd.distill.strategies import TeacherEnsemble, teacher_roles

    # The same combination of soft targets as the distill stage used.
    models = [_load_role(rd, role)[0] for role in teacher_roles(len(several))]
    weights = [t.weight for t in several] if several[0].weight is not None else None
    return TeacherEnsemble(models, weights, recipe.distill.ensemble).eval()


def run_prune(rd: RunDir | str | Path, *, ratio: float | None = None, target_macs: float | None = None,
              target_params: float | None = None, steps: int | None = None, importance: str | None = None,
              finetune_epochs: int | None = None, protect: Iterable[str] = (), global_pruning: bool | None = None,
              lr: float | None = None, quiet: bool = False, latency_runs: int = 300) -> RunDir:
    """Prune a run's distilled student, fine-tune it by KD from the teacher, and record everything.

    Every check that can fail on bad input (config, files, protected names, reachable target) runs before
    anything is written, so a failed call leaves the run directory exactly as it was.

    Returns:
        The run directory, now holding ``student_pruned.pt`` and ``metrics.json["student_pruned"]``.
    """
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.distill.trainer import evaluate, fit
    from edgekd.recipe import load_recipe

    rd = rd if isinstance(rd, RunDir) else RunDir(rd)
    if not (rd / "recipe.yaml").is_file():
        raise RunDirError(f"{rd.path} has no recipe.yaml", "pass --run with a directory from `edgekd distill`")
    recipe = load_recipe(rd / "recipe.yaml")
    cfg = resolve_config(recipe, ratio=ratio, target_macs=target_macs, target_params=target_params, steps=steps,
                         importance=importance, finetune_epochs=finetune_epochs, protect=protect,
                         global_pruning=global_pruning, lr=lr)
    student, ckpt = _load_role(rd, "student")
    spec, kwargs = ckpt["model"]["spec"], ckpt["model"].get("kwargs", {})
    input_shape = tuple(ckpt["input_shape"])
    resolve_protected(student, cfg.protect)  # fail before any work on a wrong name
    teacher = _load_teacher(rd, recipe)
    for p in teacher.parameters():
        p.requires_grad_(False)
    data = load_data(recipe.data, recipe.seed)
    if tuple(data.input_shape) != input_shape:
        raise RunDirError(f"student.pt expects inputs {input_shape} but the recipe's data gives {data.input_shape}",
                          "the run directory was edited; distill again")
    loss_kwargs = dict(recipe.distill.loss)
    loss_name = loss_kwargs.pop("name")

    def make_loss() -> nn.Module:
        # A fresh loss per fine-tuning step: feature losses size their projections to the (now pruned) widths.
        return losses.build(loss_name, **copy.deepcopy(loss_kwargs))

    kd_loss = make_loss()  # built here so a bad loss config fails before anything is written
    # Taylor scores need one backward pass outside the trainer, which alone collects intermediate features;
    # a feature loss is replaced there by logit KD on soft targets.
    grad_loss = kd_loss if not losses.needs_features(kd_loss) else losses.build("kd", temperature=4.0, alpha=1.0)
    original = copy.deepcopy(student).eval()
    before = evaluate(student, data, "test")

    def gradients(model: nn.Module, batches: int = 8) -> None:
        # Taylor importance: |w * dL/dw| with the KD loss over a few training batches, BN statistics frozen.
        model.eval()
        model.zero_grad(set_to_none=True)
        for i, (x, y, _) in enumerate(data.loader("train", data.batch_size)):
            if i >= batches:
                break
            with torch.no_grad():
                t = teacher(x)
            grad_loss(model(x), t, y).backward()

    ft_cfg = _finetune_config(recipe, cfg)
    ckpt_dir = rd / "checkpoints"
    log = None if quiet else (lambda line: print(line, flush=True))

    def finetune(model: nn.Module, step: int) -> dict[str, Any]:
        if ft_cfg.epochs == 0:
            return {"val_accuracy": evaluate(model, data, "val")["test_accuracy"]}
        state_path = ckpt_dir / f"prune_step{step}.state.pt"
        if state_path.exists():
            state_path.unlink()
        res = fit(f"prune{step}", model, data, ft_cfg, make_loss(), seed=recipe.seed + step, state_path=state_path,
                  teacher=teacher, cache_teacher=recipe.distill.cache_teacher, quiet=quiet)
        return {"val_accuracy": res.best_val_accuracy, "finetune_seconds": round(res.seconds, 3)}

    t0 = time.perf_counter()
    ratio_, _ = plan(student, input_shape, cfg, gradients)  # raises on bad input, changes nothing
    # Nothing in the run directory has been touched up to here.
    rd.stage_started(STAGE)
    result = prune_model(student, input_shape, cfg, ratio=ratio_, gradients=gradients, finetune=finetune, log=log)
    seconds = time.perf_counter() - t0
    student.eval()
    after = evaluate(student, data, "test")
    save_pruned(rd / ARTIFACT, student, spec, kwargs, input_shape, data.num_classes,
                source="student.pt", ratio=result.ratio, protected=result.protected)
    latency = measure_latency({"before": original, "after": student}, input_shape, runs=latency_runs)
    widths0, widths1 = layer_widths(original), layer_widths(student)
    metrics = {
        **after, "model": spec, "params": result.params, "macs": result.macs,
        "params_before": result.params_before, "macs_before": result.macs_before,
        "mac_reduction": round(result.mac_reduction, 4), "param_reduction": round(result.param_reduction, 4),
        "test_accuracy_before": before["test_accuracy"],
        "accuracy_drop": round(before["test_accuracy"] - after["test_accuracy"], 6),
        "latency_ms_before": round(latency["before"], 5), "latency_ms_after": round(latency["after"], 5),
        "latency_speedup": round(latency["before"] / latency["after"], 4),
        "latency": {"batch": 1, "threads": 1, "runs": latency_runs, "statistic": "median", "runtime": "pytorch"},
        "ratio": result.ratio, "target_macs": cfg.target_macs, "target_params": cfg.target_params,
        "steps": len(result.steps), "importance": cfg.importance, "global_pruning": cfg.global_pruning,
        "finetune_epochs": cfg.finetune_epochs, "lr": ft_cfg.lr, "protected": result.protected,
        "channels": {name: [widths0[name], widths1.get(name)] for name in widths0},
        "step_log": result.steps, "train_seconds": round(seconds, 3),
    }
    rd.update_metrics(ROLE, metrics)
    rd.record_artifacts(ARTIFACT)
    rd.stage_done(STAGE, artifact=ARTIFACT, seconds=round(seconds, 2), ratio=result.ratio,
                  mac_reduction=metrics["mac_reduction"])
    return rd


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
