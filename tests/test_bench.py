"""edgekd bench: statistics, per-process measurements in three runtimes, report.json, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_validate import STUDENT_FILES, exported_tiny_run

from edgekd.bench import latency_stats, parse_threads
from edgekd.runtimes.targets import parse_runtimes
from edgekd.cli import cli
from edgekd.errors import EdgeKDError
from edgekd.run_dir import RunDir

ROW_KEYS = {"model", "file", "source_model", "runtime", "format", "precision", "threads", "batch", "load_ms",
            "first_inference_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "runs",
            "throughput_ips", "peak_rss_mb", "model_rss_mb", "size_bytes", "params", "macs", "test_accuracy"}


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory) -> Path:
    return exported_tiny_run(tiny_run, tmp_path_factory)


@pytest.fixture
def run_copy(exported: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(exported, dst)
    return dst


def test_latency_stats_on_a_known_sequence():
    # 1, 2, ..., 100 ms in shuffled order: linear-interpolation percentiles are exact here.
    times = np.random.default_rng(0).permutation(np.arange(1, 101)) / 1e3
    s = latency_stats(times)
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["std_ms"] == pytest.approx(math.sqrt((100**2 - 1) / 12))  # population std of 1..n
    assert (s["min_ms"], s["max_ms"], s["runs"]) == (pytest.approx(1.0), pytest.approx(100.0), 100)
    one = latency_stats([0.002])
    assert one["p50_ms"] == one["p99_ms"] == pytest.approx(2.0) and one["std_ms"] == 0
    # A long tail moves p99 and the mean but not the median.
    tail = latency_stats([0.001] * 98 + [0.1, 0.1])
    assert tail["p50_ms"] == pytest.approx(1.0) and tail["p99_ms"] == pytest.approx(100.0)
    assert tail["mean_ms"] == pytest.approx(2.98)
    with pytest.raises(EdgeKDError):
        latency_stats([])


def test_thread_and_runtime_arguments():
    assert parse_threads("1,2") == [1, 2]
    assert parse_threads(" 4 , 1,4") == [4, 1]
    assert parse_threads([2]) == [2]
    for bad in ("0", "1,-2", "x", "", ","):
        with pytest.raises(EdgeKDError):
            parse_threads(bad)
    assert parse_runtimes("litert,torch") == ["litert", "torch"]
    assert parse_runtimes(None) is None
    with pytest.raises(EdgeKDError, match="unknown runtime 'tflite'"):
        parse_runtimes("tflite")


def test_bench_measures_each_model_in_each_runtime(run_copy: Path):
    res = CliRunner().invoke(cli, ["bench", "--run", str(run_copy), "--threads", "1", "--runs", "30",
                                   "--warmup", "3"])
    assert res.exit_code == 0, res.output
    report = json.loads((run_copy / "report.json").read_text())
    rows = report["rows"]
    assert {r["runtime"] for r in rows} == {"torch", "onnxruntime", "litert"}
    # The scratch baseline has the student's architecture: not measured twice.
    assert {r["file"] for r in rows} == {"teacher.pt", "student.pt", *STUDENT_FILES, "teacher_fp32.onnx",
                                         "teacher_fp32.tflite"}
    metrics = json.loads((run_copy / "metrics.json").read_text())
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["runs"] == 30 and r["threads"] == 1 and r["batch"] == 1
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["load_ms"] > 0 and r["first_inference_ms"] > 0 and r["peak_rss_mb"] > 0
        assert r["throughput_ips"] == pytest.approx(1000 / r["mean_ms"], rel=1e-3)
        extra = run_copy / (r["file"] + ".data")
        assert r["size_bytes"] == (run_copy / r["file"]).stat().st_size + (extra.stat().st_size if extra.exists() else 0)
        assert r["params"] == metrics[r["source_model"]]["params"] and r["macs"] == metrics[r["source_model"]]["macs"]
        assert r["test_accuracy"] is None  # validate has not run on this copy
        assert r["model"] == Path(r["file"]).stem
    # Each measurement ran in its own process: PyTorch's libraries make its peak RSS far larger than LiteRT's.
    by_file = {r["file"]: r for r in rows}
    assert by_file["student.pt"]["peak_rss_mb"] > by_file["student_fp32.tflite"]["peak_rss_mb"] + 50
    assert report["settings"]["runs"] == 30 and "VmHWM" in report["settings"]["rss_method"]
    assert metrics["student_fp32.tflite"]["latency"]["litert/1t"]["p50_ms"] == by_file["student_fp32.tflite"]["p50_ms"]
    assert RunDir(run_copy).stage_status("bench") == "done"
    assert "student_fp32.tflite" in res.output and "p50_ms" in res.output


def test_bench_threads_seconds_batch_and_accuracy(run_copy: Path):
    runner = CliRunner()
    assert runner.invoke(cli, ["validate", "--run", str(run_copy), "-q", "--runtime", "litert"]).exit_code == 0
    meta = json.loads((run_copy / "metadata.json").read_text())
    (run_copy / "metadata.json").write_text(json.dumps({**meta, "models": [
        e for e in meta["models"] if e["file"] in ("student_fp32.tflite", "student_int8.tflite")]}))
    RunDir(run_copy).record_artifacts("metadata.json")  # an edit the run knows of, not tampering
    res = runner.invoke(cli, ["bench", "--run", str(run_copy), "--runtime", "litert", "--threads", "1,2",
                              "--seconds", "0.2", "--batch", "4", "--warmup", "0", "-q"])
    assert res.exit_code == 0, res.output
    rows = json.loads((run_copy / "report.json").read_text())["rows"]
    assert sorted((r["file"], r["threads"]) for r in rows) == [
        ("student_fp32.tflite", 1), ("student_fp32.tflite", 2), ("student_int8.tflite", 1), ("student_int8.tflite", 2)]
    validation = {r["file"]: r for r in json.loads((run_copy / "validate.json").read_text())["rows"]}
    # The typed results read and write exactly the files' JSON (other tools read those keys).
    from edgekd.results import BenchReport, ValidationResult

    for cls, name in ((BenchReport, "report.json"), (ValidationResult, "validate.json")):
        data = json.loads((run_copy / name).read_text())
        assert cls.read(RunDir(run_copy)).to_json() == data and list(cls.from_json(data).to_json()) == list(data)
    for r in rows:
        assert r["batch"] == 4 and r["runs"] >= 10
        # --seconds: the timed loop stops once the time is up (a loaded machine adds slack, not 10x).
        assert r["runs"] * r["mean_ms"] / 1e3 < 2.0
        assert r["throughput_ips"] == pytest.approx(4000 / r["mean_ms"], rel=1e-3)
        assert r["test_accuracy"] == validation[r["file"]]["test_accuracy"]


def test_bench_set_overrides_the_run_recipe_and_options_win(run_copy: Path):
    runner = CliRunner()
    args = ["bench", "--run", str(run_copy), "--runtime", "onnxruntime", "--threads", "1", "-q"]
    res = runner.invoke(cli, [*args, "--set", "bench.runs=7", "--set", "bench.warmup=1"])
    assert res.exit_code == 0, res.output
    report = json.loads((run_copy / "report.json").read_text())
    assert report["settings"]["runs"] == 7 and report["settings"]["warmup"] == 1
    assert {r["runs"] for r in report["rows"]} == {7}
    res = runner.invoke(cli, [*args, "--set", "bench.runs=7", "--runs", "9", "--warmup", "0"])
    assert res.exit_code == 0, res.output
    assert {r["runs"] for r in json.loads((run_copy / "report.json").read_text())["rows"]} == {9}
    for extra, msg in ((["--set", "bench.rnus=3"], "did you mean 'bench.runs'?"),
                       (["--set", "distill.lr=1"], "`edgekd bench` reads only the recipe's 'bench' section"),
                       (["--set", "bench.runs=-1"], "bench.runs")):
        res = runner.invoke(cli, [*args, *extra])
        assert res.exit_code == 2 and res.output.startswith("error: ") and msg in res.output, res.output
        assert res.output.count("\n") == 1


def test_bench_bad_input_exits_2_without_writing(run_copy: Path, tmp_path: Path):
    runner = CliRunner()
    cases = [(["--threads", "0"], "--threads must be positive"),
             (["--threads", "-1,2"], "--threads must be positive"),
             (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'"),
             (["--runs", "10", "--seconds", "1"], "--runs or --seconds, not both"),
             (["--runs", "0"], "--runs must be positive"),
             (["--batch", "0"], "--batch must be positive")]
    for args, msg in cases:
        res = runner.invoke(cli, ["bench", "--run", str(run_copy), *args])
        assert res.exit_code == 2, (args, res.output)
        assert res.output.count("\n") == 1 and msg in res.output and res.output.startswith("error: ")
    assert not (run_copy / "report.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("manifest.json", "data.json", "eval.npz"):
        shutil.copy(run_copy / name, empty / name)
    res = runner.invoke(cli, ["bench", "--run", str(empty)])
    assert res.exit_code == 2 and "holds no models" in res.output
    assert not (empty / "report.json").exists()


def test_a_model_that_cannot_run_is_skipped_with_its_reason(run_copy: Path):
    from edgekd.run_dir import sha256_file

    (run_copy / "teacher_fp32.tflite").write_bytes(b"not a flatbuffer at all")
    # Recorded as written (a file the runtime cannot load), so the tamper check lets it through to the runtime.
    meta = json.loads((run_copy / "metadata.json").read_text())
    for e in meta["models"]:
        if e["file"] == "teacher_fp32.tflite":
            e["sha256"] = sha256_file(run_copy / "teacher_fp32.tflite")
    (run_copy / "metadata.json").write_text(json.dumps(meta))
    RunDir(run_copy).record_artifacts("teacher_fp32.tflite", "metadata.json")
    res = CliRunner().invoke(cli, ["bench", "--run", str(run_copy), "--runtime", "litert", "--threads", "1",
                                   "--runs", "5", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((run_copy / "report.json").read_text())
    assert sorted(r["file"] for r in report["rows"]) == sorted(f for f in STUDENT_FILES if f.endswith(".tflite"))
    assert report["skipped"][0]["file"] == "teacher_fp32.tflite" and "LiteRT cannot load" in report["skipped"][0]["reason"]


def test_a_changed_model_fails_bench_before_measuring(run_copy: Path):
    data = (run_copy / "student_int8.tflite").read_bytes()
    (run_copy / "student_int8.tflite").write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(cli, ["bench", "--run", str(run_copy), "--runtime", "litert", "--threads", "1",
                                   "--runs", "5", "-q"])
    assert res.exit_code == 1, res.output
    assert "student_int8.tflite changed since it was written" in res.output and "re-run `edgekd export`" in res.output
    assert not (run_copy / "report.json").exists()
