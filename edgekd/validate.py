"""``edgekd validate``: accuracy and agreement of every model of a run, in every runtime that can run it, and budgets.

Every model is fed the raw evaluation inputs (``eval.npz``) through :mod:`edgekd.runtimes`, which applies the
normalization, layout and integer quantization recorded in ``metadata.json`` exactly as an app must. For each
(file, runtime) it reports accuracy, macro precision/recall/F1, and top-1 agreement with the PyTorch fp32 teacher
and with the PyTorch fp32 student. Results go to ``validate.json`` and, per exported file name, ``metrics.json``.

Before anything is measured, every file the command will use is checked against the sha256 recorded when it was
written (``manifest.json``, and ``metadata.json`` for exported models, see :func:`check_inputs`): a changed or
truncated file raises :class:`~edgekd.errors.ArtifactChanged` (exit code 1) naming it.

Budgets (the recipe's ``validate`` section) are judged by :func:`edgekd.results.check_budgets`, the one verdict
``validate``, ``run`` and ``report`` share: a broken budget raises :class:`~edgekd.errors.CheckFailed` (exit
code 1) naming each file and what it broke, so CI can gate on it.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edgekd.errors import EdgeKDError, RunDirError
from edgekd.results import VALIDATE_JSON, ValidationResult, ValidationRow, ValidationSkip
from edgekd.run_dir import RunDir, read_eval, write_json_atomic
from edgekd.runtimes.targets import ModelTarget, check_inputs, discover_models, integrity_problem, parse_runtimes

STAGE = "validate"
log = logging.getLogger(__name__)
_METRIC_KEYS = ("test_accuracy", "precision_macro", "recall_macro", "f1_macro", "agreement_teacher",
                "agreement_student_fp32", "accuracy_drop_vs_teacher", "size_bytes")


def _classification(pred: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=np.arange(num_classes), average="macro",
                                                 zero_division=0)
    return {"test_accuracy": float((pred == y).mean()), "precision_macro": float(p), "recall_macro": float(r),
            "f1_macro": float(f)}


def _references(rd: RunDir, x: np.ndarray, threads: int | None) -> dict[str, np.ndarray]:
    """Top-1 predictions of the PyTorch fp32 teacher and student, whatever runtimes were asked for."""
    from edgekd.runtimes import runtime_for

    refs: dict[str, np.ndarray] = {}
    all_targets = {t.file: t for t in discover_models(rd)}
    for role in ("teacher", "student"):
        t = all_targets.get(f"{role}.pt")
        if t is not None:
            refs[role] = runtime_for(rd / t.file, t.entry, threads, "torch").predict(x).argmax(1)
    return refs


def _predict(rd: RunDir, t: ModelTarget, x: np.ndarray, n: int, threads: int | None) -> tuple[np.ndarray, float]:
    """Logits of one model file in its runtime, and the seconds it took."""
    from edgekd.runtimes import runtime_for

    t0 = time.perf_counter()
    logits = runtime_for(rd / t.file, t.entry, threads, t.runtime).predict(x)
    seconds = time.perf_counter() - t0
    if logits.ndim != 2 or logits.shape[0] != n:
        raise EdgeKDError(f"output shape {tuple(logits.shape)}, expected ({n}, classes)")
    return logits, seconds


def _validate_one(rd: RunDir, t: ModelTarget, x: np.ndarray, y: np.ndarray, num_classes: int,
                  refs: dict[str, np.ndarray], threads: int | None) -> ValidationRow | ValidationSkip:
    """One row for a model file, or why it could not be run (its runtime's own error included)."""
    problem = integrity_problem(rd, t)
    if problem is None:
        try:
            logits, seconds = _predict(rd, t, x, len(y), threads)
        except EdgeKDError as e:
            problem = str(e)
        except Exception as e:  # a runtime's own error: report it for this file, validate the others
            problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if problem is not None:
        log.info(f"{t.file:32s} {t.runtime:12s} skipped: {problem}")
        return ValidationSkip(model=t.stem, file=t.file, runtime=t.runtime, reason=problem)
    pred = logits.argmax(1)
    agree = {role: float((pred == ref).mean()) for role, ref in refs.items()}
    row = ValidationRow(model=t.stem, file=t.file, source_model=t.source_model, runtime=t.runtime, format=t.format,
                        precision=t.precision, **_classification(pred, y, num_classes),
                        agreement_teacher=agree.get("teacher"), agreement_student_fp32=agree.get("student"),
                        size_bytes=rd.model_size(t.file), n_eval=int(len(y)), seconds=round(seconds, 3))
    log.info(f"{t.file:32s} {t.runtime:12s} acc {row.test_accuracy:.4f}  f1 {row.f1_macro:.4f}  "
             f"agree(teacher) {_fmt(row.agreement_teacher)}  agree(student fp32) {_fmt(row.agreement_student_fp32)}")
    return row


def _record(rd: RunDir, result: ValidationResult) -> None:
    """Write ``validate.json``, each exported file's metrics entry and the manifest."""
    write_json_atomic(rd / VALIDATE_JSON, result.to_json())
    for row in result.rows:
        if row.format != "pt":  # exported files go under their file name; .pt roles already have entries
            values = row.to_json()
            rd.update_metrics(row.file, {k: values[k] for k in _METRIC_KEYS} | {"runtime": row.runtime})
    rd.record_artifacts(VALIDATE_JSON)
    rd.stage_done(STAGE, artifact=VALIDATE_JSON, rows=len(result.rows), skipped=len(result.skipped))


def run_validate(rd: RunDir, runtimes: str | list[str] | None = None, threads: int | None = None
                 ) -> ValidationResult:
    """Measure accuracy and agreement of every model of the run; write ``validate.json`` and metrics.

    Logs one line per model (``edgekd.validate`` logger, level INFO).

    Args:
        rd: The run directory.
        runtimes: Only these runtimes (a list or ``"onnxruntime,litert"``; None: every runtime that can run a
            model of the run).
        threads: Threads for each runtime (None: its default).

    Returns:
        The result also written to ``validate.json``: one :class:`~edgekd.results.ValidationRow` per (file,
        runtime) and one :class:`~edgekd.results.ValidationSkip` per file that could not be run.

    Raises:
        ArtifactChanged: A file it would use changed since it was written (see ``check_inputs``; exit 1).
        RunDirError: No models, no eval.npz, a recorded file is missing, or every model failed to run.
    """
    runtimes = parse_runtimes(runtimes)
    if threads is not None and threads <= 0:
        raise EdgeKDError(f"--threads must be positive, got {threads}")
    targets = discover_models(rd, runtimes)
    # Tamper check first: a file changed since it was written fails the command, nothing is measured.
    check_inputs(rd, targets)
    x, y = read_eval(rd)
    num_classes = len(rd.data_info().get("labels") or []) or int(y.max()) + 1
    refs = _references(rd, x, threads)

    rd.stage_started(STAGE)
    result = ValidationResult(run=rd.name, n_eval=int(len(y)))
    for t in targets:
        out = _validate_one(rd, t, x, y, num_classes, refs, threads)
        (result.rows if isinstance(out, ValidationRow) else result.skipped).append(out)
    if not result.rows:
        raise RunDirError(f"no model of {rd.path} could be run: " +
                          "; ".join(f"{s.file}: {s.reason}" for s in result.skipped[:3]))
    teacher = result.row("teacher.pt")
    result.teacher_accuracy = (teacher.test_accuracy if teacher is not None
                               else rd.metrics().get("teacher", {}).get("test_accuracy"))
    for row in result.rows:
        row.accuracy_drop_vs_teacher = (None if result.teacher_accuracy is None
                                        else result.teacher_accuracy - row.test_accuracy)
    _record(rd, result)
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def validate_summary(result: ValidationResult) -> str:
    """A plain-text table of the validation rows."""
    from edgekd.summary import table

    rows = [[r.file, r.runtime, r.precision, f"{r.test_accuracy:.4f}", f"{r.f1_macro:.4f}",
             _fmt(r.agreement_teacher), _fmt(r.agreement_student_fp32), f"{r.size_bytes / 1024:.1f}"]
            for r in result.rows]
    text = table(["file", "runtime", "precision", "test_acc", "macro_f1", "agree_teacher", "agree_student",
                  "size_KB"], rows)
    for s in result.skipped:
        text += f"\nskipped {s.file} ({s.runtime}): {s.reason}"
    return text
