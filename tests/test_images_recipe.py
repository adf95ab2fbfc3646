"""The real-photo template ``recipes/images_224.yaml`` end to end on a tiny generated folder, shrunk with --set
(32 px, a zoo teacher from a local checkpoint instead of timm), on the CPU: the recipe's own switches (flip
augmentation, bf16 autocast, channels_last, MobileNetV2 student, image cache) stay on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from edgekd.cli import cli
from edgekd.data.image_cache import decode_count
from edgekd.models import build_model, load_checkpoint

TEACHER_KWARGS = {"width": 8, "blocks": [1, 1]}


def _folder(root, n_per_class: int = 10):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 60, size=(40 + i, 48, 3), dtype=np.uint8)
            a[..., c] += 150  # a class signal a model can pick up
            Image.fromarray(a).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _fine_tuned_teacher(images, tmp_path):
    """A zoo teacher fine-tuned on the run's own train split (seed 0), standing in for a fine-tuned timm teacher."""
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.recipe import DataConfig, TrainConfig
    from edgekd.training import FitConfig, fit

    # Its own image cache: the run's decode count below starts from an empty cache.
    data = load_data(DataConfig(dataset="folder", path=str(images), image_size=[32, 32], batch_size=8,
                                cache_dir=str(tmp_path / "teacher_cache")), seed=0)
    torch.manual_seed(0)
    teacher = build_model("resnet", (3, 32, 32), 3, TEACHER_KWARGS)
    fit(teacher, data, losses.build("ce"), FitConfig("teacher", TrainConfig(epochs=10, lr=0.01), seed=0,
                                                     state_path=tmp_path / "teacher.state.pt", quiet=True))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    return tmp_path / "teacher.pth"


@pytest.mark.slow
def test_images_224_recipe_runs_end_to_end_at_reduced_size(tmp_path):
    images = _folder(tmp_path / "images")
    teacher = _fine_tuned_teacher(images, tmp_path)
    sets = {"data.path": str(images), "data.image_size": "[32, 32]", "data.batch_size": "8",
            "data.cache_dir": str(tmp_path / "cache"), "teacher.model": "resnet",
            "teacher.kwargs": json.dumps(TEACHER_KWARGS), "teacher.checkpoint": str(teacher),
            "distill.epochs": "6"}
    args = ["distill", "images_224", "--out", str(tmp_path / "out"), "-q"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]

    before = decode_count()
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert decode_count() - before == 30  # every image decoded once...
    again = CliRunner().invoke(cli, args + ["--name", "again"])
    assert again.exit_code == 0, again.output
    assert decode_count() - before == 30  # ...and not again by the second run

    run = tmp_path / "out" / "images_224"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["data"]["augment"] == "flip" and recipe["distill"]["amp"] == "bf16"
    assert recipe["distill"]["channels_last"] is True and recipe["student"]["model"] == "mobilenetv2"
    metrics = json.loads((run / "metrics.json").read_text())
    # The loaded teacher is the fine-tuned one, and the student learned the classes from it: 3 classes (chance
    # 1/3), 6 test images.
    print(f"teacher {metrics['teacher']['test_accuracy']:.3f}, student {metrics['student']['test_accuracy']:.3f}")
    assert metrics["teacher"]["test_accuracy"] == 1.0 and "baseline" not in metrics
    assert metrics["student"]["test_accuracy"] >= 5 / 6
    ckpt = load_checkpoint(run / "student.pt")
    student = build_model("mobilenetv2", (3, 32, 32), 3, recipe["student"]["kwargs"])
    student.load_state_dict(ckpt["state_dict"])
    # Saved in the ordinary memory format, whatever format training used.
    assert all(t.is_contiguous() for t in ckpt["state_dict"].values())
