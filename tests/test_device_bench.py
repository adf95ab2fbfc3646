"""device_tests/bench.py on a real run directory with the real runtimes (ai_edge_litert, onnxruntime), and
the emulated Raspberry Pi run (slow).

tflite_runtime is not exercised on the host: its only x86_64 wheel for Python 3.11 (2.14.0) is built
against numpy 1.x and the project environment has numpy 2. The emulated-Pi test runs it on aarch64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest_device import BENCH, REPO, copy_run, device_run  # noqa: F401  (device_run is a fixture)

RESULT_KEYS = {"model", "file", "format", "precision", "accuracy", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
               "threads", "runtime", "emulated"}
DEVICE_KEYS = {"machine", "cpu_model", "cores", "os", "python", "runtime", "runtime_version", "emulated"}


def run_bench(run_dir, *args, python=None, env=None, cwd=None, timeout=120):
    """Run bench.py as a user would; returns the CompletedProcess."""
    cmd = [python or sys.executable, str(BENCH), str(run_dir), "--runs", "20", "--warmup", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def bench_json(run_dir, tmp_path, *args, **kw):
    out = tmp_path / "report.json"
    proc = run_bench(run_dir, "--json", str(out), *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("runtime, files, runtime_name", [
    ("tflite", ["student_fp32.tflite", "student_fp32_nhwc.tflite", "student_int8.tflite"], "ai_edge_litert"),
    ("onnx", ["student_fp32.onnx"], "onnxruntime"),
    ("auto", ["student_fp32.tflite", "student_fp32_nhwc.tflite", "student_int8.tflite", "student_fp32.onnx"],
     None),
])
def test_accuracy_matches_reference(device_run, tmp_path, runtime, files, runtime_name):
    report = bench_json(device_run.path, tmp_path, "--runtime", runtime)
    measured = {r["file"]: r for r in report["results"]}
    assert sorted(measured) == sorted(files)
    for f in files:
        # fp32 files must agree with torch exactly (the fixture keeps only confident samples); the int8
        # file with a direct LiteRT computation that quantizes with the interpreter's own parameters.
        assert measured[f]["accuracy"] == pytest.approx(device_run.expected[f], abs=1e-9), f
        # Integer models also get the accuracy with TFLite's built-in kernels; float models do not.
        if f in device_run.expected_builtin:
            assert measured[f]["accuracy_builtin"] == pytest.approx(device_run.expected_builtin[f], abs=1e-9)
            assert 0 <= measured[f]["differs_from_builtin"] <= measured[f]["n_eval"]
        else:
            assert "accuracy_builtin" not in measured[f], f
    assert device_run.torch_accuracy == pytest.approx(0.8)
    if runtime_name:
        assert {r["runtime"] for r in report["results"]} == {runtime_name}
    else:
        assert {r["runtime"] for r in report["results"]} == {"ai_edge_litert", "onnxruntime"}
    # Models of the other format are reported, not silently dropped.
    skipped = {s["file"] for s in report["skipped"]}
    assert skipped == set(device_run.files) - set(files)


def test_report_schema(device_run, tmp_path):
    report = bench_json(device_run.path, tmp_path, "--threads", "1", "--runs", "30")
    assert DEVICE_KEYS <= set(report["device"])
    dev = report["device"]
    assert dev["emulated"] is False and dev["cores"] == os.cpu_count()
    assert dev["machine"] and dev["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["run"] == "device-fixture"
    for r in report["results"]:
        assert RESULT_KEYS <= set(r), set(RESULT_KEYS) - set(r)
        assert r["model"] == Path(r["file"]).stem
        assert r["threads"] == 1 and r["runs"] == 30 and r["emulated"] is False
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["min_ms"] <= r["mean_ms"] <= r["max_ms"]
    precision = {r["file"]: r["precision"] for r in report["results"]}
    assert precision["student_int8.tflite"] == "int8"
    # The table on stdout names every measured model.
    proc = run_bench(device_run.path)
    for r in report["results"]:
        assert r["model"] in proc.stdout


def test_emulated_flag_is_recorded(device_run, tmp_path):
    report = bench_json(device_run.path, tmp_path, "--runtime", "tflite", "--emulated")
    assert report["device"]["emulated"] is True
    assert all(r["emulated"] is True for r in report["results"])


def test_max_eval_limits_the_samples(device_run, tmp_path):
    report = bench_json(device_run.path, tmp_path, "--runtime", "onnx", "--max-eval", "10")
    (row,) = report["results"]
    assert row["n_eval"] == 10


def test_wrong_normalization_changes_accuracy(device_run, tmp_path):
    """The accuracy check above can fail: the same models with misstated statistics score differently."""
    run = copy_run(device_run, tmp_path / "run")
    meta = json.loads((run / "metadata.json").read_text())
    for m in meta["models"]:
        m["normalization"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (run / "metadata.json").write_text(json.dumps(meta))
    report = bench_json(run, tmp_path, "--runtime", "tflite")
    fp32 = next(r for r in report["results"] if r["file"] == "student_fp32.tflite")
    assert abs(fp32["accuracy"] - device_run.expected["student_fp32.tflite"]) > 0.05


def test_layout_mismatch_is_skipped_with_reason(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    meta = json.loads((run / "metadata.json").read_text())
    nhwc = next(m for m in meta["models"] if m["file"] == "student_fp32_nhwc.tflite")
    nhwc["input"]["layout"] = "NCHW"
    (run / "metadata.json").write_text(json.dumps(meta))
    report = bench_json(run, tmp_path, "--runtime", "tflite")
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "does not match" in skipped["student_fp32_nhwc.tflite"]
    assert {r["file"] for r in report["results"]} == {"student_fp32.tflite", "student_int8.tflite"}


def test_malformed_entries_are_skipped_without_traceback(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    meta = json.loads((run / "metadata.json").read_text())
    by_file = {m["file"]: m for m in meta["models"]}
    by_file["student_fp32.tflite"]["normalization"] = {"mean": [0.1, 0.2], "std": [1.0, 1.0]}  # 2 of 3
    del by_file["student_int8.tflite"]["input"]["quantization"]["scale"]
    (run / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "r.json"
    proc = run_bench(run, "--runtime", "tflite", "--json", str(out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    skipped = {s["file"]: s["reason"] for s in json.loads(out.read_text())["skipped"]}
    assert "broadcast" in skipped["student_fp32.tflite"] and "scale" in skipped["student_int8.tflite"]


def test_truncated_model_is_skipped_and_others_measured(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    path = run / "student_int8.tflite"
    path.write_bytes(path.read_bytes()[:1000])
    report = bench_json(run, tmp_path)
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert list(skipped) == ["student_int8.tflite"]
    assert "truncated" in skipped["student_int8.tflite"]
    assert len(report["results"]) == 3


def test_changed_model_fails_its_checksum(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    path = run / "student_fp32.tflite"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    report = bench_json(run, tmp_path, "--runtime", "tflite")
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "sha256" in skipped["student_fp32.tflite"]


def test_corrupt_model_without_checksums_is_rejected_by_the_runtime(device_run, tmp_path):
    """With no size or sha256 recorded, the runtimes themselves must reject damaged files cleanly."""
    run = copy_run(device_run, tmp_path / "run")
    meta = json.loads((run / "metadata.json").read_text())
    for m in meta["models"]:
        m.pop("sha256"), m.pop("size_bytes")
    (run / "metadata.json").write_text(json.dumps(meta))
    for name in ("student_fp32.tflite", "student_fp32.onnx"):
        p = run / name
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    report = bench_json(run, tmp_path)
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"student_fp32.tflite", "student_fp32.onnx"}
    assert all("cannot load" in reason for reason in skipped.values())
    assert {r["file"] for r in report["results"]} == {"student_fp32_nhwc.tflite", "student_int8.tflite"}


def test_every_model_skipped_exits_1(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "student_fp32.onnx").write_bytes(b"not a model")
    proc = run_bench(run, "--runtime", "onnx")
    assert proc.returncode == 1
    assert "no model could be measured" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_metadata_is_one_line_exit_2(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "metadata.json").unlink()
    assert_one_line_error(run_bench(run), "metadata.json not found")


def test_invalid_metadata_is_one_line_exit_2(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "metadata.json").write_text("{not json")
    assert_one_line_error(run_bench(run), "not valid JSON")


def test_missing_eval_is_one_line_exit_2(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "eval.npz").unlink()
    assert_one_line_error(run_bench(run), "eval.npz not found")


def test_damaged_eval_is_one_line_exit_2(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "eval.npz").write_bytes(b"PK\x03\x04 broken")
    assert_one_line_error(run_bench(run), "eval.npz cannot be read")


def test_not_a_directory_is_one_line_exit_2(tmp_path):
    assert_one_line_error(run_bench(tmp_path / "nope"), "not a directory")


@pytest.fixture
def numpy_only_path(tmp_path):
    """A PYTHONPATH holding numpy and nothing else; with ``python -S`` no runtime can be imported."""
    site = tmp_path / "numpy-only"
    site.mkdir()
    pkg = Path(np.__file__).resolve().parent
    os.symlink(pkg, site / "numpy")
    libs = pkg.parent / "numpy.libs"
    if libs.is_dir():
        os.symlink(libs, site / "numpy.libs")
    return site


@pytest.mark.parametrize("runtime, needle", [("tflite", "pip install"), ("onnx", "onnxruntime"),
                                             ("auto", "no inference runtime")])
def test_runtime_not_installed_is_one_line_exit_2(device_run, numpy_only_path, runtime, needle):
    env = dict(os.environ, PYTHONPATH=str(numpy_only_path))
    cmd = [sys.executable, "-S", str(BENCH), str(device_run.path), "--runtime", runtime]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(proc, needle)


def test_numpy_not_installed_is_one_line_exit_2(device_run, tmp_path):
    proc = subprocess.run([sys.executable, "-S", str(BENCH), str(device_run.path)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=""), timeout=60)
    assert_one_line_error(proc, "numpy is not installed")


# ------------------------------------------------------------------------------------------ emulated Pi


def _pi_tools_missing() -> str | None:
    missing = [t for t in ("qemu-aarch64-static", "debootstrap") if shutil.which(t) is None]
    if missing:
        return "needs " + " and ".join(missing) + " (apt-get install qemu-user-static debootstrap; CI installs them)"
    if os.geteuid() != 0:
        return "needs root (debootstrap and chroot)"
    return None


@pytest.mark.parametrize("script", ["device_tests/emulate_pi.sh", ".ci/emulated_pi.sh"])
def test_emulation_scripts_reject_a_folder_without_metadata(script, tmp_path):
    proc = subprocess.run([str(REPO / script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, "metadata.json not found")


@pytest.mark.slow
@pytest.mark.skipif(_pi_tools_missing() is not None, reason=str(_pi_tools_missing()))
def test_emulated_pi_gives_host_accuracy(device_run, tmp_path):
    out = tmp_path / "pi.json"
    proc = subprocess.run([str(REPO / "device_tests" / "emulate_pi.sh"), "--runs", "10", "--warmup", "1",
                           "--json", str(out), str(device_run.path)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    dev = report["device"]
    assert dev["machine"] == "aarch64" and dev["emulated"] is True
    assert dev["runtime"] == "tflite_runtime" and dev["runtime_version"] == "2.14.0"
    assert dev["python"].startswith("3.11.") and "qemu" in dev["emulator"]
    measured = {r["file"]: r for r in report["results"]}
    tflite = [f for f in device_run.files if f.endswith(".tflite")]
    assert sorted(measured) == sorted(tflite)
    for f in tflite:
        if f in device_run.expected_builtin:
            # int8 arithmetic of the built-in kernels is the same on aarch64 as on this host, bit for bit.
            assert measured[f]["accuracy_builtin"] == pytest.approx(device_run.expected_builtin[f], abs=1e-9), f
        else:
            assert measured[f]["accuracy"] == pytest.approx(device_run.expected[f], abs=1e-9), f
        assert measured[f]["emulated"] is True
    assert [s["file"] for s in report["skipped"]] == ["student_fp32.onnx"]


@pytest.mark.slow
@pytest.mark.skipif(_pi_tools_missing() is not None, reason=str(_pi_tools_missing()))
def test_ci_emulated_pi_step_compares_host_and_pi(device_run):
    proc = subprocess.run([str(REPO / ".ci" / "emulated_pi.sh"), str(device_run.path)], capture_output=True,
                          text=True, timeout=1500, env=dict(os.environ, EDGEKD_PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0].endswith(".tflite")}
    assert sorted(rows) == sorted(f for f in device_run.files if f.endswith(".tflite"))
    for f, cols in rows.items():
        # file, host tflite-runtime 2.14 (x86), emulated Pi, compared on (2 words), verdict, host ai-edge-litert
        assert cols[1] == cols[2] and cols[5] == "same", cols
        assert cols[3] == ("built-in" if f in device_run.expected_builtin else "default"), cols
        if f not in device_run.expected_builtin:  # float files: what torch computed, in every runtime
            assert cols[1] == cols[6] == f"{device_run.expected[f]:.6f}", cols
    assert "host x86_64: tflite_runtime 2.14.0; emulated Pi aarch64: tflite_runtime 2.14.0" in proc.stdout
    assert f"{len(rows)} of {len(rows)} .tflite files give exactly the host's accuracy" in proc.stdout


# -- the three device runtimes against `edgekd validate` -------------------------------------------------------

def _tflite_runtime_python(base: Path) -> Path:
    """A venv with the x86_64 wheels of tflite-runtime 2.14 and numpy<2 (what that wheel was built against)."""
    venv = base / "tflite-runtime-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy<2", "tflite-runtime==2.14.0"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"cannot install tflite-runtime 2.14 from the package index: {proc.stderr.strip()[-300:]}")
    return py


@pytest.mark.slow
def test_bench_with_each_runtime_gives_the_accuracies_of_edgekd_validate(tiny_run, tmp_path_factory, tmp_path):
    """bench.py with ai_edge_litert, tflite_runtime and onnxruntime measures what `edgekd validate` measured."""
    from click.testing import CliRunner

    from edgekd.cli import cli
    from test_validate import exported_tiny_run

    run = tmp_path / "run"
    shutil.copytree(exported_tiny_run(tiny_run, tmp_path_factory), run)
    res = CliRunner().invoke(cli, ["validate", "--run", str(run), "-q"])
    assert res.exit_code == 0, res.output
    validated = {(r["file"], r["runtime"]): r["test_accuracy"]
                 for r in json.loads((run / "validate.json").read_text())["rows"]}
    files = sorted({f for f, _ in validated if not f.endswith(".pt")})
    assert any(f.endswith(".tflite") for f in files) and any(f.endswith(".onnx") for f in files)

    litert_py = _tflite_runtime_python(tmp_path_factory.getbasetemp())
    reports = {
        "ai_edge_litert": bench_json(run, tmp_path, "--runtime", "tflite"),
        "onnxruntime": bench_json(run, tmp_path, "--runtime", "onnx"),
        "tflite_runtime": bench_json(run, tmp_path, "--runtime", "tflite", python=str(litert_py)),
    }
    for name, report in reports.items():
        assert {r["runtime"] for r in report["results"]} == {name}, name
    for f in files:
        fmt, runtime = ("onnx", "onnxruntime") if f.endswith(".onnx") else ("tflite", "litert")
        names = ["onnxruntime"] if fmt == "onnx" else ["ai_edge_litert", "tflite_runtime"]
        for name in names:
            measured = {r["file"]: r for r in reports[name]["results"]}
            assert f in measured, (name, f, reports[name]["skipped"])
            # bench.py rounds to 6 decimals. Integer files in tflite-runtime 2.14 (validate uses ai-edge-litert
            # 2.x): the two releases round int8 requantization differently, measured to flip one sample of this
            # near-chance tiny model; float files and the same runtime must agree exactly.
            integer = measured[f]["precision"] in ("int8", "dynamic") and name == "tflite_runtime"
            tol = 1 / measured[f]["n_eval"] + 1e-6 if integer else 1e-6
            assert measured[f]["accuracy"] == pytest.approx(validated[(f, runtime)], abs=tol), (name, f)
