"""Augmentation (edgekd.data.augment) against hand computations, and consistent teaching with the teacher cache."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conftest import write_recipe
from edgekd.data.augment import ViewParams, apply_view, resolve, sample_view, targets
from edgekd.recipe import AugmentConfig


def _params(n=1, **kw) -> ViewParams:
    base = dict(theta=None, shift=None, colour=None, partner=None, lam=None, box=None)
    base.update(kw)
    return ViewParams(**base)


def _theta(sw=1.0, sh=1.0, ang_deg=0.0, flip=1.0, cx=0.0, cy=0.0) -> torch.Tensor:
    a = math.radians(ang_deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[[sw * c * flip, -sw * s, cx], [sh * s * flip, sh * c, cy]]], dtype=torch.float64)


ZERO, ONE = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
RAMP = torch.arange(16.0).view(1, 1, 4, 4)  # value = 4 * row + column


def _apply(x, p, idx=None, mean=ZERO, std=ONE, fetch=None):
    return apply_view(x, torch.arange(len(x)) if idx is None else idx, p, mean, std, fetch)


def test_integer_shift_fills_with_zeros():
    out = _apply(RAMP, _params(shift=torch.tensor([[1, -1]])))  # down 1 row, left 1 column
    expected = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]], dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_flip_and_quarter_turn_match_exact_pixel_moves():
    flipped = _apply(RAMP, _params(theta=_theta(flip=-1.0)))
    assert torch.equal(flipped, RAMP.flip(-1))  # flip-only views move pixels exactly (no resampling)
    # a batch mixing flipped and unflipped samples, and a near-flip that must be resampled
    both = _apply(torch.cat([RAMP, RAMP]), _params(theta=torch.cat([_theta(flip=-1.0), _theta()])))
    assert torch.equal(both[0], RAMP[0].flip(-1)) and torch.equal(both[1], RAMP[0])
    nudged = _apply(RAMP, _params(theta=_theta(flip=-1.0, cx=0.25)))  # half a pixel of a 4-px image: resampled
    assert not torch.equal(nudged, RAMP.flip(-1))
    assert torch.allclose(nudged[0, 0, :, 1:], (RAMP.flip(-1)[0, 0, :, 1:] + RAMP.flip(-1)[0, 0, :, :-1]) / 2, atol=1e-5)
    turned = _apply(RAMP, _params(theta=_theta(ang_deg=90.0)))
    # output (row r, col c) reads input at x_in = -y_out, y_in = x_out: input row c, column 3 - r
    expected = torch.tensor([[RAMP[0, 0, c, 3 - r] for c in range(4)] for r in range(4)])
    assert torch.allclose(turned[0, 0], expected, atol=1e-4)


def test_translate_by_one_pixel_repeats_the_edge():
    out = _apply(RAMP, _params(theta=_theta(cx=0.5)))  # +0.5 normalized = +1 pixel of a 4-wide image
    expected = torch.tensor([[1, 2, 3, 3], [5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15]], dtype=torch.float32)
    assert torch.allclose(out[0, 0], expected, atol=1e-5)


def test_centre_crop_of_half_width_interpolates_the_ramp():
    ramp = torch.arange(4.0).repeat(4, 1).view(1, 1, 4, 4)  # value = column
    out = _apply(ramp, _params(theta=_theta(sw=0.5, sh=0.5)))
    # output column centres -0.75..0.75 map to input x -0.375..0.375, i.e. pixel coordinates 0.75, 1.25, 1.75, 2.25
    assert torch.allclose(out[0, 0, 1], torch.tensor([0.75, 1.25, 1.75, 2.25]), atol=1e-5)


def test_colour_jitter_on_unnormalized_rgb():
    raw = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    raw[..., 1] = torch.tensor([0.6, 0.2, 0.0]).view(3, 1)
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    x = (raw - mean) / std
    f = torch.tensor([[1.5, 0.5, 0.0]], dtype=torch.float64)  # brightness 1.5, contrast 0.5, saturation 0 (gray)
    out = _apply(x, _params(colour=f), mean=mean, std=std) * std + mean
    b = (raw * 1.5).clamp(0, 1)
    g = 0.299 * b[:, 0] + 0.587 * b[:, 1] + 0.114 * b[:, 2]
    c = ((b - g.mean()) * 0.5 + g.mean()).clamp(0, 1)
    gray = 0.299 * c[:, 0] + 0.587 * c[:, 1] + 0.114 * c[:, 2]
    assert torch.allclose(out, gray.unsqueeze(1).expand_as(out), atol=1e-5)


def test_mixup_and_cutmix_with_soft_targets():
    a, b = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 10.0)
    data = {0: a, 1: b}
    fetch = lambda j: torch.cat([data[int(i)] for i in j])  # noqa: E731
    x = torch.cat([a, b])
    mix = _params(partner=torch.tensor([1, 0]), lam=torch.tensor([0.3, 1.0], dtype=torch.float64),
                  box=torch.zeros(2, 4, dtype=torch.long))
    out = _apply(x, mix, fetch=fetch)
    assert torch.allclose(out[0], torch.full((1, 4, 4), 7.0)) and torch.equal(out[1], b[0])
    t = targets(torch.tensor([2, 5]), torch.arange(2), mix, lambda j: torch.tensor([2, 5])[j], 6)
    assert torch.allclose(t[0], torch.tensor([0, 0, 0.3, 0, 0, 0.7])) and torch.equal(t[1], torch.eye(6)[5])
    cut = _params(partner=torch.tensor([1, 0]), lam=torch.tensor([0.75, 1.0], dtype=torch.float64),
                  box=torch.tensor([[1, 3, 0, 2], [0, 0, 0, 0]]))
    out = _apply(x, cut, fetch=fetch)
    expected = torch.zeros(4, 4)
    expected[1:3, 0:2] = 10.0
    assert torch.equal(out[0, 0], expected) and torch.equal(out[1], b[0])


def test_views_depend_on_seed_and_view_only():
    cfg = resolve("strong")
    a, b = sample_view(cfg, 50, (8, 8), seed=3, view=1), sample_view(cfg, 50, (8, 8), seed=3, view=1)
    c = sample_view(cfg, 50, (8, 8), seed=3, view=2)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.lam, b.lam) and torch.equal(a.partner, b.partner)
    assert not torch.equal(a.theta, c.theta)
    assert ((a.lam > 0) & (a.lam <= 1)).all() and (a.lam < 1).any() and (a.lam == 1).any()  # mix_prob 0.5


def test_presets_keep_their_historical_meaning():
    assert resolve("none") == AugmentConfig()
    assert resolve("shift") == AugmentConfig(shift_px=2)
    assert resolve("flip") == AugmentConfig(flip=0.5)
    p = sample_view(resolve("flip"), 400, (8, 8), seed=0, view=0)
    flips = p.theta[:, 0, 0] < 0
    assert 120 < int(flips.sum()) < 280 and torch.equal(p.theta[:, 0, 0].abs(), torch.ones(400, dtype=torch.float64))


@pytest.mark.parametrize("setting, message", [
    ("data.augment=stronk", "unknown augmentation 'stronk'; did you mean 'strong'?"),
    ("data.augment.rotate=90", "data.augment: rotate: Input should be less than or equal to 45"),
    ("data.augment.mix_prob=1.5", "data.augment: mix_prob: Input should be less than or equal to 1"),
])
def test_bad_augmentation_is_a_one_line_error(tmp_path, setting, message):
    recipe = write_recipe(tmp_path / "r.yaml")
    proc = subprocess.run([sys.executable, "-m", "edgekd", "distill", str(recipe), "--out", str(tmp_path / "o"),
                           "--set", setting], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -- consistent teaching --------------------------------------------------------------------------------

class _Recorder(torch.nn.Module):
    """Wraps a model; keeps a copy of every input (and output) it sees, in training mode only if ``train_only``."""

    def __init__(self, model, train_only=False):
        super().__init__()
        self.model, self.inputs, self.outputs, self.train_only = model, [], [], train_only

    def forward(self, x):
        out = self.model(x)
        if self.train_only and not self.training:  # validation passes
            return out
        self.inputs.append(x.detach().clone())
        self.outputs.append(out.detach().clone())
        return out


def _setup(augment="strong"):
    from edgekd import losses
    from edgekd.data import load_data
    from edgekd.models import build_model
    from edgekd.recipe import load_recipe

    recipe = load_recipe(write_recipe_tmp(), [f"data.augment={augment}", "data.limit=300", "distill.teacher_views=2"])
    data = load_data(recipe.data, 0)
    torch.manual_seed(0)
    teacher = build_model("cnn", data.input_shape, 10, {"width": 4, "depth": 2}).eval()
    student = build_model("cnn", data.input_shape, 10, {"width": 2, "depth": 2})
    cfg = recipe.distill.model_copy(update={"epochs": 3})
    return recipe, data, teacher, student, cfg, losses


def write_recipe_tmp():
    import tempfile
    from pathlib import Path

    return write_recipe(Path(tempfile.mkdtemp()) / "r.yaml")


def fit(role, model, data, cfg, loss_fn, *, seed, state_path, teacher=None, cache_teacher=True, quiet=True):
    from edgekd.training import FitConfig
    from edgekd.training import fit as fit_

    return fit_(model, data, loss_fn, FitConfig(role, cfg, seed=seed, state_path=state_path, quiet=quiet,
                                                cache_teacher=cache_teacher), teacher=teacher)


class _RecordingKD(torch.nn.Module):
    soft_labels = True

    def __init__(self, inner):
        super().__init__()
        self.inner, self.teacher_logits = inner, []

    def forward(self, s, t, y):
        self.teacher_logits.append(t.detach().clone())
        return self.inner(s, t, y)


def test_live_teacher_sees_exactly_the_students_augmented_batch(tmp_path):

    recipe, data, teacher, student, cfg, losses = _setup()
    t_rec, s_rec = _Recorder(teacher), _Recorder(student, train_only=True)
    fit("student", s_rec, data, cfg, losses.build("kd", alpha=1.0), seed=0, state_path=tmp_path / "s.pt",
        teacher=t_rec, cache_teacher=False, quiet=True)
    assert len(t_rec.inputs) == len(s_rec.inputs) > 0
    assert all(torch.equal(a, b) for a, b in zip(t_rec.inputs, s_rec.inputs))
    # the batches are really augmented and mixed: not the plain normalized samples
    plain = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert not any(torch.equal(s_rec.inputs[0][0], p) for p in plain)


def test_cache_replays_the_teachers_outputs_for_the_exact_view_shown(tmp_path):

    recipe, data, teacher, student, cfg, losses = _setup()
    t_rec, s_rec = _Recorder(teacher), _Recorder(student, train_only=True)
    kd = _RecordingKD(losses.build("kd", alpha=1.0))
    res = fit("student", s_rec, data, cfg, kd, seed=0, state_path=tmp_path / "s.pt", teacher=t_rec, quiet=True)
    assert res.teacher_cache["views"] == 2 and not res.teacher_cache["reused"] and res.teacher_cache["bytes"] > 0
    # the teacher ran only while building the cache: 2 views; each of its outputs is keyed by the image it saw
    seen = {}
    for x, out in zip(t_rec.inputs, t_rec.outputs):
        for xi, oi in zip(x, out):
            seen[xi.numpy().tobytes()] = oi
    shown = [(xi, ti) for x, t in zip(s_rec.inputs[: len(kd.teacher_logits)], kd.teacher_logits) for xi, ti in zip(x, t)]
    assert len(shown) == 3 * len(data.train)
    assert all(torch.equal(seen[xi.numpy().tobytes()], ti) for xi, ti in shown)  # exact image, exact logits
    # a second run reuses the file without running the teacher
    t_rec2 = _Recorder(teacher)
    res2 = fit("student", student, data, cfg, losses.build("kd", alpha=1.0), seed=0, state_path=tmp_path / "s2.pt",
               teacher=t_rec2, quiet=True)
    assert res2.teacher_cache["reused"] and not t_rec2.inputs


def test_a_cache_file_that_does_not_match_its_key_is_refused(tmp_path):
    from edgekd.errors import CheckpointError

    recipe, data, teacher, student, cfg, losses = _setup()
    res = fit("student", student, data, cfg, losses.build("kd"), seed=0, state_path=tmp_path / "s.pt",
              teacher=teacher, quiet=True)
    path = tmp_path / res.teacher_cache["path"].split("/")[-1]
    saved = torch.load(path, weights_only=True)
    saved["logits"] = saved["logits"] + 1
    saved["key"]["teacher_sha256"] = "0" * 64
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="does not hold the logits its name promises"):
        fit("student", student, data, cfg, losses.build("kd"), seed=0, state_path=tmp_path / "s3.pt",
            teacher=teacher, quiet=True)


def test_baseline_gets_the_same_augmented_views_as_the_student(tmp_path):

    recipe, data, teacher, student, cfg, losses = _setup()
    import copy

    base, kd = _Recorder(copy.deepcopy(student), True), _Recorder(student, True)
    fit("baseline", base, data, cfg, losses.build("ce"), seed=0, state_path=tmp_path / "b.pt", quiet=True)
    fit("student", kd, data, cfg, losses.build("kd", alpha=1.0), seed=0, state_path=tmp_path / "s.pt",
        teacher=teacher, quiet=True)
    n = len(kd.inputs)
    assert n == len(base.inputs[:n]) and all(torch.equal(a, b) for a, b in zip(base.inputs[:n], kd.inputs))


def test_mixing_partners_are_normalized_exactly_as_the_loader_normalizes_them():
    from edgekd.data.augment import Augmenter

    recipe, data, *_ = _setup("strong")
    aug = Augmenter(recipe.data.augment, data, seed=0)
    x, y, pos = next(iter(data.loader("train", 16)))
    mean, std = aug._norm(x)
    partners = torch.tensor([5, 0, 11, 5])
    fetched = aug._fetch(partners, mean, std)
    batch = {int(p): xi for xb, _, pb in data.loader("train", 16) for xi, p in zip(xb, pb)}
    assert fetched.dtype == x.dtype and fetched.shape == (4, *x.shape[1:])
    assert all(torch.equal(f, batch[int(p)]) for f, p in zip(fetched, partners))  # bit for bit, not allclose
    assert aug._norm(x)[0] is mean  # made once per device, not per batch
