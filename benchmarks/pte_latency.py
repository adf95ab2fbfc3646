"""Side by side: the same student as ExecuTorch ``.pte`` vs LiteRT ``.tflite`` vs ONNX Runtime ``.onnx``, fp32 and int8.

One run, one machine: the default recipe's student (``recipes/mnist.yaml``; trained weights from ``--run`` when
given, else random: latency does not depend on weight values) goes through the real ``edgekd export`` stage
(``onnx``, ``tflite`` and ``pte`` backends, fp32 and static int8 calibrated on MNIST training digits), then the
real ``edgekd bench`` (every file in its runtime at 1 and 2 threads, each in a fresh process: load, first
inference, warm-up, then p50/p90/p99 of single-sample calls).

Writes ``benchmarks/results/pte_latency.{json,md}`` with the provenance (command, commit, CPU, versions,
threads, system load) and prints the Markdown.

Usage: python benchmarks/pte_latency.py [--run exported/mnist] [--runs 200] [--warmup 20] [--threads 1,2]
       [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from int8_speed import default_student

from edgekd.bench import machine_info, run_bench
from edgekd.recipe import ExportConfig
from edgekd.run_dir import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).parent / "results"
FORMATS = {"pte": "executorch", "tflite": "litert", "onnx": "onnxruntime"}  # backend -> the runtime that runs it
PRECISIONS = ("fp32", "int8")


def provenance(argv: list[str]) -> dict:
    """What produced the figures: the command, the commit, and whether the tree had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"command": " ".join(["python", "benchmarks/pte_latency.py", *argv]), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def export(rd, calibration_samples: int) -> dict:
    """The three backends, fp32 and int8, through the real export stage (verified: the table says what ran)."""
    from edgekd.export import run_export

    t0 = time.perf_counter()
    report = run_export(rd, formats=list(FORMATS), quantize=["int8"], teacher=False, app=False,
                        cfg=ExportConfig(calibration_samples=calibration_samples))
    meta = json.loads((rd / "metadata.json").read_text())
    metrics = json.loads((rd / "metrics.json").read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "failures": list(report.failures),
            "problems": list(report.problems),
            "files": {e["file"]: {"backend": e.get("backend"), "precision": e["precision"], "route": e.get("route"),
                                  "size_bytes": e["size_bytes"], "agreement": metrics.get(e["file"], {}).get("agreement"),
                                  "parity": metrics.get(e["file"], {}).get("parity")} for e in meta["models"]}}


def table(rows: list[dict], files: dict, threads: list[int]) -> str:
    """One row per format x precision: size, then p50 (p99) ms at each thread count."""
    head = ["format", "runtime", "precision", "file", "size KB"] + [f"p50 ms ({n}t)" for n in threads] + \
           [f"p99 ms ({n}t)" for n in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision in PRECISIONS:
        for fmt, runtime in FORMATS.items():
            name = next((f for f, v in files.items() if v["backend"] == fmt and v["precision"] == precision), None)
            if name is None:
                continue
            got = {r["threads"]: r for r in rows if r["file"] == name and r["runtime"] == runtime}
            p50 = [f"{got[n]['p50_ms']:.4f}" if n in got else "-" for n in threads]
            p99 = [f"{got[n]['p99_ms']:.4f}" if n in got else "-" for n in threads]
            lines.append(f"| {fmt} | {runtime} | {precision} | `{name}` | {files[name]['size_bytes'] / 1024:.1f} | "
                         + " | ".join(p50 + p99) + " |")
    return "\n".join(lines)


def render(result: dict, out: Path) -> str:
    m, s, prov = result["machine"], result["settings"], result["provenance"]
    loads = [r["loadavg_1m"] for r in result["rows"] if r.get("loadavg_1m") is not None]
    versions = ", ".join(f"{k} {v}" for k, v in m["runtimes"].items() if v)
    md = ["# .pte vs .tflite vs .onnx: the same student, fp32 and int8, 1 and 2 threads", "",
          f"Command: `{prov['command']}` at commit `{prov['commit'][:12]}`"
          + (" (with uncommitted changes)" if prov["dirty"] else "") + f"; {result['date']}.",
          f"Machine: {m['cpu_model']} ({m['cores']} cores), Python {m.get('python')}; {versions}.",
          f"Student: `{result['student']['spec']}` {result['student']['kwargs']}, input "
          f"{result['student']['input_shape']}, {result['student']['params']:,} parameters; weights: "
          f"{result['student']['weights']}. int8: static, calibrated on {s['calibration_samples']} MNIST training "
          "digits (PT2E XNNPACKQuantizer for .pte, the TFLite and ONNX Runtime routes for the others).",
          f"Timing: `edgekd bench`, batch 1, {s['runs']} timed runs after {s['warmup']} warm-up, each file x "
          "threads in a fresh process." + (f" System load (1-min average) during the runs: {min(loads):.1f} to "
                                           f"{max(loads):.1f} on {m['cores']} cores." if loads else ""), ""]
    if loads and max(loads) > m["cores"]:
        md += ["**The machine was shared with other jobs** (load above its core count): every figure includes "
               "time spent waiting for a core, the 2-thread ones most. Compare within a column, and rerun on an "
               "idle machine for absolute numbers.", ""]
    md += [table(result["rows"], result["export"]["files"], s["threads"]), ""]
    acc = [f"`{f}` agreement {100 * v['agreement']:.2f}%" for f, v in result["export"]["files"].items()
           if v.get("agreement") is not None and v["precision"] == "int8"]
    if acc:
        md += ["Every file was verified against PyTorch on the test split by the export: " + ", ".join(acc) + ".", ""]
    if result["export"]["failures"] or result["export"]["problems"]:
        md += ["Export failures/problems: " + "; ".join(result["export"]["failures"] + result["export"]["problems"]), ""]
    text = "\n".join(md)
    write_text_atomic(out / "pte_latency.md", text + "\n")
    return text


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="   %(message)s", stream=sys.stdout)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a run directory whose trained student.pt to use (optional)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calibration-samples", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the saved .json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        print(render(json.loads((out / "pte_latency.json").read_text()), out))
        return
    threads = [int(t) for t in args.threads.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pte_latency-") as tmp:
        rd, student = default_student(Path(tmp), args.run)
        print("== exporting: onnx, tflite, pte; fp32 and int8", flush=True)
        exported = export(rd, args.calibration_samples)
        print(f"== bench at threads {threads}, {args.runs} runs after {args.warmup} warm-up", flush=True)
        report = run_bench(rd, threads=threads, runs=args.runs, warmup=args.warmup, batch=1,
                           runtimes=list(FORMATS.values())).to_json()
    keep = ("file", "runtime", "format", "precision", "threads", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "load_ms",
            "first_inference_ms", "peak_rss_mb", "size_bytes", "loadavg_1m")
    result = {"provenance": provenance(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "machine": {**machine_info(), "python": sys.version.split()[0], "pid_nice": os.nice(0)},
              "settings": {"runs": args.runs, "warmup": args.warmup, "threads": threads, "batch": 1,
                           "calibration_samples": args.calibration_samples},
              "student": student, "export": exported,
              "rows": [{k: r.get(k) for k in keep} for r in report["rows"]], "skipped": report["skipped"],
              "operator_timings": report.get("operator_timings", {}),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(out / "pte_latency.json", result)
    print(render(result, out))


if __name__ == "__main__":
    main()
