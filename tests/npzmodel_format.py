"""A toy export format, defined outside edgekd: ``.npzmodel`` files and a numpy runtime that runs them.

A ``.npzmodel`` file is a numpy ``.npz`` archive: the model's leaf layers in execution order (a JSON list under
``layers``) and their weights (``<i>.<name>`` arrays). The runtime runs them with plain numpy. It handles the
layers of edgekd's ``mlp`` and ``cnn`` models (Linear, Conv2d, BatchNorm2d, ReLU, MaxPool2d, adaptive average
pooling to 1x1, Flatten, Dropout, Identity) whose forward pass is their leaves in order; any other layer is
refused at export, naming it, like a real converter.

This one module is the whole format: importing it registers the export backend (fp32, and fp16 weights) and
the runtime. Nothing in edgekd names it: ``edgekd export --format npzmodel`` writes and verifies the files and
``metadata.json`` describes them; ``edgekd validate`` and ``edgekd bench`` find the runtime by the suffix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.errors import ExportError
from edgekd.export import ExportBackend, QuantizeJob, register_backend
from edgekd.run_dir import atomic_path
from edgekd.runtimes import Runtime, register_runtime

SUFFIX = ".npzmodel"
_PASS_THROUGH = (nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def _layer(module: nn.Module, index: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON description of one leaf layer; its tensors go into ``arrays``."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise ExportError(f"npzmodel: {kind} with groups/dilation/padding mode is not supported")
        spec = {"stride": list(module.stride), "padding": list(module.padding)}
    elif isinstance(module, nn.BatchNorm2d):
        spec = {"eps": module.eps}
    elif isinstance(module, nn.MaxPool2d):
        if module.kernel_size != module.stride or module.padding != 0:
            raise ExportError("npzmodel: only MaxPool2d with stride == kernel size is supported")
        spec = {"kernel": int(module.kernel_size)}
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        if module.output_size not in (1, (1, 1)):
            raise ExportError("npzmodel: only AdaptiveAvgPool2d(1) is supported")
        spec = {}
    elif isinstance(module, (nn.Linear, *_PASS_THROUGH)):
        spec = {}
    else:
        raise ExportError(f"npzmodel conversion failed: operator {kind} is not supported by npzmodel",
                          "export the other formats only")
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.dtype.is_floating_point:
            arrays[f"{index}.{name}"] = tensor.detach().cpu().numpy().astype(np.float32)
    return {"kind": kind, **spec}


def write_npzmodel(model: nn.Module, input_shape: tuple[int, ...], path: Path, dtype: str = "float32") -> None:
    """Write ``model``'s leaf layers and weights (stored as ``dtype``) to ``path``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    leaves = [m for m in model.modules() if not list(m.children())]
    layers = [_layer(m, i, arrays) for i, m in enumerate(leaves)]
    with torch.inference_mode():
        classes = int(model.eval()(torch.zeros(1, *input_shape)).shape[-1])
    header = {"layers": layers, "input_shape": list(input_shape), "classes": classes, "dtype": dtype}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), **{k: v.astype(dtype) for k, v in arrays.items()})


def read_npzmodel(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(header, weights as float32)`` of a ``.npzmodel`` file; nothing is unpickled."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        weights = {k: np.asarray(data[k], np.float32) for k in data.files if k != "header"}
    return header, weights


def _forward(layer: dict[str, Any], w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    kind = layer["kind"]
    if kind == "Linear":
        y = x.reshape(len(x), -1) @ w["weight"].T
        return y + w["bias"] if "bias" in w else y
    if kind == "Conv2d":
        (sh, sw), (ph, pw) = layer["stride"], layer["padding"]
        k = w["weight"]
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        win = np.lib.stride_tricks.sliding_window_view(xp, k.shape[2:], axis=(2, 3))[:, :, ::sh, ::sw]
        y = np.einsum("nchwij,ocij->nohw", win, k, optimize=True)
        return y + w["bias"][None, :, None, None] if "bias" in w else y
    if kind == "BatchNorm2d":
        scale = w["weight"] / np.sqrt(w["running_var"] + layer["eps"])
        return (x - w["running_mean"][None, :, None, None]) * scale[None, :, None, None] + w["bias"][None, :, None, None]
    if kind == "ReLU":
        return np.maximum(x, 0)
    if kind == "MaxPool2d":
        k = layer["kernel"]
        n, c, h, wd = x.shape
        return x[:, :, : h // k * k, : wd // k * k].reshape(n, c, h // k, k, wd // k, k).max(axis=(3, 5))
    if kind == "AdaptiveAvgPool2d":
        return x.mean(axis=(2, 3), keepdims=True)
    if kind == "Flatten":
        return x.reshape(len(x), -1)
    return x  # Dropout, Identity: nothing at inference


class NpzModelBackend(ExportBackend):
    """``.npzmodel``: leaf layers + weights for the numpy runtime; fp16 stores the weights as float16."""

    name = "npzmodel"
    suffix = SUFFIX
    routes = {"fp32": ("npz-layers",), "fp16": ("npz-layers-fp16",)}
    tools = ("numpy",)
    runtime = "numpy-layers"

    def export(self, model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, what: str) -> str:
        write_npzmodel(model, tuple(sample.shape[1:]), path)
        return "npz-layers"

    def quantize(self, route: str, job: QuantizeJob) -> str:
        write_npzmodel(job.model, tuple(job.sample.shape[1:]), job.path, dtype="float16")
        return route

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        header, _ = read_npzmodel(path)
        return ({"name": "input", "shape": [-1, *header["input_shape"]], "dtype": "float32", "quantization": None},
                {"name": "logits", "shape": [-1, header["classes"]], "dtype": "float32", "quantization": None})


@register_runtime
class NumpyLayersRuntime(Runtime):
    """A ``.npzmodel`` file run layer by layer with numpy."""

    name = "numpy-layers"
    suffixes = (SUFFIX,)

    def _load(self) -> None:
        header, weights = read_npzmodel(self.path)
        self.layers = [(layer, {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == str(i)})
                       for i, layer in enumerate(header["layers"])]

    def run(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)  # float64 inside, so the file matches PyTorch's float32 within rounding
        for layer, w in self.layers:
            x = _forward(layer, w, x)
        return x.astype(np.float32)

    @staticmethod
    def version() -> str:
        return f"numpy {np.__version__}"


register_backend(NpzModelBackend())
