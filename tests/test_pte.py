"""The ExecuTorch target: `edgekd export --format pte` writes fp32 and int8 .pte files (XNNPACK delegate), verified
in ExecuTorch's runtime; validate, bench, report and bundle take them like every other file; QAT writes one too.

Everything runs for real on the session's trained tiny run: torch.export, ExecuTorch's lowering, PT2E calibration on
the run's calibration samples, and `executorch.runtime` on the test split.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgekd.cli import cli
from edgekd.errors import ExportError
from edgekd.export import get_backend, resolve_plan

pytest.importorskip("executorch", reason="the pte target needs the executorch extra (make test installs it)")

PTE_FILES = {"student_fp32.pte", "student_int8.pte", "teacher_fp32.pte"}


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def pte_run(trained_run: Path, tmp_path_factory) -> Path:
    """The trained tiny run exported by `edgekd export --format pte --quantize int8`."""
    run = tmp_path_factory.mktemp("pte") / "run"
    shutil.copytree(trained_run, run)
    res = _cli("export", "--run", str(run), "--format", "pte", "--quantize", "int8")
    assert res.exit_code == 0, res.output
    return run


def test_export_writes_and_verifies_fp32_and_int8_pte(pte_run: Path):
    assert {p.name for p in pte_run.glob("*.pte")} == PTE_FILES
    meta = {e["file"]: e for e in json.loads((pte_run / "metadata.json").read_text())["models"]}
    fp32, int8 = meta["student_fp32.pte"], meta["student_int8.pte"]
    assert fp32["backend"] == fp32["format"] == "pte" and fp32["route"] == "executorch-xnnpack"
    assert int8["route"] == "executorch-xnnpack-pt2e" and int8["precision"] == "int8"
    # What ExecuTorch reports for the program: batch 1, float32 in (int8 quantizes inside the delegate), logits out.
    assert fp32["input"] == {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32", "quantization": None,
                             "layout": "NCHW"}
    assert int8["input"]["dtype"] == "float32" and int8["output"]["shape"] == [1, 10]
    assert fp32["delegate"] == "XnnpackBackend" and "executorch" in fp32["tool_versions"]
    assert all(meta[f]["verified"] is True for f in PTE_FILES)
    metrics = json.loads((pte_run / "metrics.json").read_text())
    # fp32: parity <= 1e-5 of the logits' scale. int8: the export tolerance (98% top-1 agreement); this 8x8 toy
    # student has 360 test samples, where 99% allows 3 flips (benchmarks/pte_latency.py records the agreement of
    # the default recipe's student). No size check: on a model this small XNNPACK's per-channel int8 packing
    # outweighs the 4x smaller weights.
    assert metrics["student_fp32.pte"]["parity"] <= 1e-5
    assert metrics["student_int8.pte"]["agreement"] >= 0.98
    assert metrics["student_int8.pte"]["test_accuracy"] > 0.5 and metrics["student_int8.pte"]["backend"] == "pte"


def test_pte_file_runs_in_executorch_as_pytorch_does(pte_run: Path):
    """The file itself, loaded by executorch.runtime here, gives the PyTorch student's logits."""
    from executorch.runtime import Runtime

    from edgekd.models import load_model
    from edgekd.runtimes import prepare_input

    meta = {e["file"]: e for e in json.loads((pte_run / "metadata.json").read_text())["models"]}
    with np.load(pte_run / "eval.npz") as ev:
        x = prepare_input(ev["x"][:16], meta["student_fp32.pte"])
    method = Runtime.get().load_program(pte_run / "student_fp32.pte").load_method("forward")
    got = np.concatenate([method.execute((torch.from_numpy(x[i:i + 1]),))[0].numpy() for i in range(len(x))])
    with torch.inference_mode():
        want = load_model(pte_run / "student.pt")(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_validate_bench_report_bundle_take_the_pte_files(pte_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(pte_run, run)
    res = _cli("validate", "--run", str(run), "--runtime", "executorch,torch", "-q")
    assert res.exit_code == 0, res.output
    rows = {r["file"]: r for r in json.loads((run / "validate.json").read_text())["rows"]}
    assert PTE_FILES <= set(rows) and all(rows[f]["runtime"] == "executorch" for f in PTE_FILES)
    assert rows["student_fp32.pte"]["test_accuracy"] == rows["student.pt"]["test_accuracy"]

    res = _cli("bench", "--run", str(run), "--runtime", "executorch", "--threads", "1,2", "--runs", "20",
               "--warmup", "2")
    assert res.exit_code == 0, res.output
    report = json.loads((run / "report.json").read_text())
    got = {(r["file"], r["threads"]) for r in report["rows"]}
    assert got == {(f, n) for f in PTE_FILES for n in (1, 2)} and not report["skipped"]
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["load_ms"] > 0 and r["peak_rss_mb"] > 0
               and r["size_bytes"] > 0 for r in report["rows"])
    # ETDump from the installed build: the XNNPACK delegate's own operators, timed.
    prof = report["operator_timings"]["student_int8.pte"]
    assert prof["available"] is True and prof["runtime"] == "executorch"
    assert prof["operators"] and all(o["median_ms"] >= 0 for o in prof["operators"])
    assert any("Convolution" in o["name"] for o in prof["operators"])

    res = _cli("report", "--run", str(run))
    assert res.exit_code == 0, res.output
    text = (run / "report.md").read_text()
    assert "student_int8.pte" in text and "ExecuTorch" in text and "Per-operator timings of student_int8.pte" in text

    from edgekd.bundle import make_bundle

    out = make_bundle(run)
    assert {p.name for p in out.glob("*.pte")} == PTE_FILES
    readme = (out / "README.md").read_text()
    assert "ExecuTorch" in readme and "Android" in readme and "iOS" in readme


def test_plan_puts_sources_first_and_refuses_what_it_cannot_build():
    names = lambda fmts, prec=("int8",): [b.name for b in resolve_plan(list(fmts), list(prec))]  # noqa: E731
    assert names(["mcu"]) == ["tflite", "tflite_app", "mcu"]
    assert names(["ort", "pte"]) == ["onnx", "ort", "pte"]
    with pytest.raises(ExportError, match="MCU target needs the static int8 TFLite file"):
        names(["mcu"], ["fp16"])
    with pytest.raises(ExportError, match="unknown format 'ptee'.*did you mean 'pte'"):
        names(["ptee"])
    assert get_backend("pte").qat_route and get_backend("mcu").source == ("tflite", "int8")


def test_operators_left_outside_xnnpack_are_named():
    from edgekd.export.pte import ROUTE_FP32, lower_to_pte

    class Cumulative(nn.Module):  # XNNPACK has no cumulative sum: it would run on portable kernels
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.cumsum(x, dim=-1))

    with pytest.raises(ExportError, match=r"left 1 operator\(s\) outside the delegate: .*cumsum"):
        lower_to_pte(Cumulative().eval(), torch.randn(1, 8), Path("/nonexistent/x.pte"), what="m", route=ROUTE_FP32)


def test_pte_without_executorch_is_one_line_before_anything(tiny_run: Path, tmp_path: Path, monkeypatch):
    """As on an install without the executorch extra: the plan refuses pte before any file is written."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setitem(sys.modules, "executorch", None)  # what Python does for a package that is not there
    res = _cli("export", "--run", str(run), "--format", "pte")
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last == 'error: the pte target needs ExecuTorch, which is not installed (pip install "edgekd[executorch]")'
    assert not list(run.glob("*.pte")) and not (run / "metadata.json").exists()


def test_qat_writes_a_qat_int8_pte(trained_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    from edgekd.export.qat import run_qat
    from edgekd.recipe import QATConfig

    report = run_qat(run, cfg=QATConfig(epochs=1, calibration_batches=2), formats=["pte"], quiet=True)
    assert report.ok, (report.failures, report.problems)
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    entry = meta["student_int8_qat.pte"]
    assert entry["backend"] == "pte" and entry["route"] == "qat-executorch-xnnpack" and entry["verified"] is True
    m = json.loads((run / "metrics.json").read_text())["student_int8_qat.pte"]
    assert m["agreement"] >= 0.98 and m["qat"]["epochs"] == 1


def test_max_drop_writes_a_mixed_pte_with_the_sensitive_layers_float(pte_run: Path, tmp_path: Path):
    """`edgekd quantize --sensitivity --max-drop` on a run with .pte files: each module int8 alone and all but it
    int8, run in ExecuTorch; then student_mixed.pte with the modules the search kept float left out of the PT2E
    quantization (float XNNPACK kernels for them), verified on the test split like every file."""
    run = tmp_path / "run"
    shutil.copytree(pte_run, run)
    res = _cli("quantize", "--run", str(run), "--sensitivity", "--max-drop", "0", "--file", "student_fp32.pte")
    assert res.exit_code == 0, res.output
    sens = json.loads((run / "quant_sensitivity.json").read_text())["files"]["student_fp32.pte"]
    assert sens["runtime"] == "executorch"
    names = {layer["name"] for layer in sens["layers"]}
    assert {"classifier (Linear)", "features.0 (Conv2d)"} <= names
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    mixed = meta["student_mixed.pte"]
    assert mixed["route"] == "executorch-xnnpack-pt2e-selective" and mixed["verified"] is True
    assert set(mixed["float_layers"]) <= names
    metrics = json.loads((run / "metrics.json").read_text())["student_mixed.pte"]
    # A budget of 0 points: the search keeps layers float until validation accuracy is at least the fp32 file's.
    assert metrics["mixed"]["fits"] is True and metrics["mixed"]["validation"]["drop_points"] <= 0
    from edgekd.runtimes import runtime_for

    x = np.load(run / "eval.npz")["x"][:64]
    got = runtime_for(run / "student_mixed.pte", mixed, threads=1).predict(x)
    assert got.shape == (64, 10) and np.isfinite(got).all()


def test_pte_selective_route_leaves_the_chosen_modules_float(pte_run: Path, tmp_path: Path):
    """Every module left float gives the fp32 program's logits; full int8 and one int8 module each differ."""
    from edgekd.export.pte import PteSelective
    from edgekd.models import load_model

    entry = {e["file"]: e for e in json.loads((pte_run / "metadata.json").read_text())["models"]}["student_fp32.pte"]
    calib = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    x = np.load(pte_run / "eval.npz")["x"][:64]
    with PteSelective(pte_run / "student_fp32.pte", calib, "NCHW", entry["normalization"],
                      model=load_model(pte_run / "student.pt"), sample=torch.from_numpy(calib[:1])) as route:
        keys = [layer.key for layer in route.layers()]
        assert "classifier" in keys and "features.0+features.1+features.2" in keys and "pool" in keys
        out = {}
        for name, kwargs in {"float": {"keep_float": keys}, "int8": {}, "one": {"only": ["classifier"]}}.items():
            route.write(tmp_path / f"{name}.pte", **kwargs)
            out[name] = route.logits(tmp_path / f"{name}.pte", x)
        ref = route.logits(pte_run / "student_fp32.pte", x)
    scale = np.abs(ref).max()
    assert np.abs(out["float"] - ref).max() <= 1e-4 * scale
    assert np.abs(out["int8"] - ref).max() > 1e-3 * scale
    assert np.abs(out["one"] - ref).max() > 1e-3 * scale and np.abs(out["one"] - out["int8"]).max() > 1e-3 * scale
