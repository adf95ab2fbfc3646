"""Batched data loading: whole batches fetched at once, moved to the device raw, normalized there.

The per-sample path (``dataset[i]`` → numpy normalization → collate) costs a Python call and three array
passes per sample; on a GPU it leaves the device idle. Here a batch of indices is taken from the sample store in
one indexing call (an in-memory array or the uint8 image cache), sent to the device as it is stored (uint8 images
travel at a quarter of the float32 size, from pinned memory when the device is CUDA) and normalized there in one
batched operation.

Shuffling is unchanged: the same ``RandomSampler`` draws the same permutation from the same generator, and
``DataLoader`` draws its base seed exactly as before, so on the CPU the batches — and every number computed from
them — are bit-identical to the per-sample path (IEEE subtraction and division give the same float32 result in
numpy and torch).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

# Raw uint8 images are stored as 0..255; the float path divides by this to get the 0..1 inputs models see.
UINT8_SCALE = 255.0


def default_workers(device: torch.device) -> int:
    """Loader processes when ``data.workers`` is not set.

    On the CPU the training threads already use every core and a batch is one indexing call into memory, so
    extra processes only compete with them (measured in benchmarks/train_throughput.py): 0. On an accelerator
    the host is otherwise idle: one worker per spare core, at most 8, so fetching and pinning overlap the steps.
    """
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class BatchView(Dataset):
    """Indexing a split with a list of positions returns the whole raw batch ``(x, y, positions)``.

    ``x`` keeps the store's dtype (uint8 for cached images, float32 otherwise); see :func:`normalize_batch`.
    """

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, positions: list[int]):
        pos = np.asarray(positions, dtype=np.int64)
        x = self.split.take_raw(pos)
        y = torch.from_numpy(self.split.labels[self.split.indices[pos]].astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(x)), y, torch.from_numpy(pos)


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw batch → float32 model input: ``(x / 255 if uint8) - mean) / std`` on ``x``'s device."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / UINT8_SCALE
    elif x.dtype != torch.float32:
        x = x.to(torch.float32)
    return (x - mean) / std


class DeviceLoader:
    """Iterates a ``DataLoader`` of raw batches and yields ``(normalized x, y, positions)`` on ``device``.

    Args:
        loader: Yields raw batches from a :class:`BatchView`.
        mean: Per-channel mean, shaped to broadcast over a batch (float32, CPU).
        std: Matching standard deviation.
        device: Where batches are normalized and returned.
    """

    def __init__(self, loader: DataLoader, mean: np.ndarray, std: np.ndarray, device: torch.device):
        self.loader, self.device = loader, device
        self.mean = torch.from_numpy(np.asarray(mean, dtype=np.float32)).unsqueeze(0).to(device)
        self.std = torch.from_numpy(np.asarray(std, dtype=np.float32)).unsqueeze(0).to(device)
        self.non_blocking = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset.split

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # Created eagerly, as DataLoader.__iter__ does: that draws the loader's base seed from the generator at
        # iter() time, and callers that call iter() twice (tqdm.auto does) then see the same random stream.
        return self._normalized(iter(self.loader))

    def _normalized(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for x, y, pos in batches:
            x = x.to(self.device, non_blocking=self.non_blocking)
            yield normalize_batch(x, self.mean, self.std), y.to(self.device, non_blocking=self.non_blocking), pos


def make_loader(split, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                sampler: Sampler[int] | None = None, device: torch.device | str = "cpu",
                workers: int | None = None, prefetch: int = 4) -> DeviceLoader:
    """A loader over one split (an ``IndexedDataset``) yielding normalized batches on ``device``.

    Args:
        split: The split; needs ``take_raw(positions)``, ``labels``, ``indices``, ``mean`` and ``std``.
        batch_size: Samples per batch (the last batch may be smaller).
        shuffle: Random order drawn from ``generator`` (ignored when ``sampler`` is given).
        generator: Seeds the shuffle and the loader's base seed, exactly as in ``DataLoader(shuffle=True)``.
        sampler: Positions to visit (e.g. this rank's shard under torchrun), instead of ``shuffle``.
        device: Where batches are moved and normalized.
        workers: Loader processes (None: :func:`default_workers`). Workers persist across epochs only as long
            as this loader object lives.
        prefetch: Batches each worker prepares ahead.
    """
    device = torch.device(device)
    if sampler is None:
        sampler = RandomSampler(split, generator=generator) if shuffle else SequentialSampler(split)
    workers = default_workers(device) if workers is None else workers
    extra = {"persistent_workers": True, "prefetch_factor": prefetch} if workers > 0 else {}
    loader = DataLoader(BatchView(split), batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                        generator=generator, num_workers=workers, pin_memory=device.type == "cuda", **extra)
    return DeviceLoader(loader, split.mean, split.std, device)
