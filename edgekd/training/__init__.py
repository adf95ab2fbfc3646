"""The training library the stages share (distill, prune's recovery, sweep's trials): never imports a stage.

* :mod:`~edgekd.training.loop`: ``fit`` (the loop), ``FitConfig``, ``TrainResult``.
* :mod:`~edgekd.training.signals`: teacher signals (none / cached logits / live / features / peer).
* :mod:`~edgekd.training.augment`: the batch augmentation hook and the built-in kinds.
* :mod:`~edgekd.training.checkpoint`: the atomic, resumable per-epoch state.
* :mod:`~edgekd.training.callbacks`: console lines, ``history.csv``, Optuna pruning, plain functions.
* :mod:`~edgekd.training.metrics`: predictions and classification metrics.
* :mod:`~edgekd.training.parallel`: device choice, torchrun / DDP helpers, mixed precision.
* :mod:`~edgekd.training.features`: forward hooks and shape probing for feature losses.
* :mod:`~edgekd.training.strategies`: teacher ensembles, role names, strategy checks.
* :mod:`~edgekd.training.roles`: a recipe's models built, trained into a run directory, teachers loaded.
"""

from edgekd.training.augment import Augment
from edgekd.training.callbacks import Callback, ConsoleLog, HistoryFile, OnEpoch, OptunaPruning
from edgekd.training.checkpoint import Checkpointer
from edgekd.training.loop import FitConfig, TrainResult, fit
from edgekd.training.metrics import classification_metrics, evaluate, predict_logits
from edgekd.training.signals import (CachedLogits, FeatureTeacher, LiveTeacher, NoTeacher, PeerTeacher,
                                     TeacherSignal, choose_signal)
from edgekd.training.strategies import TeacherEnsemble, check_strategy, generation_roles, teacher_roles

__all__ = ["Augment", "CachedLogits", "Callback", "Checkpointer", "ConsoleLog", "FeatureTeacher", "FitConfig",
           "HistoryFile", "LiveTeacher", "NoTeacher", "OnEpoch", "OptunaPruning", "PeerTeacher", "TeacherEnsemble",
           "TeacherSignal", "TrainResult", "check_strategy", "choose_signal", "classification_metrics", "evaluate",
           "fit", "generation_roles", "predict_logits", "teacher_roles"]
