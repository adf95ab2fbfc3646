"""edgekd.bundle.make_bundle: exactly the files a device needs, atomic writes, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_device import BENCH, REPO, copy_run, device_run  # noqa: F401  (device_run is a fixture)
from edgekd import bundle as bundle_mod
from edgekd.bundle import BundleError, make_bundle
from edgekd.errors import EdgeKDError

EXPECTED = {"README.md", "bench.py", "eval.npz", "labels.txt", "metadata.json", "student_fp32.tflite",
            "student_fp32_nhwc.tflite", "student_int8.tflite", "student_fp32.onnx",
            # torch's dynamo exporter keeps the ONNX weights in a side file the model refers to
            "student_fp32.onnx.data"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(device_run, tmp_path_factory):
    return make_bundle(device_run.path, tmp_path_factory.mktemp("b") / "bundle")


def test_bundle_holds_exactly_what_the_device_needs(device_run, bundle):
    assert {p.name for p in bundle.iterdir()} == EXPECTED
    for name in EXPECTED - {"README.md", "bench.py"}:
        assert digest(bundle / name) == digest(device_run.path / name), name
    assert digest(bundle / "bench.py") == digest(BENCH)
    assert (bundle / "labels.txt").read_text().split() == ["zero", "one", "two"]


def test_bundle_readme_has_the_pi_commands(bundle):
    readme = (bundle / "README.md").read_text()
    assert 'pip install "numpy<2" tflite-runtime==2.14.0' in readme
    assert "python3 bench.py . --json pi.json" in readme
    assert "device-fixture" in readme and "150 samples" in readme


def test_bench_runs_from_inside_a_moved_bundle(device_run, bundle, tmp_path):
    # A copy elsewhere proves the bundle refers to nothing outside itself.
    moved = shutil.copytree(bundle, tmp_path / "on-device")
    proc = subprocess.run([sys.executable, "bench.py", ".", "--runs", "5", "--warmup", "1", "--json", "pi.json"],
                          cwd=moved, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((moved / "pi.json").read_text())
    assert {r["file"]: r["accuracy"] for r in report["results"]} == pytest.approx(device_run.expected)
    assert report["skipped"] == []


def test_default_destination_is_inside_the_run(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    out = make_bundle(run)
    assert out == run / "bundle" and {p.name for p in out.iterdir()} == EXPECTED


def test_labels_txt_is_rebuilt_from_metadata_when_absent(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "labels.txt").unlink()
    out = make_bundle(run, tmp_path / "out")
    assert (out / "labels.txt").read_text() == "zero\none\ntwo\n"


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_missing_metadata_raises_edgekd_error(tmp_path):
    with pytest.raises(BundleError) as info:
        make_bundle(tmp_path, tmp_path / "out")
    assert isinstance(info.value, EdgeKDError) and isinstance(info.value, ValueError)
    assert "metadata.json not found" in one_line(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_model_file_is_named(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "student_int8.tflite").unlink()
    with pytest.raises(BundleError, match="student_int8.tflite"):
        make_bundle(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_onnx_weights_are_named(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "student_fp32.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"student_fp32\.onnx\.data"):
        make_bundle(run, tmp_path / "out")


def test_damaged_model_is_refused(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    p = run / "student_fp32.tflite"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(BundleError, match="sha256"):
        make_bundle(run, tmp_path / "out")


def test_missing_eval_is_refused(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    (run / "eval.npz").unlink()
    with pytest.raises(BundleError, match="eval.npz"):
        make_bundle(run, tmp_path / "out")


def test_file_escaping_the_run_is_refused(device_run, tmp_path):
    run = copy_run(device_run, tmp_path / "run")
    meta = json.loads((run / "metadata.json").read_text())
    meta["models"][0]["file"] = "../elsewhere.tflite"
    (run / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="invalid 'file'"):
        make_bundle(run, tmp_path / "out")


def test_rebundling_replaces_and_a_failed_copy_keeps_the_old_bundle(device_run, tmp_path, monkeypatch):
    out = make_bundle(device_run.path, tmp_path / "out")
    before = {p.name: digest(p) for p in out.iterdir()}
    (out / "stale.txt").write_text("left over")
    out = make_bundle(device_run.path, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == EXPECTED  # stale file gone: replaced, not merged

    calls = []
    real_copy2 = shutil.copy2

    def failing_copy(src, dst, *a, **kw):
        calls.append(src)
        if len(calls) == 3:  # fail in the middle of copying the models
            raise OSError("disk full")
        return real_copy2(src, dst, *a, **kw)

    monkeypatch.setattr(bundle_mod.shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        make_bundle(device_run.path, tmp_path / "out")
    monkeypatch.undo()
    assert {p.name: digest(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_cli_prints_the_bundle_or_one_line_error(device_run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "edgekd.bundle", str(device_run.path), str(tmp_path / "b")],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == str((tmp_path / "b").resolve())
    bad = subprocess.run([sys.executable, "-m", "edgekd.bundle", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "metadata.json not found" in bad.stderr and "Traceback" not in bad.stderr
