"""The runtime interface, the registry of runtimes, and the input/output transforms every runtime shares.

A runtime is a :class:`Runtime` subclass with a ``name`` and the file ``suffixes`` it runs, registered with
:func:`register_runtime`. :func:`runtimes_for` answers which installed runtimes can run a file, so validate and
bench fan out to all of them and a new runtime is one class plus its registration.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

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


class Runtime:
    """A model file loaded in one runtime.

    Subclasses set ``name`` and ``suffixes`` and implement :meth:`_load` and :meth:`run` (on prepared inputs);
    they override :meth:`available`, :meth:`version` and :meth:`import_libraries` when they depend on an optional
    package. ``predict`` is what callers use.

    Args:
        path: The model file.
        entry: Its ``metadata.json`` entry.
        threads: Intra-op threads (None: the runtime's default).
    """

    name: ClassVar[str] = "abstract"
    suffixes: ClassVar[tuple[str, ...]] = ()  # file suffixes it runs, with the dot: (".onnx",)

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

    @classmethod
    def available(cls) -> bool:
        """Whether the runtime's libraries are installed (checked without importing them)."""
        return True

    @classmethod
    def accepts(cls, entry: dict[str, Any] | None) -> bool:
        """Whether the runtime runs the file its metadata entry describes (a client may take only some files)."""
        return True

    @classmethod
    def import_libraries(cls) -> None:
        """Import the runtime's libraries, so a timed model load does not pay for Python imports."""

    @classmethod
    def operator_profile(cls, path: str | os.PathLike, entry: dict[str, Any], x_raw: np.ndarray) -> dict[str, Any] | None:
        """Per-operator timings of a file, for runtimes that can trace their operators (None: this one cannot).

        Returns ``{"available": bool, "operators": [{"name", "delegate", "median_ms"}], "runs", ...}`` or, when
        the installed build cannot trace, ``{"available": False, "reason": ...}``.
        """
        return None

    @staticmethod
    def version() -> str:
        return "unknown"


def installed(*modules: str) -> bool:
    """Whether any of the top-level ``modules`` can be imported (without importing it)."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a broken or half-installed package counts as absent
            continue
    return False


# -- the registry ---------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Runtime]] = {}
# A read-only view by name, for code written before the accessors (prefer list_runtimes / get_runtime).
RUNTIMES: Mapping[str, type[Runtime]] = MappingProxyType(_REGISTRY)


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Register a runtime class under its ``name`` for its ``suffixes`` (usable as a class decorator).

    Raises:
        EdgeKDError: The class has no name or no suffixes, or a suffix lacks its leading dot.
    """
    if not getattr(cls, "name", None) or cls.name == "abstract" or not cls.suffixes:
        raise EdgeKDError(f"runtime class {cls.__name__} needs a name and the file suffixes it runs")
    bad = [s for s in cls.suffixes if not s.startswith(".")]
    if bad:
        raise EdgeKDError(f"runtime {cls.name!r}: suffix {bad[0]!r} must start with a dot (e.g. '.onnx')")
    _REGISTRY[cls.name] = cls
    return cls


def list_runtimes() -> list[str]:
    """Names of every registered runtime, in registration order (installed or not)."""
    return list(_REGISTRY)


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered under ``name``.

    Raises:
        EdgeKDError: No runtime of that name; the message suggests the closest one.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from: {', '.join(_REGISTRY)}"
        raise EdgeKDError(f"unknown runtime {name!r}", hint)
    return cls


def runtimes_for(path: str | os.PathLike, installed_only: bool = True,
                 entry: dict[str, Any] | None = None) -> list[type[Runtime]]:
    """The runtimes that run ``path`` (by its suffix), in registration order.

    Args:
        path: A model file name or path.
        installed_only: Leave out runtimes whose libraries are not installed.
        entry: The file's metadata.json entry, for runtimes that take only some files of a suffix
            (MediaPipe's ImageClassifier runs app-profile .tflite files only).
    """
    suffix = Path(path).suffix.lower()
    return [cls for cls in _REGISTRY.values()
            if suffix in cls.suffixes and cls.accepts(entry) and (not installed_only or cls.available())]


def deployment_batch(entry: dict[str, Any], batch: int = 1, fast: int = 256) -> int:
    """The batch a file must be measured at so its accuracy is what an app gets.

    Dynamic-range quantized files quantize activations with ranges taken over the whole batch, so a batch of
    256 scores differently from the single image an app classifies: they run at ``batch`` (1, or a recipe's
    deployment batch). Every other file gives the same answers at any batch and runs in ``fast`` batches.
    """
    return batch if entry.get("precision") == "dynamic" else fast


def runtime_for(path: str | os.PathLike, entry: dict[str, Any], threads: int | None = None,
                runtime: str | None = None) -> Runtime:
    """Load ``path`` in the named runtime, or in the first installed runtime that runs its suffix.

    Raises:
        EdgeKDError: Unknown runtime name, or no registered runtime runs this kind of file.
    """
    if runtime is not None:
        return get_runtime(runtime)(path, entry, threads)
    classes = runtimes_for(path, entry=entry) or runtimes_for(path, installed_only=False, entry=entry)
    if not classes:
        raise EdgeKDError(f"no runtime for {Path(path).suffix or 'suffix-less'} files ({path})",
                          f"registered runtimes: {', '.join(_REGISTRY)}")
    return classes[0](path, entry, threads)
