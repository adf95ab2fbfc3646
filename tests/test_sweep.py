"""`edgekd sweep`: a real Optuna study on tiny digits that runs, stores, resumes, prunes, and never reads test."""

import json

import pytest
import yaml
from click.testing import CliRunner

from edgekd.cli import cli

RECIPE = {
    "name": "sw", "seed": 0,
    "data": {"dataset": "digits", "batch_size": 64, "limit": 400},
    "teacher": {"model": "cnn", "kwargs": {"width": 8, "depth": 2}, "epochs": 3, "lr": 0.01},
    "student": {"model": "cnn", "kwargs": {"width": 4, "depth": 2}},
    "distill": {"epochs": 3, "lr": 0.02, "baseline": False, "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9}},
}


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@pytest.fixture
def splits_read(monkeypatch):
    """Record which data splits are loaded (a spy around the real loader)."""
    from edgekd.data import DataBundle

    seen = set()
    real = DataBundle.loader

    def loader(self, split, *args, **kwargs):
        seen.add(split)
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(DataBundle, "loader", loader)
    return seen


def _study(out, name="sw-sweep"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'study.db').resolve()}")


def test_three_trials_run_store_and_resume_with_more(tmp_path, recipe, splits_read):
    out = tmp_path / "sweep"
    res = run_cli("sweep", str(recipe), "--trials", "3", "--out", str(out), "-q")
    assert res.exit_code == 0, res.output
    assert "best:" in res.output and "best_recipe.yaml" in res.output
    study = _study(out)
    first = [(t.number, t.state.name, t.value, t.params) for t in study.trials]
    assert len(first) == 3 and all(state in ("COMPLETE", "PRUNED") for _, state, _, _ in first)
    for t in study.trials:  # per-epoch validation accuracy reported for the pruner
        assert set(t.intermediate_values) <= {1, 2, 3} and 1 in t.intermediate_values
        assert 1.0 <= t.params["temperature"] <= 20.0 and 0.0 <= t.params["alpha"] <= 1.0
    assert "test" not in splits_read and {"train", "val"} <= splits_read

    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["distill"]["loss"]["name"] == "kd"
    assert best["distill"]["loss"]["temperature"] == pytest.approx(study.best_trial.params["temperature"], abs=1e-5)
    from edgekd.recipe import load_recipe

    assert load_recipe(out / "best_recipe.yaml").distill.loss == best["distill"]["loss"]
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["best"]["val_accuracy"] == pytest.approx(study.best_value)
    teacher_bytes = (out / "teacher.pt").read_bytes()

    # Same command with more trials: the same study continues (first trials untouched, teacher reused).
    again = run_cli("sweep", str(recipe), "--trials", "5", "--out", str(out), "-q")
    assert again.exit_code == 0, again.output
    study = _study(out)
    assert len(study.trials) == 5
    assert [(t.number, t.state.name, t.value, t.params) for t in study.trials[:3]] == first
    assert (out / "teacher.pt").read_bytes() == teacher_bytes
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + 5
    # Asking for what is already there runs nothing.
    done = run_cli("sweep", str(recipe), "--trials", "4", "--out", str(out), "-q")
    assert done.exit_code == 0 and "ran 0 trials" in done.output and len(_study(out).trials) == 5


def test_loss_choice_custom_storage_and_pruning_stops_trials_early(tmp_path, recipe):
    import optuna

    from edgekd.errors import TrainingError
    from edgekd.recipe import load_recipe
    from edgekd.sweep import run_sweep

    r = load_recipe(recipe)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    # A pruner that prunes every trial at its first report: training must stop after epoch 1.
    with pytest.raises(TrainingError, match="none of the 2 trials"):
        run_sweep(r, trials=2, out=tmp_path / "a", storage=storage, study_name="mix", loss_names=["kd", "dkd"],
                  quiet=True, pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study = optuna.load_study(study_name="mix", storage=storage)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [1] for t in study.trials)
    assert all(t.params["loss"] in ("kd", "dkd") for t in study.trials)
    assert not (tmp_path / "a" / "best_recipe.yaml").exists() and (tmp_path / "a" / "trials.png").exists()


@pytest.mark.parametrize("args,expected", [
    (["--losses", "kd,fitnest"], "unknown loss 'fitnest'"),
    (["--losses", "combined"], "cannot tune loss 'combined'"),
    (["--losses", "kd,fitnets"], "make fitnets the recipe's distill.loss"),
    (["--set", "distill.strategy=online", "--set", "distill.loss.alpha=0.5"], "tunes offline distillation"),
    (["--storage", "nosuchdb://x/y"], "storage"),
    (["--trials", "0"], "--trials"),
])
def test_bad_sweep_input_is_one_line_exit_2(tmp_path, recipe, args, expected):
    res = run_cli("sweep", str(recipe), "--out", str(tmp_path / "o"), "-q", *args)
    msg = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2, res.output
    assert expected in msg and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o" / "teacher.pt").exists()


def test_continuing_a_study_with_another_recipe_is_refused(tmp_path, recipe):
    from edgekd.errors import RecipeError
    from edgekd.recipe import load_recipe
    from edgekd.sweep import run_sweep

    out = tmp_path / "s"
    run_sweep(load_recipe(recipe, ["distill.epochs=1"]), trials=1, out=out, quiet=True)
    with pytest.raises(RecipeError, match="started with another recipe"):
        run_sweep(load_recipe(recipe, ["distill.epochs=2"]), trials=2, out=out, quiet=True)
    assert len(_study(out).trials) == 1


def test_sampled_loss_keeps_the_recipes_layers_and_builds():
    import optuna

    from edgekd import losses
    from edgekd.sweep import search_space, suggest_loss

    base = {"name": "fitnets", "student_layer": "features.6", "teacher_layer": "features.12", "beta": 1.0}
    config = suggest_loss(optuna.trial.FixedTrial({"beta": 3.5}), ["fitnets"], base)
    assert config == {**base, "beta": 3.5}
    assert losses.build_from_config(config).beta == 3.5
    mixed = suggest_loss(optuna.trial.FixedTrial({"loss": "dkd", "dkd.temperature": 2.0, "dkd.alpha": 0.5,
                                                  "dkd.beta": 4.0}), ["kd", "dkd"], {"name": "kd", "alpha": 0.9})
    assert mixed == {"name": "dkd", "temperature": 2.0, "alpha": 0.5, "beta": 4.0}
    assert set(search_space("rkd")) == {"distance_weight", "angle_weight"}
    assert search_space("kd")["temperature"][:2] == (1.0, 20.0)
