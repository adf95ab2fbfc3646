"""One way back from an edgekd checkpoint file to a PyTorch model: :func:`load_model`.

edgekd writes two kinds of model checkpoint, both readable with ``torch.load(weights_only=True)``:

- ``edgekd-checkpoint/1`` (teacher, baseline, student; :func:`~edgekd.models.save_checkpoint`): the weights
  plus the model spec, kwargs, input shape and class count needed to build the architecture again;
- ``edgekd-pruned/1`` (``student_pruned.pt``; :func:`~edgekd.models.pruned.save_pruned`): the same plus the
  pruned width of every module, which the spec alone cannot express.

Every stage that needs the model behind a checkpoint (export, prune, the torch runtime, HF students) goes
through :func:`load_model`, so a new checkpoint kind is taught to edgekd in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from edgekd.errors import CheckpointError
from edgekd.models.builder import build_model
from edgekd.models.checkpoint import load_checkpoint
from edgekd.models.pruned import FORMAT as PRUNED_FORMAT
from edgekd.models.pruned import build_pruned


def model_spec(ckpt: dict[str, Any], path: str | Path) -> tuple[str, dict[str, Any], tuple[int, ...], int]:
    """``(spec, kwargs, input_shape, num_classes)`` recorded in an edgekd checkpoint.

    Raises:
        CheckpointError: The checkpoint records no model spec (a plain state dict, or not written by edgekd).
    """
    info = ckpt.get("model")
    if not isinstance(info, dict) or "spec" not in info or "input_shape" not in ckpt or "num_classes" not in ckpt:
        raise CheckpointError(f"{path} is not an edgekd checkpoint (no model spec)",
                              "use a checkpoint written by `edgekd distill` or `edgekd prune`")
    return str(info["spec"]), dict(info.get("kwargs") or {}), tuple(ckpt["input_shape"]), int(ckpt["num_classes"])


def load_model(path: str | Path, *, allow_pickle: bool = False, checkpoint: dict[str, Any] | None = None) -> nn.Module:
    """The model stored in an edgekd checkpoint (teacher/baseline/student ``.pt`` or a pruned one), in eval mode.

    Args:
        path: The checkpoint file.
        allow_pickle: Let :func:`~edgekd.models.load_checkpoint` unpickle objects (only for trusted files).
        checkpoint: The already loaded content of ``path`` (saves reading the file twice).

    Raises:
        CheckpointError: Missing, corrupt, not an edgekd checkpoint, or not fitting its recorded model.
    """
    path = Path(path)
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(path, allow_pickle=allow_pickle)
    if ckpt.get("format") == PRUNED_FORMAT:
        return build_pruned(ckpt, path)
    spec, kwargs, input_shape, num_classes = model_spec(ckpt, path)
    model = build_model(spec, input_shape, num_classes, kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit its recorded model {spec!r}",
                              "the model code changed since the checkpoint was written") from e
    return model.eval()
