"""``metadata.json``: what an app (or bench/validate/device scripts) needs to run every exported file.

Input/output names, shapes, dtypes and quantization parameters are read back from the runtimes
(onnxruntime, LiteRT's interpreter), never assumed from what the exporter was asked to do: each file's
export backend (:mod:`edgekd.export.backends`) describes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.errors import RunDirError
from edgekd.export.backends import ExportBackend, backend_for
from edgekd.export.common import PIXEL_SCALE
from edgekd.run_dir import PRUNED_STUDENT, RunDir, read_json, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
METADATA = "metadata.json"


def describe_file(path: Path, entry: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output specs of a model file as its runtime reports them (asked of the file's backend)."""
    return backend_for(path, entry).io_spec(Path(path))


def build_entry(path: Path, model: str, precision: str, layout: str, normalization: dict[str, Any],
                labels: list[str], route: str, backend: ExportBackend | None = None, **extra: Any) -> dict[str, Any]:
    """One ``models[]`` entry of metadata.json for an exported file.

    Args:
        path: The model file (inside the run directory).
        model: Model stem (``student``, ``student_pruned``, ``teacher``).
        precision: ``fp32``, ``fp16``, ``int8`` or ``dynamic``.
        layout: Input layout of the file: ``NCHW``, ``NHWC`` or ``NF``.
        normalization: ``{"mean", "std"}`` applied to raw inputs before the model.
        labels: Class names in output order.
        route: The tool chain that produced the file.
        backend: The backend that wrote it (default: the one whose files have its name).
        **extra: Further keys (e.g. ``routes_tried``).
    """
    desc = (backend or backend_for(path)).describe(Path(path))
    desc["input"]["layout"] = layout
    entry = {
        "file": path.name, "model": model, "backend": desc.pop("backend"), "format": desc.pop("format"),
        "precision": precision, "input": desc.pop("input"), "output": desc.pop("output"),
        "normalization": normalization, "labels": list(labels), "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path), "route": route, "tool_versions": desc.pop("tool_versions"),
        "profile": "research", "output_kind": "logits", **desc,
    }
    if layout in ("NCHW", "NHWC") and normalization.get("std"):
        entry["pixel_scale"] = PIXEL_SCALE
        entry["normalization_pixels"] = {"mean": [float(m) * PIXEL_SCALE for m in normalization["mean"]],
                                         "std": [float(v) * PIXEL_SCALE for v in normalization["std"]]}
    entry.update(extra)
    return entry


def read_metadata(rd: RunDir) -> dict[str, Any]:
    """The run's metadata.json (an empty skeleton if there is none yet)."""
    path = rd / METADATA
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "run": rd.name, "labels": [], "normalization": {}, "models": []}
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("models"), list):
        raise RunDirError(f"{path} is not an edgekd metadata file (no models list)",
                          "delete it and run `edgekd export` again")
    return meta


def write_metadata(rd: RunDir, entries: list[dict[str, Any]], labels: list[str],
                   normalization: dict[str, Any]) -> dict[str, Any]:
    """Merge ``entries`` into metadata.json (replacing entries of the same file) and write it atomically.

    Entries whose file no longer exists are dropped, so the list always matches the directory.
    """
    meta = read_metadata(rd)
    by_file = {e["file"]: e for e in meta["models"] if (rd / e["file"]).is_file()}
    for e in entries:
        by_file[e["file"]] = e
    order = {PRUNED_STUDENT: 0, "student": 1, "teacher": 2}
    prec = {"fp32": 0, "fp16": 1, "dynamic": 2, "int8": 3}
    models = sorted(by_file.values(), key=lambda e: (order.get(e["model"], 9), e["model"], e["format"],
                                                     prec.get(e["precision"], 9), e["file"]))
    meta.update({"schema_version": SCHEMA_VERSION, "run": rd.name, "labels": list(labels),
                 "normalization": normalization, "models": models})
    write_json_atomic(rd / METADATA, meta)
    return meta
