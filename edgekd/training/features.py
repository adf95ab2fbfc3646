"""Intermediate features for feature- and relation-based distillation: module paths, hooks, shape probing.

Hooks are attached only while training batches run (:class:`FeatureTap` is a context manager) and removed
before evaluation and saving, so a distilled student stays exactly its architecture: exported graphs and
``student.pt`` contain nothing of the taps or of the loss's projections.
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from edgekd import losses
from edgekd.errors import RecipeError


def module_paths(model: nn.Module) -> list[str]:
    """Every named submodule path of ``model`` (``features.3``, ``classifier``...), in definition order."""
    return [name for name, _ in model.named_modules() if name]


def resolve_module(model: nn.Module, path: str, role: str) -> nn.Module:
    """The submodule of ``model`` at ``path``.

    Raises:
        RecipeError: No such module; the message lists the closest existing paths.
    """
    modules = dict(model.named_modules())
    if path and path in modules:
        return modules[path]
    names = module_paths(model)
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    if close:
        hint = "close matches: " + ", ".join(close)
    else:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        hint = f"{role} modules: {shown}"
    raise RecipeError(f"the {role} has no module {path!r} (distill.loss {role}_layer)", hint)


class FeatureTap:
    """Forward hooks that keep the outputs of named modules of one model.

    Use as a context manager; the hooks exist only inside the ``with`` block. Outputs are cloned because an
    in-place activation after the tapped module (``ReLU(inplace=True)``) would otherwise change them.

    Args:
        model: The model to tap.
        paths: Module paths to record.
        role: ``student`` or ``teacher`` (for error messages).
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], role: str):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.role = role
        self.modules = {p: resolve_module(model, p, role) for p in self.paths}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "FeatureTap":
        for path, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs = {}

    def _hook(self, path: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise RecipeError(f"{self.role} module {path!r} returns {type(output).__name__}, not a tensor",
                                  "tap a layer that outputs one tensor (a conv, an activation, a block)")
            self.outputs[path] = output.clone()

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs recorded since the last call (every tapped module must have run)."""
        missing = [p for p in self.paths if p not in self.outputs]
        if missing:
            raise RecipeError(f"the {self.role} module {missing[0]!r} did not run in the forward pass",
                              "pick a module that the model's forward() calls")
        out, self.outputs = self.outputs, {}
        return out


@torch.no_grad()
def probe_shapes(model: nn.Module, paths: Iterable[str], x: torch.Tensor, role: str) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes of the named modules for input batch ``x`` (model in eval mode for the probe)."""
    was_training = model.training
    model.eval()
    try:
        with FeatureTap(model, paths, role) as tap:
            model(x)
            feats = tap.take()
    finally:
        model.train(was_training)
    return {p: tuple(v.shape[1:]) for p, v in feats.items()}


def setup_feature_loss(loss_fn: nn.Module, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                       seed: int = 0) -> None:
    """Check a feature loss against the two models and create its shape-dependent parts (projections).

    Projections are initialized from ``seed`` in a forked RNG, so creating them does not shift the random
    stream the training run uses afterwards.

    Raises:
        RecipeError: A module path does not exist or a pair of feature shapes cannot be compared.
    """
    if not losses.needs_features(loss_fn):
        return
    pairs = loss_fn.feature_layers()
    s_shapes = probe_shapes(student, [s for s, _ in pairs], x, "student")
    t_shapes = probe_shapes(teacher, [t for _, t in pairs], x, "teacher")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            loss_fn.setup(s_shapes, t_shapes)
        except ValueError as e:
            raise RecipeError(f"distill.loss: {e}") from e
