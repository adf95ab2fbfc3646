"""End-to-end `edgekd distill` through the CLI, and its answers to bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekd.cli import cli

from conftest import TINY_RECIPE, write_recipe


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


HELP_PROBE = """
import sys
before = set(sys.modules)
from edgekd.cli import main
sys.argv = ["edgekd", "--help"]
try:
    main()
except SystemExit:
    pass
print(sorted({m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))
"""


def test_help_imports_only_click_and_edgekd():
    """``edgekd --help`` stays quick because it imports no heavy library (torch alone takes seconds to import):
    the packages it loads beyond the standard library are counted, not timed."""
    out = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, check=True)
    assert "distill" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "['click', 'edgekd']"


def test_distill_end_to_end_on_tiny_recipe(tmp_path, tiny_recipe):
    res = run_cli("distill", str(tiny_recipe), "--out", str(tmp_path / "out"), "-q", "--set", "distill.epochs=2")
    assert res.exit_code == 0, res.output
    rd = tmp_path / "out" / "tiny"
    for f in ("recipe.yaml", "manifest.json", "metrics.json", "history.csv", "teacher.pt", "baseline.pt",
              "student.pt", "labels.txt", "eval.npz", "data.json"):
        assert (rd / f).is_file(), f
    metrics = json.loads((rd / "metrics.json").read_text())
    for role in ("teacher", "baseline", "student"):
        m = metrics[role]
        assert 0.0 <= m["test_accuracy"] <= 1.0
        for key in ("precision_macro", "recall_macro", "f1_macro", "params", "macs", "train_seconds"):
            assert key in m, (role, key)
    assert metrics["teacher"]["params"] > metrics["student"]["params"]
    assert metrics["teacher"]["test_accuracy"] > 0.5  # digits: a 3-epoch CNN is far above chance (0.1)
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "done"
    assert "sha256" in manifest["artifacts"]["student.pt"]
    history = (rd / "history.csv").read_text().splitlines()
    assert history[0].startswith("model,epoch,train_loss,val_accuracy")
    assert len(history) == 1 + 3 + 2 + 2  # teacher 3 epochs, baseline and student 2 each
    ev = np.load(rd / "eval.npz")
    assert ev["x"].shape[1:] == (1, 8, 8) and len(ev["x"]) == len(ev["y"]) == 360
    assert "KD vs scratch" in res.output and str(rd) in res.output
    # A second run with the same name does not overwrite the first.
    res2 = run_cli("distill", str(tiny_recipe), "--out", str(tmp_path / "out"), "-q",
                   "--set", "distill.epochs=1", "--set", "distill.baseline=false", "--set", "teacher.epochs=1")
    assert res2.exit_code == 0, res2.output
    assert (tmp_path / "out" / "tiny-2" / "student.pt").is_file()
    assert "name: tiny-2" in (tmp_path / "out" / "tiny-2" / "recipe.yaml").read_text()
    assert json.loads((rd / "metrics.json").read_text()) == metrics


def test_kd_student_uses_teacher(tiny_run):
    """The distilled student is closer to the teacher than the scratch baseline: it differs from the baseline
    (same initial weights, data order and epochs: only the teacher's signal can make them differ), its predicted
    distribution on the test split is nearer the teacher's (KL), and it agrees with the teacher at least as often.
    A KD loss that ignored the teacher left the student bit-equal to the baseline and passed the old agreement-only
    check."""
    import torch.nn.functional as F

    from edgekd.data import load_data
    from edgekd.training import predict_logits
    from edgekd.models import build_model, load_weights
    from edgekd.recipe import load_recipe

    r = load_recipe(tiny_run / "recipe.yaml")
    data = load_data(r.data, r.seed)
    logits, weights = {}, {}
    for role in ("teacher", "baseline", "student"):
        spec = r.teacher if role == "teacher" else r.student
        m = build_model(spec.model, data.input_shape, data.num_classes, spec.kwargs)
        load_weights(m, tiny_run / f"{role}.pt")
        weights[role] = [p.detach().clone() for p in m.parameters()]
        logits[role] = predict_logits(m, data.loader("test", 256))[0]
    assert any(not torch.equal(a, b) for a, b in zip(weights["student"], weights["baseline"]))
    target = F.log_softmax(logits["teacher"], 1)

    def kl(role: str) -> float:  # KL(teacher || role) on the test split, mean over samples
        return F.kl_div(F.log_softmax(logits[role], 1), target, log_target=True, reduction="batchmean").item()

    assert kl("student") < kl("baseline"), (kl("student"), kl("baseline"))
    preds = {k: v.argmax(1) for k, v in logits.items()}
    agree_kd = (preds["student"] == preds["teacher"]).float().mean()
    agree_scratch = (preds["baseline"] == preds["teacher"]).float().mean()
    assert agree_kd >= agree_scratch


def test_resume_skips_finished_models(tmp_path, tiny_recipe):
    out = str(tmp_path / "out")
    assert run_cli("distill", str(tiny_recipe), "--out", out, "-q", "--set", "distill.baseline=false").exit_code == 0
    rd = tmp_path / "out" / "tiny"
    before = (rd / "teacher.pt").stat().st_mtime_ns, (rd / "student.pt").read_bytes()
    res = run_cli("distill", str(tiny_recipe), "--out", out, "-q", "--resume", "--set", "distill.baseline=false")
    assert res.exit_code == 0, res.output
    assert (rd / "teacher.pt").stat().st_mtime_ns == before[0]
    assert (rd / "student.pt").read_bytes() == before[1]
    assert not (tmp_path / "out" / "tiny-2").exists()
    other = run_cli("distill", str(tiny_recipe), "--out", out, "-q", "--resume", "--set", "distill.epochs=9")
    assert other.exit_code == 2 and "differs" in other.output and "distill.epochs" in other.output
    nothing = run_cli("distill", str(tiny_recipe), "--out", str(tmp_path / "empty"), "-q", "--resume")
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, tiny_recipe):
    """Stop the student after epoch 1 (an exception from inside training), resume, compare weights."""
    model_file = tmp_path / "stopper.py"
    model_file.write_text(
        "import os, torch.nn as nn\n"
        "from edgekd.models import create_model\n"
        "class Stopper(nn.Module):\n"
        "    def __init__(self, inner):\n"
        "        super().__init__(); self.inner = inner; self.calls = 0\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            self.calls += 1\n"
        "            if os.environ.get('EDGEKD_TEST_STOP') and self.calls > int(os.environ['EDGEKD_TEST_STOP']):\n"
        "                raise KeyboardInterrupt\n"
        "        return self.inner(x)\n"
        "def net(input_shape, num_classes, **kwargs):\n"
        "    return Stopper(create_model('cnn', input_shape, num_classes, **kwargs))\n")
    args = ["--set", f"student.model={model_file}:net", "--set", "distill.baseline=false", "-q"]
    full = run_cli("distill", str(tiny_recipe), "--out", str(tmp_path / "a"), *args)
    assert full.exit_code == 0, full.output
    import os

    os.environ["EDGEKD_TEST_STOP"] = "30"  # digits train split: 22 batches per epoch → stops in epoch 2
    try:
        stopped = run_cli("distill", str(tiny_recipe), "--out", str(tmp_path / "b"), *args)
    finally:
        del os.environ["EDGEKD_TEST_STOP"]
    assert stopped.exit_code == 130 and "--resume" in stopped.output
    assert not (tmp_path / "b" / "tiny" / "student.pt").exists()
    resumed = run_cli("distill", str(tiny_recipe), "--out", str(tmp_path / "b"), "--resume", *args)
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(tmp_path / "a" / "tiny" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "tiny" / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pickled_checkpoint(path: Path) -> Path:
    from edgekd.models import create_model

    torch.save(create_model("cnn", (1, 8, 8), 10, width=8, depth=2), path)  # a whole module: needs pickle
    return path


def _bad_cases(tmp: Path):
    (tmp / "empty.yaml").write_text("")
    (tmp / "broken.yaml").write_text("data: {dataset: digits\n")
    (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04garbage")
    (tmp / "tab.npz").write_bytes(b"")
    np.savez(tmp / "tabular.npz", x=np.zeros((40, 5), np.float32), y=np.arange(40) % 2)
    nan_model = tmp / "nanmodel.py"
    nan_model.write_text(
        "import torch, torch.nn as nn\n"
        "class N(nn.Module):\n"
        "    def __init__(s, n):\n        super().__init__(); s.l = nn.Linear(64, n); s.calls = 0\n"
        "    def forward(s, x):\n"
        "        s.calls += 1\n"
        "        y = s.l(x.flatten(1))\n"
        "        return y * float('nan') if s.training and s.calls > 30 else y\n"
        "def net(num_classes, **kwargs):\n    return N(num_classes)\n")
    r = str(write_recipe(tmp / "ok.yaml"))
    return {
        "missing recipe": ([str(tmp / "nope.yaml")], "not found"),
        "empty recipe": ([str(tmp / "empty.yaml")], "is empty"),
        "invalid yaml": ([str(tmp / "broken.yaml")], "not valid YAML"),
        "unknown key": ([r, "--set", "distill.temprature=3"], "unknown key"),
        "wrong type": ([r, "--set", "distill.epochs=lots"], "distill.epochs"),
        "unknown dataset": ([r, "--set", "data.dataset=cifar"], "unknown dataset"),
        "unknown model": ([r, "--set", "student.model=resnet9000"], "unknown model"),
        "unknown loss": ([r, "--set", "distill.loss.name=kdd"], "unknown loss"),
        "missing checkpoint": ([r, "--set", f"teacher.checkpoint={tmp}/none.pt"], "not found"),
        "corrupt checkpoint": ([r, "--set", f"teacher.checkpoint={tmp}/corrupt.pt"], "corrupt"),
        "pickle checkpoint": ([r, "--set", f"teacher.checkpoint={_pickled_checkpoint(tmp / 'whole.pt')}"],
                              "--allow-pickle"),
        "data does not fit model": ([r, "--set", f"data.dataset=npz", "--set", f"data.path={tmp}/tabular.npz"],
                                    "needs image inputs"),
        "empty npz": ([r, "--set", "data.dataset=npz", "--set", f"data.path={tmp}/tab.npz"], "not a readable"),
        "bad --set": ([r, "--set", "epochs"], "section.key=value"),
        "ratio out of range": ([r, "--set", "data.test_fraction=1.5"], "data.test_fraction"),
        "nan loss": ([r, "--set", f"teacher.model={nan_model}:net", "--set", "teacher.epochs=3"],
                     "loss became nan at epoch 2"),
    }


def test_bad_input_gives_one_line_exit_2_and_no_model_file(tmp_path):
    cases = _bad_cases(tmp_path)
    for label, (args, expected) in cases.items():
        out = tmp_path / f"out-{label.replace(' ', '_')}"
        res = run_cli("distill", *args, "--out", str(out), "-q")
        msg = res.output.strip()
        assert res.exit_code == 2, (label, res.exit_code, res.output)
        assert "Traceback" not in res.output, label
        assert expected in msg, (label, msg)
        assert len(msg.splitlines()) == 1, (label, msg)
        assert msg.startswith("error: "), (label, msg)
        written = [p.name for p in out.rglob("*.pt") if p.parent.name != "checkpoints"] if out.exists() else []
        assert written == [], (label, written)


def test_nan_keeps_last_good_epoch_checkpoint(tmp_path):
    args, _ = _bad_cases(tmp_path)["nan loss"]
    res = run_cli("distill", *args, "--out", str(tmp_path / "o"), "-q")
    assert res.exit_code == 2
    state = torch.load(tmp_path / "o" / "tiny" / "checkpoints" / "teacher.state.pt", weights_only=True)
    assert state["epoch"] == 1


def test_allow_pickle_opt_in_loads_whole_module_checkpoint(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", teacher={"checkpoint": str(_pickled_checkpoint(tmp_path / "whole.pt"))},
                     distill={"epochs": 1, "baseline": False})
    res = run_cli("distill", str(r), "--out", str(tmp_path / "o"), "-q", "--allow-pickle")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "tiny" / "metrics.json").read_text())["teacher"]["train_seconds"] == 0.0


def test_python_dash_m_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgekd", "losses"], capture_output=True, text=True)
    assert out.returncode == 0 and "kd" in out.stdout
