"""`edgekd export`: real ONNX and TFLite files, run in onnxruntime and LiteRT, checked against PyTorch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_RECIPE, write_recipe
from edgekd.cli import cli
from edgekd.errors import ExportError
from edgekd.export.metadata import build_entry
from edgekd.export.onnx import export_onnx
from edgekd.export.parity import compare
from edgekd.export.tflite import export_tflite
from edgekd.models import build_model, save_checkpoint
from edgekd.run_dir import RunDir, sha256_file
from edgekd.runtimes import runtime_for

LABELS = [str(i) for i in range(10)]

# Every zoo architecture at a tiny size (8x8 single-channel images or 64 features).
ZOO = [
    pytest.param("cnn", (1, 8, 8), {"width": 4, "depth": 2}, id="cnn"),
    pytest.param("mlp", (64,), {"hidden": 16, "depth": 1}, id="mlp"),
    pytest.param("resnet", (1, 8, 8), {"width": 4, "blocks": [1, 1]}, id="resnet"),
    # ~15 s per format: the deepest graph of the zoo.
    pytest.param("mobilenetv2", (1, 8, 8), {"width_mult": 0.35, "stages": 3, "last_channels": 64},
                 id="mobilenetv2", marks=pytest.mark.slow),
]


def _zoo_model(spec: str, shape: tuple[int, ...], kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(spec, shape, 10, kwargs)
    # Non-trivial BatchNorm statistics, so folding BN into convolutions is part of what is checked.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *shape) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("spec,shape,kwargs", ZOO)
def test_zoo_fp32_parity(tmp_path, spec, shape, kwargs, fmt):
    model = _zoo_model(spec, shape, kwargs)
    x = torch.randn(48, *shape)
    path = tmp_path / f"model_fp32.{fmt}"
    route = (export_onnx if fmt == "onnx" else export_tflite)(model, x[:1], path)
    layout = "NCHW" if len(shape) == 3 else "NF"
    entry = build_entry(path, "student", "fp32", layout, {}, LABELS, route)
    with torch.no_grad():
        ref = model(x).numpy()
    out = runtime_for(path, entry).predict(x.numpy())
    numbers = compare(ref, out, ref.argmax(1))
    print(f"{spec} {fmt}: max|diff|/max|logit| = {numbers['parity']:.2e}")
    assert numbers["parity"] <= 1e-5
    assert numbers["agreement"] == 1.0
    assert entry["input"]["dtype"] == "float32" and entry["output"]["dtype"] == "float32"
    assert entry["input"]["shape"][1:] == list(shape)
    assert entry["output"]["shape"][1:] == [10]
    if fmt == "onnx":
        assert entry["input"]["name"] == "input" and entry["output"]["name"] == "logits"
        assert entry["input"]["shape"][0] == -1  # dynamic batch axis
        assert not list(tmp_path.glob("*.data")), "ONNX weights must live inside the .onnx file"
    else:
        assert entry["input"]["shape"][0] == 1


def test_unconvertible_operator_is_named_and_other_formats_still_export(tmp_path):
    # torch.histc has no lowering in litert-torch 0.10, while torch.onnx exports it.
    class Histo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x + torch.histc(x, bins=8, min=-1, max=1).unsqueeze(0))

    model = Histo().eval()
    x = torch.randn(1, 8)
    with pytest.raises(ExportError) as info:
        export_tflite(model, x, tmp_path / "h.tflite", what="histo")
    msg = str(info.value)
    assert "aten.histc" in msg and "tflite" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir()), "a failed conversion must not leave a file behind"
    export_onnx(model, x, tmp_path / "h.onnx")
    assert (tmp_path / "h.onnx").stat().st_size > 0


# -- end to end on a run directory ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The trained run exported with `edgekd export --quantize int8` (both formats, teacher too)."""
    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(trained_run, run)
    result = CliRunner().invoke(cli, ["export", "--run", str(run), "--quantize", "int8"])
    return run, result


def test_export_writes_verified_files_metadata_and_manifest(exported):
    run, result = exported
    assert result.exit_code == 0, result.output
    files = {"student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite",
             "teacher_fp32.onnx", "teacher_fp32.tflite",
             # an image run: the app-profile files too (tests/test_app_export.py checks them)
             "student_app_fp32.tflite", "student_app_int8.tflite"}
    assert files <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if ".tmp" in p.name or p.suffix == ".data"]
    # The summary table and the fp32 parity figures are printed.
    assert "agreement" in result.output and "max|diff|/max|logit|" in result.output
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["schema_version"] == 1 and meta["labels"] == (run / "labels.txt").read_text().split()
    assert {e["file"] for e in meta["models"]} == files
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["export"]["status"] == "done"
    for e in meta["models"]:
        path = run / e["file"]
        assert e["sha256"] == sha256_file(path) == manifest["artifacts"][e["file"]]["sha256"]
        assert e["size_bytes"] == path.stat().st_size
        assert e["format"] == path.suffix[1:] and e["precision"] in ("fp32", "int8")
        if e["profile"] == "research":  # app files take pixels: their normalization is the 0..255 scaling
            assert e["normalization"] == meta["normalization"]
        assert e["route"] and e["tool_versions"]
        m = metrics[e["file"]]
        assert m["verified"] is True and e["verified"] is True
        if e["precision"] == "fp32":
            assert m["parity"] <= 1e-5
    # int8 agreement with PyTorch on the test split (the tolerance is 98%; margins here are clear).
    for name in ("student_int8.tflite", "student_int8.onnx"):
        print(name, metrics[name]["agreement"], metrics[name]["test_accuracy"], metrics[name]["reference_accuracy"])
        assert metrics[name]["agreement"] >= 0.98
        assert metrics[name]["accuracy_drop"] <= 0.01
    # The exported file's accuracy is recomputed from eval.npz, not copied from PyTorch's.
    ev = np.load(run / "eval.npz")
    entry = next(e for e in meta["models"] if e["file"] == "student_int8.tflite")
    pred = runtime_for(run / entry["file"], entry).predict(ev["x"]).argmax(1)
    assert metrics["student_int8.tflite"]["test_accuracy"] == pytest.approx(float((pred == ev["y"]).mean()))


def test_metadata_matches_what_the_runtimes_report(exported):
    from ai_edge_litert.interpreter import Interpreter
    import onnxruntime as ort

    run, _ = exported
    meta = json.loads((run / "metadata.json").read_text())
    dtypes = {"tensor(float)": "float32"}
    for e in meta["models"]:
        path = str(run / e["file"])
        if e["format"] == "onnx":
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            i, o = sess.get_inputs()[0], sess.get_outputs()[0]
            assert e["input"]["name"] == i.name and e["output"]["name"] == o.name
            assert e["input"]["dtype"] == dtypes[i.type] and e["output"]["dtype"] == dtypes[o.type]
            assert e["input"]["shape"] == [d if isinstance(d, int) else -1 for d in i.shape]
            assert e["input"]["quantization"] is None
        else:
            it = Interpreter(model_path=path)
            i, o = it.get_input_details()[0], it.get_output_details()[0]
            assert e["input"]["name"] == i["name"] and e["output"]["name"] == o["name"]
            assert e["input"]["shape"] == i["shape"].tolist() and e["output"]["shape"] == o["shape"].tolist()
            assert e["input"]["dtype"] == np.dtype(i["dtype"]).name
            for spec, detail in ((e["input"], i), (e["output"], o)):
                scale, zp = detail["quantization"]
                if scale:
                    assert spec["quantization"] == {"scale": pytest.approx(scale), "zero_point": zp}
                else:
                    assert spec["quantization"] is None
        # Research files keep PyTorch's layout; app-profile files take camera pixels (NHWC RGB).
        assert e["input"]["layout"] == ("NHWC" if e["profile"] == "app" else "NCHW")


def test_int8_tflite_io_types_and_nhwc_match_nchw(trained_run, exported, tmp_path):
    """uint8 I/O (what Android apps and MCUs feed) and NHWC input give the same predictions as NCHW."""
    run, _ = exported  # the same student exported NCHW
    nchw_meta = next(e for e in json.loads((run / "metadata.json").read_text())["models"]
                     if e["file"] == "student_fp32.tflite")
    ev = np.load(run / "eval.npz")
    nchw_pred = runtime_for(run / nchw_meta["file"], nchw_meta).predict(ev["x"]).argmax(1)

    run2 = tmp_path / "run2"
    shutil.copytree(trained_run, run2)
    res = CliRunner().invoke(cli, ["export", "--run", str(run2), "--tflite", "--nhwc", "--quantize", "int8",
                                   "--int8-io", "uint8", "--no-teacher"])
    assert res.exit_code == 0, res.output
    meta = {e["file"]: e for e in json.loads((run2 / "metadata.json").read_text())["models"]}
    fp32, int8 = meta["student_fp32.tflite"], meta["student_int8.tflite"]
    assert fp32["input"]["layout"] == "NHWC" and fp32["input"]["shape"] == [1, 8, 8, 1]
    nhwc_pred = runtime_for(run2 / fp32["file"], fp32).predict(ev["x"]).argmax(1)
    assert (nhwc_pred == nchw_pred).all()
    # Raw NHWC tensors fed straight to the interpreter (as a camera pipeline would) agree too.
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(run2 / fp32["file"]))
    it.allocate_tensors()
    mean, std = np.array(fp32["normalization"]["mean"]), np.array(fp32["normalization"]["std"])
    x0 = ((ev["x"][:1] - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)).transpose(0, 2, 3, 1)
    it.set_tensor(it.get_input_details()[0]["index"], x0.astype(np.float32))
    it.invoke()
    assert it.get_tensor(it.get_output_details()[0]["index"]).argmax() == nchw_pred[0]
    # uint8 in and out, with the parameters the interpreter reports.
    assert int8["input"]["dtype"] == "uint8" and int8["output"]["dtype"] == "uint8"
    assert int8["input"]["layout"] == "NHWC" and int8["input"]["quantization"]["scale"] > 0
    metrics = json.loads((run2 / "metrics.json").read_text())
    assert metrics["student_int8.tflite"]["agreement"] >= 0.98


SPIKY = '''
import torch
from torch import nn


class Spiky(nn.Module):
    """Channel 0 of `amp` is ~1000x larger than the others: one int8 scale per tensor cannot hold both."""

    def __init__(self, in_ch, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.amp = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, num_classes)
        with torch.no_grad():
            self.amp.weight[0] = self.amp.weight[0].abs() * 1000
            self.amp.bias[0] = 1000.0
            self.head.weight[:, 0] /= 1000

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.amp(x))
        return self.head(x.mean((2, 3)))


def spiky(input_shape, num_classes):
    torch.manual_seed(0)
    return Spiky(input_shape[0], num_classes)
'''


def _run_with_student(tiny_run: Path, dest: Path, factory_file: Path, spec: str) -> Path:
    """A copy of the tiny run whose student is a user model (saved as an edgekd checkpoint)."""
    shutil.copytree(tiny_run, dest)
    ckpt = torch.load(dest / "student.pt", weights_only=True)
    model = build_model(spec, tuple(ckpt["input_shape"]), ckpt["num_classes"])
    save_checkpoint(dest / "student.pt", model, spec, {}, tuple(ckpt["input_shape"]), ckpt["num_classes"])
    RunDir(dest).record_artifacts("student.pt")
    return dest


def test_int8_collapse_fails_with_first_diverging_layer(tiny_run, tmp_path):
    factory = tmp_path / "spiky.py"
    factory.write_text(SPIKY)
    run = _run_with_student(tiny_run, tmp_path / "run", factory, f"{factory}:spiky")
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--quantize", "int8", "--no-teacher", "-q"])
    assert res.exit_code == 1, res.output
    err = res.output.strip().splitlines()[-1]
    assert err.startswith("error: ") and "student_int8.onnx" in err and "student_int8.tflite" in err
    assert "agreement" in err and "first diverging layer: amp (Conv" in err and "Conv2d_amp" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student_int8.tflite"]["verified"] is False
    assert metrics["student_int8.tflite"]["divergence"]["first_layer"].startswith("Conv2d_amp")
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    # Both TFLite routes were tried before giving up, and the file is flagged, not silently kept.
    assert meta["student_int8.tflite"]["verified"] is False
    assert any(t.split(":")[0] in ("ai-edge-quantizer", "litert-torch-pt2e")
               for t in meta["student_int8.tflite"]["routes_tried"])
    # fp32 files of the same model are fine.
    assert meta["student_fp32.onnx"]["verified"] is True and meta["student_fp32.tflite"]["verified"] is True


HISTO = '''
import torch
from torch import nn


class Histo(nn.Module):
    def __init__(self, in_ch, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y) + torch.histc(y, bins=1, min=0, max=1).sum() * 0


def histo(input_shape, num_classes):
    torch.manual_seed(0)
    return Histo(input_shape[0], num_classes)
'''


def test_cli_conversion_failure_names_operator_and_exports_other_format(tiny_run, tmp_path):
    factory = tmp_path / "histo.py"
    factory.write_text(HISTO)
    run = _run_with_student(tiny_run, tmp_path / "run", factory, f"{factory}:histo")
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--quantize", "none", "--no-teacher", "-q"])
    assert res.exit_code == 2, res.output
    err = res.output.strip().splitlines()[-1]
    assert "tflite" in err and "aten.histc" in err and "student" in err
    assert (run / "student_fp32.onnx").is_file() and not (run / "student_fp32.tflite").exists()
    meta = json.loads((run / "metadata.json").read_text())
    assert [e["file"] for e in meta["models"]] == ["student_fp32.onnx"]
    assert json.loads((run / "manifest.json").read_text())["stages"]["export"]["status"] == "failed"


# -- bad input --------------------------------------------------------------------------------------------

def test_unknown_precision_is_a_one_line_error(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.name for p in run.iterdir())
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--quantize", "int4"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [res.output.strip()]
    assert "unknown precision 'int4'" in res.output and "fp16, int8, dynamic" in res.output
    assert sorted(p.name for p in run.iterdir()) == before


def test_run_with_nothing_to_export(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "student.pt").unlink()
    res = CliRunner().invoke(cli, ["export", "--run", str(run)])
    assert res.exit_code == 2 and "nothing to export" in res.output and "Traceback" not in res.output
    assert not (run / "metadata.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["export", "--out", str(empty)])
    assert res.exit_code == 2 and "no run found" in res.output


def test_read_only_run_directory(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.name for p in run.iterdir())
    run.chmod(0o555)
    cmd = [sys.executable, "-m", "edgekd", "export", "--run", str(run), "--onnx", "--quantize", "none"]
    if os.geteuid() == 0:
        # root ignores permission bits; drop the capabilities that let it (as any user would lack them).
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] + cmd
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        run.chmod(0o755)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("error: cannot write to") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow
def test_exports_the_pruned_student_when_the_run_has_one(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    pruned = CliRunner().invoke(cli, ["prune", "--run", str(run), "--ratio", "0.5", "--steps", "1",
                                      "--finetune-epochs", "1", "-q"])
    assert pruned.exit_code == 0, pruned.output
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--quantize", "none", "--no-teacher", "-q"])
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "metadata.json").read_text())
    # An image run also gets the app-profile file of each precision.
    assert {e["file"] for e in meta["models"]} == {"student_pruned_fp32.onnx", "student_pruned_fp32.tflite",
                                                   "student_pruned_app_fp32.tflite"}
    assert all(e["model"] == "student_pruned" and e["verified"] for e in meta["models"])
    metrics = json.loads((run / "metrics.json").read_text())
    # Parity is against the pruned PyTorch model, whose accuracy prune recorded.
    assert metrics["student_pruned_fp32.onnx"]["reference_accuracy"] == pytest.approx(
        metrics["student_pruned"]["test_accuracy"])
