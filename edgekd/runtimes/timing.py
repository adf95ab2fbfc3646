"""Timing a model file in a runtime: load time, first inference, latency percentiles, peak memory.

Measured the way TFLite's ``benchmark_model`` and ``onnxruntime_perf_test`` do it: the model is loaded (timed),
run once (the first inference, timed on its own because it pays for lazy allocation and kernel selection),
run ``warmup`` more times untimed, then timed over ``runs`` iterations (or for ``seconds``). Each timing covers
one call of the runtime on an already prepared batch: feeding the input, invoking, reading the output back.

:func:`measure_in_subprocess` runs :func:`measure` in a fresh Python process (``python -m
edgekd.runtimes.timing --worker SPEC.json``), so the peak resident memory belongs to that model alone. A runtime
registered outside edgekd is imported again in the worker from the module that registered it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError, RunDirError
from edgekd.runtimes.base import Runtime, get_runtime

# A model must run at least this many timed iterations even with --seconds, or percentiles mean nothing.
MIN_RUNS = 10


def latency_stats(seconds: list[float] | np.ndarray) -> dict[str, float]:
    """Summary statistics of per-iteration times.

    Percentiles use linear interpolation between the closest ranks (numpy's default), the definition
    ``benchmark_model`` and ``onnxruntime_perf_test`` report too.

    Args:
        seconds: One wall-clock duration per timed iteration, in seconds.

    Returns:
        ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``std_ms`` (population), ``min_ms``, ``max_ms`` and
        ``runs``.

    Raises:
        EdgeKDError: When there are no times.
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise EdgeKDError("no timed runs to summarize", "use --runs 1 or more")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std()), "min_ms": float(ms.min()), "max_ms": float(ms.max()), "runs": int(ms.size)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space, in MiB.

    Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of the current address space. It starts
    afresh at ``exec``, unlike ``getrusage``'s ``ru_maxrss``, which a child inherits from a large parent (a
    pytest or notebook process that already holds PyTorch) and would then report for every model alike.
    Elsewhere: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure(path: str | Path, entry: dict[str, Any], runtime: str, threads: int, x_raw: np.ndarray,
            warmup: int, runs: int | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Load one model and time it in this process.

    Args:
        path: The model file.
        entry: Its metadata entry (see :mod:`edgekd.runtimes`).
        runtime: A registered runtime name (``torch``, ``onnxruntime``, ``litert``...).
        threads: Intra-op threads.
        x_raw: One raw input batch (its length is the batch size).
        warmup: Untimed iterations after the first inference.
        runs: Timed iterations (exclusive with ``seconds``).
        seconds: Time for this long instead (at least ``MIN_RUNS`` iterations).

    Returns:
        ``load_ms``, ``first_inference_ms``, the :func:`latency_stats` keys, ``throughput_ips`` (samples per
        second at this batch size), ``rss_before_load_mb``, ``peak_rss_mb`` and ``model_rss_mb``.
    """
    cls = get_runtime(runtime)
    cls.import_libraries()  # load time is the model's, not Python's
    # The 1-minute load average shows whether other work competed for the cores during this measurement.
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    rt = cls(path, entry, threads)
    load_s = time.perf_counter() - t0
    x = rt.prepare(x_raw)
    t0 = time.perf_counter()
    rt.run(x)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        rt.run(x)
    stats = latency_stats(time_runs(rt, x, runs, seconds))
    peak = peak_rss_mb()
    batch = int(len(x_raw))
    return {"load_ms": load_s * 1e3, "first_inference_ms": first_s * 1e3, **stats,
            "throughput_ips": batch / (stats["mean_ms"] / 1e3) if stats["mean_ms"] > 0 else None,
            "rss_before_load_mb": rss_before, "peak_rss_mb": peak, "model_rss_mb": max(0.0, peak - rss_before),
            "loadavg_1m": load_avg}


def time_runs(rt: Runtime, x: np.ndarray, runs: int | None = None, seconds: float | None = None) -> list[float]:
    """Seconds of each timed call of ``rt.run`` on the prepared batch ``x``: ``runs`` calls, or for ``seconds``
    (at least ``MIN_RUNS`` calls)."""
    times: list[float] = []
    if seconds is not None:
        deadline = time.perf_counter() + seconds
        while len(times) < MIN_RUNS or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            rt.run(x)
            times.append(time.perf_counter() - t0)
    else:
        for _ in range(runs or 1):
            t0 = time.perf_counter()
            rt.run(x)
            times.append(time.perf_counter() - t0)
    return times


def _plugin_of(runtime: str) -> dict[str, str | None] | None:
    """Where a runtime registered outside edgekd is defined, so the worker process can register it too."""
    module = get_runtime(runtime).__module__
    if module.startswith("edgekd."):
        return None
    return {"module": module, "file": getattr(sys.modules.get(module), "__file__", None)}


def _import_plugin(plugin: dict[str, str | None] | None) -> None:
    # The parent process already imported this module (that is how the runtime got registered); the worker
    # imports the same code again, by name if it can, else from its file.
    if not plugin:
        return
    try:
        importlib.import_module(plugin["module"])
        return
    except ImportError:
        if not plugin.get("file"):
            raise
    spec = importlib.util.spec_from_file_location(plugin["module"], plugin["file"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[plugin["module"]] = module
    spec.loader.exec_module(module)


def batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` samples of ``x``, repeated when the evaluation set is smaller."""
    if len(x) == 0:
        raise RunDirError("eval.npz holds no samples", "run `edgekd distill` again")
    reps = -(-batch // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch]) if reps > 1 else np.ascontiguousarray(x[:batch])


def _worker(spec_path: str) -> int:
    """Subprocess entry point: measure the model described in a JSON spec file, write the result beside it."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out = Path(spec["result"])
    try:
        with np.load(spec["eval"], allow_pickle=False) as data:
            x = batch_of(np.asarray(data["x"], dtype=np.float32), int(spec["batch"]))
        _import_plugin(spec.get("plugin"))
        result = measure(spec["path"], spec["entry"], spec["runtime"], int(spec["threads"]), x,
                         int(spec["warmup"]), spec.get("runs"), spec.get("seconds"))
        out.write_text(json.dumps({"ok": True, **result}), encoding="utf-8")
    except Exception as e:  # reported back as a skipped row with its reason, never a traceback
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        out.write_text(json.dumps({"ok": False, "reason": f"{type(e).__name__}: {msg}"}), encoding="utf-8")
    return 0


def measure_in_subprocess(path: Path, entry: dict[str, Any], runtime: str, threads: int, eval_path: Path,
                          batch: int, warmup: int, runs: int | None, seconds: float | None) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process; returns its result or ``{"ok": False, "reason": ...}``."""
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({
            "path": str(path), "entry": entry, "runtime": runtime, "threads": threads, "eval": str(eval_path),
            "batch": batch, "warmup": warmup, "runs": runs, "seconds": seconds, "result": str(result_path),
            "plugin": _plugin_of(runtime)}))
        env = dict(os.environ)
        # OpenMP pools (torch, some ORT builds) size themselves from these at start-up.
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        timeout = 600 + 5 * (seconds or 0)
        try:
            proc = subprocess.run([sys.executable, "-m", "edgekd.runtimes.timing", "--worker", str(spec_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "reason": f"timed out after {timeout:.0f} s"}
        if not result_path.exists():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            return {"ok": False, "reason": f"the benchmark process died ({tail[0][:200]})"}
        return json.loads(result_path.read_text(encoding="utf-8"))


if __name__ == "__main__":  # the per-model worker: python -m edgekd.runtimes.timing --worker SPEC.json
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit("usage: python -m edgekd.runtimes.timing --worker SPEC.json (internal; use `edgekd bench`)")
