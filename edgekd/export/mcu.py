"""The ``mcu`` target: a full-integer ``.tflite`` file for TensorFlow Lite for Microcontrollers (TFLM).

The MCU file is made from the run's verified static-int8 TFLite file, not quantized again, so its arithmetic
is the int8 file's, operator for operator:

1. the float32 (or uint8) boundary that ``export.tflite.int8_io`` may have added is taken off, then uint8 I/O
   is put back if ``export.mcu.io`` asks for it (int8 is TFLM's native type);
2. tensor names are emptied except the input's and output's: litert-torch names every tensor after the
   PyTorch module path, which is flash the firmware never reads (about a third of a small model);
3. the file is checked: every tensor integer (a float tensor means the model is not full-integer), every
   operator one that TFLM registers (``tflm_ops.json``);
4. the file runs in TFLM's interpreter on the run's test split, and in LiteRT: the two accuracies must be equal
   (the kernels are the same reference integer kernels), and TFLM's arena is measured.

File name: ``<model>_mcu.tflite`` (e.g. ``student_pruned_mcu.tflite``). It is not the int8 file: its I/O
type and names differ, and the int8 file keeps the I/O that apps on phones and Linux boards feed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgekd.errors import CheckFailed, ExportError
from edgekd.export.backends import Derived, ExportBackend, register_backend
from edgekd.run_dir import atomic_path

MCU_FORMAT = "mcu"
MCU_SUFFIX = "_mcu.tflite"
MCU_IO_TYPES = ("int8", "uint8")
# What the firmware reserves above the arena measured on the host: pointers are 4 bytes on a Cortex-M but 8 on
# the host (the tail shrinks), while optimized kernels (CMSIS-NN, ESP-NN) may add scratch buffers the host's
# reference kernels do not request. 25% (at least 1 KB), rounded up to whole KB.
ARENA_HEADROOM = 0.25
_MIN_HEADROOM = 1024
_INTEGER_TYPES = ("INT8", "UINT8", "INT16", "INT32", "INT64", "BOOL")


def _fb():
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    return fb, flatbuffer_utils


@lru_cache(maxsize=1)
def tflm_ops() -> dict[str, str]:
    """TFLM's builtin operators: ``{"CONV_2D": "AddConv2D", ...}`` (the ``MicroMutableOpResolver`` method)."""
    text = resources.files("edgekd.export").joinpath("tflm_ops.json").read_text()
    return dict(json.loads(text)["ops"])


def _names(enum_cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def _read(data: bytes):
    fb, fu = _fb()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ExportError("not a valid .tflite file (truncated or damaged)", "export it again with `edgekd export`")
    return fu.read_model_from_bytearray(bytearray(data))


def model_ops(data: bytes) -> list[str]:
    """Builtin operator names the model's operators use, each once, in order of first use."""
    fb, _ = _fb()
    model = _read(data)
    names = _names(fb.BuiltinOperator)
    ops: list[str] = []
    for sg in model.subgraphs:
        for op in sg.operators or []:
            oc = model.operatorCodes[op.opcodeIndex]
            code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
            name = names.get(code, f"BUILTIN_{code}")
            if code == fb.BuiltinOperator.CUSTOM:
                name = f"CUSTOM:{(oc.customCode or b'?').decode(errors='replace')}"
            if name not in ops:
                ops.append(name)
    return ops


def check_mcu_model(data: bytes, what: str) -> list[str]:
    """Check that a model can run on a microcontroller in TFLM; return its operators.

    Raises:
        ExportError: A float tensor (not full-integer), or an operator TFLM does not register.
    """
    fb, _ = _fb()
    model = _read(data)
    types = _names(fb.TensorType)
    ops_names = _names(fb.BuiltinOperator)
    for sg in model.subgraphs:
        floats = [i for i, t in enumerate(sg.tensors) if types.get(t.type, str(t.type)) not in _INTEGER_TYPES]
        if not floats:
            continue
        t = sg.tensors[floats[0]]
        kind = types.get(t.type, str(t.type)).lower()
        if all(types.get(x.type) not in ("INT8", "UINT8") for x in sg.tensors):
            raise ExportError(f"{what} is a float model ({kind}), not full-integer",
                              "the MCU target needs the static int8 TFLite file: add int8 to export.quantize")
        maker = next((op for op in sg.operators if floats[0] in list(op.outputs)), None)
        user = next((op for op in sg.operators if floats[0] in list(op.inputs)), None)
        around = ", ".join(sorted({ops_names.get(max(model.operatorCodes[o.opcodeIndex].builtinCode,
                                                         model.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode), "?")
                                   for o in (maker, user) if o is not None}))
        name = (t.name or b"").decode(errors="replace")[:60] or f"#{floats[0]}"
        raise ExportError(f"{what} is not full-integer: tensor {name} is {kind} (around {around or 'no operator'})",
                          "the quantizer left that part in float; change the model so it avoids that operator")
    ops = model_ops(data)
    known = tflm_ops()
    for op in ops:
        if op not in known:
            raise ExportError(f"{what} uses operator {op}, which TensorFlow Lite Micro does not have",
                              "change the model so it avoids that operator, or drop mcu from export.formats")
    return ops


def _strip_boundary(model, fb) -> None:
    """Take off QUANTIZE/DEQUANTIZE ops between the graph boundary and int8 tensors (float or uint8 I/O)."""
    sg = model.subgraphs[0]

    def code(op) -> int:
        oc = model.operatorCodes[op.opcodeIndex]
        return max(oc.builtinCode, oc.deprecatedBuiltinCode)

    boundary_codes = (fb.BuiltinOperator.QUANTIZE, fb.BuiltinOperator.DEQUANTIZE)
    drop_ops, remap = [], {}
    for pos, idx in enumerate(list(sg.inputs)):
        if sg.tensors[idx].type == fb.TensorType.INT8:
            continue
        users = [op for op in sg.operators if idx in list(op.inputs)]
        if len(users) != 1 or code(users[0]) != fb.BuiltinOperator.QUANTIZE:
            raise ExportError("the int8 file's input is not int8 and not a QUANTIZE boundary")
        inner = int(users[0].outputs[0])
        drop_ops.append(users[0])
        sg.inputs[pos] = remap[idx] = inner
    for pos, idx in enumerate(list(sg.outputs)):
        if sg.tensors[idx].type == fb.TensorType.INT8:
            continue
        makers = [op for op in sg.operators if idx in list(op.outputs)]
        if len(makers) != 1 or code(makers[0]) not in boundary_codes:
            raise ExportError("the int8 file's output is not int8 and not a (DE)QUANTIZE boundary")
        inner = int(makers[0].inputs[0])
        drop_ops.append(makers[0])
        sg.outputs[pos] = remap[idx] = inner
    if not remap:
        return
    sg.operators = [op for op in sg.operators if all(op is not d for d in drop_ops)]
    for old, new in remap.items():
        # The inner int8 tensor takes the public name back (retype_io had suffixed it).
        name = sg.tensors[old].name
        sg.tensors[new].name = name
    for sig in model.signatureDefs or []:
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    _drop_tensors(model, set(remap))


def _drop_tensors(model, dead: set[int]) -> None:
    sg = model.subgraphs[0]
    keep = [i for i in range(len(sg.tensors)) if i not in dead]
    index = {old: new for new, old in enumerate(keep)}
    sg.tensors = [sg.tensors[i] for i in keep]

    def fix(seq):
        return [index[int(i)] if int(i) >= 0 else int(i) for i in seq]

    for op in sg.operators:
        op.inputs, op.outputs = fix(op.inputs), fix(op.outputs)
        if op.intermediates is not None:
            op.intermediates = fix(op.intermediates)
    sg.inputs, sg.outputs = fix(sg.inputs), fix(sg.outputs)
    for sig in model.signatureDefs or []:
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = index[tm.tensorIndex]


def _drop_unused_opcodes(model) -> None:
    """Remove operator codes no operator uses (the boundary ops just taken off), so the file lists only
    the operators the firmware must register."""
    used = sorted({int(op.opcodeIndex) for sg in model.subgraphs for op in sg.operators or []})
    index = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for sg in model.subgraphs:
        for op in sg.operators or []:
            op.opcodeIndex = index[int(op.opcodeIndex)]


def mcu_bytes(int8_data: bytes, io_type: str = "int8", keep_names: bool = False) -> bytes:
    """The MCU file's bytes from a static int8 ``.tflite`` file (any I/O type).

    Args:
        int8_data: The full-integer file (its I/O may be float32, int8 or uint8).
        io_type: ``int8`` or ``uint8`` inputs/outputs.
        keep_names: Keep every tensor's name (default: only the inputs' and outputs').
    """
    from edgekd.export.tflite import retype_io

    if io_type not in MCU_IO_TYPES:
        raise ExportError(f"unknown MCU I/O type {io_type!r}", f"choose from: {', '.join(MCU_IO_TYPES)}")
    fb, fu = _fb()
    model = _read(int8_data)
    if len(model.subgraphs) != 1:
        raise ExportError("the MCU target handles single-graph models only")
    _strip_boundary(model, fb)
    if not keep_names:
        sg = model.subgraphs[0]
        public = set(sg.inputs) | set(sg.outputs)
        for i, t in enumerate(sg.tensors):
            if i not in public:
                t.name = b""
    _drop_unused_opcodes(model)
    data = bytes(fu.convert_object_to_bytearray(model))
    return retype_io(data, io_type) if io_type != "int8" else data


@dataclass
class McuResult:
    """What the MCU export measured for one file."""

    file: str
    ops: list[str]
    tflm_accuracy: float
    litert_accuracy: float
    agreement: float
    arena: dict[str, int]
    arena_firmware_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "tflm_accuracy": self.tflm_accuracy, "litert_accuracy": self.litert_accuracy,
                "tflm_litert_agreement": self.agreement, **self.arena,
                "arena_firmware_bytes": self.arena_firmware_bytes, "arena_headroom": ARENA_HEADROOM}


def firmware_arena(measured: int) -> int:
    """The arena size the firmware reserves: the measured minimum plus headroom, in whole KB."""
    extra = max(int(measured * ARENA_HEADROOM), _MIN_HEADROOM)
    return -(-(measured + extra) // 1024) * 1024


def write_mcu(int8_path: Path, out_path: Path, io_type: str = "int8") -> list[str]:
    """Write the MCU file made from ``int8_path``; return its operators.

    Raises:
        ExportError: The int8 file is not full-integer or uses an operator TFLM lacks (nothing is written).
    """
    source = Path(int8_path).read_bytes()
    # Checked with the tensor names kept, so an error can name the tensor; the file is written without them.
    ops = check_mcu_model(mcu_bytes(source, io_type, keep_names=True), Path(int8_path).name)
    data = mcu_bytes(source, io_type)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    return ops


def litert_builtin_predict(path: Path, entry: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Float logits of LiteRT's builtin kernels (XNNPACK off) for raw inputs, one sample per invoke.

    XNNPACK, LiteRT's default for int8, requantizes with its own rounding, so its logits differ from TFLM's
    by a few steps; TFLite's builtin integer kernels are what TFLM's kernels were ported from.
    """
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgekd.runtimes import prepare_input, restore_output

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    xq = prepare_input(x, entry)
    rows = []
    for i in range(len(xq)):
        it.set_tensor(inp["index"], xq[i:i + 1])
        it.invoke()
        rows.append(it.get_tensor(out["index"]).copy())
    return restore_output(np.concatenate(rows), entry)


# Share of test predictions TFLM may compute differently from LiteRT on the same int8 file: their kernels round
# a few borderline logits differently (2 of 10,000 Fashion-MNIST images on one seed of the benchmark of record).
MAX_DISAGREEMENT = 0.001


def same_accuracy(name: str, tflm: np.ndarray, litert: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracies of TFLM's and LiteRT's predicted classes; equal, or at most :data:`MAX_DISAGREEMENT` of the
    predictions differ (the agreement is recorded with the file).

    Raises:
        CheckFailed: More predictions differ (the message names the file and the difference).
    """
    acc_tflm, acc_litert = float((tflm == y).mean()), float((litert == y).mean())
    if acc_tflm != acc_litert and float((tflm != litert).mean()) > MAX_DISAGREEMENT:
        raise CheckFailed(f"{name}: TFLM accuracy {acc_tflm:.4f} differs from LiteRT's {acc_litert:.4f} "
                          f"on the same file (by {acc_tflm - acc_litert:+.4f}; "
                          f"{int((tflm != litert).sum())} of {len(y)} predictions differ)",
                          "drop mcu from export.formats, or report it with the file")
    return acc_tflm, acc_litert


def verify_mcu(path: Path, entry: dict[str, Any], x: np.ndarray, y: np.ndarray) -> McuResult:
    """Run the MCU file in TFLM and in LiteRT on the test split; measure TFLM's arena.

    Args:
        path: The MCU ``.tflite`` file.
        entry: Its metadata entry (input quantization, normalization, layout).
        x: Raw test inputs (``eval.npz``).
        y: Test labels.

    Raises:
        CheckFailed: TFLM's predictions differ from LiteRT's on the same file (beyond MAX_DISAGREEMENT).
        ExportError: TFLM cannot load the file.
    """
    from edgekd.runtimes.tflm import TFLMRuntime, measure_arena

    path = Path(path)
    ops = check_mcu_model(path.read_bytes(), path.name)
    tflm = TFLMRuntime(path, entry).predict(x).argmax(1)
    litert = litert_builtin_predict(path, entry, x).argmax(1)
    acc_tflm, acc_litert = same_accuracy(path.name, tflm, litert, y)
    arena = measure_arena(path.read_bytes(), path.name)
    return McuResult(path.name, ops, acc_tflm, acc_litert, float((tflm == litert).mean()), arena.as_dict(),
                     firmware_arena(arena.minimum))


def export_mcu(run_path: Path, int8_entry: dict[str, Any] | None, io_type: str, x: np.ndarray, y: np.ndarray,
               run_name: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The MCU target of a run: ``<model>_mcu.tflite`` from the int8 file, verified in TFLM, and ``mcu/``.

    Args:
        run_path: The run directory.
        int8_entry: metadata.json entry of the static int8 TFLite student file (None: the run has none).
        io_type: ``int8`` or ``uint8`` inputs/outputs (``export.mcu.io``).
        x: Raw test inputs (``eval.npz``).
        y: Test labels.
        run_name: For the firmware README.

    Returns:
        The file's metadata entry and its metrics.

    Raises:
        ExportError: No int8 file, a float tensor, an operator TFLM lacks (nothing is left written).
        CheckFailed: TFLM's predictions differ from LiteRT's on the file (beyond MAX_DISAGREEMENT).
    """
    from edgekd.export import firmware
    from edgekd.export.metadata import build_entry
    from edgekd.runtimes.tflm import tflm_version

    if int8_entry is None:
        raise ExportError("the MCU target needs the static int8 TFLite file, and this run has none",
                          "add tflite to export.formats and int8 to export.quantize")
    run_path = Path(run_path)
    src = run_path / int8_entry["file"]
    path = run_path / f"{int8_entry['model']}{MCU_SUFFIX}"
    ops = write_mcu(src, path, io_type)
    try:
        entry = build_entry(path, int8_entry["model"], "int8", int8_entry["input"]["layout"],
                            int8_entry["normalization"], int8_entry["labels"], f"mcu (from {src.name})")
        result = verify_mcu(path, entry, x, y)
        files = firmware.write_firmware(run_path / firmware.MCU_DIR, path, entry, ops, result.as_dict(),
                                        methods=tflm_ops(), run=run_name, tflm=tflm_version(),
                                        tflm_accuracy=result.tflm_accuracy)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    mcu = {**result.as_dict(), "flash_bytes": entry["size_bytes"], "ram_bytes": result.arena_firmware_bytes,
           "runtime": tflm_version(), "firmware": [str(f.relative_to(run_path)) for f in files]}
    from edgekd.export.vela import vela_estimate

    estimate = vela_estimate(path)  # None without ethos-u-vela: the estimate is optional
    if estimate is not None:
        mcu["ethos_u_estimate"] = estimate
    entry.update(target="mcu", verified=True, mcu=mcu)
    entry["tool_versions"] = {**entry.get("tool_versions", {}), "tflite-micro": tflm_version().split()[-1]}
    metrics = {"model": entry["model"], "format": "tflite", "target": "mcu", "precision": "int8",
               "size_bytes": entry["size_bytes"], "route": entry["route"], "verified": True,
               "test_accuracy": result.tflm_accuracy, "litert_accuracy": result.litert_accuracy,
               "tflm_litert_agreement": result.agreement, "flash_bytes": entry["size_bytes"],
               "ram_bytes": result.arena_firmware_bytes, "arena_min_bytes": result.arena["arena_min_bytes"]}
    return entry, metrics


# -- the backend: made from the int8 TFLite file ----------------------------------------------------------

class McuSettings(BaseModel):
    """``export.mcu``: the MCU file's input/output type."""

    model_config = ConfigDict(extra="forbid")
    io: Literal["int8", "uint8"] = Field("int8", description="inputs/outputs of the MCU file")


class McuBackend(ExportBackend):
    """``<model>_mcu.tflite`` for TensorFlow Lite Micro, derived from the verified int8 TFLite file and
    verified in TFLM (with its arena measured) and in LiteRT; the firmware sources travel with it."""

    name = MCU_FORMAT
    format = "tflite"
    suffix = ".tflite"
    tag = MCU_FORMAT
    source = ("tflite", "int8")
    teacher = False
    Settings = McuSettings
    tools = ("ai-edge-litert",)
    runtime = "tflm"

    def file_name(self, model: str, precision: str, qat: bool = False) -> str:
        return f"{model}{MCU_SUFFIX}"

    def check_plan(self, precisions: list[str], formats: list[str]) -> None:
        if "int8" not in precisions:
            raise ExportError("the MCU target needs the static int8 TFLite file, and export.quantize has no int8",
                              "add int8 to export.quantize")

    def check_available(self) -> None:
        from edgekd.runtimes.tflm import tflm_module

        tflm_module()

    def derive(self, source_path: Path, source_entry: dict[str, Any], path: Path, ctx: Any) -> Derived:
        s = ctx.session
        entry, metrics = export_mcu(s.rd.path, source_entry, s.settings(self).io, s.x, s.y, s.rd.name)
        m = entry["mcu"]
        entry["backend"] = self.name
        line = (f"{entry['file']:28s} {entry['size_bytes'] / 1024:7.1f} KB  TFLM accuracy {m['tflm_accuracy']:.4f} "
                f"(LiteRT {m['litert_accuracy']:.4f}), arena {m['arena_min_bytes']} B "
                f"(firmware {m['arena_firmware_bytes']} B)  ok [{entry['route']}]")
        return Derived(entry, {**metrics, "backend": self.name}, companions=list(m["firmware"]), log=line)

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from edgekd.export.tflite import describe_tflite

        return describe_tflite(path)


register_backend(McuBackend())
