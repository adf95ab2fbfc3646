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


# -- feature, relation, DKD and combined losses: each against plain-Python arithmetic on fixed tensors -----

def _huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _sub(a, b):
    return [x - y for x, y in zip(a, b)]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_dkd_matches_hand_computed_formula():
    temp, alpha, beta = 2.0, 0.5, 3.0
    tckd = nckd = 0.0
    for s, t, y in zip(S.tolist(), T.tolist(), Y.tolist()):
        ps, pt = _softmax(s, temp), _softmax(t, temp)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        # Non-target distribution: the other classes renormalized (equal to a softmax over them).
        qs = [p / (1 - ps[y]) for j, p in enumerate(ps) if j != y]
        qt = [p / (1 - pt[y]) for j, p in enumerate(pt) if j != y]
        nckd += _kl(qt, qs)
    ce = sum(_ce(s, y) for s, y in zip(S.tolist(), Y.tolist())) / 2
    expected = ce + temp ** 2 * (alpha * tckd / 2 + beta * nckd / 2)
    got = losses.build("dkd", temperature=temp, alpha=alpha, beta=beta)(S, T, Y)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_warmup_scales_only_the_kd_part():
    loss = losses.build("dkd", warmup_epochs=4)
    ce = losses.build("ce")(S, None, Y).item()
    full = losses.build("dkd")(S, T, Y).item() - ce
    loss.on_epoch_start(0)
    assert loss(S, T, Y).item() - ce == pytest.approx(full / 4, rel=1e-5)
    loss.on_epoch_start(10)
    assert loss(S, T, Y).item() - ce == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        loss(S, T, None)


def test_fitnets_identity_and_learned_projection_with_pooling():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])          # (1, 1, 2, 2)
    t = torch.tensor([[[[0.0]], [[1.0]]]])                  # (1, 2, 1, 1): wider and smaller
    loss = losses.build("fitnets", student_layer="a", teacher_layer="b", beta=2.0, ce_weight=0.0)
    loss.setup({"a": (1, 2, 2)}, {"b": (2, 1, 1)})
    assert isinstance(loss.projections[0], torch.nn.Conv2d)
    with torch.no_grad():
        loss.projections[0].weight.copy_(torch.tensor([3.0, -1.0]).view(2, 1, 1, 1))
    # r(s) = [3 s, -s] pooled to 1x1 = [7.5, -2.5]; MSE vs [0, 1] = (7.5^2 + 3.5^2) / 2.
    expected = 2.0 * (7.5 ** 2 + 3.5 ** 2) / 2
    got = loss(S[:1], T[:1], None, features=losses.Features({"a": s}, {"b": t}))
    assert got.item() == pytest.approx(expected, rel=1e-6)

    same = losses.build("fitnets", student_layer="a", teacher_layer="b")
    same.setup({"a": (1, 2, 2)}, {"b": (1, 2, 2)})
    assert isinstance(same.projections[0], torch.nn.Identity)
    t2 = torch.tensor([[[[1.0, 0.0], [1.0, 2.0]]]])
    mse = (0 + 4 + 4 + 4) / 4
    ce = _ce(S.tolist()[0], 0)
    got = same(S[:1], T[:1], Y[:1], features=losses.Features({"a": s}, {"b": t2}))
    assert got.item() == pytest.approx(mse + ce, rel=1e-6)


def test_fitnets_flat_features_get_a_linear_projection_and_bad_shapes_fail():
    loss = losses.build("fitnets", student_layer="a", teacher_layer="b")
    loss.setup({"a": (4,)}, {"b": (6,)})
    assert isinstance(loss.projections[0], torch.nn.Linear) and loss.projections[0].weight.shape == (6, 4)
    with pytest.raises(ValueError, match="pair two conv maps"):
        losses.build("fitnets", student_layer="a", teacher_layer="b").setup({"a": (4,)}, {"b": (2, 3, 3)})
    with pytest.raises(RecipeError, match="needs student_layer"):
        losses.build("fitnets")


def test_attention_transfer_matches_hand_computed_formula():
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, 1.0]]]])                # (1, 1, 1, 2): channel counts differ
    qs = [(1 + 9) / 2, (4 + 0) / 2]
    qt = [4.0, 1.0]
    qs = [v / _norm(qs) for v in qs]
    qt = [v / _norm(qt) for v in qt]
    beta = 1000.0
    expected = beta / 2 * sum((a - b) ** 2 for a, b in zip(qs, qt)) / 2
    loss = losses.build("at", student_layer="x", teacher_layer="y", ce_weight=0.0)
    loss.setup({"x": (2, 1, 2)}, {"y": (1, 1, 2)})
    got = loss(S[:1], T[:1], None, features=losses.Features({"x": s}, {"y": t}))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="must both give"):
        losses.build("at", student_layer="x", teacher_layer="y").setup({"x": (4,)}, {"y": (1, 2, 2)})


ES = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
ET = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]


def _rkd_distance(e):
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    d = [_norm(_sub(e[i], e[j])) for i, j in pairs]
    mu = sum(d) / len(d)
    return [x / mu for x in d]


def _rkd_angle(e):
    out = []
    for j in range(3):
        for i in range(3):
            for k in range(3):
                if i == j or k == j:
                    continue
                a, b = _sub(e[i], e[j]), _sub(e[k], e[j])
                out.append(_dot(a, b) / (_norm(a) * _norm(b)))
    return out


def test_rkd_distance_and_angle_match_hand_computed_formula():
    dist = sum(_huber(a - b) for a, b in zip(_rkd_distance(ES), _rkd_distance(ET))) / 6
    angle = sum(_huber(a - b) for a, b in zip(_rkd_angle(ES), _rkd_angle(ET))) / 12
    loss = losses.build("rkd", distance_weight=25.0, angle_weight=50.0, ce_weight=0.0)
    assert not loss.needs_features and not loss.needs_labels  # on logits: no hooks, cacheable teacher
    got = loss(torch.tensor(ES), torch.tensor(ET), None)
    assert got.item() == pytest.approx(25 * dist + 50 * angle, rel=1e-5)
    assert dist > 0 and angle > 0
    # Scale invariance of the distance potential: a scaled teacher gives the same loss.
    assert loss(torch.tensor(ES), 7 * torch.tensor(ET), None).item() == pytest.approx(got.item(), rel=1e-5)


def test_sp_matches_hand_computed_formula():
    qs = [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]
    qt = [[1.0, 1.0], [2.0, 0.0]]

    def g(q):
        rows = [[_dot(a, b) for b in q] for a in q]
        return [[v / _norm(r) for v in r] for r in rows]

    gs, gt = g(qs), g(qt)
    expected = 3000.0 * sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    got = losses.build("sp", ce_weight=0.0)(torch.tensor(qs), torch.tensor(qt), None)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_pkt_matches_hand_computed_formula():
    xs = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    xt = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]

    def cond(x):
        k = [[(_dot(a, b) / (_norm(a) * _norm(b)) + 1) / 2 for b in x] for a in x]
        out = []
        for i in range(3):
            row = [k[i][j] for j in range(3) if j != i]
            out.append([v / sum(row) for v in row])
        return out

    ps, pt = cond(xs), cond(xt)
    expected = sum(_kl(pt[i], ps[i]) for i in range(3)) / 3
    got = losses.build("pkt", beta=1.0, ce_weight=0.0)(torch.tensor(xs), torch.tensor(xt), None)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_combined_is_the_weighted_sum_of_its_terms():
    terms = [{"name": "kd", "weight": 0.7, "temperature": 3.0, "alpha": 1.0},
             {"name": "rkd", "weight": 0.3, "ce_weight": 1.0}]
    loss = losses.build("combined", terms=terms)
    temp = 3.0
    kl = sum(_kl(_softmax(t, temp), _softmax(s, temp)) for s, t in zip(S.tolist(), T.tolist())) / 2
    ce = sum(_ce(s, y) for s, y in zip(S.tolist(), Y.tolist())) / 2
    rkd = losses.build("rkd", ce_weight=0.0)(S, T, None).item()
    assert loss(S, T, Y).item() == pytest.approx(0.7 * temp ** 2 * kl + 0.3 * (rkd + ce), rel=1e-5)
    assert loss.label_weight == pytest.approx(0.3) and loss.needs_labels and not loss.needs_features


def test_combined_with_features_collects_layers_and_needs_them():
    loss = losses.build("combined", terms=[{"name": "kd", "alpha": 1.0},
                                           {"name": "fitnets", "student_layer": "a", "teacher_layer": "b"},
                                           {"name": "at", "student_layer": "a", "teacher_layer": "c",
                                            "ce_weight": 0}])
    assert loss.needs_features and loss.feature_layers() == [("a", "b"), ("a", "c")]
    with pytest.raises(ValueError, match="call it with features="):
        loss.setup({"a": (2, 2, 2)}, {"b": (2, 2, 2), "c": (3, 2, 2)})
        loss(S, T, Y)


@pytest.mark.parametrize("terms,match", [
    ([{"name": "kd", "weight": -1}], "finite number >= 0"),
    ([{"name": "kd", "weight": 0}, {"name": "rkd", "weight": 0.0}], "sum to 0"),
    ([{"name": "kd", "weight": float("nan")}], "finite number >= 0"),
    ([{"name": "kd", "weight": "heavy"}], "must be a number"),
    ([{"name": "kd", "alpha": 0.9}, {"name": "fitnets", "student_layer": "a", "teacher_layer": "b"}],
     "CE\\(s, y\\) is counted in 2 terms"),
    ([{"name": "kd"}, {"name": "fitnet"}], "did you mean 'fitnets'"),
    ([{"name": "combined", "terms": []}], "cannot themselves be combined"),
    ([], "needs terms"),
])
def test_combined_rejects_bad_terms_and_weights(terms, match):
    with pytest.raises(RecipeError, match=match):
        losses.build("combined", terms=terms)


def test_every_registered_loss_cites_its_source_and_is_listed():
    names = set(losses.available())
    assert {"kd", "mse", "ce", "dkd", "fitnets", "at", "rkd", "sp", "pkt", "combined"} <= names
    for name in names - {"ce", "combined"}:
        doc = losses.get_loss(name).__doc__
        assert "loss" in doc and any(str(y) in doc for y in range(2014, 2023)), name
