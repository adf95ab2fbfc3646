"""Per-layer int8 sensitivity and accuracy-budgeted mixed-precision files, for ``edgekd quantize`` and ``export``.

Glue only: the measurements and the search are :mod:`edgekd.quant.sensitivity` and :mod:`edgekd.quant.mixed`
over each format's selective route (:mod:`edgekd.quant.selective`); this module feeds them the run's fp32
files, calibration and validation split, writes ``quant_sensitivity.json`` and the ``<model>_mixed<suffix>``
files, and verifies and records each file like every other one (test split, metadata.json, metrics.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import ExportError, RunDirError
from edgekd.export import metadata as meta_mod
from edgekd.export import parity
from edgekd.export.common import quiet
from edgekd.quant.mixed import MixedResult, search_mixed
from edgekd.quant.selective import SELECTIVE_ROUTES, Layer, selective_route
from edgekd.quant.sensitivity import SCHEMA_VERSION, Evaluator, Sensitivity, measure_sensitivity, top_lines
from edgekd.run_dir import read_json, write_json_atomic

SENSITIVITY_FILE = "quant_sensitivity.json"
MIXED = "mixed"
MCU_NOTE = ("mcu: TensorFlow Lite Micro runs full-int8 files only, so the MCU file stays full int8 "
            "(no mixed-precision MCU file)")


def mixed_entries(entries: list[dict[str, Any]], files: list[str] | None) -> list[dict[str, Any]]:
    """The fp32 entries that get a sensitivity/mixed file: every one of a format with a route, or those named.

    Raises:
        ExportError: A named file's format has no mixed-precision route, or no entry has one.
    """
    if files:
        for e in entries:
            if e["format"] not in SELECTIVE_ROUTES:
                raise ExportError(f"{e['file']}: {e['format']} has no mixed-precision route",
                                  f"mixed int8/float files are written for: {', '.join(SELECTIVE_ROUTES)}")
        return entries
    chosen = [e for e in entries if e["format"] in SELECTIVE_ROUTES]
    if not chosen:
        have = ", ".join(sorted({e["format"] for e in entries})) or "none"
        raise ExportError(f"no fp32 file of a format with a mixed-precision route (the run has: {have})",
                          f"export one of: {', '.join(SELECTIVE_ROUTES)}")
    return chosen


def validation_split(session: Any) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs and labels of the run's validation split (a seeded subset of export.sensitivity_samples)."""
    if session.recipe is None:
        raise RunDirError(f"run {session.rd.path} has no recipe.yaml, so its validation split cannot be found",
                          "run `edgekd distill` again")
    from edgekd.data import load_data

    val = load_data(session.recipe.data, session.recipe.seed).val
    n = min(session.cfg.sensitivity_samples, len(val))
    if n < 1:
        raise RunDirError(f"run {session.rd.path} has an empty validation split", "use a larger dataset")
    idx = np.arange(len(val)) if n == len(val) else np.sort(
        np.random.default_rng(session.recipe.seed).choice(len(val), size=n, replace=False))
    x = np.stack([val.raw(int(i)) for i in idx]).astype(np.float32)
    return x, np.asarray(val.labels[val.indices[idx]], np.int64)


def _settings(session: Any, n: int) -> dict[str, Any]:
    return {"split": "validation", "samples": n, "calibration_samples": session.cfg.calibration_samples,
            "calibration_method": session.cfg.calibration_method}


def _stored_ranking(session: Any, entry: dict[str, Any], settings: dict[str, Any],
                    layers: list[Layer]) -> tuple[list[Layer], dict[str, Any]] | None:
    """The ranking in quant_sensitivity.json when it was measured on this very file with these settings."""
    path = session.rd / SENSITIVITY_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    rec = (data.get("files") or {}).get(entry["file"]) if isinstance(data, dict) else None
    if not rec or data.get("settings") != settings or rec.get("sha256") != entry.get("sha256"):
        return None
    by_key = {layer.key: layer for layer in layers}
    ranked = [by_key.get(r.get("key")) for r in rec.get("layers", [])]
    if None in ranked or len(ranked) != len(layers):
        return None
    return ranked, rec


def _write_sensitivity(session: Any, settings: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """Merge this call's per-file results into quant_sensitivity.json (dropping files measured otherwise)."""
    path = session.rd / SENSITIVITY_FILE
    old = read_json(path) if path.is_file() else {}
    files = dict(old.get("files") or {}) if isinstance(old, dict) and old.get("settings") == settings else {}
    files.update(results)
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, "settings": settings, "files": files})


def run_mixed(session: Any, exporter: Any, entries: list[dict[str, Any]], target_for: Any, *,
              sensitivity: bool, max_drop: float | None) -> list[str]:
    """Measure sensitivity (``sensitivity`` or no stored ranking) and, with ``max_drop``, write mixed files.

    Args:
        session: The export session (run, settings, calibration, test split).
        exporter: Records written files (metadata, metrics, report).
        entries: fp32 metadata entries to work on (formats with a selective route).
        target_for: ``model name -> Target`` (the PyTorch model the test-split parity compares with).
        sensitivity: Measure again even when quant_sensitivity.json has this file's ranking.
        max_drop: Budget in accuracy points for the mixed files (None: sensitivity only).

    Returns:
        The console lines with each file's most sensitive layers.
    """
    s = session
    x_val, y_val = validation_split(s)
    settings = _settings(s, len(y_val))
    results: dict[str, dict[str, Any]] = {}
    lines: list[str] = []
    for e in entries:
        fp32_path = s.rd / e["file"]
        layout = e["input"]["layout"]
        with selective_route(e["format"], fp32_path, s.calibration(), layout, s.norm,
                             method=s.cfg.calibration_method, silence=quiet) as route:
            ev = Evaluator(route, x_val, y_val)
            stored = None if sensitivity else _stored_ranking(s, e, settings, route.layers())
            if stored is None:
                s.log(f"{e['file']}: sensitivity of {len(route.layers())} layers on {len(y_val)} validation samples")
                sens = measure_sensitivity(route, x_val, y_val, e["file"], log=s.log, evaluator=ev)
                results[e["file"]] = {**sens.to_json(), "sha256": e.get("sha256")}
                lines += top_lines(sens)
                ranking, full = sens.ranking(), sens.full
            else:
                ranking, full = stored[0], None
                s.log(f"{e['file']}: ranking from {SENSITIVITY_FILE}")
            if max_drop is not None:
                _write_mixed(s, exporter, e, route, ev, ranking, max_drop, full, target_for(e["model"]))
    if results:
        _write_sensitivity(s, settings, results)
        exporter.r.files.append(SENSITIVITY_FILE)
    return lines


def _write_mixed(s: Any, exporter: Any, fp32_entry: dict[str, Any], route: Any, ev: Evaluator,
                 ranking: list[Layer], max_drop: float, full: Any, target: Any) -> None:
    """Search, write ``<model>_mixed<suffix>``, verify it on the test split and record it."""
    path = s.rd / f"{fp32_entry['model']}_{MIXED}{route.suffix}"
    result = search_mixed(ev, ranking, max_drop, path, log=s.log, full=full)
    if route.format == "tflite":
        _float_io(path, s.cfg.int8_io)
    s.tidy(path, route.format)
    entry = meta_mod.build_entry(path, fp32_entry["model"], MIXED, fp32_entry["input"]["layout"], s.norm,
                                 s.labels, f"{route.tool}-selective", source=fp32_entry["file"],
                                 float_layers=[layer.name for layer in result.float_layers])
    numbers = s.measure(path, entry, target) if s.verify else None
    problem = parity.problem(numbers, MIXED, s.cfg.tolerance) if numbers else None
    if not result.fits:
        problem = "; ".join(filter(None, [problem, f"validation drop {result.measured.drop_points:.2f} points "
                                                   f"> budget {max_drop:g} even with every layer float"]))
    if problem:
        exporter.r.problems.append(f"{path.name}: {problem}")
    info = result.to_json()
    info.pop("steps")
    exporter.finish_file(path, entry, target, MIXED, numbers, problem, {"mixed": info})
    s.log(f"  {path.name}: {len(result.float_layers)} of {len(ranking)} layers float "
          f"({', '.join(layer.name for layer in result.float_layers) or 'none'}), validation "
          f"{-result.measured.drop_points:+.2f} points vs fp32, {result.seconds:.1f} s")


def _float_io(path: Path, io_type: str) -> None:
    """Give a mixed .tflite file the export's int8 I/O type where its ends are int8 (as int8 files get)."""
    from edgekd.export.tflite import has_int8_io, retype_io
    from edgekd.run_dir import atomic_path

    data = path.read_bytes()
    if io_type == "int8" or not has_int8_io(data):
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(retype_io(data, io_type))
