"""The ``edgekd`` command line. Commands stay thin: parse options, call the stage, print a summary.

Shared options live in :mod:`edgekd.options`; recipe sections are merged with ``--set`` and command-line values
by :func:`edgekd.recipe.merge_section`. Heavy modules (torch and friends) are imported inside command bodies so
``edgekd --help`` is instant.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

import click

from edgekd import __version__
from edgekd.errors import EdgeKDError
from edgekd.options import (allow_pickle_option, device_files_option, out_option, quiet_option, recipe_options,
                            resume_option, run_dir_options, runtime_option, seed_option, set_option, setup_logging,
                            verbose_option)


# OSErrors that mean "this output location cannot be written", reported as bad input (exit code 2). ENOTDIR and
# EEXIST come from creating a folder below a path that is a file (`--out some/file/x`).
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                       errno.EEXIST, errno.ENAMETOOLONG}


class EdgeKDGroup(click.Group):
    """Turns edgekd errors into one line on stderr and their exit code (traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeKDError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {e}", err=True, fg="red")
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished epochs are saved; continue with --resume", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except OSError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if e.errno not in _ENVIRONMENT_ERRNOS:
                _internal_error(ctx, e)
            # Disk full, read-only or forbidden output, a file where a folder should be: the user's environment,
            # not a bug in edgekd.
            where = f" {e.filename}" if e.filename else ""
            fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path"
            click.secho(f"error: cannot write{where}: {e.strerror} ({fix} or choose another --out/--dest)",
                        err=True, fg="red")
            ctx.exit(2)
        except Exception as e:  # a bug: one line by default, the traceback with --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _internal_error(ctx, e)


def _internal_error(ctx: click.Context, e: BaseException) -> None:
    """Report a bug in one line, exit code 1."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    click.secho(f"error: internal error {type(e).__name__}: {first} "
                "(rerun with `edgekd --debug ...` for the traceback and please report it)", err=True, fg="red")
    ctx.exit(1)


@click.group(cls=EdgeKDGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekd")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Distill, prune, quantize and export small models for edge devices, with measured accuracy and speed."""
    ctx.ensure_object(dict)["debug"] = debug
    setup_logging(quiet=False)  # a command's -q lowers it to warnings


@cli.command()
@click.argument("recipe", required=False)
@recipe_options()
@resume_option
@quiet_option("No progress bars.")
@allow_pickle_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Training device (auto: CUDA, then MPS, then CPU). Under torchrun, one process per device.")
def distill(recipe: str | None, out: str, name: str | None, seed: int | None, overrides: tuple[str, ...],
            resume: bool, quiet: bool, allow_pickle: bool, device: str) -> None:
    """Train (or load) the teacher, then distill the student; RECIPE defaults to the built-in mnist recipe.

    For several processes: torchrun --nproc_per_node=N -m edgekd distill RECIPE (DDP; rank 0 writes the run).
    """
    from edgekd.distill.launch import run_distill_everywhere
    from edgekd.recipe import load_recipe
    from edgekd.summary import distill_summary

    r = load_recipe(recipe, overrides, name=name, seed=seed)
    rd = run_distill_everywhere(r, out=out, device_name=device, resume=resume, quiet=quiet, allow_pickle=allow_pickle)
    if rd is not None:
        click.echo(distill_summary(rd))


@cli.command("losses")
def list_losses() -> None:
    """List the distillation losses a recipe can name in distill.loss.name."""
    from edgekd import losses

    for name, doc in losses.available().items():
        click.echo(f"{name:10s} {doc}")


@cli.command("sweep")
@click.argument("recipe", required=False)
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Finished trials the study should hold; running again continues up to this number.")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db); share one "
              "database URL to run trials on several machines.")
@click.option("--study-name", default=None, help="Study name (default: <recipe name>-sweep).")
@click.option("--losses", "loss_names", default=None, metavar="NAMES",
              help="Also choose the loss among these, comma-separated (e.g. kd,dkd).")
@out_option("Folder for the study, teacher, best_recipe.yaml and trials.png (default: sweeps/<study name>).",
            default=None)
@seed_option
@set_option("distill.epochs=3")
@quiet_option("No progress lines.")
@allow_pickle_option
def sweep_cmd(recipe: str | None, trials: int, storage: str | None, study_name: str | None, loss_names: str | None,
              out: str | None, seed: int | None, overrides: tuple[str, ...], quiet: bool, allow_pickle: bool) -> None:
    """Tune distill.loss (temperature, alpha or loss weights; optionally which loss) on validation with Optuna."""
    from edgekd.recipe import load_recipe
    from edgekd.sweep import run_sweep

    r = load_recipe(recipe, overrides, seed=seed)
    names = [n.strip() for n in loss_names.split(",") if n.strip()] if loss_names else None
    result = run_sweep(r, trials=trials, out=out, storage=storage, study_name=study_name, loss_names=names,
                       quiet=quiet, allow_pickle=allow_pickle)
    click.echo(result.summary())


@cli.command("models")
def list_models() -> None:
    """List the built-in model architectures."""
    from edgekd.models import get_model_factory
    from edgekd.models import list_models as names

    for name in names():
        doc = (get_model_factory(name).__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:12s} {doc}")


@cli.command()
@run_dir_options
@click.option("--dest", default=None, type=click.Path(file_okay=False), help="Bundle folder (default: RUN/bundle).")
def bundle(run: str | None, out: str, dest: str | None) -> None:
    """Gather what a device needs (models, metadata, eval set, bench.py) into one folder to copy over."""
    from pathlib import Path

    from edgekd.bundle import make_bundle
    from edgekd.run_dir import resolve_run

    rd = resolve_run(run, out)
    path = make_bundle(rd.path, Path(dest) if dest else None)
    click.echo(f"bundle: {path}\ncopy it to the device and run: python3 bench.py . --json device.json")


@cli.command("prune")
@run_dir_options
@click.option("--ratio", type=float, default=None, help="Fraction of channels to remove, in (0, 1).")
@click.option("--target-macs", type=float, default=None, help="Instead of --ratio: shrink MACs by this factor.")
@click.option("--target-params", type=float, default=None, help="Instead of --ratio: shrink params by this factor.")
@click.option("--steps", type=int, default=None, help="Iterative pruning steps, each followed by KD fine-tuning.")
@click.option("--importance", default=None, metavar="NAME", help="Channel importance: l1, l2, bn or taylor.")
@click.option("--finetune-epochs", type=int, default=None, help="KD fine-tuning epochs after each step.")
@click.option("--protect", multiple=True, metavar="NAME", help="Module never pruned (repeatable; the classifier always is).")
@set_option("prune.global_pruning=true", "a key of the run recipe's `prune` section (options above win)")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted prune from its last finished step and epoch (same options).")
@quiet_option("No progress bars or per-step lines.")
def prune_cmd(run: str | None, out: str, ratio: float | None, target_macs: float | None, target_params: float | None,
              steps: int | None, importance: str | None, finetune_epochs: int | None, protect: tuple[str, ...],
              overrides: tuple[str, ...], resume: bool, quiet: bool) -> None:
    """Remove whole channels of the distilled student (torch-pruning) and recover accuracy by KD fine-tuning.

    Defaults come from the run recipe's `prune` section. Writes RUN/student_pruned.pt and
    metrics.json["student_pruned"] (accuracy, MACs, params, PyTorch latency before/after). Every finished step
    and fine-tuning epoch is saved under RUN/checkpoints; --resume continues a killed or interrupted prune.
    """
    from edgekd.prune import run_prune, summary
    from edgekd.recipe import section_overrides
    from edgekd.run_dir import resolve_run

    given = {"ratio": ratio, "target_macs": target_macs, "target_params": target_params, "steps": steps,
             "importance": importance, "finetune_epochs": finetune_epochs, "protect": protect or None}
    options = section_overrides(overrides, "prune", "prune") | {k: v for k, v in given.items() if v is not None}
    rd = run_prune(resolve_run(run, out), quiet=quiet, resume=resume, **options)
    if rd is not None:  # None on ranks other than 0 under torchrun
        click.echo(summary(rd))


# -- export / quantize (edgekd/export/) ------------------------------------------------------------------

def _export_options(fn: Callable) -> Callable:
    decorators = [
        run_dir_options,
        click.option("--int8-io", type=click.Choice(["float32", "int8", "uint8"]), default=None,
                     help="Input/output type of full-integer TFLite files (default: the recipe's, else float32)."),
        click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
                     help="ONNX Runtime int8 calibration (default: the recipe's, else minmax)."),
        click.option("--no-verify", is_flag=True, help="Do not run the files on the test split (no tolerance check)."),
        set_option("export.calibration_samples=128", "a key of the run recipe's `export` section (options win)"),
        quiet_option("Only the summary table."),
    ]
    for deco in reversed(decorators):
        fn = deco(fn)
    return fn


def _export_section(run: str | None, out: str, overrides: tuple[str, ...], command: str) -> tuple[Any, Any]:
    """The run and, with --set, its recipe's export section with the overrides (None: the stage reads it)."""
    from edgekd.recipe import merge_section
    from edgekd.run_dir import resolve_run

    rd = resolve_run(run, out)
    return rd, (merge_section(rd / "recipe.yaml", "export", overrides, command=command) if overrides else None)


@cli.command("export")
@_export_options
@click.option("--onnx", "onnx_", is_flag=True, help="Write ONNX files (no format flag: both formats).")
@click.option("--tflite", "tflite_", is_flag=True, help="Write TFLite files (no format flag: both formats).")
@click.option("--mcu", "mcu_", is_flag=True,
              help="Also write <model>_mcu.tflite and the firmware sources in RUN/mcu/ for TensorFlow Lite Micro "
                   "(made from the int8 TFLite file: implies --tflite).")
@click.option("--format", "format_names", multiple=True, metavar="NAME",
              help="Write this format, any registered export backend: onnx, tflite, tflite_app, mcu, ort, pte... "
                   "(repeatable; --onnx = --format onnx).")
@click.option("--quantize", "quantize", default=None, metavar="LIST",
              help="Quantized student files to add: fp16,int8,dynamic or none (default: the recipe's, else int8).")
@click.option("--nhwc", is_flag=True, default=None, help="TFLite files take channels-last (NHWC) input.")
@click.option("--no-teacher", is_flag=True, help="Do not export the teacher (fp32) for comparison.")
@click.option("--app/--no-app", "app", default=None,
              help="App-profile .tflite files (RGB pixels in, metadata, labels; default: on for image runs).")
@click.option("--ort", is_flag=True, default=None, help="Also write .ort files for ONNX Runtime Mobile.")
def export_cmd(run: str | None, out: str, int8_io: str | None, calibration_method: str | None, no_verify: bool,
               overrides: tuple[str, ...], quiet: bool, onnx_: bool, tflite_: bool, mcu_: bool,
               format_names: tuple[str, ...], quantize: str | None, nhwc: bool | None, no_teacher: bool,
               app: bool | None, ort: bool | None) -> None:
    """Export the best student (pruned if present) and the teacher with each backend (ONNX, TFLite, .pte...), verify.

    Every file is run in its own runtime on the run's test split: fp32 files must match PyTorch within
    export.tolerance.fp32_rel, quantized files within min_agreement / max_accuracy_drop (exit 1 otherwise).
    Writes RUN/metadata.json for apps, and each file's numbers to metrics.json under its file name.
    """
    from edgekd.export import run_export, summary_table

    rd, cfg = _export_section(run, out, overrides, "export")
    # --mcu brings tflite in as its source (the export's plan adds what a backend is made from).
    formats = [f for f, on in (("onnx", onnx_), ("tflite", tflite_), ("mcu", mcu_)) if on] + list(format_names)
    formats = list(dict.fromkeys(formats)) or None
    report = run_export(rd, out, formats=formats, quantize=quantize, nhwc=nhwc or None, int8_io=int8_io,
                        calibration_method=calibration_method, teacher=False if no_teacher else None,
                        verify=not no_verify, log=None if quiet else click.echo, cfg=cfg, check=False,
                        app=app, ort=ort or None)
    for line in report.extra.get("sensitivity", []):  # export.max_drop: the layers that cost the most in int8
        click.echo(line)
    click.echo(summary_table(rd))
    report.raise_for_problems()


@cli.command("quantize")
@_export_options
@click.option("--precision", "precision", default=None, metavar="LIST",
              help="fp16,int8,dynamic (default: the recipe's export.quantize, else int8).")
@click.option("--file", "files", multiple=True, metavar="NAME",
              help="An exported fp32 file to quantize (repeatable; default: every fp32 student file).")
@click.option("--qat", is_flag=True,
              help="Quantization-aware distillation instead: fine-tune the student with int8 fake quantization "
                   "and the KD loss, write STUDENT_int8_qat.onnx/.tflite/.pte (--set keys then name the `qat` section).")
@click.option("--resume", is_flag=True, help="--qat: continue from the last finished QAT epoch.")
@click.option("--sensitivity", is_flag=True,
              help="Per layer, on the validation split: accuracy drop and output SNR/cosine vs fp32 with only that "
                   "layer int8 and with all but that layer int8, in each format's runtime "
                   "(RUN/quant_sensitivity.json; the top layers are printed).")
@click.option("--max-drop", "max_drop", type=float, default=None, metavar="POINTS",
              help="Write STUDENT_mixed.tflite/.onnx/.pte: the most sensitive layers kept float until the validation "
                   "accuracy is within POINTS percentage points of fp32 (default: the recipe's export.max_drop).")
def quantize_cmd(run: str | None, out: str, int8_io: str | None, calibration_method: str | None, no_verify: bool,
                 overrides: tuple[str, ...], quiet: bool, precision: str | None, files: tuple[str, ...],
                 qat: bool, resume: bool, sensitivity: bool, max_drop: float | None) -> None:
    """Post-training quantization of fp32 files already written by `edgekd export`, verified the same way.

    With --qat: quantization-aware distillation of the best student (PT2E fake quantization with the int8
    TFLite route's quantizer, KD from the teacher, settings from the recipe's `qat` section), then int8
    ONNX/TFLite files that carry the learned scales, verified against the fake-quantized PyTorch model.

    With --sensitivity and/or --max-drop: which layers cost accuracy in int8, and mixed int8/float files within
    an accuracy budget (TFLite by ai-edge-quantizer, ONNX by ONNX Runtime; the MCU target needs full int8).
    """
    from edgekd.export import run_quantize, summary_table

    if qat:
        if sensitivity or max_drop is not None:
            raise click.UsageError("--sensitivity and --max-drop measure post-training quantization; not with --qat")
        from edgekd.export.qat import run_qat
        from edgekd.recipe import merge_section
        from edgekd.run_dir import resolve_run

        rd = resolve_run(run, out)
        qat_cfg = merge_section(rd / "recipe.yaml", "qat", overrides, command="quantize --qat")
        report = run_qat(rd, out, cfg=qat_cfg, int8_io=int8_io, resume=resume, verify=not no_verify,
                         log=None if quiet else click.echo, quiet=quiet)
        click.echo(summary_table(rd))
        report.raise_for_problems()
        return
    if resume:
        raise click.UsageError("--resume applies to --qat only")
    rd, cfg = _export_section(run, out, overrides, "quantize")
    report = run_quantize(rd, out, precisions=precision, files=list(files) or None, int8_io=int8_io,
                          calibration_method=calibration_method, verify=not no_verify,
                          log=None if quiet else click.echo, cfg=cfg, check=False, sensitivity=sensitivity,
                          max_drop=max_drop)
    for line in report.extra.get("sensitivity", []):
        click.echo(line)
    click.echo(summary_table(rd))
    report.raise_for_problems()


# -- validate / bench / report / run (edgekd/validate.py, bench.py, report.py, run.py) --------------------

def _budgets(rd: Any, overrides: tuple[str, ...], command: str) -> Any:
    """The run recipe's `validate` budgets with --set overrides (None: no budgets)."""
    from edgekd.recipe import merge_section

    return merge_section(rd / "recipe.yaml", "validate", overrides, command=command, default=False)


@cli.command("validate")
@run_dir_options
@runtime_option
@set_option("validate.max_size_kb=100", "a budget of the run's recipe")
@quiet_option("Only the summary table.")
def validate_cmd(run: str | None, out: str, runtimes: str | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Accuracy, macro P/R/F1 and agreement with teacher and fp32 student, for every model in every runtime.

    First checks every file it will use against the sha256 recorded in manifest.json and metadata.json: a file
    changed or truncated since it was written fails the command (exit 1) naming it, before anything is measured.
    Exits 1 when a budget of the recipe's `validate` section is broken, listing what broke.
    """
    from edgekd.bench import latency_for_budgets
    from edgekd.results import check_budgets, recommend
    from edgekd.run_dir import resolve_run
    from edgekd.validate import run_validate, validate_summary

    rd = resolve_run(run, out)
    budgets = _budgets(rd, overrides, "validate")
    result = run_validate(rd, runtimes=runtimes)
    click.echo(validate_summary(result))
    bench = latency_for_budgets(rd, result, budgets)
    rec = recommend(result, bench, budgets).recommended
    if rec:
        click.echo(f"recommended: {rec.file} ({rec.runtime})")
    check = check_budgets(result, bench, budgets)
    check.raise_if_failed()
    if check.any_set:
        click.echo("budgets: passed")


@cli.command("bench")
@run_dir_options
@click.option("--threads", default=None, metavar="N[,N...]", help="Thread counts (default: the recipe's, else 1,2).")
@click.option("--runs", type=int, default=None, help="Timed runs per measurement (default: the recipe's, else 200).")
@click.option("--seconds", type=float, default=None, help="Time each measurement this long instead of --runs.")
@click.option("--warmup", type=int, default=None, help="Untimed runs after the first inference (default 20).")
@click.option("--batch", type=int, default=None, help="Batch size for latency and throughput (default 1).")
@runtime_option
@set_option("bench.runs=50", "a key of the run recipe's `bench` section (options above win)")
@quiet_option("Only the summary table.")
def bench_cmd(run: str | None, out: str, threads: str | None, runs: int | None, seconds: float | None,
              warmup: int | None, batch: int | None, runtimes: str | None, overrides: tuple[str, ...],
              quiet: bool) -> None:
    """Latency (load, first, p50/p90/p99/mean/std), throughput and peak RSS of every model, each in a fresh process.

    Rows go to RUN/report.json.
    """
    from edgekd.bench import bench_summary, run_bench
    from edgekd.recipe import merge_section
    from edgekd.run_dir import resolve_run

    if runs is not None and seconds is not None:
        raise EdgeKDError("give --runs or --seconds, not both")
    rd = resolve_run(run, out)
    cfg = merge_section(rd / "recipe.yaml", "bench", overrides, command="bench",
                        options={"threads": threads, "runs": runs, "warmup": warmup, "batch": batch})
    report = run_bench(rd, threads=cfg.threads, runs=cfg.runs, seconds=seconds, warmup=cfg.warmup, batch=cfg.batch,
                       runtimes=runtimes)
    click.echo(bench_summary(report))
    click.echo(f"results: {rd / 'report.json'}")


@cli.command("report")
@run_dir_options
@device_files_option("Device results JSON (from device_tests/bench.py), merged as extra rows (repeatable).")
@set_option("validate.max_size_kb=100", "a budget of the run's recipe")
@verbose_option()
def report_cmd(run: str | None, out: str, devices: tuple[str, ...], overrides: tuple[str, ...],
               verbose: bool) -> None:
    """Write RUN/report.md and a self-contained RUN/report.html (tables and plots); print its summary."""
    from edgekd.report import build_report
    from edgekd.run_dir import resolve_run
    from edgekd.summary import report_block

    rd = resolve_run(run, out)
    rep = build_report(rd, list(devices), budgets=_budgets(rd, overrides, "report"))
    for line in report_block(rep.lines, rep.notes, verbose):
        click.echo(line)
    click.echo(f"report: {rep.html}  (and {rep.markdown})")


@cli.command("run")
@click.argument("recipe", required=False)
@recipe_options("bench.runs=50")
@click.option("--force", is_flag=True, help="Run every stage again, in a new run directory.")
@device_files_option()
@quiet_option()
@verbose_option()
@allow_pickle_option
def run_cmd(recipe: str | None, out: str, name: str | None, seed: int | None, overrides: tuple[str, ...],
            force: bool, devices: tuple[str, ...], quiet: bool, verbose: bool, allow_pickle: bool) -> None:
    """distill → prune → export → validate → bench → report; RECIPE defaults to the built-in mnist recipe.

    Skips stages the recipe leaves out and stages the run directory already finished (unless --force), prints
    the recommended file and where the report is. Exits 1 when a budget is broken.
    """
    from edgekd.run import resolve_recipe, run_pipeline, run_summary

    r = resolve_recipe(recipe, overrides, name=name, seed=seed)
    result = run_pipeline(r, out=out, force=force, devices=list(devices), quiet=quiet, allow_pickle=allow_pickle,
                          raise_on_budget=False)
    click.echo(run_summary(result, verbose=verbose))
    if result.budgets is not None:
        result.budgets.raise_if_failed()


def main() -> None:
    """Console-script entry point."""
    # edgekd never downloads at run time: Hugging Face libraries must use local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cli(prog_name="edgekd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
