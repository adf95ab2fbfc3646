"""Command-line options shared by the ``edgekd`` commands, each defined once and reused as a decorator.

Also the one logging handler of the command line: stages log progress with :mod:`logging` (loggers under
``edgekd``); the CLI prints those records through click, at INFO by default and WARNING with ``-q``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import click

F = Callable[..., Any]


def _compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying ``decorators`` so that options show in ``--help`` in the order given."""

    def apply(fn: F) -> F:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn

    return apply


# -- logging ------------------------------------------------------------------------------------------------

class ClickHandler(logging.Handler):
    """Prints log records as plain lines through click (so click's test runner and pipes see them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=record.levelno >= logging.ERROR)
        except Exception:  # a closed stdout must not turn a log line into a crash
            self.handleError(record)


def setup_logging(quiet: bool = False) -> None:
    """Route the ``edgekd`` loggers to one :class:`ClickHandler`: INFO by default, WARNING with ``-q``."""
    logger = logging.getLogger("edgekd")
    if not any(isinstance(h, ClickHandler) for h in logger.handlers):
        logger.addHandler(ClickHandler())
    logger.propagate = False  # the handler above is the one place records are printed
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _quiet_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    setup_logging(quiet=value)
    return value


def quiet_option(help: str = "No progress bars or per-model lines.") -> Callable[[F], F]:
    """``-q/--quiet``: only warnings are logged (the command's final summary is still printed)."""
    return click.option("-q", "--quiet", is_flag=True, callback=_quiet_callback, help=help)


def verbose_option(help: str = "Print every note behind the summary (the report's Notes section) too.") -> Callable[[F], F]:
    """``-v/--verbose``: the long form of a command's final summary."""
    return click.option("-v", "--verbose", is_flag=True, help=help)


# -- options --------------------------------------------------------------------------------------------------

def out_option(help: str = "Parent directory of run directories.", default: str | None = "exported") -> Callable[[F], F]:
    """``--out``: where run directories live."""
    return click.option("--out", "out", default=default, show_default=default is not None,
                        type=click.Path(file_okay=False), help=help)


run_option = click.option("--run", "run", default=None, type=click.Path(file_okay=False),
                          help="Run directory (default: the latest in --out).")
name_option = click.option("--name", "name", default=None, help="Run name (default: the recipe's `name`).")
seed_option = click.option("--seed", type=int, default=None, help="Random seed (overrides the recipe's `seed`).")
resume_option = click.option("--resume", is_flag=True,
                             help="Continue the run named --name from its last finished epoch.")
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Allow checkpoints that need unpickling (runs code from the file: trusted files only).")
runtime_option = click.option("--runtime", "runtimes", default=None, metavar="NAMES",
                              help="Only these runtimes, comma-separated: torch, onnxruntime, litert (default: all).")


def set_option(example: str = "distill.epochs=3", what: str = "a recipe key") -> Callable[[F], F]:
    """``--set KEY=VALUE`` (repeatable), passed as ``overrides``."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Override {what}, e.g. --set {example} (repeatable).")


def device_files_option(help: str = "Device results JSON to merge into the report (repeatable).") -> Callable[[F], F]:
    """``--device FILE`` (repeatable): device result files for the report."""
    return click.option("--device", "devices", multiple=True, type=click.Path(dir_okay=False), help=help)


def run_dir_options(fn: F) -> F:
    """``--run`` and ``--out``: the run a stage command works on."""
    return _compose(run_option, out_option("Where runs live (for the default --run)."))(fn)


def recipe_options(example: str = "distill.epochs=3") -> Callable[[F], F]:
    """Options of the commands that start from a recipe: ``--out --name --seed --set``."""
    return _compose(out_option(), name_option, seed_option, set_option(example))
