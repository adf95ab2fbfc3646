"""Wall time per training epoch: 1 process vs torchrun with 2 processes (DDP, gloo, CPU), side by side.

Runs the same recipe three ways on this machine and reads the per-epoch seconds that ``history.csv`` records
(the training loop only, no evaluation):

* 1 process, 1 thread      (the fair per-core baseline for DDP with one thread per rank)
* 1 process, 2 threads     (what a user gets without torchrun on a 2-core machine)
* 2 processes x 1 thread   (``torchrun --nproc_per_node=2``; same global batch, gradients all-reduced)

Usage: python benchmarks/ddp_scaling.py [--recipe R] [--epochs N]
Prints a table and writes benchmarks/results/ddp_scaling_<recipe name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from edgekd import provenance

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TORCHRUN = Path(sys.executable).parent / "torchrun"

DEFAULT = {
    "name": "ddp_bench", "seed": 0,
    "data": {"dataset": "mnist", "batch_size": 64},
    "teacher": {"model": "cnn", "kwargs": {"width": 16, "depth": 2}, "epochs": 3, "lr": 0.005},
    "student": {"model": "cnn", "kwargs": {"width": 4, "depth": 2}},
    "distill": {"epochs": 0, "baseline": False},
}


def _run(cmd: list[str], threads: int, out: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(cmd + ["--out", str(out), "-q"], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    with open(run / "history.csv", newline="") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f) if r["model"] == "teacher"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=None, help="recipe YAML (default: a CNN teacher on mnist 5k)")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    prov = provenance.start(threads="1 process x 1 and 2 threads, 2 processes x 1 thread (OMP_NUM_THREADS)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = yaml.safe_load(Path(args.recipe).read_text()) if args.recipe else dict(DEFAULT)
        recipe.setdefault("teacher", {})["epochs"] = args.epochs
        recipe.setdefault("distill", {})["epochs"] = 0  # the teacher's epochs are what is timed
        recipe["distill"]["baseline"] = False
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        base = [sys.executable, "-m", "edgekd", "distill", str(path)]
        ddp = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "edgekd", "distill", str(path)]
        rows = {
            "1 process, 1 thread": _run(base, 1, tmp / "a"),
            "1 process, 2 threads": _run(base, 2, tmp / "b"),
            "2 processes (DDP gloo), 1 thread each": _run(ddp, 1, tmp / "c"),
        }
    ref = statistics.median(rows["1 process, 1 thread"])
    result = {"recipe": recipe, "cpu_count": os.cpu_count(), "epoch_seconds": rows,
              "median_epoch_seconds": {k: statistics.median(v) for k, v in rows.items()}}
    result["provenance"] = prov.finish()
    print(f"{'setup':42s} {'median s/epoch':>15s} {'speed-up vs 1x1':>16s}")
    md = [f"# DDP scaling: {recipe.get('name')}", "", "| setup | median s/epoch | speed-up vs 1 process x 1 thread |",
          "|---|---|---|"]
    for k, v in result["median_epoch_seconds"].items():
        print(f"{k:42s} {v:15.2f} {ref / v:15.2f}x")
        md.append(f"| {k} | {v:.2f} | {ref / v:.2f}x |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"ddp_scaling_{recipe.get('name', 'recipe')}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n\n" + provenance.markdown(result["provenance"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(result["median_epoch_seconds"])
    ax.barh(names, [result["median_epoch_seconds"][n] for n in names], color=["#888", "#58a", "#c63"])
    ax.set_xlabel("median seconds per training epoch (lower is better)")
    ax.set_title(f"DDP scaling, {recipe.get('name')} ({os.cpu_count()} CPUs, shared)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    print(f"saved {RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
