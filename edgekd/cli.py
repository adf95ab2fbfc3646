"""The ``edgekd`` command line. Commands stay thin: parse options, call the stage, print a summary.

Heavy modules (torch and friends) are imported inside command bodies so ``edgekd --help`` is instant.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

import click

from edgekd import __version__
from edgekd.errors import EdgeKDError


def recipe_options(fn: Callable) -> Callable:
    """Options shared by commands that start from a recipe."""
    decorators = [
        click.option("--out", "out", default="exported", show_default=True, type=click.Path(file_okay=False),
                     help="Parent directory of run directories."),
        click.option("--name", "name", default=None, help="Run name (default: the recipe's `name`)."),
        click.option("--seed", type=int, default=None, help="Random seed (overrides the recipe's `seed`)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe key, e.g. --set distill.epochs=3 (repeatable)."),
        click.option("--resume", is_flag=True, help="Continue the run named --name from its last finished epoch."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow checkpoints that need unpickling (runs code from the file: trusted files only)."),
    ]
    for deco in reversed(decorators):
        fn = deco(fn)
    return fn


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


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
        except OSError as e:
            # Disk full, read-only or forbidden output: the user's environment, not a bug in edgekd.
            if e.errno not in _ENVIRONMENT_ERRNOS or (ctx.obj and ctx.obj.get("debug")):
                raise
            where = f" {e.filename}" if e.filename else ""
            click.secho(f"error: cannot write{where}: {e.strerror} (free space or choose another --out)", err=True, fg="red")
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug: one line by default, the traceback with --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
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


@cli.command()
@click.argument("recipe", required=False)
@recipe_options
def distill(recipe: str | None, out: str, name: str | None, seed: int | None, overrides: tuple[str, ...],
            resume: bool, quiet: bool, allow_pickle: bool) -> None:
    """Train (or load) the teacher, then distill the student; RECIPE defaults to the built-in mnist recipe."""
    from edgekd.recipe import load_recipe

    r = load_recipe(recipe, overrides, name=name, seed=seed)
    from edgekd.distill import run_distill
    from edgekd.summary import distill_summary

    rd = run_distill(r, out=out, resume=resume, quiet=quiet, allow_pickle=allow_pickle)
    click.echo(distill_summary(rd))


@cli.command("losses")
def list_losses() -> None:
    """List the distillation losses a recipe can name in distill.loss.name."""
    from edgekd import losses

    for name, doc in losses.available().items():
        click.echo(f"{name:10s} {doc}")


@cli.command("models")
def list_models() -> None:
    """List the built-in model architectures."""
    from edgekd.models import list_models as names
    from edgekd.models.registry import _REGISTRY

    for name in names():
        doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:12s} {doc}")


def main() -> None:
    """Console-script entry point."""
    # edgekd never downloads at run time: Hugging Face libraries must use local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cli(prog_name="edgekd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
