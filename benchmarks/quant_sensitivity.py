"""Mixed precision within an accuracy budget: fp32 vs full int8 vs `edgekd quantize --max-drop`, on models that
lose accuracy in int8.

For each model: a short real run on Fashion-MNIST (``data.dataset: fashion_mnist``; a tiny teacher, a few student
epochs: the point is the int8 drop, not the float accuracy), ``edgekd export`` (fp32 and the shipped int8
files, ONNX and TFLite), then ``edgekd quantize --sensitivity --max-drop BUDGET`` (the real stage functions:
``run_distill``, ``run_export``, ``run_quantize``). Every file is then run on the test split and timed at 1
thread, one model at a time in a fresh process (``edgekd bench``'s worker), in LiteRT (.tflite) and ONNX Runtime
(.onnx):

* fp32: ``student_fp32``;
* full int8: the search's starting point, every layer int8 by the same quantizer as the mixed file
  (ai-edge-quantizer for TFLite, ONNX Runtime for ONNX; the ONNX one is ``student_int8.onnx`` itself);
* shipped int8: ``student_int8.tflite`` as ``edgekd export`` writes it (litert-torch PT2E first), for reference;
* mixed: ``student_mixed``, the layers kept float listed.

Recovered = (mixed - full int8) / (fp32 - full int8) accuracy on the test split; size kept = (fp32 - mixed) /
(fp32 - full int8) bytes. Targets: recovered >= 75% with size kept >= 80%.

Writes ``benchmarks/results/quant_sensitivity.{json,md}`` and prints the Markdown. About 15-20 minutes niced on
the project's shared 2-core machine.

Usage: python benchmarks/quant_sensitivity.py [--models mbv2_pt mbv2_7_pt] [--budget 0.3]
       [--limit 8000] [--runs 200] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
RUNTIME = {"tflite": "litert", "onnx": "onnxruntime"}
# The models (how they were found: benchmarks/README.md). "weights": export.<tflite|onnx>.int8_weights.
MODELS = {
    "mbv2_pt": {"about": "MobileNetV2 width 0.35, 4 stages, stem stride 2, 256 last channels; 15 KD epochs; "
                         "per-tensor int8 weights",
                "student": {"model": "mobilenetv2", "kwargs": {"width_mult": 0.35, "stages": 4, "stem_stride": 2,
                                                               "last_channels": 256}},
                "epochs": 15, "weights": "per_tensor"},
    "mbv2_7_pt": {"about": "MobileNetV2 width 0.35, all 7 stages, stem stride 2, 256 last channels; 15 KD epochs; "
                           "per-tensor int8 weights",
                  "student": {"model": "mobilenetv2", "kwargs": {"width_mult": 0.35, "stages": 7, "stem_stride": 2,
                                                                 "last_channels": 256}},
                  "epochs": 15, "weights": "per_tensor"},
    "mbv2": {"about": "MobileNetV2 width 0.35, 4 stages, stem stride 2, 256 last channels; 3 KD epochs",
             "student": {"model": "mobilenetv2", "kwargs": {"width_mult": 0.35, "stages": 4, "stem_stride": 2,
                                                            "last_channels": 256}},
             "epochs": 3},
    "cnn_brief": {"about": "cnn width 12, depth 3 (the default student's architecture); 1 KD epoch",
                  "student": {"model": "cnn", "kwargs": {"width": 12, "depth": 3}}, "epochs": 1},
}


def recipe_for(name: str, spec: dict, limit: int, seed: int) -> dict:
    return {"name": name, "seed": seed,
            "data": {"dataset": "fashion_mnist", "limit": limit, "batch_size": 128},
            "teacher": {"model": "cnn", "kwargs": {"width": 4, "depth": 1}, "epochs": 1, "lr": 0.01},
            "student": spec["student"],
            "distill": {"epochs": spec["epochs"], "lr": 0.02, "baseline": False,
                        "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.5}},
            # The benchmark reads the figures; loose tolerances keep a lossy int8 file from failing the stage.
            "export": {"formats": ["onnx", "tflite"], "quantize": ["int8"], "teacher": False,
                       "tflite_app": {"enabled": False}, "tolerance": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
                       "tflite": {"int8_weights": spec.get("weights", "per_channel")},
                       "onnx": {"int8_weights": spec.get("weights", "per_channel")}}}


def full_int8_tflite(rd: Path, out: Path) -> None:
    """Every layer int8 by ai-edge-quantizer (the mixed search's start), float32 I/O like the shipped files."""
    from edgekd.export import get_backend
    from edgekd.export.session import ExportSession, load_run_recipe
    from edgekd.export.tflite import has_int8_io, retype_io
    from edgekd.run_dir import RunDir

    run = RunDir(rd)
    session = ExportSession(run, load_run_recipe(run).export, verify=False, log=lambda _m: None)
    meta = json.loads((rd / "data.json").read_text())
    backend = get_backend("tflite")  # the mixed route's own quantizer and settings (export.tflite.int8_weights)
    with backend.selective(rd / "student_fp32.tflite", session.calibration(), "NCHW", meta["normalization"],
                           session.settings(backend)) as route:
        route.write(out)
    data = out.read_bytes()
    if has_int8_io(data):
        out.write_bytes(retype_io(data, "float32"))


def test_accuracy(path: Path, entry: dict, x: np.ndarray, y: np.ndarray) -> float:
    from edgekd.runtimes import runtime_for

    return float((runtime_for(path, entry, threads=1, runtime=RUNTIME[path.suffix[1:]]).predict(x).argmax(1) == y).mean())


def p50(path: Path, entry: dict, rd: Path, runs: int) -> float | None:
    from edgekd.runtimes.timing import measure_in_subprocess

    res = measure_in_subprocess(path, entry, RUNTIME[path.suffix[1:]], 1, rd / "eval.npz", 1, 20, runs, None)
    return round(res["p50_ms"], 4) if res.get("ok") else None


def one_model(key: str, args: argparse.Namespace, root: Path) -> dict:
    """Train, export, search; then accuracy, size and p50 of every file of the model."""
    from edgekd.distill import run_distill
    from edgekd.export import run_export, run_quantize
    from edgekd.recipe import validate_recipe

    spec = MODELS[key]
    t0 = time.perf_counter()
    rd = run_distill(validate_recipe(recipe_for(key, spec, args.limit, args.seed)), out=root, quiet=True).path
    train_s = time.perf_counter() - t0
    run_export(rd, quiet=True)
    t0 = time.perf_counter()
    run_quantize(rd, sensitivity=True, max_drop=args.budget, quiet=True)
    quantize_s = time.perf_counter() - t0
    full_int8_tflite(rd, rd / "student_int8full.tflite")
    meta = {e["file"]: e for e in json.loads((rd / "metadata.json").read_text())["models"]}
    meta["student_int8full.tflite"] = {**meta["student_int8.tflite"], "file": "student_int8full.tflite",
                                       "route": "ai-edge-quantizer (all layers)"}
    metrics = json.loads((rd / "metrics.json").read_text())
    sens = json.loads((rd / "quant_sensitivity.json").read_text())["files"]
    with np.load(rd / "eval.npz") as ev:
        x, y = ev["x"], ev["y"]
    files = {"tflite": {"fp32": "student_fp32.tflite", "int8": "student_int8full.tflite",
                        "shipped int8": "student_int8.tflite", "mixed": "student_mixed.tflite"},
             "onnx": {"fp32": "student_fp32.onnx", "int8": "student_int8.onnx", "mixed": "student_mixed.onnx"}}
    rows = []
    for fmt, kinds in files.items():
        for kind, name in kinds.items():
            e, path = meta[name], rd / name
            m = metrics.get(name, {})
            rows.append({"model": key, "format": fmt, "runtime": RUNTIME[fmt], "kind": kind, "file": name,
                         "route": e["route"], "test_accuracy": test_accuracy(path, e, x, y),
                         "size_bytes": path.stat().st_size, "p50_ms": p50(path, e, rd, args.runs),
                         "float_layers": e.get("float_layers"),
                         "layers": len(sens[f"student_fp32.{fmt}"]["layers"]),
                         "sensitivity_s": sens[f"student_fp32.{fmt}"]["seconds"] if kind == "mixed" else None,
                         "search_s": (m.get("mixed") or {}).get("search_seconds")})
    return {"model": key, "about": spec["about"], "train_seconds": round(train_s, 1),
            "quantize_seconds": round(quantize_s, 1), "test_samples": int(len(y)),
            "validation_samples": json.loads((rd / "quant_sensitivity.json").read_text())["settings"]["samples"],
            "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per format: drop of full int8, recovered share of it, size reduction kept, targets met."""
    out = []
    for fmt in ("tflite", "onnx"):
        r = {row["kind"]: row for row in rows if row["format"] == fmt}
        fp32, full, mixed = r["fp32"], r["int8"], r["mixed"]
        drop = fp32["test_accuracy"] - full["test_accuracy"]
        shrink = fp32["size_bytes"] - full["size_bytes"]
        recovered = (mixed["test_accuracy"] - full["test_accuracy"]) / drop if drop > 0 else None
        kept = (fp32["size_bytes"] - mixed["size_bytes"]) / shrink if shrink > 0 else None
        out.append({"format": fmt, "int8_drop_points": round(100 * drop, 2),
                    "recovered": None if recovered is None else round(recovered, 3),
                    "size_reduction_kept": None if kept is None else round(kept, 3),
                    "float_layers": len(mixed["float_layers"] or []), "layers": mixed["layers"],
                    "meets_target": recovered is not None and kept is not None and recovered >= 0.75 and kept >= 0.8})
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(results: list[dict], settings: dict, prov: dict) -> str:
    from edgekd import provenance

    lines = ["# Mixed precision within an accuracy budget (`edgekd quantize --max-drop`)", "",
             f"Budget {settings['budget']} points on the validation split; Fashion-MNIST, data.limit "
             f"{settings['limit']}; p50 at 1 thread, batch 1, {settings['runs']} timed runs after 20 warm-up, one "
             "file at a time in a fresh process, on a shared machine (load in the provenance below).", ""]
    for res in results:
        lines += [f"## {res['model']}: {res['about']}", "",
                  f"{res['test_samples']} test / {res['validation_samples']} validation samples; training "
                  f"{res['train_seconds']} s; sensitivity + search {res['quantize_seconds']} s (both formats).", "",
                  "| runtime | file | kind | test accuracy | size KB | p50 ms | layers kept float | sensitivity s | "
                  "search s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            floats = "-" if r["float_layers"] is None else (
                f"{len(r['float_layers'])} of {r['layers']}" + (f": {', '.join(r['float_layers'])}" if r["float_layers"] else ""))
            lines.append(f"| {r['runtime']} | `{r['file']}` | {r['kind']} | {r['test_accuracy']:.4f} | "
                         f"{r['size_bytes'] / 1024:.1f} | {r['p50_ms'] if r['p50_ms'] is not None else '-'} | "
                         f"{floats} | {r['sensitivity_s'] or '-'} | {r['search_s'] or '-'} |")
        lines += ["", "| format | full int8 drop (points) | recovered by mixed | size reduction kept | target met |",
                  "|---|---|---|---|---|"]
        for s in res["summary"]:
            lines.append(f"| {s['format']} | {s['int8_drop_points']:+.2f} | {_pct(s['recovered'])} | "
                         f"{_pct(s['size_reduction_kept'])} | {'yes' if s['meets_target'] else 'no'} |")
        lines.append("")
    return "\n".join(lines) + "\n" + provenance.markdown(prov)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mbv2_pt", "mbv2_7_pt"], choices=list(MODELS))
    ap.add_argument("--budget", type=float, default=0.3, help="--max-drop, accuracy points on the validation split")
    ap.add_argument("--limit", type=int, default=8000, help="data.limit (Fashion-MNIST samples used)")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from edgekd import provenance

    prov = provenance.start(threads=1)
    with tempfile.TemporaryDirectory(prefix="quant-sensitivity-") as tmp:
        results = []
        for key in args.models:
            results.append(one_model(key, args, Path(tmp)))
            print(f"{key}: done", flush=True)
    block = prov.finish()
    settings = {"budget": args.budget, "limit": args.limit, "runs": args.runs, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_sensitivity.json").write_text(
        json.dumps({"provenance": block, "settings": settings, "models": results}, indent=2))
    text = markdown(results, settings, block)
    (args.out / "quant_sensitivity.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
