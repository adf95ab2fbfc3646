"""Export backends: one object per file format, registered by name, so a format is one module plus its registration.

A backend (:class:`ExportBackend`) knows, for its format: the file ``suffix``; the ``routes`` (tool chains) that
write each precision, in the order they are tried; how to :meth:`~ExportBackend.export` a fp32 file and
:meth:`~ExportBackend.quantize` it by a route; how to :meth:`~ExportBackend.describe` a file for metadata.json
(input/output as its runtime reports them, tool versions); and how to :meth:`~ExportBackend.verify` a file
against the PyTorch model (run it in its runtime on the test split). The export pipeline only ever talks to
this interface; the built-in ``onnx`` and ``tflite`` backends register themselves in their own modules.

A new format::

    class NpzBackend(ExportBackend):
        name, suffix = "npz", ".npz"
        routes = {"fp32": ("numpy",)}
        def export(self, model, sample, path, *, layout, what): ...
        def io_spec(self, path): ...

    register_backend(NpzBackend())

and a runtime for ``.npz`` files (:func:`edgekd.runtimes.register_runtime`) so validate, bench and the
verification can run it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgekd.errors import EdgeKDError, ExportError
from edgekd.export.common import operator_in, quiet, tool_versions

PRECISIONS = ("fp32", "fp16", "int8", "dynamic")


@dataclass
class QuantizeJob:
    """Everything a quantization route may need; each route uses what it needs.

    Attributes:
        model: The fp32 PyTorch model (NCHW or NF input), for routes that quantize the graph.
        sample: One normalized NCHW/NF input (batch 1).
        fp32_path: The verified fp32 file of the same format, for routes that quantize the file.
        path: Destination; routes write it atomically.
        precision: ``fp16``, ``int8`` or ``dynamic``.
        layout: Input layout of the file (``NCHW``, ``NHWC`` or ``NF``).
        calibration: Normalized NCHW/NF calibration inputs (``int8`` only, else None).
        settings: The export settings (``int8_io``, ``calibration_method``...; an ``ExportConfig``).
        what: Name of the model for error messages.
    """

    model: nn.Module
    sample: torch.Tensor
    fp32_path: Path
    path: Path
    precision: str
    layout: str
    calibration: np.ndarray | None
    settings: Any
    what: str


class ExportBackend:
    """Base class of an export format. Subclasses set the class attributes and implement :meth:`export` and
    :meth:`io_spec` (and :meth:`quantize` when ``routes`` has quantized precisions)."""

    name: ClassVar[str] = ""  # the format name: recipe export.formats, metadata "format", CLI --format
    suffix: ClassVar[str] = ""  # file suffix with its dot
    # Precision -> the routes that write it, tried in this order until one meets the tolerance.
    routes: ClassVar[dict[str, tuple[str, ...]]] = {}
    tools: ClassVar[tuple[str, ...]] = ()  # distributions whose versions metadata.json records (besides torch)
    channels_last: ClassVar[bool] = False  # can take NHWC input (``export.nhwc``)
    channel_axis: ClassVar[int] = 1  # channel axis of the layer outputs :meth:`layer_outputs` returns
    runtime: ClassVar[str | None] = None  # the runtime that verifies files (None: the first that runs the suffix)

    # -- writing -------------------------------------------------------------------------------------------
    def file_layout(self, layout: str, nhwc: bool) -> str:
        """Input layout of this format's files for a model taking ``layout`` input."""
        return "NHWC" if layout == "NCHW" and nhwc and self.channels_last else layout

    def routes_for(self, precision: str) -> tuple[str, ...]:
        """The routes that write ``precision``, in the order they are tried.

        Raises:
            ExportError: The format has no route for this precision.
        """
        routes = self.routes.get(precision)
        if not routes:
            have = ", ".join(p for p in PRECISIONS if self.routes.get(p)) or "none"
            raise ExportError(f"{self.name} has no {precision} export", f"{self.name} precisions: {have}")
        return routes

    def export(self, model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, what: str) -> str:
        """Write ``model`` as a fp32 file at ``path`` (atomically) and return the route name.

        Args:
            model: The PyTorch model (NCHW or NF input).
            sample: One normalized NCHW/NF input, batch 1.
            path: Destination.
            layout: Input layout the file must take (see :meth:`file_layout`).
            what: Name of the model for error messages.

        Raises:
            ExportError: The conversion failed (naming the operator when the converter does).
        """
        raise NotImplementedError

    def quantize(self, route: str, job: QuantizeJob) -> str:
        """Write ``job.path`` at ``job.precision`` by ``route`` and return the route name to record."""
        raise ExportError(f"{self.name} has no quantization route {route!r}")

    # -- reading back --------------------------------------------------------------------------------------
    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(input, output)`` of a file as its runtime reports them: ``name``, ``shape`` (dynamic -1),
        ``dtype``, ``quantization`` (``{"scale", "zero_point"}`` or None)."""
        raise NotImplementedError

    def describe(self, path: Path) -> dict[str, Any]:
        """The format-specific part of a metadata.json entry: ``format``, ``input``, ``output``,
        ``tool_versions``."""
        inp, out = self.io_spec(Path(path))
        return {"format": self.name, "input": inp, "output": out, "tool_versions": tool_versions(self.tools)}

    def verify(self, path: Path, entry: dict[str, Any], x_raw: np.ndarray) -> np.ndarray:
        """Float32 logits of the file for raw test inputs, run in the runtime that verifies this format.

        Raises:
            ExportError: The file cannot be loaded or run (naming the operator when the runtime does).
        """
        from edgekd.runtimes import runtime_for

        with quiet():  # interpreters announce their delegates on stderr
            rt = runtime_for(path, entry, runtime=self.runtime)
            try:
                return rt.predict(x_raw)
            except Exception as e:
                text = str(e).strip()
                op = operator_in(text)
                what = f"operator {op} is not supported" if op else (text.splitlines() or [""])[0][:200]
                raise ExportError(f"{Path(path).name} fails to run in {rt.name}: {what}") from e

    def layer_outputs(self, path: Path, x: np.ndarray) -> list[tuple] | None:
        """Every layer's output for prepared inputs ``x``, ``[(op, tensor, label, values)]`` in execution order,
        for finding where a quantized file diverges from its fp32 file (None: not supported)."""
        return None


# -- the registry -----------------------------------------------------------------------------------------

_REGISTRY: dict[str, ExportBackend] = {}


def register_backend(backend: ExportBackend) -> ExportBackend:
    """Register an export backend (an instance) under its ``name``; returns it.

    Raises:
        EdgeKDError: The backend has no name, no suffix (with its dot), no fp32 route, or takes a suffix that
            another backend already writes.
    """
    if not backend.name or not backend.suffix.startswith(".") or not backend.routes.get("fp32"):
        raise EdgeKDError(f"export backend {type(backend).__name__} needs a name, a suffix with its dot "
                          "and an fp32 route")
    other = next((b for b in _REGISTRY.values() if b.suffix == backend.suffix and b.name != backend.name), None)
    if other is not None:
        raise EdgeKDError(f"export backend {backend.name!r}: suffix {backend.suffix} is already written by "
                          f"{other.name!r}")
    _REGISTRY[backend.name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of the registered export formats, in registration order."""
    return list(_REGISTRY)


def get_backend(name: str) -> ExportBackend:
    """The backend of a format name.

    Raises:
        ExportError: No such format; the message suggests the closest one.
    """
    backend = _REGISTRY.get(str(name).strip().lower())
    if backend is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from: {', '.join(_REGISTRY)}"
        raise ExportError(f"unknown format {name!r}", hint)
    return backend


def backend_for(path: str | Path) -> ExportBackend:
    """The backend that writes files with the suffix of ``path``.

    Raises:
        ExportError: No registered format writes that suffix.
    """
    suffix = Path(path).suffix.lower()
    for backend in _REGISTRY.values():
        if backend.suffix == suffix:
            return backend
    raise ExportError(f"no export format writes {suffix or 'suffix-less'} files ({Path(path).name})",
                      f"registered formats: {', '.join(_REGISTRY)}")
