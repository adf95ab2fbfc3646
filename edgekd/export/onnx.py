"""ONNX export (torch.onnx dynamo exporter + onnxslim) and ONNX Runtime quantization.

Every file is one self-contained ``.onnx`` (weights inside, no ``.onnx.data`` sidecar) with a dynamic batch
axis, input ``input`` and output ``logits``, checked with ``onnx.checker`` and simplified with onnxslim.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgekd.errors import ExportError
from edgekd.export.backends import (INT8_WEIGHTS_HELP, MIXED, ExportBackend, Int8Weights, QuantizeJob,
                                    register_backend)
from edgekd.export.common import conversion_error, quiet
from edgekd.run_dir import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ROUTE_FP32 = "torch.onnx-dynamo+onnxslim"
ROUTE_INT8 = "onnxruntime-qdq"
ROUTE_DYNAMIC = "onnxruntime-dynamic"
ROUTE_FP16 = "onnxruntime-float16"
# protobuf cannot serialize a single message over 2 GB; larger models would need external data.
_PROTOBUF_LIMIT = 2 * 1024**3


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, what: str = "the model",
                fold_weights: bool = False) -> str:
    """Export ``model`` to one self-contained, checked and simplified ONNX file.

    Args:
        model: The PyTorch model.
        sample: Normalized example input (batch >= 1, NCHW or NF).
        path: Destination; written atomically.
        what: Name of the model for error messages.
        fold_weights: Store quantized weights as int8 initializers (:func:`fold_weight_quantization`), for
            graphs that quantize float weights at run time (converted PT2E QAT models).

    Returns:
        The route name.

    Raises:
        ExportError: Export failed (the message names the operator when the exporter does) or the model
            is too large for a single file.
    """
    import onnx
    import onnxslim

    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # Export at batch 2: at batch 1 the tracer may specialize the batch dimension to a constant.
    example = sample.repeat(2, *([1] * (sample.ndim - 1))) if sample.shape[0] == 1 else sample
    try:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                        verbose=False, optimize=True)
    except Exception as e:
        raise conversion_error("onnx", what, e, "torch.onnx") from e
    proto = program.model_proto
    if proto.ByteSize() >= _PROTOBUF_LIMIT:
        raise ExportError(f"onnx export of {what}: the model is over 2 GB, too large for one self-contained file")
    try:
        with quiet():
            onnx.checker.check_model(proto, full_check=True)
            slim = onnxslim.slim(proto)
            if fold_weights:
                fold_weight_quantization(slim)
            onnx.checker.check_model(slim, full_check=True)
    except Exception as e:
        raise conversion_error("onnx", what, e, "onnx.checker/onnxslim") from e
    with atomic_path(path) as tmp:
        onnx.save_model(slim, str(tmp), save_as_external_data=False)
    return ROUTE_FP32


def fold_weight_quantization(model) -> int:
    """Replace every ``QuantizeLinear`` of a constant (a float weight quantized at run time) by its int8 result.

    PT2E graphs keep float weights followed by QuantizeLinear → DequantizeLinear; folding the first op stores
    the weights as int8 initializers (what ONNX Runtime's own QDQ quantizer writes): a file ~4x smaller in its
    weights that computes the same numbers, since the fold applies the operator's own formula
    (``saturate(round_half_even(w / scale) + zero_point)``, per tensor or per ``axis``). Returns how many were
    folded; the model is changed in place.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    folded = 0
    for node in list(graph.node):
        names = list(node.input)
        if (node.op_type != "QuantizeLinear" or len(names) < 3 or not all(n in inits for n in names[:3])
                or any(a.name == "block_size" and a.i for a in node.attribute)):
            continue
        w, scale, zero = (numpy_helper.to_array(inits[n]) for n in names[:3])
        if scale.ndim == 1 and scale.size > 1:  # per-channel along `axis`
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
            shape = [1] * w.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        q = np.rint(w.astype(np.float32) / scale.astype(np.float32)) + zero.astype(np.int64)
        q = np.clip(q, info.min, info.max)
        graph.initializer.append(numpy_helper.from_array(q.astype(zero.dtype), name=node.output[0]))
        graph.node.remove(node)
        for n in names:
            uses[n] -= 1
        folded += 1
    outputs = {o.name for o in graph.output}
    for name, count in uses.items():  # float weights (and scales) nothing reads any more
        if count == 0 and name in inits and name not in outputs:
            graph.initializer.remove(inits[name])
    return folded


class _Reader:
    """ONNX Runtime CalibrationDataReader over normalized training samples, one sample per call."""

    def __init__(self, x: np.ndarray, name: str):
        self._items = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # pragma: no cover - called only by some calibrators
        pass


def quantize_onnx(fp32_path: Path, out_path: Path, precision: str, calib: np.ndarray | None = None,
                  method: str = "minmax", per_channel: bool = True) -> str:
    """Quantize a fp32 ONNX file with ONNX Runtime's tools.

    Args:
        fp32_path: The fp32 file written by :func:`export_onnx`.
        out_path: Destination; written atomically.
        precision: ``int8`` (static QDQ, calibrated), ``dynamic`` (dynamic int8) or
            ``fp16`` (float16 weights and compute, float32 inputs/outputs).
        calib: Normalized calibration inputs (``int8`` only).
        method: Calibration method: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: int8 weights with a scale per output channel (else one per tensor).

    Returns:
        The route name.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        proto = onnx.load(str(fp32_path))
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"{Path(fp32_path).name} is not a valid ONNX file ({type(e).__name__}); "
                          "it may be truncated or damaged", "export it again with `edgekd export`") from e
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if precision == "int8" and method not in methods:
        raise ExportError(f"unknown calibration method {method!r}", f"choose from: {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="edgekd-onnxq-") as work, quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work_dir = Path(work)
        try:
            if precision == "fp16":
                from onnxruntime.transformers.float16 import convert_float_to_float16

                # float32 I/O: apps keep feeding float32 tensors; the casts sit inside the graph.
                half = convert_float_to_float16(proto, keep_io_types=True)
                # The converter appends the input Cast nodes after their consumers; ONNX requires
                # topological order.
                _toposort(half.graph)
                result = work_dir / "out.onnx"
                onnx.save_model(half, str(result), save_as_external_data=False)
                route = ROUTE_FP16
            else:
                pre = work_dir / "pre.onnx"
                quant_pre_process(str(fp32_path), str(pre))
                result = work_dir / "out.onnx"
                if precision == "int8":
                    if calib is None or not len(calib):
                        raise ExportError("static int8 needs calibration samples")
                    quantize_static(str(pre), str(result), _Reader(calib, proto.graph.input[0].name),
                                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=methods[method])
                    route = ROUTE_INT8
                elif precision == "dynamic":
                    quantize_dynamic(str(pre), str(result), weight_type=QuantType.QInt8, per_channel=per_channel)
                    route = ROUTE_DYNAMIC
                else:
                    raise ExportError(f"unknown precision {precision!r} for ONNX")
            onnx.checker.check_model(str(result))
        except ExportError:
            raise
        except Exception as e:
            raise conversion_error(f"onnx {precision}", Path(fp32_path).name, e, "onnxruntime") from e
        with atomic_path(out_path) as tmp:
            tmp.write_bytes(result.read_bytes())
    return route


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest as it was and let the checker say why
            ordered.extend(pending)
            break
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    nodes = [type(n)() for n in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


def describe_onnx(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output of an ONNX file as onnxruntime reports them (dynamic dimensions as -1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {Path(path).name}: {str(e).strip().splitlines()[0][:200]}") from e
    return _io_spec(sess.get_inputs()[0]), _io_spec(sess.get_outputs()[0])


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _io_spec(arg) -> dict[str, Any]:
    shape = [int(d) if isinstance(d, int) else -1 for d in arg.shape]
    return {"name": arg.name, "shape": shape, "dtype": _ORT_TYPES.get(arg.type, arg.type), "quantization": None}


_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu"}


def onnx_layers(path: Path, x: np.ndarray) -> list[tuple[str, str, str, np.ndarray]]:
    """Every float tensor the nodes of a file produce, for prepared inputs ``x``, in graph order.

    Returns ``[(op type, tensor name, layer label, values)]``. The graph runs without ORT's optimizations
    so each tensor still exists. In a QDQ file the value after QuantizeLinear→DequantizeLinear stands for
    the tensor it quantizes (what the next layer really receives). Labels name the module whose weights a
    node uses (``features.3 (Conv)``); activations take the label of the layer they follow.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = proto.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.value_info) + list(graph.output)}
    inits = {t.name for t in graph.initializer}
    producer_label: dict[str, str] = {}
    wanted: list[tuple[str, str, str]] = []
    existing = {o.name for o in graph.output}
    suffix = "_DequantizeLinear_Output"
    for node in graph.node:
        weights = [i for i in node.input if i.endswith(".weight") or i.endswith(".weight" + suffix)]
        if weights:
            label = f"{weights[0].split('.weight')[0]} ({node.op_type})"
        elif node.op_type in _ACTIVATIONS and node.input and node.input[0] in producer_label:
            label = producer_label[node.input[0]].replace(")", f"+{node.op_type})")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input:
            label = producer_label.get(node.input[0], node.input[0])
        else:
            label = f"{node.output[0]} ({node.op_type})" if node.output else node.op_type
        for out in node.output:
            producer_label[out] = label
            if out and types.get(out) == onnx.TensorProto.FLOAT and out not in inits:
                wanted.append((node.op_type, out, label))
                if out not in existing:
                    graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
                    existing.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
    layers: dict[str, tuple[str, str, str, np.ndarray]] = {}
    for op, name, label in wanted:
        if name not in values:
            continue
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base in layers:  # the dequantized value replaces the float one, keeping its place
                layers[base] = (layers[base][0], base, layers[base][2], np.asarray(values[name], np.float32))
            continue
        if op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        layers[name] = (op, name, label, np.asarray(values[name], np.float32))
    return list(layers.values())


# -- the backend ------------------------------------------------------------------------------------------

ROUTE_QAT = "qat-torch.onnx-qdq"


def write_qat_onnx(converted: nn.Module, sample: torch.Tensor, path: Path, *, what: str = "the QAT student") -> str:
    """Write a converted QAT graph (:func:`edgekd.quant.convert_qat`) as a QDQ ONNX file: float32 I/O, dynamic
    batch, per-channel int8 weights stored as int8 (the learned scales, not calibrated again).

    Returns:
        The route name (recorded as ``route`` in metadata.json).
    """
    export_onnx(converted, sample, path, what=what, fold_weights=True)
    return ROUTE_QAT


class OnnxSettings(BaseModel):
    """``export.onnx``: how ONNX Runtime calibrates static int8 files, and their weight scales."""

    model_config = ConfigDict(extra="forbid")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    int8_weights: Int8Weights = Field("per_channel", description=INT8_WEIGHTS_HELP)


class OnnxBackend(ExportBackend):
    """ONNX files: fp32 by torch.onnx (dynamo) + onnxslim; fp16/int8/dynamic by ONNX Runtime's tools; int8 from
    the QAT student as QDQ (its learned scales, not calibrated again)."""

    name = "onnx"
    suffix = ".onnx"
    routes = {"fp32": (ROUTE_FP32,), "fp16": ("onnxruntime",), "int8": ("onnxruntime",),
              "dynamic": ("onnxruntime",), MIXED: ("onnxruntime-selective",)}
    qat_route = ROUTE_QAT
    Settings = OnnxSettings
    tools = ("onnx", "onnxscript", "onnxslim", "onnxruntime")
    channel_axis = 1
    runtime = "onnxruntime"

    def export(self, model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, what: str) -> str:
        return export_onnx(model, sample, path, what=what)

    def quantize(self, route: str, job: QuantizeJob) -> str:
        return quantize_onnx(job.fp32_path, job.path, job.precision, job.calibration,
                             job.settings.calibration_method,
                             per_channel=job.settings.int8_weights == "per_channel")

    def selective(self, fp32_path: Path, calibration: np.ndarray, layout: str, normalization: dict[str, Any],
                  settings: Any, **_graph: Any) -> Any:
        from edgekd.quant.selective import OnnxSelective

        return OnnxSelective(fp32_path, calibration, layout, normalization, method=settings.calibration_method,
                             silence=quiet, per_channel=settings.int8_weights == "per_channel")

    def write_qat(self, qat_model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, settings: Any,
                  what: str) -> str:
        from edgekd.quant import convert_qat

        return write_qat_onnx(convert_qat(qat_model), sample, path, what=what)

    def finalize(self, path: Path, session: Any) -> None:
        """metadata_props (labels, normalization, layout) and no unused opset imports (see onnx_app)."""
        from edgekd import __version__
        from edgekd.export.onnx_app import finish_onnx_file, metadata_props

        s = session
        finish_onnx_file(path, metadata_props(labels=s.labels, input_name=INPUT_NAME, layout=s.layout,
                                              normalization=s.norm, output="logits", version=__version__,
                                              run=s.rd.name, image=s.layout == "NCHW"))

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return describe_onnx(path)

    def layer_outputs(self, path: Path, x: np.ndarray) -> list[tuple]:
        return onnx_layers(path, x)


register_backend(OnnxBackend())

