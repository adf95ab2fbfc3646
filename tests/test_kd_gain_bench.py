"""benchmarks/kd_gain.py's recipe handling (the benchmark itself trains for minutes; its figures are in benchmarks/results)."""
import argparse
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("kd_gain", Path(__file__).parents[1] / "benchmarks" / "kd_gain.py")
kd_gain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kd_gain)


def _args(*overrides, cost_augment=None):
    return argparse.Namespace(recipe=None, overrides=list(overrides), cost_augment=cost_augment)


def test_epoch_cost_keeps_an_augmentation_given_as_a_mapping():
    # A mapping of settings (not a preset name) used to reach load_recipe as its pydantic repr and fail.
    recipe = kd_gain.cost_recipe(_args("data.augment={rotate: 10, mixup: 1.0, mix_prob: 0.5}"), seed=0)
    aug = recipe.data.augment
    assert (aug.rotate, aug.mixup, aug.mix_prob) == (10.0, 1.0, 0.5)


def test_epoch_cost_of_an_unaugmented_recipe_uses_light_or_the_given_preset():
    assert kd_gain.cost_recipe(_args(), seed=0).data.augment == "light"
    assert kd_gain.cost_recipe(_args(cost_augment="shift"), seed=0).data.augment == "shift"


def test_table_header_names_the_seed_runs_threads():
    rows = [{"threads": 1}, {"threads": 1}]
    assert kd_gain._threads(rows, {"threads": 1}) == "1"
    assert kd_gain._threads(rows, {"threads": 2}) == "1 in the seed runs, 2 in the epoch-cost comparison"
    assert kd_gain._threads([{}], {"threads": 2}) == "2"  # results saved before rows kept their threads
