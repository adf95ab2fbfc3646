"""Typed recipe schema: load, validate, apply ``--set a.b=value`` overrides, save the resolved recipe.

A recipe is YAML with the sections ``name``, ``seed``, ``data``, ``teacher``, ``student``, ``distill`` and the
optional ``prune``, ``export``, ``validate`` and ``bench``. Every key and its default is documented in
``recipes/README.md``. Unknown keys are errors that suggest the closest valid key.
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekd.errors import RecipeError, RunDirError

DEFAULT_RECIPE = "mnist"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentConfig(_Section):
    """Training augmentation (see ``edgekd.data.augment``); every default leaves the image unchanged."""

    crop_scale: float = Field(1.0, ge=0.08, le=1, description="random-resized-crop: smallest kept area share")
    translate: float = Field(0.0, ge=0, le=0.5, description="random shift, as a share of the image size")
    rotate: float = Field(0.0, ge=0, le=45, description="random rotation up to this many degrees")
    flip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    shift_px: int = Field(0, ge=0, le=16, description="shift by whole pixels, zero fill (the `shift` preset)")
    brightness: float = Field(0.0, ge=0, le=1, description="colour jitter (RGB): factor in [1-b, 1+b]")
    contrast: float = Field(0.0, ge=0, le=1, description="colour jitter (RGB): factor in [1-c, 1+c]")
    saturation: float = Field(0.0, ge=0, le=1, description="colour jitter (RGB only): factor in [1-s, 1+s]")
    mixup: float = Field(0.0, ge=0, description="relative frequency of mixup among mixed samples")
    cutmix: float = Field(0.0, ge=0, description="relative frequency of cutmix among mixed samples")
    mix_prob: float = Field(1.0, ge=0, le=1, description="share of samples mixed when mixup or cutmix is on")
    mix_alpha: float = Field(1.0, gt=0, le=10, description="mixing share ~ Beta(alpha, alpha)")


# Named settings for `data.augment: <name>`. none/shift/flip keep their historical meaning.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "shift": {"shift_px": 2},
    "flip": {"flip": 0.5},
    "light": {"crop_scale": 0.85, "translate": 0.08, "rotate": 10},
    "strong": {"crop_scale": 0.6, "translate": 0.12, "rotate": 15, "mixup": 1, "mix_prob": 0.5},
}


def _check_augment(v: Any) -> Any:
    """A preset name or a mapping of augmentation settings (one-line errors naming the bad setting)."""
    if isinstance(v, dict):  # checked here so the message names the bad setting, not the str/mapping union
        try:
            return AugmentConfig.model_validate(v)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            raise ValueError(f"{where}: {err['msg']}{got}") from e
    if isinstance(v, str) and v not in AUGMENT_PRESETS:
        close = difflib.get_close_matches(v, AUGMENT_PRESETS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(AUGMENT_PRESETS)}"
        raise ValueError(f"unknown augmentation {v!r}; {hint}")
    return v


class IdxFiles(_Section):
    """Explicit IDX files (``data.idx``), instead of the standard names in ``data.path``."""

    train_images: str
    train_labels: str
    test_images: Optional[str] = None
    test_labels: Optional[str] = None


class DataConfig(_Section):
    dataset: str = Field("mnist", description="mnist | fashion_mnist | digits | idx | npz | folder | csv | text")
    path: Optional[str] = Field(None, description="file or folder for idx / fashion_mnist / npz / folder / csv "
                                                  "datasets")
    idx: Optional[IdxFiles] = Field(None, description="idx: the files by role, instead of a folder in data.path")
    test_split: Literal["auto", "predefined", "random"] = Field(
        "auto", description="auto: the source's own test split when it has one, else random; predefined: require "
                            "it; random: draw test_fraction from the whole data set by seed")
    label_column: str = Field("label", description="csv: the column holding the class label")
    image_size: Optional[list[int]] = Field(None, description="folder: resize images to [H, W]")
    grayscale: bool = Field(False, description="folder: read images as one channel")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    limit: Optional[int] = Field(None, gt=0, description="use at most this many samples (quick experiments)")
    batch_size: int = Field(64, gt=0)
    augment: Union[str, AugmentConfig] = Field(
        "none", description=f"training augmentation: a preset ({', '.join(AUGMENT_PRESETS)}) or a mapping of settings")
    normalize: bool = Field(True, description="standardize inputs with statistics of the train split")
    text_column: str = Field("text", description="text: the column (CSV) or key (JSONL) holding the text")
    tokenizer: str = Field("bytes", description="text: `bytes` (built-in byte tokenizer) or a local tokenizer folder")
    max_length: int = Field(64, ge=3, description="text: token ids per sample (padded or cut)")
    workers: Optional[int] = Field(None, ge=0, description="loader processes (default: 0 on CPU, one per spare "
                                                           "core up to 8 on a GPU)")
    cache: bool = Field(True, description="folder: decode and resize images once into a uint8 cache file")
    cache_dir: Optional[str] = Field(None, description="folder: where the image cache lives (default: "
                                                       "$EDGEKD_CACHE_DIR or ~/.cache/edgekd/images)")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_preset(cls, v: Any) -> Any:
        return _check_augment(v)

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of the data for training")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) <= 0):
            raise ValueError("image_size must be two positive integers [H, W]")
        return self


class TrainConfig(_Section):
    epochs: int = Field(5, ge=0)
    lr: float = Field(2e-3, gt=0)
    batch_size: Optional[int] = Field(None, gt=0, description="samples per step for this model (default: "
                                                               "data.batch_size)")
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    scheduler: Literal["none", "cosine", "onecycle", "warmup_cosine"] = "onecycle"
    warmup: float = Field(0.05, ge=0, lt=1, description="warmup_cosine: share of the steps spent warming up")
    ema: Optional[float] = Field(None, gt=0, lt=1, description="keep an EMA of the weights with this decay "
                                                               "(validated, kept and saved instead of the raw ones)")
    grad_clip: Optional[float] = Field(None, gt=0)
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="bf16/fp16 autocast of the trained model's "
                                                                  "forward pass (GPU; also works on CPU)")
    channels_last: bool = Field(False, description="train conv nets in channels_last memory format (faster on "
                                                   "GPUs and, measured, on this CPU; changes rounding, so off by default)")
    compile: bool = Field(False, description="torch.compile the trained model's training forward pass")


class TeacherConfig(TrainConfig):
    model: str = Field("cnn", description="zoo name, `timm:<name>`, `torchvision:<name>`, `package.module:factory` "
                                          "or `path/file.py:factory`")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Optional[str] = Field(None, description="trained weights (state dict .pt/.pth or .safetensors)")
    augment: Optional[Union[str, AugmentConfig]] = Field(
        None, description="augmentation of the teacher's own training (default: data.augment)")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_preset(cls, v: Any) -> Any:
        return None if v is None else _check_augment(v)


class EnsembleTeacherConfig(TeacherConfig):
    weight: Optional[float] = Field(None, ge=0, description="share of this teacher in the soft targets (all or none)")


class StudentConfig(_Section):
    model: str = "cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Optional[str] = Field(None, description="initial weights for the student (optional)")


class DistillConfig(TrainConfig):
    loss: dict[str, Any] = Field(default_factory=lambda: {"name": "kd", "temperature": 4.0, "alpha": 0.9},
                                 description="`name` picks a loss from the registry; other keys are its kwargs")
    baseline: bool = Field(True, description="also train the student from scratch for comparison")
    parallel_baseline: bool = Field(False, description="on a CPU with 2+ threads, train the baseline in a second "
                                                       "process beside the KD student, each on half the threads")
    cache_teacher: bool = Field(True, description="compute the teacher's logits once (for `teacher_views` "
                                                  "augmented views of each sample when augmenting) and replay them")
    teacher_views: int = Field(8, ge=1, description="with augmentation: distinct augmented views per sample; epoch e "
                                                    "shows view e mod teacher_views (student and baseline alike)")
    strategy: Literal["offline", "online", "self"] = Field(
        "offline", description="offline: frozen teacher; online: deep mutual learning; self: born-again generations")
    generations: int = Field(2, ge=1, description="self: student generations, each taught by the previous one")
    ensemble: Literal["logits", "probs"] = Field(
        "logits", description="several teachers: average their logits, or their probabilities")

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_name(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, dict) and "name" not in v:
            raise ValueError("distill.loss needs a `name` (see `edgekd losses`)")
        return v


class PruneConfig(_Section):
    ratio: Optional[float] = Field(0.5, gt=0, lt=1, description="fraction of channels to remove")
    target_macs: Optional[float] = Field(None, gt=1, description="prune until MACs shrink by this factor")
    target_params: Optional[float] = Field(None, gt=1, description="prune until params shrink by this factor")
    steps: int = Field(4, ge=1)
    importance: Literal["l1", "l2", "bn", "taylor"] = "l2"
    global_pruning: bool = False
    protect: list[str] = Field(default_factory=list, description="module names never pruned")
    finetune_epochs: int = Field(2, ge=0, description="KD fine-tune epochs after each step")
    lr: Optional[float] = Field(None, gt=0, description="fine-tuning learning rate (default: distill.lr)")


class QATConfig(TrainConfig):
    """Quantization-aware distillation of the exported student (`edgekd quantize --qat`)."""

    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    scheduler: Literal["none", "cosine", "onecycle"] = "cosine"
    calibration_batches: int = Field(8, ge=0, description="batches that set the first activation ranges")


class ExportTolerance(_Section):
    fp32_rel: float = Field(1e-5, gt=0, description="max |diff| / max |logit| vs PyTorch for fp32 files")
    min_agreement: float = Field(0.98, ge=0, le=1, description="top-1 agreement with PyTorch for fp16/int8")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)


# Flat export keys of earlier recipes and where each now lives: export.<backend>.<key>.
_LEGACY_EXPORT_KEYS = {"nhwc": ("tflite", "nhwc"), "int8_io": ("tflite", "int8_io"),
                       "calibration_method": ("onnx", "calibration_method"), "mcu_io": ("mcu", "io")}


class ExportConfig(_Section):
    """The export: which backends, which precisions, how to verify; each backend's own settings sit in a
    section named after it (``export.tflite.int8_io``, ``export.mcu.io``, ``export.tflite_app.output``...),
    checked by the export against that backend's settings model (this module does not know the backends)."""

    formats: list[str] = Field(default_factory=lambda: ["onnx", "tflite"],
                               description="export backends by name: onnx, tflite, tflite_app, mcu, ort, pte, or any registered (checked by the export)")
    quantize: list[Literal["fp16", "int8", "dynamic"]] = Field(default_factory=lambda: ["int8"])
    calibration_samples: int = Field(256, gt=0)
    teacher: bool = Field(True, description="also export the teacher (fp32) for comparison")
    tolerance: ExportTolerance = Field(default_factory=ExportTolerance)
    max_drop: Optional[float] = Field(None, ge=0, le=100,
                                      description="accuracy budget in percentage points: also write <model>_mixed "
                                                  ".tflite/.onnx/.pte (route `mixed` of the tflite, onnx and pte backends), the "
                                                  "most int8-sensitive layers kept float until the validation "
                                                  "accuracy is within it of the fp32 file's")
    sensitivity_samples: int = Field(1000, gt=0, description="validation samples the per-layer sensitivity and the "
                                                             "mixed-precision search run on")

    # Backend sections are extra keys; a scalar there is a typo of a key above (refused below).
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        """Flat keys of earlier recipes (``int8_io``, ``nhwc``, ``mcu_io``, ``calibration_method``, ``app``,
        ``ort``) go to their backend's section; a flat key given with a section is applied over it."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, (backend, name) in _LEGACY_EXPORT_KEYS.items():
            if key in data:
                value = data.pop(key)
                section = dict(data.get(backend) or {})
                if value is not None:
                    section[name] = value
                data[backend] = section
        if isinstance(data.get("app"), dict):  # the app profile's section was `app`
            data["tflite_app"] = {**dict(data.get("tflite_app") or {}), **data.pop("app")}
        if isinstance(data.get("ort"), bool):  # `ort: true` asked for .ort files beside the .onnx ones
            wanted = data.pop("ort")
            formats = [str(f).strip().lower() for f in (data.get("formats") or ["onnx", "tflite"])]
            data["formats"] = [f for f in formats if f != "ort"] + (["ort"] if wanted else [])
        return data

    @field_validator("formats")
    @classmethod
    def _format_names(cls, v: list[str]) -> list[str]:
        # Names only: which formats exist is the export stage's registry (edgekd.export.list_backends), which
        # this ground-floor module must not import; the export checks them, with a did-you-mean hint.
        names = [str(f).strip().lower() for f in v]
        if any(not n for n in names):
            raise ValueError("an export format name is empty")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _sections_are_mappings(self) -> "ExportConfig":
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                valid = sorted(type(self).model_fields)
                close = difflib.get_close_matches(key, valid + list(_LEGACY_EXPORT_KEYS), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
                raise ValueError(f"unknown key {key!r} (a backend's settings are a section, "
                                 f"e.g. export.tflite.int8_io); {hint}")
        return self

    def backend_sections(self) -> dict[str, dict[str, Any]]:
        """``{backend name: its settings as given}`` for every ``export.<name>`` section."""
        return {k: dict(v) for k, v in (self.model_extra or {}).items()}

    def with_section(self, backend: str, **values: Any) -> "ExportConfig":
        """A copy with ``values`` set in ``export.<backend>`` (None values leave the setting as it is)."""
        data = self.model_dump()
        section = dict(data.get(backend) or {})
        section.update({k: v for k, v in values.items() if v is not None})
        data[backend] = section
        return ExportConfig.model_validate(data)


class ValidateConfig(_Section):
    max_accuracy_drop: Optional[float] = Field(None, ge=0, le=1, description="vs the teacher, absolute")
    max_p50_ms: Optional[float] = Field(None, gt=0)
    max_size_kb: Optional[float] = Field(None, gt=0)
    max_flash_kb: Optional[float] = Field(None, gt=0, description="MCU files: the model array in flash")
    max_ram_kb: Optional[float] = Field(None, gt=0, description="MCU files: the tensor arena the firmware reserves "
                                                               "(input and output tensors included)")
    scope: Literal["any", "all"] = Field("any", description="any: at least one student variant meets every budget "
                                                           "(it is recommended); all: every student variant must")


class BenchConfig(_Section):
    threads: list[int] = Field(default_factory=lambda: [1, 2])
    runs: int = Field(200, gt=0)
    warmup: int = Field(20, ge=0)
    batch: int = Field(1, gt=0)


class Recipe(_Section):
    name: str = DEFAULT_RECIPE
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: Optional[list[EnsembleTeacherConfig]] = Field(
        None, description="several teachers whose soft targets are averaged; the first is also `teacher`")
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    prune: Optional[PruneConfig] = None
    export: Optional[ExportConfig] = None
    qat: Optional[QATConfig] = Field(None, description="int8 files by quantization-aware distillation too")
    validate_: Optional[ValidateConfig] = Field(None, alias="validate")
    bench: Optional[BenchConfig] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("name must be a plain directory name (no '/', not starting with '.')")
        return v

    @field_validator("teachers")
    @classmethod
    def _teacher_weights(cls, v: Optional[list[EnsembleTeacherConfig]]) -> Optional[list[EnsembleTeacherConfig]]:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("teachers needs at least two entries; use teacher: for a single teacher")
        weights = [t.weight for t in v]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError("give every teacher a weight, or none (equal weights)")
        if weights[0] is not None and abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"teacher weights {weights} sum to {sum(weights):g}, not 1")
        return v

    @model_validator(mode="after")
    def _one_teacher_section(self) -> "Recipe":
        # `teacher` mirrors the first of `teachers`, so stages that read one teacher (prune, export) use it and
        # a saved recipe (which holds both) loads again.
        if self.teachers is None:
            return self
        first = TeacherConfig(**self.teachers[0].model_dump(exclude={"weight"}))
        if "teacher" in self.model_fields_set and self.teacher != first:
            raise ValueError("set either teacher: or teachers:, not both (teacher: is the first entry of teachers:)")
        self.teacher = first
        return self

    def teacher_configs(self) -> list[TeacherConfig]:
        """The teachers of the recipe: ``teachers`` if given, else ``[teacher]``."""
        return list(self.teachers) if self.teachers else [self.teacher]

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what is saved as ``recipe.yaml``)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)


# Keys that change how a run uses the machine, not what it computes: a run continued or matched with another
# value of them is the same experiment.
EXECUTION_KEYS = (("distill", "parallel_baseline"), ("data", "workers"))


def without_execution_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict (``Recipe.to_dict()``) without :data:`EXECUTION_KEYS`, for comparing experiments."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recipe.items()}
    for section, key in EXECUTION_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


# Sections read only by the stages after distill: changing them does not make a distilled run another experiment.
LATER_SECTIONS = ("prune", "export", "qat", "validate", "bench")


def distill_part(recipe: dict[str, Any]) -> dict[str, Any]:
    """What distill reads of a recipe dict: no later-stage sections, no run name, no execution keys."""
    return {k: v for k, v in without_execution_keys(recipe).items() if k not in (*LATER_SECTIONS, "name")}


# -- loading --------------------------------------------------------------------------------------------

def builtin_recipe_path(name: str) -> Path:
    """Path of a recipe shipped with edgekd (``recipes/<name>.yaml``)."""
    path = Path(str(importlib.resources.files("edgekd.recipes") / f"{name}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise RecipeError(f"no built-in recipe named {name!r}", f"available: {', '.join(available)}")
    return path


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                **top_level: Any) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        path: A YAML file; a bare name (``mnist``) selects a built-in recipe; None selects the default.
        overrides: ``a.b=value`` strings; values are parsed as YAML scalars then typed by the schema.
        **top_level: Non-None values set top-level keys (``name``, ``seed``) after the overrides.

    Raises:
        RecipeError: With one line saying which key is wrong and how to fix it.
    """
    if path is None:
        path = builtin_recipe_path(DEFAULT_RECIPE)
    else:
        path = Path(path)
        if not path.exists() and path.suffix == "" and "/" not in str(path):
            path = builtin_recipe_path(str(path))
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    for key, value in top_level.items():
        if value is not None:
            raw[key] = value
    return validate_recipe(raw, source=str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found", "pass an existing YAML file, or no argument for the default")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {problem}") from e
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path} is not a text file") from e
    except Exception as e:
        # PyYAML builds some tagged or implicit scalars with Python constructors that raise their own errors
        # (ValueError for a date like 2001-02-30, `!!int 0x` or `!!float abc`; AttributeError for
        # `!!timestamp x`), and recurses on deep nesting: on a user's text, each means "not valid YAML".
        raise RecipeError(f"recipe {path} is not valid YAML: {_one_line(e)}") from e
    if data is None:
        raise RecipeError(f"recipe {path} is empty", "see recipes/README.md for the keys")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, not a {type(data).__name__}")
    return data


def _one_line(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:200]


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw recipe mapping in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r} is not of the form section.key=value", "e.g. --set distill.epochs=3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except Exception:  # not valid YAML (e.g. `2001-02-30`, see read_yaml): the schema types the plain string
        value = text
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate plain data against the schema, with one-line errors and key suggestions."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_describe(e.errors()[0], source)) from e


def _describe(err: dict[str, Any], source: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        # Loss parameters live in distill.loss: `distill.temprature` means distill.loss.temperature, not
        # the nearest spelling among distill's own keys.
        moved = _MOVED_KEYS.get(".".join(loc[:-1]), {})
        near = difflib.get_close_matches(loc[-1], list(moved), n=1, cutoff=0.75)
        close = [moved[near[0]]] if near else difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        close = [".".join(loc[:-1] + close)] if close and not near else close
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{source}: unknown key {key!r}; {hint}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    got_text = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{source}: {key}: {msg}{got_text}"


# Keys users put one level too high: section -> {key: where it belongs}.
_MOVED_KEYS = {"distill": {"temperature": "distill.loss.temperature", "alpha": "distill.loss.alpha"},
               "": {"epochs": "distill.epochs", "lr": "distill.lr", "temperature": "distill.loss.temperature"}}


def _valid_keys(loc: list[str]) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = _field(model, part)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return sorted((f.alias or name) for name, f in model.model_fields.items())


def _field(model: Any, key: str) -> Any:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# -- one recipe section with command-line overrides ------------------------------------------------------

def _section_attr(section: str) -> str:
    return "validate_" if section == "validate" else section


def _check_override_keys(overrides: Sequence[str], sections: Sequence[str], command: str) -> None:
    """A stage command's ``--set`` may only name keys of the sections that stage reads."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] not in sections:
            wanted = " or ".join(f"{s}.KEY=VALUE" for s in sections)
            raise RecipeError(f"--set {key}: `edgekd {command}` reads only the recipe's "
                              f"{' and '.join(repr(s) for s in sections)} section",
                              f"use --set {wanted}, or `edgekd run --set ...` for the other sections")


def merge_section(recipe_path: Path, section: str, overrides: Sequence[str] = (),
                  options: Mapping[str, Any] | None = None, *, command: str = "", default: bool = True) -> Any:
    """One recipe section for a stage command: the run's recipe, then ``--set`` overrides, then options.

    This is the one place a stage command merges what the run's ``recipe.yaml`` says with what the user gave on
    the command line. Overrides go through the schema (unknown keys get a "did you mean" hint); options whose
    value is None were not given and leave the recipe's value; the stage checks the given options itself, so its
    messages name the command-line flag.

    Args:
        recipe_path: The run's ``recipe.yaml`` (it may be missing: then the section's defaults apply).
        section: ``bench``, ``validate``, ``export``, ``prune``...
        overrides: ``--set`` items; each must name a key of ``section``.
        options: Command-line values by section key (None: not given).
        command: The command's name, for error messages.
        default: Without the section in the recipe, start from its defaults (False: return None, unless
            overrides or options are given).

    Returns:
        The section's config model (``BenchConfig``...), or None.

    Raises:
        RecipeError: An override names another section or an unknown key, or has a bad value.
    """
    _check_override_keys(overrides, [section], command or section)
    recipe_path = Path(recipe_path)
    if recipe_path.is_file():
        cfg = getattr(load_recipe(recipe_path, list(overrides)), _section_attr(section))
    elif overrides:
        raise RunDirError(f"{recipe_path} not found, so --set has nothing to override")
    else:
        cfg = None
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if cfg is None and (default or given):
        cfg = _model_of(Recipe.model_fields[_section_attr(section)].annotation)()
    return cfg.model_copy(update=given) if cfg is not None and given else cfg


def section_overrides(overrides: Sequence[str], section: str, command: str = "") -> dict[str, Any]:
    """The typed values ``--set section.key=value`` items give, by key (for stages that take them as options).

    Raises:
        RecipeError: An override names another section or an unknown key, or has a bad value.
    """
    _check_override_keys(overrides, [section], command or section)
    raw: dict[str, Any] = {}
    for item in overrides:
        apply_override(raw, item)
    base = _model_of(Recipe.model_fields[_section_attr(section)].annotation)().model_dump()
    checked = validate_recipe({section: {**base, **(raw.get(section) or {})}}, source="--set")
    cfg = getattr(checked, _section_attr(section))
    return {k: getattr(cfg, k) for k in (raw.get(section) or {})}


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML, atomically."""
    from edgekd.run_dir import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
