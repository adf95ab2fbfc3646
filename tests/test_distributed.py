"""Data-parallel distillation (torchrun + DDP, gloo on CPU) and device selection."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_recipe
from edgekd.cli import cli
from edgekd.distill import distributed
from edgekd.errors import RecipeError

TORCHRUN = Path(sys.executable).parent / "torchrun"

# 1000 digits -> 700 train samples = 14 global batches of 50 exactly, so 2 ranks x 25 cover the same samples
# per step as 1 process x 50 (no padding); an MLP without dropout or BatchNorm has no per-rank randomness or
# per-batch statistics. What remains is float summation order (DDP averages two half-batch means), so the runs
# agree to ~1e-6 in loss, not bit for bit.
DDP_RECIPE = {
    "name": "ddp",
    "seed": 0,
    "data": {"dataset": "digits", "batch_size": 50, "limit": 1000},
    "teacher": {"model": "mlp", "kwargs": {"hidden": 32, "depth": 1}, "epochs": 2, "lr": 0.01},
    "student": {"model": "mlp", "kwargs": {"hidden": 8, "depth": 1}},
    "distill": {"epochs": 2, "lr": 0.01, "baseline": False, "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9}},
}
LOSS_RTOL = 1e-4


def _recipe(path: Path, **sections) -> Path:
    data = json.loads(json.dumps(DDP_RECIPE))
    for key, value in sections.items():
        data[key].update(value)
    return write_recipe(path, data)


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_shard_sampler_global_batches_equal_the_one_process_batches():
    n, batch, world = 37, 8, 2
    one = list(torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(5)))
    shards = [list(distributed.ShardSampler(n, torch.Generator().manual_seed(5), r, world)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 19  # padded so both ranks run the same number of steps
    local = batch // world
    for k in range(n // batch):  # every full global batch is the one-process batch k
        got = sorted(i for s in shards for i in s[k * local:(k + 1) * local])
        assert got == sorted(one[k * batch:(k + 1) * batch])
    assert set(shards[0]) | set(shards[1]) == set(range(n))


def test_device_selection():
    assert distributed.resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RecipeError, match="unknown device"):
        distributed.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="no CUDA device"):
            distributed.resolve_device("cuda")


def test_single_process_records_world_size_one(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", teacher={"epochs": 1}, distill={"epochs": 1})
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out"), "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "out" / "ddp"
    assert json.loads((run / "metrics.json").read_text())["distributed"] == {
        "world_size": 1, "backend": None, "device": "cpu"}
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 1


def test_cuda_forced_without_gpu_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = _recipe(tmp_path / "r.yaml")
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: --device cuda: no CUDA device") and "\n" not in res.output.strip()
    assert not (tmp_path / "out").exists()


def test_torchrun_world_size_the_batch_cannot_be_split_into(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", data={"batch_size": 33})
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "edgekd", "distill",
                           str(recipe), "--out", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode != 0
    assert "error: data.batch_size 33 cannot be split over 2 processes" in proc.stderr
    # Each worker prints one line; torchrun itself then reports the failed workers with its own traceback
    # (torch.distributed.elastic's ChildFailedError), which holds no edgekd frame.
    assert proc.stderr.count("error: data.batch_size 33") == 2
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "/edgekd/" in line]
    assert not (tmp_path / "out").exists(), "nothing may be written"


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    one = subprocess.run([sys.executable, "-m", "edgekd", "distill", str(recipe), "--out", str(tmp_path / "one"), "-q"],
                         capture_output=True, text=True, env=_env(scratch), timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "edgekd", "distill", str(recipe),
                          "--out", str(tmp_path / "two"), "-q"],
                         capture_output=True, text=True, env=_env(scratch), timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]

    # Exactly one run directory, written by rank 0; the other rank's scratch directory is gone.
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["ddp"]
    assert not list(scratch.glob("edgekd-rank*"))
    run1, run2 = tmp_path / "one" / "ddp", tmp_path / "two" / "ddp"
    metrics1 = json.loads((run1 / "metrics.json").read_text())
    metrics2 = json.loads((run2 / "metrics.json").read_text())
    assert metrics2["distributed"] == {"world_size": 2, "backend": "gloo", "device": "cpu"}
    assert json.loads((run2 / "manifest.json").read_text())["world_size"] == 2
    assert metrics1["distributed"]["world_size"] == 1

    h1, h2 = _history(run1), _history(run2)
    assert [(r["model"], r["epoch"]) for r in h1] == [(r["model"], r["epoch"]) for r in h2]
    for a, b in zip(h1, h2):
        la, lb = float(a["train_loss"]), float(b["train_loss"])
        print(f"{a['model']} epoch {a['epoch']}: loss 1 proc {la:.6f}, 2 procs {lb:.6f}; "
              f"val {a['val_accuracy']} / {b['val_accuracy']}")
        assert abs(la - lb) <= LOSS_RTOL * abs(la)
        assert float(a["val_accuracy"]) == pytest.approx(float(b["val_accuracy"]), abs=1e-9)
    for role in ("teacher", "student"):
        assert metrics1[role]["test_accuracy"] == pytest.approx(metrics2[role]["test_accuracy"], abs=1e-9)
    w1 = torch.load(run1 / "student.pt", weights_only=True)["state_dict"]
    w2 = torch.load(run2 / "student.pt", weights_only=True)["state_dict"]
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-4), k


def test_bf16_autocast_runs_the_training_forward_in_bf16(tmp_path):
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.distill.trainer import fit
    from edgekd.models import build_model
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", limit=300, batch_size=32), seed=0)
    results = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = build_model("mlp", data.input_shape, 10, {"hidden": 16, "depth": 1})
        seen = set()
        model[1].register_forward_hook(lambda m, i, o: seen.add(o.dtype))  # the hidden Linear
        res = fit("student", model, data, TrainConfig(epochs=2, lr=0.01, amp=amp), losses.build("ce"), seed=0,
                  state_path=tmp_path / f"{amp}.pt", quiet=True)
        results[amp] = res
        # Training batches ran in bf16; evaluation (val accuracy) always runs the plain float32 model.
        assert seen == ({torch.float32} if amp == "off" else {torch.bfloat16, torch.float32})
        assert np.isfinite(res.history[-1]["train_loss"])
    a, b = results["off"].history[-1], results["bf16"].history[-1]
    assert a["train_loss"] != b["train_loss"]  # really a different numeric path ...
    assert abs(a["val_accuracy"] - b["val_accuracy"]) < 0.15  # ... that learns about as well
