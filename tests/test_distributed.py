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
from edgekd.training import parallel as distributed
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
    # (torch.distributed.elastic's ChildFailedError), which holds no edgekd frame. torchrun stops the other worker
    # as soon as one fails, so the second line may never be printed (CI saw one of two): count 1 or 2.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, errors
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
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.models import build_model
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", limit=300, batch_size=32), seed=0)
    results = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = build_model("mlp", data.input_shape, 10, {"hidden": 16, "depth": 1})
        seen = set()
        model[1].register_forward_hook(lambda m, i, o: seen.add(o.dtype))  # the hidden Linear
        res = fit(model, data, losses.build("ce"), FitConfig("student", TrainConfig(epochs=2, lr=0.01, amp=amp), seed=0,
                  state_path=tmp_path / f"{amp}.pt", quiet=True))
        results[amp] = res
        # Training batches ran in bf16; evaluation (val accuracy) always runs the plain float32 model.
        assert seen == ({torch.float32} if amp == "off" else {torch.bfloat16, torch.float32})
        assert np.isfinite(res.history[-1]["train_loss"])
    a, b = results["off"].history[-1], results["bf16"].history[-1]
    assert a["train_loss"] != b["train_loss"]  # really a different numeric path ...
    assert abs(a["val_accuracy"] - b["val_accuracy"]) < 0.15  # ... that learns about as well


# -- prune under DDP, resume under torchrun, fp16 ----------------------------------------------------------

def _torchrun(args: list[str], tmp: Path, **kw) -> subprocess.CompletedProcess:
    # The run directory is given with --out (latest run): torchrun's own parser would take `--run` for its
    # `--run-path` option (argparse prefix matching), even after the script name.
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "edgekd", *args],
                          capture_output=True, text=True, env=_env(tmp), timeout=600, **kw)


@pytest.mark.slow
def test_two_process_gloo_prune_matches_one_process(tmp_path):
    import shutil

    from edgekd.prune import load_pruned

    # The mlp student (hidden 16) loses half its hidden units in 2 steps, each fine-tuned by KD for 2 epochs.
    recipe = _recipe(tmp_path / "r.yaml", student={"kwargs": {"hidden": 16, "depth": 1}})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "one"), "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    prune_args = ["prune", "--ratio", "0.5", "--steps", "2", "--finetune-epochs", "2", "-q"]
    one = subprocess.run([sys.executable, "-m", "edgekd", *prune_args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=_env(scratch), timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun([*prune_args, "--out", str(tmp_path / "two")], scratch)
    assert two.returncode == 0, two.stderr[-2000:]

    # One summary (rank 0), one pruned file, the other rank's scratch checkpoints gone.
    assert two.stdout.count("pruned student written to") == 1
    run1, run2 = tmp_path / "one" / "ddp", tmp_path / "two" / "ddp"
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["ddp"]
    assert sorted(p.name for p in run2.glob("*pruned*")) == ["student_pruned.pt"]
    assert sorted(p.name for p in (run2 / "checkpoints").glob("prune_step*")) == [
        "prune_step1.state.pt", "prune_step2.state.pt"]
    assert not list(scratch.glob("edgekd-rank*"))

    m1 = json.loads((run1 / "metrics.json").read_text())["student_pruned"]
    m2 = json.loads((run2 / "metrics.json").read_text())["student_pruned"]
    assert (m1["world_size"], m1["backend"]) == (1, None)
    assert (m2["world_size"], m2["backend"], m2["device"]) == (2, "gloo", "cpu")
    stage = json.loads((run2 / "manifest.json").read_text())["stages"]["prune"]
    assert stage["status"] == "done" and stage["world_size"] == 2
    # The same channels were removed, then fine-tuning on 2 ranks x 25 samples gave the 1 x 50 result up to
    # float summation order.
    assert m1["channels"] == m2["channels"] == {"1": [16, 8], "3": [10, 10]}
    print(f"prune test accuracy: 1 proc {m1['test_accuracy']:.4f}, 2 procs {m2['test_accuracy']:.4f}; "
          f"step val accuracy {[s['val_accuracy'] for s in m1['step_log']]} / "
          f"{[s['val_accuracy'] for s in m2['step_log']]}")
    assert m1["test_accuracy"] == pytest.approx(m2["test_accuracy"], abs=1e-9)
    assert [s["val_accuracy"] for s in m1["step_log"]] == [s["val_accuracy"] for s in m2["step_log"]]
    w1 = load_pruned(run1 / "student_pruned.pt").state_dict()
    w2 = load_pruned(run2 / "student_pruned.pt").state_dict()
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"max |w_1proc - w_2proc| = {diff:.2e}")
    assert diff < 1e-5

    # Resuming a prune is single-process only: refused in one line per rank, the finished run untouched.
    from edgekd.run_dir import sha256_file

    sha = sha256_file(run2 / "student_pruned.pt")
    again = _torchrun([*prune_args, "--resume", "--out", str(tmp_path / "two")], scratch)
    assert again.returncode != 0
    assert again.stderr.count("error: prune --resume is not supported under torchrun") == 2, again.stderr[-2000:]
    assert sha256_file(run2 / "student_pruned.pt") == sha


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _state_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not there yet, or being replaced
        return 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_distill_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    import signal
    import time

    # Batch 10 -> 70 steps per epoch: slow enough (~0.2 s) to kill the job between epochs 1 and 30.
    recipe = _recipe(tmp_path / "r.yaml", data={"batch_size": 10}, student={"kwargs": {"hidden": 16, "depth": 1}},
                     distill={"epochs": 30})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    full = _torchrun(["distill", str(recipe), "--out", str(tmp_path / "full"), "-q"], scratch)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "cut"
    state_path = out / "ddp" / "checkpoints" / "student.state.pt"
    job = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "edgekd", "distill",
                            str(recipe), "--out", str(out), "-q"], env=_env(scratch), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _state_epoch(state_path) < 1 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        # torchrun starts each worker in a session of its own: kill the whole tree, as a crash would.
        for pid in reversed(_process_tree(job.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait(timeout=60)
    time.sleep(0.5)
    stopped_at = _state_epoch(state_path)
    assert 1 <= stopped_at < 30, f"the job was not interrupted mid-run (checkpoint epoch {stopped_at})"
    assert not (out / "ddp" / "student.pt").exists()
    before = torch.load(state_path, map_location="cpu", weights_only=True)["history"]

    resumed = _torchrun(["distill", str(recipe), "--out", str(out), "--resume"], scratch)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # It went on from the checkpoint: no teacher retraining, no student epoch 1, the first new epoch next ...
    assert "teacher epoch" not in resumed.stdout
    assert "student epoch 1/30 " not in resumed.stdout
    assert f"student epoch {stopped_at + 1}/30 " in resumed.stdout
    # ... keeping the epochs already done as they were (their timings would differ if they had been rerun) ...
    after = [r for r in _history(out / "ddp") if r["model"] == "student"]
    assert len(after) == 30
    for old, new in zip(before, after):
        assert float(new["seconds"]) == pytest.approx(old["seconds"], rel=1e-9)
    # ... and ended exactly where the uninterrupted 2-process run ended.
    w_full = torch.load(tmp_path / "full" / "ddp" / "student.pt", weights_only=True)["state_dict"]
    w_res = torch.load(out / "ddp" / "student.pt", weights_only=True)["state_dict"]
    diff = max((w_full[k] - w_res[k]).abs().max().item() for k in w_full)
    print(f"killed after student epoch {stopped_at}/30; max |w_uninterrupted - w_resumed| = {diff:.2e}")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    h_full = [r for r in _history(tmp_path / "full" / "ddp") if r["model"] == "student"]
    assert [r["val_accuracy"] for r in h_full] == [r["val_accuracy"] for r in after]
    assert json.loads((out / "ddp" / "metrics.json").read_text())["distributed"]["world_size"] == 2


def test_torchrun_resume_of_a_missing_run_is_a_one_line_error_on_every_rank(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml")
    proc = _torchrun(["distill", str(recipe), "--out", str(tmp_path / "out"), "--resume", "-q"], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("error: nothing to resume:") == 2  # both ranks stop; neither waits for the other
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "/edgekd/" in line]
    assert not (tmp_path / "out").exists()


class _Stop(Exception):
    pass


def test_fp16_autocast_trains_on_cpu_with_a_grad_scaler_and_resumes_exactly(tmp_path):
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.models import build_model
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", limit=300, batch_size=32), seed=0)
    cfg = TrainConfig(epochs=3, lr=0.05, amp="fp16")

    def model_and_dtypes():
        torch.manual_seed(0)
        model = build_model("mlp", data.input_shape, 10, {"hidden": 16, "depth": 1})
        seen: set = set()
        model[1].register_forward_hook(lambda m, i, o: seen.add(o.dtype))  # the hidden Linear
        return model, seen

    model, seen = model_and_dtypes()
    full = fit(model, data, losses.build("ce"), FitConfig("student", cfg, seed=0, state_path=tmp_path / "full.pt", quiet=True))
    assert torch.float16 in seen  # the training forward really ran in fp16 on the CPU
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # loss scaling was on and is checkpointed
    losses_ = [row["train_loss"] for row in full.history]
    print(f"fp16 CPU: train loss {losses_}, val accuracy {[r['val_accuracy'] for r in full.history]}")
    assert losses_[-1] < losses_[0] * 0.5 and full.best_val_accuracy > 0.7  # it learns (fp32: 0.497, 0.833)
    model32, seen32 = model_and_dtypes()
    fp32 = fit(model32, data, losses.build("ce"), FitConfig("student", cfg.model_copy(update={"amp": "off"}), seed=0,
               state_path=tmp_path / "fp32.pt", quiet=True))
    assert seen32 == {torch.float32} and "scaler" not in torch.load(tmp_path / "fp32.pt", weights_only=True)
    assert fp32.history[-1]["train_loss"] != losses_[-1]  # a different numeric path ...
    assert abs(fp32.best_val_accuracy - full.best_val_accuracy) < 0.1  # ... that learns as well

    # Stopped after epoch 1 and resumed: the same weights as the uninterrupted run (scaler + RNG restored).
    def stop_after_first(row):
        if row["epoch"] == 1:
            raise _Stop
    model, _ = model_and_dtypes()
    with pytest.raises(_Stop):
        fit(model, data, losses.build("ce"), FitConfig("student", cfg, seed=0, state_path=tmp_path / "cut.pt", quiet=True),
            callbacks=[OnEpoch(stop_after_first)])
    model, _ = model_and_dtypes()
    resumed = fit(model, data, losses.build("ce"), FitConfig("student", cfg, seed=0, state_path=tmp_path / "cut.pt",
                  quiet=True, resume=True))
    assert [r["train_loss"] for r in resumed.history] == losses_
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


# A student factory whose classifier reports, for every training step, the dtype of its output (the logits)
# and the largest gradient that reached it in backward (one line per step, to the file named in the environment).
FP16_PROBE = """
import os
from edgekd.models import create_model

def net(input_shape, num_classes, **kwargs):
    model = create_model("mlp", input_shape, num_classes, **kwargs)

    def seen(module, inputs, logits):
        if module.training:  # evaluation runs the plain float32 model
            def grad(g):
                with open(os.environ["EDGEKD_TEST_PROBE"], "a") as f:
                    f.write(f"{logits.dtype} {g.abs().max().item()}\\n")
            logits.register_hook(grad)
    model[-1].register_forward_hook(seen)
    return model
"""


def test_fp16_recipe_through_the_cli(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(FP16_PROBE)
    monkeypatch.setenv("EDGEKD_TEST_PROBE", str(tmp_path / "seen.txt"))
    recipe = _recipe(tmp_path / "r.yaml", teacher={"epochs": 1, "amp": "fp16"}, distill={"epochs": 1, "amp": "fp16"},
                     student={"model": f"{probe}:net"})
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out"), "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "out" / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"]["test_accuracy"] > 0.5
    steps = [line.split() for line in (tmp_path / "seen.txt").read_text().splitlines()]
    assert len(steps) == 14  # 700 training samples in batches of 50: one line per step
    # Autocast: the student's logits were float16 in every training step ...
    assert {dtype for dtype, _ in steps} == {"torch.float16"}
    # ... and the loss was scaled: the KD loss is a batch mean, so its unscaled gradient on a logit is at most
    # (alpha * T + 1 - alpha) / batch = 3.7 / 50; scaled by 2**16 it is far above 1 (measured: hundreds).
    assert min(float(g) for _, g in steps) > 1.0, steps
    for role in ("teacher", "student"):  # both trained with a grad scaler that stepped without overflow
        scaler = torch.load(run / "checkpoints" / f"{role}.state.pt", weights_only=True)["scaler"]
        assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 14, (role, scaler)
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out"), "-q",
                                   "--set", "distill.amp=fp8"])
    assert res.exit_code == 2 and "distill.amp" in res.output


def test_prune_on_a_forced_cuda_device_without_gpu_is_refused_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from edgekd.prune import run_prune

    with pytest.raises(RecipeError, match="--device cuda: no CUDA device"):
        run_prune(tmp_path / "no-run", device="cuda")
    assert distributed.device() == torch.device("cpu") and not distributed.is_distributed()
