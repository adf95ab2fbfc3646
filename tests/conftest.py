"""Shared fixtures: tiny real recipes and a finished tiny run, built once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import yaml

# Tests run on 2 cores next to other work; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "digits", "batch_size": 64},
    "teacher": {"model": "cnn", "kwargs": {"width": 8, "depth": 2}, "epochs": 3, "lr": 0.01},
    "student": {"model": "cnn", "kwargs": {"width": 2, "depth": 2}},
    "distill": {"epochs": 3, "lr": 0.02, "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9}},
}


def write_recipe(path: Path, data: dict | None = None, **changes) -> Path:
    """Write a copy of the tiny recipe (or ``data``) with top-level sections updated by ``changes``."""
    recipe = yaml.safe_load(yaml.safe_dump(data if data is not None else TINY_RECIPE))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished distill run of the tiny recipe (shared, read-only for tests)."""
    from edgekd.distill import run_distill
    from edgekd.recipe import load_recipe

    root = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(write_recipe(root / "tiny.yaml"))
    return run_distill(recipe, out=root / "exported", quiet=True).path


@contextlib.contextmanager
def ctrl_c_after(role: str, epoch: int):
    """Press Ctrl-C (raise KeyboardInterrupt) right after ``epoch`` (1-based) of the model trained as ``role``.

    Deterministic stand-in for a user's Ctrl-C: it wraps the real trainer (nothing is mocked) and raises where a
    SIGINT between epochs would, after that epoch's checkpoint was written. A thread calling
    ``_thread.interrupt_main()`` when a file appears races the training on a fast or a loaded machine.
    """
    from edgekd.training import Callback, loop

    real_fit = loop.fit

    class CtrlC(Callback):
        def __init__(self, fit_role):
            self.fit_role = fit_role

        def on_epoch_end(self, row):
            if self.fit_role == role and row.get("model") == role and row.get("epoch") == epoch:
                raise KeyboardInterrupt

    def fit(model, data, loss_fn, config, *, callbacks=(), **kwargs):
        return real_fit(model, data, loss_fn, config, callbacks=[*callbacks, CtrlC(config.role)], **kwargs)

    loop.fit = fit
    try:
        yield
    finally:
        loop.fit = real_fit
