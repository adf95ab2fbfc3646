"""The augmentation hook of the training loop.

An augmentation is any callable ``augment(x, y, idx, view, soft_labels=True) -> (x, y)``: ``x`` is the batch
already on the training device, ``y`` its labels, ``idx`` the samples' train-split indices and ``view`` the
epoch's view number (``epoch``, or ``epoch mod distill.teacher_views`` for distill settings). An augmentation
that mixes samples returns soft label targets where ``soft_labels`` allows it, else the class with the larger
share. The teacher signal sees the augmented batch the student sees. A callable whose ``active`` attribute is
False leaves batches unchanged, which allows caching the teacher's logits of the plain samples.

The built-in one is :class:`edgekd.data.augment.Augmenter` (``data.augment``: presets ``none``, ``shift``,
``flip``, ``light``, ``strong`` or a mapping of settings): every random draw of sample ``i`` in view ``v`` comes
from a CPU generator seeded by ``(seed, v)`` only and is moved to the batch's device, so a resumed run, another
device, and the augmented-teacher cache (:mod:`edgekd.training.teacher_cache`) all get the same images.
"""

from __future__ import annotations

from edgekd.data.augment import Augmenter

__all__ = ["Augmenter"]
