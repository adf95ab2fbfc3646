"""``distill.parallel_baseline``: the scratch baseline trained in a second process beside the KD student."""

from __future__ import annotations

import csv
import json

import torch
from click.testing import CliRunner

from edgekd.cli import cli

from conftest import write_recipe


def _distill(tmp_path, name: str, parallel: bool, threads: int, teacher: str | None = None) -> dict:
    changes = {"teacher": {"checkpoint": teacher}} if teacher else {}
    recipe = write_recipe(tmp_path / f"{name}.yaml", distill={"epochs": 4, "lr": 0.02, "parallel_baseline": parallel,
                                                              "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9}},
                          **changes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out"), "--name", name, "-q"])
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "out" / name / "manifest.json").read_text())


def test_parallel_baseline_matches_training_one_after_the_other_on_one_thread(tmp_path):
    seq = _distill(tmp_path, "seq", parallel=False, threads=1)
    run_side, run_seq = tmp_path / "out" / "side", tmp_path / "out" / "seq"
    # the same teacher (trained at another thread count it would differ in its last bits)
    side = _distill(tmp_path, "side", parallel=True, threads=2, teacher=str(run_seq / "teacher.pt"))
    assert side["stages"]["baseline"]["info"]["process"] == "parallel"
    assert "process" not in seq["stages"]["baseline"]["info"]
    # each side-by-side process had one of the two threads: the very weights of a one-thread sequential run
    for role in ("baseline", "student"):
        a = torch.load(run_side / f"{role}.pt", weights_only=True)["state_dict"]
        b = torch.load(run_seq / f"{role}.pt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
    # recorded like a sequential baseline: artifact, metrics, history rows, nothing left of the side directory
    assert "baseline.pt" in side["artifacts"]
    metrics = json.loads((run_side / "metrics.json").read_text())
    assert list(metrics)[:3] == ["teacher", "baseline", "student"]
    assert metrics["baseline"]["params"] == metrics["student"]["params"] > 0
    with open(run_side / "history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == "baseline"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert not (run_side / "checkpoints" / "baseline-process" / "checkpoints").exists()
