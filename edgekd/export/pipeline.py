"""``edgekd export`` and ``edgekd quantize``: write, quantize and verify the run's model files.

Export turns the requested formats into a plan over the registered backends (:func:`resolve_plan`:
each backend after the one it is made from, companions such as the app profile beside theirs), then asks each
backend to build its files of the best student (pruned if the run has one) and, where it takes one, of the
teacher. Every file is run in its runtime on the run's test split (``eval.npz``) and compared with the PyTorch
model (:mod:`edgekd.export.parity`); the numbers go to ``metrics.json`` under the file name, the file's
description (with the backend's name) to ``metadata.json``, and the files with their sha256 to the manifest.

This module names no format: what is format-specific belongs to a backend (:mod:`edgekd.export.backends`).
A conversion failure of one file is reported with the operator that failed and the other files are still
written; the command then exits 2. A file that misses the tolerance makes it exit 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edgekd.errors import ArtifactChanged, ExportError, RunDirError
from edgekd.export import metadata as meta_mod
from edgekd.export.backends import ExportBackend, backend_for, get_backend, list_backends
from edgekd.export.session import (QUANT_PRECISIONS, ExportSession, FileWriter, Log, Target, check_formats,
                                   check_writable, fmt_size, load_run_recipe, merge_export_config, run_and_record,
                                   student_target)
from edgekd.models import load_model
from edgekd.recipe import ExportConfig
from edgekd.results import ExportReport
from edgekd.run_dir import PRUNED_STUDENT, RunDir, sha256_file


def parse_precisions(value: str | list[str] | tuple[str, ...] | None, option: str = "--quantize") -> list[str]:
    """Validate a precision list (``"fp16,int8"`` or a list); ``none`` or empty means no quantized files.

    Raises:
        ExportError: A name is not one of fp16, int8, dynamic.
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        p = str(raw).strip().lower()
        if not p or p == "none":
            continue
        if p not in QUANT_PRECISIONS:
            hint = " (fp32 files are always written)" if p == "fp32" else ""
            raise ExportError(f"unknown precision {raw!r} in {option}{hint}",
                              f"choose from: {', '.join(QUANT_PRECISIONS)}")
        if p not in out:
            out.append(p)
    return out


def prepared_plan(session: ExportSession, plan: list[ExportBackend]) -> list[ExportBackend]:
    """The backends of the plan whose settings fit the run (each checked before anything is written)."""
    asked = set(session.cfg.formats)
    return [b for b in plan if b.prepare(session, session.settings(b), b.name in asked)]


def run_export(run: str | os.PathLike | RunDir | None = None, out: str | os.PathLike = "exported", *,
               formats: list[str] | None = None, quantize: list[str] | str | None = None,
               nhwc: bool | None = None, int8_io: str | None = None, calibration_method: str | None = None,
               teacher: bool | None = None, verify: bool = True, log: Log | None = None,
               cfg: ExportConfig | None = None, quiet: bool = True, check: bool = False,
               app: bool | None = None, ort: bool | None = None) -> ExportReport:
    """Export the run's best student (and the teacher, fp32) with every requested backend, verify, describe.

    Args:
        run: Run directory (default: the most recent run in ``out``).
        out: Where runs live (for the default run).
        formats: Backend names, e.g. ``onnx``, ``tflite``, ``mcu``, ``pte`` (default: ``export.formats``).
        quantize: Extra precisions for the student: ``fp16``, ``int8``, ``dynamic`` (default: recipe).
        nhwc: Channels-last input for TFLite files (``export.tflite.nhwc``).
        int8_io: ``float32``, ``int8`` or ``uint8`` I/O of full-integer TFLite files (``export.tflite.int8_io``).
        calibration_method: ONNX Runtime calibration (``export.onnx.calibration_method``).
        teacher: Also export the teacher in fp32.
        verify: Run every file on the test split and check it against the tolerance.
        log: Receives one progress line per file (default: silent unless ``quiet`` is False).
        cfg: Export settings to start from instead of the run recipe's ``export`` section.
        quiet: With no ``log``, False prints the progress lines.
        check: Raise (after writing and recording every file that could be written) when a conversion
            failed (:class:`ExportError`) or a file misses the tolerance (:class:`CheckFailed`).
        app: App-profile .tflite files (``export.tflite_app.enabled``; default: on for image runs); True for a
            run without images is an error.
        ort: Also write .ort files for ONNX Runtime Mobile (adds the ``ort`` backend).

    Returns:
        The report: the files written, failed conversions and files that miss the tolerance. Without
        ``check``, call :meth:`ExportReport.raise_for_problems` to turn those into errors (the CLI does).
    """
    from edgekd.run_dir import resolve_run

    log = log or (print if not quiet else (lambda _msg: None))
    precisions = parse_precisions(quantize, "--quantize") if quantize is not None else None
    if formats is not None:
        if not formats:
            raise ExportError("no format selected", "pass --format NAME, or --onnx and/or --tflite")
        check_formats(formats)
    rd = run if isinstance(run, RunDir) else resolve_run(run, out)
    cfg = merge_export_config(rd, load_run_recipe(rd), cfg, formats=formats, quantize=precisions, nhwc=nhwc,
                              int8_io=int8_io, calibration_method=calibration_method, teacher=teacher, ort=ort,
                              app=None if app is None else {"enabled": app})
    if cfg.max_drop is not None:
        from edgekd.export.mixed import check_mixed_formats

        check_mixed_formats(cfg.formats)
    plan = check_formats(cfg.formats, cfg)
    targets = _export_targets(rd, cfg, log)
    check_writable(rd)
    session = ExportSession(rd, cfg, verify, log)
    plan = prepared_plan(session, plan)  # bad settings fail here, before anything is written
    t0 = time.perf_counter()
    rd.stage_started("export")
    report = ExportReport(run=str(rd.path))
    writer = FileWriter(session, report)

    def work() -> None:
        writer.build(plan, targets)
        if cfg.max_drop is not None:
            _export_mixed(writer, targets[0])

    run_and_record(work, rd, "export", report, session, writer, t0)
    if cfg.quantize and report.ok:
        # Export quantized the student too; record it so `edgekd run` does not quantize the same files again.
        rd.stage_done("quantize", via="export", precisions=list(cfg.quantize))
    if check:
        report.raise_for_problems()
    return report


def _export_targets(rd: RunDir, cfg: ExportConfig, log: Log) -> list[Target]:
    """The models to export (best student, teacher if asked), their checkpoints checked against the manifest."""
    # The checkpoints and the test split that verifies the files are checked against the manifest before they
    # are loaded: a truncated student.pt is reported as changed (exit 1), not as a corrupt file; missing ones
    # are reported below.
    pruned = [a for a in rd.manifest().get("artifacts", {}) if a.startswith(PRUNED_STUDENT)]
    rd.check_artifacts(["student.pt", "teacher.pt", *pruned, "eval.npz", "data.json"], missing_ok=True)
    targets = [student_target(rd)]
    if cfg.teacher:
        if (rd / "teacher.pt").is_file():
            targets.append(Target("teacher", load_model(rd / "teacher.pt"), "teacher.pt"))
        else:
            log("teacher.pt not found: exporting the student only")
    changed = rd.verify_artifacts([t.checkpoint for t in targets])
    if changed:
        raise RunDirError(f"cannot export: {'; '.join(changed)}", "run `edgekd distill` again")
    return targets


def _export_mixed(writer: FileWriter, student: Target) -> None:
    """``export.max_drop``: the student's ``mixed`` files, from its fp32 files of backends with that route."""
    from edgekd.export.mixed import has_mixed, run_mixed

    fp32 = [e for e in writer.entries if e["model"] == student.name and e["precision"] == "fp32"
            and e.get("profile", "research") == "research"]
    chosen = [e for e in fp32 if has_mixed(backend_for(e["file"], e))]
    if chosen:
        lines = run_mixed(writer.session, writer, chosen, lambda _model: student, sensitivity=False,
                          max_drop=writer.session.cfg.max_drop)
        writer.report.extra.setdefault("sensitivity", []).extend(lines)


def run_quantize(run: str | os.PathLike | RunDir | None = None, out: str | os.PathLike = "exported", *,
                 precisions: list[str] | str | None = None, files: list[str] | None = None,
                 int8_io: str | None = None, calibration_method: str | None = None, verify: bool = True,
                 log: Log | None = None, cfg: ExportConfig | None = None, quiet: bool = True,
                 check: bool = False, sensitivity: bool = False, max_drop: float | None = None) -> ExportReport:
    """Post-training quantization of fp32 files already exported into the run (see :func:`run_export`).

    With ``sensitivity`` or ``max_drop`` it measures each layer's int8 sensitivity (``quant_sensitivity.json``)
    and, with a budget, writes mixed-precision files (:mod:`edgekd.export.mixed`) instead of the recipe's
    precisions (``precisions`` given explicitly are written too). Without them, ``export.max_drop`` of the
    recipe adds the mixed files to the precisions.

    Args:
        run: Run directory (default: the most recent run in ``out``).
        out: Where runs live.
        precisions: ``fp16``, ``int8``, ``dynamic`` (default: ``export.quantize`` of the recipe).
        files: fp32 files to quantize (default: every fp32 student file in metadata.json).
        int8_io: Inputs/outputs of full-integer TFLite files.
        calibration_method: ONNX Runtime calibration method.
        verify: Check every new file against the PyTorch model on the test split.
        log: Receives one progress line per file.
        cfg: Export settings to start from instead of the run recipe's ``export`` section.
        quiet: With no ``log``, False prints the progress lines.
        check: Raise after recording when a quantization failed or a file misses the tolerance.
        sensitivity: Measure every layer's int8 sensitivity on the validation split.
        max_drop: Accuracy budget in points for mixed-precision files (overrides ``export.max_drop``).
    """
    from edgekd.export.mixed import MCU, MCU_NOTE, check_named_files, mixed_entries, run_mixed
    from edgekd.quant.mixed import check_max_drop
    from edgekd.run_dir import resolve_run

    log = log or (print if not quiet else (lambda _msg: None))
    wanted = parse_precisions(precisions, "--precision") if precisions is not None else None
    budget = check_max_drop(max_drop) if max_drop is not None else None
    rd = run if isinstance(run, RunDir) else resolve_run(run, out)
    cfg = merge_export_config(rd, load_run_recipe(rd), cfg, quantize=wanted, int8_io=int8_io,
                              calibration_method=calibration_method, max_drop=budget)
    flags = sensitivity or budget is not None
    todo = (wanted or []) if flags else cfg.quantize
    budget = budget if flags else cfg.max_drop
    if not todo and not flags and budget is None:
        raise ExportError("no precision to quantize to", "pass --precision int8 (or fp16, dynamic)")
    if flags and files:
        check_named_files(files, "--max-drop" if budget is not None else "--sensitivity")
    chosen = _fp32_files(rd, files)
    mixed = mixed_entries(chosen, files) if flags or budget is not None else []
    check_writable(rd)
    session = ExportSession(rd, cfg, verify, log)
    targets: dict[str, Target] = {}
    t0 = time.perf_counter()
    rd.stage_started("quantize")
    report = ExportReport(run=str(rd.path))
    writer = FileWriter(session, report)

    def work() -> None:
        for e in chosen:
            for precision in todo:
                writer.quantize(target(e["model"]), backend_for(e["file"], e), precision, e)
        if mixed:
            if budget is not None and MCU in cfg.formats:
                log(MCU_NOTE)
            report.extra["sensitivity"] = run_mixed(session, writer, mixed, target, sensitivity=sensitivity,
                                                    max_drop=budget)

    def target(model: str) -> Target:
        if model not in targets:
            targets[model] = _target_for(rd, model)
        return targets[model]

    run_and_record(work, rd, "quantize", report, session, writer, t0)
    if check:
        report.raise_for_problems()
    return report


def _fp32_files(rd: RunDir, files: list[str] | None) -> list[dict[str, Any]]:
    """The metadata entries of the fp32 files to quantize (``files``, else every student one), each checked
    to be present and unchanged since export."""
    meta = meta_mod.read_metadata(rd)

    def quantizable(e: dict[str, Any]) -> bool:
        # Files of derived backends and of other model variants (the app profile's pixel wrapper) are
        # quantized by `edgekd export`, which builds them from their source, not here.
        try:
            backend = backend_for(e["file"], e)
        except ExportError:
            return False
        return backend.source is None and backend.variant == "plain" and e.get("profile", "research") == "research"

    fp32 = [e for e in meta["models"] if e.get("precision") == "fp32" and quantizable(e)]
    if files:
        names = {Path(f).name for f in files}
        unknown = sorted(names - {e["file"] for e in fp32})
        if unknown:
            listed = ", ".join(e["file"] for e in fp32) or "none"
            raise ExportError(f"{unknown[0]} is not an exported fp32 file of {rd.path}",
                              f"fp32 files: {listed}; run `edgekd export` first")
        chosen = [e for e in fp32 if e["file"] in names]
    else:
        chosen = [e for e in fp32 if e["model"] != "teacher"]
    if not chosen:
        raise RunDirError(f"run {rd.path} has no exported fp32 student file to quantize",
                          "run `edgekd export` first")
    for e in chosen:
        path = rd / e["file"]
        if not path.is_file():
            raise RunDirError(f"{e['file']} is listed in metadata.json but missing", "run `edgekd export` again")
        if sha256_file(path) != e.get("sha256"):
            raise ArtifactChanged(f"{e['file']} changed since it was exported (sha256 mismatch: truncated or edited)",
                                  "run `edgekd export` again", files=[e["file"]])
    return chosen


def _target_for(rd: RunDir, model: str) -> Target:
    if model in ("student", PRUNED_STUDENT):
        target = student_target(rd)
        if target.name != model:
            raise RunDirError(f"the run's best student is now {target.name}, but the files are of {model}",
                              "run `edgekd export` again")
        return target
    path = rd / f"{model}.pt"
    if not path.is_file():
        raise RunDirError(f"run {rd.path} has no {model}.pt for the files of {model}")
    return Target(model, load_model(path), path.name)


def summary_table(run_dir: str | os.PathLike | RunDir) -> str:
    """A table of the run's exported files: file, size, accuracy, agreement, parity, verified.

    Ends with the size and accuracy of the smallest int8 student file relative to the fp32 teacher file.
    """
    from edgekd.summary import table

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    meta = meta_mod.read_metadata(rd)
    metrics = rd.metrics()
    rows = []
    for e in meta["models"]:
        m = metrics.get(e["file"], {})
        acc = m.get("test_accuracy")
        agree = m.get("agreement")
        par = m.get("parity")
        verified = {True: "ok", False: "FAILED", None: "-"}[e.get("verified")]
        rows.append([e["file"], fmt_size(e["size_bytes"]), "-" if acc is None else f"{acc:.4f}",
                     "-" if agree is None else f"{100 * agree:.2f}%", "-" if par is None else f"{par:.1e}", verified])
    text = table(["file", "size", "accuracy", "agreement", "parity", "verified"], rows)
    lines = [text]
    for name in list_backends():
        backend = get_backend(name)
        teacher_file = backend.file_name("teacher", "fp32")
        t = metrics.get(teacher_file)
        students = [e for e in meta["models"] if e.get("backend", e["format"]) == name and e["precision"] == "int8"
                    and e["model"] != "teacher"]
        if t and students:
            s = min(students, key=lambda e: e["size_bytes"])
            sm = metrics.get(s["file"], {})
            ratio = t["size_bytes"] / max(1, s["size_bytes"])
            line = f"{s['file']}: {ratio:.1f}x smaller than {teacher_file}"
            if sm.get("test_accuracy") is not None and t.get("test_accuracy"):
                line += f", {100 * sm['test_accuracy'] / t['test_accuracy']:.1f}% of its accuracy"
            lines.append(line)
    lines.append(f"metadata: {rd / meta_mod.METADATA}")
    return "\n".join(lines)
