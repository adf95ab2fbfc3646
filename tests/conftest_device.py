"""A real run directory for the device tests, built once per test session.

It follows the run-directory contract of ``edgekd export`` (metadata.json, eval.npz, labels.txt) with real
exports of a tiny deterministic CNN: fp32 .tflite (litert-torch, NCHW), fp32 .tflite taking NHWC input,
full-integer int8 .tflite (ai-edge-quantizer, static int8 recipe) and fp32 .onnx with a dynamic batch
(torch.onnx dynamo). Nothing is trained: the labels are the fp32 model's own predictions on inputs where
it is confident, with a fixed fifth of them moved to another class, so the expected accuracy is known
(0.8 by construction) and any preprocessing mistake (missing normalization, wrong layout, wrong
quantization) moves it.

Import the ``device_run`` fixture from here in a test module; the build is cached per process, so several
modules importing it share one build.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "device_tests" / "bench.py"

# Three channels with different statistics, so a normalization applied on the wrong axis or an NCHW/NHWC
# mix-up changes the predictions (with one channel a transpose and a reshape would agree).
MEAN = [0.25, 0.5, 0.75]
STD = [0.2, 0.25, 0.3]
LABELS = ["zero", "one", "two"]
N_EVAL = 150
WRONG_FRACTION = 0.2


@dataclass
class DeviceRun:
    """The built run directory and what the tests expect from it."""

    path: Path
    torch_accuracy: float
    # Accuracy of each model file computed without bench.py: torch for the fp32 files, a direct
    # per-sample LiteRT call for the int8 file.
    expected: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    # The int8 file's accuracy with TFLite's built-in kernels (no XNNPACK delegate), computed directly.
    expected_builtin: dict = field(default_factory=dict)


_CACHE: dict = {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(out: Path) -> DeviceRun:
    import torch
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(6)
            self.pool = torch.nn.MaxPool2d(2)
            self.fc = torch.nn.Linear(6 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))

    class Nhwc(torch.nn.Module):
        """The same network taking channels-last input, as an NHWC export would."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    net = Net()
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding them is exercised
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    net.eval()

    rng = np.random.default_rng(0)
    mean = np.array(MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(STD, np.float32).reshape(1, 3, 1, 1)
    cand = rng.random((4000, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy((cand - mean) / std)).numpy()
        # An untrained net favours some class; centering each logit on the candidates balances them.
        net.fc.bias -= torch.from_numpy(logits.mean(0))
        logits = net(torch.from_numpy((cand - mean) / std)).numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    pred = logits.argmax(1)
    # Keep confident samples only (fp32 runtimes then agree with torch exactly), balanced over classes.
    per_class = N_EVAL // 3
    keep = []
    for c in range(3):
        idx = np.where(pred == c)[0]
        idx = idx[np.argsort(-margin[idx])][:per_class]
        if len(idx) < per_class:
            raise RuntimeError(f"fixture model predicts class {c} too rarely; change the seed")
        keep.extend(idx.tolist())
    keep = np.array(sorted(keep))
    x = cand[keep]
    y = pred[keep].astype(np.int64)
    wrong = rng.choice(len(y), size=int(round(WRONG_FRACTION * len(y))), replace=False)
    y[wrong] = (y[wrong] + 1 + rng.integers(0, 2, size=len(wrong))) % 3
    xn = (x - mean) / std
    with torch.no_grad():
        torch_pred = net(torch.from_numpy(xn)).numpy().argmax(1)
    torch_acc = float((torch_pred == y).mean())

    out.mkdir(parents=True, exist_ok=True)
    sample = torch.from_numpy(xn[:1])
    fp32 = out / "student_fp32.tflite"
    litert_torch.convert(net, (sample,)).export(str(fp32))
    nhwc = out / "student_fp32_nhwc.tflite"
    litert_torch.convert(Nhwc(net).eval(), (sample.permute(0, 2, 3, 1).contiguous(),)).export(str(nhwc))
    onnx_path = out / "student_fp32.onnx"
    torch.onnx.export(net, (sample,), str(onnx_path), dynamo=True, input_names=["input"],
                      output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})

    # Full-integer int8: static int8 recipe, calibrated on normalized inputs like the device will feed.
    it = Interpreter(model_path=str(fp32))
    sig = next(iter(it.get_signature_list()))
    in_name = it.get_signature_list()[sig]["inputs"][0]
    q = quantizer.Quantizer(str(fp32))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    int8 = out / "student_int8.tflite"
    with warnings.catch_warnings():  # calibration keeps all tensors on purpose; its warning is noise
        warnings.simplefilter("ignore", UserWarning)
        calib = q.calibrate({sig: [{in_name: xn[i:i + 1]} for i in range(len(xn))]})
        q.quantize(calib).export_model(str(int8), overwrite=True)
    qi = Interpreter(model_path=str(int8))
    qi.allocate_tensors()
    qin, qout = qi.get_input_details()[0], qi.get_output_details()[0]
    in_scale, in_zp = qin["quantization"]
    out_scale, out_zp = qout["quantization"]

    # Oracle for int8: per-sample calls quantizing with the interpreter's own parameters (not metadata).
    int8_pred = []
    for i in range(len(xn)):
        qx = np.clip(np.round(xn[i:i + 1] / in_scale + in_zp), -128, 127).astype(np.int8)
        qi.set_tensor(qin["index"], qx)
        qi.invoke()
        int8_pred.append(int(qi.get_tensor(qout["index"]).argmax()))
    int8_acc = float((np.array(int8_pred) == y).mean())
    from ai_edge_litert.interpreter import OpResolverType

    ri = Interpreter(model_path=str(int8),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ri.allocate_tensors()
    ref_pred = []
    for i in range(len(xn)):
        ri.set_tensor(qin["index"], np.clip(np.round(xn[i:i + 1] / in_scale + in_zp), -128, 127).astype(np.int8))
        ri.invoke()
        ref_pred.append(int(ri.get_tensor(qout["index"]).argmax()))
    int8_builtin_acc = float((np.array(ref_pred) == y).mean())

    import ai_edge_litert
    import ai_edge_quantizer
    import onnx
    from importlib.metadata import version

    versions = {"torch": torch.__version__, "litert-torch": version("litert-torch"),
                "ai-edge-litert": version("ai-edge-litert"), "ai-edge-quantizer": version("ai-edge-quantizer"),
                "onnx": onnx.__version__}
    norm = {"mean": MEAN, "std": STD}

    def entry(path, fmt, precision, shape, layout, dtype, route, in_q=None, out_q=None):
        return {
            "file": path.name, "model": "student", "format": fmt, "precision": precision,
            "input": {"name": "input", "shape": shape, "dtype": dtype, "layout": layout, "quantization": in_q},
            "output": {"name": "logits", "shape": [shape[0], 3], "dtype": dtype, "quantization": out_q},
            "normalization": norm, "labels": LABELS, "size_bytes": path.stat().st_size,
            "sha256": _sha256(path), "route": route, "tool_versions": versions,
        }

    models = [
        entry(fp32, "tflite", "fp32", [1, 3, 8, 8], "NCHW", "float32", "litert-torch"),
        entry(nhwc, "tflite", "fp32", [1, 8, 8, 3], "NHWC", "float32", "litert-torch"),
        entry(int8, "tflite", "int8", [1, 3, 8, 8], "NCHW", "int8", "ai-edge-quantizer",
              {"scale": float(in_scale), "zero_point": int(in_zp)},
              {"scale": float(out_scale), "zero_point": int(out_zp)}),
        entry(onnx_path, "onnx", "fp32", [-1, 3, 8, 8], "NCHW", "float32", "torch.onnx-dynamo"),
    ]
    meta = {"schema_version": 1, "run": "device-fixture", "labels": LABELS, "normalization": norm,
            "models": models}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    np.savez(out / "eval.npz", x=x, y=y)
    (out / "labels.txt").write_text("\n".join(LABELS) + "\n")
    expected = {"student_fp32.tflite": torch_acc, "student_fp32_nhwc.tflite": torch_acc,
                "student_fp32.onnx": torch_acc, "student_int8.tflite": int8_acc}
    return DeviceRun(path=out, torch_accuracy=torch_acc, expected=expected, files=[m["file"] for m in models],
                     expected_builtin={"student_int8.tflite": int8_builtin_acc})


def build_device_run(base: Path) -> DeviceRun:
    """Build (once per process) the fixture run directory under ``base``."""
    if "run" not in _CACHE:
        _CACHE["run"] = _build(base / "device-fixture")
    return _CACHE["run"]


def copy_run(run: DeviceRun, dest: Path) -> Path:
    """Copy the fixture run directory, for tests that damage it."""
    shutil.copytree(run.path, dest)
    return dest


@pytest.fixture(scope="session")
def device_run(tmp_path_factory) -> DeviceRun:
    """The shared fixture run directory (built once, never modified by tests)."""
    return build_device_run(tmp_path_factory.getbasetemp())
