"""The augmentation hook of the training loop.

An augmentation is any callable ``augment(x, y, generator) -> (x, y)``: ``x`` is the batch already on the
training device, ``y`` its labels (an augmentation that mixes samples may return soft targets instead), and
``generator`` the epoch's CPU generator (seeded by the seed and the epoch only, so a resumed run draws the same
numbers). Random draws come from that generator on the CPU and are moved to ``x.device``, so the loop gives the
same batches on every device. The teacher signal sees the augmented batch the student sees. A callable with
``identity = True`` leaves batches unchanged, which allows caching the teacher's logits.
"""

from __future__ import annotations

import torch
from torch import nn

AUGMENTATIONS = ("none", "shift", "flip")


class Augment:
    """The built-in ``data.augment`` kinds for image batches ``(N, C, H, W)``.

    * ``none``: unchanged.
    * ``flip``: each image mirrored left-right with probability 1/2.
    * ``shift``: each image translated by up to 2 px in each direction (zero fill).
    """

    def __init__(self, kind: str = "none"):
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r} (choose one of {', '.join(AUGMENTATIONS)})")
        self.kind = kind

    @property
    def identity(self) -> bool:
        return self.kind == "none"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "flip":
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            return torch.where(flip[:, None, None, None], x.flip(-1), x), y
        if self.kind == "shift":
            return _shift(x, torch.randint(-2, 3, (len(x), 2), generator=generator).to(x.device)), y
        return x, y

    def __repr__(self) -> str:
        return f"Augment({self.kind!r})"


def _shift(x: torch.Tensor, shifts: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Each image ``i`` of ``x`` moved by ``shifts[i] = (dy, dx)`` pixels, zero fill (one gather, no loop)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    rows = pad + shifts[:, 0, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = pad + shifts[:, 1, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices split by the channel slice come first in the result: (N, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
