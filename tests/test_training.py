"""The training library on its own: short runs of any length, and where the tensors of each step live."""

from __future__ import annotations

import math

import pytest
import torch

from click.testing import CliRunner

from conftest import TINY_RECIPE, write_recipe
from edgekd.cli import cli


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def _tiny_data(tmp_path, n_train: int, batch_size: int, augment: str = "none"):
    from edgekd.data import load_data
    from edgekd.recipe import load_recipe

    spec = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "batch_size": batch_size, "augment": augment}}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", spec))
    data = load_data(recipe.data, recipe.seed)
    data.train.indices = data.train.indices[:n_train]
    return data


def _student(data):
    from edgekd.models import create_model

    torch.manual_seed(0)
    return create_model("cnn", tuple(data.input_shape), data.num_classes, width=2, depth=2)


# 4 steps in all is OneCycleLR's one-step warm-up (ZeroDivisionError before the fix); the others surround it.
@pytest.mark.parametrize("epochs,batches", [(1, 1), (1, 4), (4, 1), (2, 2), (1, 3), (3, 3)])
def test_short_runs_train_with_every_scheduler(tmp_path, epochs, batches):
    from edgekd import losses
    from edgekd.recipe import TrainConfig
    from edgekd.training import FitConfig, fit

    data = _tiny_data(tmp_path, n_train=8 * batches - 3, batch_size=8)  # the last batch is partial
    assert math.ceil(len(data.train) / 8) == batches
    for scheduler in ("onecycle", "cosine", "none"):
        model = _student(data)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(epochs=epochs, lr=0.01, scheduler=scheduler)
        res = fit(model, data, losses.build("ce"),
                  FitConfig("student", cfg, seed=0, state_path=tmp_path / f"{scheduler}.pt", quiet=True))
        assert [r["epoch"] for r in res.history] == list(range(1, epochs + 1))
        assert all(math.isfinite(r["train_loss"]) for r in res.history)
        state = torch.load(tmp_path / f"{scheduler}.pt", weights_only=True)
        assert state["scheduler"]["_step_count"] == epochs * batches + 1  # every batch stepped the schedule
        if res.best_epoch:  # the kept weights are trained ones, not the initial ones
            assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distill_cli_with_one_epoch_of_four_batches(tmp_path):
    # The reported crash: `edgekd distill` with 1 epoch on a small split (4 OneCycle steps).
    from edgekd.data import load_data
    from edgekd.recipe import load_recipe

    recipe_path = write_recipe(tmp_path / "r.yaml", teacher={"epochs": 1}, distill={"epochs": 1, "baseline": False})
    n_train = len(load_data(load_recipe(recipe_path).data, 0).train)
    batch = math.ceil(n_train / 4)
    res = run_cli("distill", str(recipe_path), "--out", str(tmp_path / "out"), "-q",
                  "--set", f"data.batch_size={batch}")
    assert res.exit_code == 0, res.output
    run = tmp_path / "out" / "tiny"
    assert (run / "student.pt").is_file()
    for role in ("teacher", "student"):  # each trained exactly the case of the crash: 4 OneCycle steps in all
        state = torch.load(run / "checkpoints" / f"{role}.state.pt", weights_only=True)
        assert state["scheduler"]["_step_count"] == 4 + 1, (role, state["scheduler"])
        assert [row["epoch"] for row in state["history"]] == [1] and math.isfinite(state["history"][0]["train_loss"])


@pytest.mark.parametrize("kind", ["flip", "shift", "strong"])
def test_augmentation_draws_on_cpu_and_lands_on_the_batch_device(tmp_path, kind):
    # The meta device stands in for a GPU: a parameter left on the CPU cannot be combined with a meta batch,
    # so this fails if a random tensor is not moved to the batch's device.
    from edgekd.training import Augmenter

    data = _tiny_data(tmp_path, n_train=5, batch_size=5)
    x = torch.randn(5, *data.input_shape).to("meta")
    y = torch.arange(5).to("meta")
    out, y_out = Augmenter(kind, data, seed=0)(x, y, torch.arange(5), view=0, soft_labels=False)
    assert out.device.type == "meta" and out.dtype == x.dtype and out.shape == x.shape
    assert y_out.device.type == "meta"


def test_augmentations_are_the_documented_transforms(tmp_path):
    from edgekd.data.augment import sample_view
    from edgekd.training import Augmenter

    data = _tiny_data(tmp_path, n_train=2, batch_size=2)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    assert Augmenter("none", data, 0)(x, None, torch.arange(2), 0)[0] is x
    flipped, _ = Augmenter("flip", data, 0)(x, None, torch.arange(2), 0)
    for i in range(2):
        assert torch.allclose(flipped[i], x[i], atol=1e-4) or torch.allclose(flipped[i], x[i].flip(-1), atol=1e-4)
    shifted, _ = Augmenter("shift", data, 3)(x, None, torch.arange(2), 0)
    shifts = sample_view(Augmenter("shift", data, 3).cfg, 2, (8, 8), seed=3, view=0).shift
    for i, (dy, dx) in enumerate(shifts.tolist()):
        expect = torch.zeros(8, 8)
        src = x[i, 0]
        for r in range(8):
            for c in range(8):
                if 0 <= r - dy < 8 and 0 <= c - dx < 8:
                    expect[r, c] = src[r - dy, c - dx]
        assert torch.equal(shifted[i, 0], expect)


def test_every_step_sees_tensors_on_the_model_device(tmp_path):
    # What the loop hands to the loss each step (student logits, teacher targets from the cache, labels) and
    # what the augmentation returns live on the model's device with the expected dtypes.
    from edgekd import losses
    from edgekd.recipe import TrainConfig
    from edgekd.training import Augmenter, CachedLogits, FitConfig, fit
    from edgekd.training.metrics import model_device

    data = _tiny_data(tmp_path, n_train=40, batch_size=16)
    teacher, student = _student(data), _student(data)
    seen = []
    kd = losses.build("kd", temperature=4.0, alpha=0.5)

    class Watch(torch.nn.Module):
        def forward(self, logits, t_logits, y):
            seen.append((logits.device, t_logits.device, t_logits.dtype, y.device, y.dtype))
            return kd(logits, t_logits, y)

    signal = CachedLogits(teacher)
    augmented = []

    plain = Augmenter("none", data, 0)

    def augment(x, y, idx, view, soft_labels=True):
        out = plain(x, y, idx, view, soft_labels)
        augmented.append((out[0].device, out[0].dtype))
        return out

    augment.active = False
    fit(student, data, Watch(), FitConfig("student", TrainConfig(epochs=1, lr=0.01), seed=0,
                                          state_path=tmp_path / "s.pt", quiet=True),
        teacher=signal, augment=augment)
    dev = model_device(student)
    assert signal.cache is not None and signal.cache.device == dev and signal.cache.dtype == torch.float32
    assert len(seen) == 3 and len(augmented) == 3
    assert all(s == (dev, dev, torch.float32, dev, torch.int64) for s in seen)
    assert all(a == (dev, torch.float32) for a in augmented)


def test_teacher_signal_is_chosen_from_loss_cache_and_augmentation():
    from edgekd import losses
    from edgekd.training import CachedLogits, FeatureTeacher, LiveTeacher, NoTeacher, PeerTeacher, choose_signal

    t = torch.nn.Linear(2, 2)
    kd = losses.build("kd")
    assert type(choose_signal(None, kd, cache=True, augmented=False)) is NoTeacher
    assert type(choose_signal(t, kd, cache=True, augmented=False)) is CachedLogits
    assert type(choose_signal(t, kd, cache=True, augmented=True)) is LiveTeacher
    assert type(choose_signal(t, kd, cache=False, augmented=False)) is LiveTeacher
    fitnet = losses.build("fitnets", student_layer="a", teacher_layer="b")
    assert type(choose_signal(t, fitnet, cache=True, augmented=False)) is FeatureTeacher
    peer = PeerTeacher(t)
    assert choose_signal(peer, kd, cache=True, augmented=False) is peer


def test_import_layers_of_the_training_area():
    # The library never imports a stage; prune and sweep reach distill's machinery only through it.
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "edgekd"
    stages = ("edgekd.distill", "edgekd.prune", "edgekd.export", "edgekd.validate", "edgekd.bench",
              "edgekd.report", "edgekd.bundle", "edgekd.sweep", "edgekd.run", "edgekd.cli")

    def imports(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield node.module
            elif isinstance(node, ast.Import):
                yield from (a.name for a in node.names)

    for path in (root / "training").glob("*.py"):
        bad = [m for m in imports(path) if any(m == s or m.startswith(s + ".") for s in stages)]
        assert not bad, f"{path.name} imports stages {bad}"
    for name in ("prune.py", "sweep.py"):
        bad = [m for m in imports(root / name) if m.startswith("edgekd.distill")]
        assert not bad, f"{name} imports {bad}"
