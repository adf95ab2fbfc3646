"""Export to ONNX and TFLite (fp32 / fp16 / int8 / dynamic), verified against PyTorch, described for apps.

``run_export`` and ``run_quantize`` are what ``edgekd export`` and ``edgekd quantize`` call;
``summary_table`` prints the table of exported files (``make demo`` ends with it).
"""

from edgekd.export.pipeline import (FORMATS, PRECISIONS, QUANT_PRECISIONS, ExportReport, parse_precisions,
                                    run_export, run_quantize, summary_table)

__all__ = ["FORMATS", "PRECISIONS", "QUANT_PRECISIONS", "ExportReport", "parse_precisions", "run_export",
           "run_quantize", "summary_table"]
