"""Augmented-teacher cache (FKD-style): the teacher's logits for ``K`` seeded augmented views of every sample.

With augmentation, running the teacher on every training batch makes a KD epoch cost a teacher forward pass
per batch. Because every augmented image is a function of ``(seed, view, sample)`` (:mod:`edgekd.data.augment`),
the teacher's outputs for views ``0..K-1`` are computed once and replayed: epoch ``e`` shows the student view
``e mod K`` of each sample, regenerated bit-exactly, and looks up the teacher's logits for it (Shen & Xing 2022,
"A Fast Knowledge Distillation Framework for Visual Recognition").

Full logits are stored in float32: for tens of classes they are tiny (K x N x C x 4 bytes; 1.1 MB for
8 views of 3,500 samples and 10 classes) and replay the teacher's outputs exactly; top-k storage would only
pay off for thousands of classes. The teacher runs in float32 here whatever the recipe's ``amp``: the cache is
built once, so autocast would save little, and the replayed targets are the teacher's full-precision outputs (a
teacher run on every batch uses the recipe's autocast, like the student).

The file lives next to the run's training checkpoints, named by a key over everything the logits depend on
(the augmentation settings, K, the seed, the train split and the teacher's weights). A changed teacher or recipe
therefore gets its own, newly built cache instead of replaying stale outputs; a file whose content does not match
its name (edited, truncated) is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.data import DataBundle
from edgekd.data.augment import Augmenter
from edgekd.errors import CheckpointError
from edgekd.run_dir import atomic_path


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes), independent of any file format."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(augmenter: Augmenter, views: int, data: DataBundle, teacher: nn.Module) -> dict[str, Any]:
    """Everything the cached logits depend on."""
    split = hashlib.sha256(data.train.indices.tobytes()).hexdigest()[:16]
    return {"augment": augmenter.cfg.model_dump(mode="json"), "views": views, "seed": augmenter.seed,
            "train_split": split, "source": data.source, "teacher_sha256": weights_sha256(teacher)}


def cache_path(folder: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"teacher_views-{digest}.pt"


@torch.no_grad()
def build(teacher: nn.Module, data: DataBundle, augmenter: Augmenter, views: int, device: torch.device,
          batch_size: int = 256) -> torch.Tensor:
    """The teacher's logits (views, N, C) for views ``0..views-1`` of every train sample, in split order."""
    was_training = teacher.training
    teacher.eval()
    out = torch.empty(views, len(data.train), data.num_classes)
    for v in range(views):
        for x, y, idx in data.loader("train", batch_size):
            x, _ = augmenter(x.to(device), torch.as_tensor(y).to(device), idx, v)
            out[v, torch.as_tensor(idx)] = teacher(x).float().cpu()
    teacher.train(was_training)
    return out


def load_or_build(teacher: nn.Module, data: DataBundle, augmenter: Augmenter, views: int, folder: Path,
                  device: torch.device, write: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cached teacher logits for this run, built (and saved when ``write``) if absent.

    Returns:
        The logits (views, N, C) and facts about the cache (path, size in bytes, build seconds, reused or not).

    Raises:
        CheckpointError: The file exists but is unreadable or holds logits for another key or shape.
    """
    key = cache_key(augmenter, views, data, teacher)
    path = cache_path(folder, key)
    expected = (views, len(data.train), data.num_classes)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            ok = saved.get("key") == key and tuple(saved["logits"].shape) == expected
        except Exception as e:
            raise CheckpointError(f"teacher cache {path} is unreadable ({type(e).__name__})",
                                  "delete it; it is rebuilt on the next run") from e
        if not ok:
            raise CheckpointError(f"teacher cache {path} does not hold the logits its name promises "
                                  "(edited or copied from another run)", "delete it; it is rebuilt on the next run")
        return saved["logits"], {"path": str(path), "bytes": path.stat().st_size, "build_seconds": 0.0,
                                 "reused": True, "views": views}
    t0 = time.perf_counter()
    logits = build(teacher, data, augmenter, views, device)
    seconds = time.perf_counter() - t0
    info = {"path": str(path), "bytes": 0, "build_seconds": seconds, "reused": False, "views": views}
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"key": key, "logits": logits, "build_seconds": seconds}, tmp)
        info["bytes"] = path.stat().st_size
    return logits, info
