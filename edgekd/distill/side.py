"""The scratch baseline trained in a second process beside the KD student (``distill.parallel_baseline``).

A small student barely uses a second core: on this project's 2-core CPU the default Fashion-MNIST student trained
at about 4,700 images/s on one thread and 5,400 on two, so training the baseline and the KD student one after the
other on two threads takes about 1.7x as long as training them side by side on one thread each. Both students
cost the same per epoch, so they finish together.

The baseline process works in a private run directory (``checkpoints/baseline-process/``: its own manifest,
history and resumable epoch state), so the two processes never write the same file; when it finishes, the parent
moves ``baseline.pt`` into the run and records it, its history and its manifest entry, exactly as the sequential
path does. An interrupted run continues both from their last finished epoch with ``--resume``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgeKDError, TrainingError
from edgekd.recipe import Recipe
from edgekd.run_dir import RunDir
from edgekd.training import HistoryFile

SIDE_DIR = "checkpoints/baseline-process"


def wanted(recipe: Recipe) -> bool:
    """Train the baseline beside the student: asked for, an offline baseline, on a CPU with 2+ torch threads,
    and not one rank of several under torchrun (DDP already shares the cores)."""
    from edgekd.training import parallel

    d = recipe.distill
    return (d.parallel_baseline and d.baseline and d.strategy == "offline" and torch.get_num_threads() >= 2
            and parallel.env_world_size() == 1 and parallel.device().type == "cpu")


def _child(recipe: dict[str, Any], run: str, resume: bool, threads: int, allow_pickle: bool, queue) -> None:
    """The baseline process: load the data, build the student architecture, train it on labels."""
    try:
        torch.set_num_threads(threads)
        from edgekd import losses
        from edgekd.data import load_data
        from edgekd.models import load_weights
        from edgekd.training.roles import build_model_for, train_role

        rec = Recipe.model_validate(recipe)
        data = load_data(rec.data, rec.seed)
        scfg = rec.student
        model = build_model_for(scfg.model, scfg.kwargs, data, rec.seed, "student")
        if scfg.checkpoint:
            load_weights(model, scfg.checkpoint, allow_pickle=allow_pickle)
        side = RunDir(Path(run) / SIDE_DIR)
        side.path.mkdir(parents=True, exist_ok=True)
        info = train_role("baseline", model, scfg.model, scfg.kwargs, data, rec, side, rec.distill,
                          losses.build("ce"), HistoryFile(side / "history.csv"), resume, quiet=True)
        queue.put(("ok", info))
    except KeyboardInterrupt:
        queue.put(("interrupted", "baseline interrupted"))
    except EdgeKDError as e:
        queue.put(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it as one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


class BaselineProcess:
    """The baseline's training process: :meth:`start` it, train the student, then :meth:`finish` it.

    Args:
        recipe: The run's recipe.
        rd: The run directory.
        resume: Continue the baseline's interrupted training.
        allow_pickle: As for the student's ``checkpoint``.
    """

    def __init__(self, recipe: Recipe, rd: RunDir, resume: bool, allow_pickle: bool):
        self.recipe, self.rd, self.resume, self.allow_pickle = recipe, rd, resume, allow_pickle
        self.total = torch.get_num_threads()
        self.process = self.queue = None

    def start(self) -> None:
        """Start the baseline process with half the threads; this process keeps the rest."""
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch thread pools
        self.queue = ctx.Queue()
        child_threads = max(1, self.total // 2)
        self.process = ctx.Process(target=_child, daemon=True, name="edgekd-baseline",
                                   args=(self.recipe.to_dict(), str(self.rd.path), self.resume, child_threads,
                                         self.allow_pickle, self.queue))
        self.process.start()
        torch.set_num_threads(max(1, self.total - child_threads))

    def stop(self) -> None:
        """End the process (after an error or Ctrl-C in the student's training) and give the threads back."""
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=30)
        torch.set_num_threads(self.total)

    def finish(self, history: HistoryFile) -> dict[str, Any]:
        """Wait for the baseline, move ``baseline.pt`` into the run and record it; return its training info.

        Raises:
            TrainingError: The baseline process failed (its one-line reason).
            KeyboardInterrupt: It was interrupted (its finished epochs are kept for ``--resume``).
        """
        try:
            status, payload = self.queue.get()
            self.process.join()
        finally:
            self.stop()
        if status == "interrupted":
            raise KeyboardInterrupt
        if status != "ok":
            raise TrainingError(f"the baseline's training process failed: {payload}",
                                "rerun with distill.parallel_baseline: false to see it in this process")
        side = self.rd / SIDE_DIR
        os.replace(side / "baseline.pt", self.rd / "baseline.pt")
        history.reset("baseline", HistoryFile(side / "history.csv").rows)
        self.rd.record_artifacts("baseline.pt")
        self.rd.stage_done("baseline", artifact="baseline.pt", info={**payload, "process": "parallel"})
        shutil.rmtree(side / "checkpoints", ignore_errors=True)
        return payload
