"""``edgekd report``: ``report.md`` and a self-contained ``report.html`` from what a run measured.

Reads ``metrics.json``, ``history.csv``, ``validate.json`` (accuracy per file and runtime), ``report.json``
(latency rows from ``edgekd bench``) and any device result files (``device_tests/bench.py`` or the Android
``benchmark_model`` parser), and writes tables, plain statements (recommended file, speedup over the PyTorch
teacher, whether int8 is actually faster here) and three plots: training curves, accuracy vs latency with the
Pareto front, and file sizes. The HTML embeds its plots as base64 PNGs, so the one file can be mailed or
attached to a CI job; the Markdown links the same PNGs in ``report_plots/``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.errors import DataError, RunDirError
from edgekd.recipe import ValidateConfig, merge_section
from edgekd.results import (BenchReport, BudgetCheck, Recommendation, ReportResult, ReportSummary, ValidationResult,
                            check_budgets, recommend)
from edgekd.run_dir import RunDir, atomic_path, read_json, write_text_atomic

STAGE = "report"
PLOTS_DIR = "report_plots"
_PRECISION_NAMES = {"int8": "static int8", "dynamic": "dynamic-range int8", "fp16": "fp16", "fp32": "fp32",
                    "mixed": "mixed int8/float"}
_RUNTIME_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "litert": "LiteRT"}


# -- inputs -----------------------------------------------------------------------------------------------

def load_device_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one device result file, labelled with the device (and ``emulated`` when so).

    The file is what ``device_tests/bench.py --json`` or ``device_tests/android/parse_benchmark_model.py``
    writes: ``{"device": {...}, "results": [{"model", "file", "p50_ms", ...}], "skipped": [...]}``.

    Raises:
        DataError: The file is missing or not such a result file (one line saying what is wrong).
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"device result file {path} not found", "pass a JSON written by device_tests/bench.py")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"device result file {path} is not valid JSON ({str(e).splitlines()[0][:120]})",
                        "pass a JSON written by device_tests/bench.py --json") from e
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise DataError(f"device result file {path} has no 'results' list",
                        "pass a JSON written by device_tests/bench.py --json")
    device = data.get("device")
    if not isinstance(device, dict):
        raise DataError(f"device result file {path} has no 'device' section",
                        "pass a JSON written by device_tests/bench.py --json")
    label = _device_label(device)
    rows = []
    for i, r in enumerate(data["results"]):
        if not isinstance(r, dict) or not isinstance(r.get("file") or r.get("model"), str):
            raise DataError(f"device result file {path}: result {i} has no 'file' or 'model'")
        p50 = r.get("p50_ms")
        if not isinstance(p50, (int, float)) or isinstance(p50, bool) or not math.isfinite(p50) or p50 <= 0:
            raise DataError(f"device result file {path}: result {i} ({r.get('file') or r.get('model')}) "
                            f"has no positive number 'p50_ms' (got {p50!r})")
        acc = r.get("accuracy")
        if acc is not None and (not isinstance(acc, (int, float)) or not 0 <= acc <= 1):
            raise DataError(f"device result file {path}: result {i} has accuracy {acc!r}, expected 0..1 or null")
        emulated = bool(r.get("emulated", device.get("emulated", False)))
        runtime = str(r.get("runtime") or device.get("runtime") or "?")
        if r.get("delegate"):
            runtime += f"/{r['delegate']}"
        rows.append({"device": label + (" (emulated)" if emulated and "emulated" not in label else ""),
                     "model": r.get("model") or Path(r["file"]).stem, "file": r.get("file") or r["model"],
                     "format": r.get("format"), "precision": r.get("precision"), "runtime": runtime,
                     "threads": r.get("threads"), "test_accuracy": acc, "p50_ms": float(p50),
                     "p90_ms": r.get("p90_ms"), "p99_ms": r.get("p99_ms"), "mean_ms": r.get("mean_ms"),
                     "emulated": emulated, "source": path.name})
    return rows


def _device_label(device: dict[str, Any]) -> str:
    name = device.get("model") if isinstance(device.get("model"), str) and device.get("model") != "unknown" else None
    cpu = device.get("cpu_model")
    parts = [p for p in (name, cpu if cpu and cpu != "unknown" else None) if p]
    label = " / ".join(parts) or str(device.get("machine") or "device")
    if device.get("machine") and device["machine"] not in label:
        label += f" ({device['machine']})"
    if device.get("emulated"):
        label += " (emulated)"
    return label


def read_history(rd: RunDir) -> list[dict[str, Any]]:
    path = rd / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- analysis ---------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher).

    Args:
        points: ``(latency, accuracy)`` pairs.

    Returns:
        Indices of the non-dominated points, fastest first.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_acc = [], -math.inf
    for i in order:
        if points[i][1] > best_acc:
            front.append(i)
            best_acc = points[i][1]
    return front


def best_per_file(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One bench row per (file, runtime): the thread count with the lowest p50."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["file"], r["runtime"])
        if key not in best or r["p50_ms"] < best[key]["p50_ms"]:
            best[key] = r
    return list(best.values())


def quantization_findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each non-fp32 file against the fp32 file of the same model, format, runtime, thread count and batch."""
    fp32 = {(r["source_model"], r["format"], r["runtime"], r["threads"], r.get("batch")): r
            for r in rows if r.get("precision") == "fp32" and r["format"] != "pt"}
    out = []
    for r in rows:
        if r.get("precision") in (None, "fp32") or r["format"] == "pt":
            continue
        ref = fp32.get((r["source_model"], r["format"], r["runtime"], r["threads"], r.get("batch")))
        if ref is None:
            continue
        ratio = r["p50_ms"] / ref["p50_ms"]
        out.append({"file": r["file"], "reference": ref["file"], "precision": r["precision"],
                    "runtime": r["runtime"], "threads": r["threads"], "p50_ms": r["p50_ms"],
                    "reference_p50_ms": ref["p50_ms"], "ratio": ratio, "faster": ratio < 0.95,
                    "size_ratio": r["size_bytes"] / ref["size_bytes"] if ref.get("size_bytes") else None})
    return out


def _quant_sentence(f: dict[str, Any]) -> str:
    kind = _PRECISION_NAMES.get(f["precision"], f["precision"])
    where = f"{_RUNTIME_NAMES.get(f['runtime'], f['runtime'])}, {f['threads']} thread{'s' if f['threads'] != 1 else ''}"
    nums = f"p50 {f['p50_ms']:.4f} ms vs {f['reference_p50_ms']:.4f} ms"
    if f["ratio"] >= 1.05:
        verdict = f"is **not faster**: {f['ratio']:.1f}x slower than"
    elif f["ratio"] > 0.95:
        verdict = "is **not faster**: about as fast as"
    else:
        verdict = f"is {1 / f['ratio']:.1f}x faster than"
    size = f"; {1 / f['size_ratio']:.1f}x smaller file" if f.get("size_ratio") and f["size_ratio"] < 0.95 else ""
    return f"`{f['file']}` ({kind}) {verdict} `{f['reference']}` on this CPU ({where}; {nums}{size})."


def speedup_summary(bench_rows: list[dict[str, Any]], recommended: dict[str, Any] | None,
                    teacher_accuracy: float | None) -> dict[str, Any] | None:
    """The recommended student variant against the PyTorch fp32 teacher, at the same thread count and batch."""
    if recommended is None or recommended.get("p50_ms") is None:
        return None
    teacher = [r for r in bench_rows if r["file"] == "teacher.pt" and r["runtime"] == "torch"
               and r.get("batch") == recommended.get("batch")]
    if not teacher:
        return None
    same = [r for r in teacher if r["threads"] == recommended["threads"]]
    t = same[0] if same else min(teacher, key=lambda r: r["p50_ms"])
    out = {"file": recommended["file"], "runtime": recommended["runtime"], "threads": recommended["threads"],
           "batch": recommended.get("batch"), "p50_ms": recommended["p50_ms"], "teacher_p50_ms": t["p50_ms"],
           "teacher_threads": t["threads"], "speedup": t["p50_ms"] / recommended["p50_ms"],
           "accuracy": recommended["test_accuracy"], "teacher_accuracy": teacher_accuracy}
    out["accuracy_ratio"] = (recommended["test_accuracy"] / teacher_accuracy) if teacher_accuracy else None
    student = [r for r in bench_rows if r["file"] == "student.pt" and r["runtime"] == "torch"
               and r["threads"] == recommended["threads"] and r.get("batch") == recommended.get("batch")]
    if student:
        out["speedup_vs_torch_student"] = student[0]["p50_ms"] / recommended["p50_ms"]
    # The fair runtime-for-runtime comparison: the teacher exported too, in its fastest file and runtime.
    exported = [r for r in bench_rows if r.get("source_model") == "teacher" and r.get("format") != "pt"
                and r["threads"] == recommended["threads"] and r.get("batch") == recommended.get("batch")]
    if exported:
        best = min(exported, key=lambda r: r["p50_ms"])
        out.update({"teacher_exported_file": best["file"], "teacher_exported_runtime": best["runtime"],
                    "teacher_exported_p50_ms": best["p50_ms"],
                    "speedup_vs_teacher_exported": best["p50_ms"] / recommended["p50_ms"]})
    return out


# -- plots ------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _log_axis(ax) -> None:
    """Log-scale x axis labelled at 1, 2 and 5 per decade in plain numbers (no 10^-3 notation)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_training(history: list[dict[str, Any]]) -> bytes | None:
    """Validation accuracy and training loss per epoch for teacher, scratch baseline and KD student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in history:
        try:
            series.setdefault(r["model"], []).append((int(r["epoch"]), float(r["val_accuracy"]),
                                                      float(r["train_loss"])))
        except (KeyError, TypeError, ValueError):
            continue
    if not series:
        return None
    names = {"teacher": "teacher", "baseline": "student from scratch (baseline)", "student": "student by KD"}
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8), layout="constrained")
    for model in sorted(series, key=lambda m: (list(names).index(m) if m in names else 9, m)):
        pts = sorted(series[model])
        ep = [p[0] for p in pts]
        ax1.plot(ep, [p[1] for p in pts], marker=".", label=names.get(model, model))
        ax2.plot(ep, [p[2] for p in pts], marker=".", label=names.get(model, model))
    ax1.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    ax2.set(xlabel="epoch", ylabel="training loss", title="Training loss (KD loss for the KD student)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def plot_accuracy_latency(points: list[dict[str, Any]], front: list[int],
                          device_rows: list[dict[str, Any]]) -> bytes | None:
    """Accuracy vs p50 latency (log scale): one point per file and runtime, Pareto front joined and ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = [d for d in device_rows if d.get("test_accuracy") is not None]
    if not points and not dev:
        return None
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    markers = {"torch": "s", "onnxruntime": "o", "litert": "^"}
    for k, p in enumerate(points):
        ax.scatter(p["p50_ms"], p["test_accuracy"], marker=markers.get(p["runtime"], "o"), s=40,
                   color="tab:red" if p["source_model"] == "teacher" else
                   "tab:gray" if p["source_model"] == "baseline" else "tab:blue", zorder=3)
        # Alternate label offsets: variants of one model share an accuracy and would print on one line.
        ax.annotate(f"{p['file']} ({p['threads']}t)", (p["p50_ms"], p["test_accuracy"]),
                    fontsize=6.5, xytext=(4, 4 if k % 2 == 0 else -10), textcoords="offset points")
    if front:
        fp = [points[i] for i in front]
        ax.step([p["p50_ms"] for p in fp], [p["test_accuracy"] for p in fp], where="post", color="tab:green",
                lw=1.5, label="Pareto front (this machine)", zorder=2)
        ax.scatter([p["p50_ms"] for p in fp], [p["test_accuracy"] for p in fp], s=140, facecolors="none",
                   edgecolors="tab:green", lw=1.5, zorder=4)
    for d in dev:
        ax.scatter(d["p50_ms"], d["test_accuracy"], marker="D", color="tab:purple", s=35, zorder=3)
        ax.annotate(f"{d['file']} @ {d['device']}", (d["p50_ms"], d["test_accuracy"]), fontsize=6.5,
                    xytext=(4, -9), textcoords="offset points", color="tab:purple")
    for rt, m in markers.items():
        ax.scatter([], [], marker=m, color="k", label=_RUNTIME_NAMES[rt])
    if dev:
        ax.scatter([], [], marker="D", color="tab:purple", label="device results")
    _log_axis(ax)
    ax.set(xlabel="p50 latency per inference (ms, log scale)", ylabel="test accuracy",
           title="Accuracy vs latency (red: teacher, gray: scratch baseline, blue: student variants)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=6, frameon=False)
    return _png(fig)


def plot_sizes(sizes: list[tuple[str, int, str]]) -> bytes | None:
    """Horizontal bars of file sizes in KB (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(sizes) + 1.2), layout="constrained")
    colors = {"teacher": "tab:red", "baseline": "tab:gray"}
    ax.barh([s[0] for s in sizes], [s[1] / 1024 for s in sizes], color=[colors.get(s[2], "tab:blue") for s in sizes])
    for i, s in enumerate(sizes):
        ax.text(s[1] / 1024, i, f" {s[1] / 1024:.1f} KB", va="center", fontsize=7)
    if max(s[1] for s in sizes) > 20 * min(s[1] for s in sizes):
        _log_axis(ax)
    ax.invert_yaxis()
    ax.set(xlabel="file size (KB)", title="Model file sizes")
    ax.grid(alpha=0.3, axis="x", which="both")
    return _png(fig)


# -- rendering --------------------------------------------------------------------------------------------

def _f(v: Any, fmt: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def ptq_vs_qat_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Per int8 file made both ways: PTQ and QAT-KD test accuracy side by side (from metrics.json).

    A QAT file is ``<stem>_qat.<ext>`` next to the PTQ file ``<stem>.<ext>`` (``student_pruned_int8_qat.tflite``
    and ``student_pruned_int8.tflite``); its metrics carry how long the QAT fine-tuning took.
    """
    rows = []
    for name, m in sorted(metrics.items()):
        if not (isinstance(m, dict) and str(m.get("route", "")).startswith("qat")):
            continue
        stem, _, ext = name.rpartition(".")
        ptq_name = f"{stem.removesuffix('_qat')}.{ext}"
        ptq = metrics.get(ptq_name) if isinstance(metrics.get(ptq_name), dict) else None
        ptq_acc, qat_acc = (ptq or {}).get("test_accuracy"), m.get("test_accuracy")
        gain = (f"{100 * (qat_acc - ptq_acc):+.2f} pt" if ptq_acc is not None and qat_acc is not None else "—")
        rows.append([ptq_name if ptq else "—", _f(ptq_acc), name, _f(qat_acc), gain,
                     _f((m.get("qat") or {}).get("seconds"), ".0f")])
    return rows


def _tables(validation: dict[str, Any], bench: dict[str, Any], device_rows: list[dict[str, Any]],
            metrics: dict[str, Any] | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    qat_rows = ptq_vs_qat_rows(metrics or {})
    if qat_rows:
        out.append(("int8: post-training quantization vs quantization-aware distillation",
                    ["PTQ file", "PTQ accuracy", "QAT-KD file", "QAT-KD accuracy", "QAT − PTQ", "QAT fine-tune s"],
                    qat_rows))
    v = validation.get("rows", [])
    if v:
        out.append(("Accuracy (every model, every runtime that can run it)",
                    ["file", "runtime", "precision", "accuracy", "precision (macro)", "recall (macro)", "F1 (macro)",
                     "agreement w/ teacher", "agreement w/ fp32 student", "drop vs teacher", "size KB"],
                    [[r["file"], r["runtime"], r["precision"], _f(r["test_accuracy"]), _f(r["precision_macro"]),
                      _f(r["recall_macro"]), _f(r["f1_macro"]), _f(r["agreement_teacher"]),
                      _f(r["agreement_student_fp32"]), _f(r.get("accuracy_drop_vs_teacher")),
                      f"{r['size_bytes'] / 1024:.1f}"] for r in v]))
    b = bench.get("rows", [])
    if b:
        out.append((f"Latency on this machine (batch {b[0].get('batch', 1)})",
                    ["file", "runtime", "threads", "load ms", "first ms", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                     "std ms", "throughput /s", "peak RSS MB", "model RSS MB", "size KB", "params", "MACs",
                     "accuracy"],
                    [[r["file"], r["runtime"], str(r["threads"]), _f(r["load_ms"], ".1f"),
                      _f(r["first_inference_ms"], ".3f"), _f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p99_ms"]),
                      _f(r["mean_ms"]), _f(r["std_ms"]), _f(r["throughput_ips"], ".0f"), _f(r["peak_rss_mb"], ".0f"),
                      _f(r["model_rss_mb"], ".1f"), f"{r['size_bytes'] / 1024:.1f}", _count(r.get("params")),
                      _count(r.get("macs")), _f(r.get("test_accuracy"))] for r in b]))
    if device_rows:
        out.append(("Device results",
                    ["device", "file", "runtime", "threads", "p50 ms", "p90 ms", "p99 ms", "accuracy", "emulated"],
                    [[d["device"], d["file"], d["runtime"], _f(d["threads"]), _f(d["p50_ms"]), _f(d["p90_ms"]),
                      _f(d["p99_ms"]), _f(d["test_accuracy"]), "yes" if d["emulated"] else "no"]
                     for d in device_rows]))
    return out


def mcu_tables(models: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Flash and RAM of every MCU file (metadata.json entries with an ``mcu`` block) and the boards it fits.

    Board figures are the datasheets' (``edgekd/runtimes/boards.json``); the TFLM library and the application
    come on top of the model's share.
    """
    from edgekd.runtimes.boards import board_fit

    files = [e for e in models if isinstance(e.get("mcu"), dict)]
    if not files:
        return []
    rows, fit_rows = [], []
    for e in files:
        m = e["mcu"]
        fit = board_fit(m["flash_bytes"], m["ram_bytes"])
        rows.append([e["file"], f"{m['flash_bytes'] / 1024:.1f}", f"{m['arena_min_bytes'] / 1024:.1f}",
                     f"{m['ram_bytes'] / 1024:.1f}", _f(m.get("tflm_accuracy")), _f(m.get("litert_accuracy")),
                     f"{e['input']['dtype']} {e['input']['shape']}", str(len(m.get("ops", []))),
                     ", ".join(b["name"] for b in fit if b["fits"]) or "none of the listed boards"])
        fit_rows += [[e["file"], b["name"], b["mcu"], str(b["flash_kb"]), str(b["ram_kb"]),
                      f"{100 * b['flash_share']:.1f}%", f"{100 * b['ram_share']:.1f}%", "yes" if b["fits"] else "no"]
                     for b in fit]
    est_rows = []
    for e in files:
        v = e["mcu"].get("ethos_u_estimate")
        if isinstance(v, dict) and "cycles" in v:
            est_rows.append([e["file"], v["accelerator"], v["system_config"], f"{v['clock_hz'] / 1e6:.0f}",
                             str(v["cycles"]), f"{v['inference_ms']:.4f}", f"{v['sram_kb']:.2f}",
                             f"{v['flash_kb']:.2f}", f"{v['npu_ops']} / {v['cpu_ops']}", v["tool"]])
        elif isinstance(v, dict):
            est_rows.append([e["file"], v.get("accelerator", "?"), "-", "-", "-", "-", "-", "-", "-",
                             f"{v.get('tool', 'vela')}: {v.get('error', 'no estimate')}"])
    estimate = [("Arm Ethos-U NPU: Vela's estimate (a performance model, not a measurement)",
                 ["file", "accelerator", "system", "MHz", "cycles", "ms", "SRAM KB", "flash KB", "NPU / CPU ops",
                  "tool"], est_rows)] if est_rows else []
    return [("Microcontrollers (TensorFlow Lite Micro)",
             ["file", "flash KB (model)", "arena KB (measured)", "RAM KB (arena reserved)", "TFLM accuracy",
              "LiteRT accuracy", "input", "ops", "fits"], rows),
            ("Boards: share of flash and RAM the model takes (the TFLM library and the app come on top)",
             ["file", "board", "MCU", "flash KB", "RAM KB", "flash used", "RAM used", "fits"], fit_rows)] + estimate


def _load_note(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """Say how busy the machine was: latencies measured next to other work are noisier and slower."""
    loads = [r["loadavg_1m"] for r in rows if isinstance(r.get("loadavg_1m"), (int, float))]
    if not loads:
        return ""
    note = f" System load (1-min average) during the bench: {min(loads):.2f} to {max(loads):.2f}"
    cores = machine.get("cores") or 0
    if cores and max(loads) > 0.5 * cores:
        note += (f" on {cores} cores: other processes competed for the CPU, so multi-thread numbers in particular "
                 "are pessimistic")
    return note + "."


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _md_to_html_inline(text: str) -> str:
    """The little Markdown the summary lines use (``code`` and **bold**), as HTML."""
    import re

    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;
padding:3px 7px;text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
code{background:#f4f4f4;padding:0 3px}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.fail{color:#b00020}.ok{color:#08660d}.scroll{overflow-x:auto}"""


# -- analysis of one run ----------------------------------------------------------------------------------

@dataclass
class Analysis:
    """Everything the report says, computed once; the Markdown and HTML renderers only format it."""

    name: str
    metrics: dict[str, Any]
    validation: dict[str, Any]  # validate.json content (ValidationResult.to_json())
    bench: dict[str, Any]  # report.json content (BenchReport.to_json())
    device_rows: list[dict[str, Any]]
    recommendation: Recommendation
    check: BudgetCheck
    speed: dict[str, Any] | None
    quant: list[dict[str, Any]]
    points: list[dict[str, Any]] = field(default_factory=list)  # accuracy vs latency, one per file and runtime
    front: list[int] = field(default_factory=list)  # indices of ``points`` on the Pareto front
    mcu_files: list[dict[str, Any]] = field(default_factory=list)  # metadata.json entries of MCU files
    sensitivity: dict[str, Any] = field(default_factory=dict)  # quant_sensitivity.json (empty: not measured)
    mixed_files: list[dict[str, Any]] = field(default_factory=list)  # metadata.json entries of mixed files

    def tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """Every table of the report: accuracy, latency, devices, microcontrollers, then int8 sensitivity."""
        return (_tables(self.validation, self.bench, self.device_rows, self.metrics) + mcu_tables(self.mcu_files)
                + sensitivity_section(self))


def _speed_of(bench_rows: list[dict[str, Any]], rec: Recommendation, teacher_acc: float | None
              ) -> dict[str, Any] | None:
    """The speedup of the recommended file; without one, of the fastest student variant, marked as such."""
    speed = speedup_summary(bench_rows, rec.recommended.to_json() if rec.recommended else None, teacher_acc)
    if speed is None and rec.recommended is None:
        timed = [c for c in rec.candidates if c.p50_ms is not None]
        if timed:
            speed = speedup_summary(bench_rows, min(timed, key=lambda c: c.p50_ms).to_json(), teacher_acc)
            if speed is not None:
                speed["qualifies"] = False
    return speed


def _accuracy_points(validation: dict[str, Any], bench_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy vs latency points: one per file and runtime, at its best thread count."""
    acc = {(r["file"], r["runtime"]): r["test_accuracy"] for r in validation["rows"]}
    points = []
    for r in best_per_file(bench_rows):
        a = acc.get((r["file"], r["runtime"]), r.get("test_accuracy"))
        if a is not None:
            points.append({**r, "test_accuracy": a})
    return points


def analyse(rd: RunDir, device_rows: list[dict[str, Any]], budgets: ValidateConfig | None,
            budget_check: BudgetCheck | None = None) -> Analysis:
    """Read what the run measured (typed results) and work out recommendation, speedup, findings, Pareto front."""
    metrics = rd.metrics()
    if not metrics:
        raise RunDirError(f"{rd.path} has no metrics.json", "run `edgekd distill` first")
    validation, bench = ValidationResult.read(rd), BenchReport.read(rd)
    rec = recommend(validation, bench, budgets)
    check = budget_check if budget_check is not None else check_budgets(validation, bench, budgets)
    v, b = validation.to_json(), bench.to_json()
    teacher_acc = validation.teacher_accuracy or metrics.get("teacher", {}).get("test_accuracy")
    points = _accuracy_points(v, b["rows"])
    return Analysis(name=rd.name, metrics=metrics, validation=v, bench=b, device_rows=device_rows,
                    recommendation=rec, check=check, speed=_speed_of(b["rows"], rec, teacher_acc),
                    quant=quantization_findings(b["rows"]), points=points,
                    front=pareto_front([(p["p50_ms"], p["test_accuracy"]) for p in points]),
                    mcu_files=_mcu_entries(rd), **_sensitivity_inputs(rd))


def _mcu_entries(rd: RunDir) -> list[dict[str, Any]]:
    """metadata.json entries of the run's MCU files (with their flash, arena and TFLM figures)."""
    path = rd / "metadata.json"
    models = read_json(path).get("models", []) if path.is_file() else []
    return [e for e in models if isinstance(e, dict) and isinstance(e.get("mcu"), dict)]


# -- int8 sensitivity and mixed precision (edgekd quantize --sensitivity / --max-drop) ---------------------

def _sensitivity_inputs(rd: RunDir) -> dict[str, Any]:
    """quant_sensitivity.json and the metadata.json entries of the mixed-precision files, for the section."""
    path, meta = rd / "quant_sensitivity.json", rd / "metadata.json"
    data = read_json(path) if path.is_file() else {}
    models = read_json(meta).get("models", []) if meta.is_file() else []
    return {"sensitivity": data if isinstance(data, dict) else {},
            "mixed_files": [e for e in models if isinstance(e, dict) and e.get("precision") == "mixed"]}


def sensitivity_section(a: "Analysis") -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables of the int8-sensitivity section: the mixed files, then each file's ranked layers."""
    from edgekd.quant.report import mixed_table, sensitivity_tables

    return mixed_table(a.mixed_files, a.metrics) + sensitivity_tables(a.sensitivity)


def plot_sensitivity(a: "Analysis") -> bytes | None:
    """The ranked per-layer sensitivity plot (None when the run has no quant_sensitivity.json)."""
    from edgekd.quant.report import plot_sensitivity as figure

    fig = figure(a.sensitivity)
    return None if fig is None else _png(fig)


# -- the summary sentences (Markdown; the HTML renders the same text) -------------------------------------

def _recommendation_lines(rec: Recommendation) -> list[str]:
    r = rec.recommended
    if r is None:
        return [f"**No student variant qualifies for a recommendation** (rule: {rec.rule})."] if rec.candidates else []
    lat = (f"p50 {r.p50_ms:.4f} ms at {r.threads} thread{'s' if r.threads != 1 else ''}, batch {r.batch}"
           if r.p50_ms is not None else "latency not measured")
    return [f"**Recommended file: `{r.file}`** ({_RUNTIME_NAMES.get(r.runtime, r.runtime)}, {lat}; accuracy "
            f"{r.test_accuracy:.4f}; {r.size_bytes / 1024:.1f} KB). Rule: {rec.rule}."]


def _speedup_lines(speed: dict[str, Any] | None, has_bench: bool) -> list[str]:
    if speed is None:
        if has_bench:
            return ["Speedup over the teacher: not measured (the bench has no PyTorch teacher row or no "
                    "recommended file)."]
        return ["No latency measured yet: run `edgekd bench` for latency, throughput and memory."]
    ok_speed, ok_acc = speed["speedup"] >= 10, (speed["accuracy_ratio"] or 0) >= 0.97
    acc_txt = (f"accuracy {speed['accuracy']:.4f} vs the teacher's {speed['teacher_accuracy']:.4f} "
               f"({100 * speed['accuracy_ratio']:.1f}% of it)" if speed["accuracy_ratio"] else "")
    who = "" if speed.get("qualifies", True) else " (fastest student variant, not recommended: it misses the rule above)"
    line = (f"**Speedup over the PyTorch fp32 teacher: {speed['speedup']:.1f}x**{who} at batch {speed['batch']} — "
            f"`{speed['file']}` ({_RUNTIME_NAMES.get(speed['runtime'], speed['runtime'])}) p50 "
            f"{speed['p50_ms']:.4f} ms vs teacher.pt (PyTorch) {speed['teacher_p50_ms']:.4f} ms at "
            f"{speed['teacher_threads']} thread(s); {acc_txt}. Target ≥ 10x with ≥ 97% of the teacher's "
            f"accuracy: **{'met' if ok_speed and ok_acc else 'not met'}**.")
    if speed.get("speedup_vs_torch_student"):
        line += f" Against the PyTorch fp32 student: {speed['speedup_vs_torch_student']:.1f}x."
    if speed.get("speedup_vs_teacher_exported"):
        rt = speed["teacher_exported_runtime"]
        line += (f" Against the teacher's own fastest export (`{speed['teacher_exported_file']}`, "
                 f"{_RUNTIME_NAMES.get(rt, rt)}, {speed['teacher_exported_p50_ms']:.4f} ms): "
                 f"{speed['speedup_vs_teacher_exported']:.1f}x.")
    return [line]


def _quantization_lines(quant: list[dict[str, Any]]) -> list[str]:
    slower = [f for f in quant if not f["faster"]]
    lines = []
    if slower:
        lines.append(f"**Quantization is not always faster here**: {len(slower)} of {len(quant)} reduced-precision "
                     "measurements were not faster than fp32 in the same runtime and thread count.")
    return lines + [_quant_sentence(f) for f in quant]


def _distill_lines(m: dict[str, Any]) -> list[str]:
    if not all(k in m for k in ("teacher", "baseline", "student")):
        return []
    gain = m["student"]["test_accuracy"] - m["baseline"]["test_accuracy"]
    return [f"Distillation: KD student {m['student']['test_accuracy']:.4f} vs the same architecture trained "
            f"from scratch {m['baseline']['test_accuracy']:.4f} ({100 * gain:+.2f} points); teacher "
            f"{m['teacher']['test_accuracy']:.4f} (PyTorch, test split)."]


def _budget_lines(check: BudgetCheck) -> list[str]:
    if not check.any_set:
        return ["Budgets: none set (add `max_accuracy_drop`, `max_p50_ms`, `max_size_kb`, `max_flash_kb`, "
                "`max_ram_kb` to the recipe's "
                "`validate` section to gate on them)."]
    named = ", ".join(f"{k} = {v:g}" for k, v in check.budgets.items() if v is not None)
    if check.ok:
        return [f"Budgets ({named}; scope {check.scope}): **passed**."]
    return [f"Budgets ({named}; scope {check.scope}): **FAILED** — " + "; ".join(check.failures)]


def _skipped_lines(a: Analysis) -> list[str]:
    lines = []
    for s in a.bench["skipped"] + a.validation["skipped"]:
        threads = f", {s['threads']} threads" if "threads" in s else ""
        lines.append(f"Not measured: `{s['file']}` ({s['runtime']}{threads}): {s['reason']}")
    return lines


def summary_lines(a: Analysis) -> list[str]:
    """The report's summary, one Markdown sentence per finding."""
    return (_recommendation_lines(a.recommendation) + _speedup_lines(a.speed, bool(a.bench["rows"]))
            + _quantization_lines(a.quant) + _distill_lines(a.metrics) + _budget_lines(a.check)
            + _skipped_lines(a))


def setup_line(bench: dict[str, Any]) -> str:
    """The machine, runtimes and bench settings the latencies were measured with ("" before bench)."""
    machine, settings = bench.get("machine") or {}, bench.get("settings") or {}
    if not machine:
        return ""
    text = (f"Machine: {machine.get('cpu_model', '?')} ({machine.get('cores', '?')} cores, "
            f"{machine.get('machine', '?')}); runtimes: "
            + ", ".join(f"{k} {v}" for k, v in (machine.get("runtimes") or {}).items() if v))
    if settings:
        text += (f". Bench: {settings.get('runs') or str(settings.get('seconds')) + ' s'} timed runs after "
                 f"{settings.get('warmup')} warm-up, batch {settings.get('batch')}, threads "
                 f"{settings.get('threads')}; peak RSS by {settings.get('rss_method')}.")
    return text + _load_note(bench.get("rows", []), machine)


# -- rendering ----------------------------------------------------------------------------------------------

Plots = dict[str, tuple[str, "bytes | None"]]


def make_plots(rd: RunDir, a: Analysis) -> Plots:
    """The three plots as PNG bytes (None where there is nothing to plot), by key, with their titles."""
    sizes: dict[str, tuple[str, int, str]] = {}
    for r in a.validation["rows"] + a.bench["rows"]:
        sizes.setdefault(r["file"], (r["file"], int(r["size_bytes"]), r["source_model"]))
    return {"training": ("Training curves: KD student vs scratch baseline vs teacher",
                         plot_training(read_history(rd))),
            "accuracy_latency": ("Accuracy vs latency, Pareto front marked",
                                 plot_accuracy_latency(a.points, a.front, a.device_rows)),
            "sizes": ("Model file sizes", plot_sizes(sorted(sizes.values(), key=lambda s: -s[1]))),
            "sensitivity": ("Int8 sensitivity per layer, most sensitive first (validation split)",
                            plot_sensitivity(a))}


def render_markdown(a: Analysis, lines: list[str], plots: Plots, plot_files: dict[str, str]) -> str:
    """``report.md``: summary, tables, and links to the PNGs in ``report_plots/``."""
    setup = setup_line(a.bench)
    md = [f"# edgekd report: {a.name}", ""] + ([setup, ""] if setup else [])
    md += ["## Summary", ""] + [f"- {line}" for line in lines] + [""]
    for title, headers, rows in a.tables():
        md += [f"## {title}", "", _md_table(headers, rows), ""]
    md += ["## Plots", ""]
    for key, (title, png) in plots.items():
        if png is not None:
            md += [f"### {title}", "", f"![{title}]({plot_files[key]})", ""]
    return "\n".join(md)


def render_html(a: Analysis, lines: list[str], plots: Plots) -> str:
    """``report.html``: the same content, self-contained (plots embedded as base64 PNGs)."""
    setup = setup_line(a.bench)
    h = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>edgekd report: {html.escape(a.name)}</title>",
         f"<style>{_CSS}</style></head><body>", f"<h1>edgekd report: {html.escape(a.name)}</h1>"]
    if setup:
        h.append(f"<p>{html.escape(setup)}</p>")
    h.append("<h2>Summary</h2><ul>")
    for line in lines:
        cls = " class='fail'" if "FAILED" in line else ""
        h.append(f"<li{cls}>{_md_to_html_inline(line)}</li>")
    h.append("</ul>")
    for title, headers, rows in a.tables():
        # Wide tables scroll inside their own box instead of widening the page.
        h.append(f"<h2>{html.escape(title)}</h2><div class='scroll'><table><tr>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in headers) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        h.append("</table></div>")
    h.append("<h2>Plots</h2>")
    for key, (title, png) in plots.items():
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            h.append(f"<h3>{html.escape(title)}</h3><img id='plot-{key}' alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'>")
    h.append("</body></html>")
    return "\n".join(h)


# -- the stage --------------------------------------------------------------------------------------------

def _write_plots(rd: RunDir, plots: Plots) -> dict[str, str]:
    plot_files = {}
    for key, (_, png) in plots.items():
        if png is None:
            continue
        with atomic_path(rd / PLOTS_DIR / f"{key}.png") as tmp:
            tmp.write_bytes(png)
        plot_files[key] = f"{PLOTS_DIR}/{key}.png"
    return plot_files


def build_report(rd: RunDir, device_files: list[str | Path] = (), budgets: ValidateConfig | None = None,
                 budget_check: BudgetCheck | None = None) -> ReportResult:
    """Write ``report.md``, ``report.html`` and ``report_plots/*.png`` for a run.

    Args:
        rd: The run directory (validate and bench results are used when present).
        device_files: Device result JSON files to merge as extra rows.
        budgets: The recipe's ``validate`` section (None: read it from the run's recipe).
        budget_check: The verdict to show (None: :func:`edgekd.results.check_budgets` computed here).

    Returns:
        The paths written and the summary recorded in ``metrics.json["report"]``.

    Raises:
        DataError: A device file is not valid.
        RunDirError: The run has no metrics (distill has not finished).
    """
    device_rows = [row for f in device_files for row in load_device_results(f)]  # bad input fails first
    if budgets is None:
        budgets = merge_section(rd / "recipe.yaml", "validate", default=False)
    a = analyse(rd, device_rows, budgets, budget_check)
    lines = summary_lines(a)
    plots = make_plots(rd, a)
    plot_files = _write_plots(rd, plots)
    write_text_atomic(rd / "report.md", render_markdown(a, lines, plots, plot_files))
    write_text_atomic(rd / "report.html", render_html(a, lines, plots))
    summary = ReportSummary(recommended=a.recommendation.recommended, rule=a.recommendation.rule, speedup=a.speed,
                            quantization=a.quant, budgets=a.check,
                            devices=sorted({d["device"] for d in device_rows}))
    rd.update_metrics("report", summary.to_json())
    rd.record_artifacts("report.md", "report.html", *plot_files.values())
    rd.stage_done(STAGE, artifacts=["report.md", "report.html", *plot_files.values()],
                  devices=[str(f) for f in device_files])
    return ReportResult(markdown=rd / "report.md", html=rd / "report.html", summary=summary)
