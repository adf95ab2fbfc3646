"""Distillation losses: a registry from name to loss module.

Every loss is called as ``loss(student_logits, teacher_logits, labels)`` and returns a scalar tensor.
``labels`` may be None for losses that do not use them (label-free distillation). Build one with
:func:`build` (``edgekd.losses.build("kd", temperature=4, alpha=0.9)``); list them with :func:`available`.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import RecipeError

_LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a loss under ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        _LOSSES[name] = cls
        return cls

    return deco


def available() -> dict[str, str]:
    """Registered loss names with the first line of their docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in sorted(_LOSSES.items())}


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered loss; unknown names or kwargs raise a one-line :class:`RecipeError`."""
    cls = _LOSSES.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, _LOSSES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"available: {', '.join(sorted(_LOSSES))}"
        raise RecipeError(f"unknown loss {name!r}", hint)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"{name} takes: {', '.join(params) or 'no arguments'}"
            raise RecipeError(f"loss {name!r} has no argument {key!r}", hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"loss {name!r}: {e}") from None


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def _hard_term(student_logits: torch.Tensor, labels: torch.Tensor | None, weight: float, name: str) -> torch.Tensor:
    if weight == 0.0:
        return student_logits.new_zeros(())
    if labels is None:
        raise ValueError(f"{name} with alpha < 1 needs labels; set alpha: 1 for label-free distillation")
    return weight * F.cross_entropy(student_logits, labels)


@register_loss("kd")
class KDLoss(nn.Module):
    """Response-based KD of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network".

    ``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``

    The ``T^2`` factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al., section 2). KL is averaged over the batch. With ``alpha = 1`` no labels are used.

    Args:
        temperature: Softening temperature T > 0.
        alpha: Weight of the soft term in [0, 1].
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.alpha = _check_alpha(alpha)

    @property
    def needs_labels(self) -> bool:
        return self.alpha < 1.0

    def forward(self, student_logits, teacher_logits, labels=None):
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * t * t * soft + _hard_term(student_logits, labels, 1.0 - self.alpha, "kd")


@register_loss("mse")
class LogitMSELoss(nn.Module):
    """Logit matching by mean squared error (Ba & Caruana, 2014, "Do Deep Nets Really Need to be Deep?").

    ``loss = alpha * mean((s - t)^2) + (1 - alpha) * CE(s, y)``; the high-temperature limit of KD.

    Args:
        alpha: Weight of the logit term in [0, 1].
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = _check_alpha(alpha)

    @property
    def needs_labels(self) -> bool:
        return self.alpha < 1.0

    def forward(self, student_logits, teacher_logits, labels=None):
        return (self.alpha * F.mse_loss(student_logits, teacher_logits)
                + _hard_term(student_logits, labels, 1.0 - self.alpha, "mse"))


@register_loss("ce")
class CrossEntropyLoss(nn.Module):
    """Plain supervised cross-entropy ``CE(s, y)``; ignores the teacher (used for teacher and baseline)."""

    needs_labels = True
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits, teacher_logits=None, labels=None):
        if labels is None:
            raise ValueError("ce needs labels")
        return F.cross_entropy(student_logits, labels, label_smoothing=self.label_smoothing)
