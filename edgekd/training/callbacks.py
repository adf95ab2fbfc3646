"""Callbacks of the training loop (in the spirit of Lightning's ``Callback``): the loop stays short, and what
happens around it (console lines, history files, Optuna pruning, user hooks) plugs in here.

A callback sees each finished epoch's history row (``model``, ``epoch``, ``train_loss``, ``val_accuracy``,
``lr``, ``seconds``) after that epoch's checkpoint is written, so an exception raised from a callback (Ctrl-C,
a pruned trial) leaves a run that resumes exactly. One row per trained model: online distillation gives two.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Callable

from edgekd.run_dir import write_text_atomic

logger = logging.getLogger(__name__)


class Callback:
    """Base class: override what you need; stateful callbacks also override the ``state_dict`` pair."""

    def on_fit_start(self, role: str, epochs: int) -> None:
        """Called once, before the first epoch (also when resuming)."""

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """Called with each trained model's history row after the epoch's checkpoint is written."""

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps of this callback (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when a run resumes."""


class OnEpoch(Callback):
    """Calls a plain function with every history row."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.fn = fn

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        self.fn(row)


class ConsoleLog(Callback):
    """One line per model and epoch through :mod:`logging` (``edgekd.training.callbacks``, level INFO).

    Without any logging handler configured (a bare library call, a torchrun worker) the line goes to stdout
    through tqdm, so it does not break a progress bar and is never silently lost.
    """

    def __init__(self) -> None:
        self.epochs = 0

    def on_fit_start(self, role: str, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        line = (f"{row['model']:>8} epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}  "
                f"val_acc {row['val_accuracy']:.4f}  {row['seconds']:.1f}s")
        if logger.hasHandlers():
            logger.info(line)
        else:
            from tqdm.auto import tqdm

            tqdm.write(line)


class HistoryFile(Callback):
    """``history.csv``: every epoch of every trained model, rewritten atomically after each epoch.

    Args:
        path: The CSV file; rows already in it (an interrupted run) are kept.
    """

    FIELDS = ["model", "epoch", "train_loss", "val_accuracy", "lr", "seconds"]

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def reset(self, role: str, rows: list[dict[str, Any]]) -> None:
        """Replace every row of ``role`` by ``rows`` (its final, resumed-and-complete history)."""
        self.rows = [r for r in self.rows if r["model"] != role] + list(rows)
        self._write()

    def add(self, row: dict[str, Any]) -> None:
        """Add (or replace) one epoch's row."""
        self.rows = [r for r in self.rows if not (r["model"] == row["model"] and int(r["epoch"]) == row["epoch"])]
        self.rows.append(row)
        self._write()

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        self.add(row)

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())


class OptunaPruning(Callback):
    """Reports each epoch's validation accuracy of ``role`` to an Optuna trial and stops trials that lag behind.

    Args:
        trial: The ``optuna.Trial``.
        role: Whose rows are reported (``student``).
        epochs: The trial's epoch budget: after the last epoch the trial is complete and is never pruned.

    Raises:
        optuna.TrialPruned: From :meth:`on_epoch_end`, when the study's pruner says so.
    """

    def __init__(self, trial, role: str, epochs: int):
        self.trial, self.role, self.epochs = trial, role, epochs

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        import optuna

        if row["model"] != self.role:
            return
        self.trial.report(row["val_accuracy"], row["epoch"])
        # After the last epoch the trial is complete: stopping it then would save nothing.
        if row["epoch"] < self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"val accuracy {row['val_accuracy']:.4f} at epoch {row['epoch']}")
