"""Models from external libraries by name: ``timm:<name>`` and ``torchvision:<name>``.

Written in ``teacher.model`` / ``student.model``; the model is built with the dataset's number of classes (and, for
timm, input channels), with random weights. Trained weights come from a local file named by ``checkpoint:``, read
with ``torch.load(weights_only=True)`` like every other checkpoint. Nothing is downloaded at run time: asking for
``pretrained`` weights is refused with a hint to download them once and name the file.

timm and torchvision are optional extras (``pip install 'edgekd[timm]'``); they are imported only when a recipe
names one of them.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from torch import nn

from edgekd.errors import ModelError

# Keys that make the libraries fetch or unpickle weights themselves; edgekd loads weights only via `checkpoint:`.
_DOWNLOAD_KEYS = {"timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"),
                  "torchvision": ("weights", "pretrained", "weights_backbone")}


def is_source_spec(spec: str) -> bool:
    """True for ``timm:<name>`` and ``torchvision:<name>`` (not for ``package.module:factory`` paths)."""
    prefix, sep, _ = spec.partition(":")
    return bool(sep) and prefix in _BUILDERS


def list_sources() -> list[str]:
    """The library prefixes a model spec may start with."""
    return sorted(_BUILDERS)


def build_from_source(spec: str, input_shape: tuple[int, ...], num_classes: int,
                      kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``timm:<name>`` or ``torchvision:<name>`` with random weights for this dataset.

    Args:
        spec: ``<library>:<model name>``.
        input_shape: One sample's shape; must be an image ``(C, H, W)``.
        num_classes: Outputs of the classifier head.
        kwargs: Passed to the library's model constructor (e.g. ``drop_rate`` for timm).

    Raises:
        ModelError: Library not installed, unknown name, a download asked for, or a failing constructor.
    """
    library, _, name = spec.partition(":")
    kwargs = dict(kwargs or {})
    asked = [k for k in _DOWNLOAD_KEYS[library] if kwargs.get(k) not in (None, False)]
    if asked:
        raise ModelError(f"model {spec!r}: {asked[0]}={kwargs[asked[0]]!r} would fetch or unpickle weights, which "
                         "edgekd never does at run time",
                         "download the weights once, save model.state_dict() to a file and name it in checkpoint:")
    for k in _DOWNLOAD_KEYS[library]:
        kwargs.pop(k, None)
    if not name:
        raise ModelError(f"model {spec!r} names no model", f"write {library}:<model name>, e.g. {library}:resnet18")
    if len(input_shape) != 3:
        raise ModelError(f"model {spec!r} needs images (C, H, W); this dataset's samples have shape {tuple(input_shape)}")
    return _BUILDERS[library](name, tuple(input_shape), num_classes, kwargs)


def _import(library: str, spec: str):
    try:
        return importlib.import_module(library)
    except Exception as e:  # ImportError, or torchvision's RuntimeError when built for another torch
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ModelError(f"model {spec!r} needs the {library} package, which does not import here: {first}",
                         f"install it with: pip install 'edgekd[{library}]'") from e


def _unknown(library: str, name: str, known: list[str]) -> ModelError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {library}:{close[0]}?" if close else f"see {library}'s list_models()"
    return ModelError(f"{library} has no model {name!r}", hint)


def _construct(spec: str, build: Callable[[], nn.Module]) -> nn.Module:
    try:
        model = build()
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"building model {spec!r} failed: {first}", "check teacher/student kwargs") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _timm(name: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    timm = _import("timm", f"timm:{name}")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    kwargs.setdefault("in_chans", input_shape[0])
    return _construct(f"timm:{name}", lambda: timm.create_model(name, pretrained=False, num_classes=num_classes,
                                                                  **kwargs))


def _torchvision(name: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    models = _import("torchvision", f"torchvision:{name}").models
    known = models.list_models()
    if name not in known:
        raise _unknown("torchvision", name, known)
    if input_shape[0] != 3:
        raise ModelError(f"torchvision:{name} takes 3-channel images; this dataset has {input_shape[0]}",
                         "set data.grayscale: false, or use a timm model (in_chans follows the data)")
    return _construct(f"torchvision:{name}", lambda: models.get_model(name, weights=None, num_classes=num_classes,
                                                                       **kwargs))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"timm": _timm, "torchvision": _torchvision}
