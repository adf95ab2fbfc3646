"""Distillation losses: a registry from name to loss module.

Every loss is called as ``loss(student_logits, teacher_logits, labels)`` and returns a scalar tensor.
``labels`` may be None for losses that do not use them (label-free distillation). Build one with
:func:`build` (``edgekd.losses.build("kd", temperature=4, alpha=0.9)``); list them with :func:`available`.

Losses on intermediate features (FitNets, attention transfer, and the relation losses when given layers)
declare what they need instead of changing that signature for everyone:

* ``needs_features`` is True and :meth:`feature_layers` names the student and teacher module paths;
* the trainer hooks those modules for the training batches only, calls :meth:`setup` once with the feature
  shapes (this is where learned projections are created), then calls
  ``loss(student_logits, teacher_logits, labels, features=Features(...))``.

Every loss also says how much hard-label cross-entropy it contains (``label_weight``) so a ``combined`` loss
can refuse to count ``CE(s, y)`` twice.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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


def list_losses() -> list[str]:
    """Names of the registered losses, sorted."""
    return sorted(_LOSSES)


def get_loss(name: str) -> type[nn.Module]:
    """The loss class registered under ``name``.

    Raises:
        RecipeError: No loss of that name; the message suggests the closest one.
    """
    cls = _LOSSES.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, _LOSSES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"available: {', '.join(sorted(_LOSSES))}"
        raise RecipeError(f"unknown loss {name!r}", hint)
    return cls


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered loss; unknown names or kwargs raise a one-line :class:`RecipeError`."""
    cls = get_loss(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"{name} takes: {', '.join(params) or 'no arguments'}"
            raise RecipeError(f"loss {name!r} has no argument {key!r}", hint)
    # A number given as text (`--set distill.loss.temperature=abc`) would otherwise fail deep inside with a
    # comparison error that does not name the argument.
    for key, value in kwargs.items():
        default = inspect.signature(cls.__init__).parameters[key].default
        if value is not None and isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecipeError(f"loss {name!r}: {key} must be a number, got {value!r}",
                              f"e.g. distill.loss.{key}: {default}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"loss {name!r}: {e}") from e


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


class _SoftHardMix(nn.Module):
    """A loss ``alpha * soft + (1 - alpha) * CE``: labels are needed only when ``alpha < 1``."""

    alpha: float

    @property
    def needs_labels(self) -> bool:
        return self.alpha < 1.0

    @property
    def label_weight(self) -> float:
        return 1.0 - self.alpha


@register_loss("kd")
class KDLoss(_SoftHardMix):
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

    search_space = {"temperature": (1.0, 20.0, False), "alpha": (0.0, 1.0, False)}

    def forward(self, student_logits, teacher_logits, labels=None):
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * t * t * soft + _hard_term(student_logits, labels, 1.0 - self.alpha, "kd")


@register_loss("mse")
class LogitMSELoss(_SoftHardMix):
    """Logit matching by mean squared error (Ba & Caruana, 2014, "Do Deep Nets Really Need to be Deep?").

    ``loss = alpha * mean((s - t)^2) + (1 - alpha) * CE(s, y)``; the high-temperature limit of KD.

    Args:
        alpha: Weight of the logit term in [0, 1].
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = _check_alpha(alpha)

    search_space = {"alpha": (0.0, 1.0, False)}

    def forward(self, student_logits, teacher_logits, labels=None):
        return (self.alpha * F.mse_loss(student_logits, teacher_logits)
                + _hard_term(student_logits, labels, 1.0 - self.alpha, "mse"))


@register_loss("ce")
class CrossEntropyLoss(nn.Module):
    """Plain supervised cross-entropy ``CE(s, y)``; ignores the teacher (used for teacher and baseline)."""

    needs_labels = True
    needs_teacher = False
    label_weight = 1.0

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits, teacher_logits=None, labels=None):
        if labels is None:
            raise ValueError("ce needs labels")
        return F.cross_entropy(student_logits, labels, label_smoothing=self.label_smoothing)


# -- helpers shared by the losses below ------------------------------------------------------------------

def label_weight(loss: nn.Module) -> float:
    """How much ``CE(s, y)`` a loss contains (0 for a label-free loss)."""
    return float(getattr(loss, "label_weight", 1.0 if getattr(loss, "needs_labels", False) else 0.0))


def needs_features(loss: nn.Module) -> bool:
    """True if the loss must be called with ``features=`` (intermediate activations of both models)."""
    return bool(getattr(loss, "needs_features", False))


def _check_weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return value


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def _as_paths(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{what} must be a module path or a list of them (e.g. features.3), got {value!r}")
    return paths


@dataclass
class Features:
    """Intermediate activations of one batch, keyed by module path (``features.3``)."""

    student: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)


class FeatureLoss(nn.Module):
    """Base of the losses on pairs of (student, teacher) representations.

    ``loss = beta * sum over pairs of term(s_i, t_i) + ce_weight * CE(s, y)``

    A pair is two module outputs named by ``student_layer`` / ``teacher_layer`` (equal-length lists pair up in
    order); relation losses without layers use the two models' logits as the pair, need no hooks and work with
    cached teacher logits. Teacher representations never receive gradients.
    """

    name = "feature"
    requires_layers = True
    needs_teacher = True

    def __init__(self, student_layer: str | Sequence[str] | None, teacher_layer: str | Sequence[str] | None,
                 beta: float, ce_weight: float):
        super().__init__()
        self.student_layers = _as_paths(student_layer, "student_layer")
        self.teacher_layers = _as_paths(teacher_layer, "teacher_layer")
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"student_layer and teacher_layer must pair up: {len(self.student_layers)} student "
                             f"and {len(self.teacher_layers)} teacher paths")
        if self.requires_layers and not self.student_layers:
            raise ValueError(f"{self.name} needs student_layer and teacher_layer (module paths such as features.3)")
        self.beta = _check_weight(beta, "beta")
        self.ce_weight = _check_weight(ce_weight, "ce_weight")

    @property
    def needs_features(self) -> bool:
        return bool(self.student_layers)

    @property
    def needs_labels(self) -> bool:
        return self.ce_weight > 0

    @property
    def label_weight(self) -> float:
        return self.ce_weight

    def feature_layers(self) -> list[tuple[str, str]]:
        """The (student path, teacher path) pairs this loss reads."""
        return list(zip(self.student_layers, self.teacher_layers))

    def setup(self, student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]]) -> None:
        """Check the feature shapes (per sample, no batch axis) and create what depends on them.

        Raises:
            ValueError: A pair of shapes this loss cannot compare.
        """
        for s, t in self.feature_layers():
            self.check_pair(s, t, tuple(student_shapes[s]), tuple(teacher_shapes[t]))

    def check_pair(self, s_path: str, t_path: str, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        """Validate one pair (subclasses restrict shapes)."""

    def term(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pairs(self, student_logits, teacher_logits, features: Features | None):
        if not self.needs_features:
            return [(student_logits, teacher_logits)]
        if features is None:
            raise ValueError(f"{self.name} compares intermediate features: call it with features= "
                             "(edgekd.training.fit collects them)")
        return [(features.student[s], features.teacher[t]) for s, t in self.feature_layers()]

    def forward(self, student_logits, teacher_logits, labels=None, features: Features | None = None):
        total = student_logits.new_zeros(())
        if self.beta:
            for i, (s, t) in enumerate(self._pairs(student_logits, teacher_logits, features)):
                total = total + self.term(i, s, t.detach())
        return self.beta * total + _hard_term(student_logits, labels, self.ce_weight, self.name)


def _pool_to_common_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two (N, C, H, W) maps to the spatial size of the smaller."""
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if tuple(s.shape[-2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[-2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


@register_loss("fitnets")
class FitNetsLoss(FeatureLoss):
    """Feature hints of Romero et al. (2015), "FitNets: Hints for Thin Deep Nets" (ICLR).

    ``loss = beta * sum_pairs mean((r(s_l) - t_l)^2) + ce_weight * CE(s, y)``

    ``s_l`` / ``t_l`` are the outputs of the student / teacher modules named by ``student_layer`` /
    ``teacher_layer``. When their widths differ, ``r`` is a learned 1x1 convolution (conv maps) or linear layer
    (flat features) trained with the student; it lives in this loss, not in the student, so exported models
    never contain it. Maps of different spatial size are average-pooled to the smaller size. The paper trains
    the hint in a separate first stage; here hint and labels are optimized together in one stage, as in later
    benchmarks (e.g. Tian et al. 2020, CRD).

    Args:
        student_layer: Student module path(s), e.g. ``features.3``.
        teacher_layer: Teacher module path(s), one per student path.
        beta: Weight of the hint term.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    name = "fitnets"
    search_space = {"beta": (0.1, 100.0, True)}

    def __init__(self, student_layer: str | list[str] | None = None, teacher_layer: str | list[str] | None = None,
                 beta: float = 1.0, ce_weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, beta, ce_weight)
        self.projections = nn.ModuleList()

    def setup(self, student_shapes, teacher_shapes) -> None:
        super().setup(student_shapes, teacher_shapes)
        projections = []
        for s, t in self.feature_layers():
            cs, ct = student_shapes[s][0], teacher_shapes[t][0]
            if cs == ct:
                projections.append(nn.Identity())
            elif len(student_shapes[s]) == 3:
                projections.append(nn.Conv2d(cs, ct, kernel_size=1, bias=False))
            else:
                projections.append(nn.Linear(cs, ct, bias=False))
        self.projections = nn.ModuleList(projections)

    def check_pair(self, s_path, t_path, s_shape, t_shape) -> None:
        if len(s_shape) != len(t_shape) or len(s_shape) not in (1, 3):
            raise ValueError(f"fitnets: student layer {s_path!r} gives features of shape {s_shape} and teacher layer "
                             f"{t_path!r} {t_shape}; pair two conv maps (C, H, W) or two flat vectors (F,)")

    def term(self, i, s, t):
        if len(self.projections) <= i:
            raise ValueError("fitnets: call setup() with the feature shapes before the first batch")
        s = self.projections[i](s)
        if s.ndim == 4:
            s, t = _pool_to_common_size(s, t)
        return F.mse_loss(s, t)


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of Zagoruyko & Komodakis: ``normalize(mean_c |A_c|^p)`` flattened, one row per sample."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


@register_loss("at")
class AttentionTransferLoss(FeatureLoss):
    """Attention transfer of Zagoruyko & Komodakis (2017), "Paying More Attention to Attention" (ICLR).

    ``Q(A) = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||_2``;
    ``loss = beta / 2 * sum_pairs mean_{n,j} (Q(S_l)_{n,j} - Q(T_l)_{n,j})^2 + ce_weight * CE(s, y)``

    (the paper's eq. 2 with the squared-difference form of the authors' code; ``beta = 1000`` as in the paper).
    Maps need the same number of positions, not channels: maps of different size are average-pooled to the
    smaller one, so no projection is needed.

    Args:
        student_layer: Student module path(s) giving (C, H, W) maps.
        teacher_layer: Teacher module path(s), one per student path.
        beta: Weight of the attention term.
        p: Exponent of the attention map.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    name = "at"
    search_space = {"beta": (10.0, 10000.0, True)}

    def __init__(self, student_layer: str | list[str] | None = None, teacher_layer: str | list[str] | None = None,
                 beta: float = 1000.0, p: float = 2.0, ce_weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, beta, ce_weight)
        self.p = _check_weight(p, "p")
        if self.p == 0:
            raise ValueError("p must be > 0")

    def check_pair(self, s_path, t_path, s_shape, t_shape) -> None:
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ValueError(f"at: layers {s_path!r} {s_shape} and {t_path!r} {t_shape} must both give (C, H, W) maps")

    def term(self, i, s, t):
        s, t = _pool_to_common_size(s, t)
        return 0.5 * (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    # Computed from differences (not the Gram trick) so the diagonal is exactly 0 and gradients stay finite.
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    return diff.pow(2).sum(-1).clamp_min(1e-12).sqrt() * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def _off_diagonal(n: int, device=None) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


@register_loss("rkd")
class RKDLoss(FeatureLoss):
    """Relational KD of Park et al. (2019), "Relational Knowledge Distillation" (CVPR): distance and angle.

    For embeddings ``e_i`` of a batch (a layer's output flattened, or the logits when no layer is named):
    ``psi_D(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the mean distance over pairs ``i != j``;
    ``psi_A(i, j, k) = <(e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j||>`` over ``i != j, k != j``;
    ``loss = distance_weight * mean huber(psi_D^s - psi_D^t) + angle_weight * mean huber(psi_A^s - psi_A^t)
    + ce_weight * CE(s, y)`` (Huber with delta 1; the paper's weights 25 and 50). Relations compare samples
    within a model, so student and teacher widths may differ freely.

    Args:
        student_layer: Student module path(s); none = logits.
        teacher_layer: Teacher module path(s), one per student path.
        distance_weight: Weight of the distance term (lambda_D).
        angle_weight: Weight of the angle term (lambda_A).
        ce_weight: Weight of the hard-label cross-entropy.
    """

    name = "rkd"
    requires_layers = False
    search_space = {"distance_weight": (1.0, 100.0, True), "angle_weight": (1.0, 100.0, True)}

    def __init__(self, student_layer: str | list[str] | None = None, teacher_layer: str | list[str] | None = None,
                 distance_weight: float = 25.0, angle_weight: float = 50.0, ce_weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, 1.0, ce_weight)
        self.distance_weight = _check_weight(distance_weight, "distance_weight")
        self.angle_weight = _check_weight(angle_weight, "angle_weight")
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError("distance_weight and angle_weight are both 0: the loss would ignore the teacher")

    @staticmethod
    def distance_potential(e: torch.Tensor) -> torch.Tensor:
        d = _pairwise_distances(e.flatten(1))
        off = _off_diagonal(len(e), e.device)
        return d[off] / d[off].mean().clamp_min(1e-12)

    @staticmethod
    def angle_potential(e: torch.Tensor) -> torch.Tensor:
        e = e.flatten(1)
        n = len(e)
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # unit[j, i] = (e_i - e_j) / ||.||
        cos = torch.bmm(unit, unit.transpose(1, 2))  # cos[j, i, k]
        off = _off_diagonal(n, e.device)
        mask = off.unsqueeze(2) & off.unsqueeze(1)  # i != j and k != j
        return cos[mask]

    def term(self, i, s, t):
        out = s.new_zeros(())
        if len(s) < 2:
            return out
        if self.distance_weight:
            out = out + self.distance_weight * F.smooth_l1_loss(self.distance_potential(s), self.distance_potential(t))
        if self.angle_weight and len(s) >= 3:
            out = out + self.angle_weight * F.smooth_l1_loss(self.angle_potential(s), self.angle_potential(t))
        return out


@register_loss("sp")
class SimilarityPreservingLoss(FeatureLoss):
    """Similarity-preserving KD of Tung & Mori (2019), "Similarity-Preserving Knowledge Distillation" (ICCV).

    ``G = Q Q^T`` with ``Q`` the layer's output flattened per sample (b x d), ``G~`` its rows L2-normalized;
    ``loss = beta * sum_pairs ||G~_t - G~_s||_F^2 / b^2 + ce_weight * CE(s, y)`` (``beta`` is the paper's
    gamma, 3000). Only b x b similarities are compared, so widths may differ.

    Args:
        student_layer: Student module path(s); none = logits.
        teacher_layer: Teacher module path(s), one per student path.
        beta: Weight of the similarity term (gamma).
        ce_weight: Weight of the hard-label cross-entropy.
    """

    name = "sp"
    requires_layers = False
    search_space = {"beta": (10.0, 10000.0, True)}

    def __init__(self, student_layer: str | list[str] | None = None, teacher_layer: str | list[str] | None = None,
                 beta: float = 3000.0, ce_weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, beta, ce_weight)

    @staticmethod
    def similarity(x: torch.Tensor) -> torch.Tensor:
        q = x.flatten(1)
        return F.normalize(q @ q.t(), dim=1)

    def term(self, i, s, t):
        b = len(s)
        return (self.similarity(t) - self.similarity(s)).pow(2).sum() / (b * b)


@register_loss("pkt")
class PKTLoss(FeatureLoss):
    """Probabilistic knowledge transfer (PKT) of Passalis & Tefas (2018, ECCV): match batch similarity densities.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer".

    With cosine kernel ``K(a, b) = (cos(a, b) + 1) / 2`` and ``p(j|i) = K(x_i, x_j) / sum_{k != i} K(x_i, x_k)``
    over pairs ``j != i`` of the batch: ``loss = beta * sum_pairs (1/b) sum_i sum_{j != i} p_t(j|i) log(p_t(j|i)
    / p_s(j|i)) + ce_weight * CE(s, y)``. Distributions over the batch, so widths may differ. The default
    ``beta = 500`` matches the weight 30000 of the CRD benchmark (Tian et al. 2020), whose loss averages over all
    ``b^2`` pairs instead of summing over the ``b - 1`` partners (30000 / 64 ≈ 500 at batch 64).

    Args:
        student_layer: Student module path(s); none = logits.
        teacher_layer: Teacher module path(s), one per student path.
        beta: Weight of the KL term.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    name = "pkt"
    requires_layers = False
    search_space = {"beta": (10.0, 10000.0, True)}
    eps = 1e-7

    def __init__(self, student_layer: str | list[str] | None = None, teacher_layer: str | list[str] | None = None,
                 beta: float = 500.0, ce_weight: float = 1.0):
        super().__init__(student_layer, teacher_layer, beta, ce_weight)

    @classmethod
    def conditional(cls, x: torch.Tensor) -> torch.Tensor:
        """``p(j|i)`` as a (b, b - 1) matrix (the diagonal removed)."""
        q = F.normalize(x.flatten(1), dim=1)
        k = (q @ q.t() + 1) / 2
        b = len(x)
        k = k[_off_diagonal(b, x.device)].view(b, b - 1) + cls.eps
        return k / k.sum(1, keepdim=True)

    def term(self, i, s, t):
        if len(s) < 2:
            return s.new_zeros(())
        ps, pt = self.conditional(s), self.conditional(t)
        return (pt * (pt.log() - ps.log())).sum(1).mean()


@register_loss("dkd")
class DKDLoss(nn.Module):
    """Decoupled KD of Zhao et al. (2022), "Decoupled Knowledge Distillation" (CVPR).

    With ``p = softmax(z / T)`` and target class ``y``: ``b = [p_y, 1 - p_y]`` (target vs the rest) and
    ``p^ = softmax(z_{!=y} / T)`` (distribution among the non-target classes).
    ``TCKD = T^2 KL(b^t || b^s)``, ``NCKD = T^2 KL(p^t || p^s)`` (batch means);
    ``loss = ce_weight * CE(s, y) + w(e) * (alpha * TCKD + beta * NCKD)``, where ``w(e) = min(1, (e + 1) /
    warmup_epochs)`` ramps the KD part in over the first epochs (``w = 1`` without warm-up). Paper defaults:
    alpha 1, beta 8, T 4. Needs labels: the decoupling is defined by the target class.

    Args:
        temperature: Softening temperature T > 0.
        alpha: Weight of the target-class term TCKD.
        beta: Weight of the non-target-class term NCKD.
        ce_weight: Weight of the hard-label cross-entropy.
        warmup_epochs: Epochs over which the KD part is ramped in linearly (0: none).
    """

    needs_labels = True
    needs_teacher = True
    search_space = {"temperature": (1.0, 20.0, False), "alpha": (0.0, 2.0, False), "beta": (0.5, 16.0, True)}

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, ce_weight: float = 1.0,
                 warmup_epochs: int = 0):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_weight(alpha, "alpha")
        self.beta = _check_weight(beta, "beta")
        self.ce_weight = _check_weight(ce_weight, "ce_weight")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self.epoch = 0

    @property
    def label_weight(self) -> float:
        return self.ce_weight

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer with the 0-based epoch (drives the warm-up)."""
        self.epoch = int(epoch)

    @property
    def warmup_factor(self) -> float:
        return min(1.0, (self.epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0

    def forward(self, student_logits, teacher_logits, labels=None):
        if labels is None:
            raise ValueError("dkd needs labels: target and non-target classes are defined by them")
        n, c = student_logits.shape
        if c < 2:
            raise ValueError("dkd needs at least two classes")
        t = self.temperature
        target = F.one_hot(labels, c).bool()
        zs, zt = student_logits / t, teacher_logits.detach() / t
        # log p_y and log(1 - p_y) from log-sum-exps: stable even when p_y is within rounding of 1.
        lse_s, lse_t = zs.logsumexp(1), zt.logsumexp(1)
        other_s, other_t = zs[~target].view(n, c - 1), zt[~target].view(n, c - 1)
        bin_s = torch.stack([zs[target] - lse_s, other_s.logsumexp(1) - lse_s], 1)
        bin_t = torch.stack([zt[target] - lse_t, other_t.logsumexp(1) - lse_t], 1)
        tckd = F.kl_div(bin_s, bin_t, reduction="batchmean", log_target=True)
        nckd = F.kl_div(F.log_softmax(other_s, 1), F.log_softmax(other_t, 1), reduction="batchmean", log_target=True)
        kd = t * t * (self.alpha * tckd + self.beta * nckd)
        return self.warmup_factor * kd + _hard_term(student_logits, labels, self.ce_weight, "dkd")


@register_loss("combined")
class CombinedLoss(nn.Module):
    """Weighted sum of registered losses: ``loss = sum_i weight_i * L_i`` (e.g. KD on logits + FitNets hints).

    ``terms`` is a list of ``{name, weight, **kwargs}`` (weight defaults to 1). Weights must be finite and >= 0
    with a positive sum, and at most one term may contain the hard-label cross-entropy so ``CE(s, y)`` is not
    counted twice (set ``alpha: 1`` on kd/mse or ``ce_weight: 0`` on the other terms).

    Args:
        terms: The losses and their weights.
    """

    def __init__(self, terms: list[dict[str, Any]] | None = None):
        super().__init__()
        if not isinstance(terms, (list, tuple)) or not terms:
            raise ValueError("combined needs terms: a list of {name: ..., weight: ..., <kwargs>}")
        built, weights, names = [], [], []
        for i, term in enumerate(terms):
            if not isinstance(term, dict) or not isinstance(term.get("name"), str):
                raise ValueError(f"term {i + 1} must be a mapping with a `name`, got {term!r}")
            kwargs = dict(term)
            name = kwargs.pop("name")
            if name == "combined":
                raise ValueError("terms cannot themselves be combined losses; list all terms in one")
            weights.append(_check_weight(kwargs.pop("weight", 1.0), f"weight of term {i + 1} ({name})"))
            try:
                built.append(build(name, **kwargs))
            except RecipeError as e:
                raise ValueError(f"term {i + 1}: {e}") from e
            names.append(name)
        if sum(weights) <= 0:
            raise ValueError(f"the term weights {weights} sum to 0: give at least one term a positive weight")
        with_ce = [f"{n} (CE weight {w * label_weight(m):g})" for n, w, m in zip(names, weights, built)
                   if w * label_weight(m) > 0]
        if len(with_ce) > 1:
            raise ValueError(f"CE(s, y) is counted in {len(with_ce)} terms: {', '.join(with_ce)}; keep it in one "
                             "(alpha: 1 on kd/mse, ce_weight: 0 on the others)")
        self.terms = nn.ModuleList(built)
        self.weights = weights
        self.names = names

    @property
    def needs_labels(self) -> bool:
        return any(w > 0 and getattr(m, "needs_labels", False) for w, m in zip(self.weights, self.terms))

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(m, "needs_teacher", True) for m in self.terms)

    @property
    def needs_features(self) -> bool:
        return any(needs_features(m) for m in self.terms)

    @property
    def label_weight(self) -> float:
        return sum(w * label_weight(m) for w, m in zip(self.weights, self.terms))

    def feature_layers(self) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        for m in self.terms:
            if needs_features(m):
                pairs += [p for p in m.feature_layers() if p not in pairs]
        return pairs

    def setup(self, student_shapes, teacher_shapes) -> None:
        for m in self.terms:
            if needs_features(m):
                m.setup(student_shapes, teacher_shapes)

    def on_epoch_start(self, epoch: int) -> None:
        for m in self.terms:
            if hasattr(m, "on_epoch_start"):
                m.on_epoch_start(epoch)

    def forward(self, student_logits, teacher_logits, labels=None, features: Features | None = None):
        total = student_logits.new_zeros(())
        for w, m in zip(self.weights, self.terms):
            if w == 0:
                continue
            if needs_features(m):
                total = total + w * m(student_logits, teacher_logits, labels, features=features)
            else:
                total = total + w * m(student_logits, teacher_logits, labels)
        return total


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Build the loss a recipe's ``distill.loss`` mapping describes (``{name: ..., **kwargs}``)."""
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if not isinstance(name, str):
        raise RecipeError("distill.loss needs a `name`", "see `edgekd losses`")
    return build(name, **kwargs)
