"""Predictions and classification metrics of a model over a data split."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgekd.data import DataBundle


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader, in loader order, with the model in eval mode (returned on the CPU)."""
    was_training = model.training
    model.eval()
    outs, ys = [], []
    for x, y, _ in loader:
        outs.append(model(x.to(model_device(model))).cpu())
        ys.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(outs), torch.cat(ys)


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 (classes absent from both sides are ignored)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=np.arange(num_classes), average="macro",
                                                 zero_division=0)
    return {"test_accuracy": float((pred == labels).mean()), "precision_macro": float(p),
            "recall_macro": float(r), "f1_macro": float(f)}


def evaluate(model: nn.Module, data: DataBundle, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Classification metrics of ``model`` on one split."""
    logits, labels = predict_logits(model, data.loader(split, batch_size))
    return classification_metrics(logits.argmax(1).numpy(), labels.numpy(), data.num_classes)
