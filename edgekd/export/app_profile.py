"""The app profile: image models that take camera pixels as an app has them.

An app (MediaPipe's ``ImageClassifier``, the TFLite Task Library, ML Kit, a hand-written Android/iOS
pipeline) hands a model an RGB bitmap: NHWC, 3 channels, values 0..255 (float32, or uint8 for quantized
models). The research files edgekd exports take what PyTorch took (NCHW, normalized, as many channels as
the training data), which no image client accepts. An app-profile file wraps the model so the graph itself

1. takes ``(1, H, W, 3)`` RGB pixels in 0..255,
2. folds RGB to gray for 1-channel models (ITU-R 601 luma, the weights PIL's ``convert("L")`` uses, so
   a grayscale training folder and an app's RGB camera frame meet the same model),
3. applies the run's per-channel normalization (``(pixel / 255 - mean) / std``), and
4. returns softmax probabilities (default: image clients rank and threshold scores in 0..1; with raw logits
   the Task Library drops every class whose logit is negative) or the logits, as the recipe says.

The client therefore applies no normalization at all: the metadata tells it mean 0, std 1 in pixel units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.errors import ExportError
from edgekd.export.common import PIXEL_SCALE

# ITU-R BT.601 luma weights, as PIL's convert("L") uses them (edgekd's folder reader makes gray images so).
LUMA = (0.299, 0.587, 0.114)
OUTPUT_KINDS = ("probabilities", "logits")
APP_IO_TYPES = ("float32", "uint8")
APP_TAG = "app"


@dataclass(frozen=True)
class AppSpec:
    """What the app-profile wrapper needs to know about the run's images.

    Attributes:
        channels: Channels the PyTorch model takes (1 or 3).
        height: Image height in pixels.
        width: Image width in pixels.
        mean: Per-channel mean of the run's normalization, in unit scale (pixel / 255).
        std: Per-channel std of the run's normalization, in unit scale.
        output: ``probabilities`` (softmax) or ``logits``.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output: str = "probabilities"

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The file's input shape: ``(1, H, W, 3)``."""
        return (1, self.height, self.width, 3)

    def normalization_record(self) -> dict[str, Any]:
        """The normalization inside the graph in both units, and what the client applies (nothing)."""
        return {
            "pixel_scale": PIXEL_SCALE,
            "inside_graph": {"unit": {"mean": list(self.mean), "std": list(self.std)},
                             "pixels": {"mean": [m * PIXEL_SCALE for m in self.mean],
                                        "std": [s * PIXEL_SCALE for s in self.std]}},
            "client": {"pixels": {"mean": [0.0], "std": [1.0]}},
            "color": "RGB", "gray_fold": "bt601" if self.channels == 1 else None,
        }


def app_spec(layout: str, input_shape: tuple[int, ...] | list[int], normalization: dict[str, Any],
             output: str = "probabilities", *, asked: bool = False) -> AppSpec | None:
    """The app spec of a run, or None when the run's inputs are not images the profile can wrap.

    Args:
        layout: The run's input layout (``NCHW`` for images, ``NF`` for feature vectors).
        input_shape: One sample's shape (``C, H, W`` for images).
        normalization: The run's ``{"mean", "std"}`` per channel (unit scale).
        output: ``probabilities`` or ``logits``.
        asked: The user asked for the app profile explicitly: a non-image run is an error, not a skip.

    Raises:
        ExportError: ``asked`` and the run is not an image run, or ``output`` is unknown.
    """
    if output not in OUTPUT_KINDS:
        raise ExportError(f"unknown app output {output!r}", f"choose {' or '.join(OUTPUT_KINDS)}")
    shape = tuple(int(d) for d in input_shape)
    if layout != "NCHW" or len(shape) != 3 or shape[0] not in (1, 3):
        if asked:
            what = f"{layout} inputs of shape {list(shape)}"
            raise ExportError(f"the app profile needs an image run with 1 or 3 channels, this run has {what}",
                              "drop --app (export.tflite_app.enabled) for this run")
        return None
    c = shape[0]
    mean = [float(v) for v in np.broadcast_to(np.asarray(normalization.get("mean", [0.0]), np.float64), (c,))]
    std = [float(v) for v in np.broadcast_to(np.asarray(normalization.get("std", [1.0]), np.float64), (c,))]
    return AppSpec(c, shape[1], shape[2], tuple(mean), tuple(std), output)


def check_app_io(io_type: str) -> str:
    """The I/O type of a full-integer app-profile file; int8 I/O is refused (no image client feeds it).

    Raises:
        ExportError: ``io_type`` is ``int8`` or unknown.
    """
    if io_type == "int8":
        raise ExportError("int8 inputs/outputs cannot be used in the app profile: image clients feed uint8 or "
                          "float32 pixels", "set export.tflite_app.int8_io to uint8 or float32, or pass --no-app")
    if io_type not in APP_IO_TYPES:
        raise ExportError(f"unknown int8 I/O type {io_type!r} for the app profile", "choose uint8 or float32")
    return io_type


class AppModel(nn.Module):
    """Wraps an NCHW classifier so it takes ``(N, H, W, 3)`` RGB pixels in 0..255 (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: AppSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.probabilities = spec.output == "probabilities"
        self.gray = spec.channels == 1
        std = np.asarray(spec.std, np.float32)
        # One multiply-add per channel: (pixel / 255 - mean) / std == pixel * scale + shift.
        self.register_buffer("scale", torch.from_numpy(1.0 / (PIXEL_SCALE * std)))
        self.register_buffer("shift", torch.from_numpy(-np.asarray(spec.mean, np.float32) / std))
        self.register_buffer("luma", torch.tensor(LUMA, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        if self.gray:
            x = (x * self.luma).sum(dim=-1, keepdim=True)
        x = x * self.scale + self.shift
        out = self.model(x.permute(0, 3, 1, 2))
        return torch.softmax(out, dim=-1) if self.probabilities else out


def to_pixels(x_raw: np.ndarray) -> np.ndarray:
    """Raw eval inputs (NCHW, 0..1, 1 or 3 channels) → the uint8 RGB NHWC bitmaps an app would have."""
    x = np.asarray(x_raw, np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ExportError(f"app-profile inputs must be NCHW images with 1 or 3 channels, got shape {list(x.shape)}")
    # Divided by float32(1/255), as the runtimes' prepare_input does with an app entry's normalization, so
    # values halfway between two pixel levels round the same way for MediaPipe and for the parity check.
    px = np.clip(np.round(x / np.float32(1.0 / PIXEL_SCALE)), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if px.shape[-1] == 1:
        px = np.repeat(px, 3, axis=-1)
    return np.ascontiguousarray(px)


def pixel_calibration(calib_normalized: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalized NCHW calibration samples → float32 RGB NHWC pixels (what an app-profile file takes)."""
    shape = (1, -1, 1, 1)
    raw = calib_normalized * np.asarray(std, np.float32).reshape(shape) + np.asarray(mean, np.float32).reshape(shape)
    return to_pixels(raw).astype(np.float32)


def read_labels_file(path: str | Path, num_classes: int) -> list[str]:
    """Class names for an app from a labels file (one per line), checked against the model's class count.

    Raises:
        ExportError: The file cannot be read or its count differs from ``num_classes``.
    """
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read labels file {p}: {getattr(e, 'strerror', None) or e}") from e
    # A trailing empty line is common; empty lines in the middle are a mistake, so only the end is trimmed.
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [ln.strip() for ln in lines]
    if len(labels) != num_classes:
        raise ExportError(f"labels file {p} has {len(labels)} labels but the model has {num_classes} classes",
                          "write one label per class, one per line, in class order")
    if any(not name for name in labels):
        raise ExportError(f"labels file {p} has an empty line among its labels", "remove it or name that class")
    return labels


def app_file_name(model: str, precision: str, suffix: str = ".tflite") -> str:
    """``student_app_int8.tflite``: app-profile files sit beside the research files of the same model."""
    return f"{model}_{APP_TAG}_{precision}{suffix}"
