"""Hugging Face transformers as teachers and students: ViT / BERT distill, export, parity; layer-subset init;
hidden-state distillation with a projection; local directories only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_recipe
from edgekd.cli import cli
from edgekd.errors import ModelError
from edgekd.models import build_model, save_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "urls.csv"
BERT_T = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
VIT_T = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4}


def _ids(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 259, (n, length), generator=g).float()
    x[:, 0] = 1
    x[1, 10:] = 0  # padding must be masked out
    return x


def _state(model) -> dict[str, torch.Tensor]:
    return model.hf.state_dict()


@pytest.mark.parametrize("spec,shape,kwargs,prefix", [
    ("hf_bert", (24,), BERT_T, "bert.encoder.layer."),
    ("hf_vit", (1, 8, 8), VIT_T, "vit.layers."),  # transformers 5 naming
])
def test_layer_subset_init_copies_the_right_weights(spec, shape, kwargs, prefix):
    from edgekd.models.hf import init_from_teacher

    torch.manual_seed(0)
    teacher = build_model(spec, shape, 3, kwargs).eval()
    t = _state(teacher)
    student = init_from_teacher(teacher, "alternate")  # DistilBERT: one layer out of two -> teacher 0, 2
    s = _state(student)
    assert student.hf.config.num_hidden_layers == 2
    for key, value in s.items():
        if key.startswith(prefix):
            j, rest = key[len(prefix):].split(".", 1)
            source = f"{prefix}{[0, 2][int(j)]}.{rest}"
        else:
            source = key  # embeddings, final norm / pooler, classifier
        assert torch.equal(value, t[source]), key
    # A layer the student did not take really differs from the one it took.
    some = next(k[len(prefix) + 2:] for k in s if k.startswith(prefix + "1."))
    assert not torch.equal(s[f"{prefix}1.{some}"], t[f"{prefix}1.{some}"])

    x = _ids() if spec == "hf_bert" else torch.randn(4, *shape)
    with torch.no_grad():
        full = init_from_teacher(teacher, [0, 1, 2, 3]).eval()
        ref = teacher(x)  # random init: logits are ~1e-2, so differences are judged at 1e-5
        assert (full(x) - ref).abs().max() < 1e-7  # all layers in order = the teacher itself
        assert (init_from_teacher(teacher, [3, 1]).eval()(x) - ref).abs().max() > 1e-5
    with pytest.raises(ModelError, match="teacher has layers 0..3"):
        init_from_teacher(teacher, [0, 4])


def test_local_directory_and_checkpoint_teachers(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("hf_bert", (24,), 2, BERT_T).eval()
    teacher.hf.save_pretrained(tmp_path / "bert")
    x = _ids()
    with torch.no_grad():
        ref = teacher(x)
        loaded = build_model("hf_bert", (24,), 2, {"pretrained": str(tmp_path / "bert")}).eval()
        assert torch.allclose(loaded(x), ref, atol=1e-6)
        from_dir = build_model("hf_bert", (24,), 2, {"from_teacher": str(tmp_path / "bert"), "layers": [1, 3]})
    assert torch.equal(_state(from_dir)["bert.encoder.layer.1.output.dense.weight"],
                       _state(teacher)["bert.encoder.layer.3.output.dense.weight"])
    save_checkpoint(tmp_path / "teacher.pt", teacher, "hf_bert", BERT_T, (24,), 2)
    from_ckpt = build_model("hf_bert", (24,), 2, {"from_teacher": str(tmp_path / "teacher.pt")})
    assert torch.equal(_state(from_ckpt)["bert.encoder.layer.1.attention.self.query.weight"],
                       _state(teacher)["bert.encoder.layer.2.attention.self.query.weight"])


def test_missing_or_incomplete_local_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        build_model("hf_vit", (1, 8, 8), 3, {"pretrained": str(tmp_path / "nope")})
    torch.manual_seed(0)
    build_model("hf_vit", (1, 8, 8), 3, VIT_T).hf.save_pretrained(tmp_path / "vit")
    shutil.copytree(tmp_path / "vit", tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="incomplete: no weights"):
        build_model("hf_vit", (1, 8, 8), 3, {"pretrained": str(tmp_path / "noweights")})
    shutil.copytree(tmp_path / "vit", tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    with pytest.raises(ModelError, match="incomplete: no config.json"):
        build_model("hf_vit", (1, 8, 8), 3, {"pretrained": str(tmp_path / "noconfig")})
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load local model directory"):
        build_model("hf_vit", (1, 8, 8), 3, {"pretrained": str(tmp_path / "vit")})
    with pytest.raises(ModelError, match="token-id inputs"):
        build_model("hf_bert", (1, 8, 8), 3, {})

    recipe = write_recipe(tmp_path / "r.yaml", teacher={"model": "hf_vit", "kwargs": {"pretrained": str(tmp_path / "nope")}})
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith("error: local model directory") and "does not exist" in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_hidden_state_distillation_with_projection(tmp_path):
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.training import FitConfig, OnEpoch, PeerTeacher, fit
    from edgekd.recipe import DataConfig, TrainConfig

    data = load_data(DataConfig(dataset="digits", limit=300, batch_size=32), seed=0)
    torch.manual_seed(0)
    teacher = build_model("hf_vit", (1, 8, 8), 10, {**VIT_T, "hidden_size": 64}).eval()
    student = build_model("hf_vit", (1, 8, 8), 10, {**VIT_T, "num_hidden_layers": 2})
    loss_fn = losses.build("fitnets", student_layer="hidden_states.2", teacher_layer="hidden_states.4", beta=1.0)
    result = fit(student, data, loss_fn, FitConfig("student", TrainConfig(epochs=1, lr=0.002), seed=0,
                 state_path=tmp_path / "s.pt", quiet=True), teacher=teacher)
    proj = loss_fn.projections[0]
    # Tokens are laid out (hidden, tokens, 1): a 1x1 conv = one linear map 32 -> 64 shared by the 5 tokens.
    assert isinstance(proj, torch.nn.Conv2d) and (proj.in_channels, proj.out_channels) == (32, 64)
    assert np.isfinite(result.history[0]["train_loss"])
    # (transformers itself keeps hooks on its layers to record outputs; only edgekd's taps must be gone)
    assert not any(m._forward_hooks for m in student.hidden_states), "taps must be gone after training"
    from edgekd.training.features import probe_shapes

    assert probe_shapes(student, ["hidden_states.0"], data.train[0][0][None], "student") == {"hidden_states.0": (32, 5, 1)}
    # Training moved the projection away from its (seeded) initialization.
    torch.manual_seed(0)
    fresh = losses.build("fitnets", student_layer="hidden_states.2", teacher_layer="hidden_states.4")
    fresh.setup({"hidden_states.2": (32, 5, 1)}, {"hidden_states.4": (64, 5, 1)})
    assert fresh.projections[0].weight.shape == proj.weight.shape


def _distill_export(tmp_path: Path, recipe: dict) -> dict:
    from edgekd.distill import run_distill
    from edgekd.export.pipeline import run_export
    from edgekd.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", recipe)
    rd = run_distill(load_recipe(path), out=tmp_path / "out", quiet=True)
    report = run_export(rd, formats=["onnx", "tflite"], quantize=[], teacher=False)
    report.raise_for_problems()
    return json.loads((rd.path / "metrics.json").read_text())


@pytest.mark.slow  # ~2 min on 2 shared cores, mostly the LiteRT conversion
def test_vit_teacher_to_student_distill_export_parity(tmp_path):
    metrics = _distill_export(tmp_path, {
        "name": "vit", "seed": 0, "data": {"dataset": "digits", "limit": 700, "batch_size": 32},
        "teacher": {"model": "hf_vit", "kwargs": {**VIT_T, "hidden_size": 48}, "epochs": 3, "lr": 0.003},
        "student": {"model": "hf_vit", "kwargs": {**VIT_T, "num_hidden_layers": 2, "hidden_size": 24,
                                                  "intermediate_size": 48}},
        "distill": {"epochs": 3, "lr": 0.003, "baseline": False, "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9}},
    })
    assert metrics["student"]["params"] < metrics["teacher"]["params"] / 2
    assert metrics["teacher"]["test_accuracy"] > 0.5 and metrics["student"]["test_accuracy"] > 0.3  # chance: 0.1
    for name in ("student_fp32.onnx", "student_fp32.tflite"):
        m = metrics[name]
        print(f"vit {name}: parity {m['parity']:.1e}, accuracy {m['test_accuracy']:.3f}")
        assert m["verified"] and m["parity"] <= 1e-5 and m["agreement"] == 1.0
        assert m["test_accuracy"] == pytest.approx(metrics["student"]["test_accuracy"])


def test_bert_teacher_to_student_distill_export_parity(tmp_path):
    metrics = _distill_export(tmp_path, {
        "name": "bert", "seed": 0,
        "data": {"dataset": "text", "path": str(FIXTURE), "max_length": 48, "batch_size": 32},
        "teacher": {"model": "hf_bert", "kwargs": {**BERT_T, "num_hidden_layers": 2}, "epochs": 2, "lr": 0.003},
        "student": {"model": "hf_bert", "kwargs": {**BERT_T, "num_hidden_layers": 1, "hidden_size": 16,
                                                   "intermediate_size": 32}},
        "distill": {"epochs": 6, "lr": 0.005, "baseline": False, "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9}},
    })
    assert metrics["teacher"]["test_accuracy"] > 0.8 and metrics["student"]["test_accuracy"] > 0.8  # chance: 0.5
    meta = json.loads((tmp_path / "out" / "bert" / "metadata.json").read_text())
    for entry in meta["models"]:
        # Token ids travel as float32 (exact integers) and are cast to int64 inside the graph.
        assert entry["input"]["dtype"] == "float32" and entry["input"]["shape"][1:] == [48]
    for name in ("student_fp32.onnx", "student_fp32.tflite"):
        m = metrics[name]
        print(f"bert {name}: parity {m['parity']:.1e}, accuracy {m['test_accuracy']:.3f}")
        assert m["verified"] and m["parity"] <= 1e-5 and m["agreement"] == 1.0
