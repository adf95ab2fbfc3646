"""Export to ONNX and TFLite (fp32 / fp16 / int8 / dynamic), verified against PyTorch, described for apps.

``run_export`` and ``run_quantize`` are what ``edgekd export`` and ``edgekd quantize`` call;
``summary_table`` prints the table of exported files (``make demo`` ends with it).

Formats are export backends (:mod:`edgekd.export.backends`): ``register_backend``, ``get_backend``,
``list_backends``, ``backend_for``. The built-in ``onnx`` and ``tflite`` backends register themselves in
:mod:`edgekd.export.onnx` and :mod:`edgekd.export.tflite`, imported here.

Modules: ``backends`` (interface and registry), ``onnx`` / ``tflite`` (the built-in formats), ``pipeline``
(the export and quantize stages), ``metadata`` (metadata.json), ``parity`` (comparison with PyTorch),
``common`` (quiet conversions, operator-naming errors, tool versions).
"""

from edgekd.export import onnx as _onnx  # noqa: F401  (registers the onnx backend)
from edgekd.export import tflite as _tflite  # noqa: F401  (registers the tflite backend)
from edgekd.export.backends import (PRECISIONS, ExportBackend, QuantizeJob, backend_for, get_backend,
                                    list_backends, register_backend)
from edgekd.export.pipeline import (QUANT_PRECISIONS, ExportReport, check_formats, parse_precisions, run_export,
                                    run_quantize, summary_table)

__all__ = ["PRECISIONS", "QUANT_PRECISIONS", "ExportBackend", "ExportReport", "QuantizeJob", "backend_for",
           "check_formats", "get_backend", "list_backends", "parse_precisions", "register_backend", "run_export",
           "run_quantize", "summary_table"]
