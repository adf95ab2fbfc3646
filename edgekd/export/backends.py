"""Export backends, keyed by name: the nodes of the export's artifact graph.

A backend (:class:`ExportBackend`) is one kind of model file. It declares

* what it is **made from**: a model variant (``variant``: ``plain``, or one a backend module registers with
  :func:`register_variant`, e.g. ``app``) or another backend's artifact (``source = ("tflite", "int8")``:
  the ``mcu`` file is made from the int8 TFLite file, ``ort`` from every ONNX file);
* its **precisions and routes** (``routes``: precision -> the tool chains tried in order) and whether it has
  a ``qat`` route (``qat_route``: the int8 file written from the quantization-aware-trained student);
* its **settings**, a pydantic model (``Settings``) read from the recipe's ``export.<name>`` section;
* its **steps**: :meth:`~ExportBackend.export` (fp32), :meth:`~ExportBackend.quantize`,
  :meth:`~ExportBackend.write_qat`, :meth:`~ExportBackend.derive` (derived backends),
  :meth:`~ExportBackend.verify` (run the file in its runtime) and :meth:`~ExportBackend.describe` (the
  metadata.json entry: input/output as the runtime reports them, tool versions, format-specific keys).

The pipeline (:mod:`edgekd.export.pipeline`) turns the requested names into an ordered plan
(:func:`resolve_plan`: sources first), builds each model variant once and asks each backend to
:meth:`~ExportBackend.build` its files; it imports no format module. A new format is one module::

    class NpzBackend(ExportBackend):
        name, suffix = "npz", ".npz"
        routes = {"fp32": ("numpy",)}
        def export(self, model, sample, path, *, layout, what): ...
        def io_spec(self, path): ...

    register_backend(NpzBackend())

plus a runtime for its files (:func:`edgekd.runtimes.register_runtime`) so validate, bench and the
verification can run them. A derived backend sets ``source`` and implements :meth:`~ExportBackend.derive`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from edgekd.errors import EdgeKDError, ExportError, RecipeError
from edgekd.export.common import operator_in, quiet, tool_versions

PRECISIONS = ("fp32", "fp16", "int8", "dynamic")
PLAIN = "plain"  # the model variant every backend exports unless it names another
QAT_TAG = "qat"  # file-name tag of quantization-aware-trained files: <model>_int8_qat<suffix>
# int8 except the most int8-sensitive layers, kept float within an accuracy budget (export.max_drop): a route of
# the backends whose quantizer can leave chosen layers float (:meth:`ExportBackend.selective`).
MIXED = "mixed"


# ``export.<backend>.int8_weights`` of the backends that offer both (tflite, onnx).
Int8Weights = Literal["per_channel", "per_tensor"]
INT8_WEIGHTS_HELP = ("int8 weight scales of post-training int8, dynamic and mixed files: per_channel, or per_tensor "
                     "(what some NPUs and DSPs require; loses more accuracy, most on depthwise convolutions). QAT "
                     "files keep per-channel weights")


class NoSettings(BaseModel):
    """Settings of a backend that has none (``export.<name>`` must then be empty)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QuantizeJob:
    """Everything a quantization route may need; each route uses what it needs.

    Attributes:
        model: The fp32 PyTorch model (NCHW or NF input), for routes that quantize the graph.
        sample: One normalized NCHW/NF input (batch 1).
        fp32_path: The verified fp32 file of the same backend, for routes that quantize the file.
        path: Destination; routes write it atomically.
        precision: ``fp16``, ``int8`` or ``dynamic``.
        layout: Input layout of the file (``NCHW``, ``NHWC`` or ``NF``).
        calibration: Normalized NCHW/NF calibration inputs (``int8`` only, else None).
        settings: The backend's settings (its ``Settings`` model, from ``export.<name>``).
        what: Name of the model for error messages.
    """

    model: nn.Module
    sample: torch.Tensor
    fp32_path: Path
    path: Path
    precision: str
    layout: str
    calibration: np.ndarray | None
    settings: Any
    what: str


class ExportBackend:
    """Base class of a backend. Subclasses set the class attributes and implement :meth:`export` and
    :meth:`io_spec` (:meth:`quantize` when ``routes`` has quantized precisions, :meth:`write_qat` with a
    ``qat_route``, :meth:`derive` with a ``source``)."""

    name: ClassVar[str] = ""  # recipe export.formats, metadata "backend", CLI --format
    format: ClassVar[str] = ""  # the file format recorded as metadata "format" (default: the name)
    suffix: ClassVar[str] = ""  # file suffix with its dot
    tag: ClassVar[str] = ""  # file-name tag, needed when another backend writes the same suffix
    variant: ClassVar[str] = PLAIN  # the model variant it is made from (ignored when ``source`` is set)
    # Another backend's artifact it is derived from: (backend name, precision or None for every precision).
    source: ClassVar[tuple[str, str | None] | None] = None
    # Precision -> the routes that write it, tried in this order until one meets the tolerance.
    routes: ClassVar[dict[str, tuple[str, ...]]] = {}
    qat_route: ClassVar[str | None] = None  # route of the int8 file written from the QAT-trained student
    Settings: ClassVar[type[BaseModel]] = NoSettings  # validated from the recipe's export.<name>
    teacher: ClassVar[bool] = True  # the teacher gets a fp32 file too (for comparison)
    # Written whenever this other backend is, unless :meth:`prepare` declines (the app profile with tflite).
    companion_of: ClassVar[str | None] = None
    tools: ClassVar[tuple[str, ...]] = ()  # distributions whose versions metadata.json records (besides torch)
    channel_axis: ClassVar[int] = 1  # channel axis of the layer outputs :meth:`layer_outputs` returns
    runtime: ClassVar[str | None] = None  # the runtime that verifies files (None: the first that runs the suffix)

    # -- the plan --------------------------------------------------------------------------------------
    @property
    def format_name(self) -> str:
        return self.format or self.name

    def file_name(self, model: str, precision: str, qat: bool = False) -> str:
        """``<model>[_<tag>]_<precision>[_qat]<suffix>``."""
        tag = f"_{self.tag}" if self.tag else ""
        return f"{model}{tag}_{precision}{'_' + QAT_TAG if qat else ''}{self.suffix}"

    def owns(self, file: str) -> bool:
        """Whether ``file`` is one this backend writes (its suffix, and its tag when it has one)."""
        stem = Path(file).name[: -len(self.suffix)] if file.lower().endswith(self.suffix) else None
        if stem is None:
            return False
        return f"_{self.tag}_" in f"{stem}_" if self.tag else True

    def settings(self, section: dict[str, Any] | None) -> BaseModel:
        """This backend's settings from the recipe's ``export.<name>`` section (defaults when absent).

        Raises:
            RecipeError: An unknown key or a bad value, naming ``export.<name>.<key>``.
        """
        try:
            return self.Settings.model_validate(section or {})
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(["export", self.name, *[str(p) for p in err["loc"]]])
            if err["type"] == "extra_forbidden":
                valid = list(self.Settings.model_fields)
                close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid) or 'none'}"
                raise RecipeError(f"unknown key {key!r}", hint) from e
            raise RecipeError(f"{key}: {err['msg']} (got {err.get('input')!r})") from e

    def check_plan(self, precisions: list[str], formats: list[str]) -> None:
        """Refuse, before anything is written, a plan this backend cannot follow (default: nothing to check).

        Raises:
            ExportError: The backend's source will not be there (e.g. ``mcu`` without int8).
        """
        if self.source is not None:
            src, precision = self.source
            if precision is not None and precision != "fp32" and precision not in precisions:
                raise ExportError(f"{self.name} is made from the {precision} {src} file, and export.quantize "
                                  f"has no {precision}", f"add {precision} to export.quantize")

    # -- writing ---------------------------------------------------------------------------------------
    def prepare(self, session: Any, settings: Any, asked: bool) -> bool:
        """Check this backend's settings against the run before anything is written; False leaves it out.

        Args:
            session: The export session (the run's layout, input shape, labels...).
            settings: The backend's settings.
            asked: Named in the formats (False: brought in as a source or a companion).

        Raises:
            ExportError: The settings do not fit the run.
        """
        return True

    def check_available(self) -> None:
        """Refuse a backend whose libraries are not installed, before anything is trained or written.

        Raises:
            ExportError: A library is missing (the message says how to install it).
        """

    def file_layout(self, layout: str, settings: Any) -> str:
        """Input layout of this backend's files for a model taking ``layout`` input (NHWC where a backend
        offers channels-last input and its settings ask for it)."""
        return "NHWC" if layout == "NCHW" and getattr(settings, "nhwc", False) else layout

    def finalize(self, path: Path, session: Any) -> None:
        """Give a just-written file what the format carries besides the graph (labels, normalization...)."""

    def routes_for(self, precision: str) -> tuple[str, ...]:
        """The routes that write ``precision``, in the order they are tried.

        Raises:
            ExportError: The backend has no route for this precision.
        """
        routes = self.routes.get(precision)
        if not routes:
            have = ", ".join(p for p in PRECISIONS if self.routes.get(p)) or "none"
            raise ExportError(f"{self.name} has no {precision} export", f"{self.name} precisions: {have}")
        return routes

    def build(self, ctx: Any, target: Any) -> None:
        """Write this backend's files of one model through the export context ``ctx``.

        The default: a model backend writes the fp32 file, then (students only) each quantized precision;
        a derived backend derives a file from each file of its source. Backends whose files need more (the
        app profile) override this.
        """
        if self.source is not None:
            for entry in ctx.source_entries(self, target):
                ctx.derive(self, target, entry)
            return
        fp32 = ctx.export_fp32(target, self)
        if fp32 is not None and target.is_student:
            for precision in ctx.precisions:
                ctx.quantize(target, self, precision, fp32)

    def export(self, model: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, what: str) -> str:
        """Write ``model`` as a fp32 file at ``path`` (atomically) and return the route name.

        Args:
            model: The PyTorch model (NCHW or NF input).
            sample: One normalized NCHW/NF input, batch 1.
            path: Destination.
            layout: Input layout the file must take (see :meth:`file_layout`).
            what: Name of the model for error messages.

        Raises:
            ExportError: The conversion failed (naming the operator when the converter does).
        """
        raise NotImplementedError

    def quantize(self, route: str, job: QuantizeJob) -> str:
        """Write ``job.path`` at ``job.precision`` by ``route`` and return the route name to record."""
        raise ExportError(f"{self.name} has no quantization route {route!r}")

    def write_qat(self, converted: nn.Module, sample: torch.Tensor, path: Path, *, layout: str, settings: Any,
                  what: str) -> str:
        """Write a converted QAT graph (:func:`edgekd.quant.convert_qat`) as an int8 file; return the route."""
        raise ExportError(f"{self.name} has no QAT route")

    def selective(self, fp32_path: Path, calibration: np.ndarray, layout: str, normalization: dict[str, Any],
                  settings: Any, *, model: nn.Module | None = None, sample: torch.Tensor | None = None) -> Any:
        """The ``mixed`` route: a :class:`edgekd.quant.selective.SelectiveRoute` over a fp32 file of this backend
        that writes it with any chosen layers int8 and the rest float (use it as a context manager). ``model``
        and ``sample`` (the fp32 PyTorch model the file was made from, one normalized input) are for routes
        that quantize the graph rather than the file.

        Raises:
            ExportError: The backend has no mixed route.
        """
        raise ExportError(f"{self.name} has no mixed-precision route", "mixed int8/float files: "
                          + ", ".join(n for n, b in _REGISTRY.items() if b.routes.get(MIXED)))

    def finish_mixed(self, path: Path, settings: Any) -> None:
        """Give a mixed file the I/O the backend's settings ask of its int8 files (default: nothing to do)."""

    def derive(self, source_path: Path, source_entry: dict[str, Any], path: Path, ctx: Any) -> "Derived":
        """Make this backend's file at ``path`` from a source file (derived backends only)."""
        raise ExportError(f"{self.name} is not made from another file")

    # -- reading back ------------------------------------------------------------------------------------
    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(input, output)`` of a file as its runtime reports them: ``name``, ``shape`` (dynamic -1),
        ``dtype``, ``quantization`` (``{"scale", "zero_point"}`` or None)."""
        raise NotImplementedError

    def describe(self, path: Path) -> dict[str, Any]:
        """The backend-specific part of a metadata.json entry: ``backend``, ``format``, ``input``, ``output``,
        ``tool_versions`` and any format-specific keys (:meth:`extra_metadata`)."""
        inp, out = self.io_spec(Path(path))
        return {"backend": self.name, "format": self.format_name, "input": inp, "output": out,
                "tool_versions": tool_versions(self.tools), **self.extra_metadata(Path(path))}

    def extra_metadata(self, path: Path) -> dict[str, Any]:
        """Format-specific keys of a file's metadata entry (e.g. a .tflite file's signatures)."""
        return {}

    def verify(self, path: Path, entry: dict[str, Any], x_raw: np.ndarray) -> np.ndarray:
        """Float32 logits of the file for raw test inputs, run in the runtime that verifies this backend.

        Raises:
            ExportError: The file cannot be loaded or run (naming the operator when the runtime does).
        """
        from edgekd.runtimes import deployment_batch, runtime_for

        with quiet():  # interpreters announce their delegates on stderr
            rt = runtime_for(path, entry, runtime=self.runtime)
            try:
                # Batch-1 truth: files whose answers depend on the batch (dynamic-range) run as an app runs them.
                return rt.predict(x_raw, batch_size=deployment_batch(entry))
            except Exception as e:
                text = str(e).strip()
                op = operator_in(text)
                what = f"operator {op} is not supported" if op else (text.splitlines() or [""])[0][:200]
                raise ExportError(f"{Path(path).name} fails to run in {rt.name}: {what}") from e

    def layer_outputs(self, path: Path, x: np.ndarray) -> list[tuple] | None:
        """Every layer's output for prepared inputs ``x``, ``[(op, tensor, label, values)]`` in execution order,
        for finding where a quantized file diverges from its fp32 file (None: not supported)."""
        return None


@dataclass
class Derived:
    """What :meth:`ExportBackend.derive` made: the file's metadata entry, and its numbers for metrics.json.

    ``numbers`` None: the pipeline verifies the file like any other (parity with the source's PyTorch model).
    ``companions``: run-relative files that travel with it (firmware sources, operator lists).
    """

    entry: dict[str, Any]
    numbers: dict[str, Any] | None = None
    companions: list[str] | None = None
    log: str | None = None


# -- model variants ----------------------------------------------------------------------------------------

# name -> builder(model, session) returning the module to export (None: the run cannot have this variant).
_VARIANTS: dict[str, Callable[[nn.Module, Any], nn.Module | None]] = {PLAIN: lambda model, _session: model}


def register_variant(name: str, builder: Callable[[nn.Module, Any], nn.Module | None]) -> None:
    """Register a model variant (a module built around a run's model, e.g. the app profile's pixel wrapper)."""
    _VARIANTS[name] = builder


def variant_builder(name: str) -> Callable[[nn.Module, Any], nn.Module | None]:
    """The builder of a model variant.

    Raises:
        EdgeKDError: No variant of that name is registered.
    """
    if name not in _VARIANTS:
        raise EdgeKDError(f"unknown model variant {name!r}", f"registered variants: {', '.join(_VARIANTS)}")
    return _VARIANTS[name]


# -- the registry -----------------------------------------------------------------------------------------

_REGISTRY: dict[str, ExportBackend] = {}


def register_backend(backend: ExportBackend) -> ExportBackend:
    """Register a backend (an instance) under its ``name``; returns it.

    Two backends may write the same suffix when the later one has a file-name ``tag`` (``_mcu.tflite``,
    ``_app_fp32.tflite``), so every file still names the backend that wrote it.

    Raises:
        EdgeKDError: The backend has no name, no suffix (with its dot), neither an fp32 route nor a source,
            or takes an untagged suffix that another backend already writes.
    """
    if not backend.name or not backend.suffix.startswith(".") or not (backend.routes.get("fp32") or backend.source):
        raise EdgeKDError(f"export backend {type(backend).__name__} needs a name, a suffix with its dot "
                          "and an fp32 route or a source")
    other = next((b for b in _REGISTRY.values() if b.suffix == backend.suffix and b.name != backend.name
                  and b.tag == backend.tag), None)
    if other is not None:
        raise EdgeKDError(f"export backend {backend.name!r}: suffix {backend.suffix} is already written by "
                          f"{other.name!r}", "give the backend a file-name tag")
    if backend.source is not None and backend.source[0] == backend.name:
        raise EdgeKDError(f"export backend {backend.name!r} cannot be made from itself")
    _REGISTRY[backend.name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of the registered backends, in registration order."""
    return list(_REGISTRY)


def get_backend(name: str) -> ExportBackend:
    """The backend of a name.

    Raises:
        ExportError: No such backend; the message suggests the closest one.
    """
    backend = _REGISTRY.get(str(name).strip().lower())
    if backend is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from: {', '.join(_REGISTRY)}"
        raise ExportError(f"unknown format {name!r}", hint)
    return backend


def backend_for(path: str | Path, entry: dict[str, Any] | None = None) -> ExportBackend:
    """The backend that wrote ``path``: the entry's ``backend`` if recorded, else by suffix and tag.

    Raises:
        ExportError: No registered backend writes such files.
    """
    if entry and entry.get("backend") in _REGISTRY:
        return _REGISTRY[entry["backend"]]
    name = Path(path).name
    owners = [b for b in _REGISTRY.values() if b.owns(name)]
    if owners:
        return next((b for b in owners if b.tag), owners[0])
    suffix = Path(path).suffix.lower()
    raise ExportError(f"no export format writes {suffix or 'suffix-less'} files ({name})",
                      f"registered formats: {', '.join(_REGISTRY)}")


def resolve_plan(formats: list[str], precisions: list[str]) -> list[ExportBackend]:
    """The backends to run for the requested names, each after the backend it is made from.

    A derived backend brings its source in (``mcu`` adds ``tflite``); each backend then checks that the
    plan gives it what it needs (:meth:`ExportBackend.check_plan`).

    Raises:
        ExportError: An unknown name (closest suggested), a cycle, or a source that will be missing.
    """
    order: list[ExportBackend] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        backend = get_backend(name)
        if backend.name in chain:
            raise ExportError(f"export backends form a cycle: {' <- '.join((*chain, backend.name))}")
        if backend.source is not None:
            visit(backend.source[0], (*chain, backend.name))
        if backend not in order:
            order.append(backend)

    for name in formats:
        visit(name, ())
    for backend in list(_REGISTRY.values()):
        if backend.companion_of in [b.name for b in order] and backend not in order:
            order.insert(order.index(get_backend(backend.companion_of)) + 1, backend)
    names = [b.name for b in order]
    for backend in order:
        backend.check_plan(list(precisions), names)
    return order
