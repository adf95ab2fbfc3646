"""edgekd report: report.md and a self-contained report.html with plots, statements and device rows."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_validate import exported_tiny_run

from edgekd.cli import cli
from edgekd.report import (_chain_line, _quant_sentence, chain_steps, matrix_markdown, pareto_front,
                           precision_matrix, quantization_findings)
from edgekd.results import Candidate, Recommendation
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


# -- report.html in a real browser ----------------------------------------------------------------------------

# Appended to a copy of report.html (the report itself has no script): records what the browser laid out and
# decoded, so --dump-dom shows it.
_PROBE = """<script>window.addEventListener('load', () => {
  const m = document.getElementById('precision-matrix');
  document.body.dataset.matrixBottom = m ? Math.ceil(m.getBoundingClientRect().bottom) : -1;
  document.body.dataset.viewport = window.innerWidth + 'x' + window.innerHeight;
  document.querySelectorAll('img').forEach(i => { i.dataset.decoded = i.complete ? i.naturalWidth : 0; });
});</script>"""
LAPTOP = (1366, 768)


def chromium_command(user_data: Path, *args: str) -> list[str]:
    """Headless Chromium (Debian's package) with no network, sync or first-run work and a fresh profile."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed on CI (.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI installs it and runs this test")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={user_data}", f"--window-size={LAPTOP[0]},{LAPTOP[1]}"]
    return [exe, *flags, *args]


def test_report_html_renders_in_chromium_with_summary_and_matrix_on_the_first_screen(run_copy: Path, tmp_path: Path):
    res = CliRunner().invoke(cli, ["report", "--run", str(run_copy)])
    assert res.exit_code == 0, res.output
    page = tmp_path / "probe.html"
    page.write_text((run_copy / "report.html").read_text().replace("</body>", _PROBE + "</body>"))
    proc = subprocess.run(chromium_command(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                                           page.as_uri()), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]
    dom = proc.stdout
    # The three plots were decoded by the browser (an image it cannot decode has naturalWidth 0).
    decoded = dict(re.findall(r"<img id=\"plot-(\w+)\"[^>]*data-decoded=\"(\d+)\"", dom))
    assert set(decoded) == {"training", "accuracy_latency", "sizes"} and all(int(w) > 300 for w in decoded.values())
    # The matrix: one row per lower-precision family, a column per runtime x threads, every measured cell a ratio.
    matrix = re.search(r"<table class=\"matrix\" id=\"precision-matrix\">(.*?)</table>", dom, re.S).group(1)
    header = re.findall(r"<th[^>]*>(.*?)</th>", matrix)
    assert header[:4] == ["precision", "files", "ONNX Runtime", "LiteRT"] and "1 thread" in header
    quant = json.loads((run_copy / "metrics.json").read_text())["report"]["quantization"]
    cells = re.findall(r"<td class=\"(faster|slower|same)\"[^>]*>([\d.]+)×", matrix)
    assert sorted(float(v) for _, v in cells) == sorted(round(q["ratio"], 2) for q in quant)
    assert {c for c, _ in cells} <= {"faster", "slower", "same"} and len(cells) == len(quant) > 0
    # Summary and matrix read before any scrolling on a laptop screen.
    body = re.search(r"<body[^>]*>", dom).group(0)
    width, height = map(int, re.search(r'data-viewport="(\d+)x(\d+)"', body).groups())
    assert width == LAPTOP[0] and height > 600
    bottom = int(re.search(r'data-matrix-bottom="(-?\d+)"', body).group(1))
    assert 0 < bottom <= height, f"the matrix ends at {bottom} px, below the first screen ({height} px)"


# -- the summary's chain and the precision matrix, on hand-made figures ----------------------------------------

def _shipped(file: str, source_model: str, accuracy: float) -> Recommendation:
    c = Candidate(file=file, model=source_model, source_model=source_model, runtime="litert", precision="int8",
                  profile="app", test_accuracy=accuracy, size_bytes=12_000, p50_ms=0.05, threads=1, batch=1)
    return Recommendation(c, "fastest p50 with accuracy within 3.00 points of the teacher", [c])


METRICS = {"teacher": {"test_accuracy": 0.991}, "baseline": {"test_accuracy": 0.968},
           "student": {"test_accuracy": 0.978}, "student_pruned": {"test_accuracy": 0.976}}


def test_chain_line_states_each_step_and_the_shipped_file_against_scratch():
    rec = _shipped("student_pruned_app_int8.tflite", "student_pruned", 0.970)
    assert chain_steps(METRICS, rec) == [("teacher", 0.991), ("scratch", 0.968), ("KD student", 0.978),
                                         ("pruned", 0.976), ("shipped `student_pruned_app_int8.tflite`", 0.970)]
    (line,) = _chain_line(METRICS, rec)
    assert ("teacher 0.9910 → scratch 0.9680 (-2.30) → KD student 0.9780 (+1.00) → pruned 0.9760 (-0.20) → "
            "shipped `student_pruned_app_int8.tflite` 0.9700 (-0.60).") in line
    assert "**Shipped file vs scratch: +0.20 points**; vs teacher -2.10." in line
    # A file made from the unpruned student skips the pruned step; a run without a baseline has no "vs scratch".
    rec = _shipped("student_int8.tflite", "student", 0.981)
    assert [s for s, _ in chain_steps(METRICS, rec)] == ["teacher", "scratch", "KD student",
                                                         "shipped `student_int8.tflite`"]
    assert "KD student 0.9780 (+1.00) → shipped `student_int8.tflite` 0.9810 (+0.30)" in _chain_line(METRICS, rec)[0]
    no_base = {k: v for k, v in METRICS.items() if k != "baseline"}
    assert "vs scratch" not in _chain_line(no_base, rec)[0]


def _bench_row(file: str, runtime: str, threads: int, p50: float, source_model: str = "student_pruned") -> dict:
    stem, ext = file.rsplit(".", 1)
    precision = next(p for p in ("fp32", "fp16", "int8", "dynamic") if p in stem.split("_"))
    return {"file": file, "source_model": source_model, "format": ext, "runtime": runtime, "threads": threads,
            "batch": 1, "precision": precision, "p50_ms": p50, "size_bytes": 40_000 if precision == "fp32" else 12_000}


def test_precision_matrix_compares_each_file_with_the_fp32_file_of_its_own_family():
    rows = [_bench_row(f, rt, t, ms) for f, rt, t, ms in (
        ("student_pruned_fp32.tflite", "litert", 1, 0.10), ("student_pruned_int8.tflite", "litert", 1, 0.05),
        ("student_pruned_app_fp32.tflite", "litert", 1, 0.20), ("student_pruned_app_int8.tflite", "litert", 1, 0.30),
        ("student_pruned_int8_qat.tflite", "litert", 1, 0.06),
        ("student_pruned_fp32.onnx", "onnxruntime", 1, 0.08), ("student_pruned_int8.onnx", "onnxruntime", 1, 0.16),
        ("student_pruned_fp32.onnx", "onnxruntime", 2, 0.08), ("student_pruned_fp16.onnx", "onnxruntime", 2, 0.08))]
    found = {f["file"]: f for f in quantization_findings(rows)}
    # The app file is compared with the app fp32 file (same source model, another family), the QAT file with
    # the research fp32 file.
    assert found["student_pruned_app_int8.tflite"]["reference"] == "student_pruned_app_fp32.tflite"
    assert found["student_pruned_app_int8.tflite"]["ratio"] == pytest.approx(1.5)
    assert found["student_pruned_int8_qat.tflite"]["reference"] == "student_pruned_fp32.tflite"
    columns, matrix = precision_matrix(list(found.values()))
    assert columns == [("onnxruntime", 1), ("onnxruntime", 2), ("litert", 1)]
    cols = ["ONNX Runtime, 1 thread", "ONNX Runtime, 2 threads", "LiteRT, 1 thread"]
    table = {(r[0], r[1]): dict(zip(cols, r[2:])) for r in matrix}
    assert list(table) == [("fp16", "student_pruned"), ("static int8", "student_pruned"),
                           ("static int8", "student_pruned_app"), ("static int8", "student_pruned_qat")]
    int8 = table[("static int8", "student_pruned")]
    assert int8["LiteRT, 1 thread"]["ratio"] == pytest.approx(0.5) and int8["LiteRT, 1 thread"]["faster"]
    assert int8["ONNX Runtime, 1 thread"]["ratio"] == pytest.approx(2.0) and not int8["ONNX Runtime, 1 thread"]["faster"]
    assert int8["ONNX Runtime, 2 threads"] is None  # not measured: an empty cell, not a guess
    md = "\n".join(matrix_markdown(list(found.values())))
    assert "| static int8 | `student_pruned` | 2.00× | · | **0.50×** ✓ |" in md
    assert "| static int8 | `student_pruned_app` | · | · | 1.50× |" in md
