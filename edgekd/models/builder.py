"""Building models: by registered name (:func:`create_model`) or user factory path (:func:`build_model`).

User factories are named ``package.module:factory`` or ``path/to/file.py:factory``; they receive
``input_shape`` and ``num_classes`` only if their signature asks. The built-in zoo registers itself on first
use; the ``hf_*`` wrappers are registered lazily, because importing ``transformers`` takes seconds.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.models.registry import registered_models

def list_models(include_hf: bool = False) -> list[str]:
    """Names of the built-in zoo models (with ``include_hf``, also the ``hf_*`` transformers wrappers)."""
    _load_zoo()
    names = registered_models()
    if include_hf:
        return sorted(set(names) | set(_LAZY))
    return sorted(n for n in names if n not in _LAZY)  # the same list whether or not hf.py was imported


def _load_zoo() -> None:
    import edgekd.models.zoo  # noqa: F401  (registers the built-in models)


# Registered on first use: importing `transformers` takes seconds, and `edgekd --help` must stay instant.
_LAZY = {"hf_vit": "edgekd.models.hf", "hf_bert": "edgekd.models.hf", "hf_image": "edgekd.models.hf",
         "hf_text": "edgekd.models.hf"}


def _load_lazy(name: str) -> None:
    if name in _LAZY and name not in registered_models():
        importlib.import_module(_LAZY[name])


def get_model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered under ``name`` (loading the zoo, or the ``hf_*`` wrappers, first).

    Raises:
        ModelError: No model of that name; the message suggests the closest one.
    """
    _load_zoo()
    _load_lazy(name)
    factories = registered_models()
    if name not in factories:
        close = difflib.get_close_matches(name, list(factories) + list(_LAZY), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"built-in models: {', '.join(sorted(factories))}"
        raise ModelError(f"unknown model {name!r}", hint)
    return factories[name]


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: A name from :func:`list_models`.
        input_shape: Shape of one sample, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: Number of output logits.
        **kwargs: The factory's knobs (width, depth, ...).
    """
    return _call(get_model_factory(name), name, input_shape, num_classes, kwargs)


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from a recipe spec: a registered name or a user factory path."""
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        return create_model(spec, input_shape, num_classes, **kwargs)
    return _call(_import_factory(spec), spec, input_shape, num_classes, kwargs)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    # User code runs only because the recipe names this import path explicitly.
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelError(f"model {spec!r} is not of the form package.module:factory or path/file.py:factory")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        mod_name = f"edgekd_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ModelError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelError(f"cannot import {target!r}: {e}", "check the module path and that it is installed") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{target} has no callable {attr!r}")
    return factory


def _call(factory: Callable[..., nn.Module], name: str, input_shape: tuple[int, ...], num_classes: int,
          kwargs: dict[str, Any]) -> nn.Module:
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call_kwargs = dict(kwargs)
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in params or takes_any:
            call_kwargs.setdefault(key, value)
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        valid = [k for k in params if k not in ("input_shape", "num_classes")]
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"{name} takes: {', '.join(valid) or 'no kwargs'}"
        raise ModelError(f"model {name!r} has no argument {unknown[0]!r}", hint)
    try:
        model = factory(**call_kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"building model {name!r} failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_macs_params(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Multiply-accumulates and parameters of one forward pass at batch 1 (torch-pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return int(macs), int(params)
