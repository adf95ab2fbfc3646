"""One small interface over the runtimes an exported model runs in: PyTorch, ONNX Runtime and LiteRT.

Every runtime takes *raw* inputs as stored in ``eval.npz`` (float32, NCHW or NF, before normalization) and
returns float32 logits; normalization, layout (NCHW/NHWC) and integer quantization of inputs and outputs are
applied from the model's ``metadata.json`` entry, exactly as an app on a device must do.

A metadata entry (one per exported file) looks like::

    {"file": "student_int8.tflite", "model": "student", "format": "tflite", "precision": "int8",
     "input":  {"name": ..., "shape": [1, 1, 28, 28], "dtype": "int8", "layout": "NHWC",
                "quantization": {"scale": 0.0123, "zero_point": -3}},
     "output": {"name": ..., "shape": [1, 10], "dtype": "int8", "quantization": {...}},
     "normalization": {"mean": [...], "std": [...]}, "labels": [...], "size_bytes": ..., "sha256": ...}
"""

from __future__ import annotations

from edgekd.runtimes.base import RUNTIMES, Runtime, deployment_batch, prepare_input, restore_output, runtime_for

__all__ = ["RUNTIMES", "Runtime", "deployment_batch", "prepare_input", "restore_output", "runtime_for"]
