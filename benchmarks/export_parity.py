"""Export parity: every (model × format × precision) of the default recipe — size, accuracy, agreement, parity.

Distills the default recipe into a temporary directory (or takes ``--run DIR``, which is copied, never
modified), runs ``edgekd export`` with fp16, int8 and dynamic, and also quantizes the student with the other
TFLite int8 route (so both routes are measured side by side on the same model and data). Every file is run
in its own runtime (onnxruntime, LiteRT) on the run's test split.

Target on the default recipe: the int8 student file is >= 10x smaller than the fp32 teacher file of the same
format, with >= 97% of the teacher's accuracy.

Writes ``benchmarks/results/export_parity.{json,md,png}``.

Usage: python benchmarks/export_parity.py [--run DIR] [--recipe mnist] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekd import provenance
from edgekd.export import run_export, summary_table
from edgekd.export.parity import compare
from edgekd.run_dir import RunDir
from edgekd.runtimes import runtime_for

RESULTS = Path(__file__).parent / "results"


def _other_route(rd: RunDir, chosen: str) -> dict | None:
    """Quantize the student's fp32 .tflite to int8 with the route export did not keep, and measure it."""
    from edgekd.export import metadata as meta_mod
    from edgekd.export import session as pipeline
    from edgekd.export.tflite import ROUTE_AEQ, ROUTE_PT2E, quantize_aeq, quantize_pt2e
    from edgekd.recipe import ExportConfig

    session = pipeline.ExportSession(rd, ExportConfig(), True, lambda _m: None)
    target = pipeline.student_target(rd)
    other = ROUTE_AEQ if chosen == ROUTE_PT2E else ROUTE_PT2E
    path = rd.path / f"{target.name}_int8_{other}.tflite"
    t0 = time.perf_counter()
    if other == ROUTE_AEQ:
        quantize_aeq(rd / f"{target.name}_fp32.tflite", path, "int8", session.calibration())
    else:
        quantize_pt2e(target.model, session.sample(), path, "int8", session.calibration())
    seconds = time.perf_counter() - t0
    entry = meta_mod.build_entry(path, target.name, "int8", "NCHW", session.norm, session.labels, other)
    numbers = compare(session.reference(target), runtime_for(path, entry).predict(session.x), session.y)
    return {"file": path.name, "model": target.name, "format": "tflite", "precision": "int8", "route": other,
            "size_bytes": entry["size_bytes"], "seconds": round(seconds, 2), "kept_by_export": False, **numbers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a finished distill run (copied; default: distill the recipe)")
    ap.add_argument("--recipe", default=None, help="recipe file or built-in name (default: mnist)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    prov = provenance.start(threads="runtime defaults")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekd-export-parity-") as tmp:
        if args.run:
            src = Path(args.run)
            run = Path(tmp) / src.name
            shutil.copytree(src, run, ignore=shutil.ignore_patterns("*.onnx", "*.tflite", "metadata.json"))
            # Metrics of earlier exports would otherwise mix into this run's numbers.
            metrics = json.loads((run / "metrics.json").read_text())
            (run / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if "." not in k}))
        else:
            from edgekd.distill import run_distill
            from edgekd.recipe import load_recipe

            print("distilling the default recipe (a few minutes)...", flush=True)
            recipe = load_recipe(args.recipe, args.overrides, name="export-parity")
            run = run_distill(recipe, out=tmp, quiet=True).path
        distill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        report = run_export(run, formats=["onnx", "tflite"], quantize=["fp16", "int8", "dynamic"], teacher=True,
                            log=lambda m: print(m, flush=True), check=False)
        export_s = time.perf_counter() - t1
        rd = RunDir(run)
        print(summary_table(rd))
        meta = json.loads((run / "metadata.json").read_text())
        metrics = rd.metrics()
        rows = []
        for e in meta["models"]:
            m = metrics[e["file"]]
            rows.append({"file": e["file"], "model": e["model"], "format": e["format"], "precision": e["precision"],
                         "route": e["route"], "size_bytes": e["size_bytes"], "kept_by_export": True,
                         **{k: m.get(k) for k in ("test_accuracy", "reference_accuracy", "agreement",
                                                  "accuracy_drop", "parity", "max_abs_diff", "verified")}})
        chosen = next(r["route"] for r in rows if r["format"] == "tflite" and r["precision"] == "int8"
                      and r["model"] != "teacher")
        other = _other_route(rd, chosen)
        if other:
            rows.append(other)
        problems = report.failures + report.problems

    # The target, per format: int8 student vs fp32 teacher.
    checks = []
    for fmt in ("onnx", "tflite"):
        teacher = next(r for r in rows if r["model"] == "teacher" and r["format"] == fmt)
        student = next(r for r in rows if r["model"] != "teacher" and r["format"] == fmt
                       and r["precision"] == "int8" and r["kept_by_export"])
        ratio = teacher["size_bytes"] / student["size_bytes"]
        rel_acc = student["test_accuracy"] / teacher["test_accuracy"]
        checks.append({"format": fmt, "student_file": student["file"], "teacher_file": teacher["file"],
                       "size_ratio": ratio, "accuracy_ratio": rel_acc, "agreement": student["agreement"],
                       "passed": ratio >= 10 and rel_acc >= 0.97})

    def fmt_row(r: dict) -> str:
        par = "-" if r.get("parity") is None else f"{r['parity']:.1e}"
        agree = "-" if r.get("agreement") is None else f"{100 * r['agreement']:.2f}%"
        kept = "" if r["kept_by_export"] else " (not kept)"
        return (f"| {r['file']} | {r['format']} | {r['precision']} | {r['route']}{kept} | "
                f"{r['size_bytes'] / 1024:.1f} KB | {r['test_accuracy']:.4f} | {agree} | {par} |")

    md = [
        f"Recipe `{args.recipe or 'mnist'}`" + (f" (run {args.run})" if args.run else "")
        + f"; {rows[0]['model']} vs teacher, test split of the run; export took {export_s:.0f} s.",
        "",
        "| file | format | precision | route | size | accuracy | agreement with PyTorch | max\\|diff\\|/max\\|logit\\| |",
        "|---|---|---|---|---|---|---|---|",
        *(fmt_row(r) for r in rows),
        "",
        *(f"- {c['format']}: {c['student_file']} is **{c['size_ratio']:.1f}x** smaller than {c['teacher_file']} "
          f"with **{100 * c['accuracy_ratio']:.1f}%** of its accuracy (agreement with the PyTorch student "
          f"{100 * c['agreement']:.2f}%) — target >= 10x and >= 97%: **{'met' if c['passed'] else 'NOT met'}**"
          for c in checks),
    ]
    if problems:
        md += ["", "Problems reported by export: " + "; ".join(problems)]
    block = prov.finish()
    md += ["", provenance.markdown(block)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_parity.json").write_text(json.dumps(
        {"rows": rows, "checks": checks, "problems": problems, "distill_seconds": round(distill_s, 1),
         "export_seconds": round(export_s, 1), "provenance": block}, indent=2) + "\n")
    (out / "export_parity.md").write_text("\n".join(md) + "\n")
    _figure(rows, out / "export_parity.png")
    print("\n" + "\n".join(md))
    print(f"\nresults: {out / 'export_parity.md'}, {out / 'export_parity.png'}")


def _figure(rows: list[dict], path: Path) -> None:
    """Horizontal bars of file size (log scale), coloured by precision, labelled with accuracy and agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fp32": "tab:blue", "fp16": "tab:green", "dynamic": "tab:orange", "int8": "tab:red"}
    rows = sorted(rows, key=lambda r: r["size_bytes"])
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    y = np.arange(len(rows))
    sizes = [r["size_bytes"] / 1024 for r in rows]
    bars = ax.barh(y, sizes, color=[colors[r["precision"]] for r in rows])
    for bar, r in zip(bars, rows):
        if not r["kept_by_export"]:
            bar.set_alpha(0.4)
    for i, r in enumerate(rows):
        agree = "" if r.get("agreement") is None else f", agreement {100 * r['agreement']:.2f}%"
        ax.text(sizes[i] * 1.05, i, f"acc {r['test_accuracy']:.4f}{agree}", va="center", fontsize=7)
    ax.set_yticks(y, [r["file"] + ("" if r["kept_by_export"] else " (not kept)") for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(min(sizes) / 1.5, max(sizes) * 8)
    ax.set_xlabel("file size (KB, log scale)")
    ax.set_title("Exported files of the default recipe: size, test accuracy, top-1 agreement with PyTorch",
                 fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
