"""``edgekd export`` and ``edgekd quantize``: write, quantize and verify the run's model files.

Export writes fp32 ONNX and/or TFLite files of the best student (pruned if the run has one, else the
distilled student) and of the teacher, then the quantized student files (fp16 / int8 / dynamic). Every file
is run in its own runtime on the run's test split (``eval.npz``) and compared with the PyTorch model
(:mod:`edgekd.export.parity`); the results go to ``metrics.json`` under the file name, the file's description
to ``metadata.json``, and the files with their sha256 to the manifest.

A conversion failure of one format is reported with the operator that failed and the other formats are
still written; the command then exits 2. A file that misses the tolerance makes it exit 1.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgekd.errors import ArtifactChanged, CheckFailed, EdgeKDError, ExportError, RecipeError, RunDirError
from edgekd.results import ExportReport
from edgekd.export import metadata as meta_mod
from edgekd.export import parity
from edgekd.export.backends import PRECISIONS, ExportBackend, QuantizeJob, backend_for, get_backend, list_backends
from edgekd.models import load_model
from edgekd.recipe import ExportConfig, Recipe
from edgekd.run_dir import METRICS, RunDir, atomic_path, read_json, sha256_file, write_json_atomic, write_text_atomic

QUANT_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp32")
# Formats made from another format's file rather than by a backend: mcu (TensorFlow Lite Micro) is the verified
# int8 TFLite file with integer I/O and without tensor names (edgekd.export.mcu).
DERIVED_FORMATS = ("mcu",)
# Samples run through both files when looking for the first diverging layer (every tensor is kept).
_LAYER_SAMPLES = 32

Log = Callable[[str], None]


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


@dataclass
class Target:
    """A PyTorch model of the run that gets exported."""

    name: str  # file stem: student, student_pruned, teacher
    model: nn.Module
    checkpoint: str  # file in the run directory it was loaded from


def load_run_recipe(rd: RunDir) -> Recipe | None:
    from edgekd.recipe import read_yaml, validate_recipe

    path = rd / "recipe.yaml"
    if not path.is_file():
        return None
    return validate_recipe(read_yaml(path), source=str(path))


def student_target(rd: RunDir) -> Target:
    """The best student of the run: the pruned one if the run has it, else the distilled one."""
    artifacts = rd.manifest().get("artifacts", {})
    pruned = sorted(a for a in artifacts if a.startswith("student_pruned"))
    if pruned and (rd / pruned[0]).exists():
        return Target("student_pruned", load_model(rd / pruned[0]), pruned[0])
    if not (rd / "student.pt").is_file():
        status = rd.stage_status("student") or "never started"
        raise RunDirError(f"run {rd.path} has nothing to export: no student.pt (student training: {status})",
                          "finish the run with `edgekd distill --resume --name NAME`, or pick another --run")
    return Target("student", load_model(rd / "student.pt"), "student.pt")


def check_writable(rd: RunDir) -> None:
    try:
        with atomic_path(rd / ".edgekd-write-check") as tmp:
            tmp.write_text("ok")
        (rd / ".edgekd-write-check").unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to {rd.path}: {e.strerror or e}",
                          "make the run directory writable, or copy it elsewhere and pass --run") from e


class ExportSession:
    """What every file of one export/quantize call shares: the run's data, references and settings."""

    def __init__(self, rd: RunDir, cfg: ExportConfig, verify: bool, log: Log):
        self.rd, self.cfg, self.verify, self.log = rd, cfg, verify, log
        self.recipe = load_run_recipe(rd)
        info_path = rd / "data.json"
        if not info_path.is_file():
            raise RunDirError(f"run {rd.path} has no data.json", "export works on run directories from `edgekd distill`")
        info = read_json(info_path)
        self.labels: list[str] = list(info["labels"])
        self.layout: str = info.get("layout", "NCHW")
        self.norm: dict[str, Any] = dict(info["normalization"])
        self.input_shape = tuple(info["input_shape"])
        try:
            with np.load(rd / "eval.npz") as ev:
                self.x = np.asarray(ev["x"], np.float32)
                self.y = np.asarray(ev["y"], np.int64)
        except FileNotFoundError as e:
            raise RunDirError(f"run {rd.path} has no eval.npz", "run `edgekd distill` again") from e
        except Exception as e:
            raise RunDirError(f"{rd / 'eval.npz'} is damaged ({type(e).__name__})", "run `edgekd distill` again") from e
        self._calib: np.ndarray | None = None
        self._refs: dict[str, np.ndarray] = {}

    # -- inputs ---------------------------------------------------------------------------------------
    def float_entry(self, layout: str | None = None) -> dict[str, Any]:
        return {"normalization": self.norm, "input": {"layout": layout or self.layout, "dtype": "float32"}}

    def normalized(self, x: np.ndarray, layout: str | None = None) -> np.ndarray:
        from edgekd.runtimes import prepare_input

        return prepare_input(x, self.float_entry(layout))

    def sample(self) -> torch.Tensor:
        return torch.from_numpy(self.normalized(self.x[:1]))

    def file_layout(self, backend: ExportBackend) -> str:
        return backend.file_layout(self.layout, self.cfg.nhwc)

    def calibration(self) -> np.ndarray:
        """Normalized NCHW/NF calibration inputs from the run's training split (loaded once)."""
        if self._calib is None:
            if self.recipe is None:
                raise RunDirError(f"run {self.rd.path} has no recipe.yaml, so its training data cannot be found "
                                  "for int8 calibration", "quantize fp16/dynamic only, or run `edgekd distill` again")
            from edgekd.data import load_data

            data = load_data(self.recipe.data, self.recipe.seed)
            n = min(self.cfg.calibration_samples, len(data.train))
            # Seeded so repeated exports calibrate on the same samples (and produce the same files).
            idx = np.sort(np.random.default_rng(self.recipe.seed).choice(len(data.train), size=n, replace=False))
            raw = np.stack([data.train.raw(int(i)) for i in idx]).astype(np.float32)
            self._calib = self.normalized(raw)
            self.log(f"calibration: {n} samples from the training split")
        return self._calib

    def reference(self, target: Target) -> np.ndarray:
        """PyTorch logits of ``target`` on the test split (the parity reference)."""
        if target.name not in self._refs:
            xn = torch.from_numpy(self.normalized(self.x))
            with torch.inference_mode():
                out = [target.model(xn[i:i + 256]).float().numpy() for i in range(0, len(xn), 256)]
            self._refs[target.name] = np.concatenate(out)
        return self._refs[target.name]

    def tidy(self, path: Path, fmt: str) -> None:
        """Give a written .onnx file its metadata_props and drop unused opset imports (see onnx_app)."""
        if fmt != "onnx":
            return
        from edgekd import __version__
        from edgekd.export.onnx import INPUT_NAME
        from edgekd.export.onnx_app import finish_onnx_file, metadata_props

        finish_onnx_file(path, metadata_props(labels=self.labels, input_name=INPUT_NAME, layout=self.layout,
                                              normalization=self.norm, output="logits", version=__version__,
                                              run=self.rd.name, image=self.layout == "NCHW"))

    # -- verification ---------------------------------------------------------------------------------
    def measure(self, path: Path, entry: dict[str, Any], target: Target) -> dict[str, Any]:
        """Run the file on the test split in its runtime and compare it with the PyTorch model."""
        return parity.compare(self.reference(target), backend_for(path).verify(path, entry, self.x), self.y)

    def divergence(self, q_path: Path, q_entry: dict[str, Any], fp32_path: Path,
                   fp32_entry: dict[str, Any]) -> parity.Divergence | None:
        """Compare a quantized file layer by layer with its fp32 file (None if that cannot be done)."""
        from edgekd.runtimes import prepare_input

        x = self.x[:_LAYER_SAMPLES]
        backend = backend_for(q_path)
        try:
            ref = backend.layer_outputs(fp32_path, prepare_input(x, fp32_entry))
            q = backend.layer_outputs(q_path, prepare_input(x, q_entry))
            if ref is None or q is None:
                return None
            return parity.first_divergence(ref, q, channel_axis=backend.channel_axis)
        except EdgeKDError:
            raise
        except Exception as e:  # diagnosis must never hide the verification result itself
            self.log(f"  (layer-by-layer comparison unavailable: {type(e).__name__}: {str(e)[:120]})")
            return None


def _fmt_size(n: int) -> str:
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _numbers_line(precision: str, numbers: dict[str, Any]) -> str:
    if precision == "fp32":
        return f"parity {numbers['parity']:.1e} (max|diff|/max|logit|), accuracy {numbers['test_accuracy']:.4f}"
    return (f"accuracy {numbers['test_accuracy']:.4f} (PyTorch {numbers['reference_accuracy']:.4f}), "
            f"agreement {100 * numbers['agreement']:.2f}%, parity {numbers['parity']:.1e}")


class Exporter:
    def __init__(self, session: ExportSession, report: ExportReport):
        self.s = session
        self.r = report
        self.entries: list[dict[str, Any]] = []

    def finish_file(self, path: Path, entry: dict[str, Any], target: Target, precision: str,
                    numbers: dict[str, Any] | None, problem: str | None, extra: dict[str, Any]) -> None:
        s = self.s
        entry["verified"] = None if numbers is None else problem is None
        self.entries.append(entry)
        self.r.files.append(path.name)
        metrics = {"model": target.name, "format": entry["format"], "precision": precision,
                   "size_bytes": entry["size_bytes"], "route": entry["route"], "verified": entry["verified"]}
        if numbers is not None:
            metrics.update(numbers)
        metrics.update(extra)
        # Replace the file's whole entry: numbers of an earlier export of the same file must not linger.
        all_metrics = s.rd.metrics()
        all_metrics[path.name] = metrics
        write_json_atomic(s.rd / METRICS, all_metrics)
        status = "not verified" if numbers is None else ("ok" if problem is None else "FAILED")
        detail = "" if numbers is None else "  " + _numbers_line(precision, numbers)
        s.log(f"{path.name:28s} {_fmt_size(entry['size_bytes']):>9s}{detail}  {status} [{entry['route']}]")
        if problem:
            s.log(f"  {problem}")
            if "divergence" in extra and extra["divergence"]:
                s.log(f"  {extra['divergence']['description']}")

    def export_fp32(self, target: Target, fmt: str) -> bool:
        """Write and verify ``<target>_fp32<suffix>`` of format ``fmt``; return whether a file was written."""
        s = self.s
        backend = get_backend(fmt)
        path = s.rd / f"{target.name}_fp32{backend.suffix}"
        layout = s.file_layout(backend)
        try:
            route = backend.export(target.model, s.sample(), path, layout=layout, what=target.name)
            s.tidy(path, fmt)
            entry = meta_mod.build_entry(path, target.name, "fp32", layout, s.norm, s.labels, route)
            numbers = s.measure(path, entry, target) if s.verify else None
        except ExportError as e:
            self.r.failures.append(str(e))
            s.log(f"{path.name:28s} not written: {e}")
            _remove(path)
            return False
        problem = parity.problem(numbers, "fp32", s.cfg.tolerance) if numbers else None
        if problem:
            self.r.problems.append(f"{path.name}: {problem}")
        self.finish_file(path, entry, target, "fp32", numbers, problem, {})
        return True

    def quantize(self, target: Target, fmt: str, precision: str, fp32_entry: dict[str, Any]) -> None:
        """Write and verify ``<target>_<precision>.<fmt>`` from the fp32 file (falling back between routes)."""
        s = self.s
        backend = get_backend(fmt)
        fp32_path = s.rd / fp32_entry["file"]
        path = s.rd / f"{target.name}_{precision}{backend.suffix}"
        layout = fp32_entry["input"]["layout"]
        try:
            routes = list(backend.routes_for(precision))
        except ExportError as e:  # a format without this precision: the other files are still written
            self.r.failures.append(str(e))
            s.log(f"{path.name:28s} not written: {e}")
            return
        calib = s.calibration() if precision == "int8" else None
        job = QuantizeJob(target.model, s.sample(), fp32_path, path, precision, layout, calib, s.cfg, target.name)
        attempts: list[str] = []
        best: tuple[tuple, bytes, dict[str, Any], dict[str, Any] | None, str | None] | None = None
        for route in routes:
            try:
                route_name = backend.quantize(route, job)
                s.tidy(path, fmt)
                entry = meta_mod.build_entry(path, target.name, precision, layout, s.norm, s.labels, route_name)
                numbers = s.measure(path, entry, target) if s.verify else None
            except ExportError as e:
                attempts.append(f"{route}: {e}" if len(routes) > 1 else str(e))
                if len(routes) > 1:
                    s.log(f"  {path.name}: route {route} failed: {e}")
                continue
            problem = parity.problem(numbers, precision, s.cfg.tolerance) if numbers else None
            rank = (problem is None, numbers["agreement"] if numbers else 0.0)
            if best is None or rank > best[0]:
                best = (rank, path.read_bytes(), entry, numbers, problem)
            if problem is None:
                break
            attempts.append(f"{entry['route']}: {problem}")
            s.log(f"  {path.name}: route {entry['route']} misses the tolerance ({problem})"
                  + ("; trying the next route" if route != routes[-1] else ""))
        if best is None:
            _remove(path)
            self.r.failures.append("; ".join(attempts))
            s.log(f"{path.name:28s} not written: {'; '.join(attempts)}")
            return
        _, data, entry, numbers, problem = best
        if path.read_bytes() != data:  # a later route did worse: put the better file back
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            entry = meta_mod.build_entry(path, target.name, precision, layout, s.norm, s.labels, entry["route"])
        others = [a for a in attempts if not a.startswith(entry["route"] + ":")]
        if others:  # what the other routes did, so a reader sees why this route's file was kept
            entry["routes_tried"] = others
        extra: dict[str, Any] = {}
        if problem:
            div = s.divergence(path, entry, fp32_path, fp32_entry)
            if div is not None:
                extra["divergence"] = {**div.as_dict(), "description": div.describe()}
            where = f"; {div.describe()}" if div is not None else ""
            self.r.problems.append(f"{path.name}: {problem}{where}")
        self.finish_file(path, entry, target, precision, numbers, problem, extra)
    def export_mcu(self, target: Target) -> None:
        """Write ``<target>_mcu.tflite`` and the firmware sources from the int8 TFLite file just written."""
        from edgekd.export.mcu import export_mcu

        s = self.s
        int8 = next((e for e in self.entries if e["file"] == f"{target.name}_int8.tflite"), None)
        try:
            entry, metrics = export_mcu(s.rd.path, int8, s.cfg.mcu_io, s.x, s.y, s.rd.name)
        except CheckFailed as e:
            self.r.problems.append(str(e))
            s.log(f"{target.name}_mcu.tflite: {e}")
            return
        except ExportError as e:
            self.r.failures.append(str(e))
            s.log(f"{target.name}_mcu.tflite not written: {e}")
            return
        self.entries.append(entry)
        self.r.files.extend([entry["file"], *entry["mcu"]["firmware"]])
        all_metrics = s.rd.metrics()
        all_metrics[entry["file"]] = metrics
        write_json_atomic(s.rd / METRICS, all_metrics)
        m = entry["mcu"]
        s.log(f"{entry['file']:28s} {_fmt_size(entry['size_bytes']):>9s}  TFLM accuracy {m['tflm_accuracy']:.4f} "
              f"(LiteRT {m['litert_accuracy']:.4f}), arena {m['arena_min_bytes']} B "
              f"(firmware {m['arena_firmware_bytes']} B)  ok [{entry['route']}]")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def merge_export_config(rd: RunDir, recipe: Recipe | None, cfg: ExportConfig | None, **overrides: Any) -> ExportConfig:
    """Export settings: ``cfg`` or the run recipe's ``export`` section or the defaults, then overrides.

    Raises:
        RecipeError: A setting is invalid.
        ExportError: A format is not a registered export backend.
    """
    base = cfg or (recipe.export if recipe is not None and recipe.export is not None else ExportConfig())
    data = base.model_dump()
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    try:
        merged = ExportConfig.model_validate(data)
    except Exception as e:  # pydantic's message is long; keep the first line
        raise RecipeError(f"invalid export settings: {str(e).splitlines()[0]} {str(e).splitlines()[-1].strip()}") from e
    check_formats(merged.formats)
    return merged


def check_formats(formats: list[str]) -> None:
    """Check that every format is a registered export backend (``edgekd.export.list_backends()``).

    Raises:
        ExportError: An unknown format, with the closest registered name as hint.
    """
    for name in formats:
        if name not in DERIVED_FORMATS:
            get_backend(name)


def _record(rd: RunDir, stage: str, report: ExportReport, session: ExportSession, entries: list[dict[str, Any]],
            t0: float, error: str | None = None) -> None:
    meta_mod.write_metadata(rd, entries, session.labels, session.norm)
    if not (rd / "labels.txt").is_file():
        write_text_atomic(rd / "labels.txt", "\n".join(session.labels) + "\n")
    files = list(dict.fromkeys(report.files))
    rd.record_artifacts(*files, meta_mod.METADATA, "labels.txt")
    status = "done" if report.ok and error is None else "failed"
    info: dict[str, Any] = {"failures": report.failures, "problems": report.problems}
    if error:
        info["error"] = error
    rd.stage_done(stage, status=status, seconds=round(time.perf_counter() - t0, 2),
                  artifacts=files + [meta_mod.METADATA], **info)


def run_and_record(work: Callable[[], None], rd: RunDir, stage: str, report: ExportReport, session: ExportSession,
                   exporter: "Exporter", t0: float) -> None:
    """Run the stage; whatever happens, describe the files it did write in metadata.json and the manifest."""
    error: EdgeKDError | None = None
    try:
        work()
    except EdgeKDError as e:
        error = e
    except OSError as e:
        error = RunDirError(f"cannot write to {rd.path}: {e.strerror or e}",
                            "check free space and permissions of the run directory")
    try:
        _record(rd, stage, report, session, exporter.entries, t0, None if error is None else str(error))
    except OSError:
        if error is None:
            raise
    if error is not None:
        raise error


def run_export(run: str | os.PathLike | RunDir | None = None, out: str | os.PathLike = "exported", *,
               formats: list[str] | None = None, quantize: list[str] | str | None = None,
               nhwc: bool | None = None, int8_io: str | None = None, calibration_method: str | None = None,
               teacher: bool | None = None, verify: bool = True, log: Log | None = None,
               cfg: ExportConfig | None = None, quiet: bool = True, check: bool = False,
               app: bool | None = None, ort: bool | None = None) -> ExportReport:
    """Export the run's best student (and the teacher, fp32) to ONNX/TFLite, quantize, verify, describe.

    Args:
        run: Run directory (default: the most recent run in ``out``).
        out: Where runs live (for the default run).
        formats: ``onnx`` and/or ``tflite`` (default: ``export.formats`` of the run's recipe).
        quantize: Extra precisions for the student: ``fp16``, ``int8``, ``dynamic`` (default: recipe).
        nhwc: Channels-last input for TFLite files.
        int8_io: ``float32``, ``int8`` or ``uint8`` inputs/outputs of full-integer TFLite files.
        calibration_method: ONNX Runtime calibration: ``minmax``, ``entropy`` or ``percentile``.
        teacher: Also export the teacher in fp32.
        verify: Run every file on the test split and check it against the tolerance.
        log: Receives one progress line per file (default: silent unless ``quiet`` is False).
        cfg: Export settings to start from instead of the run recipe's ``export`` section.
        quiet: With no ``log``, False prints the progress lines.
        check: Raise (after writing and recording every file that could be written) when a conversion
            failed (:class:`ExportError`) or a file misses the tolerance (:class:`CheckFailed`).
        app: Write app-profile .tflite files (default: ``export.app.enabled``, on for image runs); True for a
            run without images is an error.
        ort: Also write .ort files for ONNX Runtime Mobile (default: ``export.ort``).

    Returns:
        The report: the files written, failed conversions and files that miss the tolerance. Without
        ``check``, call :meth:`ExportReport.raise_for_problems` to turn those into errors (the CLI does).
    """
    from edgekd.run_dir import resolve_run

    log = log or (print if not quiet else (lambda _msg: None))
    precisions = parse_precisions(quantize, "--quantize") if quantize is not None else None
    if formats is not None:
        check_formats(formats)
        if not formats:
            raise ExportError("no format selected", "pass --format NAME, or --onnx and/or --tflite")
    rd = run if isinstance(run, RunDir) else resolve_run(run, out)
    cfg = merge_export_config(rd, load_run_recipe(rd), cfg, formats=formats, quantize=precisions, nhwc=nhwc,
                              int8_io=int8_io, calibration_method=calibration_method, teacher=teacher, ort=ort)
    if app is not None:
        cfg = cfg.model_copy(update={"app": cfg.app.model_copy(update={"enabled": app})})
    targets = _export_targets(rd, cfg, log)
    check_writable(rd)
    session = ExportSession(rd, cfg, verify, log)
    plan = _app_plan(session, cfg)  # bad app settings fail here, before anything is written
    if cfg.nhwc and session.layout != "NCHW":
        log(f"--nhwc ignored: the inputs are {session.layout}, not images")
    t0 = time.perf_counter()
    rd.stage_started("export")
    report = ExportReport(run=str(rd.path))
    exporter = Exporter(session, report)
    def work() -> None:
        _export_all(exporter, cfg, targets)
        if plan is not None:
            _export_app(session, exporter, targets[0], plan)
        if cfg.ort:
            _export_ort(session, exporter, targets[0])

    run_and_record(work, rd, "export", report, session, exporter, t0)
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
    pruned = [a for a in rd.manifest().get("artifacts", {}) if a.startswith("student_pruned")]
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


def _export_all(exporter: "Exporter", cfg: ExportConfig, targets: list[Target]) -> None:
    """Every format: the fp32 file of each target, then the quantized files of the student."""
    for fmt in cfg.formats:
        if fmt in DERIVED_FORMATS:
            continue
        for target in targets:
            written = exporter.export_fp32(target, fmt)
            if not written or target.name == "teacher":
                continue
            fp32_entry = exporter.entries[-1]
            for precision in cfg.quantize:
                exporter.quantize(target, fmt, precision, fp32_entry)
    if "mcu" in cfg.formats:  # made from the student's int8 TFLite file written above
        student = next(t for t in targets if t.name != "teacher")
        exporter.export_mcu(student)
    if cfg.max_drop is not None:
        _export_mixed(exporter, cfg, targets[0])


def _export_mixed(exporter: "Exporter", cfg: ExportConfig, student: Target) -> None:
    """``export.max_drop``: the student's mixed-precision files, from its fp32 files of formats that have them."""
    from edgekd.export.mixed import MCU_NOTE, run_mixed
    from edgekd.quant.selective import SELECTIVE_ROUTES

    fp32 = [e for e in exporter.entries if e["model"] == student.name and e["precision"] == "fp32"]
    chosen = [e for e in fp32 if e["format"] in SELECTIVE_ROUTES]
    for e in fp32:
        if e["format"] not in SELECTIVE_ROUTES:
            exporter.s.log(f"{e['file']}: {e['format']} has no mixed-precision route (export.max_drop skips it)")
    if "mcu" in cfg.formats:
        exporter.s.log(MCU_NOTE)
    if chosen:
        lines = run_mixed(exporter.s, exporter, chosen, lambda _model: student, sensitivity=False,
                          max_drop=cfg.max_drop)
        exporter.r.extra.setdefault("sensitivity", []).extend(lines)


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
    from edgekd.export.mixed import MCU_NOTE, mixed_entries, run_mixed
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
    chosen = _fp32_files(rd, files)
    mixed = mixed_entries(chosen, files) if flags or budget is not None else []
    check_writable(rd)
    session = ExportSession(rd, cfg, verify, log)
    targets: dict[str, Target] = {}
    t0 = time.perf_counter()
    rd.stage_started("quantize")
    report = ExportReport(run=str(rd.path))
    exporter = Exporter(session, report)

    def work() -> None:
        for e in chosen:
            for precision in todo:
                exporter.quantize(target(e["model"]), e["format"], precision, e)
        if mixed:
            if budget is not None and "mcu" in cfg.formats:
                log(MCU_NOTE)
            report.extra["sensitivity"] = run_mixed(session, exporter, mixed, target, sensitivity=sensitivity,
                                                    max_drop=budget)

    def target(model: str) -> Target:
        if model not in targets:
            targets[model] = _target_for(rd, model)
        return targets[model]

    run_and_record(work, rd, "quantize", report, session, exporter, t0)
    if check:
        report.raise_for_problems()
    return report


def _fp32_files(rd: RunDir, files: list[str] | None) -> list[dict[str, Any]]:
    """The metadata entries of the fp32 files to quantize (``files``, else every student one), each checked
    to be present and unchanged since export."""
    meta = meta_mod.read_metadata(rd)
    # App-profile files are quantized by `edgekd export` from the wrapped model (pixel calibration), not here.
    fp32 = [e for e in meta["models"] if e.get("precision") == "fp32" and e.get("profile", "research") == "research"]
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


def _app_plan(session: ExportSession, cfg: ExportConfig) -> tuple[Any, list[str]] | None:
    """The app spec and labels when app-profile files are to be written (None: not asked, or not images).

    Raises:
        ExportError: The app profile was asked for a non-image run, with int8 I/O, or with a labels file
            whose count differs from the classes.
    """
    from edgekd.export.app_profile import app_spec, check_app_io, read_labels_file

    app_cfg = cfg.app
    if app_cfg.enabled is False:
        return None
    spec = app_spec(session.layout, session.input_shape, session.norm, app_cfg.output, asked=app_cfg.enabled is True)
    if spec is None:
        return None
    check_app_io(app_cfg.int8_io)
    labels = read_labels_file(app_cfg.labels, len(session.labels)) if app_cfg.labels else list(session.labels)
    if "tflite" not in cfg.formats:
        session.log("app-profile files are .tflite files: not written (TFLite is not among the formats)")
        return None
    return spec, labels


def _export_app(session: ExportSession, exporter: Exporter, target: Target, plan: tuple[Any, list[str]]) -> None:
    """Write the app-profile .tflite files of the student and merge their records into the export's."""
    from edgekd.export.app_files import AppJob, export_app_files

    spec, labels = plan
    s = session
    job = AppJob(rd_path=s.rd.path, run=s.rd.name, model_name=target.name, model=target.model, spec=spec,
                 labels=labels, x=s.x, y=s.y, calibration=s.calibration, precisions=list(s.cfg.quantize),
                 int8_io=s.cfg.app.int8_io, tolerance=s.cfg.tolerance, verify=s.verify, log=s.log)
    result = export_app_files(job)
    exporter.entries.extend(result.entries)
    exporter.r.files.extend(result.files)
    exporter.r.failures.extend(result.failures)
    exporter.r.problems.extend(result.problems)
    if result.metrics:
        all_metrics = s.rd.metrics()
        all_metrics.update(result.metrics)
        write_json_atomic(s.rd / METRICS, all_metrics)


def _export_ort(session: ExportSession, exporter: Exporter, target: Target) -> None:
    """Convert the student's .onnx files to .ort (ONNX Runtime Mobile) and verify each like its .onnx."""
    from edgekd.export.onnx_app import ORT_CONFIG, convert_to_ort

    s = session
    sources = [e for e in exporter.entries if e["format"] == "onnx" and e["model"] == target.name]
    if not sources:
        return
    try:
        outs, _config = convert_to_ort([s.rd / e["file"] for e in sources], s.rd.path)
    except ExportError as e:
        exporter.r.failures.append(str(e))
        s.log(f".ort files not written: {e}")
        return
    for src, path in zip(sources, outs):
        entry = {**src, "file": path.name, "format": "ort", "size_bytes": path.stat().st_size,
                 "sha256": sha256_file(path), "route": "onnxruntime-ort", "source": src["file"],
                 "ort_config": ORT_CONFIG}
        # .ort files run in the same onnxruntime sessions as the .onnx files: the onnx backend verifies them.
        numbers = None
        if s.verify:
            out = get_backend("onnx").verify(path, entry, s.x)
            numbers = parity.compare(s.reference(target), out, s.y)
        problem = parity.problem(numbers, src["precision"], s.cfg.tolerance) if numbers else None
        src_acc = s.rd.metrics().get(src["file"], {}).get("test_accuracy")
        if numbers and src_acc is not None and numbers["test_accuracy"] != src_acc:
            problem = f"accuracy {numbers['test_accuracy']:.4f} differs from {src['file']}'s {src_acc:.4f}"
        if problem:
            exporter.r.problems.append(f"{path.name}: {problem}")
        exporter.finish_file(path, entry, target, src["precision"], numbers, problem, {"source": src["file"]})
    exporter.r.files.append(ORT_CONFIG)


def _target_for(rd: RunDir, model: str) -> Target:
    if model in ("student", "student_pruned"):
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
        rows.append([e["file"], _fmt_size(e["size_bytes"]), "-" if acc is None else f"{acc:.4f}",
                     "-" if agree is None else f"{100 * agree:.2f}%", "-" if par is None else f"{par:.1e}", verified])
    text = table(["file", "size", "accuracy", "agreement", "parity", "verified"], rows)
    lines = [text]
    for fmt in list_backends():
        teacher_file = f"teacher_fp32{get_backend(fmt).suffix}"
        t = metrics.get(teacher_file)
        students = [e for e in meta["models"] if e["format"] == fmt and e["precision"] == "int8"
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
