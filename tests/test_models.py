import pickle

import pytest
import torch

from edgekd.errors import CheckpointError, ModelError
from edgekd.models import build_model, count_macs_params, create_model, list_models, load_weights, save_checkpoint

TINY_KWARGS = {
    "mlp": {"hidden": 8, "depth": 1},
    "cnn": {"width": 2, "depth": 2},
    "mobilenetv2": {"width_mult": 0.25, "stages": 3, "last_channels": 32},
    "resnet": {"width": 4, "blocks": [1, 1]},
}


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_runs_at_tiny_size(name):
    torch.manual_seed(0)
    model = create_model(name, (3, 16, 16), 5, **TINY_KWARGS[name]).eval()
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    macs, params = count_macs_params(model, (3, 16, 16))
    assert params == sum(p.numel() for p in model.parameters()) and macs > 0


def test_width_knobs_change_size():
    small = count_macs_params(create_model("cnn", (1, 28, 28), 10, width=4), (1, 28, 28))
    big = count_macs_params(create_model("cnn", (1, 28, 28), 10, width=16), (1, 28, 28))
    assert big[0] > 4 * small[0] and big[1] > 4 * small[1]


def test_mlp_on_tabular_and_cnn_refuses_tabular():
    assert create_model("mlp", (7,), 3)(torch.randn(4, 7)).shape == (4, 3)
    with pytest.raises(ModelError, match="needs image inputs"):
        create_model("cnn", (7,), 3)


def test_unknown_model_and_kwarg():
    with pytest.raises(ModelError, match="did you mean 'cnn'"):
        create_model("cnnn", (1, 8, 8), 2)
    with pytest.raises(ModelError, match="did you mean 'width'"):
        create_model("cnn", (1, 8, 8), 2, widht=3)


def test_user_model_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes, hidden=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n"
        "def not_a_model():\n    return 3\n")
    m = build_model(f"{tmp_path}/mymodels.py:tiny", (1, 8, 8), 10, {"hidden": 6})
    assert m(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("mymodels:tiny", (1, 8, 8), 3, {}) is not None
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model("mymodels:not_a_model", (1, 8, 8), 3, {})
    with pytest.raises(ModelError, match="has no callable 'nope'"):
        build_model("mymodels:nope", (1, 8, 8), 3, {})
    with pytest.raises(ModelError, match="cannot import"):
        build_model("no_such_module_xyz:f", (1, 8, 8), 3, {})


def _model():
    torch.manual_seed(1)
    return create_model("cnn", (1, 8, 8), 3, width=2, depth=2)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    m = _model()
    save_checkpoint(tmp_path / "m.pt", m, "cnn", {"width": 2, "depth": 2}, (1, 8, 8), 3)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)  # loadable without unpickling code
    assert ckpt["model"] == {"spec": "cnn", "kwargs": {"width": 2, "depth": 2}}
    m2 = create_model("cnn", (1, 8, 8), 3, width=2, depth=2)
    load_weights(m2, tmp_path / "m.pt")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m.eval()(x), m2.eval()(x))


def test_plain_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    m = _model()
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    for f in ("sd.pth", "w.safetensors"):
        m2 = create_model("cnn", (1, 8, 8), 3, width=2, depth=2)
        load_weights(m2, tmp_path / f)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/edgekd-pickle-payload-ran", "w"))


def test_pickle_payload_is_refused_without_opt_in(tmp_path):
    import os

    marker = "/tmp/edgekd-pickle-payload-ran"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"state_dict": _model().state_dict(), "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_weights(_model(), tmp_path / "evil.pt")
    assert not os.path.exists(marker)


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path):
    m = _model()
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(m, tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "m.pt", m, "cnn", {}, (1, 8, 8), 3)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(m, tmp_path / "trunc.pt")
    other = create_model("cnn", (1, 8, 8), 3, width=4, depth=2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(other, tmp_path / "m.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_weights(m, tmp_path / "junk.safetensors")


def test_load_model_rebuilds_every_edgekd_checkpoint_kind(tmp_path):
    from edgekd.models import load_model, save_pruned

    x = torch.randn(4, 1, 8, 8)
    model = create_model("cnn", (1, 8, 8), 10, width=4, depth=2).eval()
    save_checkpoint(tmp_path / "student.pt", model, "cnn", {"width": 4, "depth": 2}, (1, 8, 8), 10)
    loaded = load_model(tmp_path / "student.pt")
    assert not loaded.training and torch.equal(loaded(x), model(x))
    # A pruned model: narrower than the spec says; the pruned format restores its widths.
    narrow = create_model("cnn", (1, 8, 8), 10, width=4, depth=2).eval()
    narrow.features[0] = torch.nn.Conv2d(1, 3, 3, padding=1, bias=False)
    narrow.features[1] = torch.nn.BatchNorm2d(3).eval()
    narrow.features[4] = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    save_pruned(tmp_path / "student_pruned.pt", narrow, "cnn", {"width": 4, "depth": 2}, (1, 8, 8), 10)
    pruned = load_model(tmp_path / "student_pruned.pt")
    assert pruned.features[0].out_channels == 3 and torch.equal(pruned(x), narrow(x))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an edgekd checkpoint"):
        load_model(tmp_path / "plain.pt")
