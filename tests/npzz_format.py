"""A toy derived backend, defined outside edgekd: ``.npzz`` files made from the ``.npzmodel`` files.

An ``.npzz`` file is its ``.npzmodel`` source stored with zip compression (the same arrays; numpy reads both
alike). The backend declares its source (``npzmodel``, every precision) and how to derive a file from one; the
export's plan brings the source in first, verifies each ``.npzz`` against PyTorch and records it with its
backend's name. Together with its runtime this module is the whole backend: nothing in edgekd names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export import Derived, ExportBackend, register_backend
from edgekd.run_dir import atomic_path, sha256_file
from edgekd.runtimes import register_runtime

import npzmodel_format

SUFFIX = ".npzz"


class NpzzBackend(ExportBackend):
    """``.npzz``: each ``.npzmodel`` file of the student, compressed."""

    name = "npzz"
    suffix = SUFFIX
    source = ("npzmodel", None)
    teacher = False
    tools = ("numpy",)
    runtime = "numpy-layers-z"

    def derive(self, source_path: Path, source_entry: dict[str, Any], path: Path, ctx: Any) -> Derived:
        with np.load(source_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        entry = {**source_entry, "file": path.name, "backend": self.name, "format": self.name,
                 "size_bytes": path.stat().st_size, "sha256": sha256_file(path), "route": "npz-compressed",
                 "source": source_entry["file"]}
        return Derived(entry)

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return npzmodel_format.NpzModelBackend().io_spec(path)


@register_runtime
class NumpyLayersZRuntime(npzmodel_format.NumpyLayersRuntime):
    """A ``.npzz`` file, run layer by layer with numpy like its ``.npzmodel`` source."""

    name = "numpy-layers-z"
    suffixes = (SUFFIX,)


register_backend(NpzzBackend())
