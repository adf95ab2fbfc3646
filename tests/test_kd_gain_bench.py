"""benchmarks/kd_gain.py: its recipe handling and its table maths (the benchmark itself trains for minutes; its
figures are in benchmarks/results)."""
import argparse
import importlib.util
import math
from pathlib import Path

import pytest

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


def _row(seed, teacher, baseline, student, epoch_ratio=1.0):
    return {"seed": seed, "teacher": teacher, "baseline": baseline, "student": student, "epoch_ratio": epoch_ratio,
            "gap_closed": kd_gain.gap_closed(teacher, baseline, student)}


def test_table_maths_against_hand_computed_rows():
    rows = [_row(0, 0.99, 0.97, 0.98, 1.0), _row(1, 0.98, 0.96, 0.975, 1.1), _row(2, 0.99, 0.95, 0.98, 1.2)]
    # Per seed: the KD student closes (S - B) / (T - B) of the gap: 0.01/0.02, 0.015/0.02, 0.03/0.04.
    assert [r["gap_closed"] for r in rows] == pytest.approx([0.5, 0.75, 0.75])
    s = kd_gain.summarize(rows)
    assert s["teacher"][0] == pytest.approx(0.986667, abs=1e-6) and s["teacher"][1] == pytest.approx(0.005774, abs=1e-6)
    assert s["baseline"] == pytest.approx((0.96, 0.01))
    assert s["student"][0] == pytest.approx(0.978333, abs=1e-6) and s["student"][1] == pytest.approx(0.002887, abs=1e-6)
    assert s["epoch_ratio"] == pytest.approx((1.1, 0.1))
    # Of the means: (0.978333 - 0.96) / (0.986667 - 0.96) = 0.018333 / 0.026667; per seed: (0.5 + 0.75 + 0.75) / 3.
    assert s["gap_closed_of_means"] == pytest.approx(0.6875)
    assert s["gap_closed_per_seed_mean"] == pytest.approx(2 / 3)
    # Leads in points 1.0, 1.5, 3.0: mean 1.8333, sample std 1.040833, standard error 0.600925; the 95% interval
    # is the mean ± t(0.975, 2 dof) = 4.302653 (from a t table) times the standard error: ± 2.585572.
    lead = s["lead_points"]
    assert lead["per_seed"] == pytest.approx([1.0, 1.5, 3.0]) and lead["wins"] == 3
    assert lead["mean"] == pytest.approx(1.833333, abs=1e-6)
    assert lead["ci95"] == pytest.approx([1.833333 - 2.585572, 1.833333 + 2.585572], abs=1e-5)


def test_gap_closed_and_interval_edge_cases():
    assert math.isnan(kd_gain.gap_closed(0.95, 0.96, 0.97))  # the teacher is not ahead: no gap to close
    assert kd_gain.gap_closed(0.99, 0.97, 0.96) == pytest.approx(-0.5)  # KD behind scratch: negative
    mean, low, high = kd_gain.mean_interval([2.0])
    assert mean == 2.0 and math.isnan(low) and math.isnan(high)  # one seed has no interval
    mean, low, high = kd_gain.mean_interval([1.0, 3.0], level=0.9)  # t(0.95, 1 dof) = 6.313752, std error 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 6.313752, 2.0 + 6.313752), abs=1e-5)


def test_baseline_part_ignores_kd_only_keys_and_the_teacher_but_not_training_settings():
    from edgekd.recipe import load_recipe

    def part(*overrides):
        return kd_gain.baseline_part(load_recipe("mnist", list(overrides), seed=0).to_dict())

    same = part()
    assert part("distill.loss.temperature=8", "distill.baseline=false", "distill.parallel_baseline=true",
                "teacher.epochs=1", "teacher.kwargs.width=8") == same
    for changed in ("distill.epochs=7", "distill.lr=0.5", "student.kwargs.width=4", "data.limit=100"):
        assert part(changed) != same, changed
    assert kd_gain.baseline_part(load_recipe("mnist", [], seed=1).to_dict()) != same  # another seed


def test_baseline_from_without_a_finished_seed_run_is_refused_before_training(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "kd_gain.py"), "--seeds",
                           "0", "--baseline-from", str(tmp_path / "runs"), "--work", str(tmp_path / "work"),
                           "--out", str(out), "--set", "distill.loss.temperature=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --baseline-from: no finished seed run")
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "work").exists()


def test_one_seed_screen_table_shows_validation_and_the_borrowed_baseline_without_an_interval(tmp_path):
    import json

    row = {**_row(0, 0.94, 0.90, 0.92), "teacher_val": 0.95, "baseline_val": 0.91, "student_val": 0.94,
           "teacher_params": 2, "teacher_macs": 2, "student_params": 1, "student_macs": 1, "threads": 1,
           "load_avg_1m": 2.0, "baseline_run": "exported/fm-kdgain/kdgain-0"}
    cost = {"ratio": 1.0, "kd_epoch_s": 1.0, "plain_epoch_s": 1.0, "epochs_each": 2, "threads": 1, "cache_seconds": 0.1}
    (tmp_path / "kd_gain.json").write_text(json.dumps({"recipe": "r.yaml", "seeds": [0], "rows": [row],
                                                       "epoch_cost": cost, "target_gap_closed": 0.5}))
    kd_gain.write_table(tmp_path)
    md = (tmp_path / "kd_gain.md").read_text()
    assert "one seed has no interval" in md and "nan" not in md.replace("(nan:", "")
    assert "KD 0.9400 (gap closed 75%)" in md  # validation: (0.94 - 0.91) / (0.95 - 0.91)
    assert "`exported/fm-kdgain/kdgain-0` (`--baseline-from`" in md
    assert "ratio of the KD student's to the baseline's" not in md  # epoch times of two different runs
