"""edgekd validate: accuracy and agreement per model and runtime, budgets, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekd.cli import cli
from edgekd.errors import CheckFailed, RunDirError
from edgekd.recipe import ValidateConfig
from edgekd.results import BenchReport, ValidationResult
from edgekd.run_dir import RunDir


def exported_tiny_run(tiny_run: Path, tmp_path_factory) -> Path:
    """The tiny run exported by `edgekd export` (student fp32/int8/dynamic, teacher fp32; ONNX and TFLite).

    Built once per test session and shared by the test modules.
    Read-only for tests: copy it to change it. Built in a temporary folder and renamed, so a module never
    sees it half-written.
    """
    from edgekd.export import run_export

    run = tmp_path_factory.getbasetemp() / "exported-tiny" / "tiny"
    if not run.exists():
        build = tmp_path_factory.mktemp("exporting") / "tiny"
        shutil.copytree(tiny_run, build)
        # The real export stage; its own verification is skipped because validate measures the same thing.
        run_export(RunDir(build), formats=["onnx", "tflite"], quantize=["int8", "dynamic"], teacher=True,
                   verify=False)
        run.parent.mkdir(exist_ok=True)
        build.rename(run)
    return run


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory) -> Path:
    return exported_tiny_run(tiny_run, tmp_path_factory)


STUDENT_FILES = {f"student_{p}.{ext}" for p in ("fp32", "int8", "dynamic") for ext in ("onnx", "tflite")}


@pytest.fixture
def run_copy(exported: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(exported, dst)
    return dst


def test_three_runtimes_give_the_same_predictions(exported: Path):
    from edgekd.runtimes import runtime_for
    from edgekd.run_dir import read_eval
    from edgekd.runtimes.targets import discover_models

    rd = RunDir(exported)
    x, y = read_eval(rd)
    targets = {t.file: t for t in discover_models(rd)}
    logits = {f: runtime_for(rd / f, targets[f].entry, runtime=targets[f].runtime).predict(x)
              for f in ("student.pt", "student_fp32.onnx", "student_fp32.tflite")}
    ref = logits["student.pt"]
    assert ref.shape == (len(y), 10)
    for f in ("student_fp32.onnx", "student_fp32.tflite"):
        np.testing.assert_allclose(logits[f], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert (logits[f].argmax(1) == ref.argmax(1)).all()
    # Batched and one-at-a-time runs agree (the TFLite file has a fixed batch of 1).
    lite = runtime_for(rd / "student_fp32.tflite", targets["student_fp32.tflite"].entry)
    np.testing.assert_allclose(lite.predict(x[:5], batch_size=5), np.concatenate([lite.predict(x[i:i + 1])
                                                                                 for i in range(5)]), atol=1e-6)


def test_validate_measures_every_model_on_every_runtime(run_copy: Path):
    res = CliRunner().invoke(cli, ["validate", "--run", str(run_copy), "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads((run_copy / "validate.json").read_text())
    rows = {(r["file"], r["runtime"]): r for r in out["rows"]}
    assert {r for _, r in rows} == {"torch", "onnxruntime", "litert"}
    assert set(f for f, _ in rows) == {"teacher.pt", "baseline.pt", "student.pt", *STUDENT_FILES,
                                       "teacher_fp32.onnx", "teacher_fp32.tflite"}
    metrics = json.loads((run_copy / "metrics.json").read_text())
    student = rows[("student.pt", "torch")]
    # The PyTorch numbers match what distill measured on the same test split.
    assert student["test_accuracy"] == pytest.approx(metrics["student"]["test_accuracy"])
    assert student["f1_macro"] == pytest.approx(metrics["student"]["f1_macro"])
    assert rows[("teacher.pt", "torch")]["agreement_teacher"] == 1.0
    for f, rt in (("student_fp32.onnx", "onnxruntime"), ("student_fp32.tflite", "litert")):
        r = rows[(f, rt)]
        assert r["agreement_student_fp32"] == 1.0 and r["test_accuracy"] == student["test_accuracy"]
        assert r["agreement_teacher"] == student["agreement_teacher"] < 1.0
        # Exported files' metrics are filed under their file name.
        assert metrics[f]["test_accuracy"] == r["test_accuracy"] and metrics[f]["runtime"] == rt
    teacher_acc = rows[("teacher.pt", "torch")]["test_accuracy"]
    assert student["accuracy_drop_vs_teacher"] == pytest.approx(teacher_acc - student["test_accuracy"])
    assert RunDir(run_copy).stage_status("validate") == "done"
    assert "student_fp32.tflite" in res.output and "agree_teacher" in res.output


def test_validate_one_runtime_only(run_copy: Path):
    res = CliRunner().invoke(cli, ["validate", "--run", str(run_copy), "-q", "--runtime", "litert"])
    assert res.exit_code == 0, res.output
    rows = json.loads((run_copy / "validate.json").read_text())["rows"]
    assert {r["file"] for r in rows} == {f for f in STUDENT_FILES if f.endswith(".tflite")} | {"teacher_fp32.tflite"}
    # Agreement still refers to the PyTorch teacher and student.
    assert all(r["agreement_teacher"] is not None for r in rows)


def test_budgets_fail_the_command_and_say_what_broke(run_copy: Path):
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", "--run", str(run_copy), "-q", "--set", "validate.max_size_kb=0.5"])
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: no student variant meets every budget")
    assert "student_fp32.tflite (litert): size" in line and "> 0.5 KB" in line
    assert "Traceback" not in res.output
    # A budget every student variant meets passes; scope "all" fails if any one breaks.
    sizes = [r["size_bytes"] for r in json.loads((run_copy / "validate.json").read_text())["rows"]
             if r["source_model"] == "student" and r["format"] != "pt"]
    loose = (max(sizes) + min(sizes)) / 2 / 1024
    res = runner.invoke(cli, ["validate", "--run", str(run_copy), "-q", "--set", f"validate.max_size_kb={loose}"])
    assert res.exit_code == 0, res.output
    assert "budgets: passed" in res.output
    res = runner.invoke(cli, ["validate", "--run", str(run_copy), "-q", "--set", f"validate.max_size_kb={loose}",
                              "--set", "validate.scope=all"])
    assert res.exit_code == 1 and "every student variant must meet the budgets" in res.output


def test_accuracy_budget_counts_against_the_teacher(run_copy: Path):
    res = CliRunner().invoke(cli, ["validate", "--run", str(run_copy), "-q", "--set", "validate.max_accuracy_drop=0"])
    rows = json.loads((run_copy / "validate.json").read_text())["rows"]
    teacher = next(r for r in rows if r["file"] == "teacher.pt")["test_accuracy"]
    best_student = max(r["test_accuracy"] for r in rows if r["source_model"] == "student")
    assert best_student < teacher  # the tiny student is weaker than its teacher
    assert res.exit_code == 1 and "accuracy drop vs teacher" in res.output


def test_latency_budget_without_bench_measures_quickly(run_copy: Path):
    res = CliRunner().invoke(cli, ["validate", "--run", str(run_copy), "-q", "--set", "validate.max_p50_ms=1e-6"])
    assert res.exit_code == 1, res.output
    assert "measuring batch-1 p50" in res.output and "p50" in res.output.splitlines()[-1]
    res = CliRunner().invoke(cli, ["validate", "--run", str(run_copy), "-q", "--set", "validate.max_p50_ms=10000"])
    assert res.exit_code == 0, res.output


def test_runtime_transforms_follow_metadata():
    """Normalization, NHWC layout and int8 quantization of inputs, dequantization of outputs, on known numbers."""
    from edgekd.runtimes import prepare_input, restore_output

    entry = {"normalization": {"mean": [0.5, 1.0], "std": [0.25, 2.0]},
             "input": {"dtype": "int8", "layout": "NHWC", "quantization": {"scale": 0.5, "zero_point": -1}},
             "output": {"dtype": "int8", "quantization": {"scale": 0.1, "zero_point": 3}}}
    x = np.zeros((1, 2, 1, 2), np.float32)
    x[0, 0] = [[0.5, 100.0]]  # channel 0 -> normalized 0 and 398 (clipped to 127)
    x[0, 1] = [[3.0, -1.0]]  # channel 1 -> normalized 1 and -1
    q = prepare_input(x, entry)
    assert q.dtype == np.int8 and q.shape == (1, 1, 2, 2)  # N, H, W, C
    # round(v / 0.5) - 1, clipped to int8
    np.testing.assert_array_equal(q[0, 0], [[-1, 1], [127, -3]])
    y = restore_output(np.array([[3, 13, -7]], np.int8), entry)
    np.testing.assert_allclose(y, [[0.0, 1.0, -1.0]], atol=1e-6)
    # Float files: normalized only, layout kept.
    f = prepare_input(x, {"normalization": entry["normalization"], "input": {"dtype": "float32", "layout": "NCHW"}})
    assert f.dtype == np.float32 and f.shape == x.shape and f[0, 1, 0, 0] == pytest.approx(1.0)


def test_integer_file_in_the_run_runs_from_raw_inputs(exported: Path):
    """The exported static int8 files take raw inputs through the same interface as the fp32 ones."""
    from edgekd.runtimes import runtime_for
    from edgekd.run_dir import read_eval
    from edgekd.runtimes.targets import discover_models

    rd = RunDir(exported)
    x, _ = read_eval(rd)
    targets = {t.file: t for t in discover_models(rd)}
    ref = runtime_for(rd / "student.pt", targets["student.pt"].entry).predict(x).argmax(1)
    for f in ("student_int8.tflite", "student_int8.onnx"):
        pred = runtime_for(rd / f, targets[f].entry).predict(x).argmax(1)
        assert (pred == ref).mean() > 0.9, f


def test_progress_lines_are_logged_and_quiet_keeps_only_the_table(run_copy: Path):
    runner = CliRunner()
    loud = runner.invoke(cli, ["validate", "--run", str(run_copy), "--runtime", "torch"])
    quiet = runner.invoke(cli, ["validate", "--run", str(run_copy), "--runtime", "torch", "-q"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    per_model = [line for line in loud.output.splitlines() if "agree(teacher)" in line]
    assert [line.split()[0] for line in per_model] == ["teacher.pt", "baseline.pt", "student.pt"]
    assert "agree(teacher)" not in quiet.output and "agree_teacher" in quiet.output
    assert loud.output.endswith(quiet.output)  # the same summary table after the progress lines


def test_changed_file_fails_validate_with_its_name(run_copy: Path):
    """A file changed since export is not measured: validate fails (exit 1) naming it; see test_bad_inputs.py."""
    with open(run_copy / "student_fp32.tflite", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    res = CliRunner().invoke(cli, ["validate", "--run", str(run_copy), "-q"])
    assert res.exit_code == 1, res.output
    assert res.output.strip() == (f"error: {run_copy / 'student_fp32.tflite'} changed since it was written "
                                  "(sha256 mismatch): re-run `edgekd export` to write it again, or restore the original")
    assert not (run_copy / "validate.json").exists()


def test_bad_input_is_one_line_exit_2(tmp_path: Path, run_copy: Path):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("manifest.json", "data.json", "eval.npz"):
        shutil.copy(run_copy / name, empty / name)
    res = runner.invoke(cli, ["validate", "--run", str(empty)])
    assert res.exit_code == 2 and "holds no models" in res.output and "Traceback" not in res.output
    assert not (empty / "validate.json").exists()
    res = runner.invoke(cli, ["validate", "--run", str(run_copy), "--runtime", "tensorrt"])
    assert res.exit_code == 2 and "unknown runtime 'tensorrt'" in res.output
    (run_copy / "metadata.json").write_text("{not json")
    res = runner.invoke(cli, ["validate", "--run", str(run_copy)])
    assert res.exit_code == 2 and "metadata.json is not valid JSON" in res.output
    # --debug raises instead, with the parser's error chained as the cause.
    res = runner.invoke(cli, ["--debug", "validate", "--run", str(run_copy)])
    assert isinstance(res.exception, RunDirError) and isinstance(res.exception.__cause__, json.JSONDecodeError)
    res = runner.invoke(cli, ["validate", "--run", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output


# -- budgets and recommendation logic on known numbers -------------------------------------------------

def _validation(*rows: tuple[str, str, float, int]) -> ValidationResult:
    """Rows of (file, precision, accuracy, size_bytes) for the student plus the teacher.pt at 0.95."""
    out = [{"file": "teacher.pt", "model": "teacher", "source_model": "teacher", "runtime": "torch", "format": "pt",
            "precision": "fp32", "test_accuracy": 0.95, "accuracy_drop_vs_teacher": 0.0, "size_bytes": 10**6},
           {"file": "student.pt", "model": "student", "source_model": "student", "runtime": "torch", "format": "pt",
            "precision": "fp32", "test_accuracy": 0.93, "accuracy_drop_vs_teacher": 0.02, "size_bytes": 9000}]
    for file, precision, acc, size in rows:
        fmt = file.rsplit(".", 1)[1]
        out.append({"file": file, "model": file.rsplit(".", 1)[0], "source_model": "student",
                    "runtime": {"onnx": "onnxruntime", "tflite": "litert"}[fmt], "format": fmt,
                    "precision": precision, "test_accuracy": acc, "accuracy_drop_vs_teacher": 0.95 - acc,
                    "size_bytes": size})
    return ValidationResult.from_json({"rows": out, "teacher_accuracy": 0.95})


def _bench(**p50: float) -> BenchReport:
    rows = []
    for key, ms in p50.items():
        file, runtime = {"onnx_fp32": ("student_fp32.onnx", "onnxruntime"),
                         "tflite_fp32": ("student_fp32.tflite", "litert"),
                         "tflite_int8": ("student_int8.tflite", "litert")}[key]
        for threads, factor in ((1, 1.0), (2, 0.8)):
            rows.append({"file": file, "runtime": runtime, "threads": threads, "batch": 1, "p50_ms": ms * factor})
    return BenchReport.from_json({"rows": rows})


VAL = _validation(("student_fp32.onnx", "fp32", 0.93, 8000), ("student_fp32.tflite", "fp32", 0.93, 7000),
                  ("student_int8.tflite", "int8", 0.80, 2500))


def test_recommendation_is_the_fastest_variant_within_the_accuracy_budget():
    from edgekd.results import recommend

    bench = _bench(onnx_fp32=0.5, tflite_fp32=0.3, tflite_int8=0.1)
    # The int8 file is fastest but lost 13 points: never recommended, with or without a budget.
    rec = recommend(VAL, bench, None)
    assert rec.recommended.file == "student_fp32.tflite" and rec.recommended.threads == 2
    assert rec.recommended.p50_ms == pytest.approx(0.24)
    assert recommend(VAL, bench, ValidateConfig(max_accuracy_drop=0.03)).recommended.file == "student_fp32.tflite"
    assert recommend(VAL, bench, ValidateConfig(max_accuracy_drop=0.2)).recommended.file == "student_int8.tflite"
    assert recommend(VAL, bench, ValidateConfig(max_accuracy_drop=0.001)).recommended is None
    # A size budget also rules files out.
    assert recommend(VAL, bench, ValidateConfig(max_size_kb=7.5)).recommended.file == "student_fp32.tflite"
    # Without latency, the smallest qualifying file.
    assert recommend(VAL, BenchReport(), None).recommended.file == "student_fp32.tflite"


def test_check_budgets_lists_each_broken_budget():
    from edgekd.results import check_budgets

    bench = _bench(onnx_fp32=0.5, tflite_fp32=0.3, tflite_int8=0.1)
    ok = check_budgets(VAL, bench, ValidateConfig(max_accuracy_drop=0.03, max_p50_ms=0.3, max_size_kb=8))
    assert ok.ok
    ok.raise_if_failed()
    bad = check_budgets(VAL, bench, ValidateConfig(max_accuracy_drop=0.03, max_p50_ms=0.2, max_size_kb=7))
    assert not bad.ok
    text = " | ".join(bad.failures)
    assert "student_fp32.onnx (onnxruntime): p50 0.400 ms > 0.2 ms, size 7.8 KB > 7 KB" in text
    assert "student_fp32.tflite (litert): p50 0.240 ms > 0.2 ms" in text
    assert "student_int8.tflite (litert): accuracy drop vs teacher 15.00 points > 3.00" in text
    with pytest.raises(CheckFailed) as e:
        bad.raise_if_failed()
    assert e.value.exit_code == 1
    every = check_budgets(VAL, bench, ValidateConfig(max_accuracy_drop=0.03, scope="all"))
    assert not every.ok and every.failures == [
        "student_int8.tflite (litert): accuracy drop vs teacher 15.00 points > 3.00"]
    assert check_budgets(VAL, bench, None).ok and check_budgets(VAL, bench, ValidateConfig()).ok
    missing = check_budgets(VAL, BenchReport(), ValidateConfig(max_p50_ms=1))
    assert not missing.ok and "not measured" in missing.failures[0]
