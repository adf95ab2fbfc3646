"""edgekd run: the chained pipeline, stage skipping, --force, budgets and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_RECIPE, ctrl_c_after, write_recipe

from edgekd.cli import cli
from edgekd.runtimes import get_runtime
from edgekd.run_dir import RunDir

# The tiny recipe cut to one epoch, with every optional stage, as small as each can be.
CHAIN = {**TINY_RECIPE,
         "teacher": {**TINY_RECIPE["teacher"], "epochs": 1},
         "distill": {**TINY_RECIPE["distill"], "epochs": 1},
         "prune": {"ratio": 0.5, "steps": 1, "finetune_epochs": 0},
         "export": {"formats": ["tflite"], "quantize": [], "teacher": False},
         "validate": {"max_accuracy_drop": 1.0},
         "bench": {"threads": [1], "runs": 5, "warmup": 1}}


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["run", *args])
    return res.exit_code, res.output


def _mtimes(run: Path, *names: str) -> dict[str, int]:
    return {n: (run / n).stat().st_mtime_ns for n in names}


def test_run_chains_every_stage_then_skips_what_is_done(tmp_path: Path):
    recipe = write_recipe(tmp_path / "chain.yaml", CHAIN)
    out = tmp_path / "exported"
    code, text = _run(str(recipe), "--out", str(out), "-q")
    assert code == 0, text
    run = out / "tiny"
    rd = RunDir(run)
    for stage in ("distill", "prune", "export", "validate", "bench", "report"):
        assert rd.stage_status(stage) == "done", stage
    assert "stages run: distill, prune, export, validate, bench, report" in text
    # Export took the pruned student; the recommendation is an exported student file and is printed with its path.
    meta = json.loads((run / "metadata.json").read_text())
    # An image run: the app-profile file beside the research file, and it is the recommended one.
    assert [e["file"] for e in meta["models"]] == ["student_pruned_app_fp32.tflite", "student_pruned_fp32.tflite"]
    assert f"run: {run}\nRecommended file: student_pruned_app_fp32.tflite (" in text
    assert f"report: {run / 'report.html'}" in text
    rows = json.loads((run / "report.json").read_text())["rows"]
    app_rows = {("student_pruned_app_fp32.tflite", "litert")}
    if get_runtime("mediapipe").available():
        app_rows.add(("student_pruned_app_fp32.tflite", "mediapipe"))
    assert {(r["file"], r["runtime"]) for r in rows} == {("teacher.pt", "torch"), ("student.pt", "torch"),
                                                        ("student_pruned.pt", "torch"),
                                                        ("student_pruned_fp32.tflite", "litert"), *app_rows}
    assert all(r["runs"] == 5 for r in rows)
    # The console ends with the report's summary (plain text, at most 8 lines), then where the report is.
    summary = json.loads((run / "metrics.json").read_text())["report"]
    assert f"Speedup over the PyTorch fp32 teacher: {summary['speedup']['speedup']:.1f}x" in text
    block = text[text.index("Recommended file:"):text.index("report: ")].strip().splitlines()
    assert len(block) <= 8 and block[1].startswith("Chain (test accuracy, points vs the step before): teacher ")
    assert "**" not in text and "`" not in text
    assert "more note(s) in the report's Notes, or with -v" in text and "note: " not in text
    assert "<img id='plot-accuracy_latency'" in (run / "report.html").read_text()

    # Everything is done: only the report is written again (-v: with every note behind the summary).
    before = _mtimes(run, "student.pt", "student_pruned.pt", "student_pruned_fp32.tflite", "validate.json",
                     "report.json")
    code, text = _run(str(recipe), "--out", str(out), "-q", "-v")
    assert code == 0, text
    assert "note: student_pruned_app_fp32.tflite against the PyTorch fp32 student" in text
    assert "more note(s)" not in text and (run / "report.md").read_text().count("\n## Notes\n") == 1
    assert "stages run: report" in text and "distill (already done" in text and "bench (already done)" in text
    assert _mtimes(run, *before) == before

    # A changed bench section runs the bench again, and nothing before it.
    code, text = _run(str(recipe), "--out", str(out), "-q", "--set", "bench.runs=7")
    assert code == 0, text
    assert "stages run: bench, report" in text
    assert all(r["runs"] == 7 for r in json.loads((run / "report.json").read_text())["rows"])
    assert _mtimes(run, "student_pruned_fp32.tflite", "validate.json") == {
        k: before[k] for k in ("student_pruned_fp32.tflite", "validate.json")}

    # A broken budget: exit 1 after the report is written, naming the file and what broke.
    (run / "report.html").unlink()
    code, text = _run(str(recipe), "--out", str(out), "-q", "--set", "bench.runs=7",
                      "--set", "validate.max_size_kb=0.5")
    assert code == 1, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: no student variant meets every budget: "), last
    for name, runtime in sorted({("student_pruned_fp32.tflite", "litert"), *app_rows}):
        assert f"{name} ({runtime}): size {(run / name).stat().st_size / 1024:.1f} KB > 0.5 KB" in last
    assert "FAILED" in (run / "report.html").read_text()
    assert "stages run: report" in text  # budgets alone do not re-measure anything

    # --force starts over in a new run directory; the finished one is left alone.
    code, text = _run(str(recipe), "--out", str(out), "-q", "--force", "--set", "prune=null", "--set", "export=null",
                      "--set", "bench=null")
    assert code == 0, text
    assert "stages run: distill, validate, report" in text
    assert "prune (not in the recipe)" in text and "bench (not in the recipe)" in text
    assert (out / "tiny-2" / "student.pt").is_file() and not (out / "tiny-2" / "student_pruned.pt").exists()
    assert _mtimes(run, "student.pt") == {"student.pt": before["student.pt"]}


def test_run_skips_sections_the_recipe_leaves_out(tiny_run: Path, tmp_path: Path):
    """A finished distill run and a recipe with only `validate` and no bench: validate and report run."""
    import shutil

    out = tmp_path / "exported"
    shutil.copytree(tiny_run, out / "tiny")
    recipe = write_recipe(tmp_path / "r.yaml", validate={})
    code, text = _run(str(recipe), "--out", str(out), "-q")
    assert code == 0, text
    assert "stages run: validate, report" in text
    for stage in ("prune", "export", "bench"):
        assert f"{stage} (not in the recipe)" in text
    md = (out / "tiny" / "report.md").read_text()
    assert "No latency measured yet" in md and "| student.pt | torch |" in md


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "not found"),
    (["--set", "bench.threads=[0]"], "bench.threads: --threads must be positive"),
    (["--set", "validate.max_size_kb=-1"], "validate.max_size_kb"),
    (["--device", "nope.json"], "device result file nope.json not found"),
])
def test_run_bad_input_fails_before_any_work(tmp_path: Path, monkeypatch, args: list[str], message: str):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", bench={"runs": 5})
    if args[0] != "missing.yaml":
        args = [str(recipe), *args]
    code, text = _run(*args, "--out", str(tmp_path / "exported"))
    assert code == 2, text
    assert text.startswith("error: ") and message in text and text.count("\n") == 1
    assert not (tmp_path / "exported").exists()  # nothing trained, nothing written


def test_run_continues_an_interrupted_prune(tiny_run: Path, tmp_path: Path):
    """Ctrl-C during the prune stage of `edgekd run`; running it again continues the prune where it stopped."""
    import shutil

    import torch

    out = tmp_path / "exported"
    shutil.copytree(tiny_run, out / "tiny")
    ckpt = out / "tiny" / "checkpoints"
    recipe = write_recipe(tmp_path / "r.yaml", prune={"ratio": 0.5, "steps": 2, "finetune_epochs": 2})
    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    res = CliRunner().invoke(cli, ["prune", "--run", str(reference), "--ratio", "0.5", "--steps", "2",
                                   "--finetune-epochs", "2", "-q"])
    assert res.exit_code == 0, res.output

    with ctrl_c_after("prune2", 1):  # Ctrl-C during step 2, after step 1 finished
        code, text = _run(str(recipe), "--out", str(out), "-q")
    assert code == 130, text
    assert not (out / "tiny" / "student_pruned.pt").exists()
    step1 = (ckpt / "prune_step1.state.pt").stat().st_mtime_ns

    code, text = _run(str(recipe), "--out", str(out), "-q")
    assert code == 0, text
    assert "stages run: prune, report" in text
    assert (ckpt / "prune_step1.state.pt").stat().st_mtime_ns == step1  # step 1 was not done again
    a = torch.load(reference / "student_pruned.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "tiny" / "student_pruned.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_typed_distill_and_prune_results_read_the_runs_metrics(tiny_run: Path):
    """`edgekd run` returns the distill and prune results typed; they are exactly metrics.json's sections."""
    from edgekd.results import DistillResult, PruneResult

    rd = RunDir(tiny_run)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    result = DistillResult.read(rd)
    assert result.to_json() == {k: metrics[k] for k in ("teacher", "baseline", "student")}
    assert result.student.test_accuracy == metrics["student"]["test_accuracy"]
    assert result.kd_gain == pytest.approx(metrics["student"]["test_accuracy"] - metrics["baseline"]["test_accuracy"])
    assert PruneResult.read(rd) is None  # the tiny run was not pruned


def test_run_with_a_qat_section_writes_ptq_and_qat_files_and_reports_both(tiny_run: Path, tmp_path: Path):
    """`edgekd run` picks QAT by the recipe: a `qat:` section adds the QAT stage after export, its files sit next
    to the PTQ ones, and the report puts the two accuracies side by side."""
    import shutil

    out = tmp_path / "exported"
    shutil.copytree(tiny_run, out / "tiny")
    # mcu, as in the default recipe: QAT writes what it can (tflite), the export stage writes the mcu file.
    recipe = write_recipe(tmp_path / "q.yaml", export={"formats": ["tflite", "mcu"], "quantize": ["int8"],
                                                      "teacher": False, "app": {"enabled": False}},
                          qat={"epochs": 1, "lr": 0.001}, validate={"max_accuracy_drop": 1.0})
    code, text = _run(str(recipe), "--out", str(out), "-q")
    assert code == 0, text
    assert "stages run: export, qat, validate, report" in text
    run = out / "tiny"
    assert RunDir(run).stage_status("qat") == "done"
    entries = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    assert entries["student_int8_qat.tflite"]["route"].startswith("qat-")
    assert not entries["student_int8.tflite"]["route"].startswith("qat-")
    assert "student_mcu.tflite" in entries and not any(f.startswith("student_int8_qat") and f != "student_int8_qat.tflite"
                                                       for f in entries)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student_int8_qat.tflite"]["qat"]["epochs"] == 1
    md = (run / "report.md").read_text()
    assert "| student_int8.tflite |" in md and "student_int8_qat.tflite" in md and "QAT − PTQ" in md
    # Without the section nothing is quantization-aware: a second run of the same recipe minus `qat` skips it.
    code, text = _run(str(recipe), "--out", str(out), "-q", "--set", "qat=null")
    assert code == 0, text
    assert "qat (not in the recipe)" in text
