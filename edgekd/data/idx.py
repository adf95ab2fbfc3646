"""IDX files (the MNIST family's format) and the built-in Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
int32 per dimension, then the values in C order; the MNIST family stores images as ``idx3`` uint8 and labels as
``idx1`` uint8, often gzipped. Files are decoded once per process (keyed by path, size and modification time)
and kept as uint8, so 70,000 images cost 55 MB and load in about a second; batches are normalized on the
training device (:mod:`edgekd.data.loader`).

A folder with the standard names (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``) has a predefined test split: the ``t10k``
files.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.errors import DataError

# Type codes of the IDX format and the numpy dtype each stores (big-endian for multi-byte types).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_STANDARD_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# Where Debian's `dataset-fashion-mnist` package installs the four files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = ("install Debian's package (`apt-get install dataset-fashion-mnist`) or put the four files "
                      "from https://github.com/zalandoresearch/fashion-mnist into a folder and set data.path to it")

# The last data set read, by the identity of its files: export, prune and the baseline reload the same files.
_last: dict[tuple, "IdxSet"] = {}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (raw or ``.gz``).

    Raises:
        DataError: Unreadable file, not gzip data where the name says ``.gz``, a wrong magic number or type code,
            or fewer (or more) bytes than the header announces.
    """
    return _decode(path, _read_bytes(path))


def _identity(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"IDX file {path} is not valid gzip data ({e})", "re-download it, or gunzip it") from e
    except EOFError as e:
        raise DataError(f"IDX file {path} is truncated (the gzip stream ends early)", "re-download it") from e
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e


def _decode(path: Path, raw: bytes) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        magic = raw[:4].hex() if raw else "empty file"
        raise DataError(f"{path} is not an IDX file (magic number {magic}; expected 0000 0x08-0x0E and a dimension "
                        "count)", "point data.path or data.idx at the MNIST-style IDX files")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (its header needs {header} bytes, the file has {len(raw)})",
                        "re-download it")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {what}: shape {shape} needs {expected} bytes, the file has {len(raw)}",
                        "re-download it")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def find_idx_files(folder: Path) -> dict[str, Path]:
    """The standard IDX files present in ``folder`` (``.gz`` or raw), by role; missing roles are left out."""
    found = {}
    for role, stems in _STANDARD_NAMES.items():
        for stem in stems:
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    found.setdefault(role, folder / name)
    return found


@dataclass
class IdxSet:
    """Images (uint8 ``(N, 1, H, W)``) and labels of the train files followed by the test files."""

    images: np.ndarray
    labels: np.ndarray
    n_train: int
    files: dict[str, Path]

    @property
    def test_rows(self) -> np.ndarray | None:
        """Rows of the predefined test split (the ``t10k`` files), or None when there are none."""
        if self.n_train == len(self.labels):
            return None
        return np.arange(self.n_train, len(self.labels))


def _images(path: Path) -> np.ndarray:
    x = read_idx(path)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise DataError(f"IDX file {path} holds {x.dtype} data of {x.ndim} dimensions; images must be idx3 uint8 "
                        "(N, H, W)", "is it a labels file? check which file is data.idx.*_images")
    return x


def _labels(path: Path) -> np.ndarray:
    y = read_idx(path)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"IDX file {path} holds {y.dtype} data of {y.ndim} dimensions; labels must be idx1 integers",
                        "is it an images file? check which file is data.idx.*_labels")
    return y.astype(np.int64)


def load_idx_set(files: dict[str, Path]) -> IdxSet:
    """Read and cross-check the train (and, when given, test) IDX files; decoded once per process.

    Raises:
        DataError: A file is bad (see :func:`read_idx`), images and labels disagree in count, or the train and
            test files differ in image size or class set.
    """
    key = tuple(_identity(files[r]) if r in files else None for r in ROLES)
    if key not in _last:
        made = _read_set(files)
        _last.clear()  # keep one data set: they may be large
        _last[key] = made
    return _last[key]


def _read_set(files: dict[str, Path]) -> IdxSet:
    parts = [("train", files["train_images"], files["train_labels"])]
    if "test_images" in files:
        parts.append(("test", files["test_images"], files["test_labels"]))
    xs, ys = [], []
    for _, img_path, lab_path in parts:
        x, y = _images(img_path), _labels(lab_path)
        if len(x) != len(y):
            raise DataError(f"{img_path} holds {len(x)} images but {lab_path} holds {len(y)} labels",
                            "use the labels file that belongs to these images")
        xs.append(x)
        ys.append(y)
    if len(xs) == 2:
        if xs[0].shape[1:] != xs[1].shape[1:]:
            raise DataError(f"{files['test_images']} holds {xs[1].shape[1]}x{xs[1].shape[2]} images but "
                            f"{files['train_images']} holds {xs[0].shape[1]}x{xs[0].shape[2]}",
                            "use train and test files of the same data set")
        train_classes, test_classes = set(np.unique(ys[0]).tolist()), set(np.unique(ys[1]).tolist())
        if train_classes != test_classes:
            diff = sorted(train_classes ^ test_classes)
            raise DataError(f"{files['test_labels']} and {files['train_labels']} have different class sets "
                            f"(labels {diff[:10]} are in only one of them)", "use train and test files of the "
                            "same data set")
    images = np.concatenate(xs)[:, None] if len(xs) == 2 else xs[0][:, None]
    labels = np.concatenate(ys) if len(ys) == 2 else ys[0]
    return IdxSet(images, labels, len(ys[0]), files)


def idx_files_from_config(path: str | None, explicit: dict[str, str] | None) -> dict[str, Path]:
    """The IDX files a recipe names: ``data.idx`` (explicit paths) or the standard names in ``data.path``.

    Raises:
        DataError: Neither is given, a named file does not exist, or a required role is missing.
    """
    if explicit:
        files = {role: Path(p).expanduser() for role, p in explicit.items() if p}
        for role, p in files.items():
            if not p.is_file():
                raise DataError(f"data.idx.{role}: {p} does not exist")
        where = "data.idx"
    elif path:
        folder = Path(path).expanduser()
        if folder.is_file():
            raise DataError(f"data.path {folder} is a file; data.dataset=idx needs the folder holding the IDX files",
                            "set data.path to the folder, or name each file in data.idx")
        if not folder.is_dir():
            raise DataError(f"data.path {folder} does not exist")
        files = find_idx_files(folder)
        where = str(folder)
    else:
        raise DataError("data.dataset=idx needs data.path (a folder of IDX files) or data.idx (their paths)",
                        "set data.path to the folder holding train-images-idx3-ubyte.gz and the other files")
    return _complete(files, where)


def _complete(files: dict[str, Path], where: str) -> dict[str, Path]:
    for role in ("train_images", "train_labels"):
        if role not in files:
            names = " or ".join(f"{s}[.gz]" for s in _STANDARD_NAMES[role])
            raise DataError(f"{where}: no {role.replace('_', ' ')} file ({names})",
                            "name it in data.idx or use the standard file names")
    if ("test_images" in files) != ("test_labels" in files):
        have, miss = ("test_images", "test_labels") if "test_images" in files else ("test_labels", "test_images")
        raise DataError(f"{where}: {have.replace('_', ' ')} given but no {miss.replace('_', ' ')}",
                        "give both test files, or neither")
    return files


def fashion_mnist_folder(path: str | None) -> Path:
    """Where the Fashion-MNIST files are: ``data.path``, else ``$EDGEKD_DATA_DIR/fashion-mnist``, else the Debian
    package's folder.

    Raises:
        DataError: None of them holds the four files (one line naming every place looked in and how to get them).
    """
    places = []
    if path:
        places.append(Path(path).expanduser())
    else:
        env = os.environ.get("EDGEKD_DATA_DIR")
        if env:
            places.append(Path(env).expanduser() / "fashion-mnist")
        places.append(DEBIAN_FASHION_MNIST)
    for place in places:
        if len(find_idx_files(place)) == len(ROLES):
            return place
    looked = ", ".join(str(p) for p in places)
    raise DataError(f"fashion_mnist: the four IDX files are not in {looked}", FASHION_MNIST_HINT)
