"""Helpers every dataset reader shares (the built-in ones in :mod:`edgekd.data.core`, text in :mod:`.text`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.errors import DataError
from edgekd.recipe import DataConfig


def need_path(cfg: DataConfig) -> Path:
    """The existing ``data.path`` of a dataset that reads a file or folder.

    Raises:
        DataError: ``data.path`` is not set or does not exist.
    """
    if not cfg.path:
        raise DataError(f"data.dataset={cfg.dataset} needs data.path", f"set data.path to the {cfg.dataset} file or folder")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist")
    return path


def label_names(raw_labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer class indices (sorted label order) and the label names, from raw labels of any type."""
    names, y = np.unique(raw_labels, return_inverse=True)
    return y.astype(np.int64), [str(n) for n in names]
