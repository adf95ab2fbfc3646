"""One small interface over the runtimes a model file runs in: PyTorch, ONNX Runtime, LiteRT, MediaPipe, TFLM,
ExecuTorch, and any registered.

Every runtime takes *raw* inputs as stored in ``eval.npz`` (float32, NCHW or NF, before normalization) and
returns float32 logits; normalization, layout (NCHW/NHWC) and integer quantization of inputs and outputs are
applied from the model's ``metadata.json`` entry, exactly as an app on a device must do.

A metadata entry (one per exported file) looks like::

    {"file": "student_int8.tflite", "model": "student", "format": "tflite", "precision": "int8",
     "input":  {"name": ..., "shape": [1, 1, 28, 28], "dtype": "int8", "layout": "NHWC",
                "quantization": {"scale": 0.0123, "zero_point": -3}},
     "output": {"name": ..., "shape": [1, 10], "dtype": "int8", "quantization": {...}},
     "normalization": {"mean": [...], "std": [...]}, "labels": [...], "size_bytes": ..., "sha256": ...}

Each runtime is a :class:`Runtime` subclass registered with the file suffixes it runs
(:func:`register_runtime`); :func:`runtimes_for` lists the installed runtimes that run a file, so validate
and bench fan out to every one of them. Timing lives in :mod:`edgekd.runtimes.timing`.

Modules: ``base`` (interface, registry, input/output transforms), ``pytorch``, ``ort``, ``litert``,
``mediapipe``, ``tflm``, ``executorch`` (the built-in runtimes; the last three run where their optional package
is installed), ``timing`` (load/latency/memory measurements, in process or in a fresh subprocess).
"""

from __future__ import annotations

from edgekd.runtimes.base import (RUNTIMES, Runtime, deployment_batch, get_runtime, list_runtimes, prepare_input,
                                  register_runtime, restore_output, runtime_for, runtimes_for)
# The built-in runtimes register themselves on import (their heavy libraries load only when a file is run).
from edgekd.runtimes.pytorch import TorchRuntime
from edgekd.runtimes.ort import OnnxRuntime
from edgekd.runtimes.litert import LiteRTRuntime
from edgekd.runtimes.mediapipe import MediaPipeRuntime  # optional: available only where mediapipe is installed
from edgekd.runtimes.tflm import TFLMRuntime  # optional (edgekd[mcu]): MCU files only
from edgekd.runtimes.executorch import ExecuTorchRuntime  # optional (edgekd[executorch]): .pte files

__all__ = ["RUNTIMES", "ExecuTorchRuntime", "LiteRTRuntime", "MediaPipeRuntime", "OnnxRuntime", "Runtime",
           "TFLMRuntime", "TorchRuntime",
           "deployment_batch", "get_runtime", "list_runtimes", "prepare_input", "register_runtime", "restore_output",
           "runtime_for", "runtimes_for"]
