"""Export as an artifact graph: named backends (ONNX, TFLite, app profile, MCU, ONNX Runtime Mobile, ExecuTorch),
each verified against PyTorch and described for apps.

``run_export`` and ``run_quantize`` are what ``edgekd export`` and ``edgekd quantize`` call; ``summary_table``
prints the table of exported files (``make demo`` ends with it).

A backend (:mod:`edgekd.export.backends`) declares what it is made from (a model variant, or another backend's
file), its precisions and routes (a ``qat`` route where it has one), its settings (``export.<name>``), and its
export, verify and describe steps. The built-in ones register themselves in their own modules, imported here;
the pipeline (:mod:`edgekd.export.pipeline`) imports none of them.

Modules: ``backends`` (interface, registry, plan), ``session`` (the shared session and file writer),
``pipeline`` (the export and quantize stages), ``qat`` (quantization-aware distillation), ``metadata``
(metadata.json), ``parity`` (comparison with PyTorch), ``common`` (quiet conversions, operator-naming errors,
tool versions); the backends: ``onnx``, ``ort``, ``tflite``, ``app_files`` (``tflite_app``),
``mcu``, ``pte``.
"""

# Each import registers a backend; the order is the order of list_backends() (and of their files' rows).
from edgekd.export import onnx as _onnx  # noqa: F401
from edgekd.export import tflite as _tflite  # noqa: F401
from edgekd.export import app_files as _app_files  # noqa: F401  (tflite_app)
from edgekd.export import mcu as _mcu  # noqa: F401
from edgekd.export import ort as _ort  # noqa: F401
from edgekd.export import pte as _pte  # noqa: F401
from edgekd.export.backends import (PRECISIONS, Derived, ExportBackend, QuantizeJob, backend_for, get_backend,
                                    list_backends, register_backend, register_variant, resolve_plan)
from edgekd.export.pipeline import parse_precisions, run_export, run_quantize, summary_table
from edgekd.export.session import QUANT_PRECISIONS, check_formats
from edgekd.results import ExportReport

__all__ = ["PRECISIONS", "QUANT_PRECISIONS", "Derived", "ExportBackend", "ExportReport", "QuantizeJob",
           "backend_for", "check_formats", "get_backend", "list_backends", "parse_precisions", "register_backend",
           "register_variant", "resolve_plan", "run_export", "run_quantize", "summary_table"]
