"""edgekd report: report.md and a self-contained report.html with plots, statements and device rows."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_validate import exported_tiny_run

from edgekd.cli import cli
from edgekd.report import pareto_front, quantization_findings, _quant_sentence
from edgekd.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def measured(tiny_run: Path, tmp_path_factory) -> Path:
    """The exported tiny run after validate and a short bench (read-only: copy it to change it)."""
    src = exported_tiny_run(tiny_run, tmp_path_factory)
    run = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(src, run)
    runner = CliRunner()
    assert runner.invoke(cli, ["validate", "--run", str(run), "-q"]).exit_code == 0
    res = runner.invoke(cli, ["bench", "--run", str(run), "--threads", "1", "--runs", "20", "--warmup", "2", "-q"])
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture
def run_copy(measured: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(measured, dst)
    return dst


def _images(html: str) -> dict[str, bytes]:
    return {m.group(1): base64.b64decode(m.group(2))
            for m in re.finditer(r"<img id='plot-(\w+)'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)}


def test_report_html_is_self_contained_with_its_plots(run_copy: Path):
    res = CliRunner().invoke(cli, ["report", "--run", str(run_copy)])
    assert res.exit_code == 0, res.output
    html = (run_copy / "report.html").read_text()
    images = _images(html)
    assert set(images) == {"training", "accuracy_latency", "sizes"}
    for png in images.values():
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    # Nothing is fetched from elsewhere: no external scripts, styles or images.
    assert not re.search(r"(src|href)=['\"](https?:|//|[^d#'\"][^'\"]*\.(png|css|js))", html)
    for file in ("student_fp32.tflite", "student_dynamic.onnx", "teacher.pt"):
        assert f"<td>{file}</td>" in html
    md = (run_copy / "report.md").read_text()
    for key in images:
        assert f"(report_plots/{key}.png)" in md
        assert (run_copy / "report_plots" / f"{key}.png").read_bytes() == images[key]
    assert "| file | runtime | threads | load ms | first ms | p50 ms |" in md
    rd = RunDir(run_copy)
    assert rd.stage_status("report") == "done" and not rd.verify_artifacts(["report.md", "report.html"])
    assert f"report: {run_copy / 'report.html'}" in res.output


def test_report_states_the_speedup_over_the_teacher(run_copy: Path):
    res = CliRunner().invoke(cli, ["report", "--run", str(run_copy)])
    assert res.exit_code == 0, res.output
    rows = json.loads((run_copy / "report.json").read_text())["rows"]
    summary = json.loads((run_copy / "metrics.json").read_text())["report"]
    rec = summary["recommended"]
    teacher = next(r for r in rows if r["file"] == "teacher.pt" and r["threads"] == rec["threads"])
    student_variants = [r for r in rows if r["source_model"] == "student" and r["format"] != "pt"]
    assert rec["file"] in {r["file"] for r in student_variants}
    expected = teacher["p50_ms"] / rec["p50_ms"]
    assert summary["speedup"]["speedup"] == pytest.approx(expected)
    md = (run_copy / "report.md").read_text()
    assert f"**Speedup over the PyTorch fp32 teacher: {expected:.1f}x**" in md
    assert f"**Recommended file: `{rec['file']}`**" in md
    assert "Target ≥ 10x with ≥ 97% of the teacher's accuracy" in md
    # The dynamic-range ONNX file is compared with its fp32 sibling, faster or not, in plain words.
    assert re.search(r"`student_dynamic\.onnx` \(dynamic-range int8\) is (\*\*not faster\*\*|[\d.]+x faster)", md)


def test_device_results_are_merged_as_labelled_rows(run_copy: Path, tmp_path: Path):
    pi = tmp_path / "pi.json"
    proc = subprocess.run([sys.executable, str(REPO / "device_tests" / "bench.py"), str(run_copy), "--runtime", "tflite",
                           "--threads", "1", "--runs", "5", "--warmup", "1", "--emulated", "--json", str(pi)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    android = tmp_path / "android.json"
    android.write_text(json.dumps({"schema_version": 1, "device": {"machine": "arm64-v8a", "cpu_model": "Qualcomm SM8350",
                                   "model": "Xiaomi Mi 11", "emulated": False},
                                   "results": [{"model": "student_fp32", "file": "student_fp32.tflite",
                                                "accuracy": None, "p50_ms": 0.05, "p90_ms": 0.06, "p99_ms": 0.08,
                                                "threads": 4, "runtime": "benchmark_model", "delegate": "xnnpack"}],
                                   "skipped": []}))
    res = CliRunner().invoke(cli, ["report", "--run", str(run_copy), "--device", str(pi), "--device", str(android)])
    assert res.exit_code == 0, res.output
    html = (run_copy / "report.html").read_text()
    assert "Device results" in html and "Xiaomi Mi 11 / Qualcomm SM8350 (arm64-v8a)" in html
    assert "benchmark_model/xnnpack" in html
    pi_rows = json.loads(pi.read_text())["results"]
    assert pi_rows and all(r["emulated"] for r in pi_rows)
    assert html.count("(emulated)") >= len(pi_rows)
    devices = json.loads((run_copy / "metrics.json").read_text())["report"]["devices"]
    assert len(devices) == 2 and any("(emulated)" in d for d in devices)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"device": {}}', "has no 'results' list"),
    ('{"results": []}', "has no 'device' section"),
    ('{"device": {}, "results": [{"file": "a.tflite", "p50_ms": -1}]}', "has no positive number 'p50_ms'"),
    ('{"device": {}, "results": [{"p50_ms": 1.0}]}', "has no 'file' or 'model'"),
    ('{"device": {}, "results": [{"file": "a.tflite", "p50_ms": 1.0, "accuracy": 97}]}', "expected 0..1"),
])
def test_invalid_device_file_is_one_line_exit_2(run_copy: Path, tmp_path: Path, content: str, message: str):
    (run_copy / "report.html").unlink(missing_ok=True)
    bad = tmp_path / "device.json"
    bad.write_text(content)
    res = CliRunner().invoke(cli, ["report", "--run", str(run_copy), "--device", str(bad)])
    assert res.exit_code == 2 and message in res.output and res.output.count("\n") == 1, res.output
    assert not (run_copy / "report.html").exists()  # nothing written on bad input


def test_report_before_bench_says_so(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    res = CliRunner().invoke(cli, ["report", "--run", str(run)])
    assert res.exit_code == 0, res.output
    md = (run / "report.md").read_text()
    assert "No latency measured yet" in md and "(report_plots/training.png)" in md
    assert "accuracy_latency.png" not in md  # no latency, no accuracy-vs-latency plot


def test_pareto_front_on_known_points():
    pts = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.85), (3.0, 0.95), (0.5, 0.70), (4.0, 0.99)]
    assert pareto_front(pts) == [4, 0, 1, 5]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]


def test_int8_that_is_not_faster_is_stated_plainly():
    rows = [{"file": f, "source_model": "student", "format": "tflite", "runtime": "litert", "threads": 1, "batch": 1,
             "precision": prec, "p50_ms": ms, "size_bytes": size}
            for f, prec, ms, size in (("student_fp32.tflite", "fp32", 0.10, 40000),
                                      ("student_dynamic.tflite", "dynamic", 0.36, 12000),
                                      ("student_int8.tflite", "int8", 0.05, 11000))]
    findings = {f["file"]: f for f in quantization_findings(rows)}
    assert findings["student_dynamic.tflite"]["ratio"] == pytest.approx(3.6) and not findings["student_dynamic.tflite"]["faster"]
    assert findings["student_int8.tflite"]["faster"]
    text = _quant_sentence(findings["student_dynamic.tflite"])
    assert "`student_dynamic.tflite` (dynamic-range int8) is **not faster**: 3.6x slower than `student_fp32.tflite`" in text
    assert "2.0x faster than" in _quant_sentence(findings["student_int8.tflite"])
