"""The ``edgekd`` command line. Commands stay thin: parse options, call the stage, print a summary.

Heavy modules (torch and friends) are imported inside command bodies so ``edgekd --help`` is instant.
"""

from __future__ import annotations

import functools
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
    cli(prog_name="edgekd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
