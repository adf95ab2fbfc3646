"""Checkpoints that never execute code on load.

edgekd writes ``{"format": ..., "state_dict": ..., "model": {"spec", "kwargs"}, "input_shape", "num_classes"}``
with ``torch.save``; every value is a tensor or plain data, so ``torch.load(weights_only=True)`` reads it.
Users may also give a plain state dict (``.pt``/``.pth``) or a ``.safetensors`` file. Anything that would need
unpickling arbitrary objects is refused unless ``allow_pickle=True`` is passed explicitly.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import CheckpointError
from edgekd.run_dir import atomic_path

FORMAT = "edgekd-checkpoint/1"


def save_checkpoint(path: str | Path, model: nn.Module, spec: str, kwargs: dict[str, Any],
                    input_shape: tuple[int, ...], num_classes: int, **extra: Any) -> None:
    """Save a model's weights with what is needed to rebuild it, atomically."""
    payload = {
        "format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": {"spec": spec, "kwargs": dict(kwargs)}, "input_shape": list(input_shape),
        "num_classes": int(num_classes), **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a checkpoint file into a dict holding at least ``state_dict``.

    Raises:
        CheckpointError: Missing, corrupt, or needing pickle without ``allow_pickle``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects, which can run code when loaded",
                "re-save it as a state dict or safetensors, or pass --allow-pickle if you trust its source") from e
        obj = _load_pickled(path, e)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({_first_line(e)})") from e
    return _as_checkpoint(obj, path)


def _load_pickled(path: Path, original: Exception) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be unpickled ({_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _as_checkpoint(obj: Any, path: Path) -> dict[str, Any]:
    if isinstance(obj, nn.Module):  # only reachable with allow_pickle
        return {"state_dict": obj.state_dict()}
    if isinstance(obj, dict):
        if _is_state_dict(obj.get("state_dict")):
            return obj
        for key in ("model_state_dict", "model", "net"):
            if _is_state_dict(obj.get(key)):
                return {**obj, "state_dict": obj[key]}
        if _is_state_dict(obj):
            return {"state_dict": obj}
    raise CheckpointError(f"checkpoint {path} holds no state dict (found {type(obj).__name__})",
                          "save model.state_dict() with torch.save, or use safetensors")


def load_weights(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (strictly) and return the checkpoint dict."""
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    state = ckpt["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}",
                              "check the model name and kwargs in the recipe")
    model.load_state_dict(state)
    return ckpt
