"""Multi-teacher ensembles, online (deep mutual learning) and self-distillation (born-again), end to end."""

import csv
import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from edgekd.cli import cli

from conftest import TINY_RECIPE

FAST = {"dataset": "digits", "batch_size": 64, "limit": 700}


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def _recipe(tmp_path, drop_teacher=False, **sections):
    """The tiny recipe on a 700-sample digits subset, with sections updated (or replaced, for lists)."""
    r = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    r["data"] = dict(FAST)
    if drop_teacher:
        del r["teacher"]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(r.get(key), dict):
            r[key].update(value)
        else:
            r[key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _history(rd):
    with open(rd / "history.csv") as f:
        return list(csv.DictReader(f))


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_ensemble_combines_logits_or_probabilities_with_weights():
    from edgekd.training import TeacherEnsemble

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = torch.tensor(out)

        def forward(self, x):
            return self.out.expand(len(x), -1)

    a, b = [2.0, 0.0, -1.0], [0.0, 1.0, 1.0]
    x = torch.zeros(2, 1)
    mean = TeacherEnsemble([Fixed(a), Fixed(b)], [0.25, 0.75])(x)
    assert mean[0].tolist() == pytest.approx([0.25 * p + 0.75 * q for p, q in zip(a, b)])
    probs = TeacherEnsemble([Fixed(a), Fixed(b)], [0.25, 0.75], space="probs")(x)

    def softmax(v):
        e = [math.exp(t) for t in v]
        return [t / sum(e) for t in e]

    want = [0.25 * p + 0.75 * q for p, q in zip(softmax(a), softmax(b))]
    assert probs.softmax(1)[1].tolist() == pytest.approx(want, rel=1e-6)
    equal = TeacherEnsemble([Fixed(a), Fixed(b)])(x)
    assert equal[0].tolist() == pytest.approx([(p + q) / 2 for p, q in zip(a, b)])
    with pytest.raises(ValueError, match="sum to 1"):
        TeacherEnsemble([Fixed(a), Fixed(b)], [0.5, 0.7])


def test_multi_teacher_run_trains_each_teacher_and_learns_from_their_weighted_targets(tmp_path):
    from edgekd.data import load_data
    from edgekd.training import TeacherEnsemble
    from edgekd.training import evaluate
    from edgekd.models import build_model, load_weights
    from edgekd.recipe import load_recipe

    teachers = [{"model": "cnn", "kwargs": {"width": 4, "depth": 2}, "epochs": 2, "lr": 0.01, "weight": 0.25},
                {"model": "mlp", "kwargs": {"hidden": 64}, "epochs": 2, "lr": 0.01, "weight": 0.75}]
    recipe = _recipe(tmp_path, drop_teacher=True, teachers=teachers, distill={"epochs": 2, "baseline": False})
    res = run_cli("distill", str(recipe), "--out", str(tmp_path / "o"), "-q")
    assert res.exit_code == 0, res.output
    rd = tmp_path / "o" / "tiny"
    assert (rd / "teacher.pt").is_file() and (rd / "teacher2.pt").is_file()
    m = json.loads((rd / "metrics.json").read_text())
    assert m["teacher"]["model"] == "cnn" and m["teacher2"]["model"] == "mlp"
    assert m["teacher_ensemble"]["weights"] == [0.25, 0.75] and m["teacher_ensemble"]["teachers"] == ["teacher", "teacher2"]
    assert {r["model"] for r in _history(rd)} == {"teacher", "teacher2", "student"}
    # The saved recipe mirrors the first teacher in `teacher:` and loads again.
    saved = load_recipe(rd / "recipe.yaml")
    assert saved.teacher.model == "cnn" and len(saved.teachers) == 2
    # The ensemble metric is the real weighted ensemble of the saved teachers.
    data = load_data(saved.data, saved.seed)
    t1 = build_model("cnn", data.input_shape, 10, {"width": 4, "depth": 2})
    t2 = build_model("mlp", data.input_shape, 10, {"hidden": 64})
    load_weights(t1, rd / "teacher.pt")
    load_weights(t2, rd / "teacher2.pt")
    ens = TeacherEnsemble([t1.eval(), t2.eval()], [0.25, 0.75])
    assert evaluate(ens, data, "test")["test_accuracy"] == pytest.approx(m["teacher_ensemble"]["test_accuracy"])


def test_teachers_of_one_architecture_start_from_different_weights(tmp_path):
    from edgekd.data import load_data
    from edgekd.training.roles import build_teachers
    from edgekd.recipe import load_recipe

    same = {"model": "cnn", "kwargs": {"width": 4, "depth": 2}}
    recipe = load_recipe(_recipe(tmp_path, drop_teacher=True, teachers=[same, same]))
    teachers = build_teachers(recipe, load_data(recipe.data, recipe.seed))
    a, b = (t.state_dict() for t in teachers.values())
    assert list(teachers) == ["teacher", "teacher2"]
    assert not torch.equal(a["features.0.weight"], b["features.0.weight"])


def test_online_trains_teacher_and_student_together(tmp_path):
    recipe = _recipe(tmp_path, teacher={"kwargs": {"width": 8, "depth": 2}}, student={"kwargs": {"width": 4, "depth": 2}},
                     distill={"epochs": 3, "baseline": False, "strategy": "online",
                              "loss": {"name": "kd", "temperature": 1.0, "alpha": 0.5}})
    res = run_cli("distill", str(recipe), "--out", str(tmp_path / "o"), "-q")
    assert res.exit_code == 0, res.output
    rd = tmp_path / "o" / "tiny"
    rows = _history(rd)
    # No separate teacher pre-training: both models have exactly distill.epochs rows.
    assert [int(x["epoch"]) for x in rows if x["model"] == "teacher"] == [1, 2, 3]
    assert [int(x["epoch"]) for x in rows if x["model"] == "student"] == [1, 2, 3]
    m = json.loads((rd / "metrics.json").read_text())
    assert m["teacher"]["strategy"] == "online" and m["student"]["strategy"] == "online"
    assert m["teacher"]["test_accuracy"] > 0.3 and m["student"]["test_accuracy"] > 0.3  # chance is 0.1
    from edgekd.models import build_model

    torch.manual_seed(0)
    init = build_model("cnn", (1, 8, 8), 10, {"width": 8, "depth": 2}).state_dict()
    trained = _state(rd / "teacher.pt")
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_online_resume_matches_uninterrupted(tmp_path):
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.models import build_model
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", batch_size=128, limit=400), 0)
    cfg = TrainConfig(epochs=3, lr=0.01)

    def pair():
        torch.manual_seed(0)
        return (build_model("cnn", data.input_shape, 10, {"width": 4, "depth": 2}),
                build_model("cnn", data.input_shape, 10, {"width": 2, "depth": 2}))

    loss = losses.build("kd", temperature=2.0, alpha=0.5)
    ta, sa = pair()
    full = fit(sa, data, loss, FitConfig("student", cfg, seed=0, state_path=tmp_path / "a.pt", quiet=True),
               teacher=PeerTeacher(ta))
    assert full.peer is not None and len(full.peer.history) == 3

    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 1 and row["model"] == "teacher":
            raise Stop

    tb, sb = pair()
    with pytest.raises(Stop):
        fit(sb, data, loss, FitConfig("student", cfg, seed=0, state_path=tmp_path / "b.pt", quiet=True),
            teacher=PeerTeacher(tb), callbacks=[OnEpoch(stop)])
    tb, sb = pair()
    fit(sb, data, loss, FitConfig("student", cfg, seed=0, state_path=tmp_path / "b.pt", quiet=True, resume=True),
        teacher=PeerTeacher(tb))
    for a, b in ((sa, sb), (ta, tb)):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_self_distillation_born_again_generations(tmp_path):
    recipe = _recipe(tmp_path, student={"kwargs": {"width": 4, "depth": 2}},
                     distill={"epochs": 2, "baseline": True, "strategy": "self", "generations": 2})
    res = run_cli("distill", str(recipe), "--out", str(tmp_path / "o"), "-q")
    assert res.exit_code == 0, res.output
    rd = tmp_path / "o" / "tiny"
    # Generation 0 is the baseline's training (same init, data, loss, budget), so its weights are reused.
    t, b = _state(rd / "teacher.pt"), _state(rd / "baseline.pt")
    assert all(torch.equal(t[k], b[k]) for k in t)
    g1, s = _state(rd / "student_gen1.pt"), _state(rd / "student.pt")
    assert any(not torch.equal(g1[k], s[k]) for k in s)
    m = json.loads((rd / "metrics.json").read_text())
    assert m["teacher"]["model"] == "cnn" and m["teacher"]["params"] == m["student"]["params"]
    assert (m["teacher"]["generation"], m["student_gen1"]["generation"], m["student"]["generation"]) == (0, 1, 2)
    assert {x["model"] for x in _history(rd)} == {"baseline", "student_gen1", "student"}
    # Resuming a finished run changes nothing.
    again = run_cli("distill", str(recipe), "--out", str(tmp_path / "o"), "-q", "--resume")
    assert again.exit_code == 0, again.output
    assert all(torch.equal(s[k], _state(rd / "student.pt")[k]) for k in s)


@pytest.mark.parametrize("label,distill,extra,expected", [
    ("online feature loss", {"strategy": "online",
                             "loss": {"name": "fitnets", "student_layer": "features.6", "teacher_layer": "features.6"}},
     {}, "online supports losses on logits only"),
    ("online no labels", {"strategy": "online", "loss": {"name": "kd", "alpha": 1.0}}, {},
     "only imitate each other"),
    ("self with ensemble", {"strategy": "self"}, {"teachers": [{"model": "cnn"}, {"model": "mlp"}]},
     "uses one teacher"),
    ("ensemble with features", {"loss": {"name": "at", "student_layer": "features.6", "teacher_layer": "features.6"}},
     {"teachers": [{"model": "cnn"}, {"model": "cnn"}]}, "one teacher's layers"),
    ("bad strategy", {"strategy": "mutual"}, {}, "distill.strategy"),
])
def test_strategy_misuse_is_one_line_exit_2(tmp_path, label, distill, extra, expected):
    recipe = _recipe(tmp_path, drop_teacher="teachers" in extra, distill=distill, **extra)
    res = run_cli("distill", str(recipe), "--out", str(tmp_path / "o"), "-q")
    msg = res.output.strip()
    assert res.exit_code == 2, (label, res.output)
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1 and expected in msg, (label, msg)
    assert not (tmp_path / "o").exists(), label
