"""``edgekd bench``: latency, throughput, memory and size of every model of a run, in every runtime.

Measured the way TFLite's ``benchmark_model`` and ``onnxruntime_perf_test`` do it: the model is loaded (timed),
run once (the first inference, timed on its own because it pays for lazy allocation and kernel selection),
run ``warmup`` more times untimed, then timed over ``runs`` iterations (or for ``seconds``). Each timing covers
one call of the runtime on an already prepared batch: feeding the input, invoking, reading the output back.

Every (model file, runtime, thread count) is measured in a fresh Python subprocess, so that the peak resident
memory (``VmHWM`` in ``/proc/self/status``, the kernel's high-water mark of the process's address space; psutil
is not a dependency) belongs to that model alone, and one model's allocator state or thread pools cannot slow down the next. The peak before
the model is loaded (interpreter plus the runtime's own libraries) is recorded too, so ``model_rss_mb`` is what
loading and running the model added.

Rows are written to ``report.json`` in the run directory; see :func:`run_bench`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError, RunDirError
from edgekd.run_dir import RunDir, read_rows_report, write_json_atomic
# Timing lives in the runtimes library; these names stay importable from here.
from edgekd.runtimes.timing import (MIN_RUNS, batch_of, latency_stats, measure,  # noqa: F401
                                    measure_in_subprocess)

STAGE = "bench"
REPORT_JSON = "report.json"
RSS_METHOD = ("VmHWM of /proc/self/status (peak RSS; resource.getrusage ru_maxrss where there is no /proc) in a "
              "fresh subprocess per model x runtime x threads")


def parse_threads(text: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"1,2"`` → ``[1, 2]``; every count must be a positive integer."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int] = []
    for item in items:
        try:
            n = int(str(item).strip())
        except ValueError:
            raise EdgeKDError(f"--threads {text!r}: {item!r} is not a number", "e.g. --threads 1,2") from None
        if n <= 0:
            raise EdgeKDError(f"--threads must be positive, got {n}", "e.g. --threads 1,2")
        if n not in out:
            out.append(n)
    if not out:
        raise EdgeKDError("--threads is empty", "e.g. --threads 1,2")
    return out


def parse_runtimes(text: str | list[str] | None) -> list[str] | None:
    """``"onnxruntime,litert"`` → a checked list (None: every runtime)."""
    from edgekd.runtimes import get_runtime, list_runtimes

    if text is None:
        return None
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    for name in items:
        get_runtime(name)  # unknown names fail here, with the closest registered name
    if not items:
        raise EdgeKDError("--runtime is empty", f"choose from: {', '.join(list_runtimes())}")
    return items


# -- the stage ------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    from edgekd.runtimes import get_runtime, list_runtimes

    versions = {}
    for name in list_runtimes():
        try:
            versions[name] = get_runtime(name).version()
        except Exception:  # a runtime that is not installed simply has no version
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu_model": cpu, "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "runtimes": versions}


def _file_size(rd: RunDir, file: str) -> int:
    """Bytes of a model file plus its ONNX external-data file, if any (what a device must store)."""
    p = rd / file
    size = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if p.suffix == ".onnx" and data.exists():
        size += data.stat().st_size
    return size


def run_bench(rd: RunDir, threads: list[int] | str = (1,), runs: int | None = 200, seconds: float | None = None,
              warmup: int = 20, batch: int = 1, runtimes: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every model of the run on every runtime that can run it, at each thread count.

    Args:
        rd: The run directory.
        threads: Thread counts (a list or ``"1,2"``).
        runs: Timed iterations per measurement (ignored when ``seconds`` is given).
        seconds: Time each measurement for this many seconds instead.
        warmup: Untimed iterations after the first inference.
        batch: Samples per inference; ``throughput_ips`` is measured at this batch size.
        runtimes: Only these runtimes (None: all).
        progress: Called with one line per measurement.

    Returns:
        The ``report.json`` content: ``{"schema_version", "run", "machine", "settings", "rows", "skipped"}``;
        every row has ``model`` (the file's stem, as device results have), ``file``, ``source_model``,
        ``runtime``, ``format``, ``precision``, ``threads``, ``batch``, ``load_ms``, ``first_inference_ms``,
        ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``std_ms``, ``min_ms``, ``max_ms``, ``runs``,
        ``throughput_ips``, ``peak_rss_mb``, ``model_rss_mb``, ``size_bytes``, ``params``, ``macs`` and the
        ``test_accuracy`` that ``edgekd validate`` measured for the same file and runtime (None before it ran).

    Raises:
        EdgeKDError: Bad arguments (threads <= 0, unknown runtime, runs and seconds both or neither).
        RunDirError: The run has no models or no eval.npz, or a file the manifest records is missing.
        ArtifactChanged: A model file or eval.npz changed since it was written (exit code 1).
    """
    from edgekd.validate import check_inputs, discover_models, read_validation

    threads = parse_threads(threads)
    runtimes = parse_runtimes(runtimes)
    if seconds is not None and seconds <= 0:
        raise EdgeKDError(f"--seconds must be positive, got {seconds}")
    if seconds is None and (runs is None or runs <= 0):
        raise EdgeKDError(f"--runs must be positive, got {runs}")
    if warmup < 0:
        raise EdgeKDError(f"--warmup must be 0 or more, got {warmup}")
    if batch <= 0:
        raise EdgeKDError(f"--batch must be positive, got {batch}")
    eval_path = rd / "eval.npz"
    if not eval_path.is_file():
        raise RunDirError(f"{eval_path} not found", "run `edgekd distill` first")
    # The scratch baseline has the student's architecture, so its latency is the student's: not measured twice.
    targets = [t for t in discover_models(rd, runtimes) if t.source_model != "baseline"]
    if not targets:
        raise RunDirError(f"{rd.path} holds no models to measure", "run `edgekd distill` and `edgekd export` first")
    check_inputs(rd, targets)  # a changed or truncated file is an error, not a row of numbers
    accuracy = {(r["file"], r["runtime"]): r for r in read_validation(rd).get("rows", [])}
    metrics = rd.metrics()

    rd.stage_started(STAGE)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for target in targets:
        for n in threads:
            res = measure_in_subprocess(rd / target.file, target.entry, target.runtime, n, eval_path, batch,
                                        warmup, None if seconds is not None else runs, seconds)
            ident = {"model": target.stem, "file": target.file, "runtime": target.runtime, "threads": n}
            if not res.pop("ok", False):
                skipped.append({**ident, "reason": res.get("reason", "unknown")})
                if progress:
                    progress(f"{target.file:32s} {target.runtime:12s} {n}t  skipped: {res.get('reason')}")
                continue
            src = metrics.get(target.source_model, {})
            val = accuracy.get((target.file, target.runtime), {})
            row = {**ident, "source_model": target.source_model, "format": target.format,
                   "precision": target.precision, "batch": batch, **_rounded(res),
                   "size_bytes": _file_size(rd, target.file), "params": src.get("params"), "macs": src.get("macs"),
                   "test_accuracy": val.get("test_accuracy"), "emulated": False}
            rows.append(row)
            if progress:
                progress(f"{target.file:32s} {target.runtime:12s} {n}t  p50 {row['p50_ms']:9.4f} ms  "
                         f"p99 {row['p99_ms']:9.4f} ms  load {row['load_ms']:8.1f} ms  "
                         f"rss {row['peak_rss_mb']:7.1f} MB")
    if not rows:
        reasons = "; ".join(f"{s['file']} ({s['runtime']}): {s['reason']}" for s in skipped[:3])
        raise RunDirError(f"no model of {rd.path} could be measured: {reasons}")
    report = {"schema_version": 1, "run": rd.name, "machine": machine_info(),
              "settings": {"threads": threads, "runs": None if seconds is not None else runs, "seconds": seconds,
                           "warmup": warmup, "batch": batch, "rss_method": RSS_METHOD,
                           "timing": "one runtime call on a prepared batch (set input, invoke, read output)"},
              "rows": rows, "skipped": skipped}
    write_json_atomic(rd / REPORT_JSON, report)
    for file in sorted({r["file"] for r in rows}):
        lat = {f"{r['runtime']}/{r['threads']}t": {k: r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}
               for r in rows if r["file"] == file}
        rd.update_metrics(file, {"latency": lat})
    rd.record_artifacts(REPORT_JSON)
    rd.stage_done(STAGE, artifact=REPORT_JSON, rows=len(rows), skipped=len(skipped))
    return report


def _rounded(res: dict[str, Any]) -> dict[str, Any]:
    # Significant digits, not decimals: a tiny model's p50 of 0.0021 ms must keep its precision.
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in res.items()}


def read_report(rd: RunDir) -> dict[str, Any]:
    """``report.json`` of a run, or ``{}`` when bench has not run."""
    return read_rows_report(rd / REPORT_JSON, "edgekd bench")


def bench_summary(report: dict[str, Any]) -> str:
    """A plain-text table of the bench rows."""
    from edgekd.summary import table

    rows = [[r["file"], r["runtime"], str(r["threads"]), f"{r['load_ms']:.1f}", f"{r['first_inference_ms']:.3f}",
             f"{r['p50_ms']:.4f}", f"{r['p90_ms']:.4f}", f"{r['p99_ms']:.4f}", f"{r['std_ms']:.4f}",
             f"{r['throughput_ips']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['size_bytes'] / 1024:.1f}"]
            for r in report.get("rows", [])]
    text = table(["file", "runtime", "thr", "load_ms", "first_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms",
                  "inf/s", "rss_MB", "size_KB"], rows)
    for s in report.get("skipped", []):
        text += f"\nskipped {s['file']} ({s['runtime']}, {s['threads']}t): {s['reason']}"
    return text
