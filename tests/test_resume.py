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


def _prune(run, *extra):
    return subprocess.Popen([sys.executable, "-m", "edgekd", "prune", "--run", str(run), "--ratio", "0.5",
                             "--steps", "2", "--finetune-epochs", "4", "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


@pytest.mark.slow
def test_prune_kill_9_then_resume_gives_identical_weights(tiny_run, tmp_path):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_run, a)
    shutil.copytree(tiny_run, b)
    full = _prune(a)
    victim = _prune(b)
    # Killed once step 1 is saved and step 2 has fine-tuned one epoch: both kinds of checkpoint are used.
    ckpt = b / "checkpoints"
    deadline = time.time() + 240
    while not ((ckpt / "prune_progress.pt").exists() and (ckpt / "prune_step2.state.pt").exists()) \
            and victim.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert victim.poll() is None, "the prune finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (b / "student_pruned.pt").exists()
    assert torch.load(ckpt / "prune_progress.pt", weights_only=True)["progress"]["step"] == 1
    assert full.wait() == 0, full.stderr.read()
    resumed = _prune(b, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    wa = torch.load(a / "student_pruned.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "student_pruned.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.load(ckpt / "prune_step2.state.pt", weights_only=True)["epoch"] == 4


def test_fit_resume_with_dropout_and_a_cached_teacher_is_exact(tmp_path):
    # Computing the cached teacher logits iterates a DataLoader, which draws from the global RNG; the resumed
    # run must restore the RNG after that draw, or dropout masks (and so the weights) differ.
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.models import create_model
    from edgekd.recipe import TrainConfig, load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    data = load_data(recipe.data, recipe.seed)
    shape = tuple(data.input_shape)
    torch.manual_seed(0)
    teacher = create_model("cnn", shape, data.num_classes, width=4, depth=2).eval()
    start = create_model("cnn", shape, data.num_classes, width=4, depth=2, dropout=0.3).state_dict()
    cfg = TrainConfig(epochs=3, lr=0.01, optimizer="adamw", scheduler="cosine")

    class Stop(Exception):
        pass

    def stop_after_1(row):
        if row["epoch"] == 1:
            raise Stop

    def train(state_path, resume=False, on_epoch=None):
        model = create_model("cnn", shape, data.num_classes, width=4, depth=2, dropout=0.3)
        model.load_state_dict(start)
        torch.manual_seed(1)
        try:
            fit(model, data, losses.build("kd", temperature=4.0, alpha=0.9),
                FitConfig("student", cfg, seed=1, state_path=state_path, quiet=True, resume=resume),
                teacher=teacher, callbacks=[OnEpoch(on_epoch)] if on_epoch else [])
        except Stop:
            pass
        return model.state_dict()

    full = train(tmp_path / "a.state.pt")
    train(tmp_path / "b.state.pt", on_epoch=stop_after_1)
    resumed = train(tmp_path / "b.state.pt", resume=True)
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["epoch"] == 3
    assert all(torch.equal(full[k], resumed[k]) for k in full)
