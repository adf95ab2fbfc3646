"""Hugging Face ``transformers`` models as edgekd teachers and students (ViT, BERT and other Auto classes).

Models are built from a config (``ViTConfig`` / ``BertConfig`` keyword arguments, or any ``model_type`` known to
``transformers.AutoConfig``) or loaded from a LOCAL directory written by ``save_pretrained``. Nothing is ever
downloaded: loading uses ``local_files_only=True`` and a missing or incomplete directory is a one-line
:class:`~edgekd.errors.ModelError`.

Every model is wrapped in :class:`HFClassifier` so that, like the rest of the zoo, ``forward(x)`` takes one tensor
and returns logits. Text models take token ids as a float32 tensor ``(N, max_length)`` (ids below 2**24 are exact
in float32) and cast them to int64 inside the graph: the data pipeline, exporters and runtimes all assume float
inputs, and this keeps one input convention for every exported file. Padding (``pad_token_id``) is masked out.

Registered names (this module is imported lazily by the registry, because importing ``transformers`` is slow):

* ``hf_vit``: image classification, ``transformers.ViTForImageClassification``.
* ``hf_bert``: sequence classification, ``transformers.BertForSequenceClassification``.
* ``hf_image`` / ``hf_text``: any ``AutoModelForImageClassification`` / ``AutoModelForSequenceClassification``
  given by ``pretrained`` (a local directory) or ``config`` (with a ``model_type``, e.g. ``mobilenet_v2``).

Hidden states are exposed for feature distillation as modules ``hidden_states.<i>`` (``0`` = embeddings,
``i`` = output of layer ``i``). They are laid out ``(N, hidden, tokens, 1)``, a "feature map" whose channels are
the hidden units, so the ``fitnets`` loss compares them token by token and learns a 1x1 projection (one linear
map shared by all tokens) when the student is narrower than the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.models.registry import register_model

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


class HFClassifier(nn.Module):
    """A ``transformers`` classification model behind the edgekd convention ``logits = model(x)``.

    Args:
        hf: The ``...ForImageClassification`` / ``...ForSequenceClassification`` model.
        kind: ``image`` (``x`` = pixel values, NCHW float) or ``text`` (``x`` = token ids, float or int).
        pad_token_id: Text only: the id of padding, excluded by the attention mask.
    """

    def __init__(self, hf: nn.Module, kind: str, pad_token_id: int = 0):
        super().__init__()
        self.hf = hf
        self.kind = kind
        self.pad_token_id = int(pad_token_id)
        layers = int(getattr(hf.config, "num_hidden_layers", 0) or 0)
        # Identity taps: hooks on them see the hidden states (see the module docstring).
        self.hidden_states = nn.ModuleList(nn.Identity() for _ in range(layers + 1 if layers else 0))

    def _tapped(self) -> bool:
        return any(m._forward_hooks for m in self.hidden_states)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want_hidden = self._tapped()  # a Python-level choice: exported graphs never compute the taps
        if self.kind == "text":
            ids = x.round().long() if x.is_floating_point() else x.long()
            out = self.hf(input_ids=ids, attention_mask=(ids != self.pad_token_id).long(),
                          output_hidden_states=want_hidden, return_dict=True)
        else:
            out = self.hf(pixel_values=x, output_hidden_states=want_hidden, return_dict=True)
        if want_hidden:
            for tap, h in zip(self.hidden_states, out.hidden_states):
                if h.ndim == 3:  # (N, tokens, hidden) -> (N, hidden, tokens, 1)
                    h = h.transpose(1, 2).unsqueeze(-1)
                tap(h)
        return out.logits


# -- building ------------------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelError("hf_* models need the `transformers` package", "pip install transformers") from e
    transformers.logging.set_verbosity_error()  # "newly initialized weights" notices are expected here
    return transformers


def check_local_dir(path: str | Path, what: str = "model") -> Path:
    """A local Hugging Face directory holding ``config.json`` (and, for a model, weights).

    Raises:
        ModelError: The directory is missing or incomplete (the message names the missing file).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"local {what} directory {p} does not exist",
                         "point `pretrained` at a folder written by save_pretrained (nothing is downloaded)")
    if what == "model":
        if not (p / "config.json").is_file():
            raise ModelError(f"local model directory {p} is incomplete: no config.json",
                             "copy the whole save_pretrained folder")
        if not any((p / w).is_file() for w in WEIGHT_FILES):
            raise ModelError(f"local model directory {p} is incomplete: no weights ({' or '.join(WEIGHT_FILES[:2])})",
                             "copy the whole save_pretrained folder")
    return p


def _load_pretrained(auto_cls, path: str | Path, num_classes: int, overrides: dict[str, Any]) -> nn.Module:
    p = check_local_dir(path)
    try:
        return auto_cls.from_pretrained(str(p), local_files_only=True, num_labels=num_classes,
                                        ignore_mismatched_sizes=True, attn_implementation="eager", **overrides)
    except Exception as e:  # safetensors, json, size and OS errors all mean "this folder is not loadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"cannot load local model directory {p}: {first}",
                         "check that the folder was written by save_pretrained and is complete") from e


def _from_config(tf, config: dict[str, Any], num_classes: int, auto_cls) -> nn.Module:
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ModelError("hf config needs a `model_type` (e.g. vit, bert, mobilenet_v2)")
    try:
        cfg = tf.AutoConfig.for_model(model_type, num_labels=num_classes, **config)
    except (ValueError, TypeError) as e:
        raise ModelError(f"bad hf config for model_type {model_type!r}: {e}") from e
    cfg._attn_implementation = "eager"  # exportable everywhere, and attention maps stay available
    try:
        return auto_cls.from_config(cfg)
    except (ValueError, TypeError) as e:
        raise ModelError(f"cannot build {model_type!r} for classification: {e}") from e


def _image_config(input_shape: tuple[int, ...], config: dict[str, Any]) -> dict[str, Any]:
    if len(input_shape) != 3:
        raise ModelError(f"image transformers need image inputs (C, H, W), got input shape {tuple(input_shape)}")
    c, h, w = input_shape
    image_size = h if h == w else [h, w]
    return {"num_channels": c, "image_size": image_size, **config}


def _text_length(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise ModelError(f"text transformers need token-id inputs (max_length,), got input shape {tuple(input_shape)}",
                         "use data.dataset: text")
    return int(input_shape[0])


@register_model
def hf_vit(input_shape: tuple[int, ...], num_classes: int, hidden_size: int = 32, num_hidden_layers: int = 2,
           num_attention_heads: int = 2, intermediate_size: int = 64, patch_size: int = 4,
           pretrained: str | None = None, from_teacher: str | None = None, layers: Any = "alternate",
           **config: Any) -> nn.Module:
    """A ViT classifier (``ViTForImageClassification``) built from config keys, or loaded from ``pretrained``.

    Args:
        input_shape: ``(C, H, W)``; sets ``num_channels`` and ``image_size``.
        num_classes: Number of labels (a pretrained head of another size is re-initialized).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size: ``ViTConfig`` keys.
        pretrained: A local ``save_pretrained`` directory to load instead (the size keys are then ignored).
        from_teacher: A local directory or edgekd checkpoint of a teacher: the student is the teacher with a
            subset of its layers (see :func:`init_from_teacher`).
        layers: With ``from_teacher``: ``alternate`` (one layer out of two) or a list of layer indices.
        **config: Any other ``ViTConfig`` key (``hidden_dropout_prob``...).
    """
    tf = _transformers()
    if from_teacher:
        return student_from_teacher(from_teacher, layers, input_shape, num_classes)
    if pretrained:
        return HFClassifier(_load_pretrained(tf.AutoModelForImageClassification, pretrained, num_classes, config),
                            "image")
    cfg = _image_config(input_shape, {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
                                      "num_attention_heads": num_attention_heads,
                                      "intermediate_size": intermediate_size, "patch_size": patch_size, **config})
    return HFClassifier(_from_config(tf, {"model_type": "vit", **cfg}, num_classes,
                                     tf.AutoModelForImageClassification), "image")


@register_model
def hf_bert(input_shape: tuple[int, ...], num_classes: int, vocab_size: int = 259, hidden_size: int = 32,
            num_hidden_layers: int = 2, num_attention_heads: int = 2, intermediate_size: int = 64,
            pad_token_id: int = 0, pretrained: str | None = None, from_teacher: str | None = None,
            layers: Any = "alternate", **config: Any) -> nn.Module:
    """A BERT classifier (``BertForSequenceClassification``) over token ids, from config keys or ``pretrained``.

    Args:
        input_shape: ``(max_length,)``; ``max_position_embeddings`` is at least ``max_length``.
        num_classes: Number of labels.
        vocab_size: Must cover the tokenizer: 259 for the built-in ``bytes`` tokenizer.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ``BertConfig`` keys.
        pad_token_id: Id of padding (masked out of attention).
        pretrained: A local ``save_pretrained`` directory to load instead.
        from_teacher: Teacher directory or edgekd checkpoint to take layers from (DistilBERT-style init).
        layers: With ``from_teacher``: ``alternate`` or a list of layer indices.
        **config: Any other ``BertConfig`` key.
    """
    tf = _transformers()
    length = _text_length(input_shape)
    if from_teacher:
        return student_from_teacher(from_teacher, layers, input_shape, num_classes)
    if pretrained:
        return HFClassifier(_load_pretrained(tf.AutoModelForSequenceClassification, pretrained, num_classes, config),
                            "text", pad_token_id)
    cfg = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
           "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size,
           "pad_token_id": pad_token_id, "max_position_embeddings": max(length, 16), **config}
    return HFClassifier(_from_config(tf, {"model_type": "bert", **cfg}, num_classes,
                                     tf.AutoModelForSequenceClassification), "text", pad_token_id)


@register_model
def hf_image(input_shape: tuple[int, ...], num_classes: int, pretrained: str | None = None,
             config: dict[str, Any] | None = None) -> nn.Module:
    """Any ``AutoModelForImageClassification``: a local ``pretrained`` directory or a ``config`` with ``model_type``."""
    tf = _transformers()
    if pretrained:
        return HFClassifier(_load_pretrained(tf.AutoModelForImageClassification, pretrained, num_classes, {}), "image")
    if not config:
        raise ModelError("hf_image needs `pretrained` (a local directory) or `config` (with model_type)")
    cfg = dict(config)
    if len(input_shape) == 3:
        cfg.setdefault("num_channels", input_shape[0])
        cfg.setdefault("image_size", input_shape[1])
    return HFClassifier(_from_config(tf, cfg, num_classes, tf.AutoModelForImageClassification), "image")


@register_model
def hf_text(input_shape: tuple[int, ...], num_classes: int, pretrained: str | None = None,
            config: dict[str, Any] | None = None, pad_token_id: int = 0) -> nn.Module:
    """Any ``AutoModelForSequenceClassification``: a local ``pretrained`` directory or a ``config``."""
    tf = _transformers()
    _text_length(input_shape)
    if pretrained:
        return HFClassifier(_load_pretrained(tf.AutoModelForSequenceClassification, pretrained, num_classes, {}),
                            "text", pad_token_id)
    if not config:
        raise ModelError("hf_text needs `pretrained` (a local directory) or `config` (with model_type)")
    return HFClassifier(_from_config(tf, dict(config), num_classes, tf.AutoModelForSequenceClassification),
                        "text", pad_token_id)


# -- DistilBERT-style initialization ------------------------------------------------------------------

def pick_layers(num_layers: int, layers: Any) -> list[int]:
    """Teacher layer indices for the student: ``alternate`` = 0, 2, 4... (DistilBERT) or an explicit list."""
    if layers in (None, "alternate"):
        return list(range(0, num_layers, 2))
    if isinstance(layers, Sequence) and not isinstance(layers, str) and layers:
        idx = [int(i) for i in layers]
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise ModelError(f"layers {idx} name layer {bad[0]}, but the teacher has layers 0..{num_layers - 1}")
        return idx
    raise ModelError(f"layers must be 'alternate' or a non-empty list of teacher layer indices, got {layers!r}")


def _encoder_layers(hf: nn.Module) -> nn.ModuleList:
    # The list's name moves between architectures and versions (bert.encoder.layer, vit.layers in
    # transformers 5): take the first ModuleList holding exactly num_hidden_layers blocks.
    n = int(getattr(hf.config, "num_hidden_layers", 0) or 0)
    for _, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and n and len(module) == n:
            return module
    raise ModelError(f"{type(hf).__name__} has no list of {n} encoder layers to take layers from",
                     "layer-subset initialization supports BERT/ViT-style encoders")


def init_from_teacher(teacher: HFClassifier, layers: Any = "alternate") -> HFClassifier:
    """A student that is ``teacher`` with only some of its encoder layers (the DistilBERT initialization).

    Embeddings, the chosen layers (in order), the final norm / pooler and the classifier are copied; student
    layer ``j`` is teacher layer ``layers[j]``.
    """
    if not isinstance(teacher, HFClassifier):
        raise ModelError(f"layer-subset initialization needs an hf_* teacher, not {type(teacher).__name__}")
    t_hf = teacher.hf
    picked = pick_layers(len(_encoder_layers(t_hf)), layers)
    cfg = t_hf.config.__class__.from_dict(t_hf.config.to_dict())
    cfg.num_hidden_layers = len(picked)
    cfg._attn_implementation = "eager"
    s_hf = type(t_hf)(cfg)
    t_state = t_hf.state_dict()
    prefix = _layer_prefix(t_hf)
    new_state = {}
    for key in s_hf.state_dict():
        if key.startswith(prefix):
            j, rest = key[len(prefix):].split(".", 1)
            new_state[key] = t_state[f"{prefix}{picked[int(j)]}.{rest}"]
        else:
            new_state[key] = t_state[key]
    s_hf.load_state_dict(new_state)
    return HFClassifier(s_hf, teacher.kind, teacher.pad_token_id)


def _layer_prefix(hf: nn.Module) -> str:
    layer_list = _encoder_layers(hf)
    for name, module in hf.named_modules():
        if module is layer_list:
            return name + "."
    raise ModelError("cannot locate the encoder layers")  # pragma: no cover - _encoder_layers found them


def student_from_teacher(source: str, layers: Any, input_shape: tuple[int, ...], num_classes: int) -> HFClassifier:
    """Load a teacher from a local HF directory or an edgekd checkpoint and keep a subset of its layers."""
    p = Path(source).expanduser()
    if p.is_file():
        from edgekd.models.checkpoint import load_checkpoint
        from edgekd.models.loading import load_model

        ckpt = load_checkpoint(p)
        info = ckpt.get("model") or {}
        if not str(info.get("spec", "")).startswith("hf_"):
            raise ModelError(f"from_teacher checkpoint {p} does not hold an hf_* model",
                             "point from_teacher at an edgekd checkpoint of an hf_* teacher or a local HF directory")
        teacher = load_model(p, checkpoint=ckpt)
    else:
        tf = _transformers()
        check_local_dir(p)
        probe = tf.AutoConfig.from_pretrained(str(p), local_files_only=True)
        is_image = probe.model_type in ("vit", "deit", "beit", "dinov2") or hasattr(probe, "num_channels")
        auto = tf.AutoModelForImageClassification if is_image else tf.AutoModelForSequenceClassification
        teacher = HFClassifier(_load_pretrained(auto, p, num_classes, {}), "image" if is_image else "text")
    return init_from_teacher(teacher, layers)
