"""The ``pte`` backend: ExecuTorch programs lowered to the XNNPACK delegate, what PyTorch apps ship to phones.

Routes:

* fp32 (``executorch-xnnpack``): ``torch.export`` at batch 1, then ExecuTorch's
  ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` and ``to_executorch``;
* int8 (``executorch-xnnpack-pt2e``): the graph is quantized by PT2E with ExecuTorch's ``XNNPACKQuantizer``
  (symmetric int8, per-channel weights), calibrated on the run's calibration samples (the same ones every
  int8 route uses), converted with the weights folded to int8, and lowered the same way;
* QAT int8 (``qat-executorch-xnnpack``): the quantization-aware-trained graph, converted with folded weights
  and lowered (its learned scales, not calibrated again);
* mixed (``executorch-xnnpack-pt2e-selective``, ``edgekd quantize --sensitivity / --max-drop``): the int8 route
  with the quantizer's node filter leaving chosen layers float (a layer: a convolution or linear module with the
  normalization and activation modules after it, or a pooling module; see :func:`module_layers`).

Every operator must land in the XNNPACK delegate: a graph the partitioner leaves partly outside would run
those operators on ExecuTorch's portable reference kernels, so it is refused, naming them. Files take float32
input and give float32 logits (the quantize/dequantize steps sit inside the delegate), in the run's layout.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch
from torch import nn

from edgekd.errors import ExportError
from edgekd.export.backends import MIXED, ExportBackend, QuantizeJob, register_backend
from edgekd.export.common import conversion_error, quiet
from edgekd.quant.selective import Layer, SelectiveRoute
from edgekd.run_dir import atomic_path

ROUTE_FP32 = "executorch-xnnpack"
ROUTE_INT8 = "executorch-xnnpack-pt2e"
ROUTE_QAT = "qat-executorch-xnnpack"
ROUTE_MIXED = "executorch-xnnpack-pt2e-selective"
INSTALL_HINT = 'pip install "edgekd[executorch]"'
# Graph nodes of a lowered program that are not computation.
_PLUMBING = {"getitem", "executorch_call_delegate"}


def _outside_delegate(edge) -> list[str]:
    """Operators the partitioner left outside every delegate, each once, in graph order."""
    ops: list[str] = []
    for node in edge.exported_program().graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name in _PLUMBING:
            continue
        op = str(getattr(node.target, "_name", None) or name).replace("::", ".")
        if op not in ops:
            ops.append(op)
    return ops


def lower_to_pte(model: nn.Module, sample: torch.Tensor, path: Path, *, what: str, route: str) -> str:
    """Export ``model`` at batch 1, lower it to XNNPACK and write the program at ``path`` (atomically).

    Raises:
        ExportError: torch.export or the lowering failed (naming the operator when they do), or operators
            stayed outside the XNNPACK delegate (named).
    """
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        try:
            with torch.no_grad():
                program = torch.export.export(model, (sample[:1],))
                edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        except Exception as e:  # exporters raise anything from RuntimeError to AssertionError
            raise conversion_error("pte", what, e, "ExecuTorch") from e
        outside = _outside_delegate(edge)
        if outside:
            raise ExportError(f"pte export of {what}: the XNNPACK partitioner left {len(outside)} operator(s) "
                              f"outside the delegate: {', '.join(outside[:6])}",
                              "replace those operations in the model, or export the other formats only")
        try:
            buffer = edge.to_executorch().buffer
        except Exception as e:
            raise conversion_error("pte", what, e, "ExecuTorch") from e
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer)
    return route


def quantize_pte(model: nn.Module, sample: torch.Tensor, calibration: np.ndarray, path: Path, *, what: str,
                 keep_float: Collection[str] = (), only: Collection[str] | None = None,
                 route: str = ROUTE_INT8) -> str:
    """Static int8 by PT2E with ``XNNPACKQuantizer``, calibrated one sample at a time (the graph is batch 1).

    Args:
        model: The fp32 PyTorch model.
        sample: One normalized input.
        calibration: Normalized calibration inputs (the run's calibration samples).
        path: Destination.
        what: Name of the model for error messages.
        keep_float: Names of modules left in float (the rest int8).
        only: Names of the only modules made int8 (instead of all but ``keep_float``).
        route: The route name to record.
    """
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_module_name_filter,
                                                                             get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        try:
            graph = torch.export.export(model.eval(), (sample[:1],)).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            # The quantizer takes no "leave this module float" config; its node filter does the same.
            chosen = [get_module_name_filter(name) for name in (only if only is not None else keep_float)]
            if only is not None:
                quantizer.set_filter_function(lambda n: any(f(n) for f in chosen))
            elif chosen:
                quantizer.set_filter_function(lambda n: not any(f(n) for f in chosen))
            prepared = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for i in range(len(calibration)):
                    prepared(torch.from_numpy(calibration[i:i + 1]))
            converted = convert_pt2e(prepared)  # weights folded to int8
        except Exception as e:
            raise conversion_error("pte int8", what, e, "PT2E XNNPACKQuantizer") from e
    return lower_to_pte(converted, sample, path, what=what, route=route)


class PteSelective(SelectiveRoute):
    """``.pte`` files with chosen modules int8 (PT2E ``XNNPACKQuantizer``, a module left out stays float and runs
    in XNNPACK's float kernels), run in ExecuTorch. Unlike the TFLite and ONNX routes it quantizes the PyTorch
    graph the fp32 file was lowered from, so it needs that model; each file is calibrated again."""

    format, suffix, tool, runtime = "pte", ".pte", "executorch (XNNPACKQuantizer)", "executorch"

    def __init__(self, *args: Any, model: nn.Module, sample: torch.Tensor, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model, self.sample = model.eval(), sample[:1]
        self._layers = module_layers(self.model)

    def layers(self) -> list[Layer]:
        return list(self._layers)

    def write(self, path: Path, *, keep_float: Collection[str] = (), only: Collection[str] | None = None) -> None:
        modules = lambda keys: [m for k in keys for m in k.split("+")]  # noqa: E731
        quantize_pte(self.model, self.sample, self.calibration, Path(path), what=self.fp32_path.stem,
                     keep_float=modules(keep_float), only=None if only is None else modules(only), route=ROUTE_MIXED)


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.MaxPool1d, nn.MaxPool2d)
_NOTHING = (nn.Identity, nn.Dropout, nn.Flatten)


def module_layers(model: nn.Module) -> list[Layer]:
    """The model's quantizable layers for the pte mixed route, in module order: a convolution or linear module
    with the normalization and activation modules after it (which the quantizer fuses with it), and each
    pooling module. Operations outside modules (residual adds) stay int8 in every file."""
    found: list[tuple[list[str], str, str]] = []
    for name, m in model.named_modules():
        if not name or list(m.children()) or isinstance(m, _NOTHING):
            continue
        if isinstance(m, _WEIGHTED + _POOLS) or not found:
            found.append(([name], name, type(m).__name__))
        else:  # batch norm, activations: part of the layer before them
            found[-1][0].append(name)
    return [Layer("+".join(names), f"{head} ({op})", op) for names, head, op in found]


class PteBackend(ExportBackend):
    """``.pte`` ExecuTorch programs on the XNNPACK delegate: fp32, int8 (PT2E, calibrated) and QAT int8."""

    name = "pte"
    suffix = ".pte"
    routes = {"fp32": (ROUTE_FP32,), "int8": (ROUTE_INT8,), MIXED: (ROUTE_MIXED,)}
    qat_route = ROUTE_QAT
    tools = ("executorch", "torchao")
    channel_axis = 1
    runtime = "executorch"

    def check_available(self) -> None:
        from edgekd.runtimes.base import installed

        if not installed("executorch"):
            raise ExportError("the pte target needs ExecuTorch, which is not installed", INSTALL_HINT)

    def export(self, model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, what: str) -> str:
        return lower_to_pte(model.eval(), sample, path, what=what, route=ROUTE_FP32)

    def quantize(self, route: str, job: QuantizeJob) -> str:
        if job.calibration is None or not len(job.calibration):
            raise ExportError("static int8 needs calibration samples")
        return quantize_pte(job.model, job.sample, job.calibration, job.path, what=job.what)

    def selective(self, fp32_path: Path, calibration: np.ndarray, layout: str, normalization: dict[str, Any],
                  settings: Any, *, model: nn.Module | None = None, sample: torch.Tensor | None = None) -> Any:
        if model is None or sample is None:
            raise ExportError(f"the pte mixed route quantizes the PyTorch model of {fp32_path.name}, "
                              "which was not given")
        self.check_available()
        return PteSelective(fp32_path, calibration, layout, normalization, silence=quiet, model=model, sample=sample)

    def write_qat(self, qat_model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, settings: Any,
                  what: str) -> str:
        from edgekd.quant import convert_qat

        # Folded int8 weights: XNNPACK takes quantized weights as constants, not as a runtime quantize node.
        return lower_to_pte(convert_qat(qat_model, fold_weights=True), sample, path, what=what, route=ROUTE_QAT)

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from edgekd.runtimes.executorch import io_spec

        return io_spec(path)

    def extra_metadata(self, path: Path) -> dict[str, Any]:
        return {"delegate": "XnnpackBackend", "method": "forward"}


register_backend(PteBackend())
