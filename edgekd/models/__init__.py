"""Models: a registry of edge-friendly architectures, user factories, safe checkpoints and :func:`load_model`.

Layout: ``registry`` (the table of factories), ``zoo`` and ``hf`` (the built-in factories, registered there),
``builder`` (``create_model`` / ``build_model`` / ``list_models``), ``checkpoint`` (safe reading and writing),
``pruned`` (the pruned-model format) and ``loading`` (``load_model``: any edgekd checkpoint back to a model).
"""

from edgekd.models.builder import build_model, count_macs_params, create_model, get_model_factory, list_models
from edgekd.models.checkpoint import load_checkpoint, load_weights, save_checkpoint
from edgekd.models.loading import load_model, model_spec
from edgekd.models.pruned import load_pruned, load_pruned_model, save_pruned
from edgekd.models.registry import register_model

__all__ = ["build_model", "count_macs_params", "create_model", "get_model_factory", "list_models",
           "load_checkpoint", "load_model", "load_pruned", "load_pruned_model", "load_weights", "model_spec",
           "register_model", "save_checkpoint", "save_pruned"]
