"""The resumable training state of one ``fit``: written atomically after every epoch, read on ``--resume``.

On-disk format (a ``torch.save`` dict of tensors and plain data, read with ``weights_only=True``), unchanged
since edgekd's first resumable trainer: ``model``, ``optimizer``, ``scheduler``, ``history``, ``best_val``,
``best_epoch``, ``best_model`` (the trained model), ``rng`` (CPU RNG), ``epoch`` (epochs done), ``elapsed``
(seconds), ``loss_state`` (the loss's own state, e.g. projections), and when present ``peer`` (the same keys
for a co-trained teacher), ``scaler`` (fp16 grad scaler), ``cuda_rng``, ``callbacks`` (callbacks with state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgekd.errors import CheckpointError
from edgekd.run_dir import atomic_path


class Checkpointer:
    """Saves and restores the state dict of a training run at ``path``.

    Args:
        path: The checkpoint file (``<role>.state.pt``).
        resume: Whether :meth:`load` may return an existing checkpoint (False: always start fresh).
    """

    def __init__(self, path: Path, resume: bool = False):
        self.path, self.resume = Path(path), resume

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is nothing to resume.

        Raises:
            CheckpointError: The file exists but cannot be read.
        """
        if not self.resume or not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"resume checkpoint {self.path} is unreadable ({type(e).__name__})",
                                  "delete it to restart that model from scratch") from e

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: a kill during the write leaves the previous epoch's file intact."""
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random state a resumed run must restore (CPU, plus CUDA's on a CUDA device)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
