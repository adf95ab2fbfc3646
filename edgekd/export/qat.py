"""``edgekd quantize --qat``: quantization-aware distillation, then the ``qat`` route of every backend that has one.

:func:`edgekd.quant.prepare_qat` fake-quantizes the student, :func:`edgekd.quant.finetune_qat` trains it against
the teacher; each backend with a ``qat_route`` (:attr:`~edgekd.export.backends.ExportBackend.qat_route`) then
writes ``<model>_int8_qat<suffix>`` from the trained model: litert-torch lowers the quantize/dequantize graph
to a full-integer .tflite file, the ONNX exporter turns it into QDQ pairs, ExecuTorch lowers it to XNNPACK.
No route calibrates again, so every file computes what the fake-quantized model computed. This module names
no format.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from edgekd.errors import ExportError, RunDirError
from edgekd.export.backends import ExportBackend, get_backend, list_backends
from edgekd.export.session import (ExportSession, FileWriter, Target, check_writable, load_run_recipe,
                                   merge_export_config, run_and_record, student_target)
from edgekd.results import ExportReport


def is_qat_route(route: str | None) -> bool:
    """Whether a metadata ``route`` names a quantization-aware-trained file."""
    return bool(route) and str(route).startswith("qat")


def _kd_loss(recipe):
    """The run's distillation loss on logits (a feature loss falls back to plain KD: the graph has no hooks)."""
    from edgekd import losses

    loss = losses.build_from_config(recipe.distill.loss)
    return losses.build("kd", temperature=4.0, alpha=1.0) if losses.needs_features(loss) else loss


def _train_config(qat_cfg):
    from edgekd.recipe import TrainConfig

    return TrainConfig(**{k: v for k, v in qat_cfg.model_dump().items() if k in TrainConfig.model_fields})


def qat_backends() -> list[str]:
    """Names of the registered backends that have a QAT route."""
    return [n for n in list_backends() if get_backend(n).qat_route]


def qat_formats(requested: list[str] | None, recipe_formats: list[str], log) -> list[str]:
    """The backends QAT writes: those asked for, else the recipe's export formats that have a QAT route.

    Raises:
        ExportError: A format asked for that has no QAT route, or none of the recipe's (before any training).
    """
    able = qat_backends()
    if requested:
        bad = [f for f in requested if f not in able]
        if bad:
            raise ExportError(f"QAT cannot write format {bad[0]!r}", f"choose from: {', '.join(able)}")
        return list(requested)
    fmts = [f for f in recipe_formats if f in able]
    skipped = [f for f in recipe_formats if f not in able]
    if not fmts:
        raise ExportError(f"QAT writes only {', '.join(able)} files, and export.formats lists none of them",
                          f"add one of {', '.join(able)} to export.formats")
    if skipped:
        log(f"QAT: {', '.join(skipped)} not written from the QAT student (only {', '.join(able)})")
    return fmts


def run_qat(run=None, out="exported", *, cfg=None, formats: list[str] | None = None, int8_io: str | None = None,
            resume: bool = False, verify: bool = True, log=None, quiet: bool = True, check: bool = False):
    """Quantization-aware distillation of the run's best student, written as ``<student>_int8_qat<suffix>``.

    The student (pruned if the run has one) is fake-quantized with the int8 PT2E quantizer, calibrated on the
    same training samples PTQ uses, fine-tuned against the teacher with the run's KD loss (one atomic,
    resumable checkpoint per epoch in ``checkpoints/qat.state.pt``), then written by the QAT route of each
    backend. Every file is verified against the fake-quantized PyTorch model on the test split like any int8
    file; metadata.json records ``route: qat-...`` and metrics.json the file's numbers plus how QAT trained.

    Args:
        run: Run directory (default: the most recent run in ``out``).
        out: Where runs live.
        cfg: QAT settings (default: the recipe's ``qat`` section, else :class:`~edgekd.recipe.QATConfig`).
        formats: Backends with a QAT route, e.g. ``onnx``, ``tflite``, ``pte`` (default: the recipe's).
        int8_io: Inputs/outputs of the .tflite file (default: the recipe's, else float32).
        resume: Continue an interrupted QAT from its last finished epoch.
        verify: Run every file on the test split and check the int8 tolerance.
        log: Receives one progress line per file.
        quiet: No per-epoch lines; with no ``log``, no progress lines either.
        check: Raise after recording when a file failed or misses the tolerance.

    Raises:
        RunDirError: The run has no student (or teacher, or recipe) to work from.
    """
    from edgekd.recipe import QATConfig
    from edgekd.run_dir import RunDir, resolve_run

    log = log or (print if not quiet else (lambda _msg: None))
    rd = run if isinstance(run, RunDir) else resolve_run(run, out)
    recipe = load_run_recipe(rd)
    if recipe is None:
        raise RunDirError(f"run {rd.path} has no recipe.yaml, so its training data cannot be found for QAT",
                          "run `edgekd distill` again, or quantize without --qat")
    target = student_target(rd)  # refuses a run without a student
    if not (rd / "teacher.pt").is_file():
        raise RunDirError(f"run {rd.path} has no teacher.pt to distill from during QAT",
                          "run `edgekd distill` to finish the run first")
    qat_cfg = cfg or recipe.qat or QATConfig()
    ecfg = merge_export_config(rd, recipe, None, int8_io=int8_io)
    backends = [get_backend(f) for f in qat_formats(formats, ecfg.formats, log)]
    for backend in backends:
        backend.check_available()
    check_writable(rd)
    session = ExportSession(rd, ecfg, verify, log)
    report = ExportReport(run=str(rd.path))
    writer = FileWriter(session, report)
    t0 = time.perf_counter()
    rd.stage_started("qat")
    work = lambda: _train_and_write(session, writer, recipe, qat_cfg, target, backends, resume, quiet)  # noqa: E731
    run_and_record(work, rd, "qat", report, session, writer, t0)
    if check:
        report.raise_for_problems()
    return report


def _train_and_write(session: ExportSession, writer: FileWriter, recipe, qat_cfg, target: Target,
                     backends: list[ExportBackend], resume: bool, quiet: bool) -> None:
    """Fake-quantize, calibrate and fine-tune the student, then write each backend's QAT file."""
    from edgekd.data import load_data
    from edgekd.models import load_model
    from edgekd.quant import calibrate, finetune_qat, prepare_qat

    rd = session.rd
    data = load_data(recipe.data, recipe.seed)
    calib = torch.from_numpy(session.calibration())
    qat = prepare_qat(target.model, calib[:2])
    bs = data.batch_size
    calibrate(qat, [calib[i:i + bs] for i in range(0, min(len(calib), qat_cfg.calibration_batches * bs), bs)])
    result = finetune_qat(qat, data, _train_config(qat_cfg), _kd_loss(recipe), seed=recipe.seed,
                          state_path=rd / "checkpoints" / "qat.state.pt",
                          teacher=load_model(rd / "teacher.pt").eval(), resume=resume, quiet=quiet)
    session.log(f"QAT: {qat_cfg.epochs} epochs of KD with int8 fake quantization in {result.seconds:.1f}s, "
                f"best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch})")
    qat.eval()
    reference = Target(target.name, qat, target.checkpoint)  # files are checked against the QAT PyTorch model
    info: dict[str, Any] = {"qat": {"epochs": qat_cfg.epochs, "lr": qat_cfg.lr, "seconds": round(result.seconds, 2),
                                    "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                                    "from": target.checkpoint}}
    for backend in backends:
        writer.write_qat(reference, backend, qat, info)
