"""Does distillation help? The default recipe over several seeds: teacher vs scratch vs KD student.

Prints a table and writes it to ``benchmarks/results/kd_gain.{json,md}``:
teacher, scratch baseline and KD student test accuracy (mean ± std over seeds), the share of the
scratch→teacher gap that KD closes, and the cost of a KD epoch relative to a plain epoch (teacher logits cached),
measured in the same run on the same machine.

Usage: python benchmarks/kd_gain.py [--seeds 0 1 2] [--recipe mnist] [--set key=value ...] [--out DIR] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edgekd.distill import run_distill
from edgekd.recipe import load_recipe

RESULTS = Path(__file__).parent / "results"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def epoch_cost(recipe, teacher_ckpt: Path, work: Path, rounds: int = 3, epochs: int = 3) -> dict:
    """Seconds per training epoch of the plain (CE) student and the KD student, measured side by side.

    The two kinds of epoch alternate (plain, KD, plain, KD, ...) in this process on the same data and model
    architecture, so machine load affects both alike; the per-epoch median of each kind is compared. The KD
    runs use the trainer's teacher-logit cache (computed once per run, before the first epoch); that one-off
    cost is reported separately as ``cache_seconds`` (one teacher pass over the train split).
    """
    import torch

    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, fit, predict_logits
    from edgekd.models import build_model, load_weights

    data = load_data(recipe.data, recipe.seed)
    teacher = build_model(recipe.teacher.model, data.input_shape, data.num_classes, recipe.teacher.kwargs)
    load_weights(teacher, teacher_ckpt)
    teacher.eval()
    cfg = recipe.distill.model_copy(update={"epochs": epochs})
    kd_loss = losses.build_from_config(recipe.distill.loss)
    times: dict[str, list[float]] = {"plain": [], "kd": []}
    for r in range(rounds):
        for kind in ("plain", "kd"):
            torch.manual_seed(recipe.seed)
            student = build_model(recipe.student.model, data.input_shape, data.num_classes, recipe.student.kwargs)
            res = fit(student, data, kd_loss if kind == "kd" else losses.build("ce"),
                      FitConfig(kind, cfg, seed=recipe.seed, state_path=work / f"cost-{kind}-{r}.state.pt",
                                quiet=True), teacher=teacher if kind == "kd" else None)
            times[kind] += [row["seconds"] for row in res.history]
    t0 = time.perf_counter()
    predict_logits(teacher, data.loader("train", 512))
    cache = time.perf_counter() - t0
    plain, kd = statistics.median(times["plain"]), statistics.median(times["kd"])
    return {"plain_epoch_s": plain, "kd_epoch_s": kd, "ratio": kd / plain, "cache_seconds": cache,
            "epochs_each": len(times["plain"]), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", default=None, help="recipe file or built-in name (default: mnist)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved JSON")
    args = ap.parse_args()
    if args.table_only:
        write_table(Path(args.out))
        return

    rows = []
    cost: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            recipe = load_recipe(args.recipe, args.overrides, seed=seed, name=f"kdgain-{seed}")
            rd = run_distill(recipe, out=tmp, quiet=True)
            m = rd.metrics()
            row = {"seed": seed, **{k: m[k]["test_accuracy"] for k in ("teacher", "baseline", "student")},
                   "kd_epoch_s": m["student"]["epoch_seconds_median"],
                   "plain_epoch_s": m["baseline"]["epoch_seconds_median"],
                   "teacher_params": m["teacher"]["params"], "student_params": m["student"]["params"],
                   "teacher_macs": m["teacher"]["macs"], "student_macs": m["student"]["macs"]}
            row["gap_closed"] = ((row["student"] - row["baseline"]) / (row["teacher"] - row["baseline"])
                                 if row["teacher"] > row["baseline"] else float("nan"))
            row["epoch_ratio"] = row["kd_epoch_s"] / row["plain_epoch_s"]
            rows.append(row)
            if seed == args.seeds[0]:
                cost = epoch_cost(recipe, rd.path / "teacher.pt", Path(tmp))
                print(f"epoch cost, side by side ({cost['epochs_each']} epochs each): plain "
                      f"{cost['plain_epoch_s']:.3f} s, KD {cost['kd_epoch_s']:.3f} s, ratio {cost['ratio']:.3f}; "
                      f"teacher cache {cost['cache_seconds']:.2f} s once per run", flush=True)
            print(f"seed {seed}: teacher {row['teacher']:.4f}  scratch {row['baseline']:.4f}  "
                  f"KD {row['student']:.4f}  gap closed {row['gap_closed']:.0%}  "
                  f"KD/plain epoch time {row['epoch_ratio']:.2f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_gain.json").write_text(json.dumps({"recipe": args.recipe or "mnist", "seeds": args.seeds,
                                                  "rows": rows, "epoch_cost": cost,
                                                  "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    write_table(out)


def write_table(out: Path) -> None:
    """Write ``kd_gain.md`` (and the summary in ``kd_gain.json``) from the rows saved in ``kd_gain.json``."""
    saved = json.loads((out / "kd_gain.json").read_text())
    rows, cost = saved["rows"], saved["epoch_cost"]
    summary = {k: mean_std([r[k] for r in rows]) for k in ("teacher", "baseline", "student", "epoch_ratio")}
    t, b, s = summary["teacher"][0], summary["baseline"][0], summary["student"][0]
    summary["gap_closed_of_means"] = (s - b) / (t - b) if t > b else float("nan")
    summary["gap_closed_per_seed_mean"] = statistics.fmean(r["gap_closed"] for r in rows)
    wins = sum(r["student"] > r["baseline"] for r in rows)
    r0 = rows[0]
    md = [
        f"Recipe `{saved['recipe']}`, seeds {saved['seeds']}; teacher {r0['teacher_params']:,} params / "
        f"{r0['teacher_macs']:,} MACs, student {r0['student_params']:,} params / {r0['student_macs']:,} MACs; "
        f"{cost['threads']} torch thread(s) per process.",
        "",
        "| model | test accuracy (mean ± std) |",
        "|---|---|",
        *(f"| {label} | {summary[k][0]:.4f} ± {summary[k][1]:.4f} |"
          for label, k in (("teacher", "teacher"), ("student from scratch", "baseline"), ("KD student", "student"))),
        "",
        f"KD closes **{summary['gap_closed_of_means']:.1%}** of the scratch→teacher gap of the means (target ≥ 50%); "
        "per seed: " + ", ".join(f"{r['gap_closed']:.0%}" for r in rows)
        + f" (mean {summary['gap_closed_per_seed_mean']:.0%}). The KD student beats the scratch student on "
        f"{wins} of {len(rows)} seeds, by {100 * (s - b):.2f} points on average.",
        "",
        f"A KD epoch costs **{cost['ratio']:.2f}x** a plain epoch with the teacher logits cached (target ≤ 1.1): "
        f"{cost['kd_epoch_s']:.3f} s vs {cost['plain_epoch_s']:.3f} s, medians of {cost['epochs_each']} epochs "
        f"each, alternating plain and KD in one process ({cost['threads']} torch thread(s)); computing the cache "
        f"costs {cost['cache_seconds']:.2f} s once per run. (Inside the seed runs above, where the baseline and "
        f"the KD student train one after the other, the ratio was {summary['epoch_ratio'][0]:.2f} ± "
        f"{summary['epoch_ratio'][1]:.2f}.)",
    ]
    saved["summary"] = summary
    (out / "kd_gain.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out / "kd_gain.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))

if __name__ == "__main__":
    main()
