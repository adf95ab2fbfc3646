"""Per-layer int8 sensitivity and accuracy-budgeted mixed-precision files, for ``edgekd quantize`` and ``export``.

Glue only: the measurements and the search are :mod:`edgekd.quant.sensitivity` and :mod:`edgekd.quant.mixed`
over the ``mixed`` route of each backend that has one (:meth:`ExportBackend.selective`: ``tflite`` and ``onnx``);
this module feeds them the run's fp32 files, calibration and validation split, writes ``quant_sensitivity.json``
and the ``<model>_mixed<suffix>`` files, and verifies and records each file like every other one (test split,
metadata.json with the backend and the float layers, metrics.json). It names no format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import ExportError, RunDirError
from edgekd.export import metadata as meta_mod
from edgekd.export import parity
from edgekd.export.backends import MIXED, ExportBackend, backend_for, get_backend, list_backends
from edgekd.quant.mixed import search_mixed
from edgekd.quant.selective import Layer
from edgekd.quant.sensitivity import SCHEMA_VERSION, Evaluator, measure_sensitivity, top_lines
from edgekd.run_dir import read_json, write_json_atomic

SENSITIVITY_FILE = "quant_sensitivity.json"
MCU = "mcu"
MCU_NOTE = ("mcu: TensorFlow Lite Micro runs full-int8 files only, so the MCU file stays full int8 "
            "(no mixed-precision MCU file)")


def has_mixed(backend: ExportBackend) -> bool:
    """Whether the backend has a ``mixed`` route."""
    return bool(backend.routes.get(MIXED))


def mixed_backends() -> list[str]:
    """Names of the registered backends with a ``mixed`` route."""
    return [n for n in list_backends() if has_mixed(get_backend(n))]


def check_mixed_formats(names: list[str], what: str = "export.max_drop") -> None:
    """Refuse, before anything is written, mixed files asked of backends that cannot have them.

    Args:
        names: The backends asked for (export's formats, or the backends of the files named to quantize).
        what: The option or key that asked for mixed files (for the message).

    Raises:
        ExportError: ``mcu`` is asked (TFLM needs full int8), or none of ``names`` has a mixed route.
    """
    if MCU in names:
        raise ExportError(f"{what}: the MCU file must be full int8 (TensorFlow Lite Micro runs no float layers)",
                          "export mcu without a budget, and the mixed files in another call")
    if not any(has_mixed(get_backend(n)) for n in names):
        raise ExportError(f"{what}: {', '.join(names) or 'no format'} has no mixed-precision route",
                          f"mixed int8/float files are written for: {', '.join(mixed_backends())}")


def check_named_files(files: list[str], what: str) -> None:
    """Refuse named files whose backend has no mixed route (the MCU file among them) before anything is read.

    Raises:
        ExportError: A file of no registered backend, or of one without a mixed route.
    """
    for f in files:
        check_mixed_formats([backend_for(f).name], f"{what} {Path(f).name}")


def mixed_entries(entries: list[dict[str, Any]], files: list[str] | None) -> list[dict[str, Any]]:
    """The fp32 entries that get a sensitivity/mixed file: every one of a backend with a route, or those named.

    Raises:
        ExportError: A named file's backend has no mixed-precision route, or no entry has one.
    """
    if files:
        for e in entries:
            check_mixed_formats([backend_for(e["file"], e).name], e["file"])
        return entries
    chosen = [e for e in entries if has_mixed(backend_for(e["file"], e))]
    if not chosen:
        have = ", ".join(sorted({backend_for(e["file"], e).name for e in entries})) or "none"
        raise ExportError(f"no fp32 file of a format with a mixed-precision route (the run has: {have})",
                          f"export one of: {', '.join(mixed_backends())}")
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
    return {"split": "validation", "samples": n, "calibration_samples": session.cfg.calibration_samples}


def _backend_settings(session: Any, backend: ExportBackend) -> dict[str, Any]:
    """The ``export.<backend>`` settings a file's sensitivity was measured with (e.g. ONNX's calibration)."""
    return {"backend": backend.name, **session.settings(backend).model_dump(mode="json")}


def _stored_ranking(session: Any, entry: dict[str, Any], settings: dict[str, Any],
                    layers: list[Layer]) -> tuple[list[Layer], dict[str, Any]] | None:
    """The ranking in quant_sensitivity.json when it was measured on this very file with these settings."""
    path = session.rd / SENSITIVITY_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    rec = (data.get("files") or {}).get(entry["file"]) if isinstance(data, dict) else None
    if (not rec or data.get("settings") != settings or rec.get("sha256") != entry.get("sha256")
            or rec.get("backend_settings") != _backend_settings(session, backend_for(entry["file"], entry))):
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


def run_mixed(session: Any, writer: Any, entries: list[dict[str, Any]], target_for: Any, *,
              sensitivity: bool, max_drop: float | None) -> list[str]:
    """Measure sensitivity (``sensitivity`` or no stored ranking) and, with ``max_drop``, write mixed files.

    Args:
        session: The export session (run, settings, calibration, test split).
        writer: The :class:`~edgekd.export.session.FileWriter` that records files (metadata, metrics, report).
        entries: fp32 metadata entries to work on (of backends with a mixed route).
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
        backend = backend_for(e["file"], e)
        model = s.variant(target_for(e["model"]), backend.variant)
        with backend.selective(s.rd / e["file"], s.calibration(), e["input"]["layout"], s.norm,
                               s.settings(backend), model=model, sample=s.sample()) as route:
            ev = Evaluator(route, x_val, y_val)
            stored = None if sensitivity else _stored_ranking(s, e, settings, route.layers())
            if stored is None:
                s.log(f"{e['file']}: sensitivity of {len(route.layers())} layers on {len(y_val)} validation samples")
                sens = measure_sensitivity(route, x_val, y_val, e["file"], log=s.log, evaluator=ev)
                results[e["file"]] = {**sens.to_json(), "sha256": e.get("sha256"),
                                      "backend_settings": _backend_settings(s, backend)}
                lines += top_lines(sens)
                ranking, full = sens.ranking(), sens.full
            else:
                ranking, full = stored[0], None
                s.log(f"{e['file']}: ranking from {SENSITIVITY_FILE}")
            if max_drop is not None:
                _write_mixed(s, writer, backend, e, ev, ranking, max_drop, full, target_for(e["model"]))
    if results:
        _write_sensitivity(s, settings, results)
        writer.report.files.append(SENSITIVITY_FILE)
    return lines


def _write_mixed(s: Any, writer: Any, backend: ExportBackend, fp32_entry: dict[str, Any], ev: Evaluator,
                 ranking: list[Layer], max_drop: float, full: Any, target: Any) -> None:
    """Search, write ``<model>_mixed<suffix>``, verify it on the test split and record it."""
    path = s.rd / backend.file_name(fp32_entry["model"], MIXED)
    result = search_mixed(ev, ranking, max_drop, path, log=s.log, full=full)
    backend.finish_mixed(path, s.settings(backend))
    backend.finalize(path, s)
    entry = meta_mod.build_entry(path, fp32_entry["model"], MIXED, fp32_entry["input"]["layout"], s.norm,
                                 s.labels, backend.routes[MIXED][0], backend=backend, source=fp32_entry["file"],
                                 float_layers=[layer.name for layer in result.float_layers],
                                 int8_weights=getattr(s.settings(backend), "int8_weights", "per_channel"))
    numbers = s.measure(path, entry, target) if s.verify else None
    problem = parity.problem(numbers, MIXED, s.cfg.tolerance) if numbers else None
    if not result.fits:
        problem = "; ".join(filter(None, [problem, f"validation drop {result.measured.drop_points:.2f} points "
                                                   f"> budget {max_drop:g} even with every layer float"]))
    info = result.to_json()
    info.pop("steps")
    writer.finish_file(path, entry, target, MIXED, numbers, problem, {"mixed": info})
    s.log(f"  {path.name}: {len(result.float_layers)} of {len(ranking)} layers float "
          f"({', '.join(layer.name for layer in result.float_layers) or 'none'}), validation "
          f"{-result.measured.drop_points:+.2f} points vs fp32, {result.seconds:.1f} s")

