"""ONNX files for apps: metadata_props an app can read, no unused opset imports, .ort files for ONNX Runtime Mobile."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from edgekd.export.onnx import export_onnx, quantize_onnx
from edgekd.export.onnx_app import (ORT_CONFIG, convert_to_ort, custom_metadata, finish_onnx_file, metadata_props,
                                    run_onnx_session, used_domains)
from edgekd.models import build_model

LABELS = ["cat", "dog", "bird", "fish", "frog"]
NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_app")
    torch.manual_seed(0)
    model = build_model("cnn", (3, 8, 8), len(LABELS), {"width": 4, "depth": 2}).eval()
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    fp32 = d / "student_fp32.onnx"
    export_onnx(model, torch.from_numpy(x[:1]), fp32)
    files = {"fp32": fp32}
    for prec in ("int8", "dynamic"):
        files[prec] = d / f"student_{prec}.onnx"
        quantize_onnx(fp32, files[prec], prec, x[:32])
    return d, files, x


def test_metadata_props_and_opset_imports(onnx_files):
    d, files, x = onnx_files
    props = metadata_props(labels=LABELS, input_name="input", layout="NCHW", normalization=NORM, output="logits",
                           version="0.1.0", run="demo", image=True)
    before = {k: run_onnx_session(p, x) for k, p in files.items()}
    assert len(onnx.load(str(files["int8"])).opset_import) > 1  # the quantizer's unused domains
    for path in files.values():
        finish_onnx_file(path, props)
        model = onnx.load(str(path))
        assert {o.domain or "" for o in model.opset_import} == used_domains(model) | {""}
        meta = custom_metadata(path)
        assert json.loads(meta["labels"]) == LABELS
        assert meta["input_layout"] == "NCHW" and meta["output"] == "logits" and meta["edgekd_version"] == "0.1.0"
        np.testing.assert_allclose(json.loads(meta["mean_pixels"]), [123.675, 116.28, 103.53], rtol=1e-6)
        np.testing.assert_allclose(json.loads(meta["std_pixels"]), [58.395, 57.12, 57.375], rtol=1e-6)
    for k, p in files.items():  # tidying changes nothing the runtime computes
        np.testing.assert_array_equal(run_onnx_session(p, x), before[k])


def test_ort_files_run_like_onnx(onnx_files):
    d, files, x = onnx_files
    outs, config = convert_to_ort(list(files.values()), d)
    assert [p.name for p in outs] == [p.stem + ".ort" for p in files.values()]
    assert config == d / ORT_CONFIG
    text = config.read_text()
    assert "ai.onnx" in text and "Conv" in text
    for (k, onnx_path), ort_path in zip(files.items(), outs):
        a, b = run_onnx_session(onnx_path, x), run_onnx_session(ort_path, x)
        np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
        np.testing.assert_allclose(a, b, atol=1e-4 if k == "fp32" else 0.05)
    assert not list(d.glob(".ort-*"))  # the work folder is gone
