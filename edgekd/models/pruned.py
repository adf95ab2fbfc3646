"""The pruned-model checkpoint format (``edgekd-pruned/1``), written by ``edgekd prune``.

A pruned checkpoint is an edgekd checkpoint readable with ``torch.load(weights_only=True)``: the original
``model`` spec and kwargs, ``state_dict`` with the pruned shapes, and ``modules``: the plain-data attributes of
every module (``in_channels``, ``out_channels``, ``groups``, ``num_features``, ``in_features``...) after
pruning. :func:`load_pruned` builds the architecture from the spec, resizes each module to the recorded
attributes and loads the weights: no code or object is ever unpickled, and the pruned widths need no support
from the factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import CheckpointError, RunDirError
from edgekd.models.builder import build_model
from edgekd.models.checkpoint import load_checkpoint
from edgekd.run_dir import RunDir, atomic_path

FORMAT = "edgekd-pruned/1"
ARTIFACT = "student_pruned.pt"  # the pruned student of a run directory
_PLAIN = (bool, int, float, str, type(None))


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
    path = Path(path)
    return build_pruned(load_checkpoint(path), path)  # weights_only=True: no object is unpickled


def build_pruned(ckpt: dict[str, Any], path: Path) -> nn.Module:
    """The model of a loaded :func:`save_pruned` payload (see :func:`load_pruned`)."""
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
                              "the model code changed since pruning; prune again") from e
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
