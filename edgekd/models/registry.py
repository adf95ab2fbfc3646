"""The model registry: plain factory functions registered by name (the timm convention).

A factory is ``factory(input_shape, num_classes, **kwargs) -> nn.Module``. This module only keeps the table;
:mod:`edgekd.models.builder` loads the built-in zoo and builds models from it, so the zoo can register itself
here without an import cycle.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def registered_models() -> dict[str, Callable[..., nn.Module]]:
    """A copy of the table of factories registered so far, by name (the zoo may not be loaded yet)."""
    return dict(_REGISTRY)
