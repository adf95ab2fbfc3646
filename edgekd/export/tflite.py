"""TFLite export with litert-torch, and quantization by two routes.

Routes:

* ``ai-edge-quantizer``: quantizes the already-exported (and verified) fp32 ``.tflite`` file — static
  full-integer int8 with calibration, dynamic-range int8, or fp16 weights (float casting).
* ``litert-torch-pt2e``: quantizes the PyTorch graph with PT2E (torchao observers, per-channel weights) and
  converts it again with litert-torch — static int8 or dynamic-range int8.

Both routes produce int8 model inputs/outputs for static int8; :func:`retype_io` then gives the file float32
or uint8 I/O if asked, by inserting QUANTIZE / DEQUANTIZE operators at the graph boundary (the same thing
TensorFlow's converter does with ``inference_input_type``), so apps pick the I/O type they can feed.
"""

from __future__ import annotations

import copy
import os
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
from edgekd.quant.selective import weight_granularity
from edgekd.run_dir import atomic_path

ROUTE_FP32 = "litert-torch"
ROUTE_AEQ = "ai-edge-quantizer"
ROUTE_PT2E = "litert-torch-pt2e"
# PT2E first: its histogram observers calibrate activations more accurately than min/max (measured on the
# default recipe, see benchmarks/export_parity.py); ai-edge-quantizer is the fallback that works on graphs
# PT2E cannot convert, and it needs only the .tflite file.
TFLITE_ROUTES = (ROUTE_PT2E, ROUTE_AEQ)
# Dynamic-range int8 goes the other way round. litert-torch's converter quantizes FULLY_CONNECTED weights per
# channel (op version 12), which tflite-runtime 2.14 (the last tflite-runtime wheel, what a Raspberry Pi gets
# from pip) refuses to load; ai-edge-quantizer with per-tensor FULLY_CONNECTED weights (see dynamic_recipe)
# writes a file that runs with the same predictions there and on LiteRT.
TFLITE_DYNAMIC_ROUTES = (ROUTE_AEQ, ROUTE_PT2E)
IO_SUFFIX = b"_int8"


class _ChannelsLast(nn.Module):
    """Takes NHWC input and feeds the wrapped NCHW model: the permute is folded into the exported graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2))


def file_model_for(model: nn.Module, sample: torch.Tensor, nhwc: bool) -> tuple[nn.Module, torch.Tensor]:
    """The module and sample input the .tflite file is traced from (NHWC-wrapped for image models)."""
    model = model.eval()
    if nhwc and sample.ndim == 4:
        return _ChannelsLast(model).eval(), sample.permute(0, 2, 3, 1).contiguous()
    return model, sample


def export_tflite(model: nn.Module, sample: torch.Tensor, path: Path, *, nhwc: bool = False,
                  what: str = "the model") -> str:
    """Convert ``model`` to a fp32 .tflite file with litert-torch (batch 1, like apps run it).

    Args:
        model: The PyTorch model (NCHW or NF input).
        sample: One normalized input, shape ``(1, *input_shape)``, NCHW.
        path: Destination; written atomically.
        nhwc: Make the file take channels-last input (image models only).
        what: Name of the model for error messages.

    Returns:
        The route name.

    Raises:
        ExportError: The conversion failed; the message names the operator when the converter does.
    """
    with quiet():  # litert-torch and TensorFlow's runtime log a screenful on import
        import litert_torch

    file_model, file_sample = file_model_for(model, sample, nhwc)
    with atomic_path(path) as tmp:
        try:
            with quiet(), torch.no_grad():
                edge = litert_torch.convert(file_model, (file_sample,))
                edge.export(str(tmp))
        except Exception as e:  # converters raise anything from RuntimeError to AssertionError
            raise conversion_error("tflite", what, e, "litert-torch") from e
    return ROUTE_FP32


# -- quantization ---------------------------------------------------------------------------------------

def _signature(model_bytes: bytes) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes)
    sigs = it.get_signature_list()
    if not sigs:
        raise ExportError("the fp32 .tflite file has no signature; export it again with `edgekd export`")
    key = next(iter(sigs))
    return key, sigs[key]["inputs"][0]


def _read_tflite(path: Path) -> bytes:
    data = Path(path).read_bytes()
    # A flatbuffer's file identifier sits at bytes 4..8; a truncated or foreign file fails here first.
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ExportError(f"{Path(path).name} is not a valid .tflite file (truncated or damaged)",
                          "export it again with `edgekd export`")
    return data


def dynamic_recipe(base: list[dict]) -> list[dict]:
    """ai-edge-quantizer's dynamic-range recipe with per-tensor FULLY_CONNECTED weights.

    Per-channel int8 weights of a hybrid FULLY_CONNECTED need FULLY_CONNECTED v12 kernels. ai-edge-quantizer
    keeps the fp32 file's op version (v5), so tflite-runtime 2.14 — the last tflite-runtime wheel, what a
    Raspberry Pi gets from pip — loads such a file and silently computes garbage (measured on an emulated Pi:
    10% accuracy, every digit the same class). Per-tensor FULLY_CONNECTED weights run correctly on every
    runtime (0.907 on host and emulated Pi for the default student, the same as per-channel on the host);
    convolutions keep per-channel weights, which tflite-runtime 2.14 computes correctly.
    """
    fc = copy.deepcopy(base[-1])
    fc["regex"], fc["operation"] = ".*", "FULLY_CONNECTED"
    fc["op_config"]["weight_tensor_config"]["granularity"] = "TENSORWISE"
    return [*base, fc]


def quantize_aeq(fp32_path: Path, out_path: Path, precision: str, calib: np.ndarray | None,
                 io_type: str = "float32", per_channel: bool = True) -> None:
    """Quantize a fp32 .tflite file with ai-edge-quantizer.

    Args:
        fp32_path: The fp32 file (its input layout is the layout of ``calib``).
        out_path: Destination; written atomically.
        precision: ``int8`` (static, full integer), ``dynamic`` (dynamic-range int8 weights) or ``fp16``.
        calib: Normalized calibration inputs in the file's layout (``int8`` only).
        io_type: ``int8`` only: ``float32``, ``int8`` or ``uint8`` model inputs/outputs.
        per_channel: int8 weights with a scale per output channel (else one per tensor).
    """
    with quiet():
        from ai_edge_quantizer import qtyping, quantizer, recipe
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

    data = _read_tflite(fp32_path)
    q = quantizer.Quantizer(data)
    if precision == "int8":
        q.load_quantization_recipe(weight_granularity(recipe.static_wi8_ai8(), per_channel))
    elif precision == "dynamic":
        q.load_quantization_recipe(weight_granularity(dynamic_recipe(recipe.dynamic_wi8_afp32()), per_channel))
    elif precision == "fp16":
        q.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
    else:
        raise ExportError(f"unknown precision {precision!r} for ai-edge-quantizer")
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibration = None
        if q.need_calibration:
            if calib is None or not len(calib):
                raise ExportError("static int8 needs calibration samples")
            key, name = _signature(data)
            calibration = q.calibrate({key: [{name: calib[i:i + 1]} for i in range(len(calib))]},
                                      num_threads=min(4, os.cpu_count() or 1))
        result = q.quantize(calibration, enable_progress_report=False, enable_progress_bar=False)
    model = bytes(result.quantized_model)
    if precision == "int8" and io_type != "int8":
        model = retype_io(model, io_type)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(model)


def quantize_pt2e(model: nn.Module, sample: torch.Tensor, out_path: Path, precision: str,
                  calib: np.ndarray | None, *, nhwc: bool = False, io_type: str = "float32",
                  what: str = "the model", per_channel: bool = True) -> None:
    """Quantize the PyTorch graph with PT2E and convert it with litert-torch.

    Args:
        model: The fp32 PyTorch model (NCHW/NF input).
        sample: One normalized NCHW/NF input (batch 1).
        out_path: Destination; written atomically.
        precision: ``int8`` (static) or ``dynamic``.
        calib: Normalized NCHW/NF calibration inputs (``int8`` only).
        nhwc: Make the file take channels-last input.
        io_type: ``int8`` only: ``float32``, ``int8`` or ``uint8`` model inputs/outputs.
        what: Name of the model for error messages.
        per_channel: int8 weights with a scale per output channel (else one per tensor).
    """
    with quiet():  # torchao warns about optional CUDA kernels on import
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e import quantize_pt2e as pt2e

    if precision not in ("int8", "dynamic"):
        raise ExportError(f"the PT2E route has no {precision} quantization")
    file_model, file_sample = file_model_for(model, sample, nhwc)
    dynamic = precision == "dynamic"
    with atomic_path(out_path) as tmp:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                graph = torch.export.export(file_model, (file_sample,)).module()
                quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                    pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic))
                prepared = pt2e.prepare_pt2e(graph, quantizer)
                move_exported_model_to_eval(prepared)
                with torch.no_grad():
                    # The graph is traced at batch 1 (as the .tflite runs): calibrate one sample at a time.
                    samples = [file_sample] if calib is None or dynamic else [
                        _to_file_layout(torch.from_numpy(calib[i:i + 1]), nhwc) for i in range(len(calib))]
                    for xb in samples:
                        prepared(xb)
                converted = pt2e.convert_pt2e(prepared, fold_quantize=False)
                edge = litert_torch.convert(converted, (file_sample,),
                                            quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
                edge.export(str(tmp))
            except Exception as e:
                raise conversion_error("tflite (PT2E)", what, e, "litert-torch PT2E") from e
        if precision == "int8" and io_type != "int8":
            data = tmp.read_bytes()
            if has_int8_io(data):
                tmp.write_bytes(retype_io(data, io_type))


def _to_file_layout(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous() if nhwc and x.ndim == 4 else x


def has_int8_io(data: bytes) -> bool:
    """Whether any model input or output is int8 (a softmax PT2E leaves in float gives int8 in, float out)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    return any(d["dtype"] == np.int8 for d in it.get_input_details() + it.get_output_details())


def retype_io(model_bytes: bytes, io_type: str) -> bytes:
    """Give a full-integer model with int8 inputs/outputs float32 or uint8 inputs/outputs instead.

    float32: a QUANTIZE op after each input and a DEQUANTIZE op before each output. uint8: a QUANTIZE op
    (uint8 ↔ int8 requantization, zero point shifted by 128, same scale) at each end. The original int8
    tensors keep their quantization, so the arithmetic inside the model is unchanged.
    """
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    if io_type == "int8":
        return model_bytes
    if io_type not in ("float32", "uint8"):
        raise ExportError(f"unknown int8 I/O type {io_type!r}", "choose float32, int8 or uint8")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    sg = model.subgraphs[0]
    new_type = fb.TensorType.FLOAT32 if io_type == "float32" else fb.TensorType.UINT8

    def opcode(code: int) -> int:
        for i, oc in enumerate(model.operatorCodes):
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
                oc.version = max(oc.version, 2)
                return i
        oc = fb.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 2
        model.operatorCodes.append(oc)
        return len(model.operatorCodes) - 1

    def boundary_tensor(idx: int) -> int:
        src = sg.tensors[idx]
        if src.type != fb.TensorType.INT8 or src.quantization is None or not src.quantization.scale:
            raise ExportError("retype_io needs a model with quantized int8 inputs and outputs")
        t = fb.TensorT()
        # The new boundary tensor takes over the public name; apps and signatures look tensors up by it.
        t.name, src.name = src.name, (src.name or b"io") + IO_SUFFIX
        t.shape = list(src.shape)
        t.shapeSignature = None if src.shapeSignature is None else list(src.shapeSignature)
        t.type, t.buffer, t.hasRank = new_type, 0, src.hasRank
        if new_type == fb.TensorType.UINT8:
            qp = fb.QuantizationParametersT()
            qp.scale = [float(s) for s in src.quantization.scale]
            qp.zeroPoint = [int(z) + 128 for z in src.quantization.zeroPoint]
            qp.quantizedDimension = 0
            t.quantization = qp
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def is_int8(idx: int) -> bool:
        # Boundaries the quantizer left in float (e.g. a softmax output PT2E does not annotate) stay as they are.
        return sg.tensors[idx].type == fb.TensorType.INT8

    if not any(is_int8(idx) for idx in list(sg.inputs) + list(sg.outputs)):
        raise ExportError("retype_io needs a model with quantized int8 inputs or outputs")
    remap: dict[int, int] = {}
    for pos, idx in enumerate(list(sg.inputs)):
        if not is_int8(idx):
            continue
        new = boundary_tensor(idx)
        op = fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(fb.BuiltinOperator.QUANTIZE), [new], [idx]
        sg.operators.insert(0, op)
        sg.inputs[pos] = remap[idx] = new
    out_code = fb.BuiltinOperator.DEQUANTIZE if io_type == "float32" else fb.BuiltinOperator.QUANTIZE
    for pos, idx in enumerate(list(sg.outputs)):
        if not is_int8(idx):
            continue
        new = boundary_tensor(idx)
        op = fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(out_code), [idx], [new]
        sg.operators.append(op)
        sg.outputs[pos] = remap[idx] = new
    for sig in model.signatureDefs or []:
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


# -- reading files back -----------------------------------------------------------------------------------

def describe_tflite(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output of a .tflite file as the interpreter reports them: name, shape, dtype, quantization."""
    from edgekd.runtimes.litert import interpreter_class

    cls, _ = interpreter_class()
    try:
        it = cls(model_path=str(path))
    except Exception as e:
        raise ExportError(f"LiteRT cannot load {Path(path).name}: {str(e).strip().splitlines()[0][:200]}") from e
    return _io_spec(it.get_input_details()[0]), _io_spec(it.get_output_details()[0])


def _io_spec(d: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = d.get("quantization", (0.0, 0))
    quant = {"scale": float(scale), "zero_point": int(zero_point)} if scale else None
    return {"name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
            "quantization": quant}


def tflite_layers(path: Path, x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """Run prepared inputs (batch of samples) through a .tflite file and return every op's output.

    Returns ``[(op type, tensor name, float values stacked over samples)]`` in execution order; integer
    tensors are dequantized with their own scale and zero point. QUANTIZE/DEQUANTIZE ops are skipped (they
    only move between representations).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = [o for o in it._get_ops_details() if o["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE")]
    values: dict[int, list[np.ndarray]] = {o["outputs"][0]: [] for o in ops if len(o["outputs"])}
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i:i + 1])
        it.invoke()
        for idx in values:
            values[idx].append(_dequantized(it.get_tensor(idx), details[idx]))
    out = []
    for o in ops:
        if len(o["outputs"]):
            name = details[o["outputs"][0]]["name"]
            if name.endswith(IO_SUFFIX.decode()):  # the int8 tensor behind a retyped model output
                name = name[: -len(IO_SUFFIX)]
            out.append((o["op_name"], name, layer_label(o["op_name"], name), np.concatenate(values[o["outputs"][0]])))
    return out


def _dequantized(v: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.issubdtype(v.dtype, np.integer):
        qp = detail.get("quantization_parameters") or {}
        scales = np.asarray(qp.get("scales", []), np.float32)
        zps = np.asarray(qp.get("zero_points", []), np.float32)
        if scales.size == 1:
            return (v.astype(np.float32) - zps[0]) * scales[0]
        return v.astype(np.float32)
    return v.astype(np.float32)


def layer_label(op: str, name: str) -> str:
    """A readable layer name from a litert-torch tensor name.

    litert-torch names a tensor after the module path of every PyTorch module fused into it, separated by
    ``;`` (``.../Sequential_features/...ReLU_2;;.../BatchNorm2d_1;;.../Conv2d_0;2``); the label lists the
    module names, innermost last: ``features: ReLU_2+BatchNorm2d_1+Conv2d_0 (CONV_2D)``.
    """
    mods, scope = [], ""
    for part in name.split(";"):
        path = part.split("/")
        if len(path) < 2:
            continue
        leaf = path[-1].rsplit(".", 1)[-1]
        scope = "/".join(p.rsplit(".", 1)[-1].split("_", 1)[-1] for p in path[1:-1]) or scope
        if leaf not in mods:
            mods.append(leaf)
    if not mods:
        return f"{name} ({op})"
    return f"{scope + ': ' if scope else ''}{'+'.join(mods)} ({op})"



# -- the backend ------------------------------------------------------------------------------------------

ROUTE_QAT = "qat-litert-torch-pt2e"


def write_qat_tflite(converted: nn.Module, sample: torch.Tensor, path: Path, *, nhwc: bool = False,
                     io_type: str = "float32", what: str = "the QAT student") -> str:
    """Write a converted QAT graph (:func:`edgekd.quant.convert_qat`) as a full-integer int8 .tflite file.

    litert-torch lowers the graph's quantize/dequantize nodes as the PT2E PTQ route does after calibration, so
    the file carries the scales learned in training (batch 1, like apps run it).

    Args:
        converted: The converted QAT graph (NCHW/NF input).
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

    file_model, file_sample = file_model_for(converted, sample[:1], nhwc)
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
            if has_int8_io(data):
                tmp.write_bytes(retype_io(data, io_type))
    return ROUTE_QAT


def signature_keys(path: Path) -> dict[str, dict[str, list[str]]]:
    """A .tflite file's signatures (what Android's ``Interpreter.runSignature`` and LiteRT's
    ``get_signature_runner`` take): ``{key: {"inputs": [...], "outputs": [...]}}``."""
    from edgekd.runtimes.litert import interpreter_class

    cls, _ = interpreter_class()
    sigs = cls(model_path=str(path)).get_signature_list()
    return {k: {"inputs": list(v.get("inputs", [])), "outputs": list(v.get("outputs", []))} for k, v in sigs.items()}


class TFLiteSettings(BaseModel):
    """``export.tflite``: the input layout and the I/O type of full-integer files."""

    model_config = ConfigDict(extra="forbid")
    nhwc: bool = Field(False, description="channels-last input (camera pipelines deliver NHWC)")
    int8_io: Literal["float32", "int8", "uint8"] = Field("float32", description="I/O of full-integer files")
    int8_weights: Int8Weights = Field("per_channel", description=INT8_WEIGHTS_HELP)


class TFLiteBackend(ExportBackend):
    """TFLite files: fp32 by litert-torch; fp16 by ai-edge-quantizer; int8 and dynamic by PT2E or
    ai-edge-quantizer (see :data:`TFLITE_ROUTES`, :data:`TFLITE_DYNAMIC_ROUTES` for the order); int8 from the
    QAT student by litert-torch's PT2E lowering."""

    name = "tflite"
    suffix = ".tflite"
    routes = {"fp32": (ROUTE_FP32,), "fp16": (ROUTE_AEQ,), "int8": TFLITE_ROUTES, "dynamic": TFLITE_DYNAMIC_ROUTES,
              MIXED: ("ai-edge-quantizer-selective",)}
    qat_route = ROUTE_QAT
    Settings = TFLiteSettings
    tools = ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "torchao")
    channel_axis = -1
    runtime = "litert"

    def prepare(self, session: Any, settings: Any, asked: bool) -> bool:
        if settings.nhwc and session.layout != "NCHW":
            session.log(f"--nhwc ignored: the inputs are {session.layout}, not images")
        return True

    def export(self, model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, what: str) -> str:
        return export_tflite(model, sample, path, nhwc=layout == "NHWC", what=what)

    def quantize(self, route: str, job: QuantizeJob) -> str:
        io_type = job.settings.int8_io
        per_channel = job.settings.int8_weights == "per_channel"
        if route == ROUTE_AEQ:
            calib = job.calibration
            if calib is not None and job.layout == "NHWC":  # this route calibrates the file, in its layout
                calib = np.ascontiguousarray(calib.transpose(0, 2, 3, 1))
            quantize_aeq(job.fp32_path, job.path, job.precision, calib, io_type, per_channel=per_channel)
            return route if job.precision != "fp16" else "ai-edge-quantizer-fp16"
        if route == ROUTE_PT2E:
            quantize_pt2e(job.model, job.sample, job.path, job.precision, job.calibration,
                          nhwc=job.layout == "NHWC", io_type=io_type, what=job.what, per_channel=per_channel)
            return route
        return super().quantize(route, job)

    def selective(self, fp32_path: Path, calibration: np.ndarray, layout: str, normalization: dict[str, Any],
                  settings: Any, **_graph: Any) -> Any:
        from edgekd.quant.selective import TFLiteSelective

        return TFLiteSelective(fp32_path, calibration, layout, normalization, silence=quiet,
                               per_channel=settings.int8_weights == "per_channel")

    def finish_mixed(self, path: Path, settings: Any) -> None:
        """The int8 I/O type of ``export.tflite.int8_io`` where the mixed file's ends are int8 (as int8 files)."""
        data = path.read_bytes()
        if settings.int8_io == "int8" or not has_int8_io(data):
            return
        with atomic_path(path) as tmp:
            tmp.write_bytes(retype_io(data, settings.int8_io))

    def write_qat(self, qat_model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, settings: Any,
                  what: str) -> str:
        from edgekd.quant import convert_qat

        return write_qat_tflite(convert_qat(qat_model), sample, path, nhwc=layout == "NHWC",
                                io_type=settings.int8_io, what=what)

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return describe_tflite(path)

    def extra_metadata(self, path: Path) -> dict[str, Any]:
        return {"signature_keys": signature_keys(path)}

    def layer_outputs(self, path: Path, x: np.ndarray) -> list[tuple]:
        with quiet():
            return tflite_layers(path, x)


register_backend(TFLiteBackend())
