"""Quantization-aware distillation: fine-tune a float student with int8 fake quantization and the KD loss.

The student is traced with ``torch.export``, fake-quantized by torchao's PT2E QAT (``prepare_qat_pt2e``) with
the quantizer configuration of the int8 PT2E TFLite route (litert-torch's ``PT2EQuantizer``: symmetric int8,
per-channel weights, conv+BatchNorm folded during training), fine-tuned against the teacher's logits by the
project's training loop (per-epoch atomic checkpoints, exact resume), then converted to a graph with explicit
quantize/dequantize nodes. The export stage writes that graph to TFLite (litert-torch) and ONNX (QDQ), so both
files carry the scales learned here rather than scales calibrated after training.

ModelOpt's quantization-aware distillation is the anchor for the method: the teacher, not the labels, is the
target while the quantized student adapts to its rounding.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from edgekd.errors import ExportError

# Upper bound of the traced batch dimension. ONNX export re-traces the converted graph with the same bound
# (edgekd.export.onnx uses 1 << 16): torch.export refuses a re-trace whose range contradicts the first one.
QAT_BATCH_MAX = 1 << 16


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao warns about optional CUDA kernels on import
        yield


def int8_quantizer(qat: bool = False):
    """litert-torch's PT2E quantizer as the int8 TFLite route configures it (symmetric, per-channel weights).

    Args:
        qat: Fake-quantize modules for training instead of observers for calibration.
    """
    with _quiet_imports():
        from litert_torch.quantize import pt2e_quantizer

    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    return pt2e_quantizer.PT2EQuantizer().set_global(config)


@contextlib.contextmanager
def _conv_bn_patterns_as_modules() -> Iterator[None]:
    """Let litert-torch's conv+BN QAT annotator run on torch >= 2.9.

    litert-torch 0.10 hands plain functions to torchao's ``_get_aten_graph_module_for_pattern``, which calls
    ``torch.export.export`` — and that now accepts only modules (litert-torch issue #801 shows the same
    annotator failing). torchao's own QAT patterns wrap their functions in ``WrapperModule``; this does the
    same for litert-torch's, and only while the graph is being prepared.
    """
    with _quiet_imports():
        from litert_torch.quantize import pt2e_quantizer_utils as utils
        from torchao.quantization.pt2e.export_utils import WrapperModule

    original = utils._get_aten_graph_module_for_pattern

    def wrapped(pattern, *args, **kwargs):
        if not isinstance(pattern, nn.Module):
            pattern = WrapperModule(pattern)
        return original(pattern, *args, **kwargs)

    utils._get_aten_graph_module_for_pattern = wrapped
    try:
        yield
    finally:
        utils._get_aten_graph_module_for_pattern = original


class QATModel(nn.Module):
    """A PT2E graph with fake quantization that the training loop can treat like any model.

    ``train()`` / ``eval()`` switch the graph's BatchNorm and dropout between their training and inference
    forms (exported graphs have no modules to flip) and turn the activation observers on / off: ranges are
    learned from training batches only, so evaluating on the validation split never moves a scale.
    """

    def __init__(self, graph: torch.fx.GraphModule):
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "QATModel":
        with _quiet_imports():
            from torchao.quantization.pt2e import (disable_observer, enable_observer, move_exported_model_to_eval,
                                                   move_exported_model_to_train)

        self.training = mode
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.graph.apply(enable_observer if mode else disable_observer)
        return self


def prepare_qat(model: nn.Module, sample: torch.Tensor) -> QATModel:
    """Trace a float model and insert int8 fake quantization (PT2E QAT) with the TFLite route's quantizer.

    Args:
        model: The float student (pruned or not); it is copied, not modified.
        sample: One normalized input batch (any batch size) in the model's layout.

    Returns:
        The fake-quantized model in training mode (the batch dimension stays dynamic).

    Raises:
        ExportError: The model cannot be traced or annotated; the message names the operator when it can.
    """
    with _quiet_imports():
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    float_model = copy.deepcopy(model).cpu().train()
    # Trace at batch 2: at batch 1 torch.export may specialize the batch dimension to a constant.
    example = sample[:1].repeat(2, *([1] * (sample.ndim - 1)))
    batch = torch.export.Dim("batch", min=1, max=QAT_BATCH_MAX)
    try:
        with _quiet_imports(), _conv_bn_patterns_as_modules():
            graph = torch.export.export(float_model, (example,), dynamic_shapes=({0: batch},)).module()
            prepared = prepare_qat_pt2e(graph, int8_quantizer(qat=True))
    except Exception as e:  # tracers raise anything from RuntimeError to AssertionError
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise ExportError(f"QAT preparation of the student failed in torchao PT2E: {type(e).__name__}: {first[:200]}",
                          "the model must be traceable by torch.export; use PTQ (`edgekd quantize`) instead") from e
    return QATModel(prepared).train()


@torch.no_grad()
def calibrate(qat_model: QATModel, batches: Iterator[torch.Tensor] | list[torch.Tensor]) -> None:
    """Initialize the activation ranges from calibration batches before training.

    BatchNorm runs in inference form (running statistics stay as the float student learned them) while the
    observers record; without this the first training batch alone would set every range.
    """
    qat_model.eval()
    with _quiet_imports():
        from torchao.quantization.pt2e import enable_observer

    qat_model.graph.apply(enable_observer)
    for x in batches:
        qat_model(x)
    qat_model.train(False)  # observers off again until training starts


def finetune_qat(qat_model: QATModel, data, cfg, loss_fn: nn.Module, *, seed: int, state_path: Path,
                 teacher: nn.Module | None, resume: bool = False, quiet: bool = True, cache_teacher: bool = True,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None, role: str = "qat"):
    """KD fine-tuning of a fake-quantized student by the project's training loop.

    Args:
        qat_model: From :func:`prepare_qat` (modified in place; ends with the best-validation weights).
        data: The run's :class:`~edgekd.data.DataBundle`.
        cfg: Epochs, learning rate, optimizer and schedule (a :class:`~edgekd.recipe.TrainConfig`).
        loss_fn: A loss from :mod:`edgekd.losses`, called with the student's and the teacher's logits.
        seed: Seeds shuffling; epoch ``e`` depends on ``seed`` and ``e`` only.
        state_path: The per-epoch resumable checkpoint (written atomically, read with ``weights_only``).
        teacher: The frozen float teacher (None: supervised QAT with the labels).
        resume: Continue from ``state_path`` if it exists.
        quiet: No progress bar or per-epoch lines.
        cache_teacher: Compute the teacher's logits once for the train split.
        on_epoch: Called with each epoch's history row after the checkpoint is written.
        role: Name in history rows and messages.

    Returns:
        The training loop's result (history, seconds, best epoch and validation accuracy).
    """
    from edgekd.training import FitConfig, OnEpoch, fit

    if resume and Path(state_path).exists():
        # Per-channel ranges are created by the first forward pass; run one so the saved tensors fit their slots.
        with torch.no_grad():
            qat_model.train()(data.train[0][0].unsqueeze(0))
    config = FitConfig(role=role, train=cfg, seed=seed, state_path=Path(state_path), resume=resume, quiet=quiet,
                       cache_teacher=cache_teacher)
    callbacks = [OnEpoch(on_epoch)] if on_epoch is not None else []
    return fit(qat_model, data, loss_fn, config, teacher=teacher, callbacks=callbacks)


def _stays_in_inference_form(self: nn.Module, mode: bool = True) -> nn.Module:
    return self


def convert_qat(qat_model: QATModel, fold_weights: bool = False) -> torch.fx.GraphModule:
    """The fake-quantized model as a graph with explicit int8 quantize/dequantize nodes (inference form).

    ``fold_weights``: store the weights already quantized (int8 constants), as XNNPACK's lowering needs;
    without it the graph quantizes float weights at run time, which litert-torch and the ONNX exporter take.

    The result is what the backends' QAT routes consume (:mod:`edgekd.export.qat`). Its ``train()`` / ``eval()``
    return the graph unchanged, so exporters can call ``model = model.eval()`` as on any model (an exported
    graph refuses both; torchao's ``allow_exported_model_train_eval`` makes them return None). It stays a
    plain graph module: the ONNX exporter cannot unlift the weights of a graph nested in a wrapper module.
    """
    with _quiet_imports():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    qat_model.eval()
    try:
        with _quiet_imports():
            converted = convert_pt2e(copy.deepcopy(qat_model.graph), fold_quantize=fold_weights)
    except Exception as e:
        raise ExportError(f"converting the QAT model failed: {type(e).__name__}: {str(e)[:200]}") from e
    converted.train = types.MethodType(_stays_in_inference_form, converted)
    converted.eval = types.MethodType(_stays_in_inference_form, converted)
    return converted


def top1(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Top-1 classes of ``model`` for the normalized inputs ``x`` (eval mode, no gradients)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).argmax(1).numpy())
    return np.concatenate(out)
