"""Image folders decoded and resized once into a memory-mapped uint8 cache.

Decoding a JPEG costs far more than a training step of a small student, so a folder is decoded exactly once:
the first run streams every image (one at a time, so folders larger than RAM work) into a ``.npy`` file of
``uint8`` ``(N, C, H, W)`` images, and every later epoch, run and stage (export, prune, sweep) memory-maps it.

The cache file is named by a key over everything that changes its content: the cache format, the colour mode,
the target size, and for every image its path relative to the folder, its size in bytes and its modification
time. Adding, removing, replacing or touching an image gives a new key, so a stale cache is never read. The file
is written under a temporary name and renamed when complete, so an interrupted first pass leaves nothing a later
run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from edgekd.errors import DataError

CACHE_FORMAT = 1
_decoded = 0  # images decoded by this process (see decode_count)


def decode_count() -> int:
    """How many image files this process has decoded so far (a cache hit decodes none)."""
    return _decoded


def default_cache_dir() -> Path:
    """``$EDGEKD_CACHE_DIR`` if set, else ``~/.cache/edgekd/images``."""
    env = os.environ.get("EDGEKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgekd" / "images"


def decode_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image file as ``uint8`` ``(C, H, W)``, converted to ``mode`` (``L`` or ``RGB``) and resized to
    ``size`` (PIL's ``(width, height)``) with bilinear filtering.

    Raises:
        DataError: The file is not a readable image (corrupt, truncated, unknown format).
    """
    from PIL import Image

    global _decoded
    _decoded += 1
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # OSError covers unknown formats and truncated files ("image file is truncated").
        raise DataError(f"cannot read image {path}: {e}", "replace or delete that file") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def cache_key(root: Path, files: list[Path], mode: str, size: tuple[int, int]) -> str:
    """Hex key naming the cache of these files at this mode and size (see the module docstring)."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "mode": mode, "size": list(size)}).encode())
    for p in files:
        try:
            st = p.stat()
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from e
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class CachedImages:
    """Memory-mapped ``uint8`` images: ``store(i)`` is one float32 sample in 0..1 (as the uncached reader
    returns it), ``store.take(rows)`` a uint8 batch in one indexing call.

    The map is opened lazily and not pickled, so loader worker processes open their own instead of copying it.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape = path, shape
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = open_cache(self.path, self.shape)
        return self._array

    def __call__(self, i: int) -> np.ndarray:
        return self.array()[i].astype(np.float32) / 255.0

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array()[rows]

    def __getstate__(self) -> dict:
        return {"path": self.path, "shape": self.shape, "_array": None}


def open_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-map a finished cache file and check it holds ``shape`` uint8 images.

    Raises:
        DataError: The file is unreadable, truncated, or of another shape or dtype.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"image cache {path} is unreadable ({type(e).__name__}: {e})",
                        "delete it (it is rebuilt on the next run) or set data.cache: false") from e
    if arr.dtype != np.uint8 or tuple(arr.shape) != tuple(shape):
        raise DataError(f"image cache {path} holds {arr.dtype} {tuple(arr.shape)}, expected uint8 {tuple(shape)}",
                        "delete it (it is rebuilt on the next run) or set data.cache: false")
    return arr


def build_cache(path: Path, files: list[Path], mode: str, size: tuple[int, int]) -> None:
    """Decode every file into a new cache file at ``path``, streaming, with a progress bar on a terminal."""
    from tqdm.auto import tqdm

    channels = 1 if mode == "L" else 3
    shape = (len(files), channels, size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for i, f in enumerate(tqdm(files, desc="caching images", unit="img", disable=None, mininterval=0.5)):
            out[i] = decode_image(f, mode, size)
        out.flush()
        del out
        os.replace(tmp, path)  # atomic: a reader sees no file or a complete one
    except OSError as e:
        raise DataError(f"cannot write the image cache {path}: {e}",
                        "set data.cache_dir (or EDGEKD_CACHE_DIR) to a writable folder with enough space, "
                        "or data.cache: false") from e
    finally:
        tmp.unlink(missing_ok=True)


def cached_images(root: Path, files: list[Path], mode: str, size: tuple[int, int],
                  cache_dir: str | Path | None = None) -> CachedImages:
    """The images of ``files`` from their cache, building it first if it does not exist yet.

    Args:
        root: The dataset folder (file paths enter the key relative to it, so a copied folder reuses it).
        files: Image files, in dataset order.
        mode: ``L`` (one channel) or ``RGB``.
        size: Target ``(width, height)``.
        cache_dir: Where cache files live (None: :func:`default_cache_dir`).
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = folder / f"{cache_key(root, files, mode, size)}.npy"
    shape = (len(files), 1 if mode == "L" else 3, size[1], size[0])
    if not path.exists():
        build_cache(path, files, mode, size)
    store = CachedImages(path, shape)
    store.array()  # fail now, with the file's name, rather than inside a training loop
    return store
