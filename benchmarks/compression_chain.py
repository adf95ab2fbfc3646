"""Does compression keep what distillation won? The default recipe's chain, per seed: KD student → pruned → int8.

For each finished distill run of a recipe (the seed runs ``kd_gain.py --work DIR`` keeps, or runs trained here), a
copy of the run goes through the recipe's compression stages exactly as ``edgekd run`` would:

* ``edgekd prune`` with the recipe's ``prune`` section (read from the recipe now, not from the run);
* ``edgekd export`` of the pruned student to TFLite with int8 post-training quantization (PTQ);
* ``edgekd quantize --qat``: quantization-aware distillation (the recipe's ``qat`` section, or ``--qat-epochs``).

The table gives each seed's test accuracy (1000 digits on the default recipe) of the scratch student, the KD
student, the pruned student and both int8 ``.tflite`` files as run in LiteRT, with the drops against the unpruned
KD student, and whether the int8 files still beat the scratch student.
Writes ``benchmarks/results/compression_chain.{json,md}``.

Usage: python benchmarks/compression_chain.py --runs DIR/kdgain-0 DIR/kdgain-1 ... [--recipe mnist] [--jobs 2]
       [--qat-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from edgekd import provenance

RESULTS = Path(__file__).parent / "results"
FILES = {"ptq": "student_pruned_int8.tflite", "qat": "student_pruned_int8_qat.tflite"}


def chain(run: str, recipe_arg: str | None, qat_epochs: int | None, work: str) -> dict:
    """Prune, export (PTQ int8) and QAT a copy of one finished distill run; return its row."""
    from edgekd.export import run_export
    from edgekd.export.qat import run_qat
    from edgekd.prune import run_prune
    from edgekd.recipe import QATConfig, load_recipe
    from edgekd.run_dir import RunDir

    src = Path(run)
    rd = RunDir(Path(work) / src.name)
    shutil.copytree(src, rd.path)
    for stale in rd.path.glob("checkpoints/prune*"):  # a copy starts its compression from scratch
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    recipe = load_recipe(recipe_arg)
    p = recipe.prune
    times = {}
    t0 = time.perf_counter()
    run_prune(rd, ratio=p.ratio if p.target_macs is None and p.target_params is None else None,
              target_macs=p.target_macs, target_params=p.target_params, steps=p.steps, importance=p.importance,
              finetune_epochs=p.finetune_epochs, protect=p.protect, global_pruning=p.global_pruning, lr=p.lr,
              quiet=True, latency_runs=20)
    times["prune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_export(rd, formats=["tflite"], quantize=["int8"], teacher=False, app=False, check=True)
    times["export_s"] = time.perf_counter() - t0
    qcfg = recipe.qat or QATConfig()
    if qat_epochs:
        qcfg = qcfg.model_copy(update={"epochs": qat_epochs})
    t0 = time.perf_counter()
    run_qat(rd, cfg=qcfg, formats=["tflite"], check=True)
    times["qat_s"] = time.perf_counter() - t0
    m = json.loads((rd / "metrics.json").read_text())
    row = {"run": str(src), "seed": _seed_of(run),
           "teacher": m["teacher"]["test_accuracy"], "scratch": m["baseline"]["test_accuracy"],
           "student": m["student"]["test_accuracy"], "pruned": m["student_pruned"]["test_accuracy"],
           "mac_reduction": m["student_pruned"]["mac_reduction"], "qat_epochs": qcfg.epochs,
           "load_avg_1m": os.getloadavg()[0], **{k: round(v, 1) for k, v in times.items()}}
    for key, name in FILES.items():
        row[key] = m[name]["test_accuracy"]
    print(json.dumps(row), flush=True)
    return row


def _seed_of(run: str) -> int:
    from edgekd.recipe import read_yaml

    return int(read_yaml(Path(run) / "recipe.yaml").get("seed", 0))


def markdown(rows: list[dict], meta: dict) -> str:
    def pts(a: float, b: float) -> str:
        return f"{100 * (a - b):+.1f}"

    lines = ["# Compression chain: KD student → pruned → int8 (default recipe, per seed)", "",
             f"Recipe `{meta['recipe']}`: prune {meta['prune']}; PTQ = `edgekd export` int8 (static, per-channel); "
             f"QAT = `edgekd quantize --qat`, {rows[0]['qat_epochs']} epochs of KD with int8 fake quantization. "
             "Accuracy of the `.tflite` files as run in LiteRT on the test split (1000 digits: 0.1 point each). "
             f"{meta['machine']}; load average (1 min) at the end of each seed: "
             + ", ".join(f"{r['load_avg_1m']:.1f}" for r in rows) + ".", "",
             "| seed | teacher | scratch | KD student | pruned (vs KD) | PTQ int8 .tflite (vs KD) | QAT int8 .tflite (vs KD) "
             "| int8 beats scratch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        beats = "PTQ " + ("yes" if r["ptq"] > r["scratch"] else "no") + ", QAT " + ("yes" if r["qat"] > r["scratch"] else "no")
        lines.append(f"| {r['seed']} | {r['teacher']:.3f} | {r['scratch']:.3f} | {r['student']:.3f} | "
                     f"{r['pruned']:.3f} ({pts(r['pruned'], r['student'])}) | {r['ptq']:.3f} ({pts(r['ptq'], r['student'])}) | "
                     f"{r['qat']:.3f} ({pts(r['qat'], r['student'])}) | {beats} |")
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("teacher", "scratch", "student", "pruned", "ptq", "qat")}
    lines.append(f"| mean | {mean['teacher']:.4f} | {mean['scratch']:.4f} | {mean['student']:.4f} | {mean['pruned']:.4f} "
                 f"({pts(mean['pruned'], mean['student'])}) | {mean['ptq']:.4f} ({pts(mean['ptq'], mean['student'])}) | "
                 f"{mean['qat']:.4f} ({pts(mean['qat'], mean['student'])}) | |")
    worst = {k: max(100 * (r["student"] - r[k]) for r in rows) for k in ("pruned", "ptq", "qat")}
    lines += ["", f"Largest drop against the unpruned KD student over the seeds: pruned {worst['pruned']:.1f}, "
                  f"PTQ int8 {worst['ptq']:.1f}, QAT int8 {worst['qat']:.1f} points. Seconds per seed (median): prune "
                  f"{statistics.median(r['prune_s'] for r in rows):.0f}, export {statistics.median(r['export_s'] for r in rows):.0f}, "
                  f"QAT {statistics.median(r['qat_s'] for r in rows):.0f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished distill runs of the recipe (one per seed)")
    ap.add_argument("--recipe", default=None, help="recipe whose prune/qat sections apply (default: mnist)")
    ap.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: the recipe's qat section)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds compressed at once (processes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    prov = provenance.start(threads=f"{args.jobs} process(es), each its share of the cores")
    import platform

    import torch

    from edgekd.recipe import load_recipe

    runs = sorted(args.runs, key=_seed_of)
    with tempfile.TemporaryDirectory(prefix="chain-") as work:
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // args.jobs)  # each process its share of the cores
            with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
                rows = list(pool.map(chain, runs, [args.recipe] * len(runs), [args.qat_epochs] * len(runs),
                                     [work] * len(runs)))
        else:
            rows = [chain(r, args.recipe, args.qat_epochs, work) for r in runs]
    recipe = load_recipe(args.recipe)
    prune = recipe.prune.model_dump(exclude_none=True)
    if recipe.prune.target_macs or recipe.prune.target_params:
        prune.pop("ratio", None)  # a target wins over the ratio
    meta = {"recipe": args.recipe or "mnist", "prune": prune,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
                       f"{os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}"}
    args.out.mkdir(parents=True, exist_ok=True)
    block = prov.finish()
    (args.out / "compression_chain.json").write_text(json.dumps({"meta": meta, "rows": rows, "provenance": block},
                                                                indent=2) + "\n")
    text = markdown(rows, meta) + "\n" + provenance.markdown(block)
    (args.out / "compression_chain.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
