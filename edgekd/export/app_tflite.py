"""App-profile ``.tflite`` files: written, quantized, given metadata, and checked in MediaPipe.

The files come from the same converters as the research files (litert-torch, PT2E, ai-edge-quantizer),
fed with :class:`~edgekd.export.app_profile.AppModel` and pixel inputs instead of normalized tensors. Then:

* full-integer files get uint8 or float32 I/O (never int8: no image client feeds it), and a uint8 input
  is given scale 1 / zero point 0 so the bytes of a camera bitmap are the pixel values the graph expects
  (the QUANTIZE op behind it requantizes to the calibrated int8 scale);
* TFLite Model Metadata (:mod:`edgekd.export.tflite_metadata`) with the labels is packed in;
* :func:`mediapipe_top1` classifies the eval set in MediaPipe Tasks' ``ImageClassifier``, the client
  apps use, so export can require MediaPipe and LiteRT to agree on the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgekd.errors import CheckFailed, ExportError
from edgekd.export.app_profile import AppSpec
from edgekd.export.tflite_metadata import ImageClassifierInfo, attach_metadata
from edgekd.run_dir import atomic_path


def pixel_uint8_input(model_bytes: bytes) -> bytes:
    """Give a uint8-input model the input quantization of raw pixels: scale 1, zero point 0.

    The uint8 input must feed a QUANTIZE op only (what :func:`edgekd.export.tflite.retype_io` inserts);
    TFLite's QUANTIZE kernel requantizes uint8 → int8 between any two scales, so the arithmetic after it
    is unchanged.
    """
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    sg = model.subgraphs[0]
    idx = sg.inputs[0]
    tensor = sg.tensors[idx]
    if tensor.type != fb.TensorType.UINT8:
        return model_bytes
    consumers = [op for op in sg.operators if idx in list(op.inputs)]
    codes = [max(model.operatorCodes[op.opcodeIndex].builtinCode,
                 model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) for op in consumers]
    if not consumers or any(c != fb.BuiltinOperator.QUANTIZE for c in codes):
        raise ExportError("the uint8 input of the app-profile file does not feed a QUANTIZE op only; "
                          "cannot give it pixel quantization", "use float32 I/O (export.int8_io: float32)")
    qp = fb.QuantizationParametersT()
    qp.scale, qp.zeroPoint, qp.quantizedDimension = [1.0], [0], 0
    tensor.quantization = qp
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def classifier_info(spec: AppSpec, labels: Sequence[str], model_name: str, precision: str, run: str,
                    version: str) -> ImageClassifierInfo:
    """The metadata of an app-profile file: pixels in, no client normalization, labels out."""
    probs = spec.output == "probabilities"
    gray = " (folded to gray inside the model)" if spec.channels == 1 else ""
    return ImageClassifierInfo(
        name=f"{model_name} ({precision})",
        description=(f"Image classifier distilled by edgekd (run {run}). Input: RGB{gray} "
                     f"{spec.width}x{spec.height} pixels in 0..255; normalization is inside the model. "
                     f"Output: {'probabilities' if probs else 'logits'} of {len(labels)} classes."),
        version=f"edgekd {version}, run {run}",
        width=spec.width, height=spec.height, mean=[0.0], std=[1.0], labels=list(labels),
        output_range=(0.0, 1.0) if probs else None,
        output_description=("Probabilities of the classes named in labels.txt (softmax)." if probs else
                            "Logits (unnormalized scores) of the classes named in labels.txt."),
    )


def finish_app_file(path: Path, info: ImageClassifierInfo) -> None:
    """Give a written app-profile file pixel uint8 input (if uint8) and its metadata, in place, atomically."""
    data = pixel_uint8_input(Path(path).read_bytes())
    data = attach_metadata(data, info)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def litert_top1(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Top-1 class per image from LiteRT, fed the same uint8 RGB pixels MediaPipe gets (as its dtype)."""
    from edgekd.export.common import quiet
    from edgekd.runtimes.litert import interpreter_class

    cls, _ = interpreter_class()
    with quiet():
        it = cls(model_path=str(path))
        it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    preds = np.empty(len(pixels), np.int64)
    for i in range(len(pixels)):
        it.set_tensor(inp["index"], pixels[i:i + 1].astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])[0].astype(np.float64)
        scale, zp = out.get("quantization", (0.0, 0))
        preds[i] = int(np.argmax((y - zp) * scale if scale else y))
    return preds


def mediapipe_available() -> bool:
    """Whether MediaPipe Tasks imports (it is an optional dependency: ``pip install edgekd[app]``)."""
    try:
        from edgekd.export.common import quiet

        with quiet():
            from mediapipe.tasks.python import vision  # noqa: F401
        return True
    except Exception:  # ImportError, or a broken install raising anything on import
        return False


def mediapipe_top1(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Classify uint8 RGB images (N, H, W, 3) with MediaPipe Tasks' ImageClassifier; top-1 index per image.

    Raises:
        ExportError: MediaPipe refuses the file or fails on an image; the message is MediaPipe's first line.
    """
    from edgekd.export.common import quiet

    with quiet():
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=1)
    preds = np.empty(len(pixels), np.int64)
    try:
        with quiet(), vision.ImageClassifier.create_from_options(options) as clf:
            for i in range(len(pixels)):
                image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels[i]))
                cats = clf.classify(image).classifications[0].categories
                preds[i] = cats[0].index if cats else -1
    except Exception as e:  # MediaPipe raises RuntimeError/ValueError with the C++ status text
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{Path(path).name} does not run in MediaPipe's ImageClassifier: {first}") from e
    return preds


def check_in_mediapipe(path: Path, pixels: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    """MediaPipe and LiteRT accuracy of one app-profile file on the same uint8 RGB images.

    Returns:
        ``{"mediapipe_accuracy", "litert_accuracy", "mediapipe_agreement", "samples"}``.

    Raises:
        ExportError: MediaPipe cannot load or run the file (exit code 2).
        CheckFailed: MediaPipe's accuracy differs from LiteRT's (exit code 1).
    """
    mp_pred = mediapipe_top1(path, pixels)
    lite_pred = litert_top1(path, pixels)
    numbers = {"mediapipe_accuracy": float((mp_pred == y).mean()), "litert_accuracy": float((lite_pred == y).mean()),
               "mediapipe_agreement": float((mp_pred == lite_pred).mean()), "samples": int(len(y))}
    if numbers["mediapipe_accuracy"] != numbers["litert_accuracy"]:
        raise CheckFailed(f"{Path(path).name}: MediaPipe's ImageClassifier scores {numbers['mediapipe_accuracy']:.4f} "
                          f"but LiteRT {numbers['litert_accuracy']:.4f} on the same images "
                          f"(agreement {100 * numbers['mediapipe_agreement']:.2f}%)",
                          "report it with the file; the metadata or the input layout does not match the model")
    return numbers


def plain_copy(path: Path) -> Path:
    """A temporary copy of a .tflite file without metadata or packed files (input for the quantizers)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    model.metadata = [m for m in (model.metadata or []) if m.name != b"TFLITE_METADATA"]
    fd, tmp = tempfile.mkstemp(suffix=".tflite", dir=Path(path).parent, prefix=".plain-")
    with os.fdopen(fd, "wb") as f:
        f.write(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return Path(tmp)
