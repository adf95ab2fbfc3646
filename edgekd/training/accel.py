"""Speed switches for the training forward passes, kept out of the loop so the loop stays readable.

* ``channels_last`` (recipe switch, off by default): conv nets in NHWC memory format. On GPUs with tensor
  cores this is what cuDNN's fastest bf16/fp16 kernels want; on this project's 2-core CPU it made a
  MobileNetV2-0.5 student epoch 1.3x faster at 32 px (benchmarks/train_throughput.py). It is off by default
  because other convolution kernels round differently: existing recipes keep their exact numbers.
* ``compile`` (recipe switch, off by default): ``torch.compile`` of the trained model's forward pass. The
  first steps pay the compilation; the parameters stay those of the plain model, so optimizers, checkpoints
  and exports see no difference.
* :func:`teacher_logits`: the frozen teacher's forward in ``torch.inference_mode`` under the recipe's autocast.
"""

from __future__ import annotations

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def has_conv2d(model: nn.Module) -> bool:
    """True when the model has 2-D convolutions (where ``channels_last`` can matter)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare(model: nn.Module, forward: nn.Module, cfg, teacher: nn.Module | None = None) -> nn.Module:
    """Apply ``cfg.channels_last`` (to ``model`` and ``teacher``) and ``cfg.compile`` (to ``forward``).

    Args:
        model: The trained model (its parameters are what the optimizer holds).
        forward: What the loop calls for the training forward pass (``model`` or a wrapper around it).
        cfg: The training section (``channels_last`` and ``compile`` switches; absent means off).
        teacher: The teacher, converted to the same memory format.

    Returns:
        The module to call for training forward passes.
    """
    if getattr(cfg, "channels_last", False):
        for m in (model, teacher):
            if m is not None and has_conv2d(m):
                m.to(memory_format=torch.channels_last)
    if getattr(cfg, "compile", False):
        forward = torch.compile(forward)
    return forward


def as_input(x: torch.Tensor, cfg) -> torch.Tensor:
    """A batch in the memory format the models were given (NHWC strides under ``channels_last``)."""
    if getattr(cfg, "channels_last", False) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def release(*models: nn.Module | None) -> None:
    """Back to the default memory format, so checkpoints and exports see ordinary NCHW weights."""
    for m in models:
        if m is not None:
            m.to(memory_format=torch.contiguous_format)


def teacher_logits(teacher: nn.Module, x: torch.Tensor, amp: str = "off") -> torch.Tensor:
    """The frozen teacher's float32 logits for a batch: no autograd bookkeeping at all (inference mode) and
    the same autocast as the student (``amp``: ``off``, ``bf16`` or ``fp16``).

    The result is cloned outside inference mode: losses save it for the student's backward pass, which an
    inference tensor may not enter.
    """
    with torch.inference_mode():
        if amp in AMP_DTYPES:
            device_type = x.device.type if x.device.type in ("cuda", "cpu", "mps") else "cpu"
            with torch.autocast(device_type=device_type, dtype=AMP_DTYPES[amp]):
                out = teacher(x)
        else:
            out = teacher(x)
    return out.float().clone()
