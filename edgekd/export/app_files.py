"""Write, verify and describe the app-profile ``.tflite`` files of a run's student.

Called by ``edgekd export`` after the research files: one ``<model>_app_<precision>.tflite`` per precision
(fp32 and the quantized ones the recipe asks for). Each file is

1. converted from :class:`~edgekd.export.app_profile.AppModel` (pixels in, probabilities or logits out),
2. given pixel uint8 I/O (int8) and TFLite Model Metadata with the labels,
3. checked against the PyTorch wrapper on the test split (the same parity ladder as every file), and
4. classified in MediaPipe's ``ImageClassifier`` from RGB uint8 images: its accuracy must equal LiteRT's on
   the same file and images (skipped, and said so, when MediaPipe is not installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgekd import __version__
from edgekd.errors import CheckFailed, ExportError
from edgekd.export import metadata as meta_mod
from edgekd.export import parity
from edgekd.export.app_profile import (APP_TAG, AppModel, AppSpec, app_file_name, app_spec, check_app_io,
                                       pixel_calibration, read_labels_file, to_pixels)
from edgekd.export.backends import MIXED, register_backend, register_variant
from edgekd.export.common import PIXEL_SCALE
from edgekd.export.tflite import TFLiteBackend
from edgekd.export.app_tflite import (check_in_mediapipe, classifier_info, finish_app_file, mediapipe_available,
                                      plain_copy)

Log = Callable[[str], None]


@dataclass
class AppJob:
    """What the app files of one model need from the export session.

    Attributes:
        rd_path: The run directory.
        run: The run name (written into the metadata).
        model_name: File stem of the model (``student``, ``student_pruned``).
        model: The app-profile variant of the model (:class:`AppModel`: pixels in).
        spec: The app spec of the run.
        labels: Class names for the metadata.
        x: Raw test inputs (NCHW, 0..1).
        y: Test labels.
        calibration: Returns normalized NCHW calibration samples (called only for int8).
        precisions: Quantized precisions to write besides fp32.
        int8_io: ``uint8`` or ``float32``.
        tolerance: The export tolerance (``fp32_rel``, ``min_agreement``, ``max_accuracy_drop``).
        verify: Run the checks.
        log: Progress lines.
    """

    rd_path: Path
    run: str
    model_name: str
    model: nn.Module
    spec: AppSpec
    labels: list[str]
    x: np.ndarray
    y: np.ndarray
    calibration: Callable[[], np.ndarray]
    precisions: list[str]
    int8_io: str
    tolerance: Any
    verify: bool = True
    log: Log = print


@dataclass
class AppResult:
    """Entries for metadata.json, numbers for metrics.json, and what failed."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def app_entry_normalization(spec: AppSpec, raw_channels: int) -> dict[str, list[float]]:
    """The ``normalization`` of an app file's metadata.json entry: raw 0..1 inputs → 0..255 pixels."""
    return {"mean": [0.0] * raw_channels, "std": [1.0 / PIXEL_SCALE] * raw_channels}


class _AppWriter:
    def __init__(self, job: AppJob):
        self.job = job
        self.app = job.model.eval()
        self.result = AppResult()
        self.pixels = to_pixels(job.x)
        self.info = None
        self._refs: dict[str, np.ndarray] = {}

    def sample(self) -> torch.Tensor:
        return torch.from_numpy(self.pixels[:1].astype(np.float32))

    def entry(self, path: Path, precision: str, route: str) -> dict[str, Any]:
        j = self.job
        norm = app_entry_normalization(j.spec, int(j.x.shape[1]))
        entry = meta_mod.build_entry(path, j.model_name, precision, "NHWC", norm, j.labels, route,
                                     backend=APP_BACKEND)
        entry["input"]["color"] = "RGB"
        entry.update({"profile": "app", "output_kind": j.spec.output, "pixel_scale": PIXEL_SCALE,
                      "app_normalization": j.spec.normalization_record(), "tflite_metadata": True})
        entry.pop("normalization_pixels", None)  # the app entry's normalization is the pixel scaling itself
        return entry

    def reference(self, entry: dict[str, Any]) -> np.ndarray:
        from edgekd.runtimes import prepare_input

        key = entry["input"]["dtype"]
        if key not in self._refs:  # float pixels exactly as the runtime gets them (uint8 files: rounded)
            x = prepare_input(self.job.x, {**entry, "input": {**entry["input"], "quantization": None,
                                                               "dtype": "float32"}})
            if entry["input"]["dtype"] == "uint8":
                x = np.clip(np.round(x), 0, 255)
            with torch.inference_mode():
                xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
                self._refs[key] = np.concatenate([self.app(xt[i:i + 256]).numpy() for i in range(0, len(xt), 256)])
        return self._refs[key]

    def measure(self, path: Path, entry: dict[str, Any], precision: str) -> tuple[dict[str, Any], str | None]:
        from edgekd.export.common import quiet
        from edgekd.runtimes import deployment_batch, runtime_for

        with quiet():
            rt = runtime_for(path, entry)
            out = rt.predict(self.job.x, batch_size=deployment_batch(entry))
        numbers = parity.compare(self.reference(entry), out, self.job.y)
        return numbers, parity.problem(numbers, precision, self.job.tolerance)

    def finish(self, path: Path, precision: str, route: str) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
        j = self.job
        if self.info is None:
            self.info = classifier_info(j.spec, j.labels, j.model_name, "app", j.run, __version__)
        self.info.name = f"{j.model_name} ({precision})"
        finish_app_file(path, self.info)
        entry = self.entry(path, precision, route)
        if not j.verify:
            return entry, None, None
        numbers, problem = self.measure(path, entry, precision)
        return entry, numbers, problem

    def record(self, path: Path, precision: str, entry: dict[str, Any], numbers: dict[str, Any] | None,
               problem: str | None) -> None:
        j, r = self.job, self.result
        metrics: dict[str, Any] = {"model": j.model_name, "format": "tflite", "precision": precision,
                                   "profile": "app", "size_bytes": entry["size_bytes"], "route": entry["route"]}
        if numbers is not None:
            metrics.update(numbers)
            if mediapipe_available():
                try:
                    metrics["mediapipe"] = check_in_mediapipe(path, self.pixels, j.y)
                except ExportError as e:  # MediaPipe refuses the file: exit 2
                    r.failures.append(str(e))
                    metrics["mediapipe"] = {"error": str(e)}
                    problem = problem or str(e)
                except CheckFailed as e:  # it runs, but answers differently from LiteRT: exit 1
                    r.problems.append(str(e))
                    metrics["mediapipe"] = {"error": str(e)}
                    problem = problem or str(e)
            else:
                metrics["mediapipe"] = {"skipped": "mediapipe not installed (pip install edgekd[app])"}
        entry["verified"] = None if numbers is None else problem is None
        metrics["verified"] = entry["verified"]
        if problem and numbers is not None and "mediapipe" not in problem.lower():
            r.problems.append(f"{path.name}: {problem}")
        r.entries.append(entry)
        r.metrics[path.name] = metrics
        r.files.append(path.name)
        mp = metrics.get("mediapipe", {})
        mp_text = (f"; on uint8 images MediaPipe {mp['mediapipe_accuracy']:.4f} = LiteRT" if "mediapipe_accuracy" in mp
                   else " (MediaPipe not checked)" if "skipped" in mp else "")
        acc = f"accuracy {numbers['test_accuracy']:.4f}{mp_text}" if numbers else "not verified"
        j.log(f"{path.name:28s} {entry['size_bytes'] / 1024:7.1f} KB  {acc}  "
              f"{'ok' if entry['verified'] else ('-' if numbers is None else 'FAILED')} [{entry['route']}]")
        if problem:
            j.log(f"  {problem}")


def _quantize(w: _AppWriter, plain: Path, path: Path, precision: str, route: str, calib: np.ndarray | None) -> str:
    from edgekd.export.tflite import ROUTE_AEQ, quantize_aeq, quantize_pt2e

    if route == ROUTE_AEQ or precision == "fp16":
        quantize_aeq(plain, path, precision, calib, w.job.int8_io if precision == "int8" else "float32")
        return ROUTE_AEQ if precision != "fp16" else "ai-edge-quantizer-fp16"
    quantize_pt2e(w.app, w.sample(), path, precision, calib, nhwc=False, io_type=w.job.int8_io,
                  what=f"{w.job.model_name} (app profile)")
    return route


def _write_quantized(w: _AppWriter, plain: Path, precision: str) -> None:
    from edgekd.export.tflite import TFLITE_DYNAMIC_ROUTES, TFLITE_ROUTES

    j = w.job
    path = j.rd_path / app_file_name(j.model_name, precision)
    routes = ["ai-edge-quantizer"] if precision == "fp16" else list(
        TFLITE_DYNAMIC_ROUTES if precision == "dynamic" else TFLITE_ROUTES)
    calib = pixel_calibration(j.calibration(), j.spec.mean, j.spec.std) if precision == "int8" else None
    best, errors = None, []
    for route in routes:
        try:
            name = _quantize(w, plain, path, precision, route, calib)
            entry, numbers, problem = w.finish(path, precision, name)
        except ExportError as e:
            errors.append(f"{route}: {e}")
            continue
        rank = (problem is None, numbers["agreement"] if numbers else 0.0)
        if best is None or rank > best[0]:
            best = (rank, path.read_bytes(), entry, numbers, problem)
        if problem is None:
            break
    if best is None:
        path.unlink(missing_ok=True)
        j.log(f"{path.name:28s} not written: {'; '.join(errors)}")
        w.result.failures.append(f"{path.name}: {'; '.join(errors)}")
        return
    _, data, entry, numbers, problem = best
    if path.read_bytes() != data:
        from edgekd.run_dir import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        entry = w.entry(path, precision, entry["route"])
    w.record(path, precision, entry, numbers, problem)


def export_app_files(job: AppJob) -> AppResult:
    """Write and check the app-profile files of one model (see the module docstring).

    Raises:
        ExportError: ``job.int8_io`` is int8 (refused before anything is written).
    """
    from edgekd.export.tflite import export_tflite

    check_app_io(job.int8_io)
    w = _AppWriter(job)
    path = job.rd_path / app_file_name(job.model_name, "fp32")
    try:
        route = export_tflite(w.app, w.sample(), path, what=f"{job.model_name} (app profile)")
        plain = plain_copy(path)
    except ExportError as e:
        path.unlink(missing_ok=True)
        w.result.failures.append(str(e))
        job.log(f"{path.name:28s} not written: {e}")
        return w.result
    try:
        entry, numbers, problem = w.finish(path, "fp32", route)
        w.record(path, "fp32", entry, numbers, problem)
        for precision in job.precisions:
            _write_quantized(w, plain, precision)
    finally:
        plain.unlink(missing_ok=True)
    return w.result


# -- the backend: the app-profile variant of the student, as .tflite -----------------------------------------

class AppSettings(BaseModel):
    """``export.tflite_app`` (``export.app`` in earlier recipes): the app-profile files."""

    model_config = ConfigDict(extra="forbid")
    enabled: Optional[bool] = Field(None, description="null: on for image runs; true on a run without images is an "
                                                      "error; false (--no-app): off")
    output: Literal["probabilities", "logits"] = Field("probabilities", description="what app-profile files output")
    int8_io: str = Field("uint8", description="inputs/outputs of int8 app-profile files: uint8 or float32")
    labels: Optional[str] = Field(None, description="labels file (one per line) for the files' metadata; "
                                                    "default: the run's labels")


def _app_variant(model: nn.Module, session: Any) -> nn.Module | None:
    """The pixel-input wrapper of ``model`` (None: the run's inputs are not images the profile wraps)."""
    cfg = APP_BACKEND.settings(session.cfg.backend_sections().get(APP_BACKEND.name))
    spec = app_spec(session.layout, session.input_shape, session.norm, cfg.output)
    return None if spec is None else AppModel(model, spec).eval()


class AppBackend(TFLiteBackend):
    """``<model>_app_<precision>.tflite``: RGB uint8 pixels in, normalization inside, TFLite Model Metadata with
    the labels, checked in MediaPipe's ImageClassifier. Written beside the tflite files of image runs."""

    name = "tflite_app"
    format = "tflite"  # the file format; metadata's "backend" says tflite_app
    tag = APP_TAG
    variant = APP_TAG
    companion_of = "tflite"
    teacher = False
    qat_route = None
    routes = {k: v for k, v in TFLiteBackend.routes.items() if k != MIXED}  # app files are not searched
    Settings = AppSettings

    def prepare(self, session: Any, settings: Any, asked: bool) -> bool:
        if settings.enabled is False:
            return False
        spec = app_spec(session.layout, session.input_shape, session.norm, settings.output,
                        asked=asked or settings.enabled is True)
        if spec is None:
            return False
        check_app_io(settings.int8_io)
        if settings.labels:
            read_labels_file(settings.labels, len(session.labels))
        return True

    def build(self, ctx: Any, target: Any) -> None:
        s = ctx.session
        cfg = s.settings(self)
        model = s.variant(target, self.variant)
        if model is None:
            return
        labels = read_labels_file(cfg.labels, len(s.labels)) if cfg.labels else list(s.labels)
        job = AppJob(rd_path=s.rd.path, run=s.rd.name, model_name=target.name, model=model, spec=model.spec,
                     labels=labels, x=s.x, y=s.y, calibration=s.calibration, precisions=list(ctx.precisions),
                     int8_io=cfg.int8_io, tolerance=s.cfg.tolerance, verify=s.verify, log=s.log)
        result = export_app_files(job)
        for entry in result.entries:
            ctx.record(entry, result.metrics[entry["file"]])
        ctx.report.failures.extend(result.failures)
        ctx.report.problems.extend(result.problems)


APP_BACKEND = register_backend(AppBackend())
register_variant(APP_TAG, _app_variant)
