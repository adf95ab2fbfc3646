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

import logging
import os
import platform
from typing import Any

from edgekd.errors import EdgeKDError, RunDirError
from edgekd.provenance import cpu_model
from edgekd.recipe import ValidateConfig
from edgekd.results import REPORT_JSON, BenchReport, BenchRow, BenchSkip, ValidationResult, candidates
from edgekd.run_dir import RunDir, read_eval, write_json_atomic
from edgekd.runtimes.targets import ModelTarget, check_inputs, discover_models, parse_runtimes
# Timing lives in the runtimes library; these names stay importable from here.
from edgekd.runtimes.timing import (MIN_RUNS, batch_of, latency_stats, measure,  # noqa: F401
                                    measure_in_subprocess)

STAGE = "bench"
log = logging.getLogger(__name__)
RSS_METHOD = ("VmHWM of /proc/self/status (peak RSS; resource.getrusage ru_maxrss where there is no /proc) in a "
              "fresh subprocess per model x runtime x threads")


def parse_threads(text: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"1,2"`` → ``[1, 2]``; every count must be a positive integer."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int] = []
    for item in items:
        try:
            n = int(str(item).strip())
        except ValueError as e:
            raise EdgeKDError(f"--threads {text!r}: {item!r} is not a number", "e.g. --threads 1,2") from e
        if n <= 0:
            raise EdgeKDError(f"--threads must be positive, got {n}", "e.g. --threads 1,2")
        if n not in out:
            out.append(n)
    if not out:
        raise EdgeKDError("--threads is empty", "e.g. --threads 1,2")
    return out


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    from edgekd.runtimes import get_runtime, list_runtimes

    versions = {}
    for name in list_runtimes():
        try:
            versions[name] = get_runtime(name).version()
        except Exception:  # a runtime that is not installed simply has no version
            versions[name] = None
    return {"machine": platform.machine(), "cpu_model": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "runtimes": versions}


def _check_settings(runs: int | None, seconds: float | None, warmup: int, batch: int) -> None:
    if seconds is not None and seconds <= 0:
        raise EdgeKDError(f"--seconds must be positive, got {seconds}")
    if seconds is None and (runs is None or runs <= 0):
        raise EdgeKDError(f"--runs must be positive, got {runs}")
    if warmup < 0:
        raise EdgeKDError(f"--warmup must be 0 or more, got {warmup}")
    if batch <= 0:
        raise EdgeKDError(f"--batch must be positive, got {batch}")


def _bench_targets(rd: RunDir, runtimes: list[str] | None) -> list[ModelTarget]:
    """The files to measure, checked against their records."""
    if not (rd / "eval.npz").is_file():
        raise RunDirError(f"{rd / 'eval.npz'} not found", "run `edgekd distill` first")
    # The scratch baseline has the student's architecture, so its latency is the student's: not measured twice.
    targets = [t for t in discover_models(rd, runtimes) if t.source_model != "baseline"]
    if not targets:
        raise RunDirError(f"{rd.path} holds no models to measure", "run `edgekd distill` and `edgekd export` first")
    check_inputs(rd, targets)  # a changed or truncated file is an error, not a row of numbers
    return targets


def _measure_target(rd: RunDir, target: ModelTarget, n: int, settings: dict[str, Any],
                    context: dict[str, Any]) -> BenchRow | BenchSkip:
    """One (file, runtime, threads) measured in a fresh process: a row, or why it could not be measured."""
    seconds, batch = settings["seconds"], settings["batch"]
    res = measure_in_subprocess(rd / target.file, target.entry, target.runtime, n, rd / "eval.npz", batch,
                                settings["warmup"], settings["runs"], seconds)
    ident = {"model": target.stem, "file": target.file, "runtime": target.runtime, "threads": n}
    if not res.pop("ok", False):
        log.info(f"{target.file:32s} {target.runtime:12s} {n}t  skipped: {res.get('reason')}")
        return BenchSkip(**ident, reason=res.get("reason", "unknown"))
    src = context["metrics"].get(target.source_model, {})
    val = context["validation"].row(target.file, target.runtime)
    row = BenchRow.from_json({**ident, "source_model": target.source_model, "format": target.format,
                              "precision": target.precision, "batch": batch, **_rounded(res),
                              "size_bytes": rd.model_size(target.file), "params": src.get("params"),
                              "macs": src.get("macs"), "test_accuracy": val.test_accuracy if val else None,
                              "emulated": False})
    log.info(f"{target.file:32s} {target.runtime:12s} {n}t  p50 {row.p50_ms:9.4f} ms  p99 {row.p99_ms:9.4f} ms  "
             f"load {row.load_ms:8.1f} ms  rss {row.peak_rss_mb:7.1f} MB")
    return row


def _record(rd: RunDir, report: BenchReport) -> None:
    """Write ``report.json``, each file's latency entry in ``metrics.json`` and the manifest."""
    write_json_atomic(rd / REPORT_JSON, report.to_json())
    for file in sorted({r.file for r in report.rows}):
        lat = {f"{r.runtime}/{r.threads}t": {"p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms,
                                              "mean_ms": r.mean_ms}
               for r in report.rows if r.file == file}
        rd.update_metrics(file, {"latency": lat})
    rd.record_artifacts(REPORT_JSON)
    rd.stage_done(STAGE, artifact=REPORT_JSON, rows=len(report.rows), skipped=len(report.skipped))


def run_bench(rd: RunDir, threads: list[int] | str = (1,), runs: int | None = 200, seconds: float | None = None,
              warmup: int = 20, batch: int = 1, runtimes: str | list[str] | None = None) -> BenchReport:
    """Measure every model of the run on every runtime that can run it, at each thread count.

    Logs one line per measurement (``edgekd.bench`` logger, level INFO).

    Args:
        rd: The run directory.
        threads: Thread counts (a list or ``"1,2"``).
        runs: Timed iterations per measurement (ignored when ``seconds`` is given).
        seconds: Time each measurement for this many seconds instead.
        warmup: Untimed iterations after the first inference.
        batch: Samples per inference; ``throughput_ips`` is measured at this batch size.
        runtimes: Only these runtimes (a list or ``"onnxruntime,litert"``; None: all).

    Returns:
        The report also written to ``report.json``: the machine, the settings, one
        :class:`~edgekd.results.BenchRow` per (file, runtime, threads) (its ``test_accuracy`` is what
        ``edgekd validate`` measured for the same file and runtime, None before it ran) and the skipped ones.

    Raises:
        EdgeKDError: Bad arguments (threads <= 0, unknown runtime, runs and seconds both or neither).
        RunDirError: The run has no models or no eval.npz, or a file the manifest records is missing.
        ArtifactChanged: A model file or eval.npz changed since it was written (exit code 1).
    """
    threads = parse_threads(threads)
    runtimes = parse_runtimes(runtimes)
    _check_settings(runs, seconds, warmup, batch)
    targets = _bench_targets(rd, runtimes)
    settings = {"threads": threads, "runs": None if seconds is not None else runs, "seconds": seconds,
                "warmup": warmup, "batch": batch, "rss_method": RSS_METHOD,
                "timing": "one runtime call on a prepared batch (set input, invoke, read output)"}
    context = {"validation": ValidationResult.read(rd), "metrics": rd.metrics()}

    rd.stage_started(STAGE)
    report = BenchReport(run=rd.name, settings=settings)
    for target in targets:
        for n in threads:
            out = _measure_target(rd, target, n, settings, context)
            (report.rows if isinstance(out, BenchRow) else report.skipped).append(out)
    if not report.rows:
        reasons = "; ".join(f"{s.file} ({s.runtime}): {s.reason}" for s in report.skipped[:3])
        raise RunDirError(f"no model of {rd.path} could be measured: {reasons}")
    report.machine = machine_info()
    profiles = _operator_profiles(rd, targets)
    if profiles:
        report.extra["operator_timings"] = profiles
    _record(rd, report)
    return report


def _operator_profiles(rd: RunDir, targets: list[ModelTarget]) -> dict[str, dict[str, Any]]:
    """Per-operator timings of every file whose runtime can trace its operators (ExecuTorch's ETDump)."""
    import numpy as np

    from edgekd.runtimes import get_runtime

    profiles: dict[str, dict[str, Any]] = {}
    x = None
    for t in targets:
        cls = get_runtime(t.runtime)
        if t.file in profiles or not cls.available():
            continue
        if x is None:
            with np.load(rd / "eval.npz") as ev:
                x = np.asarray(ev["x"][:1], np.float32)
        prof = cls.operator_profile(rd / t.file, t.entry, x)
        if prof is not None:
            profiles[t.file] = {**prof, "runtime": t.runtime}
    return profiles


def quick_latency(rd: RunDir, validation: ValidationResult, threads: int = 1, runs: int = 50,
                  warmup: int = 10) -> BenchReport:
    """Batch-1 p50 of the student variants, measured in this process, for a latency budget without a bench.

    Returns a report holding only the timing keys of its rows; nothing is written.
    """
    x, _ = read_eval(rd)
    x1 = batch_of(x, 1)
    targets = {(t.file, t.runtime): t for t in discover_models(rd)}
    report = BenchReport(run=rd.name, settings={"threads": [threads], "runs": runs, "warmup": warmup, "batch": 1,
                                                "note": "quick in-process measurement by validate (no bench report)"})
    for c in candidates(validation, BenchReport()):
        t = targets.get((c.file, c.runtime))
        if t is None:
            continue
        res = measure(rd / t.file, t.entry, t.runtime, threads, x1, warmup, runs=runs)
        report.rows.append(BenchRow(file=t.file, runtime=t.runtime, threads=threads, batch=1, p50_ms=res["p50_ms"]))
    return report


def latency_for_budgets(rd: RunDir, validation: ValidationResult, budgets: ValidateConfig | None) -> BenchReport:
    """What the budget verdict judges latency by: ``report.json``, or a quick measurement when a latency
    budget is set and bench has not run."""
    bench = BenchReport.read(rd)
    if budgets is not None and budgets.max_p50_ms is not None and not bench.rows:
        log.warning("no bench results: measuring batch-1 p50 of the student variants for the latency budget")
        bench = quick_latency(rd, validation)
    return bench


def _rounded(res: dict[str, Any]) -> dict[str, Any]:
    # Significant digits, not decimals: a tiny model's p50 of 0.0021 ms must keep its precision.
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in res.items()}


def bench_summary(report: BenchReport) -> str:
    """A plain-text table of the bench rows."""
    from edgekd.summary import table

    rows = [[r.file, r.runtime, str(r.threads), f"{r.load_ms:.1f}", f"{r.first_inference_ms:.3f}",
             f"{r.p50_ms:.4f}", f"{r.p90_ms:.4f}", f"{r.p99_ms:.4f}", f"{r.std_ms:.4f}",
             f"{r.throughput_ips:.0f}", f"{r.peak_rss_mb:.0f}", f"{r.size_bytes / 1024:.1f}"]
            for r in report.rows]
    text = table(["file", "runtime", "thr", "load_ms", "first_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms",
                  "inf/s", "rss_MB", "size_KB"], rows)
    for s in report.skipped:
        text += f"\nskipped {s.file} ({s.runtime}, {s.threads}t): {s.reason}"
    return text
