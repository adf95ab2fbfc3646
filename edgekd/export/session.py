"""What every file of one export, quantize or QAT call shares: the run's data and references (``ExportSession``),
and the writer that exports, quantizes, derives, verifies and records files through the backends
(``FileWriter``, the context each backend's ``build`` works with).

Imported by the export pipeline and the QAT stage alike; it names no format: every format-specific step is
asked of a backend (:mod:`edgekd.export.backends`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from edgekd.errors import CheckFailed, EdgeKDError, ExportError, RecipeError, RunDirError
from edgekd.export import metadata as meta_mod
from edgekd.export import parity
from edgekd.export.backends import (PRECISIONS, ExportBackend, QuantizeJob, backend_for, get_backend,
                                    resolve_plan, variant_builder)
from edgekd.models import load_model
from edgekd.recipe import ExportConfig, Recipe
from edgekd.results import ExportReport
from edgekd.run_dir import (METRICS, PRUNED_STUDENT, RunDir, atomic_path, read_json, write_json_atomic,
                            write_text_atomic)

QUANT_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp32")
# Samples run through both files when looking for the first diverging layer (every tensor is kept).
_LAYER_SAMPLES = 32

Log = Callable[[str], None]


@dataclass
class Target:
    """A PyTorch model of the run that gets exported."""

    name: str  # file stem: student, student_pruned, teacher
    model: nn.Module
    checkpoint: str  # file in the run directory it was loaded from

    @property
    def is_student(self) -> bool:
        return self.name != "teacher"


def load_run_recipe(rd: RunDir) -> Recipe | None:
    from edgekd.recipe import read_yaml, validate_recipe

    path = rd / "recipe.yaml"
    if not path.is_file():
        return None
    return validate_recipe(read_yaml(path), source=str(path))


def student_target(rd: RunDir) -> Target:
    """The best student of the run: the pruned one if the run has it, else the distilled one."""
    artifacts = rd.manifest().get("artifacts", {})
    pruned = sorted(a for a in artifacts if a.startswith(PRUNED_STUDENT))
    if pruned and (rd / pruned[0]).exists():
        return Target(PRUNED_STUDENT, load_model(rd / pruned[0]), pruned[0])
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
    check_formats(merged.formats, merged, installed=False)
    return merged


def check_formats(formats: list[str], cfg: ExportConfig | None = None, installed: bool = True) -> list[ExportBackend]:
    """Check the requested formats and the export section before anything is trained or written.

    Every name must be a registered backend (closest name suggested), every ``export.<name>`` section must
    name a backend and validate against its settings, the plan must give each derived backend its source
    (``mcu`` needs int8), and (``installed``) each backend's libraries must be installed.

    Returns:
        The plan: the backends in the order they run (sources first).

    Raises:
        ExportError: An unknown format, a missing source, or a backend whose libraries are missing.
        RecipeError: An unknown section or setting under ``export``.
    """
    cfg = cfg or ExportConfig(formats=list(formats))
    plan = resolve_plan(list(formats), list(cfg.quantize))
    for name, section in cfg.backend_sections().items():
        get_backend(name).settings(section)  # an unknown backend name raises with the closest one
    for backend in plan if installed else []:
        backend.check_available()
    return plan


class ExportSession:
    """What every file of one export/quantize/QAT call shares: the run's data, references and settings."""

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
        self._refs: dict[tuple[str, int], np.ndarray] = {}
        self._variants: dict[tuple[str, str], nn.Module | None] = {}

    # -- settings and inputs --------------------------------------------------------------------------
    def settings(self, backend: ExportBackend) -> BaseModel:
        """The backend's settings from ``export.<name>``."""
        return backend.settings(self.cfg.backend_sections().get(backend.name))

    def float_entry(self, layout: str | None = None) -> dict[str, Any]:
        return {"normalization": self.norm, "input": {"layout": layout or self.layout, "dtype": "float32"}}

    def normalized(self, x: np.ndarray, layout: str | None = None) -> np.ndarray:
        from edgekd.runtimes import prepare_input

        return prepare_input(x, self.float_entry(layout))

    def sample(self) -> torch.Tensor:
        return torch.from_numpy(self.normalized(self.x[:1]))

    def file_layout(self, backend: ExportBackend) -> str:
        return backend.file_layout(self.layout, self.settings(backend))

    def variant(self, target: Target, name: str) -> nn.Module | None:
        """The model variant ``name`` of ``target``, built once per call (None: the run has no such variant)."""
        key = (target.name, name)
        if key not in self._variants:
            self._variants[key] = variant_builder(name)(target.model, self)
        return self._variants[key]

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
        key = (target.name, id(target.model))
        if key not in self._refs:
            xn = torch.from_numpy(self.normalized(self.x))
            with torch.inference_mode():
                out = [target.model(xn[i:i + 256]).float().numpy() for i in range(0, len(xn), 256)]
            self._refs[key] = np.concatenate(out)
        return self._refs[key]

    # -- verification ---------------------------------------------------------------------------------
    def measure(self, path: Path, entry: dict[str, Any], target: Target) -> dict[str, Any]:
        """Run the file on the test split in its runtime and compare it with the PyTorch model."""
        return parity.compare(self.reference(target), backend_for(path, entry).verify(path, entry, self.x), self.y)

    def divergence(self, q_path: Path, q_entry: dict[str, Any], fp32_path: Path,
                   fp32_entry: dict[str, Any]) -> parity.Divergence | None:
        """Compare a quantized file layer by layer with its fp32 file (None if that cannot be done)."""
        from edgekd.runtimes import prepare_input

        x = self.x[:_LAYER_SAMPLES]
        backend = backend_for(q_path, q_entry)
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


def fmt_size(n: int) -> str:
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _numbers_line(precision: str, numbers: dict[str, Any]) -> str:
    if precision == "fp32":
        return f"parity {numbers['parity']:.1e} (max|diff|/max|logit|), accuracy {numbers['test_accuracy']:.4f}"
    return (f"accuracy {numbers['test_accuracy']:.4f} (PyTorch {numbers['reference_accuracy']:.4f}), "
            f"agreement {100 * numbers['agreement']:.2f}%, parity {numbers['parity']:.1e}")


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class FileWriter:
    """Exports, quantizes, derives, verifies and records files for one call: the context of backend steps.

    Args:
        session: The run's data and settings.
        report: Collects the files written, the failed conversions and the files that miss the tolerance.
        precisions: Quantized precisions each model backend writes for the student.
    """

    def __init__(self, session: ExportSession, report: ExportReport, precisions: list[str] | None = None):
        self.session = session
        self.report = report
        self.precisions = list(session.cfg.quantize if precisions is None else precisions)
        self.entries: list[dict[str, Any]] = []

    # -- recording ------------------------------------------------------------------------------------
    def fail(self, name: str, error: EdgeKDError) -> None:
        """Record a file that could not be written (the other files are still written)."""
        self.report.failures.append(str(error))
        self.session.log(f"{name:28s} not written: {error}")

    def record(self, entry: dict[str, Any], metrics: dict[str, Any], files: list[str] | None = None) -> None:
        """Add a finished file's metadata entry, and replace its whole metrics.json entry."""
        s = self.session
        self.entries.append(entry)
        self.report.files.extend(files or [entry["file"]])
        all_metrics = s.rd.metrics()
        all_metrics[entry["file"]] = metrics  # numbers of an earlier export of the same file must not linger
        write_json_atomic(s.rd / METRICS, all_metrics)

    def finish_file(self, path: Path, entry: dict[str, Any], target: Target, precision: str,
                    numbers: dict[str, Any] | None, problem: str | None, extra: dict[str, Any]) -> None:
        s = self.session
        entry["verified"] = None if numbers is None else problem is None
        metrics = {"model": target.name, "backend": entry.get("backend"), "format": entry["format"],
                   "precision": precision, "size_bytes": entry["size_bytes"], "route": entry["route"],
                   "verified": entry["verified"], **(numbers or {}), **extra}
        if problem:
            self.report.problems.append(f"{path.name}: {problem}{extra.get('_where', '')}")
        metrics.pop("_where", None)
        self.record(entry, metrics)
        status = "not verified" if numbers is None else ("ok" if problem is None else "FAILED")
        detail = "" if numbers is None else "  " + _numbers_line(precision, numbers)
        s.log(f"{path.name:28s} {fmt_size(entry['size_bytes']):>9s}{detail}  {status} [{entry['route']}]")
        if problem:
            s.log(f"  {problem}")
            if extra.get("divergence"):
                s.log(f"  {extra['divergence']['description']}")

    def entry(self, backend: ExportBackend, path: Path, target: Target, precision: str, layout: str,
              route: str, **extra: Any) -> dict[str, Any]:
        s = self.session
        return meta_mod.build_entry(path, target.name, precision, layout, s.norm, s.labels, route,
                                    backend=backend, **extra)

    def verified(self, backend: ExportBackend, path: Path, target: Target, precision: str, layout: str,
                 route: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The file's metadata entry and (when verifying) its numbers against ``target``'s PyTorch model."""
        backend.finalize(path, self.session)
        entry = self.entry(backend, path, target, precision, layout, route)
        return entry, (self.session.measure(path, entry, target) if self.session.verify else None)

    # -- the steps backends use -------------------------------------------------------------------------
    def export_fp32(self, target: Target, backend: ExportBackend) -> dict[str, Any] | None:
        """Write and verify the fp32 file of ``target``'s variant; return its entry (None: not written)."""
        s = self.session
        path = s.rd / backend.file_name(target.name, "fp32")
        layout = s.file_layout(backend)
        model = s.variant(target, backend.variant)
        if model is None:
            return None
        try:
            route = backend.export(model, s.sample(), path, layout=layout, what=target.name)
            entry, numbers = self.verified(backend, path, target, "fp32", layout, route)
        except ExportError as e:
            _remove(path)
            self.fail(path.name, e)
            return None
        problem = parity.problem(numbers, "fp32", s.cfg.tolerance) if numbers else None
        self.finish_file(path, entry, target, "fp32", numbers, problem, {})
        return entry

    def quantize(self, target: Target, backend: ExportBackend, precision: str, fp32_entry: dict[str, Any]) -> None:
        """Write and verify ``target``'s file at ``precision`` from its fp32 file (falling back between routes)."""
        s = self.session
        fp32_path = s.rd / fp32_entry["file"]
        path = s.rd / backend.file_name(target.name, precision)
        layout = fp32_entry["input"]["layout"]
        try:
            routes = list(backend.routes_for(precision))
        except ExportError as e:  # a backend without this precision: the other files are still written
            self.fail(path.name, e)
            return
        calib = s.calibration() if precision == "int8" else None
        job = QuantizeJob(s.variant(target, backend.variant), s.sample(), fp32_path, path, precision, layout, calib,
                          s.settings(backend), target.name)
        best, attempts = self._try_routes(backend, target, job, routes)
        if best is None:
            _remove(path)
            self.report.failures.append("; ".join(attempts))
            s.log(f"{path.name:28s} not written: {'; '.join(attempts)}")
            return
        _, data, entry, numbers, problem = best
        if path.read_bytes() != data:  # a later route did worse: put the better file back
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            entry = self.entry(backend, path, target, precision, layout, entry["route"])
        others = [a for a in attempts if not a.startswith(entry["route"] + ":")]
        if others:  # what the other routes did, so a reader sees why this route's file was kept
            entry["routes_tried"] = others
        if precision in ("int8", "dynamic") and getattr(job.settings, "int8_weights", None):
            entry["int8_weights"] = job.settings.int8_weights
        extra: dict[str, Any] = {}
        if problem:
            div = s.divergence(path, entry, fp32_path, fp32_entry)
            if div is not None:
                extra["divergence"] = {**div.as_dict(), "description": div.describe()}
                extra["_where"] = f"; {div.describe()}"
        self.finish_file(path, entry, target, precision, numbers, problem, extra)

    def _try_routes(self, backend: ExportBackend, target: Target, job: QuantizeJob,
                    routes: list[str]) -> tuple[tuple | None, list[str]]:
        """Each route in turn until one meets the tolerance; the best file seen and what the others did."""
        s = self.session
        attempts: list[str] = []
        best = None
        for route in routes:
            try:
                route_name = backend.quantize(route, job)
                entry, numbers = self.verified(backend, job.path, target, job.precision, job.layout, route_name)
            except ExportError as e:
                attempts.append(f"{route}: {e}" if len(routes) > 1 else str(e))
                if len(routes) > 1:
                    s.log(f"  {job.path.name}: route {route} failed: {e}")
                continue
            problem = parity.problem(numbers, job.precision, s.cfg.tolerance) if numbers else None
            rank = (problem is None, numbers["agreement"] if numbers else 0.0)
            if best is None or rank > best[0]:
                best = (rank, job.path.read_bytes(), entry, numbers, problem)
            if problem is None:
                break
            attempts.append(f"{entry['route']}: {problem}")
            s.log(f"  {job.path.name}: route {entry['route']} misses the tolerance ({problem})"
                  + ("; trying the next route" if route != routes[-1] else ""))
        return best, attempts

    def write_qat(self, target: Target, backend: ExportBackend, qat_model: nn.Module, info: dict[str, Any]) -> None:
        """Write and verify ``<target>_int8_qat<suffix>`` by the backend's QAT route, against the QAT model."""
        s = self.session
        path = s.rd / backend.file_name(target.name, "int8", qat=True)
        layout = s.file_layout(backend)
        try:
            route = backend.write_qat(qat_model, s.sample(), path, layout=layout, settings=s.settings(backend),
                                      what=target.name)
            entry, numbers = self.verified(backend, path, target, "int8", layout, route)
        except ExportError as e:
            _remove(path)
            self.fail(path.name, e)
            return
        problem = parity.problem(numbers, "int8", s.cfg.tolerance) if numbers else None
        self.finish_file(path, entry, target, "int8", numbers, problem, dict(info))

    def source_entries(self, backend: ExportBackend, target: Target) -> list[dict[str, Any]]:
        """The entries written in this call that ``backend`` is made from (its source backend and precision)."""
        src, precision = backend.source
        return [e for e in self.entries if e.get("backend") == src and e["model"] == target.name
                and (precision is None or e["precision"] == precision)]

    def derive(self, backend: ExportBackend, target: Target, source_entry: dict[str, Any]) -> None:
        """Make ``backend``'s file from a source file, verify it and record it."""
        s = self.session
        src_path = s.rd / source_entry["file"]
        path = s.rd / backend.file_name(target.name, source_entry["precision"])
        try:
            made = backend.derive(src_path, source_entry, path, self)
        except CheckFailed as e:
            self.report.problems.append(str(e))
            s.log(f"{path.name}: {e}")
            return
        except ExportError as e:
            _remove(path)
            self.fail(path.name, e)
            return
        entry = made.entry
        if made.companions:  # metadata.json says what travels with the file (edgekd bundle copies them)
            entry["companions"] = list(made.companions)
        if made.numbers is not None:  # the backend verified the file itself (in its own runtime)
            entry["verified"] = True
            self.record(entry, made.numbers, [entry["file"], *(made.companions or [])])
            s.log(made.log or f"{entry['file']:28s} {fmt_size(entry['size_bytes']):>9s}  ok [{entry['route']}]")
            return
        numbers = s.measure(path, entry, target) if s.verify else None
        problem = parity.problem(numbers, entry["precision"], s.cfg.tolerance) if numbers else None
        src_acc = s.rd.metrics().get(source_entry["file"], {}).get("test_accuracy")
        if numbers and src_acc is not None and numbers["test_accuracy"] != src_acc:
            problem = f"accuracy {numbers['test_accuracy']:.4f} differs from {source_entry['file']}'s {src_acc:.4f}"
        self.finish_file(path, entry, target, entry["precision"], numbers, problem, {"source": source_entry["file"]})
        self.report.files.extend(made.companions or [])

    def build(self, plan: list[ExportBackend], targets: list[Target]) -> None:
        """Every backend of the plan, in order, for every model it takes (the teacher only where it has one)."""
        for backend in plan:
            for target in targets:
                if target.is_student or backend.teacher:
                    backend.build(self, target)


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
                   writer: FileWriter, t0: float) -> None:
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
        _record(rd, stage, report, session, writer.entries, t0, None if error is None else str(error))
    except OSError:
        if error is None:
            raise
    if error is not None:
        raise error
