"""``edgekd distill`` on one process or as one rank of a ``torchrun`` job (the stage's side of DDP).

The data-parallel machinery itself (process group, sharded sampling, DDP wrapping) lives in
:mod:`edgekd.training.parallel`; this module adds what only the distill stage needs: running the pipeline on
every rank, giving ranks other than 0 a scratch run directory (a copy of rank 0's run on ``--resume``), and
recording the launch in the run directory.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgekd.distill.pipeline import run_distill
from edgekd.errors import DataError, RunDirError
from edgekd.training import parallel

# What distill reads from a run directory it resumes (exports, reports and bundles are not needed).
_RESUME_SUFFIXES = (".yaml", ".json", ".csv", ".txt", ".pt")


def record(rd, info: dict[str, Any]) -> None:
    """Write the distributed settings into the run's metrics.json (``distributed``) and manifest (distill stage)."""
    rd.update_metrics("distributed", info)
    manifest = rd.manifest()
    manifest.setdefault("stages", {}).setdefault("distill", {}).update(
        {"world_size": info["world_size"], "backend": info["backend"], "device": info["device"]})
    manifest["world_size"] = info["world_size"]
    rd._write_manifest(manifest)


def share_run_dir(path: Path) -> Path | None:
    """``--resume`` under torchrun: copy rank 0's run directory ``path`` into every other rank's scratch space.

    The files travel through the process group (``broadcast_object_list``), so the ranks need no shared
    filesystem. Every rank must call this before rank 0 changes the directory.

    Returns:
        On other ranks, the scratch directory holding a copy named like ``path`` (pass its parent as ``out``);
        on rank 0, None.

    Raises:
        RunDirError: ``path`` holds no run (raised on every rank, so none waits forever).
    """
    payload = None
    if parallel.is_main():
        if (path / "manifest.json").is_file():
            files = [p for p in path.iterdir() if p.is_file() and p.suffix in _RESUME_SUFFIXES]
            ckpt = path / "checkpoints"
            if ckpt.is_dir():
                files += [p for p in ckpt.iterdir() if p.is_file() and p.suffix == ".pt"]
            payload = {str(p.relative_to(path)): p.read_bytes() for p in files}
    payload = parallel.broadcast_object(payload)
    if payload is None:
        raise RunDirError(f"nothing to resume: {path} holds no run", "drop --resume to start a new run")
    if parallel.is_main():
        return None
    scratch = Path(tempfile.mkdtemp(prefix=f"edgekd-rank{parallel.rank()}-"))
    for rel, data in payload.items():
        target = scratch / path.name / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return scratch


def run_distill_everywhere(recipe, out, device_name: str = "auto", resume: bool = False, quiet: bool = False,
                           allow_pickle: bool = False):
    """``edgekd distill`` on this process: alone, or as one rank of a torchrun job.

    Rank 0 writes the run directory in ``out`` and records the world size; other ranks train in step with it
    (DDP needs them) but write into a scratch directory removed at the end. With ``resume`` that scratch
    directory starts as a copy of rank 0's run (:func:`share_run_dir`), so every rank continues from the same
    checkpoint.

    Returns:
        The run directory on rank 0, None on other ranks.
    """
    n = parallel.env_world_size()
    sizes = {"data.batch_size": recipe.data.batch_size, "teacher.batch_size": recipe.teacher.batch_size,
             "distill.batch_size": recipe.distill.batch_size}
    for key, size in sizes.items():  # checked before anything is written (fit checks it again)
        if n > 1 and size is not None and size % n:
            raise DataError(f"{key} {size} cannot be split over {n} processes",
                            f"use a batch size divisible by {n} or another --nproc_per_node")
    info = parallel.setup(device_name)
    ok = False
    try:
        copy = share_run_dir(Path(out) / recipe.name) if resume and parallel.is_distributed() else None
        if parallel.is_main():
            rd = run_distill(recipe, out=out, resume=resume, quiet=quiet, allow_pickle=allow_pickle)
            record(rd, {k: info[k] for k in ("world_size", "backend", "device")})
        else:
            scratch = copy if copy is not None else tempfile.mkdtemp(prefix=f"edgekd-rank{parallel.rank()}-")
            try:
                run_distill(recipe, out=scratch, resume=resume, quiet=True, allow_pickle=allow_pickle)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            rd = None
        ok = True
        return rd
    finally:
        if ok:
            parallel.teardown()
        elif parallel.is_distributed():  # no barrier: the other ranks may never reach it
            torch.distributed.destroy_process_group()
