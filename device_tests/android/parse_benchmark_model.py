#!/usr/bin/env python3
"""Turn the text printed by TensorFlow Lite's ``benchmark_model`` into edgekd's device-report JSON.

Pure standard library (no numpy), so it runs on any host that drives a phone with adb.

Two uses:

* ``parse_benchmark_model.py LOG [LOG ...]`` prints what was parsed from each log, as JSON.
* ``parse_benchmark_model.py --manifest RUNS.tsv --metadata metadata.json --device-info DEVICE.txt
  --threads N --out OUT.json`` assembles the report ``run_android.sh`` writes: ``RUNS.tsv`` has one line
  per benchmark run, ``file<TAB>delegate<TAB>log path``; ``DEVICE.txt`` has ``key=value`` lines.

The report has the same shape as ``bench.py``'s: ``{"device": {...}, "results": [...], "skipped": [...]}``.
``benchmark_model`` feeds random inputs, so ``accuracy`` is null; it reports the mean latency and, in
recent versions, the median (p50) and the 5th and 95th percentiles, but not p90 or p99, which are null.
A run whose output has no timing summary (the model failed to load, a delegate failed) is listed under
``skipped`` with the last error line of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
SUMMARY_RE = re.compile(
    r"Inference timings in us: Init: " + _NUM + r", First inference: " + _NUM
    + r", Warmup \(avg\): " + _NUM + r", Inference \(avg\): " + _NUM)
# "count=50 first=... curr=... min=... max=... avg=... std=..." optionally followed by percentiles
# ("p5=... median=... p95=..."). The same shape appears in op-profiling tables ("Timings (microseconds):
# count=..."), which are not end-to-end latencies and are ignored.
STATS_RE = re.compile(r"(?:^|[\s:])count=\d+\s.*\bavg=")
KV_RE = re.compile(r"\b([a-z][a-z0-9_]*)=" + _NUM)
SESSION_RE = re.compile(r"Initialized session in " + _NUM + r"\s*ms")
THREADS_RE = re.compile(r"(?:#threads used for CPU inference|Num threads): \[(\d+)\]")
GRAPH_RE = re.compile(r"Graph: \[([^\]]*)\]")
VERSION_RE = re.compile(r"Tensorflow Version\s*:\s*(\S+)", re.IGNORECASE)
DELEGATE_RE = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]+)\)")
MEMORY_RE = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): "
                       r"init=" + _NUM + r" overall=" + _NUM)
ERROR_RE = re.compile(r"\b(ERROR|FATAL|Error|Failed|failed)\b")
# Android logcat and glog prefixes in front of each message: "07-14 13:14:52.097 22838 22838 I tflite  : ",
# "INFO: ", "I1123 00:19:40.632000 3257 file.cc:107] ".
PREFIX_RE = re.compile(r"^(?:\d\d-\d\d \d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+)?(?:[VDIWEF] tflite\s*:\s*)?"
                       r"(?:(?:INFO|WARNING|VERBOSE): )?")


def _strip(line: str) -> str:
    return PREFIX_RE.sub("", line.rstrip("\r\n"), count=1)


def parse(text: str) -> dict:
    """Parse one ``benchmark_model`` output.

    Args:
        text: Everything the binary printed (stdout and stderr, or an ``adb logcat -s tflite`` dump).

    Returns:
        A dict with the timing summary in microseconds (``init_us``, ``first_inference_us``,
        ``warmup_avg_us``, ``inference_avg_us``), the steady-state statistics line (``count``, ``min_us``,
        ``max_us``, ``avg_us``, ``std_us`` and any percentiles such as ``p5_us``, ``median_us``,
        ``p95_us``), and when present ``threads``, ``graph``, ``tf_version``, ``session_init_ms``,
        ``delegate``, ``delegated_nodes``, ``total_nodes``, ``memory_init_mb``, ``memory_overall_mb``.
        ``ok`` is False when no timing summary was found; ``error`` then holds the first and last error
        lines.
    """
    out: dict = {"ok": False}
    stats_lines = []
    errors = []
    for raw in text.splitlines():
        line = _strip(raw)
        if not line.strip():
            continue
        m = SUMMARY_RE.search(line)
        if m:
            init, first, warm, infer = (float(g) for g in m.groups())
            out.update(init_us=init, first_inference_us=first, warmup_avg_us=warm, inference_avg_us=infer,
                       ok=True)
            # The steady-state statistics line is the last one printed before this summary; the one
            # before it (if any) covers the warm-up runs.
            if stats_lines:
                out.update(_stats(stats_lines[-1]))
                if len(stats_lines) > 1:
                    out["warmup_count"] = int(_kv(stats_lines[-2]).get("count", 0))
            continue
        if not out["ok"] and STATS_RE.search(line) and "Timings (" not in line and "Memory (" not in line:
            stats_lines.append(line)
            continue
        for regex, key, cast in ((SESSION_RE, "session_init_ms", float), (THREADS_RE, "threads", int),
                                 (GRAPH_RE, "graph", str), (VERSION_RE, "tf_version", str)):
            m = regex.search(line)
            if m and key not in out:
                out[key] = cast(m.group(1))
        m = DELEGATE_RE.search(line)
        if m:
            out.update(delegated_nodes=int(m.group(1)), total_nodes=int(m.group(2)), delegate=m.group(3))
        m = MEMORY_RE.search(line)
        if m:
            out.update(memory_init_mb=float(m.group(1)), memory_overall_mb=float(m.group(2)))
        if ERROR_RE.search(line):
            errors.append(" ".join(line.split()))
    if not out["ok"]:
        # The first error usually names the cause, the last one the consequence ("Benchmarking failed.").
        if not errors:
            out["error"] = "no 'Inference timings' summary in the output"
        elif len(errors) == 1:
            out["error"] = errors[0]
        else:
            out["error"] = f"{errors[0]} ... {errors[-1]}"
    return out


def _kv(line: str) -> dict:
    return {k: float(v) for k, v in KV_RE.findall(line)}


def _stats(line: str) -> dict:
    kv = _kv(line)
    stats = {}
    for key, value in kv.items():
        if key == "count":
            stats["count"] = int(value)
        elif key in ("first", "curr"):
            continue
        else:  # min, max, avg, std, p5, median, p95, ... all in microseconds
            stats[f"{key}_us"] = value
    return stats


def _ms(us):
    return None if us is None else round(us / 1000.0, 4)


def to_result(parsed: dict, entry: dict, delegate: str, threads: int) -> dict:
    """Map one parsed run onto a result row of the device-report schema (milliseconds)."""
    row = {
        "model": Path(entry["file"]).stem,
        "file": entry["file"],
        "format": "tflite",
        "precision": entry.get("precision"),
        "accuracy": None,  # benchmark_model runs random inputs
        "p50_ms": _ms(parsed.get("median_us") if "median_us" in parsed else parsed.get("p50_us")),
        "p90_ms": _ms(parsed.get("p90_us")),
        "p99_ms": _ms(parsed.get("p99_us")),
        "mean_ms": _ms(parsed["inference_avg_us"]),
        "min_ms": _ms(parsed.get("min_us")),
        "max_ms": _ms(parsed.get("max_us")),
        "std_ms": _ms(parsed.get("std_us")),
        "p5_ms": _ms(parsed.get("p5_us")),
        "p95_ms": _ms(parsed.get("p95_us")),
        "init_ms": _ms(parsed["init_us"]),
        "first_inference_ms": _ms(parsed["first_inference_us"]),
        "warmup_mean_ms": _ms(parsed["warmup_avg_us"]),
        "runs": parsed.get("count"),
        "threads": parsed.get("threads", threads),
        "delegate": delegate,
        "delegated_nodes": parsed.get("delegated_nodes"),
        "total_nodes": parsed.get("total_nodes"),
        "runtime": "benchmark_model",
        "runtime_version": parsed.get("tf_version", "unknown"),
        "emulated": False,
    }
    return row


def device_block(info: dict, runtime_version: str) -> dict:
    """The ``device`` section from ``getprop``-style ``key=value`` pairs collected by run_android.sh."""
    soc = " ".join(v for v in (info.get("ro.soc.manufacturer"), info.get("ro.soc.model")) if v)
    cpu = soc or info.get("ro.hardware") or info.get("ro.board.platform") or "unknown"
    release, sdk = info.get("ro.build.version.release"), info.get("ro.build.version.sdk")
    cores = info.get("cores", "")
    return {
        "machine": info.get("ro.product.cpu.abi", "unknown"),
        "cpu_model": cpu,
        "cores": int(cores) if cores.isdigit() else None,
        "os": f"Android {release or '?'} (API {sdk or '?'})",
        "model": " ".join(v for v in (info.get("ro.product.manufacturer"), info.get("ro.product.model")) if v)
                 or "unknown",
        "python": None,
        "runtime": "benchmark_model",
        "runtime_version": runtime_version,
        "emulated": False,
    }


def read_device_info(path: Path) -> dict:
    info = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip()
    return info


def build_report(manifest: Path, metadata: Path, device_info: Path, threads: int) -> dict:
    """Assemble the whole report from run_android.sh's manifest of (file, delegate, log) rows."""
    meta = json.loads(metadata.read_text(encoding="utf-8"))
    entries = {m["file"]: m for m in meta.get("models", []) if isinstance(m, dict) and "file" in m}
    results, skipped, versions = [], [], []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        file, delegate, log = line.split("\t")[:3]
        entry = entries.get(file, {"file": file})
        name = Path(file).stem
        try:
            text = Path(log).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            skipped.append({"model": name, "file": file, "delegate": delegate, "reason": f"no output ({e})"})
            continue
        parsed = parse(text)
        if parsed.get("tf_version"):
            versions.append(parsed["tf_version"])
        if not parsed["ok"]:
            skipped.append({"model": name, "file": file, "delegate": delegate,
                            "reason": f"benchmark_model failed: {parsed['error']}"})
            continue
        results.append(to_result(parsed, entry, delegate, threads))
    for row in results:
        if row["runtime_version"] == "unknown" and versions:
            row["runtime_version"] = versions[0]
    return {
        "schema_version": 1,
        "run": meta.get("run"),
        "device": device_block(read_device_info(device_info), versions[0] if versions else "unknown"),
        "results": results,
        "skipped": skipped,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="parse_benchmark_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="*", help="benchmark_model output files to parse and print")
    p.add_argument("--manifest", type=Path, help="TSV of file, delegate, log path (report mode)")
    p.add_argument("--metadata", type=Path, help="the bundle's metadata.json (report mode)")
    p.add_argument("--device-info", type=Path, help="key=value lines describing the phone (report mode)")
    p.add_argument("--threads", type=int, default=1, help="threads passed to benchmark_model")
    p.add_argument("--out", type=Path, help="write the report here instead of stdout")
    args = p.parse_args(argv)
    try:
        if args.manifest:
            if not (args.metadata and args.device_info):
                p.error("--manifest needs --metadata and --device-info")
            report = build_report(args.manifest, args.metadata, args.device_info, args.threads)
        elif args.logs:
            report = {log: parse(Path(log).read_text(encoding="utf-8", errors="replace")) for log in args.logs}
        else:
            p.error("give benchmark_model logs, or --manifest for a report")
    except (OSError, ValueError, KeyError) as e:
        print(f"parse_benchmark_model.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
