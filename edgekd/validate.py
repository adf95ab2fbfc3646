"""``edgekd validate``: accuracy and agreement of every model of a run, in every runtime that can run it, and budgets.

Every model is fed the raw evaluation inputs (``eval.npz``) through :mod:`edgekd.runtimes`, which applies the
normalization, layout and integer quantization recorded in ``metadata.json`` exactly as an app must. For each
(file, runtime) it reports accuracy, macro precision/recall/F1, and top-1 agreement with the PyTorch fp32 teacher
and with the PyTorch fp32 student. Results go to ``validate.json`` and, per exported file name, ``metrics.json``.

Before anything is measured, every file the command will use is checked against the sha256 recorded when it was
written (``manifest.json``, and ``metadata.json`` for exported models, see :func:`check_inputs`): a changed or
truncated file raises :class:`~edgekd.errors.ArtifactChanged` (exit code 1) naming it.

Budgets (the recipe's ``validate`` section) are checked by :func:`check_budgets`: a broken budget raises
:class:`~edgekd.errors.CheckFailed` (exit code 1) naming each file and what it broke, so CI can gate on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.errors import CheckFailed, EdgeKDError, RunDirError
from edgekd.run_dir import RunDir, read_json, read_rows_report, sha256_file, write_json_atomic

STAGE = "validate"
VALIDATE_JSON = "validate.json"
# Roles the distill stage writes, in the order tables list them; other checkpoints (a pruned student) follow.
_ROLE_ORDER = ("teacher", "baseline", "student")
_FORMAT_RUNTIME = {"pt": "torch", "onnx": "onnxruntime", "tflite": "litert"}
# Models that are references, not deployable student variants: budgets and recommendations skip them.
REFERENCE_MODELS = ("teacher", "baseline")


@dataclass
class ModelTarget:
    """One model file of a run and the runtime that runs it."""

    file: str
    source_model: str  # the model it was made from: teacher, baseline, student, student_pruned...
    runtime: str
    format: str
    precision: str
    entry: dict[str, Any] = field(repr=False)

    @property
    def stem(self) -> str:
        return Path(self.file).stem

    @property
    def is_student(self) -> bool:
        return self.source_model not in REFERENCE_MODELS


def _data_info(rd: RunDir) -> dict[str, Any]:
    path = rd / "data.json"
    if not path.is_file():
        raise RunDirError(f"{path} not found: {rd.path} is not a finished distill run", "run `edgekd distill` first")
    return read_json(path, dict)


def read_metadata(rd: RunDir) -> dict[str, Any] | None:
    """``metadata.json`` of a run (None before export), checked for a ``models`` list."""
    path = rd / "metadata.json"
    if not path.exists():
        return None
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("models"), list):
        raise RunDirError(f"{path} has no 'models' list", "run `edgekd export` again")
    return meta


def discover_models(rd: RunDir, runtimes: list[str] | None = None) -> list[ModelTarget]:
    """Every model of a run: the PyTorch checkpoints (``*.pt``) and every file in ``metadata.json``.

    Args:
        rd: The run directory.
        runtimes: Keep only models these runtimes run (None: all).

    Raises:
        RunDirError: The run holds no model (or none for the chosen runtimes).
    """
    data = _data_info(rd)
    norm = data.get("normalization") or {}
    input_shape = [int(s) for s in data.get("input_shape", [])]
    targets: list[ModelTarget] = []
    order = {r: i for i, r in enumerate(_ROLE_ORDER)}
    for p in sorted(rd.path.glob("*.pt"), key=lambda p: (order.get(p.stem, len(order)), p.stem)):
        entry = {"file": p.name, "model": p.stem, "format": "pt", "precision": "fp32",
                 "input": {"shape": [1, *input_shape], "dtype": "float32", "layout": data.get("layout", "NCHW"),
                           "quantization": None},
                 "output": {"dtype": "float32", "quantization": None}, "normalization": norm}
        targets.append(ModelTarget(p.name, p.stem, "torch", "pt", "fp32", entry))
    meta = read_metadata(rd)
    for entry in (meta or {}).get("models", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise RunDirError(f"{rd / 'metadata.json'}: a model entry has no 'file'", "run `edgekd export` again")
        if not entry["file"] or Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
            raise RunDirError(f"{rd / 'metadata.json'}: model file {entry['file']!r} is not a file name inside the run",
                              "run `edgekd export` again")
        entry = dict(entry)
        # The contract allows normalization at the top level only; runtimes read it from the entry.
        entry.setdefault("normalization", meta.get("normalization") or norm)
        fmt = entry.get("format") or Path(entry["file"]).suffix.lstrip(".")
        runtime = _FORMAT_RUNTIME.get(fmt)
        if runtime is None:
            continue
        targets.append(ModelTarget(entry["file"], str(entry.get("model") or Path(entry["file"]).stem.split("_")[0]),
                                   runtime, fmt, str(entry.get("precision", "fp32")), entry))
    if runtimes is not None:
        targets = [t for t in targets if t.runtime in runtimes]
    if not targets:
        which = f" for runtime(s) {', '.join(runtimes)}" if runtimes else ""
        raise RunDirError(f"{rd.path} holds no models{which}",
                          "run `edgekd distill` (and `edgekd export` for ONNX/TFLite files) first")
    return targets


def load_eval(rd: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """``(x raw float32, y int64)`` from the run's ``eval.npz``."""
    path = rd / "eval.npz"
    if not path.is_file():
        raise RunDirError(f"{path} not found", "run `edgekd distill` first")
    try:
        with np.load(path, allow_pickle=False) as d:
            x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"]).astype(np.int64).reshape(-1)
    except Exception as e:  # BadZipFile, KeyError, ValueError all mean the same to a user
        raise RunDirError(f"{path} cannot be read ({type(e).__name__})", "run `edgekd distill` again") from None
    if len(x) == 0 or len(x) != len(y):
        raise RunDirError(f"{path}: x has {len(x)} rows and y {len(y)}", "run `edgekd distill` again")
    return x, y


def _classification(pred: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=np.arange(num_classes), average="macro",
                                                 zero_division=0)
    return {"test_accuracy": float((pred == y).mean()), "precision_macro": float(p), "recall_macro": float(r),
            "f1_macro": float(f)}


def check_inputs(rd: RunDir, targets: list[ModelTarget]) -> None:
    """Before using them, check the files of ``targets`` and the run files they rely on against their records.

    Every model file is compared with the sha256 (and size) in ``manifest.json`` and, for exported files, the
    sha256 in ``metadata.json``; so are ``eval.npz``, ``data.json``, ``recipe.yaml``, ``metadata.json``, an ONNX
    model's external-data file and the PyTorch teacher and student that agreement is measured against.

    Raises:
        ArtifactChanged: A file was changed or truncated since it was written (exit code 1), naming each one.
        RunDirError: A file the manifest records is missing (exit code 2).
    """
    names = ["eval.npz", "data.json", "recipe.yaml", "metadata.json", "teacher.pt", "student.pt"]
    expected: dict[str, str] = {}
    for t in targets:
        names.append(t.file)
        if t.format == "onnx":
            names.append(t.file + ".data")
        sha = t.entry.get("sha256")
        if t.format != "pt" and isinstance(sha, str):
            expected[t.file] = sha
    rd.check_artifacts(names, expected)


def _integrity_problem(rd: RunDir, target: ModelTarget) -> str | None:
    """Why a file cannot be trusted (missing, or changed since export), or None."""
    p = rd / target.file
    if not p.is_file():
        return f"{target.file} not found"
    sha = target.entry.get("sha256")
    if sha and sha256_file(p) != sha:
        return f"{target.file} changed since it was exported (sha256 differs from metadata.json)"
    return None


def run_validate(rd: RunDir, runtimes: list[str] | None = None, threads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure accuracy and agreement of every model of the run; write ``validate.json`` and metrics.

    Args:
        rd: The run directory.
        runtimes: Only these runtimes (None: every runtime that can run a model of the run).
        threads: Threads for each runtime (None: its default).
        progress: Called with one line per model.

    Returns:
        ``{"run", "n_eval", "rows": [...], "skipped": [...]}``; each row has ``model`` (file stem), ``file``,
        ``source_model``, ``runtime``, ``format``, ``precision``, ``test_accuracy``, ``precision_macro``,
        ``recall_macro``, ``f1_macro``, ``agreement_teacher``, ``agreement_student_fp32``,
        ``accuracy_drop_vs_teacher``, ``size_bytes``, ``n_eval`` and ``seconds``.

    Raises:
        ArtifactChanged: A file it would use changed since it was written (see :func:`check_inputs`; exit 1).
        RunDirError: No models, no eval.npz, a recorded file is missing, or every model failed to run.
    """
    from edgekd.bench import parse_runtimes
    from edgekd.runtimes import deployment_batch, runtime_for

    runtimes = parse_runtimes(runtimes)
    if threads is not None and threads <= 0:
        raise EdgeKDError(f"--threads must be positive, got {threads}")
    targets = discover_models(rd, runtimes)
    # Tamper check first: a file changed since it was written fails the command, nothing is measured.
    check_inputs(rd, targets)
    x, y = load_eval(rd)
    num_classes = len(_data_info(rd).get("labels") or []) or int(y.max()) + 1

    # References for agreement: the PyTorch fp32 teacher and student, whatever runtimes were asked for.
    refs: dict[str, np.ndarray] = {}
    all_targets = {t.file: t for t in discover_models(rd)}
    for role in ("teacher", "student"):
        t = all_targets.get(f"{role}.pt")
        if t is not None:
            refs[role] = runtime_for(rd / t.file, t.entry, threads, "torch").predict(x).argmax(1)

    rd.stage_started(STAGE)
    rows, skipped = [], []
    for t in targets:
        problem = _integrity_problem(rd, t)
        if problem is None:
            try:
                t0 = time.perf_counter()
                # Batch-1 truth: files whose answers depend on the batch are run as an app runs them.
                logits = runtime_for(rd / t.file, t.entry, threads, t.runtime).predict(
                    x, batch_size=deployment_batch(t.entry))
                seconds = time.perf_counter() - t0
                if logits.ndim != 2 or logits.shape[0] != len(y):
                    raise EdgeKDError(f"output shape {tuple(logits.shape)}, expected ({len(y)}, classes)")
            except EdgeKDError as e:
                problem = str(e)
            except Exception as e:  # a runtime's own error: report it for this file, validate the others
                problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if problem is not None:
            skipped.append({"model": t.stem, "file": t.file, "runtime": t.runtime, "reason": problem})
            if progress:
                progress(f"{t.file:32s} {t.runtime:12s} skipped: {problem}")
            continue
        pred = logits.argmax(1)
        row = {"model": t.stem, "file": t.file, "source_model": t.source_model, "runtime": t.runtime,
               "format": t.format, "precision": t.precision, "profile": (t.entry or {}).get("profile", "research"),
               **_classification(pred, y, num_classes),
               "agreement_teacher": float((pred == refs["teacher"]).mean()) if "teacher" in refs else None,
               "agreement_student_fp32": float((pred == refs["student"]).mean()) if "student" in refs else None,
               "size_bytes": _size(rd, t.file), "n_eval": int(len(y)), "seconds": round(seconds, 3)}
        rows.append(row)
        if progress:
            progress(f"{t.file:32s} {t.runtime:12s} acc {row['test_accuracy']:.4f}  f1 {row['f1_macro']:.4f}  "
                     f"agree(teacher) {_fmt(row['agreement_teacher'])}  "
                     f"agree(student fp32) {_fmt(row['agreement_student_fp32'])}")
    if not rows:
        raise RunDirError(f"no model of {rd.path} could be run: " +
                          "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]))
    teacher_acc = next((r["test_accuracy"] for r in rows if r["file"] == "teacher.pt"), None)
    if teacher_acc is None:
        teacher_acc = rd.metrics().get("teacher", {}).get("test_accuracy")
    for row in rows:
        row["accuracy_drop_vs_teacher"] = None if teacher_acc is None else teacher_acc - row["test_accuracy"]
    result = {"schema_version": 1, "run": rd.name, "n_eval": int(len(y)), "teacher_accuracy": teacher_acc,
              "rows": rows, "skipped": skipped}
    write_json_atomic(rd / VALIDATE_JSON, result)
    for row in rows:
        if row["format"] != "pt":  # exported files go under their file name; .pt roles already have entries
            rd.update_metrics(row["file"], {k: row[k] for k in (
                "test_accuracy", "precision_macro", "recall_macro", "f1_macro", "agreement_teacher",
                "agreement_student_fp32", "accuracy_drop_vs_teacher", "size_bytes")} | {"runtime": row["runtime"]})
    rd.record_artifacts(VALIDATE_JSON)
    rd.stage_done(STAGE, artifact=VALIDATE_JSON, rows=len(rows), skipped=len(skipped))
    return result


def _size(rd: RunDir, file: str) -> int:
    from edgekd.bench import _file_size

    return _file_size(rd, file)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def read_validation(rd: RunDir) -> dict[str, Any]:
    """``validate.json`` of a run, or ``{}`` before validate ran."""
    return read_rows_report(rd / VALIDATE_JSON, "edgekd validate")


def validate_summary(result: dict[str, Any]) -> str:
    """A plain-text table of the validation rows."""
    from edgekd.summary import table

    rows = [[r["file"], r["runtime"], r["precision"], f"{r['test_accuracy']:.4f}", f"{r['f1_macro']:.4f}",
             _fmt(r["agreement_teacher"]), _fmt(r["agreement_student_fp32"]), f"{r['size_bytes'] / 1024:.1f}"]
            for r in result.get("rows", [])]
    text = table(["file", "runtime", "precision", "test_acc", "macro_f1", "agree_teacher", "agree_student",
                  "size_KB"], rows)
    for s in result.get("skipped", []):
        text += f"\nskipped {s['file']} ({s['runtime']}): {s['reason']}"
    return text


# -- budgets and the recommended file ---------------------------------------------------------------------

def _candidates(validation: dict[str, Any], bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Deployable student variants: one per (file, runtime), with accuracy, size and best measured p50.

    Exported files are the candidates when the run has any; otherwise the PyTorch student checkpoints are.
    The p50 is the lowest over the measured thread counts (an app picks its thread count).
    """
    rows = [r for r in validation.get("rows", []) if r["source_model"] not in REFERENCE_MODELS]
    exported = [r for r in rows if r["format"] != "pt"]
    rows = exported or rows
    out = []
    for r in rows:
        lat = [b for b in bench.get("rows", []) if b["file"] == r["file"] and b["runtime"] == r["runtime"]]
        best = min(lat, key=lambda b: b["p50_ms"]) if lat else None
        out.append({"file": r["file"], "model": r["model"], "source_model": r["source_model"],
                    "runtime": r["runtime"], "precision": r["precision"], "profile": r.get("profile", "research"),
                    "test_accuracy": r["test_accuracy"],
                    "accuracy_drop_vs_teacher": r.get("accuracy_drop_vs_teacher"), "size_bytes": r["size_bytes"],
                    "p50_ms": best["p50_ms"] if best else None, "threads": best["threads"] if best else None,
                    "batch": best.get("batch") if best else None})
    return out


def _student_fp32_accuracy(validation: dict[str, Any]) -> float | None:
    return next((r["test_accuracy"] for r in validation.get("rows", []) if r["file"] == "student.pt"), None)


def recommend(validation: dict[str, Any], bench: dict[str, Any], budgets: Any | None = None,
              default_drop_vs_student: float = 0.01) -> dict[str, Any]:
    """The fastest student variant that meets the accuracy (and size) budget.

    Args:
        validation: ``validate.json`` content.
        bench: ``report.json`` content (``{}`` when bench has not run: then the smallest file wins).
        budgets: The recipe's ``validate`` section (a ``ValidateConfig``) or None.
        default_drop_vs_student: Without ``max_accuracy_drop``, a variant may lose at most this much accuracy
            against the PyTorch fp32 student (the export tolerance), so a broken quantization is never picked.

    Returns:
        ``{"recommended": candidate or None, "rule": "...", "candidates": [...]}``.
    """
    cands = _candidates(validation, bench)
    max_drop = getattr(budgets, "max_accuracy_drop", None)
    max_kb = getattr(budgets, "max_size_kb", None)
    student_acc = _student_fp32_accuracy(validation)
    if max_drop is not None:
        rule = f"accuracy within {100 * max_drop:.2f} points of the teacher (validate.max_accuracy_drop)"

        def accurate(c: dict[str, Any]) -> bool:
            return c["accuracy_drop_vs_teacher"] is not None and c["accuracy_drop_vs_teacher"] <= max_drop + 1e-12
    elif student_acc is not None:
        rule = (f"accuracy within {100 * default_drop_vs_student:.2f} points of the PyTorch fp32 student "
                "(no validate.max_accuracy_drop set)")

        def accurate(c: dict[str, Any]) -> bool:
            return c["test_accuracy"] >= student_acc - default_drop_vs_student - 1e-12
    else:
        rule = "no accuracy reference"

        def accurate(c: dict[str, Any]) -> bool:
            return True
    if max_kb is not None:
        rule += f" and at most {max_kb:g} KB (validate.max_size_kb)"
    ok = [c for c in cands if accurate(c) and (max_kb is None or c["size_bytes"] / 1024 <= max_kb)]
    if any(c["profile"] == "app" for c in ok):
        # Image runs: recommend a file apps load unchanged (pixels in, metadata, labels); the research files
        # compute the same and stay in the candidates.
        ok = [c for c in ok if c["profile"] == "app"]
        rule += ", among the app-profile files"
    timed = [c for c in ok if c["p50_ms"] is not None]
    if timed:
        best = min(timed, key=lambda c: c["p50_ms"])
        rule = "fastest p50 with " + rule
    elif ok:
        best = min(ok, key=lambda c: c["size_bytes"])
        rule = "smallest file (no latency measured) with " + rule
    else:
        best = None
    return {"recommended": best, "rule": rule, "candidates": cands}


def check_budgets(validation: dict[str, Any], bench: dict[str, Any], budgets: Any | None) -> dict[str, Any]:
    """Check the recipe's ``validate`` budgets against measured results.

    With ``scope: any`` (the default) the check passes when at least one student variant meets every budget
    (the recommended file is then one that does); with ``scope: all`` every student variant must. Teacher and
    scratch-baseline files are references and are never checked.

    Returns:
        ``{"ok": bool, "failures": ["file (runtime): what broke", ...], "checked": [...], "budgets": {...}}``.
    """
    spec = {k: getattr(budgets, k, None) for k in ("max_accuracy_drop", "max_p50_ms", "max_size_kb")}
    scope = getattr(budgets, "scope", "any") or "any"
    result: dict[str, Any] = {"ok": True, "failures": [], "checked": [], "budgets": spec, "scope": scope}
    if budgets is None or all(v is None for v in spec.values()):
        return result
    per_candidate = []
    for c in _candidates(validation, bench):
        broke = []
        drop = c["accuracy_drop_vs_teacher"]
        if spec["max_accuracy_drop"] is not None:
            if drop is None:
                broke.append("accuracy drop vs teacher unknown (no teacher accuracy)")
            elif drop > spec["max_accuracy_drop"] + 1e-12:
                broke.append(f"accuracy drop vs teacher {100 * drop:.2f} points > {100 * spec['max_accuracy_drop']:.2f}")
        if spec["max_p50_ms"] is not None:
            if c["p50_ms"] is None:
                broke.append("p50 latency not measured (run `edgekd bench`)")
            elif c["p50_ms"] > spec["max_p50_ms"]:
                broke.append(f"p50 {c['p50_ms']:.3f} ms > {spec['max_p50_ms']:g} ms")
        if spec["max_size_kb"] is not None and c["size_bytes"] / 1024 > spec["max_size_kb"]:
            broke.append(f"size {c['size_bytes'] / 1024:.1f} KB > {spec['max_size_kb']:g} KB")
        per_candidate.append((c, broke))
        result["checked"].append({"file": c["file"], "runtime": c["runtime"], "broke": broke})
    failing = [(c, b) for c, b in per_candidate if b]
    if not per_candidate:
        result["ok"] = False
        result["failures"] = ["no student variant was validated"]
    elif scope == "all":
        result["ok"] = not failing
    else:
        result["ok"] = len(failing) < len(per_candidate)
    if not result["ok"]:
        result["failures"] = result["failures"] or [f"{c['file']} ({c['runtime']}): {', '.join(b)}"
                                                    for c, b in failing]
    return result


def raise_if_failed(check: dict[str, Any]) -> None:
    """Raise :class:`CheckFailed` listing every broken budget."""
    if check["ok"]:
        return
    head = "every" if check.get("scope") == "all" else "no"
    what = "student variant must meet the budgets" if head == "every" else "student variant meets every budget"
    raise CheckFailed(f"{head} {what}: " + "; ".join(check["failures"]))


def quick_latency(rd: RunDir, validation: dict[str, Any], threads: int = 1, runs: int = 50,
                  warmup: int = 10) -> dict[str, Any]:
    """Batch-1 p50 of the student variants, measured in this process, for a latency budget without a bench.

    Returns a ``report.json``-shaped ``{"rows": [...]}`` holding only the timing keys.
    """
    from edgekd.bench import batch_of, measure

    x, _ = load_eval(rd)
    x1 = batch_of(x, 1)
    targets = {(t.file, t.runtime): t for t in discover_models(rd)}
    rows = []
    for c in _candidates(validation, {}):
        t = targets.get((c["file"], c["runtime"]))
        if t is None:
            continue
        res = measure(rd / t.file, t.entry, t.runtime, threads, x1, warmup, runs=runs)
        rows.append({"file": t.file, "runtime": t.runtime, "threads": threads, "batch": 1, "p50_ms": res["p50_ms"]})
    return {"rows": rows, "settings": {"threads": [threads], "runs": runs, "warmup": warmup, "batch": 1,
                                       "note": "quick in-process measurement by validate (no bench report)"}}


def load_budgets(rd: RunDir, overrides: tuple[str, ...] | list[str] = ()) -> Any | None:
    """The ``validate`` section of the run's resolved recipe, with ``--set validate.x=...`` overrides."""
    from edgekd.recipe import load_recipe

    path = rd / "recipe.yaml"
    if not path.is_file():
        if overrides:
            raise RunDirError(f"{path} not found, so --set has nothing to override")
        return None
    return load_recipe(path, list(overrides)).validate_
