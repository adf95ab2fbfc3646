"""Writers for quantization-aware-trained int8 files: the learned scales go into TFLite and ONNX as they are.

:func:`edgekd.quant.convert_qat` gives a graph with explicit quantize/dequantize nodes. litert-torch lowers
that graph to a full-integer .tflite file (what the PT2E PTQ route does after calibration); the ONNX exporter
turns the same nodes into QuantizeLinear/DequantizeLinear pairs (QDQ), which ONNX Runtime fuses into integer
kernels. Neither route calibrates again, so both files compute what the fake-quantized model computed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from edgekd.export.common import conversion_error, quiet
from edgekd.export.onnx import export_onnx
from edgekd.export.tflite import _file_model, _has_int8_io, retype_io
from edgekd.run_dir import atomic_path

ROUTE_QAT_TFLITE = "qat-litert-torch-pt2e"
ROUTE_QAT_ONNX = "qat-torch.onnx-qdq"
QAT_ROUTES = (ROUTE_QAT_TFLITE, ROUTE_QAT_ONNX)


def is_qat_route(route: str | None) -> bool:
    """Whether a metadata ``route`` names a quantization-aware-trained file."""
    return bool(route) and str(route).startswith("qat")


def write_qat_tflite(converted: nn.Module, sample: torch.Tensor, path: Path, *, nhwc: bool = False,
                     io_type: str = "float32", what: str = "the QAT student") -> str:
    """Write a converted QAT graph as a full-integer int8 .tflite file (batch 1, like apps run it).

    Args:
        converted: From :func:`edgekd.quant.convert_qat` (NCHW/NF input).
        sample: One normalized NCHW/NF input.
        path: Destination; written atomically.
        nhwc: Make the file take channels-last input (the transpose stays outside the quantized graph).
        io_type: ``float32``, ``int8`` or ``uint8`` model inputs/outputs.
        what: Name of the model for error messages.

    Returns:
        The route name (recorded as ``route`` in metadata.json).
    """
    from edgekd.quant import int8_quantizer

    with quiet():
        import litert_torch
        from litert_torch.quantize import quant_config

    file_model, file_sample = _file_model(converted, sample[:1], nhwc)
    with atomic_path(path) as tmp:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                edge = litert_torch.convert(file_model, (file_sample,),
                                            quant_config=quant_config.QuantConfig(pt2e_quantizer=int8_quantizer(qat=True)))
                edge.export(str(tmp))
            except Exception as e:  # converters raise anything from RuntimeError to AssertionError
                raise conversion_error("tflite (QAT)", what, e, "litert-torch PT2E") from e
        if io_type != "int8":
            data = tmp.read_bytes()
            if _has_int8_io(data):
                tmp.write_bytes(retype_io(data, io_type))
    return ROUTE_QAT_TFLITE


def write_qat_onnx(converted: nn.Module, sample: torch.Tensor, path: Path, *, what: str = "the QAT student") -> str:
    """Write a converted QAT graph as a QDQ ONNX file (float32 I/O, dynamic batch, per-channel weights).

    Returns:
        The route name (recorded as ``route`` in metadata.json).
    """
    export_onnx(converted, sample, path, what=what)
    return ROUTE_QAT_ONNX
