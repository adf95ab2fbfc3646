"""Shared fixtures: tiny real recipes and a finished tiny run, built once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import yaml

# Tests run on 2 cores next to other work; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True, scope="session")
def _private_image_cache(tmp_path_factory):
    """Image-folder caches of the tests go to a session folder, not the user's ~/.cache."""
    old = os.environ.get("EDGEKD_CACHE_DIR")
    os.environ["EDGEKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("image_cache"))
    yield
    if old is None:
        os.environ.pop("EDGEKD_CACHE_DIR", None)
    else:
        os.environ["EDGEKD_CACHE_DIR"] = old


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

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


@pytest.fixture(scope="session")
def trained_run(tiny_run, tmp_path_factory) -> Path:
    """A run whose student is trained long enough to have clear top-1 margins (the tiny run's 3-epoch
    width-2 student is barely above chance, so int8 agreement on it measures noise). Shared by the export tests."""
    from edgekd.distill import run_distill
    from edgekd.recipe import load_recipe

    root = tmp_path_factory.mktemp("export-run")
    teacher = dict(TINY_RECIPE["teacher"], checkpoint=str(tiny_run / "teacher.pt"))
    recipe = write_recipe(root / "r.yaml", name="trained", teacher=teacher,
                          student={"model": "cnn", "kwargs": {"width": 6, "depth": 2}},
                          distill={"epochs": 15, "lr": 0.02, "baseline": False})
    return run_distill(load_recipe(recipe), out=root / "exported", quiet=True).path


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
