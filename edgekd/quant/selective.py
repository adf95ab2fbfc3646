"""Selective int8 quantization of an exported fp32 file: any chosen set of layers int8, the rest float.

Each route quantizes the file with its format's own post-training quantizer and the same settings as the full
int8 route of the export (static int8 activations, int8 weights per channel, or per tensor where the backend's
``int8_weights`` asks), and runs the results in that
format's runtime, so what a measurement says is what the shipped file does:

* ``tflite``: ai-edge-quantizer. Its recipe selects ops by a regex on the op's scope (its output tensor names
  joined by ``;``); a layer kept float gets the ``no_quantize`` algorithm, and the quantizer puts
  DEQUANTIZE/QUANTIZE ops around it. The calibration (tensor min/max of the float model) runs once.
* ``onnx``: ONNX Runtime's ``quantize_static`` (QDQ) with ``nodes_to_exclude`` / ``nodes_to_quantize``; the
  calibration ranges are computed once and reused through its calibration cache where the installed
  onnxruntime has one (1.32+), else recomputed per file.

A *layer* is one op that computes (convolution, matmul, add, pooling to a mean...); ops that only move or
reshape data, or keep their input's scale (max pooling), are not layers of their own. In ONNX an activation
(Relu, Clip) goes with the node it follows, as the quantizer fuses it there; TFLite has it fused in the op.
Layers are named after the PyTorch module they come from (``features.3 (CONV_2D)``), so the two formats'
rankings can be read side by side.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, ContextManager

import numpy as np

from edgekd.errors import ExportError

Silence = Callable[[], ContextManager[Any]]

# TFLite ops that move, pad or reshape data, or keep their input's quantization (not layers of their own).
_TFLITE_PASS_THROUGH = {"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "PAD", "PADV2", "MIRROR_PAD", "SLICE",
                        "STRIDED_SLICE", "SPLIT", "PACK", "UNPACK", "GATHER", "GATHER_ND", "BROADCAST_TO",
                        "SPACE_TO_DEPTH", "MAX_POOL_2D", "QUANTIZE", "DEQUANTIZE", "DELEGATE"}
_ONNX_PASS_THROUGH = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Pad",
                      "MaxPool", "Identity", "Shape", "Cast", "QuantizeLinear", "DequantizeLinear"}
# ONNX activations that ONNX Runtime's QDQ quantizer folds into the node before them.
_ONNX_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh"}


@dataclass(frozen=True)
class Layer:
    """One quantizable layer of a file.

    Attributes:
        key: What the quantizer selects it by (the TFLite op scope; the ONNX node names joined by ``+``).
        name: A readable, unique name: the PyTorch module and the op (``features.0 (CONV_2D)``).
        op: The op type(s).
    """

    key: str
    name: str
    op: str
    tensors: tuple[str, ...] = ()  # the op's output tensors (TFLite), for per-tensor comparisons


def weight_granularity(recipe: list[dict], per_channel: bool) -> list[dict]:
    """An ai-edge-quantizer recipe with per-tensor int8 weights everywhere when ``per_channel`` is false (a
    per-tensor FULLY_CONNECTED entry stays per-tensor either way)."""
    if per_channel:
        return recipe
    out = copy.deepcopy(recipe)
    for entry in out:
        weights = (entry.get("op_config") or {}).get("weight_tensor_config")
        if weights:
            weights["granularity"] = "TENSORWISE"
    return out


def module_path(tensor_name: str) -> tuple[str, str] | None:
    """``("features.0", "Conv2d")`` from a litert-torch tensor name part (``pkg.Net/...Sequential_features/
    ...conv.Conv2d_0``): each path segment after the root is ``<module class>_<attribute>``."""
    parts = [p for p in tensor_name.split("/")[1:] if p]
    if not parts:
        return None
    names, cls = [], ""
    for seg in parts:
        cls, _, attr = seg.rsplit(".", 1)[-1].lstrip("_").partition("_")
        names.append(attr or cls)
    return ".".join(names), cls


def _tflite_module(names: list[str]) -> str | None:
    """The module an op comes from: its weighted module (conv, linear) when the fused name lists several."""
    found = [m for n in names for part in n.split(";") if part for m in [module_path(part)] if m is not None]
    if not found:
        return None
    weighted = [path for path, cls in found if cls.startswith(("Conv", "Linear"))]
    return (weighted or [found[-1][0]])[0]


def _unique(layers: list[tuple]) -> list[Layer]:
    seen: dict[str, int] = {}
    out = []
    for key, name, op, *tensors in layers:
        seen[name] = seen.get(name, 0) + 1
        out.append(Layer(key, name if seen[name] == 1 else f"{name} #{seen[name]}", op, tuple(*tensors)))
    return out


class SelectiveRoute:
    """A format's selective int8 quantizer over one fp32 file (calibrated once, see the module docstring).

    Subclasses set ``format``, ``suffix``, ``tool``, ``runtime`` and implement :meth:`layers` and :meth:`write`.

    Args:
        fp32_path: The verified fp32 file.
        calibration: Normalized calibration inputs, NCHW (images) or NF.
        layout: The file's input layout (``NCHW``, ``NHWC``, ``NF``).
        normalization: ``{"mean", "std"}`` of raw inputs (what the file's runtime entry carries).
        silence: A context manager factory that silences the tools' console output (default: none).
        per_channel: int8 weights with a scale per output channel (else one per tensor).
    """

    format: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    tool: ClassVar[str] = ""
    runtime: ClassVar[str] = ""

    def __init__(self, fp32_path: Path, calibration: np.ndarray, layout: str, normalization: dict[str, Any],
                 silence: Silence | None = None, per_channel: bool = True):
        self.fp32_path = Path(fp32_path)
        self.per_channel = per_channel
        self.layout = layout
        self.normalization = normalization
        self.silence = silence or contextlib.nullcontext
        if layout == "NHWC" and calibration.ndim == 4:
            calibration = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1))
        self.calibration = np.asarray(calibration, np.float32)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"edgekd-{self.format}-mixed-")
        self.work = Path(self._tmp.name)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "SelectiveRoute":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def layers(self) -> list[Layer]:
        """The file's quantizable layers in graph order."""
        raise NotImplementedError

    def write(self, path: Path, *, keep_float: Collection[str] = (), only: Collection[str] | None = None) -> None:
        """Write an int8 file: every layer int8 except the ``keep_float`` keys, or (``only``) just those keys."""
        raise NotImplementedError

    def io_entry(self, path: Path) -> dict[str, Any]:
        """The part of a metadata entry the runtime needs to feed the file and read its logits."""
        return {"normalization": self.normalization, "precision": "int8",
                "input": {"layout": self.layout, "dtype": "float32", "quantization": None},
                "output": {"dtype": "float32", "quantization": None}}

    def tensor_errors(self, path: Path, x_raw: np.ndarray) -> dict[str, dict[str, float]]:
        """Per layer key, the error of the layer's own output in an int8 file against the fp32 file ({}: the
        format has no such comparison)."""
        return {}

    def logits(self, path: Path, x_raw: np.ndarray) -> np.ndarray:
        """Float logits of a file for raw inputs, run in the format's runtime at 1 thread."""
        from edgekd.runtimes import runtime_for

        with self.silence():
            rt = runtime_for(path, self.io_entry(path), threads=1, runtime=self.runtime)
            try:
                return rt.predict(x_raw, batch_size=256)
            except Exception as e:
                raise ExportError(f"{Path(path).name} fails to run in {rt.name}: {str(e).splitlines()[0][:200]}") from e


class TFLiteSelective(SelectiveRoute):
    """``.tflite`` files by ai-edge-quantizer's selective recipes, run in LiteRT."""

    format, suffix, tool, runtime = "tflite", ".tflite", "ai-edge-quantizer", "litert"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._data = self.fp32_path.read_bytes()
        if len(self._data) < 8 or self._data[4:8] != b"TFL3":
            raise ExportError(f"{self.fp32_path.name} is not a valid .tflite file", "export it again with `edgekd export`")
        self._layers = self._find_layers()
        self._qsv = self._calibrate()

    def _interpreter(self, data: bytes):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            it = Interpreter(model_content=data,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        return it

    def _find_layers(self) -> list[Layer]:
        from ai_edge_quantizer.qtyping import TFLOperationName

        known = {op.value for op in TFLOperationName}
        it = self._interpreter(self._data)
        names = {t["index"]: t["name"] for t in it.get_tensor_details()}
        found = []
        for op in it._get_ops_details():  # noqa: SLF001 - LiteRT's only per-op listing
            kind, outs = op["op_name"], [names[i] for i in op["outputs"] if i >= 0]
            if kind in _TFLITE_PASS_THROUGH or kind not in known or not outs:
                continue
            ins = [names[i] for i in op["inputs"] if i >= 0]
            module = _tflite_module(outs) or _tflite_module(ins[1:2]) or outs[0]
            # ai-edge-quantizer's scope of an op: its output tensor names, each followed by ';'.
            found.append(("".join(f"{n};" for n in outs), f"{module} ({kind})", kind, outs))
        return _unique(found)

    def layers(self) -> list[Layer]:
        return list(self._layers)

    def _calibrate(self) -> dict[str, Any]:
        from ai_edge_quantizer import quantizer, recipe

        key, name = self._signature()
        q = quantizer.Quantizer(self._data)
        q.load_quantization_recipe(recipe.static_wi8_ai8())
        calib = self.calibration
        with self.silence(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return q.calibrate({key: [{name: calib[i:i + 1]} for i in range(len(calib))]}, num_threads=1)

    def recipe(self, keep_float: Collection[str] = (), only: Collection[str] | None = None) -> list[dict[str, Any]]:
        """The ai-edge-quantizer recipe: static int8 everywhere but ``keep_float``, or on ``only``."""
        from ai_edge_quantizer import recipe

        base = weight_granularity(recipe.static_wi8_ai8(), self.per_channel)
        if only is not None:
            return [{**base[0], "regex": f"^{re.escape(k)}$"} for k in only]
        return base + [{"regex": f"^{re.escape(k)}$", "operation": "*", "algorithm_key": "no_quantize"}
                       for k in keep_float]

    def write(self, path: Path, *, keep_float: Collection[str] = (), only: Collection[str] | None = None) -> None:
        from ai_edge_quantizer import quantizer

        from edgekd.run_dir import atomic_path

        q = quantizer.Quantizer(self._data)
        q.load_quantization_recipe(self.recipe(keep_float, only))
        try:
            with self.silence(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = q.quantize(self._qsv, enable_progress_report=False, enable_progress_bar=False)
        except Exception as e:
            raise ExportError(f"ai-edge-quantizer failed on {self.fp32_path.name}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        with atomic_path(path) as tmp:
            tmp.write_bytes(bytes(result.quantized_model))

    def tensor_errors(self, path: Path, x_raw: np.ndarray) -> dict[str, dict[str, float]]:
        """ai-edge-quantizer's own per-tensor comparison (its model validator, what Model Explorer shows): the SNR
        and mean cosine of each layer's output in the int8 file, error accumulated up to that layer."""
        from ai_edge_quantizer import model_validator
        from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric as Metric
        from ai_edge_quantizer.utils.validation_utils import get_validation_func

        from edgekd.runtimes import prepare_input

        x = prepare_input(x_raw, SelectiveRoute.io_entry(self, path))
        key, name = self._signature()
        # The validator averages each function over the samples. Its SNR is the mean of per-sample ratios, which
        # a few near-exact samples dominate; the mean noise and mean signal power give the SNR over all samples,
        # as output_error computes it for the logits (the signal power rides on the SNR metric's slot).
        fns = [get_validation_func(Metric.MSE), lambda _q, ref: float(np.square(ref).mean()),
               get_validation_func(Metric.COSINE_SIMILARITY)]
        with self.silence(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = model_validator.compare_model(self._data, Path(path).read_bytes(),
                                                {key: [{name: x[i:i + 1]} for i in range(len(x))]},
                                                [Metric.MSE, Metric.SNR, Metric.COSINE_SIMILARITY], fns, num_threads=1)
        tensors = res.get_all_tensor_results()
        out = {}
        for layer in self._layers:
            got = tensors.get(layer.tensors[0]) if layer.tensors else None
            if got:
                noise, power = float(got["mse"]), float(got["snr"])
                snr = 999.0 if noise == 0 else 10 * np.log10(max(power, 1e-30) / noise)
                out[layer.key] = {"snr_db": round(min(snr, 999.0), 3),
                                  "cosine": round(float(got["cosine_similarity"]), 6)}
        return out

    def _signature(self) -> tuple[str, str]:
        sigs = self._interpreter(self._data).get_signature_list()
        if not sigs:
            raise ExportError(f"{self.fp32_path.name} has no signature", "export it again with `edgekd export`")
        key = next(iter(sigs))
        return key, sigs[key]["inputs"][0]

    def io_entry(self, path: Path) -> dict[str, Any]:
        # A selectively quantized file has int8 inputs/outputs where its first/last layer is int8.
        entry = super().io_entry(path)
        it = self._interpreter(Path(path).read_bytes())
        for side, d in (("input", it.get_input_details()[0]), ("output", it.get_output_details()[0])):
            scale, zero_point = d.get("quantization", (0.0, 0))
            entry[side] = {**entry[side], "dtype": np.dtype(d["dtype"]).name,
                           "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None}
        return entry


class OnnxSelective(SelectiveRoute):
    """``.onnx`` files by ONNX Runtime's ``quantize_static`` with node exclusion, run in ONNX Runtime."""

    format, suffix, tool, runtime = "onnx", ".onnx", "onnxruntime", "onnxruntime"

    def __init__(self, *args: Any, method: str = "minmax", **kwargs: Any):
        super().__init__(*args, **kwargs)
        from onnxruntime.quantization import CalibrationMethod, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        if method not in methods:
            raise ExportError(f"unknown calibration method {method!r}", f"choose from: {', '.join(methods)}")
        self.method = methods[method]
        self.pre = self.work / "pre.onnx"
        try:
            with self.silence(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(self.fp32_path), str(self.pre))
        except Exception as e:
            raise ExportError(f"{self.fp32_path.name} cannot be prepared for quantization "
                              f"({type(e).__name__}); it may be damaged", "export it again with `edgekd export`") from e
        # The calibration cache (onnxruntime 1.32+) lets every file reuse one calibration.
        self.cache = self.work / "calibration.json" if "calibration_cache_path" in inspect.signature(
            quantize_static).parameters else None
        self._layers = self._find_layers()

    def _find_layers(self) -> list[Layer]:
        import onnx
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        quantizable = set(QDQRegistry) | set(QLinearOpsRegistry)  # what quantize_static quantizes by default
        graph = onnx.load(str(self.pre)).graph
        inits = {t.name for t in graph.initializer}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        found, taken = [], set()
        for node in graph.node:
            if (node.name in taken or not node.name or node.op_type in _ONNX_PASS_THROUGH
                    or node.op_type not in quantizable):
                continue
            group = [node]
            nxt = consumers.get(node.output[0], []) if node.output else []
            if node.op_type not in _ONNX_ACTIVATIONS and len(nxt) == 1 and nxt[0].op_type in _ONNX_ACTIVATIONS:
                group.append(nxt[0])
            taken.update(n.name for n in group)
            weights = [i for i in node.input if i in inits and i.endswith(".weight")]
            module = weights[0][: -len(".weight")] if weights else node.output[0]
            ops = "+".join(n.op_type for n in group)
            found.append(("+".join(n.name for n in group), f"{module} ({ops})", ops))
        return _unique(found)

    def layers(self) -> list[Layer]:
        return list(self._layers)

    def write(self, path: Path, *, keep_float: Collection[str] = (), only: Collection[str] | None = None) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from edgekd.run_dir import atomic_path

        nodes = lambda keys: [n for k in keys for n in k.split("+")]  # noqa: E731
        kwargs: dict[str, Any] = {"nodes_to_exclude": nodes(keep_float)}
        if only is not None:
            kwargs = {"nodes_to_quantize": nodes(only)}
        reader = None
        if self.cache is None or not self.cache.is_file():
            reader = _Reader(self.calibration, self.input_name())
        if self.cache is not None:
            kwargs["calibration_cache_path"] = str(self.cache)
        out = self.work / "out.onnx"
        try:
            with self.silence(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(str(self.pre), str(out), reader, quant_format=QuantFormat.QDQ,
                                per_channel=self.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=self.method, **kwargs)
        except Exception as e:
            raise ExportError(f"onnxruntime quantization failed on {self.fp32_path.name}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        with atomic_path(path) as tmp:
            tmp.write_bytes(out.read_bytes())

    def input_name(self) -> str:
        import onnx

        return onnx.load(str(self.pre), load_external_data=False).graph.input[0].name


class _Reader:
    """ONNX Runtime CalibrationDataReader: one normalized sample per call."""

    def __init__(self, x: np.ndarray, name: str):
        self._items = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._items, None)


SELECTIVE_ROUTES: dict[str, type[SelectiveRoute]] = {"tflite": TFLiteSelective, "onnx": OnnxSelective}


def selective_route(fmt: str, fp32_path: Path, calibration: np.ndarray, layout: str,
                    normalization: dict[str, Any], *, method: str = "minmax",
                    silence: Silence | None = None, per_channel: bool = True) -> SelectiveRoute:
    """The selective int8 route of a format, calibrated on ``calibration`` (use it as a context manager).

    Raises:
        ExportError: The format has no mixed-precision route, or the file cannot be read or calibrated.
    """
    cls = SELECTIVE_ROUTES.get(fmt)
    if cls is None:
        raise ExportError(f"{fmt} has no mixed-precision route",
                          f"mixed int8/float files: {', '.join(SELECTIVE_ROUTES)}")
    kwargs: dict[str, Any] = {"method": method} if cls is OnnxSelective else {}
    return cls(fp32_path, calibration, layout, normalization, silence=silence, per_channel=per_channel, **kwargs)
