"""The parity ladder: how far an exported file's outputs are from the PyTorch model's, and whether that is OK.

* fp32 files: ``max |diff| / max |logit|`` over the whole test split must stay within
  ``export.tolerance.fp32_rel`` (1e-5 by default): the same network, only float rounding differs.
* fp16 / int8 / dynamic files: top-1 agreement with the PyTorch model and the accuracy drop against it
  (``export.tolerance.min_agreement``, ``export.tolerance.max_accuracy_drop``).
* A quantized file that fails is compared layer by layer with its fp32 file to name the first layer whose
  output diverges (relative L2 error above :data:`DIVERGENCE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Median per-channel relative L2 error (||q - f|| / ||f||) at which a layer's output counts as diverged:
# about 20 dB SQNR, where int8 classifiers typically start to change their top-1 answers.
DIVERGENCE = 0.1


def compare(ref: np.ndarray, out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Numbers of one exported file against the PyTorch logits on the same inputs.

    Args:
        ref: PyTorch logits ``(N, classes)``.
        out: The file's logits (dequantized) ``(N, classes)``.
        y: Labels ``(N,)``.
    """
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} differs from PyTorch's {ref.shape}")
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max()) or 1.0
    pred, ref_pred = out.argmax(1), ref.argmax(1)
    acc, ref_acc = float((pred == y).mean()), float((ref_pred == y).mean())
    return {"test_accuracy": acc, "reference_accuracy": ref_acc, "accuracy_drop": ref_acc - acc,
            "agreement": float((pred == ref_pred).mean()), "max_abs_diff": float(diff.max()),
            "parity": float(diff.max()) / scale, "samples": int(len(y))}


def problem(numbers: dict[str, float], precision: str, tolerance: Any) -> str | None:
    """One line saying how a file misses the tolerance, or None if it meets it."""
    if precision == "fp32":
        if numbers["parity"] > tolerance.fp32_rel:
            return (f"max|diff|/max|logit| = {numbers['parity']:.2e} > {tolerance.fp32_rel:.0e} "
                    f"(max|diff| {numbers['max_abs_diff']:.2e})")
        return None
    issues = []
    if numbers["agreement"] < tolerance.min_agreement:
        issues.append(f"top-1 agreement {100 * numbers['agreement']:.2f}% < {100 * tolerance.min_agreement:.2f}%")
    if numbers["accuracy_drop"] > tolerance.max_accuracy_drop:
        issues.append(f"accuracy drop {100 * numbers['accuracy_drop']:.2f} points > "
                      f"{100 * tolerance.max_accuracy_drop:.2f} (accuracy {numbers['test_accuracy']:.4f} vs "
                      f"PyTorch {numbers['reference_accuracy']:.4f})")
    return "; ".join(issues) or None


@dataclass
class Divergence:
    """Where a quantized file first drifts away from its fp32 file."""

    layer: str | None  # first layer above the threshold (None: none is)
    error: float | None  # its relative L2 error
    worst_layer: str | None
    worst_error: float | None
    compared: int  # layers matched between the two files

    def describe(self) -> str:
        if not self.compared:
            return "no layer of the quantized file could be matched to the fp32 file"
        if self.layer is None:
            return (f"no layer diverges by more than {DIVERGENCE:.0%} relative error per channel "
                    f"(largest: {self.worst_layer}, {self.worst_error:.3f})")
        return f"first diverging layer: {self.layer} (relative error per channel {self.error:.3f} > {DIVERGENCE})"

    def as_dict(self) -> dict[str, Any]:
        return {"first_layer": self.layer, "error": self.error, "worst_layer": self.worst_layer,
                "worst_error": self.worst_error, "layers_compared": self.compared, "threshold": DIVERGENCE}


# (operator type, tensor name, readable layer label, float values of all samples) in execution order.
Layers = list[tuple[str, str, str, np.ndarray]]


def channel_error(ref: np.ndarray, q: np.ndarray, axis: int) -> float:
    """Median over channels of the relative L2 error ``||q_c - f_c|| / ||f_c||``.

    Per channel, because int8 activations share one scale per tensor: a channel with a huge range (the
    classic collapse) leaves the other channels with no resolution, which a tensor-wide error hides.
    Channels that are (nearly) always zero in the reference are left out.
    """
    if ref.ndim < 2:
        denom = float(np.linalg.norm(ref)) or 1.0
        return float(np.linalg.norm(q - ref)) / denom
    r = np.moveaxis(ref, axis, -1).reshape(-1, ref.shape[axis]).astype(np.float64)
    d = np.moveaxis(q - ref, axis, -1).reshape(-1, ref.shape[axis]).astype(np.float64)
    norms = np.linalg.norm(r, axis=0)
    live = norms > 1e-6 * (norms.max() or 1.0)
    if not live.any():
        return 0.0
    return float(np.median(np.linalg.norm(d, axis=0)[live] / norms[live]))


def first_divergence(ref_layers: Layers, q_layers: Layers, channel_axis: int) -> Divergence:
    """Match the layers of an fp32 file and its quantized version and find the first one that diverges.

    Layers are matched by tensor name, else (when a route renames tensors) by position when both files
    run the same sequence of operators. The order is the fp32 file's execution order.

    Args:
        ref_layers: Layers of the fp32 file.
        q_layers: Layers of the quantized file (values dequantized).
        channel_axis: Channel axis of 4-D activations (1 for ONNX's NCHW, -1 for TFLite's NHWC).
    """
    q_by_name = {name: v for _, name, _, v in q_layers}
    pairs = [(label, v, q_by_name[name]) for _, name, label, v in ref_layers
             if name in q_by_name and q_by_name[name].shape == v.shape]
    if len(pairs) < len(ref_layers) // 2 and [l[0] for l in ref_layers] == [l[0] for l in q_layers]:
        pairs = [(label, v, qv) for (_, _, label, v), (_, _, _, qv) in zip(ref_layers, q_layers)
                 if qv.shape == v.shape]
    first = first_err = worst = worst_err = None
    for label, ref, q in pairs:
        err = channel_error(ref, q, channel_axis if ref.ndim == 4 else -1)
        if worst_err is None or err > worst_err:
            worst, worst_err = label, err
        if first is None and err > DIVERGENCE:
            first, first_err = label, err
    return Divergence(first, first_err, worst, worst_err, len(pairs))
