"""The Android path: parsing real benchmark_model output, and run_android.sh end to end with a stand-in adb.

The stand-in ``adb`` runs ``push`` and ``shell`` on this machine, and the stand-in ``benchmark_model``
prints real captured output (tests/fixtures/benchmark_model, see its README for sources), so everything
between adb and the JSON report is the real code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_device import REPO, device_run  # noqa: F401  (device_run is a fixture)
from edgekd.bundle import make_bundle

ANDROID = REPO / "device_tests" / "android"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmark_model"

_spec = importlib.util.spec_from_file_location("parse_benchmark_model", ANDROID / "parse_benchmark_model.py")
pbm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pbm)


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


# ---------------------------------------------------------------------------------------------- parser


def test_parse_phone_cpu_run():
    p = pbm.parse(fixture_text("mi11_yolov5s_fp32_cpu.txt"))
    assert p["ok"] is True
    assert (p["init_us"], p["first_inference_us"], p["warmup_avg_us"], p["inference_avg_us"]) == \
        (1430, 247583, 222136, 220000)
    assert (p["count"], p["min_us"], p["max_us"], p["std_us"]) == (50, 206675, 231957, 6795)
    assert (p["memory_init_mb"], p["memory_overall_mb"]) == (5.66016, 140.508)


def test_parse_fractional_average():
    p = pbm.parse(fixture_text("mi11_yolov5s_fp32_nnapi_fp16.txt"))
    assert p["inference_avg_us"] == pytest.approx(99646.2) and p["avg_us"] == pytest.approx(99646.2)


def test_parse_failed_delegate_reports_the_cause():
    p = pbm.parse(fixture_text("mi11_yolov5s_int8_nnapi_failed.txt"))
    assert p["ok"] is False
    assert "ANEURALNETWORKS_BAD_DATA" in p["error"] and "Benchmarking failed" in p["error"]
    assert p["threads"] == 4 and p["graph"] == "/data/local/tmp/yolov5s_tflite_int8.tflite"


def test_parse_prefixed_lines_version_and_delegation():
    p = pbm.parse(fixture_text("synap_vs640_nnapi_mobilenet_v1_quant.txt"))
    assert p["ok"] and p["tf_version"] == "2.15.0"
    assert (p["delegated_nodes"], p["total_nodes"], p["delegate"]) == (31, 31, "TfLiteNnapiDelegate")
    # The warm-up line "count=1 curr=637079" has no average; the steady-state line is the one used.
    assert (p["count"], p["avg_us"], p["inference_avg_us"]) == (520, 1885.74, 1885.74)
    assert p["session_init_ms"] == pytest.approx(66.002)


def test_parse_scientific_notation_and_ignores_op_profiling_timings():
    p = pbm.parse(fixture_text("riscv64_qemu_mobilenet_v1_op_profiling.txt"))
    assert p["inference_avg_us"] == pytest.approx(2.95034e6)
    assert p["warmup_avg_us"] == pytest.approx(3.51239e6)
    # The op-profiling "Timings (microseconds): count=50 ... avg=2.9499e+06" after the summary is not
    # the end-to-end statistics line.
    assert p["avg_us"] == pytest.approx(2.95034e6) and p["min_us"] == 2727568 and p["count"] == 50
    assert p["threads"] == 4 and p["graph"] == "./mobilenet_v1_1.0_224.tflite"


def test_parse_logcat_prefixes():
    """The Android benchmark app logs through logcat; the same lines carry a timestamp and tag there."""
    prefix = "07-14 13:14:52.097 22838 22838 I tflite  : "
    text = "".join(prefix + line + "\n" for line in fixture_text("mi11_yolov5s_fp32_cpu.txt").splitlines())
    assert pbm.parse(text) == pbm.parse(fixture_text("mi11_yolov5s_fp32_cpu.txt"))


def test_parse_percentiles_when_present():
    # Constructed: the real Mi11 statistics line with the percentile fields newer releases append (no
    # published capture with them was found).
    text = fixture_text("mi11_yolov5s_fp32_cpu.txt").replace(
        "std=6795", "std=6795 p5=207001 median=219876 p95=229950")
    row = pbm.to_result(pbm.parse(text), {"file": "m.tflite", "precision": "fp32"}, "cpu", 4)
    assert (row["p5_ms"], row["p50_ms"], row["p95_ms"]) == (207.001, 219.876, 229.95)
    assert row["p90_ms"] is None and row["p99_ms"] is None


def test_parse_garbage_is_not_ok():
    p = pbm.parse("/system/bin/sh: benchmark_model: not found\n")
    assert p["ok"] is False and "not found" not in p.get("graph", "")
    assert p["error"]


def test_result_row_is_in_milliseconds():
    row = pbm.to_result(pbm.parse(fixture_text("mi11_yolov5s_fp32_cpu.txt")),
                        {"file": "sub/student_fp32.tflite", "precision": "fp32"}, "xnnpack", 4)
    assert row["model"] == "student_fp32" and row["accuracy"] is None
    assert (row["mean_ms"], row["min_ms"], row["max_ms"], row["init_ms"], row["first_inference_ms"]) == \
        (220.0, 206.675, 231.957, 1.43, 247.583)
    assert row["p50_ms"] is None and row["runs"] == 50 and row["delegate"] == "xnnpack"
    assert row["runtime"] == "benchmark_model" and row["emulated"] is False


# ------------------------------------------------------------------------------------------ end to end


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def phone(tmp_path):
    """Stand-ins for adb, getprop and benchmark_model, and a folder acting as the phone's storage."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "adb.log"
    write_exe(bin_dir / "adb", f"""#!/bin/sh
# Stand-in adb: performs push and shell on this machine.
echo "$*" >> "{log}"
if [ "$1" = "-s" ]; then shift 2; fi
cmd="$1"; shift
case "$cmd" in
  get-state) echo "${{FAKE_ADB_STATE:-device}}"; [ "${{FAKE_ADB_STATE:-device}}" = device ] ;;
  push) cp "$1" "$2" ;;
  shell) exec sh -c "$*" ;;
  *) echo "stand-in adb: unsupported command $cmd" >&2; exit 1 ;;
esac
""")
    write_exe(bin_dir / "getprop", """#!/bin/sh
case "$1" in
  ro.product.manufacturer) echo Xiaomi ;;
  ro.product.model) echo "Mi 11" ;;
  ro.product.cpu.abi) echo arm64-v8a ;;
  ro.soc.manufacturer) echo QTI ;;
  ro.soc.model) echo SM8350 ;;
  ro.build.version.release) echo 13 ;;
  ro.build.version.sdk) echo 33 ;;
  *) echo ;;
esac
""")
    args_log = tmp_path / "benchmark_model.args"
    binary = write_exe(tmp_path / "benchmark_model", f"""#!/bin/sh
# Stand-in benchmark_model: prints real captured output; the int8 model gets the captured delegate failure.
echo "$*" >> "{args_log}"
case "$*" in
  *student_int8*) cat "{FIXTURES / 'mi11_yolov5s_int8_nnapi_failed.txt'}"; exit 1 ;;
  *) cat "{FIXTURES / 'mi11_yolov5s_fp32_cpu.txt'}" ;;
esac
""")
    remote = tmp_path / "phone" / "data" / "local" / "tmp" / "edgekd"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return {"env": env, "binary": binary, "remote": remote, "adb_log": log, "args_log": args_log}


def run_android(bundle: Path, phone: dict, *args: str, env=None):
    cmd = ["bash", str(ANDROID / "run_android.sh"), "--benchmark-model", str(phone["binary"]),
           "--remote-dir", str(phone["remote"]), *args, str(bundle)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or phone["env"], timeout=120)


def test_run_android_end_to_end(device_run, phone, tmp_path):
    bundle = make_bundle(device_run.path, tmp_path / "bundle")
    out = tmp_path / "android.json"
    proc = run_android(bundle, phone, "--threads", "2", "--runs", "30", "--warmup", "3",
                       "--cpu-mask", "1", "--serial", "ABC123", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())

    # Every .tflite was pushed byte for byte, with the binary; the ONNX model was not.
    pushed = sorted(p.name for p in phone["remote"].iterdir())
    assert pushed == ["benchmark_model", "student_fp32.tflite", "student_fp32_nhwc.tflite", "student_int8.tflite"]
    for name in pushed[1:]:
        assert (phone["remote"] / name).read_bytes() == (bundle / name).read_bytes()
    assert all(line.startswith("-s ABC123 ") for line in phone["adb_log"].read_text().splitlines())

    # benchmark_model got the requested flags for each model.
    calls = phone["args_log"].read_text().splitlines()
    assert len(calls) == 3
    for call in calls:
        for flag in ("--num_threads=2", "--num_runs=30", "--warmup_runs=3", "--use_xnnpack=true"):
            assert flag in call.split(), call
    assert any(f"--graph={phone['remote']}/student_fp32.tflite" in c for c in calls)

    dev = report["device"]
    # The stand-in phone's `adb shell nproc` is this machine's nproc, which honours OMP_NUM_THREADS: compare with
    # what it prints in the same environment, not with os.cpu_count().
    nproc = int(subprocess.run(["nproc"], env=phone["env"], capture_output=True, text=True, check=True).stdout)
    assert dev == {"machine": "arm64-v8a", "cpu_model": "QTI SM8350", "cores": nproc,
                   "os": "Android 13 (API 33)", "model": "Xiaomi Mi 11", "python": None,
                   "runtime": "benchmark_model", "runtime_version": "unknown", "emulated": False}
    rows = {r["file"]: r for r in report["results"]}
    assert sorted(rows) == ["student_fp32.tflite", "student_fp32_nhwc.tflite"]
    for row in rows.values():
        assert row["mean_ms"] == 220.0 and row["runs"] == 50 and row["delegate"] == "xnnpack"
        assert row["accuracy"] is None and row["threads"] == 2 and row["precision"] == "fp32"
    (skip,) = report["skipped"]
    assert skip["file"] == "student_int8.tflite" and "ANEURALNETWORKS_BAD_DATA" in skip["reason"]
    assert "student_int8" in proc.stdout and "220.000" in proc.stdout


def test_run_android_several_delegates(device_run, phone, tmp_path):
    bundle = make_bundle(device_run.path, tmp_path / "bundle")
    out = tmp_path / "android.json"
    proc = run_android(bundle, phone, "--delegate", "gpu", "--delegate", "nnapi", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    calls = phone["args_log"].read_text().splitlines()
    assert sum("--use_gpu=true" in c for c in calls) == 3 and sum("--use_nnapi=true" in c for c in calls) == 3
    report = json.loads(out.read_text())
    assert sorted((r["file"], r["delegate"]) for r in report["results"]) == [
        ("student_fp32.tflite", "gpu"), ("student_fp32.tflite", "nnapi"),
        ("student_fp32_nhwc.tflite", "gpu"), ("student_fp32_nhwc.tflite", "nnapi")]


def test_run_android_without_a_device_is_one_line(device_run, phone, tmp_path):
    bundle = make_bundle(device_run.path, tmp_path / "bundle")
    proc = run_android(bundle, phone, env=dict(phone["env"], FAKE_ADB_STATE="unauthorized"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "run_android.sh: error: no Android device ready (adb get-state said 'unauthorized'): "
        "connect one and allow USB debugging"]


def test_run_android_without_the_binary_is_one_line(device_run, phone, tmp_path):
    bundle = make_bundle(device_run.path, tmp_path / "bundle")
    phone["binary"] = tmp_path / "missing" / "benchmark_model"
    proc = run_android(bundle, phone)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "benchmark_model binary not found" in proc.stderr


def test_parser_cli_prints_json():
    proc = subprocess.run([sys.executable, str(ANDROID / "parse_benchmark_model.py"),
                           str(FIXTURES / "mi11_yolov5s_fp32_cpu.txt")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0
    parsed = json.loads(proc.stdout)
    assert parsed[str(FIXTURES / "mi11_yolov5s_fp32_cpu.txt")]["inference_avg_us"] == 220000
