"""The runtime interface and the input/output transforms every runtime shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError, ExportError

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def prepare_input(x_raw: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """Raw inputs → what the model file takes: normalize, transpose to NHWC if asked, quantize if integer."""
    x = np.asarray(x_raw, dtype=np.float32)
    norm = entry.get("normalization") or {}
    if norm:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = (x - np.asarray(norm["mean"], np.float32).reshape(shape)) / np.asarray(norm["std"], np.float32).reshape(shape)
    spec = entry["input"]
    if spec.get("layout") == "NHWC" and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
        shape = spec.get("shape") or []
        if x.shape[-1] == 1 and len(shape) == 4 and shape[-1] == 3:
            # A gray image for an RGB (app-profile) input: the app's bitmap has R = G = B.
            x = np.repeat(x, 3, axis=-1)
    q = spec.get("quantization")
    dtype = spec.get("dtype", "float32")
    if q and dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        x = np.clip(np.round(x / q["scale"] + q["zero_point"]), lo, hi).astype(dtype)
    else:
        x = x.astype(dtype)
    return np.ascontiguousarray(x)


def restore_output(y: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """Model output → float32 logits (dequantized if the output is integer)."""
    q = entry["output"].get("quantization")
    if q and np.issubdtype(np.asarray(y).dtype, np.integer):
        return (np.asarray(y, np.float32) - q["zero_point"]) * q["scale"]
    return np.asarray(y, dtype=np.float32)


def deployment_batch(entry: dict[str, Any], batch: int = 1, fast: int = 256) -> int:
    """The batch a file must be measured at so its accuracy is what an app gets.

    Dynamic-range quantized files quantize activations with ranges taken over the whole batch, so a batch of
    256 scores differently from the single image an app classifies: they run at ``batch`` (1, or a recipe's
    deployment batch). Every other file gives the same answers at any batch and runs in ``fast`` batches.
    """
    return batch if entry.get("precision") == "dynamic" else fast


class Runtime:
    """A model file loaded in one runtime.

    Subclasses implement :meth:`_load` and :meth:`run` (on prepared inputs). ``predict`` is what callers use.

    Args:
        path: The model file.
        entry: Its ``metadata.json`` entry.
        threads: Intra-op threads (None: the runtime's default).
    """

    name = "abstract"
    formats: tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike, entry: dict[str, Any], threads: int | None = None):
        self.path = Path(path)
        self.entry = entry
        self.threads = threads
        if threads is not None and threads <= 0:
            raise EdgeKDError(f"threads must be a positive number, got {threads}")
        if not self.path.is_file():
            raise ExportError(f"model file {self.path} not found")
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run prepared inputs (a batch) and return the raw output array."""
        raise NotImplementedError

    def prepare(self, x_raw: np.ndarray) -> np.ndarray:
        return prepare_input(x_raw, self.entry)

    def predict(self, x_raw: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Float32 logits for raw inputs, run in batches."""
        outs = [restore_output(self.run(self.prepare(x_raw[i:i + batch_size])), self.entry)
                for i in range(0, len(x_raw), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    @staticmethod
    def version() -> str:
        return "unknown"


class TorchRuntime(Runtime):
    """A PyTorch model: an edgekd checkpoint rebuilt from its recorded spec (``.pt``)."""

    name = "torch"
    formats = ("pt",)

    def _load(self) -> None:
        import torch

        from edgekd.models import build_model, load_checkpoint

        ckpt = load_checkpoint(self.path)
        if "model" not in ckpt:
            raise ExportError(f"{self.path} is not an edgekd checkpoint (no model spec)")
        loader = self.entry.get("loader")
        if loader is not None:  # e.g. a pruned model that needs its own rebuild function
            self.model = loader(self.path)
        elif ckpt.get("format") == "edgekd-pruned/1":
            # Pruned widths cannot be rebuilt from the spec alone; edgekd.prune records and restores them.
            from edgekd.prune import load_pruned

            self.model = load_pruned(self.path)
        else:
            spec = ckpt["model"]
            self.model = build_model(spec["spec"], tuple(ckpt["input_shape"]), int(ckpt["num_classes"]), spec["kwargs"])
            self.model.load_state_dict(ckpt["state_dict"])
        self.model.eval()
        self._torch = torch

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    @staticmethod
    def version() -> str:
        import torch

        return torch.__version__


class OnnxRuntime(Runtime):
    """An ONNX file in onnxruntime's CPU execution provider."""

    name = "onnxruntime"
    formats = ("onnx", "ort")  # .ort: ONNX Runtime Mobile's format, loaded by the same sessions

    def _load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot load {self.path.name}: {str(e).splitlines()[0][:200]}") from None
        self.input_name = self.session.get_inputs()[0].name
        first = self.session.get_inputs()[0].shape[0] if self.session.get_inputs()[0].shape else None
        self._fixed_batch_1 = first == 1

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] > 1 and self._fixed_batch_1:
            # Exported with a static batch of 1: run one sample at a time rather than fail.
            return np.concatenate([self.run(x[i:i + 1]) for i in range(x.shape[0])])
        return self.session.run(None, {self.input_name: x})[0]

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__


def _tflite_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter, "tensorflow"
    except ImportError:
        raise ExportError("no TFLite interpreter installed",
                          "pip install ai-edge-litert (or tflite-runtime on a device)") from None


class LiteRTRuntime(Runtime):
    """A .tflite file in LiteRT's interpreter (``ai_edge_litert``, else ``tflite_runtime``, else TensorFlow)."""

    name = "litert"
    formats = ("tflite",)

    def _load(self) -> None:
        cls, self.module = _tflite_interpreter_class()
        kwargs = {"num_threads": self.threads} if self.threads else {}
        try:
            self.interpreter = cls(model_path=str(self.path), **kwargs)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise ExportError(f"LiteRT cannot load {self.path.name}: {str(e).splitlines()[0][:200]}") from None
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._batch = int(self._in["shape"][0])
        sig = self._in.get("shape_signature")
        self._dynamic_batch = sig is not None and len(sig) > 0 and int(sig[0]) == -1

    def run(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        if x.shape[0] > 1 and self._batch == 1 and not self._dynamic_batch:
            # A graph exported at a fixed batch cannot be resized (XNNPACK refuses, and a reshape baked into
            # the graph would mix samples): run it one sample at a time, as an app would.
            return np.concatenate([self.run(x[i:i + 1]) for i in range(x.shape[0])])
        if x.shape[0] != self._batch:
            it.resize_tensor_input(self._in["index"], list(x.shape), strict=False)
            it.allocate_tensors()
            self._batch = x.shape[0]
            self._out = it.get_output_details()[0]
        it.set_tensor(self._in["index"], x)
        it.invoke()
        return it.get_tensor(self._out["index"]).copy()

    @staticmethod
    def version() -> str:
        _, module = _tflite_interpreter_class()
        if module == "ai_edge_litert":
            from importlib.metadata import version

            return f"ai-edge-litert {version('ai-edge-litert')}"
        return module


RUNTIMES: dict[str, type[Runtime]] = {"torch": TorchRuntime, "onnxruntime": OnnxRuntime, "litert": LiteRTRuntime}


_OPTIONAL_CHECKED: set[str] = set()


def optional_runtime(name: str) -> bool:
    """Register an optional runtime (``mediapipe``) if its package is installed; whether it is available.

    Checked on first use, not on import: importing MediaPipe takes seconds that most commands do not need.
    """
    if name != "mediapipe":
        return name in RUNTIMES
    if name not in _OPTIONAL_CHECKED:
        _OPTIONAL_CHECKED.add(name)
        from edgekd.runtimes.mediapipe import MediaPipeRuntime, mediapipe_installed

        if mediapipe_installed():
            RUNTIMES[name] = MediaPipeRuntime
    return name in RUNTIMES


def runtime_for(path: str | os.PathLike, entry: dict[str, Any], threads: int | None = None,
                runtime: str | None = None) -> Runtime:
    """Load ``path`` in the named runtime, or the one its format needs."""
    if runtime is not None:
        if runtime not in RUNTIMES and not optional_runtime(runtime):
            raise EdgeKDError(f"unknown runtime {runtime!r}", f"choose from: {', '.join(RUNTIMES)}")
        return RUNTIMES[runtime](path, entry, threads)
    fmt = entry.get("format") or Path(path).suffix.lstrip(".")
    for cls in (TorchRuntime, OnnxRuntime, LiteRTRuntime):  # the format's own runtime, never a client
        if fmt in cls.formats:
            return cls(path, entry, threads)
    raise EdgeKDError(f"no runtime for format {fmt!r} ({path})")
