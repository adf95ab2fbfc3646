"""Does distillation help? The default recipe over several seeds: teacher vs scratch vs KD student.

Prints a table and writes it to ``benchmarks/results/kd_gain.{json,md}``:
teacher, scratch baseline and KD student test accuracy (mean ± std over seeds), the share of the
scratch→teacher gap that KD closes, and the cost of a KD epoch relative to a plain epoch (teacher logits cached),
measured in the same run on the same machine.

Usage: python benchmarks/kd_gain.py [--seeds 0 1 2] [--recipe mnist] [--set key=value ...]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", default=None, help="recipe file or built-in name (default: mnist)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    rows = []
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
            print(f"seed {seed}: teacher {row['teacher']:.4f}  scratch {row['baseline']:.4f}  "
                  f"KD {row['student']:.4f}  gap closed {row['gap_closed']:.0%}  "
                  f"KD/plain epoch time {row['epoch_ratio']:.2f}", flush=True)

    summary = {k: mean_std([r[k] for r in rows]) for k in ("teacher", "baseline", "student", "epoch_ratio")}
    t, b, s = summary["teacher"][0], summary["baseline"][0], summary["student"][0]
    summary["gap_closed_of_means"] = (s - b) / (t - b) if t > b else float("nan")
    r0 = rows[0]
    md = [
        f"Recipe `{args.recipe or 'mnist'}`, seeds {args.seeds}; teacher {r0['teacher_params']:,} params / "
        f"{r0['teacher_macs']:,} MACs, student {r0['student_params']:,} params / {r0['student_macs']:,} MACs.",
        "",
        "| model | test accuracy (mean ± std) |",
        "|---|---|",
        *(f"| {label} | {summary[k][0]:.4f} ± {summary[k][1]:.4f} |"
          for label, k in (("teacher", "teacher"), ("student from scratch", "baseline"), ("KD student", "student"))),
        "",
        f"KD closes **{summary['gap_closed_of_means']:.0%}** of the scratch→teacher gap (target ≥ 50%). "
        f"A KD epoch costs **{summary['epoch_ratio'][0]:.2f}x** a plain epoch (± {summary['epoch_ratio'][1]:.2f}; "
        "teacher logits cached; target ≤ 1.1).",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_gain.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                  "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    (out / "kd_gain.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
