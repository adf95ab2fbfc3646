"""benchmarks/run_time.py: the stage times it reads from a run's manifest, and no results file when the run fails
(the benchmark itself runs `edgekd run` for minutes; its figures are in benchmarks/results/fashion_mnist)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("run_time", REPO / "benchmarks" / "run_time.py")
run_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_time)


def test_stage_seconds_from_figures_timestamps_and_training_infos():
    manifest = {"stages": {
        "distill": {"status": "done", "started": "2026-12-01T18:09:07+0000", "finished": "2026-12-01T18:48:33+0000",
                    "seconds": 2373.73},
        "teacher": {"status": "done", "info": {"train_seconds": 0.0}},  # loaded from a checkpoint: not trained
        "student": {"status": "done", "info": {"train_seconds": 895.4}},
        "export": {"status": "done", "seconds": 39.06},
        "validate": {"status": "done", "started": "2026-12-01T18:51:23+0000", "finished": "2026-12-01T18:52:30+0000"},
        "report": {"status": "done", "finished": "2026-12-01T18:52:05+0000"}}}
    assert run_time.stage_seconds(manifest) == {"distill": 2373.73, "distill: student": 895.4, "export": 39.06,
                                                "validate": 67.0}


def test_a_failing_run_writes_no_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_time.py"), "--recipe",
                           str(tmp_path / "missing.yaml"), "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no results written" in proc.stderr
    assert not out.exists()
