"""Feature-based KD end to end: mismatched widths train through a learned projection, hooks never reach the
exported student, and bad feature settings are one-line errors."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekd.cli import cli

from conftest import write_recipe

# Tiny recipe: teacher cnn width 8, student width 2 → features.6 (last ReLU) is 16 vs 4 channels at 4x4.
FITNETS = {"name": "combined", "terms": [
    {"name": "kd", "temperature": 4.0, "alpha": 1.0},
    {"name": "fitnets", "weight": 1.0, "student_layer": "features.6", "teacher_layer": "features.6"},
]}


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def fitnets_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitnets")
    recipe = write_recipe(root / "r.yaml", teacher={"epochs": 2},
                          distill={"epochs": 3, "baseline": False, "loss": FITNETS})
    res = run_cli("distill", str(recipe), "--out", str(root / "out"), "-q")
    assert res.exit_code == 0, res.output
    return root / "out" / "tiny"


def test_mismatched_widths_train_through_a_projection_kept_out_of_student_pt(fitnets_run):
    from edgekd.models import build_model, load_weights

    metrics = json.loads((fitnets_run / "metrics.json").read_text())
    assert metrics["student"]["test_accuracy"] > 0.3  # digits: chance is 0.1
    assert metrics["student"]["loss"]["terms"][1]["name"] == "fitnets"
    saved = torch.load(fitnets_run / "student.pt", weights_only=True)["state_dict"]
    assert not any("projection" in k for k in saved)
    plain = build_model("cnn", (1, 8, 8), 10, {"width": 2, "depth": 2})
    assert set(saved) == set(plain.state_dict())  # exactly the plain architecture
    load_weights(plain, fitnets_run / "student.pt")  # strict load
    # The projection was trained (it lives in the resumable training state only): 4 → 16 channels 1x1 conv.
    state = torch.load(fitnets_run / "checkpoints" / "student.state.pt", weights_only=True)
    proj = state["loss_state"]["terms.1.projections.0.weight"]
    assert tuple(proj.shape) == (16, 4, 1, 1)
    from edgekd import losses

    fresh = losses.build_from_config(FITNETS)
    from edgekd.training.features import setup_feature_loss

    teacher = build_model("cnn", (1, 8, 8), 10, {"width": 8, "depth": 2})
    setup_feature_loss(fresh, plain, teacher, torch.zeros(1, 1, 8, 8), seed=0)
    assert not torch.equal(fresh.state_dict()["terms.1.projections.0.weight"], proj)


def test_feature_kd_student_exports_to_onnx_with_identical_outputs(fitnets_run, tmp_path):
    import onnx
    import onnxruntime as ort

    from edgekd.models import build_model, load_weights

    plain = build_model("cnn", (1, 8, 8), 10, {"width": 2, "depth": 2})
    load_weights(plain, fitnets_run / "student.pt")
    plain.eval()
    x = torch.from_numpy(np.load(fitnets_run / "eval.npz")["x"][:16])
    path = tmp_path / "student.onnx"
    torch.onnx.export(plain, (x[:1],), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    graph = onnx.load(str(path)).graph
    n_params = sum(int(np.prod(i.dims)) for i in graph.initializer)
    assert n_params <= sum(p.numel() for p in plain.state_dict().values())  # nothing of the 16-channel projection
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = plain(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fit_removes_hooks_and_returns_the_plain_student(tmp_path):
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.models import build_model
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", batch_size=64), 0)
    torch.manual_seed(0)
    teacher = build_model("cnn", data.input_shape, 10, {"width": 8, "depth": 2}).eval()
    student = build_model("cnn", data.input_shape, 10, {"width": 4, "depth": 2})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    layers = ["features.2", "features.6"]
    loss = losses.build("at", student_layer=layers, teacher_layer=layers)
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])

    def attention_gap() -> float:
        from edgekd.training.features import FeatureTap

        student.eval()
        with torch.no_grad(), FeatureTap(student, layers, "student") as ts, FeatureTap(teacher, layers, "teacher") as tt:
            student(x)
            teacher(x)
            return loss(x[:0].new_zeros(1, 10), None, None, features=losses.Features(ts.take(), tt.take())).item()

    loss.ce_weight = 0.0
    gap_before = attention_gap()
    loss.ce_weight = 1.0
    seen = []
    fit(student, data, loss, FitConfig("student", TrainConfig(epochs=2, lr=0.02), seed=0, state_path=tmp_path / "s.pt",
        quiet=True), teacher=teacher, callbacks=[OnEpoch(seen.append)])
    assert _hooks(student) == 0 and _hooks(teacher) == 0
    loss.ce_weight = 0.0
    assert attention_gap() < 0.5 * gap_before  # the attention term did its job on held-out samples
    assert len(seen) == 2
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert set(student.state_dict()) == set(before)
    exported = torch.export.export(student.eval(), (torch.zeros(1, 1, 8, 8),))
    assert not any("hook" in str(n.target) for n in exported.graph.nodes)


def test_feature_kd_resume_restores_projection_and_matches_uninterrupted(tmp_path):
    """Two epochs, then two more from the checkpoint == four epochs straight (projection state included)."""
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.models import build_model
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", batch_size=128, limit=400), 0)

    def models():
        torch.manual_seed(0)
        return (build_model("cnn", data.input_shape, 10, {"width": 4, "depth": 2}),
                build_model("cnn", data.input_shape, 10, {"width": 2, "depth": 2}))

    def loss():
        return losses.build("fitnets", student_layer="features.6", teacher_layer="features.6")

    teacher, a = models()
    fit(a, data, loss(), FitConfig("s", TrainConfig(epochs=4, lr=0.01), seed=0, state_path=tmp_path / "a.pt",
        quiet=True), teacher=teacher)
    teacher, b = models()

    class Stop(Exception):
        pass

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(b, data, loss(), FitConfig("s", TrainConfig(epochs=4, lr=0.01), seed=0, state_path=tmp_path / "b.pt",
            quiet=True), teacher=teacher, callbacks=[OnEpoch(stop_after_2)])
    teacher, b = models()
    fit(b, data, loss(), FitConfig("s", TrainConfig(epochs=4, lr=0.01), seed=0, state_path=tmp_path / "b.pt",
        quiet=True, resume=True), teacher=teacher)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _bad(tmp_path, label, **changes):
    recipe = write_recipe(tmp_path / f"{label}.yaml", **changes)
    out = tmp_path / f"out-{label}"
    res = run_cli("distill", str(recipe), "--out", str(out), "-q")
    msg = res.output.strip()
    assert res.exit_code == 2, (label, res.output)
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1 and "Traceback" not in msg, (label, msg)
    assert not out.exists() or not list(out.rglob("*.pt")), label
    return msg


def test_feature_layer_that_does_not_exist_lists_close_matches(tmp_path):
    loss = {"name": "fitnets", "student_layer": "feature.6", "teacher_layer": "features.6"}
    msg = _bad(tmp_path, "path", distill={"loss": loss})
    assert "student has no module 'feature.6'" in msg and "features.6" in msg and "close matches" in msg
    loss = {"name": "at", "student_layer": "features.6", "teacher_layer": "classifer"}
    msg = _bad(tmp_path, "tpath", distill={"loss": loss})
    assert "teacher has no module 'classifer'" in msg and "classifier" in msg


def test_bad_losses_and_weights_are_one_line_exit_2(tmp_path):
    assert "unknown loss 'fitnest'" in _bad(tmp_path, "name", distill={"loss": {"name": "fitnest"}})
    assert "did you mean 'fitnets'" in _bad(tmp_path, "name2", distill={"loss": {"name": "fitnest"}})
    neg = {"name": "combined", "terms": [{"name": "kd", "weight": -0.5}, {"name": "rkd", "weight": 1.5}]}
    assert "finite number >= 0" in _bad(tmp_path, "neg", distill={"loss": neg})
    twice = {"name": "combined", "terms": [{"name": "kd", "alpha": 0.5}, {"name": "dkd"}]}
    assert "counted in 2 terms" in _bad(tmp_path, "twice", distill={"loss": twice})
    teachers = [{"model": "cnn", "kwargs": {"width": 4, "depth": 2}, "weight": 0.7},
                {"model": "cnn", "kwargs": {"width": 8, "depth": 2}, "weight": 0.7}]
    assert "sum to 1.4, not 1" in _bad(tmp_path, "tw", teachers=teachers)
    shapes = {"name": "fitnets", "student_layer": "features.6", "teacher_layer": "classifier"}
    assert "pair two conv maps" in _bad(tmp_path, "shapes", distill={"loss": shapes})


def test_losses_command_lists_the_registry():
    res = run_cli("losses")
    assert res.exit_code == 0
    for name in ("kd", "dkd", "fitnets", "at", "rkd", "sp", "pkt", "combined"):
        assert any(line.split()[0] == name for line in res.output.splitlines()), name
