"""A new export format is one module plus its registration: tests/npzmodel_format.py, and no edit to edgekd; a
backend derived from it is one more module (tests/npzz_format.py).

The toy ``.npzmodel`` format (the model's layers and weights, run by a numpy runtime) goes through the real
stages: ``edgekd export --format npzmodel`` writes and verifies it against PyTorch and describes it in
metadata.json; ``edgekd validate`` and ``edgekd bench`` find its runtime by the file suffix and report it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import npzmodel_format
import npzz_format  # noqa: F401  (registers the derived npzz backend and its runtime)
from edgekd.cli import cli
from edgekd.errors import EdgeKDError, ExportError
from edgekd.export import ExportBackend, backend_for, get_backend, list_backends, register_backend, resolve_plan
from edgekd.runtimes import get_runtime, list_runtimes, runtimes_for

REPO = Path(__file__).resolve().parents[1]
NPZ_FILES = {"student_fp32.npzmodel", "student_fp16.npzmodel", "teacher_fp32.npzmodel"}


def test_the_format_is_registered_and_unknown_to_edgekd_itself():
    assert "npzmodel" in list_backends() and list_backends()[:2] == ["onnx", "tflite"]
    assert backend_for("x/student_fp32.npzmodel").name == "npzmodel"
    assert [c.name for c in runtimes_for("student_fp32.npzmodel")] == ["numpy-layers"]
    assert "numpy-layers" in list_runtimes() and get_runtime("numpy-layers") is npzmodel_format.NumpyLayersRuntime
    # The evidence is only worth something if edgekd's own code does not know the formats.
    for path in (REPO / "edgekd").rglob("*.py"):
        assert "npzmodel" not in path.read_text() and "npzz" not in path.read_text(), path


def test_registry_errors_name_the_closest_choice():
    with pytest.raises(ExportError, match="unknown format 'npzmdl'.*did you mean 'npzmodel'"):
        get_backend("npzmdl")
    with pytest.raises(ExportError, match=r"no export format writes \.bin files"):
        backend_for("model.bin")
    with pytest.raises(EdgeKDError, match="unknown runtime 'numpy-layer'.*did you mean 'numpy-layers'"):
        get_runtime("numpy-layer")

    class Clash(ExportBackend):
        name, suffix, routes = "clash", ".onnx", {"fp32": ("x",)}

    with pytest.raises(EdgeKDError, match=r"suffix \.onnx is already written by 'onnx'"):
        register_backend(Clash())
    assert "clash" not in list_backends()
    with pytest.raises(ExportError, match="npzmodel has no int8 export.*fp32, fp16"):
        get_backend("npzmodel").routes_for("int8")


@pytest.fixture(scope="module")
def toy_run(tiny_run: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("toy") / "tiny"
    shutil.copytree(tiny_run, run)
    return run


def test_export_validate_bench_pick_up_the_new_format(toy_run: Path):
    runner = CliRunner()
    res = runner.invoke(cli, ["export", "--run", str(toy_run), "--format", "npzmodel", "--quantize", "fp16"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in toy_run.glob("*.npzmodel")} == NPZ_FILES
    assert "student_fp32.npzmodel" in res.output and "ok [npz-layers]" in res.output

    meta = json.loads((toy_run / "metadata.json").read_text())
    entries = {e["file"]: e for e in meta["models"]}
    assert set(entries) == NPZ_FILES
    fp32 = entries["student_fp32.npzmodel"]
    assert fp32["format"] == "npzmodel" and fp32["precision"] == "fp32" and fp32["route"] == "npz-layers"
    assert fp32["input"] == {"name": "input", "shape": [-1, 1, 8, 8], "dtype": "float32", "quantization": None,
                             "layout": "NCHW"}
    assert fp32["output"]["shape"] == [-1, 10] and fp32["verified"] is True
    assert set(fp32["tool_versions"]) == {"torch", "numpy"} and len(fp32["sha256"]) == 64
    assert entries["student_fp16.npzmodel"]["route"] == "npz-layers-fp16"
    # The export verified every file against PyTorch on the test split, in the toy runtime.
    metrics = json.loads((toy_run / "metrics.json").read_text())
    assert metrics["student_fp32.npzmodel"]["parity"] < 1e-5
    assert metrics["student_fp16.npzmodel"]["agreement"] >= 0.98

    res = runner.invoke(cli, ["validate", "--run", str(toy_run), "--runtime", "numpy-layers,torch"])
    assert res.exit_code == 0, res.output
    rows = {r["file"]: r for r in json.loads((toy_run / "validate.json").read_text())["rows"]}
    assert NPZ_FILES <= set(rows) and all(rows[f]["runtime"] == "numpy-layers" for f in NPZ_FILES)
    student_pt = rows["student.pt"]["test_accuracy"]
    assert rows["student_fp32.npzmodel"]["agreement_student_fp32"] == 1.0
    assert rows["student_fp32.npzmodel"]["test_accuracy"] == student_pt
    assert rows["teacher_fp32.npzmodel"]["agreement_teacher"] == 1.0

    res = runner.invoke(cli, ["bench", "--run", str(toy_run), "--runtime", "numpy-layers", "--threads", "1",
                              "--runs", "5", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads((toy_run / "report.json").read_text())
    # Each row was measured in a fresh process, which registered the format from this test's module again.
    assert {r["file"] for r in report["rows"]} == NPZ_FILES
    assert not report["skipped"] and all(r["runtime"] == "numpy-layers" for r in report["rows"])
    assert all(np.isfinite(r["p50_ms"]) and r["p50_ms"] > 0 for r in report["rows"])
    assert report["machine"]["runtimes"]["numpy-layers"] == f"numpy {np.__version__}"
    assert rows["student_fp32.npzmodel"]["test_accuracy"] == next(
        r["test_accuracy"] for r in report["rows"] if r["file"] == "student_fp32.npzmodel")


def test_a_derived_backend_is_one_module_too(tiny_run: Path, tmp_path: Path):
    """`--format npzz` alone: the plan brings its source (npzmodel) in first, derives every .npzz from its
    .npzmodel, verifies each against PyTorch and records it under its backend's name; validate runs it."""
    assert [b.name for b in resolve_plan(["npzz"], [])] == ["npzmodel", "npzz"]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    runner = CliRunner()
    res = runner.invoke(cli, ["export", "--run", str(run), "--format", "npzz", "--quantize", "fp16"])
    assert res.exit_code == 0, res.output
    made = {p.name for p in [*run.glob("*.npzmodel"), *run.glob("*.npzz")]}
    assert made == NPZ_FILES | {"student_fp32.npzz", "student_fp16.npzz"}
    entries = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    z = entries["student_fp16.npzz"]
    assert z["backend"] == "npzz" and z["source"] == "student_fp16.npzmodel" and z["precision"] == "fp16"
    assert z["verified"] is True and entries["student_fp32.npzmodel"]["backend"] == "npzmodel"
    assert z["size_bytes"] < entries["student_fp16.npzmodel"]["size_bytes"]  # it really is compressed
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student_fp32.npzz"]["parity"] < 1e-5 and metrics["student_fp32.npzz"]["backend"] == "npzz"
    assert metrics["student_fp32.npzz"]["source"] == "student_fp32.npzmodel"

    res = runner.invoke(cli, ["validate", "--run", str(run), "--runtime", "numpy-layers-z", "-q"])
    assert res.exit_code == 0, res.output
    rows = {r["file"]: r for r in json.loads((run / "validate.json").read_text())["rows"]}
    assert set(rows) == {"student_fp32.npzz", "student_fp16.npzz"}
    assert rows["student_fp32.npzz"]["test_accuracy"] == metrics["student_fp32.npzz"]["test_accuracy"]
