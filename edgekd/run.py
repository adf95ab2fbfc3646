"""``edgekd run``: distill → prune → export (+quantize) → validate → bench → report, in one run directory.

Stages the recipe leaves out (``prune``, ``export``, ``validate``, ``bench`` are optional sections) are skipped.
Stages the run directory already completed (manifest ``stages[stage].status == "done"``) are skipped too,
unless ``force``; a stage whose recipe section changed since it ran is run again, and so is every stage after
one that ran. The report is always rewritten (it is cheap and device files may have changed), then budgets are
checked: a broken budget raises :class:`~edgekd.errors.CheckFailed` (exit 1) after the report is written, so CI
gets both the verdict and the report that explains it.

Which run directory: the newest ``<out>/<name>`` or ``<out>/<name>-N`` whose saved recipe matches the recipe in
everything distill uses; otherwise a new one. ``force`` always starts a new run directory (a finished run is
never overwritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError, RecipeError, RunDirError
from edgekd.recipe import Recipe, ValidateConfig, distill_part, load_recipe, save_recipe, without_execution_keys
from edgekd.results import (BudgetCheck, DistillResult, PruneResult, ReportResult, ValidationResult,
                            check_budgets)
from edgekd.run_dir import MANIFEST, RunDir

log = logging.getLogger(__name__)

STAGES = ("distill", "prune", "export", "qat", "validate", "bench", "report")


def _section_sha(recipe: Recipe, stage: str) -> str:
    """A fingerprint of what a stage reads from the recipe (the whole distill part for distill)."""
    d = without_execution_keys(recipe.to_dict())
    if stage == "distill":
        part = distill_part(d)
    elif stage == "validate":
        part = None  # the section holds only budgets: they change the verdict, not what validate measures
    else:
        part = d.get(stage)
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _saved_recipe(rd: RunDir) -> Recipe | None:
    try:
        return load_recipe(rd / "recipe.yaml")
    except EdgeKDError:
        return None


def find_run(recipe: Recipe, out: str | Path) -> RunDir | None:
    """The newest run directory of this recipe's name whose distill part matches the recipe, or None."""
    out = Path(out)
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        if not (p / MANIFEST).is_file():
            continue
        if p.name != recipe.name and not (p.name.startswith(recipe.name + "-") and p.name[len(recipe.name) + 1:].isdigit()):
            continue
        saved = _saved_recipe(RunDir(p))
        if saved is not None and _section_sha(saved, "distill") == _section_sha(recipe, "distill"):
            found.append(p)
    if not found:
        return None
    return RunDir(max(found, key=lambda p: (p / MANIFEST).stat().st_mtime))


@dataclass
class PipelineResult:
    """What ``edgekd run`` did: the run directory, stages run and skipped (with why), the report and verdict."""

    run_dir: Path
    ran: list[str]
    skipped: dict[str, str]
    report: ReportResult
    budgets: BudgetCheck | None
    warnings: list[str] = field(default_factory=list)
    distill: DistillResult | None = None  # the teacher, scratch-baseline and KD-student metrics
    prune: PruneResult | None = None  # the pruned student's metrics, when the recipe prunes


@dataclass
class _Progress:
    """Which stages ran or were skipped, and whether anything upstream ran (then every later stage runs)."""

    rd: RunDir
    recipe: Recipe
    force: bool
    upstream_ran: bool = False
    ran: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def should_run(self, stage: str, section: Any) -> bool:
        """Run a stage the recipe asks for unless the run already did it with the same recipe section."""
        if section is None:
            self.skipped[stage] = "not in the recipe"
            return False
        entry = self.rd.manifest()["stages"].get(stage, {})
        if self.upstream_ran or self.force or entry.get("status") != "done":
            return True
        if entry.get("recipe_sha") not in (None, _section_sha(self.recipe, stage)):
            log.info(f"[{stage}] the recipe's `{stage}` section changed since it ran: running it again")
            return True
        self.skipped[stage] = "already done"
        return False

    def done(self, stage: str) -> None:
        self.ran.append(stage)
        self.upstream_ran = True
        if self.rd.stage_status(stage) == "done":
            self.rd.stage_done(stage, recipe_sha=_section_sha(self.recipe, stage))


def _run_export(p: _Progress, quiet: bool) -> None:
    """Export (and quantize) with the recipe's ``export`` section; keep warnings about files that failed.

    A file that failed to convert or missed its export tolerance does not stop the pipeline when others were
    written: validate measures every file that exists, the recommendation only takes accurate ones, and the
    warnings are printed and kept in the result. Nothing written at all is an error.
    """
    from edgekd.export import run_export

    report = run_export(p.rd, cfg=p.recipe.export, quiet=quiet, log=None if quiet else log.info)
    warnings = report.warnings
    if not report.files:
        report.raise_for_problems()
        raise RunDirError(f"export wrote no file into {p.rd.path}", "check the recipe's `export` section")
    for w in warnings:
        log.warning(f"warning: {w}")
    p.warnings += warnings


def _check_early(recipe: Recipe, devices: list[str | Path]) -> None:
    """Bad input fails before hours of training, not after."""
    from edgekd.bench import parse_threads
    from edgekd.report import load_device_results

    for f in devices:
        load_device_results(f)
    if recipe.export is not None:
        from edgekd.export import check_formats

        # An unknown format (closest name as hint), a missing source (mcu without int8), a bad export.<name>
        # section, or a backend whose library is not installed (pte without ExecuTorch).
        check_formats(list(recipe.export.formats), recipe.export)
        if recipe.export.max_drop is not None:  # mixed files of mcu (full int8 only) or of no mixed route
            from edgekd.export.mixed import check_mixed_formats

            check_mixed_formats(list(recipe.export.formats))
    if recipe.bench is not None:
        try:
            parse_threads(recipe.bench.threads)
        except EdgeKDError as e:
            raise RecipeError(f"recipe bench.threads: {e.message}", "e.g. bench.threads: [1, 2]") from e


def _distill(recipe: Recipe, out: str | Path, force: bool, quiet: bool, allow_pickle: bool) -> _Progress:
    """Find the run of this recipe (distill done: skipped) or distill a new or interrupted one."""
    from edgekd.distill import run_distill

    rd = None if force else find_run(recipe, out)
    if rd is not None and rd.stage_status("distill") == "done":
        p = _Progress(rd, recipe, force)
        p.skipped["distill"] = f"already done in {rd.path}"
    else:
        resume = rd is not None and rd.name == recipe.name  # an interrupted run of this recipe: continue it
        log.info(f"[distill] {'resuming' if resume else 'training'} teacher, baseline and student")
        rd = run_distill(recipe, out=out, resume=resume, quiet=quiet, allow_pickle=allow_pickle)
        p = _Progress(rd, recipe, force, upstream_ran=True, ran=["distill"])
    saved = _saved_recipe(rd)
    if saved is None or saved.to_dict() | {"name": None} != recipe.to_dict() | {"name": None}:
        # Later stages read their sections from the run's recipe.yaml: keep it the recipe being run.
        save_recipe(recipe.model_copy(update={"name": saved.name if saved else recipe.name}), rd / "recipe.yaml")
        rd.record_artifacts("recipe.yaml")
    return p


def _later_stages(p: _Progress, quiet: bool) -> None:
    """prune → export → validate → bench, each when the recipe asks for it and the run does not hold it yet."""
    from edgekd.bench import run_bench
    from edgekd.prune import run_prune
    from edgekd.validate import run_validate

    recipe = p.recipe
    if p.should_run("prune", recipe.prune):
        # An interrupted prune of the same student with the same options continues from its last finished step.
        resume_prune = "auto" if not (p.upstream_ran or p.force) else False
        log.info("[prune] pruning the student and fine-tuning it by KD")
        run_prune(p.rd, quiet=quiet, resume=resume_prune)
        p.done("prune")
    if p.should_run("export", recipe.export):
        log.info("[export] exporting to " + ", ".join(recipe.export.formats) + " with "
                 + (", ".join(recipe.export.quantize) or "no quantization"))
        _run_export(p, quiet)
        p.done("export")
    if p.should_run("qat", recipe.qat):
        from edgekd.export.qat import run_qat

        # int8 files by QAT-KD next to (or, without int8 in export.quantize, instead of) the PTQ ones.
        log.info(f"[qat] quantization-aware distillation: {recipe.qat.epochs} epochs of KD with int8 fake quantization")
        run_qat(p.rd, cfg=recipe.qat, quiet=quiet, log=None if quiet else log.info,
                resume=not (p.upstream_ran or p.force))
        p.done("qat")
    if p.should_run("validate", recipe.validate_):
        log.info("[validate] accuracy and agreement of every model in every runtime")
        run_validate(p.rd)
        p.done("validate")
    if p.should_run("bench", recipe.bench):
        b = recipe.bench
        log.info(f"[bench] latency at threads {b.threads}, {b.runs} runs after {b.warmup} warm-up, batch {b.batch}")
        run_bench(p.rd, threads=b.threads, runs=b.runs, warmup=b.warmup, batch=b.batch)
        p.done("bench")


def budget_verdict(rd: RunDir, budgets: ValidateConfig | None) -> BudgetCheck | None:
    """The run's budget verdict (None without a ``validate`` section): the one rule validate and report use."""
    from edgekd.bench import latency_for_budgets

    if budgets is None:
        return None
    validation = ValidationResult.read(rd)
    return check_budgets(validation, latency_for_budgets(rd, validation, budgets), budgets)


def run_pipeline(recipe: Recipe, out: str | Path = "exported", force: bool = False,
                 devices: list[str | Path] = (), quiet: bool = False, allow_pickle: bool = False,
                 raise_on_budget: bool = True) -> PipelineResult:
    """Run every stage the recipe asks for, skipping what the run directory already holds.

    Logs one line per stage (``edgekd.run`` logger, level INFO).

    Args:
        recipe: The resolved recipe.
        out: Parent directory of run directories.
        force: Run every stage again, in a new run directory.
        devices: Device result JSON files to merge into the report.
        quiet: No progress bars or per-model lines.
        allow_pickle: Passed to distill (trusted checkpoints only).
        raise_on_budget: Raise when a budget is broken (False: only report it in the result).

    Raises:
        CheckFailed: A budget of the recipe's ``validate`` section is broken (after the report is written).
        EdgeKDError: Bad input in any stage.
    """
    from edgekd.report import build_report

    _check_early(recipe, devices)
    p = _distill(recipe, out, force, quiet, allow_pickle)
    _later_stages(p, quiet)
    check = budget_verdict(p.rd, recipe.validate_)
    log.info("[report] writing report.md and report.html")
    report = build_report(p.rd, devices, budgets=recipe.validate_, budget_check=check)
    p.ran.append("report")
    result = PipelineResult(p.rd.path, p.ran, p.skipped, report, check, p.warnings,
                            distill=DistillResult.read(p.rd), prune=PruneResult.read(p.rd))
    if check is not None and raise_on_budget:
        check.raise_if_failed()
    return result


def run_summary(result: PipelineResult, verbose: bool = False) -> str:
    """The lines ``edgekd run`` ends with: what ran, the report's summary (its notes too with ``verbose``), where it is."""
    from edgekd.summary import report_block

    lines = [f"stages run: {', '.join(result.ran) or 'none'}"]
    if result.skipped:
        lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in result.skipped.items()))
    lines += [f"warning: {w}" for w in result.warnings]
    lines.append(f"run: {result.run_dir}")
    lines += report_block(result.report.lines, result.report.notes, verbose)
    lines.append(f"report: {result.report.html}  (and {result.report.markdown})")
    return "\n".join(lines)


def resolve_recipe(recipe: str | None, overrides: tuple[str, ...] = (), name: str | None = None,
                   seed: int | None = None) -> Recipe:
    """Load the recipe ``edgekd run`` was given (None: the built-in default)."""
    if recipe is not None and Path(recipe).is_dir():
        raise RunDirError(f"{recipe} is a directory; `edgekd run` takes a recipe file",
                          "pass a recipe YAML (or nothing for the default recipe)")
    return load_recipe(recipe, overrides, name=name, seed=seed)
