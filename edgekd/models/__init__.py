"""Models: a registry of edge-friendly architectures, user factories, and safe checkpoints."""

from edgekd.models.checkpoint import load_checkpoint, load_weights, save_checkpoint
from edgekd.models.registry import build_model, count_macs_params, create_model, list_models, register_model

__all__ = ["build_model", "count_macs_params", "create_model", "list_models", "load_checkpoint",
           "load_weights", "register_model", "save_checkpoint"]
