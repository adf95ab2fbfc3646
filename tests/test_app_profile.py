"""The app profile: pixel-input .tflite files with TFLite Model Metadata, run in MediaPipe's ImageClassifier.

Real files from real converters, read back by the published metadata schema reader (MediaPipe ships the
generated one) and classified by MediaPipe Tasks, the client Android/iOS/Python apps use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.errors import ExportError
from edgekd.export.app_profile import (AppModel, app_spec, check_app_io, pixel_calibration, read_labels_file,
                                       to_pixels)
from edgekd.export.app_tflite import (check_in_mediapipe, classifier_info, finish_app_file, litert_top1,
                                      mediapipe_available, plain_copy)
from edgekd.export.tflite import export_tflite, quantize_aeq, quantize_pt2e
from edgekd.export.tflite_metadata import associated_files, metadata_buffer
from edgekd.models import build_model

needs_mediapipe = pytest.mark.skipif(not mediapipe_available(), reason="mediapipe not installed (test extra)")
LABELS = [f"class_{i}" for i in range(5)]


def _model(channels: int) -> torch.nn.Module:
    """A zoo CNN whose answers vary from image to image (checked), so agreement between clients means something."""
    torch.manual_seed(channels)
    model = build_model("cnn", (channels, 8, 8), len(LABELS), {"width": 4, "depth": 2})
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.randn(32, channels, 8, 8))
        for m in model.modules():  # spread the logits: random images must not all land in one class
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(20.0)
                m.bias.zero_()
    return model.eval()


def _images(channels: int, n: int = 64) -> np.ndarray:
    """Raw NCHW images in 0..1 that are exact pixel values (k / 255), as decoded uint8 bitmaps are."""
    rng = np.random.default_rng(channels)
    return (rng.integers(0, 256, size=(n, channels, 8, 8)) / 255.0).astype(np.float32)


NORM3 = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
NORM1 = {"mean": [0.3], "std": [0.4]}


@pytest.mark.parametrize("channels,norm", [(3, NORM3), (1, NORM1)], ids=["rgb", "gray"])
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_wrapper_equals_normalized_model(channels, norm, output):
    model = _model(channels)
    spec = app_spec("NCHW", (channels, 8, 8), norm, output)
    x = _images(channels)
    shape = (1, -1, 1, 1)
    xn = (x - np.asarray(norm["mean"], np.float32).reshape(shape)) / np.asarray(norm["std"], np.float32).reshape(shape)
    with torch.no_grad():
        want = model(torch.from_numpy(xn))
        if output == "probabilities":
            want = torch.softmax(want, -1)
        got = AppModel(model, spec).eval()(torch.from_numpy(to_pixels(x).astype(np.float32)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5, rtol=1e-4)
    if output == "probabilities":
        np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-5)


def test_gray_fold_uses_luma_of_rgb_pixels():
    model = _model(1)
    spec = app_spec("NCHW", (1, 8, 8), NORM1, "logits")
    px = np.zeros((1, 8, 8, 3), np.float32)
    px[..., 0], px[..., 1], px[..., 2] = 200.0, 100.0, 50.0
    gray = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0
    xn = torch.full((1, 1, 8, 8), (gray - 0.3) / 0.4)
    with torch.no_grad():
        np.testing.assert_allclose(AppModel(model, spec)(torch.from_numpy(px)).numpy(), model(xn).numpy(), atol=1e-5)


def test_to_pixels_and_calibration():
    x = _images(1, 4)
    px = to_pixels(x)
    assert px.dtype == np.uint8 and px.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(px[..., 0], np.round(x[:, 0] / np.float32(1 / 255)))
    np.testing.assert_array_equal(px[..., 0], px[..., 2])
    xn = (x - 0.3) / 0.4
    np.testing.assert_array_equal(pixel_calibration(xn, (0.3,), (0.4,)), px.astype(np.float32))


def test_bad_app_inputs(tmp_path):
    assert app_spec("NF", (64,), {"mean": [0.0], "std": [1.0]}) is None
    with pytest.raises(ExportError, match="needs an image run"):
        app_spec("NF", (64,), {"mean": [0.0], "std": [1.0]}, asked=True)
    with pytest.raises(ExportError, match="unknown app output"):
        app_spec("NCHW", (3, 8, 8), NORM3, "scores")
    with pytest.raises(ExportError, match="int8 inputs/outputs cannot be used in the app profile"):
        check_app_io("int8")
    assert check_app_io("uint8") == "uint8"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\n")
    assert read_labels_file(labels, 2) == ["cat", "dog"]
    with pytest.raises(ExportError, match="has 2 labels but the model has 5 classes"):
        read_labels_file(labels, 5)


def _read_metadata(data: bytes):
    from mediapipe.tasks.metadata import metadata_schema_py_generated as schema

    buf = metadata_buffer(data)
    assert buf is not None and buf[4:8] == b"M001"
    return schema.ModelMetadataT.InitFromObj(schema.ModelMetadata.GetRootAsModelMetadata(buf, 0))


def _app_files(tmp_path, channels: int, norm: dict, x: np.ndarray):
    """fp32, fp16, dynamic and int8 (uint8 I/O, both routes) app-profile files of a tiny model."""
    spec = app_spec("NCHW", (channels, 8, 8), norm)
    app = AppModel(_model(channels), spec).eval()
    calib = to_pixels(x).astype(np.float32)
    sample = torch.from_numpy(calib[:1])
    info = classifier_info(spec, LABELS, "student", "test", "run", "0.1.0")
    fp32 = tmp_path / "student_app_fp32.tflite"
    export_tflite(app, sample, fp32)
    plain = plain_copy(fp32)
    files = {"fp32": fp32}
    for name, write in {
        "int8_pt2e": lambda p: quantize_pt2e(app, sample, p, "int8", calib, io_type="uint8"),
        "int8_aeq": lambda p: quantize_aeq(plain, p, "int8", calib, "uint8"),
        "fp16": lambda p: quantize_aeq(plain, p, "fp16", None),
        "dynamic": lambda p: quantize_aeq(plain, p, "dynamic", None),
    }.items():
        write(tmp_path / f"student_app_{name}.tflite")
        files[name] = tmp_path / f"student_app_{name}.tflite"
    for path in files.values():
        finish_app_file(path, info)
    plain.unlink()
    return spec, files


@needs_mediapipe
@pytest.mark.parametrize("channels,norm", [(3, NORM3), (1, NORM1)], ids=["rgb", "gray"])
def test_app_files_run_in_mediapipe_like_litert(tmp_path, channels, norm):
    x = _images(channels, 96)
    spec, files = _app_files(tmp_path, channels, norm, x)
    pixels = to_pixels(x)
    y = litert_top1(files["fp32"], pixels)  # labels = the fp32 file's answers: accuracies are then meaningful
    assert len(np.unique(y)) >= 2  # the answers vary, so equal accuracies are not a constant prediction
    from ai_edge_litert.interpreter import Interpreter

    for name, path in files.items():
        data = path.read_bytes()
        assert associated_files(data) == {"labels.txt": ("\n".join(LABELS) + "\n").encode()}
        md = _read_metadata(data)
        assert md.minParserVersion == b"1.0.0"
        sg = md.subgraphMetadata[0]
        inp, out = sg.inputTensorMetadata[0], sg.outputTensorMetadata[0]
        assert inp.content.contentProperties.colorSpace == 1  # RGB
        assert (inp.content.contentProperties.defaultSize.width, inp.content.contentProperties.defaultSize.height) == (8, 8)
        norm_md = inp.processUnits[0].options
        assert list(norm_md.mean) == [0.0] and list(norm_md.std) == [1.0]
        assert out.associatedFiles[0].name == b"labels.txt" and out.associatedFiles[0].type == 2
        it = Interpreter(model_path=str(path))
        d = it.get_input_details()[0]
        assert list(d["shape"]) == [1, 8, 8, 3]
        if name.startswith("int8"):
            assert d["dtype"] == np.uint8 and d["quantization"] == (1.0, 0)
            assert all(o["dtype"] != np.int8 for o in it.get_output_details())
        else:
            assert d["dtype"] == np.float32
        numbers = check_in_mediapipe(path, pixels, y)
        assert numbers["mediapipe_accuracy"] == numbers["litert_accuracy"], name
        assert numbers["mediapipe_agreement"] == 1.0, name
        if name in ("fp32", "fp16"):
            assert numbers["litert_accuracy"] >= 0.95, name


@needs_mediapipe
def test_mediapipe_refusal_names_the_file(tmp_path):
    # A research file (1-channel, normalized input, no metadata) is what MediaPipe refuses today.
    path = tmp_path / "student_fp32.tflite"
    export_tflite(_model(1), torch.zeros(1, 1, 8, 8), path, nhwc=True)
    with pytest.raises(ExportError, match=r"student_fp32.tflite does not run in MediaPipe's ImageClassifier: "):
        check_in_mediapipe(path, to_pixels(_images(1, 4)), np.zeros(4, np.int64))


@needs_mediapipe
def test_metadata_that_misleads_mediapipe_fails_the_check(tmp_path):
    from edgekd.errors import CheckFailed
    from edgekd.export.tflite_metadata import attach_metadata

    x = _images(3, 96)
    spec = app_spec("NCHW", (3, 8, 8), NORM3)
    path = tmp_path / "student_app_fp32.tflite"
    export_tflite(AppModel(_model(3), spec).eval(), torch.from_numpy(to_pixels(x[:1]).astype(np.float32)), path)
    info = classifier_info(spec, LABELS, "student", "fp32", "run", "0.1.0")
    info.mean, info.std = [127.5], [127.5]  # tells the client to feed -1..1 where the graph expects 0..255
    path.write_bytes(attach_metadata(path.read_bytes(), info))
    pixels = to_pixels(x)
    with pytest.raises(CheckFailed, match=r"student_app_fp32.tflite: MediaPipe's ImageClassifier scores .* but LiteRT"):
        check_in_mediapipe(path, pixels, litert_top1(path, pixels))
