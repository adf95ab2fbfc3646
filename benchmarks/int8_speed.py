"""Is int8 faster here? fp32 vs static int8 vs dynamic-range int8 vs fp16, on ONNX Runtime and LiteRT, 1 and 2 threads.

Two models in one run, so every number is measured on the same machine under the same conditions:

* the default recipe's student (``recipes/mnist.yaml``: cnn width 12, depth 3, 1x28x28 inputs), calibrated on
  real MNIST training digits (its trained weights from ``--run`` if given; latency does not depend on them);
* a MobileNetV2 (width 1.0, 224x224x3, 1000-class head), random weights, calibrated on random images (latency
  and size only: its accuracy means nothing).

Each model goes through the real ``edgekd export`` stage (``run_export``: ONNX and TFLite, fp16/int8/dynamic),
then the real ``edgekd bench`` (``run_bench``: every file x runtime x thread count in a fresh process, warm-up,
then p50/p90/p99). PyTorch fp32 is measured too, as the reference an unexported model would cost.

Writes ``benchmarks/results/int8_speed.{json,md,png}`` and prints the Markdown.

Usage: python benchmarks/int8_speed.py [--runs 100] [--warmup 10] [--threads 1,2] [--run exported/mnist]
       [--skip-mobilenet] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekd import provenance
from edgekd.bench import machine_info, run_bench
from edgekd.recipe import DataConfig, ExportConfig, Recipe, load_recipe, save_recipe
from edgekd.report import matrix_markdown, quantization_findings
from edgekd.run_dir import RunDir, write_json_atomic, write_text_atomic

RESULTS = Path(__file__).parent / "results"
PRECISIONS = ["fp32", "fp16", "int8", "dynamic"]
RUNTIMES = ["onnxruntime", "litert"]


def _write_run(rd: RunDir, model, spec: str, kwargs: dict, input_shape: tuple[int, ...], labels: list[str],
               data_cfg: DataConfig, eval_x: np.ndarray, mean: list[float], std: list[float]) -> None:
    """A minimal run directory (recipe, data.json, eval.npz, student.pt) that export and bench accept."""
    from edgekd.models import save_checkpoint

    rd.path.mkdir(parents=True, exist_ok=True)
    save_recipe(Recipe(name=rd.name, data=data_cfg), rd / "recipe.yaml")
    write_json_atomic(rd / "data.json", {"labels": labels, "input_shape": list(input_shape), "layout": "NCHW",
                                         "normalization": {"mean": mean, "std": std}})
    np.savez(rd / "eval.npz", x=eval_x.astype(np.float32), y=np.zeros(len(eval_x), np.int64))
    save_checkpoint(rd / "student.pt", model, spec, kwargs, input_shape, len(labels))
    rd.record_artifacts("recipe.yaml", "data.json", "eval.npz", "student.pt")


def default_student(root: Path, run: str | None) -> tuple[RunDir, dict]:
    """The default recipe's student, in a run directory calibrated on real MNIST digits."""
    import torch

    from edgekd.data import load_data
    from edgekd.models import build_model, count_macs_params, load_weights

    recipe = load_recipe(None)
    data = load_data(recipe.data, recipe.seed)
    torch.manual_seed(0)
    model = build_model(recipe.student.model, data.input_shape, data.num_classes, recipe.student.kwargs).eval()
    weights = "random (latency does not depend on weight values)"
    if run and (Path(run) / "student.pt").is_file():
        load_weights(model, Path(run) / "student.pt")
        weights = f"trained ({Path(run) / 'student.pt'})"
    x, _ = data.test.raw_arrays()
    rd = RunDir(root / "default_student")
    _write_run(rd, model, recipe.student.model, recipe.student.kwargs, data.input_shape, data.labels,
               recipe.data, x[:64], data.mean, data.std)
    macs, params = count_macs_params(model, data.input_shape)
    return rd, {"name": "default student", "spec": recipe.student.model, "kwargs": recipe.student.kwargs,
                "input_shape": list(data.input_shape), "params": params, "macs": macs, "weights": weights,
                "calibration": "MNIST training digits"}


def mobilenet(root: Path, width: float, size: int) -> tuple[RunDir, dict]:
    """A MobileNetV2 at ``size`` x ``size``, random weights, calibrated on random images."""
    import torch

    from edgekd.models import build_model, count_macs_params

    shape = (3, size, size)
    kwargs = {"width_mult": width}
    torch.manual_seed(0)
    model = build_model("mobilenetv2", shape, 1000, kwargs).eval()
    # BatchNorm with fresh statistics makes activations of random weights explode or vanish; a few
    # training-mode passes give realistic ranges for int8 calibration.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, *shape), dtype=np.uint8)
    model.train()
    with torch.no_grad():
        for i in range(0, 64, 16):
            model(torch.from_numpy((images[i:i + 16].astype(np.float32) / 255 - 0.5) / 0.25))
    model.eval()
    npz = root / "mbv2_images.npz"
    # Two classes so the 64 images split into train/val/test; the labels play no part in calibration.
    np.savez(npz, x=images, y=np.arange(64) % 2)
    rd = RunDir(root / "mobilenetv2")
    _write_run(rd, model, "mobilenetv2", kwargs, shape, [str(i) for i in range(1000)],
               DataConfig(dataset="npz", path=str(npz), normalize=False), images[:8].astype(np.float32) / 255,
               [0.5] * 3, [0.25] * 3)
    macs, params = count_macs_params(model, shape)
    return rd, {"name": f"MobileNetV2 {width:g} @ {size}x{size}", "spec": "mobilenetv2", "kwargs": kwargs,
                "input_shape": list(shape), "params": params, "macs": macs, "weights": "random",
                "calibration": "random images (uint8 noise)"}


def export_all(rd: RunDir, calibration_samples: int) -> dict:
    """Every format and precision through the real export stage (no verification: speed only)."""
    from edgekd.export import run_export

    t0 = time.perf_counter()
    report = run_export(rd, formats=["onnx", "tflite"], quantize=["fp16", "int8", "dynamic"], teacher=False,
                        verify=False, cfg=ExportConfig(calibration_samples=calibration_samples))
    meta = json.loads((rd / "metadata.json").read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "failures": list(report.failures),
            "files": {e["file"]: {"route": e.get("route"), "size_bytes": e["size_bytes"],
                                  "input_dtype": e["input"]["dtype"]} for e in meta["models"]}}


def table(rows: list[dict], threads: list[int]) -> str:
    """p50 per precision x (runtime, threads), with the ratio to fp32 of the same runtime and threads."""
    cols = [(rt, t) for rt in RUNTIMES for t in threads]
    head = "| precision | " + " | ".join(f"{rt} {t}t p50 ms (vs fp32)" for rt, t in cols) + " | size KB (onnx / tflite) |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    p50 = {(r["precision"], r["runtime"], r["threads"]): r["p50_ms"] for r in rows}
    size = {(r["precision"], r["format"]): r["size_bytes"] for r in rows}
    torch_rows = {r["threads"]: r["p50_ms"] for r in rows if r["runtime"] == "torch"}
    for prec in PRECISIONS:
        cells = []
        for rt, t in cols:
            v, ref = p50.get((prec, rt, t)), p50.get(("fp32", rt, t))
            cells.append("-" if v is None else f"{v:.4f}" + (f" ({v / ref:.2f}x)" if ref and prec != "fp32" else ""))
        sizes = " / ".join(f"{size[(prec, f)] / 1024:.1f}" if (prec, f) in size else "-" for f in ("onnx", "tflite"))
        lines.append(f"| {prec} | " + " | ".join(cells) + f" | {sizes} |")
    if torch_rows:
        lines += ["", "PyTorch fp32 (eager, the unexported model) for reference: "
                  + ", ".join(f"{v:.4f} ms at {t} thread{'s' if t > 1 else ''}" for t, v in sorted(torch_rows.items()))
                  + "."]
    return "\n".join(lines)


def plot(models: list[dict], threads: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), layout="constrained", squeeze=False)
    for ax, m in zip(axes[0], models):
        groups = [(rt, t) for rt in RUNTIMES for t in threads]
        width = 0.8 / len(PRECISIONS)
        p50 = {(r["precision"], r["runtime"], r["threads"]): r["p50_ms"] for r in m["rows"]}
        for i, prec in enumerate(PRECISIONS):
            vals = [p50.get((prec, rt, t), np.nan) for rt, t in groups]
            ax.bar(np.arange(len(groups)) + (i - 1.5) * width, vals, width, label=prec)
        ax.set_xticks(np.arange(len(groups)), [f"{'ORT' if rt == 'onnxruntime' else 'LiteRT'}\n{t} thread{'s' if t > 1 else ''}"
                                               for rt, t in groups])
        ax.set_yscale("log")
        ax.set(ylabel="p50 latency, batch 1 (ms, log)", title=m["name"])
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    # edgekd.bench logs one line per measurement.
    logging.basicConfig(level=logging.INFO, format="   %(message)s", stream=sys.stdout)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--run", default=None, help="a run directory whose trained student.pt to use (optional)")
    ap.add_argument("--mobilenet-width", type=float, default=1.0)
    ap.add_argument("--mobilenet-size", type=int, default=224)
    ap.add_argument("--skip-mobilenet", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md/.png from the saved .json")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((Path(args.out) / "int8_speed.json").read_text()), Path(args.out))
        return
    threads = [int(t) for t in args.threads.split(",")]
    prov = provenance.start(threads=threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    models = []
    with tempfile.TemporaryDirectory(prefix="int8_speed-") as tmp:
        root = Path(tmp)
        builders = [lambda: default_student(root, args.run)]
        if not args.skip_mobilenet:
            builders.append(lambda: mobilenet(root, args.mobilenet_width, args.mobilenet_size))
        for build in builders:
            rd, info = build()
            print(f"== {info['name']}: exporting (onnx + tflite; fp32, fp16, int8, dynamic)", flush=True)
            info["export"] = export_all(rd, calibration_samples=32)
            if info["export"]["failures"]:
                print("   export failures: " + "; ".join(info["export"]["failures"]), flush=True)
            print(f"== {info['name']}: bench at threads {threads}, {args.runs} runs after {args.warmup} warm-up",
                  flush=True)
            report = run_bench(rd, threads=threads, runs=args.runs, warmup=args.warmup, batch=1).to_json()
            keep = ("file", "runtime", "format", "precision", "threads", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                    "std_ms", "load_ms", "first_inference_ms", "peak_rss_mb", "size_bytes", "loadavg_1m")
            info["rows"] = [{k: r.get(k) for k in keep} for r in report["rows"]]
            info["skipped"] = report["skipped"]
            info["findings"] = quantization_findings([{**r, "source_model": "student", "batch": 1}
                                                      for r in report["rows"]])
            models.append(info)
            shutil.rmtree(rd.path, ignore_errors=True)

    machine = machine_info()
    result = {"machine": machine, "settings": {"runs": args.runs, "warmup": args.warmup, "threads": threads,
                                               "batch": 1, "timing": "edgekd bench: fresh process per file x "
                                               "runtime x threads, p50 of single-call latency"},
              "seconds": round(time.perf_counter() - t_start, 1), "models": models, "provenance": prov.finish()}
    write_json_atomic(out / "int8_speed.json", result)
    render(result, out)


def render(result: dict, out: Path) -> None:
    """Write ``int8_speed.md`` and ``int8_speed.png`` from the results and print the Markdown."""
    machine, models, settings = result["machine"], result["models"], result["settings"]
    threads = settings["threads"]

    class args:  # the names the text below uses
        runs, warmup = settings["runs"], settings["warmup"]

    plot(models, threads, out / "int8_speed.png")
    loads = [r["loadavg_1m"] for m in models for r in m["rows"] if r.get("loadavg_1m") is not None]
    md = ["# int8 speed: fp32 vs fp16 vs static int8 vs dynamic-range int8", "",
          f"Machine: {machine['cpu_model']} ({machine['cores']} cores); "
          + ", ".join(f"{k} {v}" for k, v in machine["runtimes"].items() if v)
          + f". Batch 1, {args.runs} timed runs after {args.warmup} warm-up, each file x runtime x thread count in "
            "a fresh process (`edgekd bench`)."
          + (f" System load (1-min average) during the runs: {min(loads):.1f} to {max(loads):.1f} on "
             f"{machine['cores']} cores." if loads else "")
          + (" **The machine was shared with other jobs**: every number includes time spent waiting for a core, "
             "the 2-thread numbers most (a second thread has to wait for a core someone else holds), so read "
             "the 1-thread columns and the ratios, and rerun on an idle machine for absolute numbers."
             if loads and machine.get("cores") and max(loads) > machine["cores"] else ""), "",
          "Produced by `python benchmarks/int8_speed.py`; files made by the real `edgekd export` routes.", ""]
    for m in models:
        md += [f"## {m['name']}", "",
               f"`{m['spec']}` {m['kwargs']}, input {m['input_shape']}, {m['params']:,} parameters, "
               f"{m['macs']:,} MACs; weights: {m['weights']}; int8 calibration: {m['calibration']}. "
               f"Export took {m['export']['seconds']} s.", "",
               table(m["rows"], threads), ""]
        routes = ", ".join(f"`{f}`: {v['route']}" for f, v in m["export"]["files"].items())
        md += [f"Routes: {routes}.", ""]
        if m["export"]["failures"]:
            md += ["Export failures: " + "; ".join(m["export"]["failures"]), ""]
        md += matrix_markdown(m["findings"], level="###")
    md += ["![p50 latency per precision, runtime and thread count](int8_speed.png)", "",
           provenance.markdown(result.get("provenance"))]
    text = "\n".join(md)
    write_text_atomic(out / "int8_speed.md", text)
    print(text)
    print(f"results: {out / 'int8_speed.json'}, {out / 'int8_speed.md'}, {out / 'int8_speed.png'} "
          f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
