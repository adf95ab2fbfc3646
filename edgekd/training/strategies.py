"""Who teaches whom: offline (frozen teachers, possibly several), online (mutual learning), self (born-again).

* **offline** (default): one frozen teacher, or a list of them whose soft targets are combined by
  :class:`TeacherEnsemble` (plain or weighted mean of logits or of probabilities).
* **online**: deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning", CVPR): teacher and student
  are trained together, each from the labels and from the other's current predictions.
* **self**: born-again networks (Furlanello et al. 2018, "Born-Again Neural Networks", ICML): generation 0
  is the student architecture trained on labels; generation ``k`` is trained by distillation from
  generation ``k - 1``. The last generation is the run's ``student``.

The distill stage runs them; this module holds the pieces and the checks (shared with prune and sweep).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from edgekd import losses
from edgekd.errors import RecipeError
from edgekd.recipe import Recipe


class TeacherEnsemble(nn.Module):
    """Several frozen teachers seen as one: their combined soft targets, as logits.

    ``space="logits"``: ``z = sum_k w_k z_k`` (so ``softmax(z / T)`` is the soft target at any temperature).
    ``space="probs"``: ``z = log sum_k w_k softmax(z_k)``, whose softmax is exactly the weighted mean of the
    teachers' probabilities (at ``T = 1``).

    Args:
        teachers: The teacher models.
        weights: Non-negative weights summing to 1 (None: equal weights).
        space: ``logits`` or ``probs``.
    """

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None, space: str = "logits"):
        super().__init__()
        if not teachers:
            raise ValueError("an ensemble needs at least one teacher")
        if weights is None:
            weights = [1.0 / len(teachers)] * len(teachers)
        if len(weights) != len(teachers) or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"ensemble weights {list(weights)} must be one per teacher, >= 0 and sum to 1")
        if space not in ("logits", "probs"):
            raise ValueError(f"space must be logits or probs, got {space!r}")
        self.members = nn.ModuleList(teachers)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]))
        self.space = space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(x) for m in self.members])  # (K, N, C)
        w = self.weights.to(outs.dtype).view(-1, 1, 1)
        if self.space == "logits":
            return (w * outs).sum(0)
        return torch.logsumexp(outs.log_softmax(-1) + w.log(), dim=0)


def teacher_roles(n: int) -> list[str]:
    """Run-directory roles of ``n`` teachers: ``teacher``, ``teacher2``, ``teacher3``..."""
    return ["teacher"] + [f"teacher{i}" for i in range(2, n + 1)]


def generation_roles(generations: int) -> list[str]:
    """Roles of the born-again generations 1..G: ``student_gen1``... and ``student`` for the last."""
    return [f"student_gen{g}" for g in range(1, generations)] + ["student"]


def check_strategy(recipe: Recipe, loss: nn.Module) -> None:
    """Refuse combinations of strategy, teachers and loss that cannot work, before anything is trained.

    Raises:
        RecipeError: With what to change.
    """
    strategy = recipe.distill.strategy
    several = recipe.teachers is not None
    if strategy != "offline" and several:
        raise RecipeError(f"distill.strategy {strategy} uses one teacher, but the recipe lists {len(recipe.teachers)} "
                          "teachers", "use strategy: offline for a teacher ensemble, or a single teacher:")
    if several and losses.needs_features(loss):
        raise RecipeError("feature losses compare the student with one teacher's layers, but the recipe lists "
                          f"{len(recipe.teachers)} teachers", "use a logit loss (kd, dkd, mse) with teachers:")
    if strategy == "online":
        if losses.needs_features(loss):
            raise RecipeError("distill.strategy online supports losses on logits only",
                              "use kd, dkd or mse, or strategy: offline for feature losses")
        if losses.label_weight(loss) <= 0:
            raise RecipeError("distill.strategy online trains both models from scratch, but the loss has no label "
                              "term, so they would only imitate each other", "set alpha below 1 (e.g. 0.5)")
    if strategy == "self" and recipe.teacher.checkpoint:
        raise RecipeError("distill.strategy self trains its own teachers (generations of the student); "
                          "teacher.checkpoint is not used", "remove teacher.checkpoint or use strategy: offline")
