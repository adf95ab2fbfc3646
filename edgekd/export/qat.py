"""Writers for quantization-aware-trained int8 files: the learned scales go into TFLite and ONNX as they are.

:func:`edgekd.quant.convert_qat` gives a graph with explicit quantize/dequantize nodes. litert-torch lowers
that graph to a full-integer .tflite file (what the PT2E PTQ route does after calibration); the ONNX exporter
turns the same nodes into QuantizeLinear/DequantizeLinear pairs (QDQ), which ONNX Runtime fuses into integer
kernels. Neither route calibrates again, so both files compute what the fake-quantized model computed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from edgekd.export.common import conversion_error, quiet
from edgekd.export.onnx import export_onnx
from edgekd.export.tflite import file_model_for, has_int8_io, retype_io
from edgekd.run_dir import atomic_path

ROUTE_QAT_TFLITE = "qat-litert-torch-pt2e"
ROUTE_QAT_ONNX = "qat-torch.onnx-qdq"
QAT_ROUTES = (ROUTE_QAT_TFLITE, ROUTE_QAT_ONNX)


def is_qat_route(route: str | None) -> bool:
    """Whether a metadata ``route`` names a quantization-aware-trained file."""
    return bool(route) and str(route).startswith("qat")


def write_qat_tflite(converted: nn.Module, sample: torch.Tensor, path: Path, *, nhwc: bool = False,
                     io_type: str = "float32", what: str = "the QAT student") -> str:
    """Write a converted QAT graph as a full-integer int8 .tflite file (batch 1, like apps run it).

    Args:
        converted: From :func:`edgekd.quant.convert_qat` (NCHW/NF input).
        sample: One normalized NCHW/NF input.
        path: Destination; written atomically.
        nhwc: Make the file take channels-last input (the transpose stays outside the quantized graph).
        io_type: ``float32``, ``int8`` or ``uint8`` model inputs/outputs.
        what: Name of the model for error messages.

    Returns:
        The route name (recorded as ``route`` in metadata.json).
    """
    from edgekd.quant import int8_quantizer

    with quiet():
        import litert_torch
        from litert_torch.quantize import quant_config

    file_model, file_sample = file_model_for(converted, sample[:1], nhwc)
    with atomic_path(path) as tmp:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                edge = litert_torch.convert(file_model, (file_sample,),
                                            quant_config=quant_config.QuantConfig(pt2e_quantizer=int8_quantizer(qat=True)))
                edge.export(str(tmp))
            except Exception as e:  # converters raise anything from RuntimeError to AssertionError
                raise conversion_error("tflite (QAT)", what, e, "litert-torch PT2E") from e
        if io_type != "int8":
            data = tmp.read_bytes()
            if has_int8_io(data):
                tmp.write_bytes(retype_io(data, io_type))
    return ROUTE_QAT_TFLITE


def write_qat_onnx(converted: nn.Module, sample: torch.Tensor, path: Path, *, what: str = "the QAT student") -> str:
    """Write a converted QAT graph as a QDQ ONNX file (float32 I/O, dynamic batch, per-channel int8 weights).

    Returns:
        The route name (recorded as ``route`` in metadata.json).
    """
    export_onnx(converted, sample, path, what=what, fold_weights=True)  # int8 weights in the file
    return ROUTE_QAT_ONNX


# -- the stage: `edgekd quantize --qat` ------------------------------------------------------------------

def _kd_loss(recipe):
    """The run's distillation loss on logits (a feature loss falls back to plain KD: the graph has no hooks)."""
    from edgekd import losses

    loss = losses.build_from_config(recipe.distill.loss)
    return losses.build("kd", temperature=4.0, alpha=1.0) if losses.needs_features(loss) else loss


def _train_config(qat_cfg):
    from edgekd.recipe import TrainConfig

    return TrainConfig(**{k: v for k, v in qat_cfg.model_dump().items() if k in TrainConfig.model_fields})


QAT_FORMATS = ("onnx", "tflite")


def qat_formats(requested: list[str] | None, recipe_formats: list[str], log) -> list[str]:
    """The formats QAT writes: those asked for, else the recipe's export formats QAT can write (onnx, tflite).

    Raises:
        ExportError: A format asked for that QAT cannot write, or none of the recipe's (before any training).
    """
    from edgekd.errors import ExportError

    if requested:
        bad = [f for f in requested if f not in QAT_FORMATS]
        if bad:
            raise ExportError(f"QAT cannot write format {bad[0]!r}", f"choose from: {', '.join(QAT_FORMATS)}")
        return list(requested)
    fmts = [f for f in recipe_formats if f in QAT_FORMATS]
    skipped = [f for f in recipe_formats if f not in QAT_FORMATS]
    if not fmts:
        raise ExportError(f"QAT writes only {' and '.join(QAT_FORMATS)} files, and export.formats lists neither",
                          "add onnx or tflite to export.formats")
    if skipped:
        log(f"QAT: {', '.join(skipped)} not written from the QAT student (only {', '.join(QAT_FORMATS)})")
    return fmts


def run_qat(run=None, out="exported", *, cfg=None, formats: list[str] | None = None, int8_io: str | None = None,
            resume: bool = False, verify: bool = True, log=None, quiet: bool = True, check: bool = False):
    """Quantization-aware distillation of the run's best student, written as ``<student>_int8_qat.<fmt>``.

    The student (pruned if the run has one) is fake-quantized with the int8 TFLite route's quantizer,
    calibrated on the same training samples PTQ uses, fine-tuned against the teacher with the run's KD loss
    (one atomic, resumable checkpoint per epoch in ``checkpoints/qat.state.pt``), converted and written.
    Every file is verified against the fake-quantized PyTorch model on the test split like any int8 file;
    metadata.json records ``route: qat-...`` and metrics.json the file's numbers plus how QAT trained.

    Args:
        run: Run directory (default: the most recent run in ``out``).
        out: Where runs live.
        cfg: QAT settings (default: the recipe's ``qat`` section, else :class:`~edgekd.recipe.QATConfig`).
        formats: ``onnx`` and/or ``tflite`` (default: the recipe's export formats).
        int8_io: Inputs/outputs of the .tflite file (default: the recipe's, else float32).
        resume: Continue an interrupted QAT from its last finished epoch.
        verify: Run every file on the test split and check the int8 tolerance.
        log: Receives one progress line per file.
        quiet: No per-epoch lines; with no ``log``, no progress lines either.
        check: Raise after recording when a file failed or misses the tolerance.

    Raises:
        RunDirError: The run has no student (or teacher, or recipe) to work from.
    """
    import time

    from edgekd.data import load_data
    from edgekd.errors import RunDirError
    from edgekd.export import metadata as meta_mod
    from edgekd.export import parity
    from edgekd.export.pipeline import (Exporter, ExportReport, ExportSession, Target, check_writable,
                                        load_run_recipe, merge_export_config, run_and_record, student_target)
    from edgekd.models import load_model
    from edgekd.quant import calibrate, convert_qat, finetune_qat, prepare_qat
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
    fmts = qat_formats(formats, ecfg.formats, log)
    check_writable(rd)
    session = ExportSession(rd, ecfg, verify, log)
    report = ExportReport(run=str(rd.path))
    exporter = Exporter(session, report)
    t0 = time.perf_counter()
    rd.stage_started("qat")

    def work() -> None:
        data = load_data(recipe.data, recipe.seed)
        calib = torch.from_numpy(session.calibration())
        qat = prepare_qat(target.model, calib[:2])
        bs = data.batch_size
        calibrate(qat, [calib[i:i + bs] for i in range(0, min(len(calib), qat_cfg.calibration_batches * bs), bs)])
        result = finetune_qat(qat, data, _train_config(qat_cfg), _kd_loss(recipe), seed=recipe.seed,
                              state_path=rd / "checkpoints" / "qat.state.pt",
                              teacher=load_model(rd / "teacher.pt").eval(), resume=resume, quiet=quiet)
        log(f"QAT: {qat_cfg.epochs} epochs of KD with int8 fake quantization in {result.seconds:.1f}s, "
            f"best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch})")
        converted = convert_qat(qat)
        reference = Target(target.name, qat.eval(), target.checkpoint)  # files are checked against QAT PyTorch
        info = {"qat": {"epochs": qat_cfg.epochs, "lr": qat_cfg.lr, "seconds": round(result.seconds, 2),
                        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                        "from": target.checkpoint}}
        for fmt in fmts:
            _write_one(session, report, exporter, reference, converted, fmt, ecfg, info, meta_mod, parity)

    run_and_record(work, rd, "qat", report, session, exporter, t0)
    if check:
        report.raise_for_problems()
    return report


def _write_one(session, report, exporter, target, converted, fmt, ecfg, info, meta_mod, parity) -> None:
    from edgekd.errors import ExportError

    path = session.rd / f"{target.name}_int8_qat.{fmt}"
    from edgekd.export.backends import get_backend

    layout = session.file_layout(get_backend(fmt))
    sample = session.sample()
    try:
        if fmt == "onnx":
            route = write_qat_onnx(converted, sample, path, what=target.name)
        else:
            route = write_qat_tflite(converted, sample, path, nhwc=layout == "NHWC", io_type=ecfg.int8_io,
                                     what=target.name)
        entry = meta_mod.build_entry(path, target.name, "int8", layout, session.norm, session.labels, route)
        numbers = session.measure(path, entry, target) if session.verify else None
    except ExportError as e:
        report.failures.append(str(e))
        session.log(f"{path.name:28s} not written: {e}")
        return
    problem = parity.problem(numbers, "int8", ecfg.tolerance) if numbers else None
    if problem:
        report.problems.append(f"{path.name}: {problem}")
    exporter.finish_file(path, entry, target, "int8", numbers, problem, dict(info))
