"""Which distillation method helps a small edge student? Scratch vs KD vs each method, mean ± std over seeds.

For each dataset recipe and seed, one base run trains the teacher, the scratch baseline and the KD student
(the recipe's own loss); every other method then distills the same student architecture from that same teacher
(``teacher.checkpoint``), with the same seed, data split and epoch budget. Methods:

* response: ``kd`` (Hinton), ``dkd`` (Zhao et al. 2022);
* feature: ``fitnets`` (hint on the middle stage, learned 1x1 projection), ``at`` (attention at every stage end);
* relation: ``rkd`` and ``pkt`` on the penultimate embedding, ``sp`` on the last stage's maps;
* combined: ``kd+fitnets``;
* teachers / strategies: ``multi-teacher`` (the base teacher + a second one of the same architecture, another
  seed, mean of logits), ``online`` (deep mutual learning: teacher trained with the student, from scratch),
  ``self`` (born-again, 2 generations of the student architecture, no big teacher).

The weight of each feature/relation term is chosen on the **validation** split of the first seed among the
paper's default (``edgekd losses``) times 1, 0.1 and 0.01 (these terms are sums or means over feature-map
positions and batch pairs, so the right weight depends on map size and batch), then used for every seed. Only
test accuracy of the final models is reported; every selection (best epoch, loss weight) uses validation.

Writes ``benchmarks/results/kd_methods.{json,md}`` (the JSON is updated after every run, and a rerun with the
same options skips finished runs). ``--budget reduced`` shrinks the runs (MNIST: 1500 samples, 5 teacher and 10
student epochs; digits: 15 student epochs) so the whole table fits in a few hours on 2 CPU cores shared with other
work; the table says which budget produced it.

Usage: python benchmarks/kd_methods.py [--datasets mnist digits] [--seeds 0 1 2] [--budget full|reduced]
       [--methods kd dkd ...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from edgekd import losses, provenance
from edgekd.distill import run_distill
from edgekd.recipe import load_recipe, validate_recipe

RESULTS = Path(__file__).parent / "results"
METHODS = ["scratch", "kd", "dkd", "fitnets", "at", "rkd", "sp", "pkt", "kd+fitnets", "multi-teacher", "online",
           "self"]
# Loss weights chosen on validation (first seed): the paper default times each factor.
TUNED = {"fitnets": ["beta"], "at": ["beta"], "rkd": ["distance_weight", "angle_weight"], "sp": ["beta"],
         "pkt": ["beta"]}
FACTORS = [1.0, 0.1, 0.01]
DKD_WARMUP = 20 / 240  # share of the epochs over which DKD's KD part is ramped in (Zhao et al.'s schedule)
# Reduced budget: same architectures and recipes, fewer samples/epochs (documented in the output table).
BUDGETS = {
    "full": {"mnist": [], "digits": []},
    "reduced": {"mnist": ["data.limit=1500", "teacher.epochs=5", "distill.epochs=10"], "digits": ["distill.epochs=15"]},
}


def stage_outputs(model: nn.Module) -> list[str]:
    """Paths of the activation ending each stage of a zoo ``cnn`` (the ReLU before each pool, and the last)."""
    children = list(model.features.named_children())
    return [f"features.{name}" for i, (name, m) in enumerate(children)
            if isinstance(m, nn.ReLU) and (i + 1 == len(children) or isinstance(children[i + 1][1], nn.MaxPool2d))]


def weights(name: str, factor: float) -> dict[str, float]:
    """The tuned weights of loss ``name``: its defaults times ``factor``."""
    params = inspect.signature(losses.get_loss(name).__init__).parameters
    return {k: params[k].default * factor for k in TUNED[name]}


def method_changes(method: str, recipe, teacher_ckpt: str, factors: dict[str, float] | None = None) -> dict[str, Any]:
    """Recipe sections (as plain data) that turn the base recipe into ``method``."""
    factors = factors or {}
    from edgekd.models import build_model

    shape = (1, 28, 28) if recipe.data.dataset == "mnist" else (1, 8, 8)
    s_stages = stage_outputs(build_model(recipe.student.model, shape, 10, recipe.student.kwargs))
    t_stages = stage_outputs(build_model(recipe.teacher.model, shape, 10, recipe.teacher.kwargs))
    k = min(len(s_stages), len(t_stages))
    s_stages, t_stages = s_stages[-k:], t_stages[-k:]
    mid = k // 2 if k > 1 else 0
    kd = dict(recipe.distill.loss)
    teacher = {**recipe.teacher.model_dump(), "checkpoint": teacher_ckpt}
    def w(name):
        return weights(name, factors.get(name, 1.0))

    fitnets = {"name": "fitnets", "student_layer": s_stages[mid], "teacher_layer": t_stages[mid], **w("fitnets")}
    losses_by_method = {
        # The paper's KD part is ramped in (20 of 240 epochs on CIFAR): without it DKD's large NCKD term
        # (beta 8) pulls a tiny student away from the labels before it has learned them.
        "dkd": {"name": "dkd", "warmup_epochs": max(1, round(recipe.distill.epochs * DKD_WARMUP))},
        "fitnets": fitnets,
        "at": {"name": "at", "student_layer": s_stages, "teacher_layer": t_stages, **w("at")},
        "rkd": {"name": "rkd", "student_layer": "pool", "teacher_layer": "pool", **w("rkd")},
        "sp": {"name": "sp", "student_layer": s_stages[-1], "teacher_layer": t_stages[-1], **w("sp")},
        "pkt": {"name": "pkt", "student_layer": "pool", "teacher_layer": "pool", **w("pkt")},
        "kd+fitnets": {"name": "combined", "terms": [{**kd, "weight": 1.0}, {**fitnets, "ce_weight": 0.0}]},
    }
    if method in losses_by_method:
        return {"teacher": teacher, "distill": {"loss": losses_by_method[method]}}
    if method == "multi-teacher":
        second = {k: v for k, v in teacher.items() if k != "checkpoint"}
        return {"teachers": [teacher, second], "teacher": None}
    if method == "online":  # Zhang et al.: CE + KL(peer) at T = 1 for both models
        return {"distill": {"strategy": "online", "loss": {"name": "kd", "temperature": 1.0, "alpha": 0.5}}}
    if method == "self":
        return {"distill": {"strategy": "self", "generations": 2, "baseline": True}}
    raise ValueError(f"unknown method {method!r}")


def build_recipe(base: dict[str, Any], changes: dict[str, Any]):
    raw = json.loads(json.dumps(base))
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    raw["distill"]["baseline"] = changes.get("distill", {}).get("baseline", False)
    return validate_recipe(raw, source="kd_methods")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "digits"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved JSON")
    args = ap.parse_args()
    prov = provenance.start()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "kd_methods.json"
    store = json.loads(json_path.read_text()) if json_path.exists() else {}
    runs: dict[str, Any] = store.get("runs", {})
    choices: dict[str, dict[str, float]] = store.get("choices", {})
    if store.get("budget") not in (None, args.budget):
        runs, choices = {}, {}  # results of another budget are not comparable
    if args.table_only:
        write_table(runs, choices, args, out, store.get("provenance"))
        return
    # A rerun with the same options continues the saved runs: the sessions before this one keep their blocks.
    earlier = [*store.get("earlier_provenance", []), *([store["provenance"]] if store.get("provenance") else [])]

    def save() -> dict[str, Any]:
        block = prov.finish()
        json_path.write_text(json.dumps({"budget": args.budget, "budgets": BUDGETS, "factors": FACTORS,
                                         "choices": choices, "runs": runs, "provenance": block,
                                         "earlier_provenance": earlier}, indent=1) + "\n")
        return block

    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            overrides = BUDGETS[args.budget][dataset]
            for seed in args.seeds:
                base_key = f"{dataset}/{seed}/base"
                recipe = load_recipe(dataset, overrides, seed=seed, name=f"{dataset}-{seed}-base")
                base_dir = Path(tmp) / f"{dataset}-{seed}-base"
                need_base = any(f"{dataset}/{seed}/{m}" not in runs for m in args.methods)
                if need_base:  # teacher, scratch and KD in one run; the teacher is reused by every method
                    t0 = time.perf_counter()
                    rd = run_distill(recipe.model_copy(update={"name": base_dir.name}), out=tmp, quiet=True)
                    m = rd.metrics()
                    for role, method in (("baseline", "scratch"), ("student", "kd"), ("teacher", "teacher")):
                        runs[f"{dataset}/{seed}/{method}"] = {
                            "test_accuracy": m[role]["test_accuracy"], "val_accuracy": m[role].get("val_accuracy"),
                            "train_seconds": m[role].get("train_seconds"), "params": m[role]["params"]}
                    runs[base_key] = {"seconds": round(time.perf_counter() - t0, 1)}
                    save()
                    print(f"{dataset} seed {seed}: teacher {m['teacher']['test_accuracy']:.4f} scratch "
                          f"{m['baseline']['test_accuracy']:.4f} kd {m['student']['test_accuracy']:.4f}", flush=True)
                def run_method(method: str, key: str, factors: dict[str, float]) -> dict[str, Any]:
                    if key in runs:
                        return runs[key]
                    changes = method_changes(method, recipe, str(base_dir / "teacher.pt"), factors)
                    r = build_recipe(recipe.to_dict(), changes)
                    t0 = time.perf_counter()
                    name = key.replace("/", "-").replace("@", "-x").replace("+", "-")
                    rd = run_distill(r.model_copy(update={"name": name}), out=tmp, quiet=True)
                    m = rd.metrics()
                    runs[key] = {"test_accuracy": m["student"]["test_accuracy"],
                                 "val_accuracy": m["student"].get("val_accuracy"),
                                 "train_seconds": m["student"].get("train_seconds"),
                                 "run_seconds": round(time.perf_counter() - t0, 1), "loss": m["student"].get("loss")}
                    if method == "multi-teacher":
                        runs[key]["ensemble_test_accuracy"] = m["teacher_ensemble"]["test_accuracy"]
                    if method == "online":
                        runs[key]["online_teacher_test_accuracy"] = m["teacher"]["test_accuracy"]
                    save()
                    print(f"{dataset} seed {seed}: {key.split('/', 2)[2]:16s} test {m['student']['test_accuracy']:.4f} "
                          f"val {runs[key]['val_accuracy']:.4f} ({runs[key]['run_seconds']:.0f}s)", flush=True)
                    return runs[key]

                chosen = choices.setdefault(dataset, {})
                for method in args.methods:
                    key = f"{dataset}/{seed}/{method}"
                    if method in TUNED and method not in chosen:
                        # Weight selection on validation, first seed only; the chosen run is the seed's result.
                        grid = {f: run_method(method, f"{key}@{f:g}", {method: f}) for f in FACTORS}
                        chosen[method] = max(FACTORS, key=lambda f: (grid[f]["val_accuracy"], f))
                        runs[key] = grid[chosen[method]]
                        save()
                        continue
                    run_method(method, key, chosen)

    write_table(runs, choices, args, out, save())


def write_table(runs: dict[str, Any], choices: dict[str, dict[str, float]], args, out: Path,
                block: dict[str, Any] | None = None) -> None:
    md = [f"Test accuracy, mean ± std over seeds {args.seeds}; budget `{args.budget}`"
          + (" (" + "; ".join(f"{d}: {', '.join(o)}" for d, o in BUDGETS[args.budget].items() if o) + ")"
             if any(BUDGETS[args.budget].values()) else " (recipes as shipped)") + ".", "",
          "| method | " + " | ".join(args.datasets) + " |", "|---|" + "---|" * len(args.datasets)]
    for method in ["teacher", *args.methods]:
        cells = []
        for dataset in args.datasets:
            vals = [runs[k]["test_accuracy"] for k in (f"{dataset}/{s}/{method}" for s in args.seeds) if k in runs]
            if not vals:
                cells.append("-")
                continue
            mu, sd = mean_std(vals)
            base = [runs[f"{dataset}/{s}/scratch"]["test_accuracy"] for s in args.seeds if f"{dataset}/{s}/scratch" in runs]
            delta = f" ({100 * (mu - statistics.fmean(base)):+.2f})" if base and method not in ("teacher", "scratch") else ""
            n = "" if len(vals) == len(args.seeds) else f" [n={len(vals)}]"
            cells.append(f"{mu:.4f} ± {sd:.4f}{delta}{n}")
        md.append(f"| {method} | " + " | ".join(cells) + " |")
    md += ["", "In parentheses: points over the scratch baseline (same architecture, seed and budget). `online`'s "
           "teacher is trained with the student from scratch; `self` uses no big teacher (2 born-again generations "
           "with the recipe's KD loss). `dkd` uses its paper defaults (alpha 1, beta 8, T 4) with "
           "their warm-up share (the KD part ramped in over the first 1/12 of the epochs). "
           "Test sets are small (MNIST: 1000 images, 300 at the reduced budget; digits: 360), so one image is "
           "0.1-0.3 points and differences of about a point are within seed noise; stds are over seeds."]
    for dataset in args.datasets:
        picked = choices.get(dataset, {})
        if picked:
            parts = [f"{m} " + ", ".join(f"{k}={v:g}" for k, v in weights(m, f).items()) + f" (x{f:g})"
                     for m, f in picked.items()]
            md.append(f"Loss weights chosen on {dataset} validation (seed {args.seeds[0]}; x = factor on the paper "
                      f"default): {'; '.join(parts)}.")
        grid = []
        for m in picked:
            cells = [f"x{f:g}: val {runs[k]['val_accuracy']:.3f} / test {runs[k]['test_accuracy']:.3f}"
                     for f in FACTORS if (k := f"{dataset}/{args.seeds[0]}/{m}@{f:g}") in runs]
            grid.append(f"{m} ({', '.join(cells)})")
        if grid:
            md.append(f"Selection runs on {dataset}: " + "; ".join(grid) + ".")
    md += ["", provenance.markdown(block)]
    (out / "kd_methods.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
