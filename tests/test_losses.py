import math

import pytest
import torch

from edgekd import losses
from edgekd.errors import RecipeError

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
T = torch.tensor([[1.5, 1.0, -0.5], [0.0, 1.0, 2.0]])
Y = torch.tensor([0, 2])


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _ce(row, label):
    return -math.log(_softmax(row, 1.0)[label])


def test_kd_matches_hand_computed_formula():
    temp, alpha = 3.0, 0.7
    kl = sum(_kl(_softmax(t, temp), _softmax(s, temp)) for s, t in zip(S.tolist(), T.tolist())) / 2
    ce = sum(_ce(s, y) for s, y in zip(S.tolist(), Y.tolist())) / 2
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = losses.build("kd", temperature=temp, alpha=alpha)(S, T, Y)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_label_free_ignores_labels_and_is_zero_at_teacher():
    loss = losses.build("kd", temperature=2.0, alpha=1.0)
    assert not loss.needs_labels
    assert loss(S, T, None).item() == pytest.approx(loss(S, T, Y).item())
    assert loss(T, T, None).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_with_hard_labels_needs_labels():
    with pytest.raises(ValueError, match="needs labels"):
        losses.build("kd", alpha=0.5)(S, T, None)


def test_mse_matches_formula():
    alpha = 0.25
    mse = ((S - T) ** 2).mean().item()
    ce = sum(_ce(s, y) for s, y in zip(S.tolist(), Y.tolist())) / 2
    got = losses.build("mse", alpha=alpha)(S, T, Y).item()
    assert got == pytest.approx(alpha * mse + (1 - alpha) * ce, rel=1e-5)


def test_ce_matches_formula():
    expected = sum(_ce(s, y) for s, y in zip(S.tolist(), Y.tolist())) / 2
    assert losses.build("ce")(S, None, Y).item() == pytest.approx(expected, rel=1e-6)


def test_kd_gradient_flows_to_student_only():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    losses.build("kd")(s, t.detach(), Y).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name,kwargs,match", [
    ("kdd", {}, "did you mean 'kd'"),
    ("kd", {"temprature": 2}, "did you mean 'temperature'"),
    ("kd", {"alpha": 1.5}, "alpha must be in"),
    ("kd", {"temperature": 0}, "temperature must be > 0"),
])
def test_bad_loss_config_is_a_recipe_error(name, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        losses.build(name, **kwargs)


def test_registry_lists_builtin_losses():
    assert {"kd", "mse", "ce"} <= set(losses.available())
