import numpy as np
import pytest
from PIL import Image

from edgekd.data import load_data, split_indices
from edgekd.errors import DataError
from edgekd.recipe import DataConfig


def test_mnist_is_the_real_5k_digits():
    d = load_data(DataConfig(dataset="mnist"), seed=0)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.layout == "NCHW"
    assert len(d.train) + len(d.val) + len(d.test) == 5000
    assert len(d.test) == 1000
    x, y = d.test.raw_arrays()
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y).tolist() == [100] * 10  # stratified: 500 per class, 20% each


def test_splits_are_deterministic_disjoint_and_seed_dependent():
    y = np.repeat(np.arange(5), 40)
    a = split_indices(y, 0.1, 0.2, seed=3)
    b = split_indices(y, 0.1, 0.2, seed=3)
    c = split_indices(y, 0.1, 0.2, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[2], c[2])
    tr, va, te = a
    assert len(set(tr) | set(va) | set(te)) == len(y) == len(tr) + len(va) + len(te)
    assert np.bincount(y[te]).tolist() == [8] * 5


def test_normalization_uses_train_split_only():
    d = load_data(DataConfig(dataset="digits"), seed=0)
    raw = np.stack([d.train.raw(i) for i in range(len(d.train))])
    assert d.mean[0] == pytest.approx(float(raw.mean()), rel=1e-5)
    assert d.std[0] == pytest.approx(float(raw.std()), rel=1e-4)
    xs = np.stack([d.train[i][0].numpy() for i in range(len(d.train))])
    assert abs(xs.mean()) < 1e-4 and xs.std() == pytest.approx(1.0, rel=1e-3)


def test_limit_keeps_every_class():
    d = load_data(DataConfig(dataset="mnist", limit=300), seed=0)
    assert len(d.train) + len(d.val) + len(d.test) == 300
    _, y = d.test.raw_arrays()
    assert set(y.tolist()) == set(range(10))


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(60, 6, 6), dtype=np.uint8)
    y = np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_data(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")), seed=0)
    assert d.input_shape == (1, 6, 6) and d.num_classes == 3
    xr, _ = d.test.raw_arrays()
    assert xr.max() <= 1.0  # uint8 pixels scaled to [0, 1]


def test_npz_string_labels_and_tabular(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    y = np.array(["cat", "dog"] * 20)
    np.savez(tmp_path / "t.npz", x=x, y=y)
    d = load_data(DataConfig(dataset="npz", path=str(tmp_path / "t.npz")), seed=0)
    assert d.labels == ["cat", "dog"] and d.layout == "NF" and d.input_shape == (5,)
    assert len(d.mean) == 5


def test_csv_dataset(tmp_path):
    rows = ["a,b,label"] + [f"{i},{i * 2 % 7},{'yes' if i % 2 else 'no'}" for i in range(30)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    d = load_data(DataConfig(dataset="csv", path=str(tmp_path / "d.csv")), seed=0)
    assert d.input_shape == (2,) and d.labels == ["no", "yes"]


def test_image_folder_is_streamed_and_resized(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("ants", "bees"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            size = (20 + i, 16) if cls == "ants" else (16, 16)
            Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataConfig(dataset="folder", path=str(tmp_path), image_size=[12, 10]), seed=0)
    assert d.labels == ["ants", "bees"]
    assert d.input_shape == (3, 12, 10)
    assert d.train[0][0].shape == (3, 12, 10)
    assert len(d.mean) == 3


@pytest.mark.parametrize("cfg,match", [
    (dict(dataset="minst"), "did you mean 'mnist'"),
    (dict(dataset="npz"), "needs data.path"),
    (dict(dataset="npz", path="/nonexistent.npz"), "does not exist"),
])
def test_bad_data_config(cfg, match):
    with pytest.raises(DataError, match=match):
        load_data(DataConfig(**cfg), seed=0)


def test_image_folder_needs_classes_and_images(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="needs one sub-folder per class"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path)), seed=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path)), seed=0)


def test_npz_missing_arrays_and_corrupt(tmp_path):
    np.savez(tmp_path / "a.npz", inputs=np.zeros((20, 3)))
    with pytest.raises(DataError, match="arrays named 'x' and 'y'"):
        load_data(DataConfig(dataset="npz", path=str(tmp_path / "a.npz")), seed=0)
    (tmp_path / "b.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(DataConfig(dataset="npz", path=str(tmp_path / "b.npz")), seed=0)
