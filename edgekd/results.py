"""Typed results of the stages, and the one budget verdict, shared by ``validate``, ``bench``, ``report`` and ``run``.

Every stage result is a dataclass with ``to_json()`` / ``from_json()`` that writes and reads exactly the JSON the
run directory holds (``validate.json``, ``report.json``, the sections of ``metrics.json``): other tools read those
files, so the keys are a contract. Keys a type does not know (a newer writer, a hand-added note) are kept in
``extra`` and written back unchanged.

A stage returns its result; a later stage or the report reads it with ``<Type>.read(rd)`` instead of importing
the stage that wrote it. The budget verdict (:func:`recommend`, :func:`check_budgets`) lives here too, so
``edgekd validate``, ``edgekd run`` and ``edgekd report`` all judge a run by the same rule.

This module is a library: it imports only the ground floor (``errors``, ``recipe``, ``run_dir``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgekd.errors import CheckFailed
from edgekd.recipe import ValidateConfig
from edgekd.run_dir import PRUNED_STUDENT, RunDir, read_rows_report

VALIDATE_JSON = "validate.json"
REPORT_JSON = "report.json"
# Models that are references, not deployable student variants: budgets and recommendations skip them.
REFERENCE_MODELS = ("teacher", "baseline")

R = TypeVar("R", bound="Record")


class Record:
    """``to_json``/``from_json`` for a dataclass: its fields in declaration order, then ``extra``.

    ``_nested`` maps a field holding a record (or a list of records) to that record type.
    """

    _nested: ClassVar[dict[str, type[Record]]] = {}
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict, keys in the order the files have always had."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name != "extra":
                out[f.name] = _dump(getattr(self, f.name))
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """Build from parsed JSON; missing keys take their defaults, unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}  # type: ignore[arg-type]
        known: dict[str, Any] = {}
        for key in names & data.keys():
            value = data[key]
            item = cls._nested.get(key)
            if item is not None and isinstance(value, list):
                value = [item.from_json(v) for v in value]
            elif item is not None and isinstance(value, dict):
                value = item.from_json(value)
            known[key] = value
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})  # type: ignore[call-arg]


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# -- validate ---------------------------------------------------------------------------------------------

@dataclass
class ValidationRow(Record):
    """Accuracy of one model file in one runtime (a row of ``validate.json``)."""

    model: str = ""  # the file's stem
    file: str = ""
    source_model: str = ""  # the model it was made from: teacher, baseline, student, student_pruned...
    runtime: str = ""
    format: str = ""
    precision: str = "fp32"
    profile: str = "research"  # "app": an app-profile file (pixels in, TFLite metadata), see edgekd.export
    test_accuracy: float | None = None
    precision_macro: float | None = None
    recall_macro: float | None = None
    f1_macro: float | None = None
    agreement_teacher: float | None = None
    agreement_student_fp32: float | None = None
    size_bytes: int = 0
    n_eval: int | None = None
    seconds: float | None = None
    accuracy_drop_vs_teacher: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_student(self) -> bool:
        return self.source_model not in REFERENCE_MODELS


@dataclass
class ValidationSkip(Record):
    """A model file validate could not run, and why."""

    model: str = ""
    file: str = ""
    runtime: str = ""
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ValidationResult(Record):
    """``validate.json``: every (file, runtime) row and the files that could not be run."""

    _nested: ClassVar[dict[str, type[Record]]] = {"rows": ValidationRow, "skipped": ValidationSkip}
    schema_version: int = 1
    run: str = ""
    n_eval: int = 0
    teacher_accuracy: float | None = None
    rows: list[ValidationRow] = field(default_factory=list)
    skipped: list[ValidationSkip] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, rd: RunDir) -> ValidationResult:
        """The run's ``validate.json`` (an empty result before validate ran)."""
        return cls.from_json(read_rows_report(rd / VALIDATE_JSON, "edgekd validate"))

    def row(self, file: str, runtime: str | None = None) -> ValidationRow | None:
        """The row of ``file`` (in ``runtime``, when given), or None."""
        return next((r for r in self.rows if r.file == file and runtime in (None, r.runtime)), None)


# -- bench ------------------------------------------------------------------------------------------------

@dataclass
class BenchRow(Record):
    """Latency, memory and size of one model file in one runtime at one thread count (a row of ``report.json``)."""

    model: str = ""
    file: str = ""
    runtime: str = ""
    threads: int = 1
    source_model: str = ""
    format: str = ""
    precision: str = "fp32"
    batch: int | None = 1
    load_ms: float | None = None
    first_inference_ms: float | None = None
    p50_ms: float = 0.0
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    runs: int | None = None
    throughput_ips: float | None = None
    rss_before_load_mb: float | None = None
    peak_rss_mb: float | None = None
    model_rss_mb: float | None = None
    loadavg_1m: float | None = None
    size_bytes: int = 0
    params: int | None = None
    macs: int | None = None
    test_accuracy: float | None = None
    emulated: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BenchSkip(Record):
    """A (file, runtime, threads) bench could not measure, and why."""

    model: str = ""
    file: str = ""
    runtime: str = ""
    threads: int = 1
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BenchReport(Record):
    """``report.json``: the machine, the settings and one row per (file, runtime, threads)."""

    _nested: ClassVar[dict[str, type[Record]]] = {"rows": BenchRow, "skipped": BenchSkip}
    schema_version: int = 1
    run: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[BenchRow] = field(default_factory=list)
    skipped: list[BenchSkip] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, rd: RunDir) -> BenchReport:
        """The run's ``report.json`` (an empty report before bench ran)."""
        return cls.from_json(read_rows_report(rd / REPORT_JSON, "edgekd bench"))

    def fastest(self, file: str, runtime: str) -> BenchRow | None:
        """The row of ``file`` in ``runtime`` at the thread count with the lowest p50, or None."""
        rows = [b for b in self.rows if b.file == file and b.runtime == runtime]
        return min(rows, key=lambda b: b.p50_ms) if rows else None


# -- distill, prune, export (typed views of what those stages record) --------------------------------------

@dataclass
class ModelMetrics(Record):
    """One model's section of ``metrics.json`` (``teacher``, ``baseline``, ``student``, ``student_pruned``)."""

    test_accuracy: float | None = None
    f1_macro: float | None = None
    params: int | None = None
    macs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class DistillResult(Record):
    """What distill recorded in ``metrics.json``: teacher, scratch-baseline and KD-student metrics."""

    _nested: ClassVar[dict[str, type[Record]]] = {"teacher": ModelMetrics, "baseline": ModelMetrics,
                                                   "student": ModelMetrics}
    teacher: ModelMetrics | None = None
    baseline: ModelMetrics | None = None
    student: ModelMetrics | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, rd: RunDir) -> DistillResult:
        """The distill sections of the run's ``metrics.json`` (None for a model not trained)."""
        m = rd.metrics()
        return cls.from_json({k: m[k] for k in ("teacher", "baseline", "student") if isinstance(m.get(k), dict)})

    @property
    def kd_gain(self) -> float | None:
        """KD student minus scratch baseline test accuracy (None without both)."""
        if self.student is None or self.baseline is None or None in (self.student.test_accuracy,
                                                                     self.baseline.test_accuracy):
            return None
        return self.student.test_accuracy - self.baseline.test_accuracy


@dataclass
class PruneResult(Record):
    """What pruning did: returned by :func:`edgekd.models.pruning.prune_model` (counts, ratio, step log) and read
    back from ``metrics.json["student_pruned"]`` (:meth:`read`; accuracy, latency... in ``extra``)."""

    test_accuracy: float | None = None
    ratio: float | None = None
    params: int | None = None
    macs: int | None = None
    params_before: int | None = None
    macs_before: int | None = None
    protected: list[str] = field(default_factory=list)
    step_log: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def steps(self) -> list[dict[str, Any]]:
        """One row per pruning step (what each step left, and its fine-tuning figures)."""
        return self.step_log

    @property
    def mac_reduction(self) -> float | None:
        if self.macs_before is None or self.macs is None:
            return self.extra.get("mac_reduction")
        return self.macs_before / max(self.macs, 1)

    @property
    def param_reduction(self) -> float | None:
        if self.params_before is None or self.params is None:
            return self.extra.get("param_reduction")
        return self.params_before / max(self.params, 1)

    @classmethod
    def read(cls, rd: RunDir) -> PruneResult | None:
        entry = rd.metrics().get(PRUNED_STUDENT)
        return cls.from_json(entry) if isinstance(entry, dict) else None


@dataclass
class ExportReport(Record):
    """What an export or quantize call wrote (``files``), failed to convert and failed to verify."""

    run: str = ""
    files: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # conversions that did not produce a file (exit 2)
    problems: list[str] = field(default_factory=list)  # files that miss the tolerance (exit 1)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems

    @property
    def warnings(self) -> list[str]:
        """One line per failed conversion or verification, as ``edgekd run`` prints them."""
        return [f"export: {msg}" for msg in [*self.failures, *self.problems]]

    def raise_for_problems(self) -> None:
        """Raise :class:`ExportError` for failed conversions, else :class:`CheckFailed` for failed checks."""
        from edgekd.errors import CheckFailed, ExportError

        if self.failures:
            also = f"; also failed verification: {'; '.join(self.problems)}" if self.problems else ""
            written = f" (written: {', '.join(self.files)})" if self.files else ""
            raise ExportError("; ".join(self.failures) + also + written)
        if self.problems:
            raise CheckFailed("; ".join(self.problems),
                              "see metrics.json; loosen export.tolerance or pass --no-verify to keep the files")


# -- the budget verdict and the recommended file ----------------------------------------------------------

@dataclass
class Candidate(Record):
    """A deployable student variant: one (file, runtime) with accuracy, size and its best measured p50."""

    file: str = ""
    model: str = ""
    source_model: str = ""
    runtime: str = ""
    precision: str = ""
    profile: str = "research"
    test_accuracy: float = 0.0
    accuracy_drop_vs_teacher: float | None = None
    size_bytes: int = 0
    p50_ms: float | None = None
    threads: int | None = None
    batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def size_kb(self) -> float:
        return self.size_bytes / 1024


@dataclass
class Recommendation:
    """The recommended file (None when nothing qualifies), the rule that chose it, and every candidate."""

    recommended: Candidate | None
    rule: str
    candidates: list[Candidate]


@dataclass
class BudgetCheck(Record):
    """The recipe's ``validate`` budgets checked against measured results (``metrics.json["report"]["budgets"]``)."""

    ok: bool = True
    failures: list[str] = field(default_factory=list)
    checked: list[dict[str, Any]] = field(default_factory=list)  # {"file", "runtime", "broke": [...]}
    budgets: dict[str, float | None] = field(default_factory=dict)
    scope: str = "any"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def any_set(self) -> bool:
        return any(v is not None for v in self.budgets.values())

    def raise_if_failed(self) -> None:
        """Raise :class:`CheckFailed` (exit code 1) listing every broken budget."""
        if self.ok:
            return
        if self.scope == "all":
            raise CheckFailed("every student variant must meet the budgets: " + "; ".join(self.failures))
        raise CheckFailed("no student variant meets every budget: " + "; ".join(self.failures))


_BUDGET_KEYS = ("max_accuracy_drop", "max_p50_ms", "max_size_kb", "max_flash_kb", "max_ram_kb")


def candidates(validation: ValidationResult, bench: BenchReport) -> list[Candidate]:
    """Deployable student variants: one per (file, runtime), with accuracy, size and best measured p50.

    Exported files are the candidates when the run has any; otherwise the PyTorch student checkpoints are.
    The p50 is the lowest over the measured thread counts (an app picks its thread count).
    """
    rows = [r for r in validation.rows if r.is_student]
    rows = [r for r in rows if r.format != "pt"] or rows
    out = []
    for r in rows:
        best = bench.fastest(r.file, r.runtime)
        out.append(Candidate(file=r.file, model=r.model, source_model=r.source_model, runtime=r.runtime,
                             precision=r.precision, profile=r.profile, test_accuracy=r.test_accuracy or 0.0,
                             accuracy_drop_vs_teacher=r.accuracy_drop_vs_teacher, size_bytes=r.size_bytes,
                             p50_ms=best.p50_ms if best else None, threads=best.threads if best else None,
                             batch=best.batch if best else None))
    return out


def _accuracy_rule(validation: ValidationResult, budgets: ValidateConfig | None,
                   default_drop_vs_student: float) -> tuple[str, Any]:
    """The accuracy rule a recommended file must meet, as a sentence and a predicate."""
    max_drop = getattr(budgets, "max_accuracy_drop", None)
    student = validation.row("student.pt")
    if max_drop is not None:
        return (f"accuracy within {100 * max_drop:.2f} points of the teacher (validate.max_accuracy_drop)",
                lambda c: c.accuracy_drop_vs_teacher is not None and c.accuracy_drop_vs_teacher <= max_drop + 1e-12)
    if student is not None and student.test_accuracy is not None:
        floor = student.test_accuracy - default_drop_vs_student - 1e-12
        return (f"accuracy within {100 * default_drop_vs_student:.2f} points of the PyTorch fp32 student "
                "(no validate.max_accuracy_drop set)", lambda c: c.test_accuracy >= floor)
    return "no accuracy reference", lambda c: True


def recommend(validation: ValidationResult, bench: BenchReport, budgets: ValidateConfig | None = None,
              default_drop_vs_student: float = 0.01) -> Recommendation:
    """The fastest student variant that meets the accuracy (and size) budget.

    Args:
        validation: What validate measured.
        bench: What bench measured (empty when bench has not run: then the smallest file wins).
        budgets: The recipe's ``validate`` section, or None.
        default_drop_vs_student: Without ``max_accuracy_drop``, a variant may lose at most this much accuracy
            against the PyTorch fp32 student (the export tolerance), so a broken quantization is never picked.
    """
    cands = candidates(validation, bench)
    rule, accurate = _accuracy_rule(validation, budgets, default_drop_vs_student)
    max_kb = getattr(budgets, "max_size_kb", None)
    if max_kb is not None:
        rule += f" and at most {max_kb:g} KB (validate.max_size_kb)"
    ok = [c for c in cands if accurate(c) and (max_kb is None or c.size_kb <= max_kb)]
    if any(c.profile == "app" for c in ok):
        # Image runs: recommend a file apps load unchanged (pixels in, metadata, labels); the research files
        # compute the same and stay among the candidates.
        ok = [c for c in ok if c.profile == "app"]
        rule += ", among the app-profile files"
    timed = [c for c in ok if c.p50_ms is not None]
    best = None
    if timed:
        best = min(timed, key=lambda c: c.p50_ms)
        rule = "fastest p50 with " + rule
    elif ok:
        best = min(ok, key=lambda c: c.size_bytes)
        rule = "smallest file (no latency measured) with " + rule
    return Recommendation(best, rule, cands)


def _broken_budgets(c: Candidate, spec: dict[str, float | None]) -> list[str]:
    """What one candidate breaks of the budgets ``spec``."""
    broke = []
    drop, max_drop = c.accuracy_drop_vs_teacher, spec["max_accuracy_drop"]
    if max_drop is not None:
        if drop is None:
            broke.append("accuracy drop vs teacher unknown (no teacher accuracy)")
        elif drop > max_drop + 1e-12:
            broke.append(f"accuracy drop vs teacher {100 * drop:.2f} points > {100 * max_drop:.2f}")
    if spec["max_p50_ms"] is not None:
        if c.p50_ms is None:
            broke.append("p50 latency not measured (run `edgekd bench`)")
        elif c.p50_ms > spec["max_p50_ms"]:
            broke.append(f"p50 {c.p50_ms:.3f} ms > {spec['max_p50_ms']:g} ms")
    if spec["max_size_kb"] is not None and c.size_kb > spec["max_size_kb"]:
        broke.append(f"size {c.size_kb:.1f} KB > {spec['max_size_kb']:g} KB")
    return broke


def check_budgets(validation: ValidationResult, bench: BenchReport, budgets: ValidateConfig | None) -> BudgetCheck:
    """The budget verdict: the recipe's ``validate`` budgets against measured results.

    With ``scope: any`` (the default) the check passes when at least one student variant meets every budget
    (the recommended file is then one that does); with ``scope: all`` every student variant must. Teacher and
    scratch-baseline files are references and are never checked.
    """
    spec = {k: getattr(budgets, k, None) for k in _BUDGET_KEYS}
    check = BudgetCheck(budgets=spec, scope=getattr(budgets, "scope", "any") or "any")
    if not check.any_set:
        return check
    judged = [(c, _broken_budgets(c, spec)) for c in candidates(validation, bench)]
    check.checked = [{"file": c.file, "runtime": c.runtime, "broke": broke} for c, broke in judged]
    failing = [(c, broke) for c, broke in judged if broke]
    if not judged:
        check.ok, check.failures = False, ["no student variant was validated"]
        return check
    check.ok = not failing if check.scope == "all" else len(failing) < len(judged)
    if not check.ok:
        check.failures = [f"{c.file} ({c.runtime}): {', '.join(broke)}" for c, broke in failing]
    mcu = mcu_budget_failures(validation, spec["max_flash_kb"], spec["max_ram_kb"])
    if mcu:
        check.ok, check.failures = False, check.failures + mcu
    return check


def mcu_budget_failures(validation: ValidationResult, max_flash_kb: float | None,
                        max_ram_kb: float | None) -> list[str]:
    """What every MCU file of the run breaks of ``validate.max_flash_kb`` / ``max_ram_kb`` (whatever the scope).

    Flash is the model array (the MCU file); RAM the tensor arena the firmware reserves (TFLM keeps the input
    and output tensors inside it).
    """
    if max_flash_kb is None and max_ram_kb is None:
        return []
    files = {r.file: r.extra["mcu"] for r in validation.rows if isinstance(r.extra.get("mcu"), dict)}
    if not files:
        return ["validate.max_flash_kb/max_ram_kb are set, but the run has no MCU file "
                "(add mcu to export.formats, then run `edgekd export` and `edgekd validate` again)"]
    out = []
    for name, m in files.items():
        broke = []
        if max_flash_kb is not None and m["flash_bytes"] / 1024 > max_flash_kb:
            broke.append(f"flash {m['flash_bytes'] / 1024:.1f} KB > {max_flash_kb:g} KB (validate.max_flash_kb)")
        if max_ram_kb is not None and m["ram_bytes"] / 1024 > max_ram_kb:
            broke.append(f"RAM {m['ram_bytes'] / 1024:.1f} KB (tensor arena) > {max_ram_kb:g} KB "
                         "(validate.max_ram_kb)")
        if broke:
            out.append(f"{name} (tflm): {', '.join(broke)}")
    return out


# -- report -----------------------------------------------------------------------------------------------

@dataclass
class ReportSummary(Record):
    """``metrics.json["report"]``: the recommended file, speedup, quantization findings, budgets, devices."""

    _nested: ClassVar[dict[str, type[Record]]] = {"recommended": Candidate, "budgets": BudgetCheck}
    recommended: Candidate | None = None
    rule: str = ""
    speedup: dict[str, Any] | None = None  # see edgekd.report.speedup_summary
    quantization: list[dict[str, Any]] = field(default_factory=list)  # see edgekd.report.quantization_findings
    budgets: BudgetCheck = field(default_factory=BudgetCheck)
    devices: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, rd: RunDir) -> ReportSummary | None:
        """The run's report summary, or None before ``edgekd report`` ran."""
        entry = rd.metrics().get("report")
        return cls.from_json(entry) if isinstance(entry, dict) else None


@dataclass
class ReportResult:
    """What ``edgekd report`` wrote: the two report files and the summary it recorded."""

    markdown: Path
    html: Path
    summary: ReportSummary
    lines: list[str] = field(default_factory=list)  # the report's summary (Markdown), at most 8 lines
    notes: list[str] = field(default_factory=list)  # the long form behind it (Markdown)
