"""Does distillation help? The default recipe over several seeds: teacher vs scratch vs KD student.

Prints a table and writes it to ``benchmarks/results/kd_gain.{json,md}``:
teacher, scratch baseline and KD student test accuracy (mean ± std over seeds), the share of the
scratch→teacher gap that KD closes (of the means and per seed), and the cost of a KD epoch relative to a plain
epoch, both with the recipe's augmentation, KD replaying the augmented-teacher cache; measured alternating in one
process, with the cache's size and one-off build time. The machine's load average is recorded with the figures.

The epoch cost is measured with augmentation even when the recipe trains without it (``--cost-augment``, default
``light`` then), since that is where a teacher cache matters: unaugmented KD replays one pass of logits.

Usage: python benchmarks/kd_gain.py [--seeds 0 1 2 3 4] [--recipe mnist] [--set key=value ...] [--out DIR]
       [--jobs 2] [--cost-augment light] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgekd import provenance
from edgekd.distill import run_distill
from edgekd.recipe import load_recipe

RESULTS = Path(__file__).parent / "results"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_closed(teacher: float, scratch: float, kd: float) -> float:
    """Share of the scratch→teacher accuracy gap that the KD student closes (NaN when the teacher is not ahead)."""
    return (kd - scratch) / (teacher - scratch) if teacher > scratch else float("nan")


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided ``level`` confidence interval (Student's t, n - 1 degrees of freedom)."""
    from scipy.stats import t

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


def with_seed(overrides: list[str], seed: int) -> list[str]:
    """``--set`` values with ``{seed}`` replaced (e.g. a per-seed ``teacher.checkpoint``)."""
    return [o.replace("{seed}", str(seed)) for o in overrides]


def epoch_cost(recipe, teacher_ckpt: Path, work: Path, rounds: int = 5, epochs: int = 2) -> dict:
    """Seconds per training epoch of the plain (CE) student and the KD student, measured side by side.

    The two kinds of epoch alternate (plain, KD, plain, KD, ...) in this process on the same data and model
    architecture, so machine load affects both alike; the per-epoch median of each kind is compared. The KD
    runs replay the trainer's teacher cache (with augmentation: the augmented-teacher cache of
    ``distill.teacher_views`` views, built by the first KD run and reused by the others); its one-off build
    time and size are reported separately. Both kinds augment their batches the same way.
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
    cache_info = None
    for r in range(rounds):
        for kind in ("plain", "kd"):
            torch.manual_seed(recipe.seed)
            student = build_model(recipe.student.model, data.input_shape, data.num_classes, recipe.student.kwargs)
            res = fit(student, data, kd_loss if kind == "kd" else losses.build("ce"),
                      FitConfig(kind, cfg, seed=recipe.seed, state_path=work / f"cost-{kind}-{r}.state.pt",
                                quiet=True, views_cache=work / "cost-cache"),
                      teacher=teacher if kind == "kd" else None)
            times[kind] += [row["seconds"] for row in res.history]
            if kind == "kd" and cache_info is None:
                cache_info = res.teacher_cache
    if cache_info is None:  # no augmentation: the cache is one plain teacher pass over the train split
        t0 = time.perf_counter()
        logits, _ = predict_logits(teacher, data.loader("train", 512))
        cache_info = {"views": 1, "build_seconds": time.perf_counter() - t0, "bytes": logits.numel() * 4}
    plain, kd = statistics.median(times["plain"]), statistics.median(times["kd"])
    return {"plain_epoch_s": plain, "kd_epoch_s": kd, "ratio": kd / plain, "cache_seconds": cache_info["build_seconds"],
            "cache_bytes": cache_info["bytes"], "cache_views": cache_info["views"],
            "epochs_each": len(times["plain"]), "threads": torch.get_num_threads()}


def finished_run(recipe, work: Path):
    """The seed's run in ``work`` when a previous invocation finished it with this very recipe (a long benchmark
    stopped part-way continues where it stopped), else None."""
    from edgekd.run_dir import RunDir

    rd = RunDir(work / recipe.name)
    if not (rd / "recipe.yaml").is_file() or rd.stage_status("distill") != "done":
        return None
    from edgekd.recipe import distill_part

    saved = load_recipe(rd / "recipe.yaml")
    same = distill_part(saved.to_dict()) == distill_part(recipe.to_dict())  # later sections do not matter here
    return rd if same else None


# Distill keys that change only the KD student (a baseline trained under other values of them is the same baseline).
KD_ONLY = ("loss", "baseline", "parallel_baseline", "cache_teacher", "teacher_views", "strategy", "generations",
           "ensemble")


def baseline_part(recipe: dict) -> dict:
    """What the scratch baseline depends on: distill's part of the recipe without the teacher(s) and KD-only keys."""
    from edgekd.recipe import distill_part

    part = {k: v for k, v in distill_part(recipe).items() if k not in ("teacher", "teachers")}
    part["distill"] = {k: v for k, v in (part.get("distill") or {}).items() if k not in KD_ONLY}
    return part


def borrowed_baseline(recipe, runs: Path) -> dict:
    """The scratch baseline's metrics from the same seed's finished run ``runs/kdgain-<seed>``, which must have
    trained it with the same data, student and training settings (exits with one line otherwise)."""
    from edgekd.run_dir import RunDir

    rd = RunDir(runs / f"kdgain-{recipe.seed}")
    if not (rd / "recipe.yaml").is_file() or rd.stage_status("distill") != "done":
        sys.exit(f"error: --baseline-from: no finished seed run {rd.path} (run kd_gain.py on seed {recipe.seed} "
                 "with --work pointing there first, or drop --baseline-from)")
    if baseline_part(load_recipe(rd / "recipe.yaml").to_dict()) != baseline_part(recipe.to_dict()):
        sys.exit(f"error: --baseline-from: {rd.path} trained its baseline with other data, student or training "
                 "settings than this recipe; drop --baseline-from to train the baseline again")
    m = rd.metrics()
    if "baseline" not in m:
        sys.exit(f"error: --baseline-from: {rd.path} has no scratch baseline (distill.baseline was off)")
    return {**m["baseline"], "from_run": str(rd.path)}


def seed_recipe(recipe_arg: str | None, overrides: list[str], seed: int, borrow: bool = False):
    """The recipe of one seed run (``kdgain-<seed>``); without its own baseline when ``borrow``."""
    extra = ["distill.baseline=false"] if borrow else []
    return load_recipe(recipe_arg, [*with_seed(overrides, seed), *extra], seed=seed, name=f"kdgain-{seed}")


def run_seed(recipe_arg: str | None, overrides: list[str], seed: int, work: str,
             borrowed: dict | None = None) -> dict:
    """Distill one seed of the recipe (teacher, scratch baseline, KD student) and return its table row; with
    ``borrowed`` (:func:`borrowed_baseline`), the baseline is that finished run's instead of a new one."""
    import torch

    recipe = seed_recipe(recipe_arg, overrides, seed, borrow=borrowed is not None)
    reused = finished_run(recipe, Path(work))
    rd = reused or run_distill(recipe, out=work, quiet=True)
    m = rd.metrics()
    if borrowed:
        m["baseline"] = borrowed
    ckpt = recipe.teacher.checkpoint and Path(recipe.teacher.checkpoint).parent / "metrics.json"
    if "val_accuracy" not in m["teacher"] and ckpt and ckpt.is_file():  # a teacher an earlier edgekd run trained
        m["teacher"]["val_accuracy"] = json.loads(ckpt.read_text())["teacher"].get("val_accuracy")
    row = {"seed": seed, **{k: m[k]["test_accuracy"] for k in ("teacher", "baseline", "student")},
           **{f"{k}_val": m[k].get("val_accuracy") for k in ("teacher", "baseline", "student")},
           "kd_epoch_s": m["student"]["epoch_seconds_median"],
           "plain_epoch_s": m["baseline"]["epoch_seconds_median"],
           "teacher_params": m["teacher"]["params"], "student_params": m["student"]["params"],
           "teacher_macs": m["teacher"]["macs"], "student_macs": m["student"]["macs"],
           "teacher_cache": m["student"].get("teacher_cache"), "seconds": rd.manifest()["stages"]["distill"]["seconds"],
           "run": str(rd.path)}
    if borrowed:
        row["baseline_run"] = borrowed["from_run"]
    row["gap_closed"] = gap_closed(row["teacher"], row["baseline"], row["student"])
    row["epoch_ratio"] = row["kd_epoch_s"] / row["plain_epoch_s"]
    row["load_avg_1m"] = float("nan") if reused else os.getloadavg()[0]  # not known for an earlier invocation's run
    row["threads"] = torch.get_num_threads()
    print(f"seed {seed}: teacher {row['teacher']:.4f}  scratch {row['baseline']:.4f}  "
          f"KD {row['student']:.4f}  gap closed {row['gap_closed']:.0%}  (val: {row['teacher_val'] or float('nan'):.3f} / "
          f"{row['baseline_val']:.3f} / {row['student_val']:.3f})  load {row['load_avg_1m']:.1f}", flush=True)
    return row


def _save_partial(out: Path, rows: list[dict]) -> None:
    """Rows finished so far (a long run stopped early keeps them; the final files replace nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_gain.partial.json").write_text(json.dumps(rows, indent=2) + "\n")


def _cost_from(args, run: Path) -> None:
    """The epoch-cost comparison with an existing seed run's teacher, written with the rows finished so far."""
    out = Path(args.out)
    rows = json.loads((out / "kd_gain.partial.json").read_text())
    seed = next(r["seed"] for r in rows if Path(r["run"]) == run)
    recipe = cost_recipe(args, seed)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    prov = provenance.start()
    with tempfile.TemporaryDirectory() as tmp:
        cost = epoch_cost(recipe, run / "teacher.pt", Path(tmp))
    _write_json(out, args, rows, cost, time.perf_counter() - t0, load_start, recipe, prov)
    write_table(out)


def cost_recipe(args, seed: int):
    """The recipe the epoch cost is measured with: the benchmarked one, augmented as ``--cost-augment`` says."""
    recipe = load_recipe(args.recipe, with_seed(args.overrides, seed), seed=seed)
    aug = args.cost_augment or (recipe.data.augment if recipe.data.augment not in (None, "none") else "light")
    if not isinstance(aug, str):  # a mapping of settings: an override in YAML flow style
        aug = json.dumps(aug.model_dump(mode="json"))
    return load_recipe(args.recipe, [*with_seed(args.overrides, seed), f"data.augment={aug}"], seed=seed)


def _threads(rows: list[dict], cost: dict) -> str:
    """Torch threads of the seed runs (saved per row; older results only saved the cost comparison's)."""
    seen = sorted({r["threads"] for r in rows if "threads" in r})
    if not seen:
        return str(cost["threads"])
    runs = "/".join(map(str, seen))
    if seen == [cost["threads"]]:
        return runs
    return f"{runs} in the seed runs, {cost['threads']} in the epoch-cost comparison"


def _cores(saved: dict) -> str:
    """The core count for the load sentence, from the provenance block (older results have none: empty)."""
    cores = (saved.get("provenance") or {}).get("cores")
    return f" on {cores} cores" if cores else ""


def _write_json(out: Path, args, rows: list[dict], cost: dict, seconds: float, load_start, recipe, prov) -> None:
    out.mkdir(parents=True, exist_ok=True)
    aug = recipe.data.augment
    trained = load_recipe(args.recipe, with_seed(args.overrides, rows[0]["seed"]), seed=rows[0]["seed"]).data.augment
    (out / "kd_gain.json").write_text(json.dumps({
        "recipe": args.recipe or "mnist", "seeds": [r["seed"] for r in rows],
        "rows": [{**r, "run": provenance.repo_path(r["run"]),
                  **({"baseline_run": provenance.repo_path(r["baseline_run"])} if r.get("baseline_run") else {})}
                 for r in rows], "epoch_cost": cost,
        "seconds": seconds, "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "augment": trained if isinstance(trained, str) else trained.model_dump(),
        "cost_augment": aug if isinstance(aug, str) else aug.model_dump(), "overrides": list(args.overrides),
        "target_gap_closed": args.target,
        "provenance": prov.finish(threads=_threads(rows, cost))}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--recipe", default=None, help="recipe file or built-in name (default: mnist)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once (processes); the epoch-cost "
                                                         "comparison runs afterwards, alone")
    ap.add_argument("--work", default=None, help="keep the run directories here (default: a temporary folder)")
    ap.add_argument("--cost-augment", default=None, help="augmentation of the epoch-cost comparison (default: the "
                                                           "recipe's, or `light` when it has none)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved JSON")
    ap.add_argument("--target", type=float, default=0.75, help="share of the scratch->teacher gap KD should close "
                                                              "(stated beside the result)")
    ap.add_argument("--reuse-cost", action="store_true", help="take the epoch-cost comparison from the --out "
                    "folder's kd_gain.json (an earlier invocation) instead of measuring it again")
    ap.add_argument("--cost-from", default=None, metavar="RUN",
                    help="only measure the epoch cost with the teacher of this finished seed run, then write the "
                         "results from the rows saved so far (kd_gain.partial.json)")
    ap.add_argument("--baseline-from", default=None, metavar="DIR",
                    help="take each seed's scratch baseline from the finished seed runs in DIR (an earlier --work) "
                         "instead of training it again: for screening KD settings (loss, temperature, teacher) that "
                         "leave the baseline unchanged; refused when the data, student or training settings differ")
    args = ap.parse_args()
    if args.table_only:
        write_table(Path(args.out))
        return
    if args.cost_from:
        _cost_from(args, Path(args.cost_from))
        return

    borrowed = {s: (borrowed_baseline(seed_recipe(args.recipe, args.overrides, s, borrow=True),
                                      Path(args.baseline_from)) if args.baseline_from else None)
                for s in args.seeds}  # refused here, before anything trains
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    prov = provenance.start()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            import torch

            # Each process gets its share of the cores: two 2-thread processes on 2 cores ran 3.5x slower.
            threads = max(1, (os.cpu_count() or 1) // args.jobs)
            with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
                futures = [pool.submit(run_seed, args.recipe, args.overrides, s, work, borrowed[s])
                           for s in args.seeds]
                rows = []
                for f in futures:
                    rows.append(f.result())
                    _save_partial(Path(args.out), rows)
        else:
            rows = []
            for s in args.seeds:
                rows.append(run_seed(args.recipe, args.overrides, s, work, borrowed[s]))
                _save_partial(Path(args.out), rows)
        recipe = cost_recipe(args, args.seeds[0])
        saved = Path(args.out) / "kd_gain.json"
        if args.reuse_cost and saved.is_file():  # measured by an earlier invocation: say when, under what load
            cost = json.loads(saved.read_text())["epoch_cost"]
            cost.setdefault("measured", "by an earlier invocation of this script")
        else:
            cost = epoch_cost(recipe, Path(rows[0]["run"]) / "teacher.pt", Path(tmp))
            cost["measured"] = f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load {os.getloadavg()[0]:.1f}"
        print(f"epoch cost, side by side ({cost['epochs_each']} epochs each): plain "
              f"{cost['plain_epoch_s']:.3f} s, KD {cost['kd_epoch_s']:.3f} s, ratio {cost['ratio']:.3f}; "
              f"teacher cache {cost['cache_seconds']:.2f} s once per run", flush=True)

    out = Path(args.out)
    _write_json(out, args, rows, cost, time.perf_counter() - t0, load_start, recipe, prov)
    (out / "kd_gain.partial.json").unlink(missing_ok=True)
    write_table(out)


def summarize(rows: list[dict]) -> dict:
    """Means ± std of teacher / scratch / KD accuracy, the gap KD closes, and KD's lead over scratch with the 95%
    interval of its mean (the per-seed leads are paired: the same seed's split, initial weights and teacher)."""
    summary = {k: mean_std([r[k] for r in rows]) for k in ("teacher", "baseline", "student", "epoch_ratio")}
    t, b, s = summary["teacher"][0], summary["baseline"][0], summary["student"][0]
    summary["gap_closed_of_means"] = gap_closed(t, b, s)
    summary["gap_closed_per_seed_mean"] = statistics.fmean(r["gap_closed"] for r in rows)
    summary["lead"] = mean_interval([r["student"] - r["baseline"] for r in rows])
    summary["wins"] = sum(r["student"] > r["baseline"] for r in rows)
    leads = [100 * (r["student"] - r["baseline"]) for r in rows]
    mean, low, high = mean_interval(leads)
    summary["lead_points"] = {"per_seed": leads, "mean": mean, "ci95": [low, high], "wins": summary["wins"]}
    return summary


def _seed_table(rows: list[dict], summary: dict) -> list[str]:
    lines = ["| seed | teacher | scratch | KD student | KD − scratch (points) | gap closed |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['teacher']:.4f} | {r['baseline']:.4f} | {r['student']:.4f} | "
                     f"{100 * (r['student'] - r['baseline']):+.2f} | {r['gap_closed']:.0%} |")
    lead, lo, hi = summary["lead"]
    lines.append(f"| mean ± std | {summary['teacher'][0]:.4f} ± {summary['teacher'][1]:.4f} | "
                 f"{summary['baseline'][0]:.4f} ± {summary['baseline'][1]:.4f} | "
                 f"{summary['student'][0]:.4f} ± {summary['student'][1]:.4f} | {100 * lead:+.2f} "
                 + (f"(95% interval {100 * lo:+.2f} to {100 * hi:+.2f}) " if len(rows) > 1 else "")
                 + f"| {summary['gap_closed_of_means']:.1%} of the means |")
    return lines


def write_table(out: Path) -> None:
    """Write ``kd_gain.md`` (and the summary in ``kd_gain.json``) from the rows saved in ``kd_gain.json``."""
    saved = json.loads((out / "kd_gain.json").read_text())
    rows, cost = saved["rows"], saved["epoch_cost"]
    summary = summarize(rows)
    target = saved.get("target_gap_closed", 0.75)
    lead, lo, hi = summary["lead"]
    loads = ", ".join(f"{r.get('load_avg_1m', float('nan')):.1f}" for r in rows)
    r0 = rows[0]
    md = [
        f"Recipe `{saved['recipe']}`"
        + "".join(f" `--set {o}`" for o in saved.get("overrides", []))
        + f", seeds {saved['seeds']}; teacher {r0['teacher_params']:,} params / "
        f"{r0['teacher_macs']:,} MACs, student {r0['student_params']:,} params / {r0['student_macs']:,} MACs; "
        f"torch threads per process: {_threads(rows, cost)}. Test accuracy:",
        "",
        *_seed_table(rows, summary),
        "",
        f"KD closes **{summary['gap_closed_of_means']:.1%}** of the scratch→teacher gap of the means (target ≥ "
        f"{target:.0%}: {'met' if summary['gap_closed_of_means'] >= target else 'not met'}); per-seed mean "
        f"{summary['gap_closed_per_seed_mean']:.0%}. The KD student beats the scratch student on {summary['wins']} "
        f"of {len(rows)} seeds, by {100 * lead:+.2f} points on average; "
        + (f"the 95% interval of that mean lead (t, {len(rows) - 1} degrees of freedom) is {100 * lo:+.2f} to "
           f"{100 * hi:+.2f} points" + (" and excludes zero." if lo > 0 or hi < 0 else ", which includes zero: not a "
                                        "result.") if len(rows) > 1 else
           "one seed has no interval: a screening figure, not a result."),
        "",
        f"Students trained with augmentation `{saved.get('augment', 'none')}`. "
        f"With augmentation `{saved.get('cost_augment', saved.get('augment', 'none'))}`, a KD epoch replaying the "
        f"augmented-teacher cache costs **{cost['ratio']:.2f}x** a plain (augmented) epoch: "
        f"{cost['kd_epoch_s']:.3f} s vs {cost['plain_epoch_s']:.3f} s, medians of {cost['epochs_each']} epochs "
        f"each, alternating plain and KD in one process ({cost['threads']} torch thread(s)); building the cache "
        f"({cost.get('cache_views', 1)} view(s) of every training sample, {cost.get('cache_bytes', 0) / 1e6:.2f} MB "
        f"on disk) costs {cost['cache_seconds']:.2f} s once per run"
        + (f" (measured {cost['measured']})" if cost.get("measured") else "") + ". Load average (1 min) at the end "
        f"of each seed run: {loads}{_cores(saved)}, this benchmark's own processes included (nan: a seed run an "
        f"earlier invocation finished)."
        + ("" if any(r.get("baseline_run") for r in rows) else  # a borrowed baseline ran under another load
           f" (Inside the seed runs above, the ratio of the KD student's to the baseline's median epoch time was "
           f"{summary['epoch_ratio'][0]:.2f} ± {summary['epoch_ratio'][1]:.2f}.)"),
    ]
    val = [r for r in rows if None not in (r.get("teacher_val"), r.get("baseline_val"), r.get("student_val"))]
    if val:
        md += ["", "Validation accuracy (best epoch; the split settings are chosen on, never the test split): "
               + "; ".join(f"seed {r['seed']}: teacher {r['teacher_val']:.4f}, scratch {r['baseline_val']:.4f}, KD "
                           f"{r['student_val']:.4f} (gap closed "
                           f"{gap_closed(r['teacher_val'], r['baseline_val'], r['student_val']):.0%})" for r in val)
               + "."]
    borrowed = sorted({provenance.repo_path(r["baseline_run"]) for r in rows if r.get("baseline_run")})
    if borrowed:
        md += ["", f"The scratch baselines were not trained again: each is its seed's finished run in "
                   f"{', '.join(f'`{b}`' for b in borrowed)} (`--baseline-from`; same data, student and training "
                   "settings, checked)."]
    md += ["", provenance.markdown(saved.get("provenance"))]
    saved["summary"] = summary
    (out / "kd_gain.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out / "kd_gain.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
