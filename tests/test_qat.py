"""Quantization-aware distillation: PT2E fake quantization, KD fine-tuning, and the int8 files it exports.

Real training on the tiny digits run, real conversions, real ONNX Runtime and LiteRT; nothing is mocked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import write_recipe

pytestmark = pytest.mark.filterwarnings("ignore")


def _run_models(run):
    from edgekd.models import load_model

    return load_model(run / "student.pt").eval(), load_model(run / "teacher.pt").eval()


def _data(tmp_path):
    from edgekd.data import load_data
    from edgekd.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    return load_data(recipe.data, recipe.seed)


def _test_inputs(data):
    return torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()


def _qat_student(student, data, epochs, state_path, *, resume=False, on_epoch=None):
    from edgekd import losses
    from edgekd.quant import calibrate, finetune_qat, prepare_qat
    from edgekd.recipe import TrainConfig

    x = torch.stack([data.train[i][0] for i in range(64)])
    qat = prepare_qat(student, x)
    calibrate(qat, [x[i:i + 16] for i in range(0, 64, 16)])
    cfg = TrainConfig(epochs=epochs, lr=0.002, optimizer="adamw", scheduler="cosine")
    teacher = _qat_student.teacher
    result = finetune_qat(qat, data, cfg, losses.build("kd", temperature=4.0, alpha=1.0), seed=3,
                          state_path=state_path, teacher=teacher, resume=resume, on_epoch=on_epoch)
    return qat, result


def test_qat_int8_files_agree_with_the_fake_quantized_model(tiny_run, tmp_path):
    import onnx
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    # The QAT routes are the onnx and tflite backends' own (the qat module names no format).
    from edgekd.export.onnx import ROUTE_QAT as ROUTE_QAT_ONNX
    from edgekd.export.onnx import write_qat_onnx
    from edgekd.export.tflite import ROUTE_QAT as ROUTE_QAT_TFLITE
    from edgekd.export.tflite import write_qat_tflite
    from edgekd.quant import convert_qat
    from edgekd.quant.qat import top1

    # The model quantized here is the tiny run's trained teacher (width 8): a near-chance model (the width-2
    # student, ~0.36) has near-tied logits, where int8 kernels and fake quantization legitimately round a few
    # samples apart, so agreement would measure ties rather than the export.
    student, _qat_student.teacher = _run_models(tiny_run)
    student = _qat_student.teacher
    data = _data(tmp_path)
    qat, result = _qat_student(student, data, 2, tmp_path / "qat.state.pt")
    assert [row["epoch"] for row in result.history] == [1, 2]
    x = _test_inputs(data)
    fake = top1(qat, x)
    labels = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    float_acc = (top1(student, x) == labels).mean()
    assert float_acc > 0.6
    assert (fake == labels).mean() >= float_acc - 0.05

    converted = convert_qat(qat)
    sample = torch.from_numpy(x[:1])
    onnx_path, tfl_path = tmp_path / "s_int8_qat.onnx", tmp_path / "s_int8_qat.tflite"
    assert write_qat_onnx(converted, sample, onnx_path) == ROUTE_QAT_ONNX
    assert write_qat_tflite(converted, sample, tfl_path, nhwc=True, io_type="float32") == ROUTE_QAT_TFLITE

    # The ONNX file is QDQ with the learned (not recalibrated) per-channel weight scales, its weights stored
    # as int8 (no float weight is quantized at run time).
    proto = onnx.load(str(onnx_path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {t.name: t for t in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == sum(isinstance(m, torch.nn.Conv2d) for m in student.modules())
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    onnx_top1 = logits.argmax(1)
    assert (onnx_top1 == fake).mean() >= 0.99
    # Folding changed the file, not the numbers: the unfolded export (float weights) gives the same logits.
    from edgekd.export.onnx import export_onnx

    export_onnx(converted, sample, tmp_path / "unfolded.onnx")
    assert onnx_path.stat().st_size < 0.8 * (tmp_path / "unfolded.onnx").stat().st_size
    unfolded = ort.InferenceSession(str(tmp_path / "unfolded.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(unfolded.run(None, {"input": x})[0], logits, rtol=0, atol=1e-5)

    it = Interpreter(model_path=str(tfl_path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.float32  # float32 I/O around an int8 graph
    kinds = {d["dtype"] for d in it.get_tensor_details()}
    assert np.int8 in kinds
    nhwc = x.transpose(0, 2, 3, 1)
    tfl_top1 = []
    for i in range(len(nhwc)):
        it.set_tensor(inp["index"], np.ascontiguousarray(nhwc[i:i + 1]))
        it.invoke()
        tfl_top1.append(int(it.get_tensor(out["index"]).argmax()))
    assert (np.array(tfl_top1) == fake).mean() >= 0.99


def test_qat_resume_after_interruption_is_exact(tiny_run, tmp_path):
    student, _qat_student.teacher = _run_models(tiny_run)
    data = _data(tmp_path)

    class Stop(Exception):
        pass

    def stop_after_1(row):
        if row["epoch"] == 1:
            raise Stop

    full, _ = _qat_student(student, data, 3, tmp_path / "a.state.pt")
    with pytest.raises(Stop):
        _qat_student(student, data, 3, tmp_path / "b.state.pt", on_epoch=stop_after_1)
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["epoch"] == 1
    resumed, result = _qat_student(student, data, 3, tmp_path / "b.state.pt", resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    # Weights, BatchNorm statistics and every learned quantization range (scales, zero points, observer min/max).
    assert any("activation_post_process" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different


# -- the stage: `edgekd quantize --qat` on a run directory ------------------------------------------------

def _copy_run(tiny_run, dst):
    import shutil

    shutil.copytree(tiny_run, dst)
    return dst


def test_quantize_qat_writes_verified_int8_files_with_route_qat(tiny_run, tmp_path):
    import json

    from click.testing import CliRunner

    from edgekd.cli import cli

    run = _copy_run(tiny_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["quantize", "--qat", "--run", str(run), "--set", "qat.epochs=1", "-q"])
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "metadata.json").read_text())
    qat_entries = {e["file"]: e for e in meta["models"] if e["route"].startswith("qat")}
    assert set(qat_entries) == {"student_int8_qat.onnx", "student_int8_qat.tflite"}
    metrics = json.loads((run / "metrics.json").read_text())
    for name, entry in qat_entries.items():
        assert entry["precision"] == "int8" and entry["verified"] is True
        m = metrics[name]
        # Checked against the fake-quantized PyTorch model on the whole test split, at the int8 tolerance
        # (the tiny run's width-2 student has nearly tied logits; the >= 99% proof is the test above).
        assert m["agreement"] >= 0.98 and m["qat"]["epochs"] == 1 and m["route"] == entry["route"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["qat"]["status"] == "done"
    state = torch.load(run / "checkpoints" / "qat.state.pt", weights_only=True)
    assert state["epoch"] == 1


def test_quantize_qat_refuses_a_run_without_a_student(tiny_run, tmp_path):
    from click.testing import CliRunner

    from edgekd.cli import cli

    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "student.pt").unlink()
    res = CliRunner().invoke(cli, ["quantize", "--qat", "--run", str(run)])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "no student.pt" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list(run.glob("*_qat.*")) and not (run / "checkpoints" / "qat.state.pt").exists()


def test_report_puts_ptq_and_qat_accuracy_side_by_side():
    from edgekd.report import ptq_vs_qat_rows

    metrics = {
        "student_pruned_int8.tflite": {"route": "litert-torch-pt2e", "test_accuracy": 0.951},
        "student_pruned_int8_qat.tflite": {"route": "qat-litert-torch-pt2e", "test_accuracy": 0.963,
                                           "qat": {"seconds": 41.2}},
        "student_pruned_int8_qat.onnx": {"route": "qat-torch.onnx-qdq", "test_accuracy": 0.962},
        "student_pruned_fp32.onnx": {"route": "torch.onnx-dynamo+onnxslim", "test_accuracy": 0.97},
    }
    rows = ptq_vs_qat_rows(metrics)
    assert rows == [
        ["—", "-", "student_pruned_int8_qat.onnx", "0.9620", "—", "-"],
        ["student_pruned_int8.tflite", "0.9510", "student_pruned_int8_qat.tflite", "0.9630", "+1.20 pt", "41"],
    ]


def test_qat_formats_skip_what_qat_cannot_write_and_refuse_it_when_asked():
    from edgekd.errors import ExportError
    from edgekd.export.qat import qat_formats

    # The formats QAT writes are the backends that have a qat route (onnx, tflite, pte), not a fixed list.
    said = []
    assert qat_formats(None, ["onnx", "tflite", "mcu"], said.append) == ["onnx", "tflite"]
    assert said == ["QAT: mcu not written from the QAT student (only onnx, tflite, pte)"]
    assert qat_formats(["tflite"], ["onnx"], said.append) == ["tflite"]
    assert qat_formats(None, ["pte", "ort"], said.append) == ["pte"]
    with pytest.raises(ExportError, match="QAT cannot write format 'mcu'"):
        qat_formats(["mcu"], ["onnx"], said.append)
    with pytest.raises(ExportError, match="lists none of them"):
        qat_formats(None, ["mcu"], said.append)
