"""Batched training augmentation on the training device, with per-sample parameters drawn from a seed.

Every random choice for sample ``i`` of the train split in *view* ``v`` (a crop box, a shift, a flip, an angle,
colour factors, a mixing partner and its share) is drawn once for the whole split from a CPU generator seeded
with ``(seed, v)`` only. The image of a sample in a view therefore does not depend on the batch it lands in, on
the shuffling order, on the device or on the process: an epoch re-run after a crash gets the same images, and a
teacher output cached for ``(sample, view)`` (:mod:`edgekd.training.teacher_cache`) is exactly the output for the
image the student is shown. Only the pixel work runs on the batch's device (``affine_grid`` / ``grid_sample``).

Written in plain torch rather than kornia: kornia's random augmentations draw their parameters per call from
the global torch RNG for the batch at hand, while the cache needs parameters that are a function of
``(seed, view, sample)``; what would remain of kornia here is one affine warp.

Operations, in order: random-resized-crop / translate / rotate / flip as one affine warp (bilinear, edge pixels
repeated outside the image), integer pixel shift with zero fill (the historical ``shift`` preset), colour jitter
(brightness / contrast / saturation, on un-normalized RGB values), then mixup or cutmix with a partner sample
(itself augmented with its own parameters of the same view). Mixed samples get soft label targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from edgekd.data.loader import BatchView, normalize_batch
from edgekd.errors import RecipeError
from edgekd.recipe import AUGMENT_PRESETS, AugmentConfig


def resolve(spec: str | Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig:
    """The augmentation settings of a recipe's ``data.augment`` (a preset name or a mapping)."""
    if spec is None:
        return AugmentConfig()
    if isinstance(spec, AugmentConfig):
        return spec
    if isinstance(spec, str):
        if spec not in AUGMENT_PRESETS:
            raise RecipeError(f"unknown augmentation {spec!r}", f"choose one of: {', '.join(AUGMENT_PRESETS)}")
        return AugmentConfig(**AUGMENT_PRESETS[spec])
    return AugmentConfig(**dict(spec))


def is_identity(cfg: AugmentConfig) -> bool:
    """Whether the settings leave every image unchanged."""
    return cfg == AugmentConfig()


@dataclass
class ViewParams:
    """Per-sample parameters of one view of the train split (CPU tensors of length N)."""

    theta: torch.Tensor | None  # (N, 2, 3) affine map from output to input coordinates (normalized)
    shift: torch.Tensor | None  # (N, 2) integer (dy, dx)
    colour: torch.Tensor | None  # (N, 3) brightness, contrast, saturation factors
    partner: torch.Tensor | None  # (N,) index of the mixing partner
    lam: torch.Tensor | None  # (N,) share of the sample itself (1 = not mixed)
    box: torch.Tensor | None  # (N, 4) cutmix box y0, y1, x0, x1 (pixels); empty box for mixup / no mix


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def sample_view(cfg: AugmentConfig, n: int, hw: tuple[int, int], seed: int, view: int) -> ViewParams:
    """Draw the parameters of view ``view`` for all ``n`` samples (CPU, float64 draws, deterministic)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + view * 7_919 + 0x5EED) % (2 ** 63))
    theta = shift = colour = partner = lam = box = None
    if cfg.crop_scale < 1 or cfg.translate > 0 or cfg.rotate > 0 or cfg.flip > 0:
        area = _uniform(gen, n, cfg.crop_scale, 1.0)
        log_r = _uniform(gen, n, math.log(3 / 4), math.log(4 / 3)) if cfg.crop_scale < 1 else torch.zeros(n, dtype=torch.float64)
        sw = torch.sqrt(area * log_r.exp()).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
        cx = _uniform(gen, n, -1.0, 1.0) * (1 - sw) + _uniform(gen, n, -2 * cfg.translate, 2 * cfg.translate)
        cy = _uniform(gen, n, -1.0, 1.0) * (1 - sh) + _uniform(gen, n, -2 * cfg.translate, 2 * cfg.translate)
        ang = _uniform(gen, n, -cfg.rotate, cfg.rotate) * math.pi / 180
        flip = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < cfg.flip, -1.0, 1.0).double()
        cos, sin = ang.cos(), ang.sin()
        # input = diag(sw, sh) @ R(ang) @ diag(flip, 1) @ output + (cx, cy)
        theta = torch.stack([torch.stack([sw * cos * flip, -sw * sin, cx], 1),
                             torch.stack([sh * sin * flip, sh * cos, cy], 1)], 1)
    if cfg.shift_px > 0:
        shift = torch.randint(-cfg.shift_px, cfg.shift_px + 1, (n, 2), generator=gen)
    if cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0:
        colour = torch.stack([_uniform(gen, n, 1 - s, 1 + s) for s in (cfg.brightness, cfg.contrast, cfg.saturation)], 1)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        partner = torch.randperm(n, generator=gen)
        mixed = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.mix_prob
        lam = _beta(gen, n, cfg.mix_alpha)  # torch's Beta distribution takes no generator
        share_cut = cfg.cutmix / (cfg.mixup + cfg.cutmix)
        is_cut = (torch.rand(n, generator=gen, dtype=torch.float64) < share_cut) & mixed
        h, w = hw
        ch, cw = (h * (1 - lam).sqrt()).round().long(), (w * (1 - lam).sqrt()).round().long()
        y0 = (_uniform(gen, n, 0, 1) * (h - ch + 1)).floor().long().clamp(max=h - 1)
        x0 = (_uniform(gen, n, 0, 1) * (w - cw + 1)).floor().long().clamp(max=w - 1)
        box = torch.stack([y0, y0 + ch, x0, x0 + cw], 1)
        box[~is_cut] = 0
        # cutmix: the sample's share is what the box left of it
        cut_lam = 1 - (ch * cw).double() / (h * w)
        lam = torch.where(is_cut, cut_lam, torch.where(mixed, lam, torch.ones_like(lam)))
    return ViewParams(theta, shift, colour, partner, lam, box)


def _beta(gen: torch.Generator, n: int, alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) draws from ``gen``: X / (X + Y) with X, Y ~ Gamma(alpha) (Marsaglia-Tsang)."""
    return (lambda x, y: x / (x + y))(_gamma(gen, n, alpha), _gamma(gen, n, alpha))


def _gamma(gen: torch.Generator, n: int, alpha: float) -> torch.Tensor:
    boost = alpha < 1  # Gamma(a) = Gamma(a + 1) * U^(1/a)
    a = alpha + 1 if boost else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while len(todo):
        z = torch.randn(len(todo), generator=gen, dtype=torch.float64)
        u = torch.rand(len(todo), generator=gen, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (u.clamp_min(1e-300).log() < 0.5 * z * z + d - d * v + d * v.clamp_min(1e-300).log())
        out[todo[ok]] = (d * v)[ok]
        todo = todo[~ok]
    if boost:
        out = out * torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-300) ** (1 / alpha)
    return out


def apply_view(x: torch.Tensor, idx: torch.Tensor, p: ViewParams, mean: torch.Tensor, std: torch.Tensor,
               fetch: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Augment a batch of normalized images ``x`` (N, C, H, W) whose train-split indices are ``idx``.

    Args:
        x: The batch, on any device.
        idx: Train-split index of each sample (CPU or device).
        p: The view's parameters from :func:`sample_view`.
        mean, std: Per-channel normalization of ``x`` (shape (C, 1, 1), on x's device): colour jitter works on
            un-normalized values.
        fetch: Returns the normalized images of given train indices (on x's device); needed for mixing.
    """
    idx = idx.cpu().long()
    x = _single(x, idx, p, mean, std)
    if p.partner is None:
        return x
    lam = p.lam[idx]
    if bool((lam < 1).any()):
        if fetch is None:
            raise ValueError("mixing needs a way to fetch partner samples")
        j = p.partner[idx]
        other = _single(fetch(j), j, p, mean, std)
        lam_d = lam.to(x.device, x.dtype).view(-1, 1, 1, 1)
        box = p.box[idx]
        h, w = x.shape[-2:]
        rows, cols = torch.arange(h), torch.arange(w)
        inside = (((rows[None, :] >= box[:, :1]) & (rows[None, :] < box[:, 1:2]))[:, :, None]
                  & ((cols[None, :] >= box[:, 2:3]) & (cols[None, :] < box[:, 3:4]))[:, None, :])
        is_cut = (box[:, 1] > box[:, 0]).to(x.device).view(-1, 1, 1, 1)
        mix = lam_d * x + (1 - lam_d) * other
        cut = torch.where(inside[:, None].to(x.device), other, x)
        x = torch.where(is_cut, cut, mix)
    return x


def _flips_only(theta: torch.Tensor) -> torch.Tensor | None:
    """The horizontal-flip mask when every map in ``theta`` is the identity or a mirror image, else None."""
    mirror = theta[:, 0, 0].abs() == 1
    fixed = (theta[:, 0, 1] == 0) & (theta[:, 1, 0] == 0) & (theta[:, 1, 1] == 1) & (theta[:, :, 2] == 0).all(1)
    return theta[:, 0, 0] < 0 if bool((mirror & fixed).all()) else None


def _single(x: torch.Tensor, idx: torch.Tensor, p: ViewParams, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    if p.theta is not None:
        theta = p.theta[idx]
        flips = _flips_only(theta)
        if flips is not None:  # flip-only views: exact pixel moves, ~5x cheaper than resampling at 128 px
            x = torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        else:
            grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if p.shift is not None:
        x = _shift(x, p.shift[idx])
    if p.colour is not None:
        x = _colour(x, p.colour[idx].to(x.device, x.dtype), mean, std)
    return x


def _shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Translate each image by whole pixels (dy, dx), filling with zeros."""
    k = int(shift.abs().max()) if len(shift) else 0
    if k == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (k, k, k, k))
    dev = x.device
    rows = (torch.arange(h)[None, :] + k - shift[:, :1]).to(dev)  # (N, H): output row r reads row r - dy
    cols = (torch.arange(w)[None, :] + k - shift[:, 1:]).to(dev)
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _colour(x: torch.Tensor, f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation factors applied to un-normalized RGB values clamped to [0, 1]."""
    raw = x * std + mean
    b, c, s = (f[:, i].view(-1, 1, 1, 1) for i in range(3))
    raw = (raw * b).clamp(0, 1)
    gray = (0.299 * raw[:, 0:1] + 0.587 * raw[:, 1:2] + 0.114 * raw[:, 2:3])
    raw = ((raw - gray.mean((2, 3), keepdim=True)) * c + gray.mean((2, 3), keepdim=True)).clamp(0, 1)
    gray = 0.299 * raw[:, 0:1] + 0.587 * raw[:, 1:2] + 0.114 * raw[:, 2:3]
    raw = ((raw - gray) * s + gray).clamp(0, 1)
    return (raw - mean) / std


def targets(y: torch.Tensor, idx: torch.Tensor, p: ViewParams, labels_of: Callable[[torch.Tensor], torch.Tensor],
            num_classes: int) -> torch.Tensor:
    """Label targets of an augmented batch: class indices, or soft targets (N, C) where samples were mixed."""
    if p.partner is None:
        return y
    idx = idx.cpu().long()
    lam = p.lam[idx].to(y.device, torch.float32)[:, None]
    other = labels_of(p.partner[idx]).to(y.device)
    return lam * F.one_hot(y, num_classes).float() + (1 - lam) * F.one_hot(other, num_classes).float()


class Augmenter:
    """The augmentation of one training run: views of the train split, generated on demand.

    Args:
        spec: ``data.augment`` of the recipe.
        data: The :class:`~edgekd.data.DataBundle` (its train split is augmented).
        seed: The run's seed; view ``v`` depends on ``seed`` and ``v`` only.
    """

    def __init__(self, spec, data, seed: int):
        self.cfg = resolve(spec)
        self.data = data
        self.seed = seed
        self._view: tuple[int, ViewParams] | None = None
        self._norms: tuple[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.active = not is_identity(self.cfg)
        if self.active and data.layout != "NCHW":
            raise RecipeError(f"data.augment {spec!r} needs images, but {data.source} holds feature vectors",
                              "set data.augment: none")
        channels = data.input_shape[0] if data.layout == "NCHW" else 0
        if self.active and channels != 3 and self.cfg.saturation > 0:
            raise RecipeError(f"data.augment saturation needs RGB images; {data.source} has {channels} channel(s)",
                              "set data.augment.saturation: 0")
        self.mixes = self.active and (self.cfg.mixup > 0 or self.cfg.cutmix > 0)

    def params(self, view: int) -> ViewParams:
        if self._view is None or self._view[0] != view:
            hw = tuple(self.data.input_shape[-2:])
            self._view = (view, sample_view(self.cfg, len(self.data.train), hw, self.seed, view))
        return self._view[1]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, view: int,
                 soft_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch and its label targets (soft targets for mixed samples when ``soft_labels``)."""
        if not self.active:
            return x, y
        p = self.params(view)
        mean, std = self._norm(x)
        out = apply_view(x, torch.as_tensor(idx), p, mean, std, fetch=lambda j: self._fetch(j, mean, std))
        if not self.mixes:
            return out, y
        t = targets(y, torch.as_tensor(idx), p, self._labels, self.data.num_classes)
        if not soft_labels:  # losses that need class indices get the class with the larger share
            t = t.argmax(1)
        return out, t

    def _norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's mean and std as (C, 1, 1) tensors of ``x``'s dtype and device, made once per device."""
        key = (x.dtype, x.device)
        if self._norms is None or self._norms[0] != key:
            self._norms = (key, tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1)
                                      for v in (self.data.mean, self.data.std)))
        return self._norms[1]

    def _fetch(self, j: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The mixing partners ``j`` (split positions), read in one call and normalized as the loader does."""
        raw, _, _ = BatchView(self.data.train)[j.cpu().numpy()]
        return normalize_batch(raw.to(mean.device), mean, std)

    def _labels(self, j: torch.Tensor) -> torch.Tensor:
        ds = self.data.train
        return torch.as_tensor(ds.labels[ds.indices[j.numpy()]], dtype=torch.long)
