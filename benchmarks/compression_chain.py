"""Does compression keep what distillation won? A recipe's chain after distillation, per seed.

For each finished distill run of a recipe (the seed runs ``kd_gain.py --work DIR`` keeps), a copy of the run goes
through every later stage of the recipe exactly as ``edgekd run`` runs them (prune, export with the recipe's
formats and precisions, QAT-KD, validate, bench, report), so the file the report recommends is the one a user of
the recipe would ship. The table gives each seed's test accuracy of the scratch student, the KD student, the
pruned student, the PTQ and QAT-KD int8 ``.tflite`` files, the app-profile int8 file, the MCU file (TFLM), and the
recommended ("shipped") file, with drops against the unpruned KD student.
Writes ``compression_chain.{json,md}`` into ``--out`` (default ``benchmarks/results``).

Usage: python benchmarks/compression_chain.py --runs DIR/kdgain-0 DIR/kdgain-1 ... [--recipe mnist]
       [--set key=value ...] [--jobs 2] [--qat-epochs 3] [--out DIR] [--work DIR]
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

from edgekd.run_dir import PRUNED_STUDENT
from edgekd import provenance

RESULTS = Path(__file__).parent / "results"
ROW_FILE = "chain_row.json"  # a finished seed's row, kept in its copy under --work
# Columns of the table: metrics.json key of each file (the pruned student's files).
FILES = {"ptq": "{model}_int8.tflite", "qat": "{model}_int8_qat.tflite", "app": "{model}_app_int8.tflite",
         "mcu": "{model}_mcu.tflite"}  # {model}: the pruned student, or the student when the recipe does not prune
COLUMNS = {"student": "KD student", "pruned": "pruned", "ptq": "PTQ int8 .tflite", "qat": "QAT-KD int8 .tflite",
           "app": "app int8 .tflite", "mcu": "MCU int8 (TFLM)", "shipped": "shipped file"}


def chain(run: str, recipe_arg: str | None, overrides: list[str], qat_epochs: int | None, work: str,
          bench_runs: int | None) -> dict:
    """Run the recipe's stages after distill on a copy of one finished distill run; return its row."""
    from edgekd.recipe import QATConfig, load_recipe
    from edgekd.results import ValidationResult
    from edgekd.run import run_pipeline
    from edgekd.run_dir import RunDir

    src = Path(run)
    seed = _seed_of(run)
    dest = Path(work) / src.name
    earlier = json.loads((dest / ROW_FILE).read_text()) if (dest / ROW_FILE).is_file() else None
    if earlier:  # this seed's chain finished in an earlier invocation with this --work
        return earlier
    if not dest.exists():  # else an earlier invocation's copy: the pipeline skips the stages it finished
        shutil.copytree(src, dest)
        for stale in dest.glob("checkpoints/prune*"):  # a copy starts its compression afresh
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    overrides = [o.replace("{seed}", str(seed)) for o in overrides]
    recipe = load_recipe(recipe_arg, overrides, seed=seed, name=src.name)
    qcfg = recipe.qat or QATConfig()
    if qat_epochs:
        qcfg = qcfg.model_copy(update={"epochs": qat_epochs})
    update = {"qat": qcfg}
    if bench_runs and recipe.bench is not None:
        update["bench"] = recipe.bench.model_copy(update={"runs": bench_runs})
    t0 = time.perf_counter()
    result = run_pipeline(recipe.model_copy(update=update), out=work, quiet=True, raise_on_budget=False)
    rd = RunDir(result.run_dir)
    if "distill" in result.ran:
        raise RuntimeError(f"{src} was trained again: it was not distilled with {recipe_arg} and these --set values")
    m = rd.metrics()
    rec = result.report.summary.recommended
    model = PRUNED_STUDENT if PRUNED_STUDENT in m else "student"
    files = {k: v.format(model=model) for k, v in FILES.items()}
    mcu = {r.file: r.extra["mcu"] for r in ValidationResult.read(rd).rows if isinstance(r.extra.get("mcu"), dict)}
    row = {"run": provenance.repo_path(src), "seed": seed, "teacher": m["teacher"]["test_accuracy"],
           "scratch": m["baseline"]["test_accuracy"], "student": m["student"]["test_accuracy"],
           "pruned": m.get(PRUNED_STUDENT, {}).get("test_accuracy"),
           "mac_reduction": m.get(PRUNED_STUDENT, {}).get("mac_reduction"),
           "qat_epochs": qcfg.epochs, "shipped_file": rec.file if rec else None,
           "shipped": rec.test_accuracy if rec else None, "rule": result.report.summary.rule,
           "mcu_flash_bytes": mcu.get(files["mcu"], {}).get("flash_bytes"),
           "mcu_arena_bytes": mcu.get(files["mcu"], {}).get("ram_bytes"),
           "stages": result.ran, "seconds": round(time.perf_counter() - t0, 1), "load_avg_1m": os.getloadavg()[0]}
    for key, name in files.items():
        row[key] = m.get(name, {}).get("test_accuracy")
    row["latency"] = _latency(rd, ["teacher_fp32.tflite", f"{model}_fp32.tflite", files["ptq"], row["shipped_file"]])
    (dest / ROW_FILE).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _latency(rd, names: list[str | None]) -> dict:
    """Size and batch-1 p50 (ms) of these files in their first runtime at 1 thread, from the run's bench."""
    from edgekd.results import BenchReport

    if not (rd / "report.json").is_file():  # a recipe without a bench section
        return {}
    report = BenchReport.read(rd)
    out = {}
    for name in filter(None, names):
        r = next((b for b in report.rows if b.file == name and b.threads == 1), None)
        if r is not None:
            out[name] = {"runtime": r.runtime, "p50_ms": r.p50_ms, "size_bytes": r.size_bytes,
                         "loadavg_1m": r.loadavg_1m}
    return out


def _seed_of(run: str) -> int:
    from edgekd.recipe import read_yaml

    return int(read_yaml(Path(run) / "recipe.yaml").get("seed", 0))


def _cell(r: dict, key: str) -> str:
    v = r.get(key)
    if v is None:
        return "—"
    return f"{v:.4f} ({100 * (v - r['student']):+.1f})" if key not in ("student",) else f"{v:.4f}"


def summarize(rows: list[dict]) -> dict:
    """Means per column, the worst drop against the KD student, and per-seed checks of the shipped file."""
    keys = ["teacher", "scratch", *COLUMNS]
    mean = {k: statistics.fmean(r[k] for r in rows) for k in keys if all(r.get(k) is not None for r in rows)}
    worst = {k: max(100 * (r["student"] - r[k]) for r in rows) for k in COLUMNS if k in mean and k != "student"}
    shipped_ok = [r["shipped"] is not None and r["student"] - r["shipped"] <= 0.005 + 1e-9 for r in rows]
    beats = [r["shipped"] is not None and r["shipped"] > r["scratch"] for r in rows]
    return {"mean": mean, "worst_drop_points": worst, "shipped_within_half_point": sum(shipped_ok),
            "shipped_beats_scratch": sum(beats), "seeds": len(rows)}


def markdown(rows: list[dict], meta: dict) -> str:
    summary = summarize(rows)
    head = ["seed", "scratch", *COLUMNS.values(), "which file", "shipped − scratch"]
    lines = ["# Compression chain: KD student → pruned → int8 / app / MCU files, per seed", "",
             f"Recipe `{meta['recipe']}`" + "".join(f" `--set {o}`" for o in meta.get("overrides", [])) + ": every "
             f"stage after distill as `edgekd run` runs it, plus QAT-KD ({rows[0]['qat_epochs']} epochs). Prune: "
             f"{meta['prune']}. Test accuracy of each file in its runtime (LiteRT; the MCU file in TensorFlow Lite "
             f"Micro), points against the unpruned KD student in parentheses; the shipped file is the one the "
             f"report recommends ({rows[0]['rule']}). {meta['machine']}; load average (1 min) at the end of each "
             "seed: " + ", ".join(f"{r['load_avg_1m']:.1f}" for r in rows) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['scratch']:.4f} | " + " | ".join(_cell(r, k) for k in COLUMNS)
                     + (f" | `{r['shipped_file']}` | {100 * (r['shipped'] - r['scratch']):+.1f} |" if r["shipped"] is not None
                        else " | none recommended | — |"))
    m = summary["mean"]
    lines.append("| mean | " + f"{m['scratch']:.4f} | " + " | ".join(
        f"{m[k]:.4f}" + (f" ({100 * (m[k] - m['student']):+.1f})" if k != "student" else "") if k in m else "—"
        for k in COLUMNS) + (f" | | {100 * (m['shipped'] - m['scratch']):+.1f} |" if "shipped" in m else " | | — |"))
    worst = ", ".join(f"{COLUMNS[k]} {v:.1f}" for k, v in summary["worst_drop_points"].items())
    flash = [r["mcu_flash_bytes"] for r in rows if r.get("mcu_flash_bytes")]
    arena = [r["mcu_arena_bytes"] for r in rows if r.get("mcu_arena_bytes")]
    lines += ["", f"Largest drop against the unpruned KD student over the seeds (points): {worst}. The shipped file "
                  f"is within 0.5 point of the unpruned KD student on {summary['shipped_within_half_point']} of "
                  f"{summary['seeds']} seeds and above the scratch student on {summary['shipped_beats_scratch']}."]
    if flash:
        lines.append(f"MCU file: {max(flash):,} bytes of flash at most, tensor arena {max(arena):,} bytes at most "
                     "(as the MCU target measures them).")
    lines.append(f"Seconds per seed for the stages after distill (median): "
                 f"{statistics.median(r['seconds'] for r in rows):.0f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished distill runs of the recipe (one per seed)")
    ap.add_argument("--recipe", default=None, help="the recipe the runs were distilled with (default: mnist)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="the --set overrides the runs were distilled with ({seed} is replaced)")
    ap.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: the recipe's qat section)")
    ap.add_argument("--bench-runs", type=int, default=None, help="timed runs per file (default: the recipe's)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds compressed at once (processes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", default=None, help="keep each seed's compressed copy here (default: a temporary "
                    "folder); a seed whose chain finished there before is not run again")
    args = ap.parse_args()
    prov = provenance.start(threads=f"{args.jobs} process(es), each its share of the cores")
    import platform

    import torch

    from edgekd.recipe import load_recipe

    runs = sorted(args.runs, key=_seed_of)
    n = len(runs)
    with tempfile.TemporaryDirectory(prefix="chain-") as tmp:
        work = args.work or tmp
        Path(work).mkdir(parents=True, exist_ok=True)
        call = (runs, [args.recipe] * n, [args.overrides] * n, [args.qat_epochs] * n, [work] * n,
                [args.bench_runs] * n)
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // args.jobs)  # each process its share of the cores
            with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
                rows = list(pool.map(chain, *call))
        else:
            rows = [chain(*a) for a in zip(*call)]
    recipe = load_recipe(args.recipe, [o.replace("{seed}", "0") for o in args.overrides])
    prune = recipe.prune.model_dump(exclude_none=True) if recipe.prune else "none (the recipe does not prune)"
    if recipe.prune and (recipe.prune.target_macs or recipe.prune.target_params):
        prune.pop("ratio", None)  # a target wins over the ratio
    meta = {"recipe": args.recipe or "mnist", "overrides": args.overrides, "prune": prune,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {max(1, (os.cpu_count() or 1) // args.jobs)} "
                       f"torch thread(s) per process, {args.jobs} process(es), torch {torch.__version__}"}
    args.out.mkdir(parents=True, exist_ok=True)
    block = prov.finish()
    (args.out / "compression_chain.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "summary": summarize(rows), "provenance": block}, indent=2) + "\n")
    text = markdown(rows, meta) + "\n" + provenance.markdown(block)
    (args.out / "compression_chain.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
