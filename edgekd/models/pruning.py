"""Structured channel pruning with torch-pruning: the algorithms the ``prune`` stage and the benchmarks share.

Whole channels are removed (not masked), so the pruned model is really smaller and faster on every runtime.
torch-pruning's dependency graph (``tp.pruner.BasePruner``) finds which layers must lose the same channels
(residual adds, depthwise convs, BatchNorms, the next layer's inputs); this module chooses how much to prune
(a ratio, or the ratio that reaches a MACs/params target, found by bisection on a throw-away copy), protects
the classifier and user-named layers, prunes in steps with an optional fine-tuning callback between them, and
times models side by side (:func:`measure_latency`). It reads no run directory: the ``prune`` stage
(:mod:`edgekd.prune`) does that.
"""

from __future__ import annotations

import copy
import difflib
import math
import statistics
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from edgekd.errors import CheckpointError, ModelError, RecipeError
from edgekd.recipe import PruneConfig
from edgekd.results import PruneResult

IMPORTANCES = ("l1", "l2", "bn", "taylor")


# -- pruning ----------------------------------------------------------------------------------

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


def _count(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    from edgekd.models.zoo import count_macs_params

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
                         protected=protected, step_log=rows)
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


