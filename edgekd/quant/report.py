"""The report's quantization-sensitivity section: tables and a ranked plot from ``quant_sensitivity.json``, and
the table of mixed-precision files (from their metadata.json and metrics.json entries)."""

from __future__ import annotations

from typing import Any

Table = tuple[str, list[str], list[list[str]]]
_RUNTIMES = {"litert": "LiteRT", "onnxruntime": "ONNX Runtime"}


def _pts(v: Any) -> str:
    return "-" if v is None else f"{-float(v):+.2f}"


def _db(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}"


def sensitivity_tables(data: dict[str, Any] | None, top: int = 10) -> list[Table]:
    """One table per measured file: its ``top`` most sensitive layers, in ranking order."""
    out: list[Table] = []
    for name, rec in ((data or {}).get("files") or {}).items():
        full = rec.get("int8") or {}
        title = (f"Int8 sensitivity of {name} ({rec.get('quantizer')}, {_RUNTIMES.get(rec.get('runtime'), rec.get('runtime'))}, "
                 f"{rec.get('samples')} validation samples): fp32 {rec.get('fp32_accuracy', 0):.4f}, all layers int8 "
                 f"{full.get('accuracy', 0):.4f} ({_pts(full.get('drop_points'))} points, SNR {_db(full.get('snr_db'))} dB)")
        rows = []
        for layer in (rec.get("layers") or [])[:top]:
            kept, only = layer.get("all_but_int8") or {}, layer.get("only_int8") or {}
            inside = layer.get("output_in_int8") or {}
            rows.append([str(layer.get("rank")), str(layer.get("name")), _pts(kept.get("drop_points")),
                         _db(kept.get("snr_db")), _pts(only.get("drop_points")), _db(only.get("snr_db")),
                         f"{only.get('cosine')}", _db(inside.get("snr_db"))])
        out.append((title, ["rank", "layer", "kept float, rest int8: points vs fp32", "its SNR dB",
                            "only it int8: points vs fp32", "its SNR dB", "its cosine",
                            "its output in all-int8: SNR dB"], rows))
    return out


def mixed_table(entries: list[dict[str, Any]], metrics: dict[str, Any]) -> list[Table]:
    """The mixed-precision files: layers kept float, budget, validation drop, test accuracy, size."""
    rows = []
    for e in entries:
        if e.get("precision") != "mixed":
            continue
        m = metrics.get(e["file"]) or {}
        info = m.get("mixed") or {}
        val = info.get("validation") or {}
        acc = m.get("test_accuracy")
        floats = e.get("float_layers") or []
        rows.append([e["file"], f"{len(floats)}: {', '.join(floats) or 'none'}", f"{info.get('max_drop_points', '-')}",
                     _pts(val.get("drop_points")), "-" if acc is None else f"{acc:.4f}",
                     f"{e['size_bytes'] / 1024:.1f}", f"{info.get('search_seconds', '-')}"])
    if not rows:
        return []
    return [("Mixed-precision files (int8 except the layers kept float; the MCU target needs full int8)",
             ["file", "layers kept float", "budget (points)", "validation vs fp32 (points)", "test accuracy",
              "size KB", "search s"], rows)]


def plot_sensitivity(data: dict[str, Any] | None, top: int = 12):
    """A matplotlib figure: per measured file, its ``top`` layers in ranking order, with the accuracy points
    recovered by keeping each float (rest int8) and lost with only it int8 (None: nothing measured)."""
    files = list(((data or {}).get("files") or {}).items())
    if not files:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(min(top, len(rec.get("layers") or [])) for _, rec in files) or 1
    fig, axes = plt.subplots(1, len(files), figsize=(6.5 * len(files), 0.32 * n + 1.6), layout="constrained",
                             squeeze=False)
    for ax, (name, rec) in zip(axes[0], files):
        layers = (rec.get("layers") or [])[:top]
        labels = [f"{layer['rank']}. {layer['name']}" for layer in layers]
        recovered = [float(layer.get("recovered_points") or 0.0) for layer in layers]
        lost = [float((layer.get("only_int8") or {}).get("drop_points") or 0.0) for layer in layers]
        ys = list(range(len(layers)))
        ax.barh([y - 0.2 for y in ys], recovered, height=0.4, color="tab:green",
                label="points recovered when kept float (rest int8)")
        ax.barh([y + 0.2 for y in ys], lost, height=0.4, color="tab:red", label="points lost with only it int8")
        ax.set_yticks(ys, labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.6)
        ax.set(xlabel="accuracy points (validation split)",
               title=f"{name} ({rec.get('quantizer')}, {_RUNTIMES.get(rec.get('runtime'), rec.get('runtime'))})")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, axis="x")
    handles, texts = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, texts, fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    return fig
