"""``edgekd report``: ``report.md`` and a self-contained ``report.html`` from what a run measured.

Reads ``metrics.json``, ``history.csv``, ``validate.json`` (accuracy per file and runtime), ``report.json``
(latency rows from ``edgekd bench``) and any device result files (``device_tests/bench.py`` or the Android
``benchmark_model`` parser), and writes a summary of at most 8 lines (the recommended file and the rule that chose
it; the chain's verdict, teacher → scratch → KD student → pruned → shipped file; speed and size against the
teacher; budgets), one matrix answering "is lower precision faster here?", tables, three plots (training curves,
accuracy vs latency with the Pareto front, file sizes) and the notes behind the summary. The HTML embeds its
plots as base64 PNGs, so the one file can be mailed or attached to a CI job; the Markdown links the same PNGs in
``report_plots/``. ``edgekd run`` and ``edgekd report`` print the same summary (the notes with ``-v``).
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
_RUNTIME_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "litert": "LiteRT", "executorch": "ExecuTorch",
                  "tflm": "TFLM", "mediapipe": "MediaPipe"}


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
    """Each non-fp32 file against the fp32 file of its family (:func:`file_family`), same runtime, threads, batch.

    The reference is the fp32 file of the same family and format (``student_pruned_app_int8.tflite`` against
    ``student_pruned_app_fp32.tflite``, never the research file); a file whose family has no fp32 file of its
    own (an MCU file) is compared with the fp32 file its model's name gives (``student_pruned_fp32``).
    """
    fp32 = {(file_family(r["file"]), r["format"], r["runtime"], r["threads"], r.get("batch")): r
            for r in rows if r.get("precision") == "fp32" and r["format"] != "pt"}
    out = []
    for r in rows:
        if r.get("precision") in (None, "fp32") or r["format"] == "pt":
            continue
        where = (r["format"], r["runtime"], r["threads"], r.get("batch"))
        family = file_family(r["file"])
        ref = fp32.get((family, *where)) or fp32.get((family.removesuffix("_qat"), *where)) \
            or fp32.get((r["source_model"], *where))
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
    if t.get("size_bytes") and recommended.get("size_bytes"):
        out.update(size_bytes=recommended["size_bytes"], teacher_size_bytes=t["size_bytes"],
                   size_ratio=t["size_bytes"] / recommended["size_bytes"])
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


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1em auto;max-width:1200px;padding:0 1em;
color:#222;font-size:14px;line-height:1.35}h1{font-size:1.35em;margin:.2em 0 .4em}h2{font-size:1.1em;margin:1.1em 0 .3em}
table{border-collapse:collapse;font-size:13px;margin:.4em 0 1em}th,td{border:1px solid #ccc;
padding:2px 7px;text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
code{background:#f4f4f4;padding:0 3px}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
ul.summary{margin:.2em 0;padding-left:1.2em}ul.summary li{margin:.15em 0}
table.matrix th,table.matrix td{white-space:nowrap}table.matrix th[colspan]{text-align:center}table.matrix td:nth-child(2),table.matrix th:nth-child(2){text-align:left}table.matrix td.faster{background:#d8f0d8;color:#08660d;font-weight:600}
table.matrix td.slower{background:#fbe3e3}table.matrix td.none{color:#aaa;text-align:center}
.legend,.setup{color:#555;font-size:12px;margin:.2em 0}
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
        """Every table of the report: accuracy, latency, devices, microcontrollers, operators, int8 sensitivity."""
        return (_tables(self.validation, self.bench, self.device_rows, self.metrics) + mcu_tables(self.mcu_files)
                + operator_tables(self.bench.get("operator_timings") or {}) + sensitivity_section(self))


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


def operator_tables(profiles: dict[str, dict[str, Any]], top: int = 10) -> list[tuple[str, list[str], list[list[str]]]]:
    """The slowest operators of each profiled file (bench's ``operator_timings``: any runtime that profiles)."""
    out = []
    for file, prof in sorted(profiles.items()):
        where = _RUNTIME_NAMES.get(prof.get("runtime", ""), prof.get("runtime", ""))
        if not prof.get("available"):
            out.append((f"Per-operator timings of {file} ({where}): not available", ["reason"],
                        [[str(prof.get("reason", "unknown"))]]))
            continue
        ops = sorted(prof.get("operators", []), key=lambda o: -o["median_ms"])[:top]
        total = prof.get("execute_ms") or sum(o["median_ms"] for o in prof.get("operators", [])) or 1.0
        rows = [[o["name"], o.get("delegate") or "-", f"{1000 * o['median_ms']:.1f}",
                 f"{100 * o['median_ms'] / total:.0f}%"] for o in ops]
        out.append((f"Per-operator timings of {file} ({where}, median of {prof.get('runs')} runs, slowest first)",
                    ["operator", "delegate", "median us", "share of execute"], rows))
    return out


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


# -- the summary: at most 8 lines (Markdown; the HTML and the console print the same text) -----------------

SUMMARY_MAX_LINES = 8


def _recommendation_line(rec: Recommendation) -> list[str]:
    r = rec.recommended
    if r is None:
        return [f"**No student variant qualifies for a recommendation** (rule: {rec.rule})."] if rec.candidates else []
    lat = (f"p50 {r.p50_ms:.4f} ms at {r.threads} thread{'s' if r.threads != 1 else ''}, batch {r.batch}"
           if r.p50_ms is not None else "latency not measured")
    return [f"**Recommended file: `{r.file}`** ({_RUNTIME_NAMES.get(r.runtime, r.runtime)}, {lat}; accuracy "
            f"{r.test_accuracy:.4f}; {r.size_bytes / 1024:.1f} KB). Rule: {rec.rule}."]


def chain_steps(metrics: dict[str, Any], rec: Recommendation) -> list[tuple[str, float]]:
    """Test accuracy along the chain teacher → scratch → KD student → pruned → shipped file (the steps the run has).

    The pruned step is shown when the shipped (recommended) file was made from the pruned student, or when
    nothing was recommended; the shipped file's accuracy is the one measured in its runtime.
    """
    def acc(role: str) -> float | None:
        m = metrics.get(role)
        return m.get("test_accuracy") if isinstance(m, dict) else None

    shipped = rec.recommended
    steps = [("teacher", acc("teacher")), ("scratch", acc("baseline")), ("KD student", acc("student"))]
    if shipped is None or shipped.source_model == "student_pruned":
        steps.append(("pruned", acc("student_pruned")))
    if shipped is not None:
        steps.append((f"shipped `{shipped.file}`", shipped.test_accuracy))
    return [(label, a) for label, a in steps if isinstance(a, (int, float))]


def _points(a: float, b: float) -> str:
    return f"{100 * (a - b):+.2f}"


def _chain_line(metrics: dict[str, Any], rec: Recommendation) -> list[str]:
    """The chain's verdict in one line: accuracy and points won or lost at each step, the shipped file vs scratch."""
    steps = chain_steps(metrics, rec)
    if len(steps) < 2:
        return []
    parts = [f"{steps[0][0]} {steps[0][1]:.4f}"]
    parts += [f"{label} {a:.4f} ({_points(a, prev)})" for (label, a), (_, prev) in zip(steps[1:], steps)]
    line = "**Chain** (test accuracy, points vs the step before): " + " → ".join(parts) + "."
    named = dict(steps)
    last_label, last = steps[-1]
    if last_label.startswith("shipped") and "scratch" in named:
        line += f" **Shipped file vs scratch: {_points(last, named['scratch'])} points**"
        line += f"; vs teacher {_points(last, named['teacher'])}." if "teacher" in named else "."
    return [line]


def _busy_note(bench: dict[str, Any]) -> str:
    """A caution for the speed line when the bench ran with more load than the machine has cores ("" otherwise)."""
    loads = [r["loadavg_1m"] for r in bench.get("rows", []) if isinstance(r.get("loadavg_1m"), (int, float))]
    cores = (bench.get("machine") or {}).get("cores") or 0
    if loads and cores and max(loads) > cores:
        return f" (bench at load {max(loads):.0f} on {cores} cores: noisy latencies)"
    return ""


def _speed_size_line(speed: dict[str, Any] | None, has_bench: bool, busy: str = "") -> list[str]:
    if speed is None:
        if has_bench:
            return ["Speedup over the teacher: not measured (the bench has no PyTorch teacher row or no "
                    "recommended file)."]
        return ["No latency measured yet: run `edgekd bench` for latency, throughput and memory."]
    ok_speed, ok_acc = speed["speedup"] >= 10, (speed["accuracy_ratio"] or 0) >= 0.97
    who = "" if speed.get("qualifies", True) else " (fastest student variant, not recommended: it misses the rule)"
    size = (f"; **{speed['size_ratio']:.0f}x smaller** ({speed['size_bytes'] / 1024:.1f} KB vs "
            f"{speed['teacher_size_bytes'] / 1024:.1f} KB)" if speed.get("size_ratio") else "")
    n = speed["teacher_threads"]
    line = (f"**Speedup over the PyTorch fp32 teacher: {speed['speedup']:.1f}x**{who}{size}; p50 "
            f"{speed['p50_ms']:.4f} ms vs {speed['teacher_p50_ms']:.4f} ms at {n} thread{'s' if n != 1 else ''}, "
            f"batch {speed['batch']}{busy}")
    if speed.get("speedup_vs_teacher_exported"):
        line += (f"; {speed['speedup_vs_teacher_exported']:.1f}x vs the teacher's fastest export "
                 f"`{speed['teacher_exported_file']}`")
    if speed["accuracy_ratio"]:
        line += f"; {100 * speed['accuracy_ratio']:.1f}% of its accuracy"
    return [line + f". Target ≥ 10x with ≥ 97% of the teacher's accuracy: **{'met' if ok_speed and ok_acc else 'not met'}**."]


def _precision_line(quant: list[dict[str, Any]]) -> list[str]:
    if not quant:
        return []
    faster = [f for f in quant if f["faster"]]
    if not faster:
        return [f"**Lower precision is not faster than fp32 here**: none of {len(quant)} measurements (matrix below)."]
    where = sorted({f"{_PRECISION_NAMES.get(f['precision'], f['precision'])} in "
                    f"{_RUNTIME_NAMES.get(f['runtime'], f['runtime'])}" for f in faster})
    return [f"**Lower precision is faster than fp32 in {len(faster)} of {len(quant)} measurements** "
            f"({', '.join(where)}; matrix below)."]


def _budget_lines(check: BudgetCheck) -> list[str]:
    if not check.any_set:
        return ["Budgets: none set (add `max_accuracy_drop`, `max_p50_ms`, `max_size_kb`, `max_flash_kb`, "
                "`max_ram_kb` to the recipe's `validate` section to gate on them)."]
    named = ", ".join(f"{k} = {v:g}" for k, v in check.budgets.items() if v is not None)
    if check.ok:
        return [f"Budgets ({named}; scope {check.scope}): **passed**."]
    return [f"Budgets ({named}; scope {check.scope}): **FAILED** — " + "; ".join(check.failures)]


def _skipped(a: Analysis) -> list[dict[str, Any]]:
    return a.bench["skipped"] + a.validation["skipped"]


def summary_lines(a: Analysis) -> list[str]:
    """The report's summary: at most :data:`SUMMARY_MAX_LINES` Markdown lines (details go to :func:`notes`)."""
    lines = (_recommendation_line(a.recommendation) + _chain_line(a.metrics, a.recommendation)
             + _speed_size_line(a.speed, bool(a.bench["rows"]), _busy_note(a.bench)) + _precision_line(a.quant)
             + _budget_lines(a.check))
    skipped = _skipped(a)
    if skipped:
        lines.append(f"Not measured: {len(skipped)} file/runtime combination(s); the notes at the end say why.")
    return lines[:SUMMARY_MAX_LINES]


def notes(a: Analysis) -> list[str]:
    """The long form behind the summary: every lower-precision measurement in words, other comparisons, gaps."""
    out = [_quant_sentence(f) for f in a.quant]
    if a.speed and a.speed.get("speedup_vs_torch_student"):
        out.append(f"`{a.speed['file']}` against the PyTorch fp32 student at the same thread count: "
                   f"{a.speed['speedup_vs_torch_student']:.1f}x faster.")
    for s in _skipped(a):
        threads = f", {s['threads']} threads" if "threads" in s else ""
        out.append(f"Not measured: `{s['file']}` ({s['runtime']}{threads}): {s['reason']}")
    return out


# -- "is lower precision faster here?": one matrix -----------------------------------------------------------

def file_family(file: str) -> str:
    """A file's name without its precision, route and extension: the files compared with one another.

    ``student_pruned_app_int8.tflite`` and ``student_pruned_app_fp32.onnx`` are family ``student_pruned_app``;
    ``student_pruned_int8_qat.tflite`` is ``student_pruned_qat`` (compared with ``student_pruned_fp32``).
    """
    stem = Path(file).stem
    return "_".join(p for p in stem.split("_") if p not in _PRECISION_NAMES) or stem


def _matrix_columns(quant: list[dict[str, Any]]) -> list[tuple[str, int]]:
    order = list(_RUNTIME_NAMES)
    return sorted({(f["runtime"], f["threads"]) for f in quant},
                  key=lambda c: (order.index(c[0]) if c[0] in order else len(order), c[0], c[1]))


def precision_matrix(quant: list[dict[str, Any]]) -> tuple[list[tuple[str, int]], list[list[Any]]]:
    """Lower precision against fp32 as one matrix: rows precision (and file family), columns runtime × threads.

    Args:
        quant: :func:`quantization_findings` of the run.

    Returns:
        The columns as ``(runtime, threads)``, and one row per (precision, family): ``[precision name, family,
        cell, ...]`` where a cell is the finding (its ``ratio`` is the p50 over the fp32 file's) or None where
        nothing was measured.
    """
    cols = _matrix_columns(quant)
    prec_order = ["fp16", "dynamic", "int8"]
    keys = sorted({(f["precision"], file_family(f["file"])) for f in quant},
                  key=lambda k: (prec_order.index(k[0]) if k[0] in prec_order else len(prec_order), k[0], k[1]))
    rows = []
    for prec, fam in keys:
        cells: dict[tuple[str, int], dict[str, Any]] = {}
        for f in quant:
            if (f["precision"], file_family(f["file"])) == (prec, fam):
                # Two formats of a family in one runtime (.onnx and .ort): the faster file speaks for it.
                key = (f["runtime"], f["threads"])
                if key not in cells or f["ratio"] < cells[key]["ratio"]:
                    cells[key] = f
        rows.append([_PRECISION_NAMES.get(prec, prec), fam, *(cells.get(c) for c in cols)])
    return cols, rows


def _threads_name(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _cell_text(f: dict[str, Any] | None) -> str:
    return "·" if f is None else f"{f['ratio']:.2f}×"


MATRIX_TITLE = "Is lower precision faster here?"
MATRIX_LEGEND = ("Each cell: p50 latency of the file ÷ p50 of the fp32 file of the same family, in the same runtime at "
                 "the same thread count, on this machine; below 1 is faster, ✓ marks faster by more than 5%")


def matrix_markdown(quant: list[dict[str, Any]], level: str = "##") -> list[str]:
    """The precision matrix as Markdown: a heading (``level``), the table, its legend (nothing without findings)."""
    cols, rows = precision_matrix(quant)
    if not rows:
        return []
    headers = ["precision", "files"] + [f"{_RUNTIME_NAMES.get(rt, rt)}, {_threads_name(n)}" for rt, n in cols]
    cells = [[r[0], f"`{r[1]}`", *(f"**{_cell_text(c)}** ✓" if c and c["faster"] else _cell_text(c)
                                   for c in r[2:])] for r in rows]
    return [f"{level} {MATRIX_TITLE}", "", _md_table(headers, cells), "", MATRIX_LEGEND + " (and bold).", ""]


def _matrix_html(quant: list[dict[str, Any]]) -> list[str]:
    cols, rows = precision_matrix(quant)
    if not rows:
        return []
    # Two header rows: each runtime over its thread counts (narrow enough for a laptop screen).
    runtimes = list(dict.fromkeys(rt for rt, _ in cols))
    h = [f"<h2>{html.escape(MATRIX_TITLE)}</h2><div class='scroll'><table class='matrix' id='precision-matrix'>"
         "<tr><th rowspan='2'>precision</th><th rowspan='2'>files</th>"
         + "".join(f"<th colspan='{sum(c[0] == rt for c in cols)}'>{html.escape(_RUNTIME_NAMES.get(rt, rt))}</th>"
                   for rt in runtimes) + "</tr><tr>"
         + "".join(f"<th>{_threads_name(n)}</th>" for _, n in cols) + "</tr>"]
    for r in rows:
        tds = [f"<td>{html.escape(r[0])}</td>", f"<td><code>{html.escape(r[1])}</code></td>"]
        for c in r[2:]:
            if c is None:
                tds.append("<td class='none'>·</td>")
                continue
            cls = "faster" if c["faster"] else "slower" if c["ratio"] >= 1.05 else "same"
            title = f"{c['file']}: {c['p50_ms']:.4f} ms vs {c['reference']}: {c['reference_p50_ms']:.4f} ms"
            tds.append(f"<td class='{cls}' title='{html.escape(title)}'>{_cell_text(c)}"
                       f"{' ✓' if c['faster'] else ''}</td>")
        h.append("<tr>" + "".join(tds) + "</tr>")
    h.append(f"</table></div><p class='legend'>{html.escape(MATRIX_LEGEND)} (green; red: slower by 5% or more).</p>")
    return h


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
    """``report.md``: summary, the precision matrix, tables, links to the PNGs in ``report_plots/``, notes."""
    setup = setup_line(a.bench)
    md = [f"# edgekd report: {a.name}", "", "## Summary", ""] + [f"- {line}" for line in lines] + [""]
    md += matrix_markdown(a.quant) + ([setup, ""] if setup else [])
    for title, headers, rows in a.tables():
        md += [f"## {title}", "", _md_table(headers, rows), ""]
    md += ["## Plots", ""]
    for key, (title, png) in plots.items():
        if png is not None:
            md += [f"### {title}", "", f"![{title}]({plot_files[key]})", ""]
    details = notes(a)
    if details:
        md += ["## Notes", ""] + [f"- {line}" for line in details] + [""]
    return "\n".join(md)


def render_html(a: Analysis, lines: list[str], plots: Plots) -> str:
    """``report.html``: the same content, self-contained (plots embedded as base64 PNGs)."""
    setup = setup_line(a.bench)
    h = ["<!doctype html><html><head><meta charset='utf-8'>",
         "<meta name='viewport' content='width=device-width, initial-scale=1'>",
         f"<title>edgekd report: {html.escape(a.name)}</title>",
         f"<style>{_CSS}</style></head><body>", f"<h1>edgekd report: {html.escape(a.name)}</h1>",
         "<ul class='summary' id='summary'>"]
    for line in lines:
        cls = " class='fail'" if "FAILED" in line else ""
        h.append(f"<li{cls}>{_md_to_html_inline(line)}</li>")
    h.append("</ul>")
    h += _matrix_html(a.quant)
    if setup:
        h.append(f"<p class='setup'>{html.escape(setup)}</p>")
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
    details = notes(a)
    if details:
        h.append(f"<details id='notes'><summary>Notes ({len(details)})</summary><ul>"
                 + "".join(f"<li>{_md_to_html_inline(line)}</li>" for line in details) + "</ul></details>")
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
    return ReportResult(markdown=rd / "report.md", html=rd / "report.html", summary=summary, lines=lines,
                        notes=notes(a))
