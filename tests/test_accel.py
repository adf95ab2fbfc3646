"""Speed switches of the training forward pass (channels_last, torch.compile, the teacher in inference mode), on
the CPU here; the tests marked ``gpu`` repeat the device-placement checks on CUDA and skip without it."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from edgekd import losses
from edgekd.cli import cli
from edgekd.data import load_data
from edgekd.models import build_model
from edgekd.training import accel
from edgekd.recipe import DataConfig, DistillConfig

from conftest import TINY_RECIPE, write_recipe


def test_teacher_logits_are_plain_float32_tensors_a_loss_can_backpropagate_through():
    teacher, student = build_model("cnn", (1, 8, 8), 10, {"width": 4, "depth": 2}), build_model("cnn", (1, 8, 8), 10)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    for amp in ("off", "bf16"):
        t = accel.teacher_logits(teacher.eval(), x, amp)
        assert t.dtype == torch.float32 and not t.is_inference() and not t.requires_grad
        loss = losses.build_from_config({"name": "kd", "temperature": 4.0, "alpha": 0.9})(student(x), t, y)
        loss.backward()  # an inference tensor saved for backward would raise here
    with torch.no_grad():
        assert torch.equal(accel.teacher_logits(teacher, x), teacher(x))


def test_channels_last_is_applied_for_training_and_undone_for_saving():
    model = build_model("mobilenetv2", (3, 16, 16), 4, {"width_mult": 0.25})
    cfg = DistillConfig(channels_last=True)
    forward = accel.prepare(model, model, cfg)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert accel.as_input(torch.zeros(2, 3, 16, 16), cfg).is_contiguous(memory_format=torch.channels_last)
    assert forward(accel.as_input(torch.zeros(2, 3, 16, 16), cfg)).shape == (2, 4)
    accel.release(model)
    assert all(p.is_contiguous() for p in model.parameters())
    off = DistillConfig()
    assert accel.prepare(model, model, off) is model and accel.as_input(torch.zeros(1, 3, 4, 4), off).is_contiguous()


def _distill(tmp_path, args=(), **sections) -> dict:
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    res = CliRunner().invoke(cli, ["distill", str(path), "--out", str(tmp_path / "out"), "-q", *args])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())


@pytest.mark.slow
def test_compile_switch_trains_a_student(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # forget graphs compiled by other tests in this process
    counters.clear()
    metrics = _distill(tmp_path, distill={"epochs": 2, "compile": True, "baseline": False},
                       teacher={"epochs": 1})
    # TorchDynamo captured the training forward into a graph (the teacher trains uncompiled: only the
    # student's fit has the switch), so training went through torch.compile, not the plain module ...
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1, dict(counters)
    # ... and the compiled forward trained the student: its loss fell and it is above chance (10 digit classes;
    # this short run reaches 0.21 with or without compile).
    with open(tmp_path / "out" / "tiny" / "history.csv", newline="") as f:
        losses_ = [float(row["train_loss"]) for row in csv.DictReader(f) if row["model"] == "student"]
    assert len(losses_) == 2 and losses_[1] < losses_[0] and metrics["student"]["test_accuracy"] > 0.15


# -- CUDA (skipped without a GPU) --------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_batches_are_normalized_on_the_gpu_and_equal_the_cpu_ones():
    data = load_data(DataConfig(dataset="digits"), seed=0)
    for (xc, yc, pc), (xg, yg, pg) in zip(data.loader("val", 64), data.loader("val", 64, device="cuda")):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        assert torch.allclose(xc, xg.cpu(), atol=1e-6) and torch.equal(yc, yg.cpu()) and torch.equal(pc, pg)


@pytest.mark.gpu
def test_cuda_distill_with_augmentation_bf16_and_channels_last(tmp_path):
    metrics = _distill(tmp_path, ["--device", "cuda"], data={"augment": "flip"},
                       distill={"epochs": 2, "amp": "bf16", "channels_last": True}, teacher={"epochs": 1})
    assert metrics["student"]["test_accuracy"] > 0.1
