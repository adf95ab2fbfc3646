"""`edgekd quantize` and the quantization routes: real files in onnxruntime and LiteRT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from edgekd.cli import cli
from edgekd.errors import ExportError
from edgekd.export.tflite import export_tflite, quantize_aeq, quantize_pt2e, retype_io
from edgekd.models import build_model


def _with_tolerance(run: Path, **tolerance) -> None:
    """Set export.tolerance in the run's recipe.yaml (the tiny run's 3-epoch width-2 student is barely above
    chance, its logits nearly tied, so its int8 agreement is lower than a trained model's)."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["export"] = {"tolerance": tolerance}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))


@pytest.fixture(scope="module")
def fp32_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run with fp32 student files only (what `edgekd quantize` starts from)."""
    run = tmp_path_factory.mktemp("quantize") / "run"
    shutil.copytree(tiny_run, run)
    _with_tolerance(run, min_agreement=0.9, max_accuracy_drop=0.05)
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--quantize", "none", "--no-teacher", "--no-app", "-q"])
    assert res.exit_code == 0, res.output
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_quantize_exported_files(fp32_run, tmp_path):
    run = _copy(fp32_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--precision", "fp16,int8",
                                   "--calibration-method", "entropy"])
    assert res.exit_code == 0, res.output
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    assert set(meta) == {"student_fp32.onnx", "student_fp32.tflite", "student_fp16.onnx", "student_fp16.tflite",
                         "student_int8.onnx", "student_int8.tflite"}
    metrics = json.loads((run / "metrics.json").read_text())
    for name, e in meta.items():
        assert e["verified"] is True and metrics[name]["verified"] is True
        print(name, e["route"], e["size_bytes"], metrics[name].get("agreement"))
    assert meta["student_int8.onnx"]["route"] == "onnxruntime-qdq"
    assert meta["student_fp16.tflite"]["route"] == "ai-edge-quantizer-fp16"
    assert meta["student_int8.tflite"]["route"] in ("litert-torch-pt2e", "ai-edge-quantizer")
    # float32 I/O is the default for full-integer TFLite files (export.int8_io).
    assert meta["student_int8.tflite"]["input"]["dtype"] == "float32"
    assert metrics["student_int8.onnx"]["agreement"] >= 0.9
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["status"] == "done"
    assert "student_int8.tflite" in manifest["artifacts"]


def test_quantize_one_file_to_dynamic(fp32_run, tmp_path):
    run = _copy(fp32_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--precision", "dynamic",
                                   "--file", "student_fp32.onnx", "-q"])
    assert res.exit_code == 0, res.output
    names = {e["file"] for e in json.loads((run / "metadata.json").read_text())["models"]}
    assert names == {"student_fp32.onnx", "student_fp32.tflite", "student_dynamic.onnx"}


def test_truncated_fp32_file_is_refused(fp32_run, tmp_path):
    run = _copy(fp32_run, tmp_path / "run")
    data = (run / "student_fp32.tflite").read_bytes()
    (run / "student_fp32.tflite").write_bytes(data[: len(data) // 3])
    before = sorted(p.name for p in run.iterdir())
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--precision", "int8"])
    assert res.exit_code == 1  # a failed verification (the file's sha256), not bad input
    assert res.output.startswith("error: student_fp32.tflite changed since it was exported")
    assert len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_truncated_tflite_is_a_clear_error(fp32_run, tmp_path):
    """Below the CLI's sha256 check, the quantizer itself refuses a damaged file with one line."""
    data = (fp32_run / "student_fp32.tflite").read_bytes()
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(data[:3])
    with pytest.raises(ExportError, match="not a valid .tflite file"):
        quantize_aeq(bad, tmp_path / "out.tflite", "dynamic", None)
    assert not (tmp_path / "out.tflite").exists()


@pytest.mark.parametrize("args,message", [
    (["--precision", "int3"], "unknown precision 'int3'"),
    (["--precision", "int8", "--file", "teacher_fp32.onnx"], "not an exported fp32 file"),
])
def test_bad_quantize_arguments(fp32_run, args, message):
    res = CliRunner().invoke(cli, ["quantize", "--run", str(fp32_run), *args])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_quantize_before_export(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run)])
    assert res.exit_code == 2 and "run `edgekd export` first" in res.output


# -- the routes and the I/O rewriting, below the CLI ----------------------------------------------------

@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """A small CNN (non-trivial BatchNorm statistics), its fp32 .tflite file and calibration/test inputs."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, {"width": 4, "depth": 2})
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 8, 8))
    model.eval()
    x = torch.randn(96, 1, 8, 8)
    path = tmp_path_factory.mktemp("routes") / "cnn_fp32.tflite"
    export_tflite(model, x[:1], path)
    with torch.no_grad():
        ref = model(x[64:]).numpy()
    return model, path, x[:64].numpy(), x[64:].numpy(), ref


def _run_tflite(path_or_bytes, x: np.ndarray) -> np.ndarray:
    """Float logits of a .tflite file, quantizing/dequantizing with the interpreter's own parameters."""
    from ai_edge_litert.interpreter import Interpreter

    kwargs = {"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes) else {"model_path": str(path_or_bytes)}
    it = Interpreter(**kwargs)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for k in range(len(x)):
        xi = x[k:k + 1]
        if i["dtype"] != np.float32:
            scale, zp = i["quantization"]
            info = np.iinfo(i["dtype"])
            xi = np.clip(np.round(xi / scale + zp), info.min, info.max).astype(i["dtype"])
        it.set_tensor(i["index"], xi)
        it.invoke()
        y = it.get_tensor(o["index"])
        if o["dtype"] != np.float32:
            scale, zp = o["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        outs.append(y)
    return np.concatenate(outs)


@pytest.mark.parametrize("route", ["ai-edge-quantizer", "litert-torch-pt2e"])
def test_both_int8_routes_agree_with_pytorch(small_cnn, tmp_path, route):
    model, fp32, calib, test_x, ref = small_cnn
    out = tmp_path / "int8.tflite"
    if route == "ai-edge-quantizer":
        quantize_aeq(fp32, out, "int8", calib, io_type="int8")
    else:
        quantize_pt2e(model, torch.from_numpy(calib[:1]), out, "int8", calib, io_type="int8")
    logits = _run_tflite(out, test_x)
    agreement = float((logits.argmax(1) == ref.argmax(1)).mean())
    print(route, "agreement", agreement, "size", out.stat().st_size, "fp32 size", fp32.stat().st_size)
    assert agreement >= 0.9
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(out))
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8


def test_retype_io_keeps_the_int8_arithmetic(small_cnn, tmp_path):
    """float32 and uint8 I/O wrap the same int8 graph: identical outputs to the int8-I/O file."""
    from ai_edge_litert.interpreter import Interpreter

    _, fp32, calib, test_x, _ = small_cnn
    out = tmp_path / "int8.tflite"
    quantize_aeq(fp32, out, "int8", calib, io_type="int8")
    data = out.read_bytes()
    base = _run_tflite(data, test_x)
    for io_type, dtype in (("float32", np.float32), ("uint8", np.uint8)):
        new = retype_io(data, io_type)
        it = Interpreter(model_content=new)
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        assert i["dtype"] == dtype and o["dtype"] == dtype
        assert i["name"] == Interpreter(model_content=data).get_input_details()[0]["name"]
        if io_type == "uint8":
            int8_in = Interpreter(model_content=data).get_input_details()[0]["quantization"]
            assert i["quantization"] == (pytest.approx(int8_in[0]), int8_in[1] + 128)
        np.testing.assert_array_equal(_run_tflite(new, test_x), base)
    with pytest.raises(ExportError, match="int8 inputs"):
        retype_io(fp32.read_bytes(), "uint8")


def test_tflite_fp16_and_dynamic_shrink_the_file(tmp_path):
    # Wide enough that weights, not the flatbuffer's fixed overhead, make up the file.
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, {"width": 24, "depth": 2}).eval()
    x = torch.randn(64, 1, 8, 8)
    fp32 = tmp_path / "fp32.tflite"
    export_tflite(model, x[:1], fp32)
    with torch.no_grad():
        ref = model(x).numpy()
    for precision, ratio in (("fp16", 0.65), ("dynamic", 0.4)):
        out = tmp_path / f"{precision}.tflite"
        quantize_aeq(fp32, out, precision, None)
        logits = _run_tflite(out, x.numpy())
        print(precision, out.stat().st_size, fp32.stat().st_size)
        assert float((logits.argmax(1) == ref.argmax(1)).mean()) >= 0.95
        assert out.stat().st_size < fp32.stat().st_size * ratio
