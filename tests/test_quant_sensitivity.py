"""`edgekd quantize --sensitivity` and `--max-drop`: per-layer int8 sensitivity and mixed-precision files, made by
ai-edge-quantizer and ONNX Runtime from a tiny real run and run in LiteRT and ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from edgekd.cli import cli
from edgekd.quant.sensitivity import output_error


@pytest.fixture(scope="module")
def int8_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported to fp32 and int8 ONNX/TFLite files (student only).

    The 3-epoch width-2 student is barely above chance and its logits are nearly tied, so int8 agrees with it
    less than with a trained model: the tolerance is loosened as in test_quantize.py.
    """
    run = tmp_path_factory.mktemp("sens") / "run"
    shutil.copytree(tiny_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["export"] = {"tolerance": {"min_agreement": 0.5, "max_accuracy_drop": 0.5}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--no-teacher", "--no-app", "-q"])
    assert res.exit_code == 0, res.output
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="module")
def sensitivity_run(int8_run, tmp_path_factory) -> tuple[Path, str]:
    run = _copy(int8_run, tmp_path_factory.mktemp("sens") / "run")
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--sensitivity", "-q"])
    assert res.exit_code == 0, res.output
    return run, res.output


def test_output_error_measures_snr_and_cosine():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    assert output_error(ref, ref) == {"snr_db": 999.0, "cosine": 1.0}
    # noise energy 1/26 of the signal's -> 10*log10(26) dB; the second row turns by 45 degrees
    got = output_error(ref, np.array([[3.0, 4.0], [1.0, 1.0]]))
    assert got["snr_db"] == pytest.approx(10 * np.log10(26), abs=1e-3)
    assert got["cosine"] == pytest.approx((1 + np.sqrt(0.5)) / 2, abs=1e-6)


def test_sensitivity_ranks_every_layer_in_both_runtimes(sensitivity_run):
    run, output = sensitivity_run
    data = json.loads((run / "quant_sensitivity.json").read_text())
    assert data["settings"]["split"] == "validation" and data["settings"]["samples"] > 0
    files = data["files"]
    assert set(files) == {"student_fp32.onnx", "student_fp32.tflite"}
    assert files["student_fp32.tflite"]["runtime"] == "litert" and files["student_fp32.onnx"]["runtime"] == "onnxruntime"
    ops = {f: {layer["op"] for layer in rec["layers"]} for f, rec in files.items()}
    # The student's two convolutions and its classifier, named after their PyTorch modules.
    assert {"FULLY_CONNECTED"} <= ops["student_fp32.tflite"] and "CONV_2D" in ops["student_fp32.tflite"]
    assert "Gemm" in ops["student_fp32.onnx"] and "Conv+Relu" in ops["student_fp32.onnx"]
    names = [layer["name"] for layer in files["student_fp32.onnx"]["layers"]]
    assert "classifier (Gemm)" in names and "features.0 (Conv+Relu)" in names
    for name, rec in files.items():
        full, layers = rec["int8"], rec["layers"]
        assert [layer["rank"] for layer in layers] == list(range(1, len(layers) + 1))
        snr = [layer["all_but_int8"]["snr_db"] for layer in layers]
        assert snr == sorted(snr, reverse=True), name  # ranked by the SNR with the layer kept float
        for layer in layers:
            for side in ("only_int8", "all_but_int8"):
                m = layer[side]
                assert m["drop_points"] == pytest.approx(100 * (rec["fp32_accuracy"] - m["accuracy"]), abs=1e-3)
                assert -1 <= m["cosine"] <= 1
            assert layer["recovered_points"] == pytest.approx(
                full["drop_points"] - layer["all_but_int8"]["drop_points"], abs=1e-3)
        if name.endswith(".tflite"):  # ai-edge-quantizer's per-tensor view of the full int8 file
            assert all({"snr_db", "cosine"} <= set(layer["output_in_int8"]) for layer in layers)
        # One layer int8 perturbs the logits less than all of them; keeping the top layer float helps most.
        assert max(layer["only_int8"]["snr_db"] for layer in layers) > full["snr_db"], name
        assert layers[0]["all_but_int8"]["snr_db"] >= full["snr_db"], name
    assert "most sensitive layers:" in output and " 1. " in output
    manifest = json.loads((run / "manifest.json").read_text())
    assert "quant_sensitivity.json" in manifest["artifacts"]
    # Sensitivity alone writes no model file.
    assert not list(run.glob("*_mixed.*"))


def test_tflite_per_tensor_errors_match_the_logits(int8_run):
    """ai-edge-quantizer's per-tensor validator, fed the same samples, gives the classifier's output the SNR and
    cosine that running the int8 file in LiteRT gives its logits (two independent computations)."""
    from edgekd.export.common import quiet
    from edgekd.quant.selective import TFLiteSelective

    info = json.loads((int8_run / "data.json").read_text())
    with np.load(int8_run / "eval.npz") as ev:
        x = ev["x"][:48]
    norm = info["normalization"]
    calib = (x - np.float32(norm["mean"][0])) / np.float32(norm["std"][0])
    with TFLiteSelective(int8_run / "student_fp32.tflite", calib, "NCHW", norm, silence=quiet) as route:
        full = route.work / "full.tflite"
        route.write(full)
        errors = route.tensor_errors(full, x)
        want = output_error(route.logits(route.fp32_path, x), route.logits(full, x))
        last = route.layers()[-1]
    assert last.op == "FULLY_CONNECTED" and set(errors) == {layer.key for layer in route.layers()}
    assert errors[last.key]["snr_db"] == pytest.approx(want["snr_db"], abs=0.05)
    assert errors[last.key]["cosine"] == pytest.approx(want["cosine"], abs=1e-4)


def test_sensitivity_records_the_file_it_measured(sensitivity_run):
    run, _ = sensitivity_run
    data = json.loads((run / "quant_sensitivity.json").read_text())
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    for name, rec in data["files"].items():
        assert rec["sha256"] == meta[name]["sha256"]


def test_report_shows_the_ranked_layers(sensitivity_run, tmp_path):
    run = _copy(sensitivity_run[0], tmp_path / "run")
    res = CliRunner().invoke(cli, ["report", "--run", str(run)])
    assert res.exit_code == 0, res.output
    md = (run / "report.md").read_text()
    assert "## Int8 sensitivity of student_fp32.tflite (ai-edge-quantizer, LiteRT" in md
    assert "## Int8 sensitivity of student_fp32.onnx" in md
    # The section follows the short summary and the precision matrix; it is not part of the summary.
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "sensitiv" not in summary.lower()
    assert md.index("## Summary") < md.index("## Int8 sensitivity")
    assert (run / "report_plots" / "sensitivity.png").stat().st_size > 1000
    assert "id='plot-sensitivity'" in (run / "report.html").read_text()


def _tflite_op_types(path: Path) -> list[tuple[str, str]]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    return [(o["op_name"], dtypes[o["outputs"][0]]) for o in it._get_ops_details()]


def test_max_drop_keeps_the_most_sensitive_layers_float(sensitivity_run, tmp_path):
    run = _copy(sensitivity_run[0], tmp_path / "run")
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--max-drop", "0.1"])
    assert res.exit_code == 0, res.output
    assert "ranking from quant_sensitivity.json" in res.output  # measured once, by --sensitivity
    sens = json.loads((run / "quant_sensitivity.json").read_text())["files"]
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    metrics = json.loads((run / "metrics.json").read_text())
    for fmt in ("tflite", "onnx"):
        name, src = f"student_mixed.{fmt}", sens[f"student_fp32.{fmt}"]
        e, m = meta[name], metrics[name]
        assert e["precision"] == "mixed" and e["verified"] is True and m["verified"] is True
        assert e["backend"] == fmt and m["backend"] == fmt  # the `mixed` route of the tflite/onnx backend
        assert e["source"] == f"student_fp32.{fmt}" and m["test_accuracy"] is not None
        ranking = [layer["name"] for layer in src["layers"]]
        floats = e["float_layers"]
        assert floats == ranking[: len(floats)]  # greedy, in ranking order
        info = m["mixed"]
        assert info["max_drop_points"] == 0.1 and info["float_layers"] == floats
        if src["int8"]["drop_points"] > 0.1:  # full int8 misses the budget: some layer had to stay float
            assert floats
        # Every layer float is the fp32 computation, so the search always fits in the end.
        assert info["fits"] is True and info["validation"]["drop_points"] <= 0.1 + 1e-9
    ops = _tflite_op_types(run / "student_mixed.tflite")
    kinds = {dtype for op, dtype in ops if op not in ("QUANTIZE", "DEQUANTIZE")}
    if meta["student_mixed.tflite"]["float_layers"] and len(sens["student_fp32.tflite"]["layers"]) > len(
            meta["student_mixed.tflite"]["float_layers"]):
        assert kinds == {"int8", "float32"}  # both int8 and float kernels in one file
    assert meta["student_mixed.tflite"]["input"]["dtype"] == "float32"  # export.int8_io, as for int8 files
    table = res.output
    assert "student_mixed.tflite" in table and "student_mixed.onnx" in table


def test_export_with_max_drop_in_the_recipe_writes_mixed_files(int8_run, tmp_path):
    """export.max_drop makes `edgekd export` write the mixed files too; full int8 within a loose budget keeps
    every layer int8."""
    run = _copy(int8_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--no-teacher", "--no-app",
                                   "--set", "export.max_drop=100"])
    assert res.exit_code == 0, res.output
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    for fmt in ("tflite", "onnx"):
        assert meta[f"student_mixed.{fmt}"]["float_layers"] == []
    ops = _tflite_op_types(run / "student_mixed.tflite")
    assert {d for op, d in ops if op not in ("QUANTIZE", "DEQUANTIZE")} == {"int8"}


@pytest.mark.parametrize("value", ["-1", "100.5", "nan"])
def test_max_drop_out_of_range_is_refused(int8_run, tmp_path, value):
    run = _copy(int8_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), f"--max-drop={value}"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: --max-drop must be between 0 and 100")
    assert len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_max_drop_in_the_recipe_is_checked(int8_run):
    res = CliRunner().invoke(cli, ["quantize", "--run", str(int8_run), "--set", "export.max_drop=-2"])
    assert res.exit_code == 2 and "max_drop" in res.output and len(res.output.strip().splitlines()) == 1


def test_sensitivity_needs_an_exported_fp32_file(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--max-drop", "1"])
    assert res.exit_code == 2 and "run `edgekd export` first" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_format_without_a_mixed_route_is_refused(tiny_run, tmp_path):
    import npzmodel_format  # noqa: F401  (registers the toy format)

    run = _copy(tiny_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--format", "npzmodel", "--quantize", "none",
                                   "--no-teacher", "--no-app", "-q"])
    assert res.exit_code == 0, res.output
    before = sorted(p.name for p in run.iterdir())
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--max-drop", "1", "--file", "student_fp32.npzmodel"])
    assert res.exit_code == 2, res.output
    assert "npzmodel has no mixed-precision route" in res.output and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--sensitivity"])
    assert res.exit_code == 2 and "no fp32 file of a format with a mixed-precision route" in res.output


def test_sensitivity_is_not_for_qat(int8_run):
    res = CliRunner().invoke(cli, ["quantize", "--run", str(int8_run), "--qat", "--sensitivity"])
    assert res.exit_code == 2 and "not with --qat" in res.output


def test_mcu_with_a_budget_is_refused(int8_run, tmp_path):
    """TFLM runs full-int8 files only: asking for the MCU file with export.max_drop, or for a mixed MCU file,
    stops with one line before anything is written."""
    run = _copy(int8_run, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--format", "mcu", "--no-teacher",
                                   "--set", "export.max_drop=1"])
    assert res.exit_code == 2, res.output
    assert "MCU file must be full int8" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--max-drop", "1", "--file", "student_mcu.tflite"])
    assert res.exit_code == 2, res.output
    assert "MCU file must be full int8" in res.output and len(res.output.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_export_budget_needs_a_format_with_a_mixed_route(tiny_run, tmp_path):
    import npzmodel_format  # noqa: F401  (registers the toy format)

    run = _copy(tiny_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    res = CliRunner().invoke(cli, ["export", "--run", str(run), "--format", "npzmodel", "--quantize", "none",
                                   "--no-teacher", "--set", "export.max_drop=1"])
    assert res.exit_code == 2, res.output
    assert "npzmodel has no mixed-precision route" in res.output and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def _tflite_weight_scales(path: Path) -> dict[str, int]:
    """Per int8 weight tensor of a .tflite file (input 1 of a conv or fully connected op): its number of scales."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    out = {}
    for op in it._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op["inputs"]) > 1:
            w = tensors[op["inputs"][1]]
            if w["dtype"] == np.int8:
                out[w["name"]] = len(w["quantization_parameters"]["scales"])
    return out


def _onnx_weight_scale_ranks(path: Path) -> list[int]:
    """Rank of the scale of every DequantizeLinear that dequantizes an initializer (the weights)."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    ranks = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == onnx.TensorProto.INT8:
            ranks.append(len(inits[node.input[1]].dims))
    return ranks


def test_per_tensor_weights_give_one_scale_per_weight_tensor(int8_run, tmp_path):
    """export.<tflite|onnx>.int8_weights: per_tensor writes int8 and mixed files whose weights have one scale each
    (the default files have one per output channel), records it in metadata, and the budget search runs on it."""
    per_channel_tfl = _tflite_weight_scales(int8_run / "student_int8.tflite")
    assert per_channel_tfl and max(per_channel_tfl.values()) > 1
    assert max(_onnx_weight_scale_ranks(int8_run / "student_int8.onnx")) == 1
    run = _copy(int8_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--precision", "int8", "--max-drop", "100", "-q",
                                   "--set", "export.tflite.int8_weights=per_tensor",
                                   "--set", "export.onnx.int8_weights=per_tensor"])
    assert res.exit_code == 0, res.output
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    for name in ("student_int8.tflite", "student_mixed.tflite", "student_int8.onnx", "student_mixed.onnx"):
        assert meta[name]["int8_weights"] == "per_tensor", name
    for name in ("student_int8.tflite", "student_mixed.tflite"):
        scales = _tflite_weight_scales(run / name)
        assert scales and set(scales.values()) == {1}, (name, scales)
    for name in ("student_int8.onnx", "student_mixed.onnx"):
        ranks = _onnx_weight_scale_ranks(run / name)
        assert ranks and set(ranks) == {0}, (name, ranks)
    sens = json.loads((run / "quant_sensitivity.json").read_text())["files"]
    assert sens["student_fp32.onnx"]["backend_settings"]["int8_weights"] == "per_tensor"


def test_an_unknown_weight_scheme_is_refused(int8_run, tmp_path):
    run = _copy(int8_run, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    res = CliRunner().invoke(cli, ["quantize", "--run", str(run), "--set", "export.onnx.int8_weights=per_layer"])
    assert res.exit_code == 2, res.output
    assert "int8_weights" in res.output and "per_tensor" in res.output and len(res.output.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
