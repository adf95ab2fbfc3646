"""A distill run killed with SIGKILL mid-training resumes to exactly the weights of an uninterrupted run."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _distill(recipe, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "edgekd", "distill", str(recipe), "--out", str(out), "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _student_epochs(history) -> int:
    if not history.exists():
        return 0
    with open(history) as f:
        return sum(1 for row in csv.DictReader(f) if row["model"] == "student")


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_weights(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", distill={"epochs": 8, "baseline": False}, teacher={"epochs": 2})
    full = _distill(recipe, tmp_path / "a")
    victim = _distill(recipe, tmp_path / "b")
    history = tmp_path / "b" / "tiny" / "history.csv"
    deadline = time.time() + 240
    while _student_epochs(history) < 2 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "tiny" / "student.pt").exists()
    assert full.wait() == 0, full.stderr.read()
    resumed = _distill(recipe, tmp_path / "b", "--resume", "--name", "tiny")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = torch.load(tmp_path / "a" / "tiny" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "tiny" / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _student_epochs(history) == 8
