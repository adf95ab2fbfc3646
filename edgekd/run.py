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
import inspect
import json
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError, RecipeError, RunDirError
from edgekd.recipe import Recipe, load_recipe, save_recipe
from edgekd.run_dir import MANIFEST, RunDir

STAGES = ("distill", "prune", "export", "validate", "bench", "report")
# Recipe keys the distill stage does not read: they may change without retraining.
_LATER_SECTIONS = ("prune", "export", "validate", "bench")


def _section_sha(recipe: Recipe, stage: str) -> str:
    """A fingerprint of what a stage reads from the recipe (the whole distill part for distill)."""
    d = recipe.to_dict()
    if stage == "distill":
        part = {k: v for k, v in d.items() if k not in (*_LATER_SECTIONS, "name")}
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


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a stage function with the keyword arguments it accepts (stages are owned by other modules)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _run_export(rd: RunDir, recipe: Recipe, quiet: bool, echo: Callable[[str], None]) -> list[str]:
    """Export (and quantize) with the recipe's ``export`` section; return warnings about files that failed.

    A file that failed to convert or missed its export tolerance does not stop the pipeline when others were
    written: validate measures every file that exists, the recommendation only takes accurate ones, and the
    warnings are printed and kept in the result. Nothing written at all is an error.
    """
    from edgekd.export import run_export

    report = _call(run_export, rd, cfg=recipe.export, quiet=quiet, log=None if quiet else echo)
    warnings = [f"export: {msg}" for msg in [*getattr(report, "failures", []), *getattr(report, "problems", [])]]
    if not getattr(report, "files", None):
        report.raise_for_problems()
        raise RunDirError(f"export wrote no file into {rd.path}", "check the recipe's `export` section")
    for w in warnings:
        echo(f"warning: {w}")
    return warnings


def run_pipeline(recipe: Recipe, out: str | Path = "exported", force: bool = False,
                 devices: list[str | Path] = (), quiet: bool = False, allow_pickle: bool = False,
                 echo: Callable[[str], None] = print, raise_on_budget: bool = True) -> dict[str, Any]:
    """Run every stage the recipe asks for, skipping what the run directory already holds.

    Args:
        recipe: The resolved recipe.
        out: Parent directory of run directories.
        force: Run every stage again, in a new run directory.
        devices: Device result JSON files to merge into the report.
        quiet: No progress bars or per-model lines.
        allow_pickle: Passed to distill (trusted checkpoints only).
        echo: Where progress lines go.
        raise_on_budget: Raise when a budget is broken (False: only report it in the result).

    Returns:
        ``{"run_dir", "ran": [...], "skipped": {stage: reason}, "report": {...}, "budgets": {...},
        "warnings": [...]}``.

    Raises:
        CheckFailed: A budget of the recipe's ``validate`` section is broken (after the report is written).
        EdgeKDError: Bad input in any stage.
    """
    from edgekd.bench import run_bench
    from edgekd.report import build_report, load_device_results
    from edgekd.validate import check_budgets, quick_latency, raise_if_failed, read_validation, run_validate

    for f in devices:  # bad input fails before hours of training, not after
        load_device_results(f)
    if recipe.bench is not None:
        from edgekd.bench import parse_threads

        try:
            parse_threads(recipe.bench.threads)
        except EdgeKDError as e:
            raise RecipeError(f"recipe bench.threads: {e.message}", "e.g. bench.threads: [1, 2]") from None
    progress = None if quiet else echo
    ran: list[str] = []
    skipped: dict[str, str] = {}
    warnings: list[str] = []

    rd = None if force else find_run(recipe, out)
    upstream_ran = False
    if rd is not None and rd.stage_status("distill") == "done":
        skipped["distill"] = f"already done in {rd.path}"
    else:
        from edgekd.distill import run_distill

        resume = rd is not None and rd.name == recipe.name  # an interrupted run of this recipe: continue it
        echo(f"[distill] {'resuming' if resume else 'training'} teacher, baseline and student")
        rd = run_distill(recipe, out=out, resume=resume, quiet=quiet, allow_pickle=allow_pickle)
        ran.append("distill")
        upstream_ran = True
    saved = _saved_recipe(rd)
    if saved is None or saved.to_dict() | {"name": None} != recipe.to_dict() | {"name": None}:
        # Later stages read their sections from the run's recipe.yaml: keep it the recipe being run.
        save_recipe(recipe.model_copy(update={"name": saved.name if saved else recipe.name}), rd / "recipe.yaml")
        rd.record_artifacts("recipe.yaml")

    def should_run(stage: str, section: Any) -> bool:
        nonlocal upstream_ran
        if section is None:
            skipped[stage] = "not in the recipe"
            return False
        entry = rd.manifest()["stages"].get(stage, {})
        if upstream_ran or force:
            return True
        if entry.get("status") != "done":
            return True
        if entry.get("recipe_sha") not in (None, _section_sha(recipe, stage)):
            echo(f"[{stage}] the recipe's `{stage}` section changed since it ran: running it again")
            return True
        skipped[stage] = "already done"
        return False

    def done(stage: str) -> None:
        nonlocal upstream_ran
        ran.append(stage)
        upstream_ran = True
        if rd.stage_status(stage) == "done":
            rd.stage_done(stage, recipe_sha=_section_sha(recipe, stage))

    if should_run("prune", recipe.prune):
        from edgekd.prune import run_prune

        # An interrupted prune of the same student with the same options continues from its last finished step.
        resume_prune = "auto" if not (upstream_ran or force) else False
        echo("[prune] pruning the student and fine-tuning it by KD")
        _call(run_prune, rd, quiet=quiet, resume=resume_prune)
        done("prune")
    if should_run("export", recipe.export):
        echo("[export] exporting to " + ", ".join(recipe.export.formats) + " with "
             + (", ".join(recipe.export.quantize) or "no quantization"))
        warnings += _run_export(rd, recipe, quiet, echo)
        done("export")
    # Validate always measures accuracy when the recipe has a validate section or budgets need it.
    if should_run("validate", recipe.validate_):
        echo("[validate] accuracy and agreement of every model in every runtime")
        run_validate(rd, progress=progress)
        done("validate")
    if recipe.bench is not None and should_run("bench", recipe.bench):
        b = recipe.bench
        echo(f"[bench] latency at threads {b.threads}, {b.runs} runs after {b.warmup} warm-up, batch {b.batch}")
        run_bench(rd, threads=b.threads, runs=b.runs, warmup=b.warmup, batch=b.batch, progress=progress)
        done("bench")
    elif recipe.bench is None:
        skipped["bench"] = "not in the recipe"

    budgets = recipe.validate_
    check = None
    if budgets is not None:
        from edgekd.bench import read_report

        validation = read_validation(rd)
        bench = read_report(rd)
        if budgets.max_p50_ms is not None and not bench.get("rows"):
            bench = quick_latency(rd, validation)
        check = check_budgets(validation, bench, budgets)
    echo("[report] writing report.md and report.html")
    report = build_report(rd, devices, budgets=budgets, budget_check=check)
    ran.append("report")
    result = {"run_dir": rd.path, "ran": ran, "skipped": skipped, "report": report, "budgets": check,
              "warnings": warnings}
    if check is not None and raise_on_budget:
        raise_if_failed(check)
    return result


def run_summary(result: dict[str, Any]) -> str:
    """The lines ``edgekd run`` ends with: what ran, the recommended file, the speedup, the report's path."""
    rep = result["report"]
    lines = [f"stages run: {', '.join(result['ran']) or 'none'}"]
    if result["skipped"]:
        lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()))
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    rec = rep.get("recommended")
    if rec:
        lat = f", p50 {rec['p50_ms']:.4f} ms at {rec['threads']} thread(s)" if rec.get("p50_ms") is not None else ""
        lines.append(f"recommended: {Path(result['run_dir']) / rec['file']} ({rec['runtime']}{lat}, "
                     f"accuracy {rec['test_accuracy']:.4f}, {rec['size_bytes'] / 1024:.1f} KB)")
    else:
        lines.append(f"recommended: none (no student variant qualifies: {rep.get('rule', 'see the report')})")
    sp = rep.get("speedup")
    if sp:
        who = "" if sp.get("qualifies", True) else f" (fastest student variant {sp['file']}, not recommended)"
        lines.append(f"speedup over the PyTorch fp32 teacher at batch {sp['batch']}: {sp['speedup']:.1f}x "
                     f"({100 * (sp['accuracy_ratio'] or 0):.1f}% of its accuracy){who}")
    slower = [q for q in rep.get("quantization", []) if not q["faster"]]
    for q in slower:
        lines.append(f"note: {q['file']} is not faster than {q['reference']} here "
                     f"({q['ratio']:.2f}x the fp32 p50, {q['runtime']}, {q['threads']} thread(s))")
    lines.append(f"report: {rep['html']}  (and {rep['markdown']})")
    return "\n".join(lines)


def resolve_recipe(recipe: str | None, overrides: tuple[str, ...] = (), name: str | None = None,
                   seed: int | None = None) -> Recipe:
    """Load the recipe ``edgekd run`` was given (None: the built-in default)."""
    if recipe is not None and Path(recipe).is_dir():
        raise RunDirError(f"{recipe} is a directory; `edgekd run` takes a recipe file",
                          "pass a recipe YAML (or nothing for the default recipe)")
    return load_recipe(recipe, overrides, name=name, seed=seed)
