"""``timm:<name>`` and ``torchvision:<name>`` model sources.

timm and torchvision do not import on this machine's CPU torch wheel, so the tests that build real timm or
torchvision models skip here (``importorskip``) and run wherever the extras are installed; the error paths
(library missing, downloads asked for) run here. The resolution logic (name lookup, classes and channels passed
on, unknown-name hint) is also run against a stand-in module exposing timm's three public calls used
(``is_model``, ``list_models``, ``create_model``) and building real torch modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from edgekd.cli import cli
from edgekd.errors import ModelError
from edgekd.models import build_model, load_weights
from edgekd.models.sources import is_source_spec

from conftest import TINY_RECIPE, write_recipe

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _distill(tmp_path, **sections) -> tuple[int, str]:
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    res = CliRunner().invoke(cli, ["distill", str(path), "--out", str(tmp_path / "out"), "-q"])
    return res.exit_code, res.output.strip()


def test_source_specs_are_told_apart_from_factory_paths():
    assert is_source_spec("timm:resnet18") and is_source_spec("torchvision:mobilenet_v2")
    assert not is_source_spec("my_pkg.models:net") and not is_source_spec("models.py:net")
    assert not is_source_spec("cnn")


@pytest.mark.parametrize("spec,kwargs,key", [
    ("timm:resnet18", {"pretrained": True}, "pretrained"),
    ("timm:resnet18", {"checkpoint_path": "w.pth"}, "checkpoint_path"),
    ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "weights"),
])
def test_downloads_are_refused_before_any_import(tmp_path, spec, kwargs, key):
    code, msg = _distill(tmp_path, teacher={"model": spec, "kwargs": kwargs})
    assert code == 2 and len(msg.splitlines()) == 1 and msg.startswith("error: "), msg
    assert f"{key}=" in msg and "never does at run time" in msg and "checkpoint:" in msg


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed here")
def test_timm_missing_is_a_one_line_exit_2_naming_the_extra(tmp_path):
    code, msg = _distill(tmp_path, teacher={"model": "timm:resnet18", "kwargs": {}})
    assert code == 2 and len(msg.splitlines()) == 1, msg
    assert "'timm:resnet18' needs the timm package" in msg and "pip install 'edgekd[timm]'" in msg


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed here")
def test_torchvision_missing_is_a_one_line_exit_2_naming_the_extra(tmp_path):
    code, msg = _distill(tmp_path, student={"model": "torchvision:mobilenet_v2", "kwargs": {}})
    assert code == 2 and len(msg.splitlines()) == 1, msg
    assert "needs the torchvision package" in msg and "pip install 'edgekd[torchvision]'" in msg


@pytest.fixture
def timm_stand_in(monkeypatch):
    """A module named ``timm`` with timm's ``is_model`` / ``list_models`` / ``create_model``, building a real
    (tiny) conv net, so the resolution logic runs where timm itself does not import."""
    if HAS_TIMM:
        pytest.skip("the real timm is installed: see the tests below")
    mod = types.ModuleType("timm")
    names = ["resnet18", "resnet50", "mobilenetv3_small_100"]
    calls = []

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kw):
        calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes, "in_chans": in_chans, **kw})
        return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    mod.is_model, mod.list_models, mod.create_model = (lambda n: n in names), (lambda: list(names)), create_model
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


def test_timm_resolution_passes_classes_and_channels(timm_stand_in):
    model = build_model("timm:resnet18", (1, 16, 16), 7, {"drop_rate": 0.1})
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 7)
    assert timm_stand_in == [{"name": "resnet18", "pretrained": False, "num_classes": 7, "in_chans": 1,
                              "drop_rate": 0.1}]


def test_timm_unknown_name_suggests_the_closest(timm_stand_in, tmp_path):
    with pytest.raises(ModelError, match=r"timm has no model 'resnet17'.*did you mean timm:resnet18"):
        build_model("timm:resnet17", (3, 16, 16), 4)
    code, msg = _distill(tmp_path, teacher={"model": "timm:resnet5O", "kwargs": {}})
    assert code == 2 and "timm has no model 'resnet5O'" in msg and len(msg.splitlines()) == 1, msg


def test_source_needs_image_inputs():
    with pytest.raises(ModelError, match="needs images"):
        build_model("timm:resnet18", (64,), 3)


# -- with the real libraries (skipped where they are not installed) -------------------------------------

@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:mobilenet_v2"])
def test_real_library_model_with_local_checkpoint(tmp_path, spec):
    pytest.importorskip(spec.split(":")[0])
    model = build_model(spec, (3, 32, 32), 5)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    again = build_model(spec, (3, 32, 32), 5)
    load_weights(again, tmp_path / "w.pth")  # weights_only=True inside
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("spec", ["timm:resnet5O", "torchvision:resnet5O"])
def test_real_library_unknown_name(spec):
    pytest.importorskip(spec.split(":")[0])
    with pytest.raises(ModelError, match="has no model 'resnet5O'.*did you mean"):
        build_model(spec, (3, 32, 32), 5)
