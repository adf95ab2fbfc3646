"""TFLite Model Metadata for image classifiers, written with the published flatbuffer schema.

Image clients (MediaPipe Tasks' ``ImageClassifier``, the TFLite Task Library, ML Kit custom models) read a
model's metadata to know how to feed it and how to name its outputs: the ``TFLITE_METADATA`` buffer of the
model (a ``tflite.ModelMetadata`` flatbuffer, file identifier ``M001``, schema ``metadata_schema.fbs`` of
tflite-support / MediaPipe) plus the associated files (labels) appended to the model as a zip archive.

MediaPipe 1.2.3's own writer does not import and tflite-support's pins an old protobuf, so the few tables an
image classifier needs are built here directly with the ``flatbuffers`` package. Field numbers follow the
schema's declaration order; a union takes two slots (its type, then its value).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Sequence

import flatbuffers
import numpy as np

from edgekd.errors import ExportError

METADATA_BUFFER_NAME = b"TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
# Every table and field written here exists since the schema's first release (1.0.0); the clients compare
# this against the newest version they can parse.
MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE = "labels.txt"

# Enum values from metadata_schema.fbs.
_ASSOCIATED_TENSOR_AXIS_LABELS = 2
_COLOR_SPACE = {"RGB": 1, "GRAYSCALE": 2}
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2  # union ContentProperties
_PROCESS_NORMALIZATION = 1  # union ProcessUnitOptions
# A fixed timestamp keeps repeated exports byte-identical (the zip stores one per member).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass
class ImageClassifierInfo:
    """What the metadata of an image classifier says.

    Attributes:
        name: Model name shown by tools.
        description: One paragraph about the model.
        version: Model version (edgekd writes its own version and the run name).
        width: Input width in pixels.
        height: Input height in pixels.
        mean: Normalization the client applies, in the input tensor's units (one value, or one per channel).
        std: Likewise.
        labels: Class names in output order (written to ``labels.txt`` inside the model).
        input_range: ``(min, max)`` of the values the input tensor takes (statistics for tools).
        output_range: ``(min, max)`` of the output (``(0, 1)`` for probabilities, None for logits).
        output_description: What the output tensor holds.
        author: Author field.
        license: License field.
    """

    name: str
    description: str
    version: str
    width: int
    height: int
    mean: Sequence[float]
    std: Sequence[float]
    labels: Sequence[str]
    input_range: tuple[float, float] = (0.0, 255.0)
    output_range: tuple[float, float] | None = (0.0, 1.0)
    output_description: str = "Probabilities of the classes named in labels.txt."
    author: str = "edgekd"
    license: str = ""


def _floats(b: flatbuffers.Builder, values: Sequence[float]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(list(values)):
        b.PrependFloat32(float(v))
    return b.EndVector()


def _offsets(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(list(offsets)):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _table(b: flatbuffers.Builder, n_fields: int, offsets: dict[int, int], bytes_: dict[int, int] | None = None,
           uints: dict[int, int] | None = None) -> int:
    """One table: ``offsets`` maps field slots to already-built objects, ``bytes_``/``uints`` to scalars."""
    b.StartObject(n_fields)
    for slot, off in offsets.items():
        if off:
            b.PrependUOffsetTRelativeSlot(slot, off, 0)
    for slot, v in (uints or {}).items():
        b.PrependUint32Slot(slot, v, 0)
    for slot, v in (bytes_ or {}).items():
        b.PrependInt8Slot(slot, v, 0)
    return b.EndObject()


def _stats(b: flatbuffers.Builder, lo_hi: tuple[float, float] | None) -> int:
    if lo_hi is None:
        return 0
    mx, mn = _floats(b, [lo_hi[1]]), _floats(b, [lo_hi[0]])
    return _table(b, 2, {0: mx, 1: mn})  # Stats: max, min


def _input_tensor(b: flatbuffers.Builder, info: ImageClassifierInfo) -> int:
    name = b.CreateString("image")
    desc = b.CreateString(f"RGB image, {info.width}x{info.height} pixels, values "
                          f"{info.input_range[0]:g}..{info.input_range[1]:g}.")
    size = _table(b, 2, {}, uints={0: int(info.width), 1: int(info.height)})  # ImageSize
    image = _table(b, 2, {1: size}, bytes_={0: _COLOR_SPACE["RGB"]})  # ImageProperties
    content = _table(b, 3, {1: image}, bytes_={0: _CONTENT_IMAGE})  # Content
    norm = _table(b, 2, {0: _floats(b, info.mean), 1: _floats(b, info.std)})  # NormalizationOptions
    unit = _table(b, 2, {1: norm}, bytes_={0: _PROCESS_NORMALIZATION})  # ProcessUnit
    units = _offsets(b, [unit])
    stats = _stats(b, info.input_range)
    # TensorMetadata: name 0, description 1, dimension_names 2, content 3, process_units 4, stats 5, files 6
    return _table(b, 7, {0: name, 1: desc, 3: content, 4: units, 5: stats})


def _output_tensor(b: flatbuffers.Builder, info: ImageClassifierInfo) -> int:
    name = b.CreateString("probability" if info.output_range else "logits")
    desc = b.CreateString(info.output_description)
    feature = _table(b, 0, {})  # FeatureProperties (no fields)
    content = _table(b, 3, {1: feature}, bytes_={0: _CONTENT_FEATURE})
    fname, fdesc = b.CreateString(LABELS_FILE), b.CreateString("Labels for the classes of the output tensor.")
    labels = _table(b, 5, {0: fname, 1: fdesc}, bytes_={2: _ASSOCIATED_TENSOR_AXIS_LABELS})  # AssociatedFile
    files = _offsets(b, [labels])
    stats = _stats(b, info.output_range)
    return _table(b, 7, {0: name, 1: desc, 3: content, 5: stats, 6: files})


def build_metadata(info: ImageClassifierInfo) -> bytes:
    """The ``ModelMetadata`` flatbuffer (file identifier ``M001``) of an image classifier."""
    if len(info.mean) != len(info.std) or not info.mean:
        raise ExportError("metadata normalization needs as many std values as mean values")
    if any(s <= 0 for s in info.std):
        raise ExportError("metadata normalization std must be positive")
    b = flatbuffers.Builder(1024)
    inp, out = _input_tensor(b, info), _output_tensor(b, info)
    sg_name = b.CreateString("image_classifier")
    # SubGraphMetadata: name 0, description 1, input_tensor_metadata 2, output_tensor_metadata 3, ...
    subgraph = _table(b, 10, {0: sg_name, 2: _offsets(b, [inp]), 3: _offsets(b, [out])})
    strings = {slot: b.CreateString(text) for slot, text in
               ((0, info.name), (1, info.description), (2, info.version), (4, info.author), (5, info.license),
                (7, MIN_PARSER_VERSION)) if text}
    subgraphs = _offsets(b, [subgraph])
    # ModelMetadata: name 0, description 1, version 2, subgraph_metadata 3, author 4, license 5,
    # associated_files 6, min_parser_version 7
    root = _table(b, 8, {**strings, 3: subgraphs})
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _labels_text(labels: Sequence[str]) -> bytes:
    for name in labels:
        if "\n" in name or "\r" in name:
            raise ExportError(f"label {name!r} contains a line break", "labels.txt holds one label per line")
    return ("\n".join(labels) + "\n").encode("utf-8")


def attach_metadata(model_bytes: bytes, info: ImageClassifierInfo) -> bytes:
    """The ``.tflite`` file with the metadata buffer and ``labels.txt`` packed in, as image clients read them.

    An earlier ``TFLITE_METADATA`` entry is replaced; the model's other metadata (litert-torch's conversion
    and minimum-runtime records) is kept. The labels file is appended as an uncompressed zip archive after
    the flatbuffer, which is how the TFLite metadata convention ships associated files.
    """
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    meta_bytes = build_metadata(info)
    labels = _labels_text(info.labels)
    try:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    except Exception as e:
        raise ExportError(f"cannot read the .tflite flatbuffer to add metadata: {type(e).__name__}: {e}") from e
    buf = fb.BufferT()
    buf.data = np.frombuffer(meta_bytes, np.uint8).copy()
    model.buffers.append(buf)
    entry = fb.MetadataT()
    entry.name, entry.buffer = METADATA_BUFFER_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_BUFFER_NAME] + [entry]
    data = bytearray(flatbuffer_utils.convert_object_to_bytearray(model))
    out = io.BytesIO(bytes(data))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo(LABELS_FILE, date_time=_ZIP_DATE), labels)
    return out.getvalue()


def metadata_buffer(model_bytes: bytes) -> bytes | None:
    """The raw ``TFLITE_METADATA`` flatbuffer of a model, or None if it has none."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    for m in model.metadata or []:
        if m.name == METADATA_BUFFER_NAME:
            return bytes(bytearray(model.buffers[m.buffer].data))
    return None


def associated_files(model_bytes: bytes) -> dict[str, bytes]:
    """The files packed into a model (``{"labels.txt": b"..."}``); empty when it has none."""
    try:
        with zipfile.ZipFile(io.BytesIO(model_bytes)) as z:
            return {n: z.read(n) for n in z.namelist()}
    except zipfile.BadZipFile:
        return {}
