"""IDX data sets (raw and gzipped), the built-in Fashion-MNIST, and predefined test splits.

Every IDX file here is written by the test itself: a few hundred tiny images whose class is drawn in the pixels,
so a real distillation on them learns something.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgekd.cli import cli
from edgekd.data import load_data
from edgekd.data.idx import FASHION_MNIST_CLASSES, read_idx
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

from conftest import TINY_RECIPE, write_recipe


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes: magic (0, 0, type 0x08 = uint8, ndim), big-endian dimensions, the values."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def make_images(n: int, classes: int, seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images of ``size``x``size``: class ``c`` lights up row ``c``, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, c % size, :] = 250
    return x, y.astype(np.uint8)


def write_idx_folder(folder: Path, n_train: int = 300, n_test: int = 100, classes: int = 4, gz: bool = True,
                     size: int = 8, test: bool = True) -> Path:
    """The four standard IDX files (gzipped or raw) of a generated data set in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": make_images(n_train, classes, 0, size)}
    if test:
        parts["t10k"] = make_images(n_test, classes, 1, size)
    for prefix, (x, y) in parts.items():
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            name = f"{prefix}-{kind}-idx{dims}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_reads_raw_and_gzipped_files_with_the_t10k_test_split(tmp_path, gz):
    folder = write_idx_folder(tmp_path / "d", gz=gz)
    x_train, y_train = make_images(300, 4, 0)
    x_test, y_test = make_images(100, 4, 1)
    d = load_data(DataConfig(dataset="idx", path=str(folder), val_fraction=0.2), seed=0)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 4 and d.test_split == "predefined"
    assert (len(d.train), len(d.val), len(d.test)) == (240, 60, 100)
    xt, yt = d.test.raw_arrays()
    # the test split is exactly the t10k files, in order, scaled to 0..1
    np.testing.assert_array_equal(yt, y_test)
    np.testing.assert_array_equal(xt[:, 0], x_test.astype(np.float32) / 255.0)
    # train + val are exactly the train file's samples
    seen = np.sort(np.concatenate([d.train.indices, d.val.indices]))
    np.testing.assert_array_equal(seen, np.arange(300))
    # stored as uint8, normalized with statistics of the train split only
    assert d.train.take_raw(np.arange(3)).dtype == np.uint8
    raw = x_train[d.train.indices].astype(np.float32) / 255.0
    assert d.mean[0] == pytest.approx(float(raw.mean()), rel=1e-6)
    desc = d.describe()
    assert desc["test_split"] == "predefined" and "train split" in desc["val_split"]


def test_predefined_test_split_is_the_same_for_every_seed_and_validation_is_not(tmp_path):
    folder = write_idx_folder(tmp_path / "d")
    a, b = (load_data(DataConfig(dataset="idx", path=str(folder)), seed=s) for s in (0, 1))
    np.testing.assert_array_equal(a.test.indices, b.test.indices)
    assert not np.array_equal(a.val.indices, b.val.indices)
    assert set(a.val.indices) <= set(range(300)) and set(b.val.indices) <= set(range(300))
    # `random` ignores the source's own split: the test split then changes with the seed
    r0, r1 = (load_data(DataConfig(dataset="idx", path=str(folder), test_split="random"), seed=s) for s in (0, 1))
    assert r0.test_split == "random" and not np.array_equal(r0.test.indices, r1.test.indices)


def test_limit_keeps_the_test_split_fixed_across_seeds(tmp_path):
    folder = write_idx_folder(tmp_path / "d")
    a, b = (load_data(DataConfig(dataset="idx", path=str(folder), limit=120), seed=s) for s in (0, 1))
    assert len(a.train) + len(a.val) + len(a.test) == 120 and len(a.test) == 30
    np.testing.assert_array_equal(a.test.indices, b.test.indices)
    assert set(a.test.indices) <= set(range(300, 400))
    assert set(a.test.raw_arrays()[1].tolist()) == {0, 1, 2, 3}


def test_explicit_idx_paths_and_a_train_only_source(tmp_path):
    folder = write_idx_folder(tmp_path / "d", gz=False)
    files = {"train_images": str(folder / "train-images-idx3-ubyte"),
             "train_labels": str(folder / "train-labels-idx1-ubyte")}
    d = load_data(DataConfig(dataset="idx", idx=files), seed=0)
    assert d.test_split == "random" and len(d.train) + len(d.val) + len(d.test) == 300
    with pytest.raises(DataError, match="has no test split of its own"):
        load_data(DataConfig(dataset="idx", idx=files, test_split="predefined"), seed=0)
    files.update(test_images=str(folder / "t10k-images-idx3-ubyte"), test_labels=str(folder / "t10k-labels-idx1-ubyte"))
    d = load_data(DataConfig(dataset="idx", idx=files, test_split="predefined"), seed=0)
    assert len(d.test) == 100


def test_npz_with_x_test_and_folder_with_train_and_test_have_predefined_splits(tmp_path):
    x, y = make_images(200, 4, 0)
    xt, yt = make_images(40, 4, 1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    d = load_data(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")), seed=3)
    assert d.test_split == "predefined" and len(d.test) == 40
    np.testing.assert_array_equal(d.test.raw_arrays()[1], yt)
    for split, (imgs, labels) in (("train", (x[:60], y[:60])), ("test", (xt[:20], yt[:20]))):
        for i, (img, c) in enumerate(zip(imgs, labels)):
            (tmp_path / "f" / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "f" / split / f"class{c}" / f"{i}.png")
    f = load_data(DataConfig(dataset="folder", path=str(tmp_path / "f"), grayscale=True,
                             cache_dir=str(tmp_path / "cache")), seed=0)
    assert f.test_split == "predefined" and len(f.test) == 20 and len(f.train) + len(f.val) == 60
    assert f.labels == ["class0", "class1", "class2", "class3"]


def test_fashion_mnist_lookup_order_and_class_names(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "env" / "fashion-mnist", classes=10, n_train=200, n_test=50)
    monkeypatch.setenv("EDGEKD_DATA_DIR", str(tmp_path / "env"))
    d = load_data(DataConfig(dataset="fashion_mnist"), seed=0)
    assert d.labels == FASHION_MNIST_CLASSES and len(d.test) == 50 and d.test_split == "predefined"
    write_idx_folder(tmp_path / "mine", classes=10, n_train=100, n_test=20)
    d = load_data(DataConfig(dataset="fashion_mnist", path=str(tmp_path / "mine")), seed=0)
    assert len(d.test) == 20  # data.path wins over the environment
    with pytest.raises(DataError, match=r"not in .*nowhere.*apt-get install dataset-fashion-mnist"):
        load_data(DataConfig(dataset="fashion_mnist", path=str(tmp_path / "nowhere")), seed=0)


def _corrupt(folder: Path, how: str) -> None:
    name = folder / "train-images-idx3-ubyte"
    data = name.read_bytes()
    if how == "magic":
        name.write_bytes(b"\x12\x34" + data[2:])
    elif how == "truncated":
        name.write_bytes(data[: len(data) - 64])
    elif how == "count":
        x, y = make_images(300, 4, 0)
        (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(y[:290]))
    elif how == "size":
        x, y = make_images(100, 4, 1, size=10)
        (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x))
    elif how == "classes":
        x, y = make_images(100, 4, 1)
        (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.where(y == 3, 7, y)))
    elif how == "swapped":
        name.write_bytes((folder / "train-labels-idx1-ubyte").read_bytes())


@pytest.mark.parametrize("how,match", [
    ("magic", r"is not an IDX file \(magic number 1234"),
    ("truncated", r"train-images-idx3-ubyte is truncated: shape \(300, 8, 8\)"),
    ("count", "holds 300 images but .*train-labels-idx1-ubyte holds 290 labels"),
    ("size", "t10k-images-idx3-ubyte holds 10x10 images but .*train-images-idx3-ubyte holds 8x8"),
    ("classes", "different class sets"),
    ("swapped", "images must be idx3 uint8"),
])
def test_bad_idx_files_name_the_file_and_the_problem(tmp_path, how, match):
    folder = write_idx_folder(tmp_path / "d", gz=False)
    _corrupt(folder, how)
    with pytest.raises(DataError, match=match):
        load_data(DataConfig(dataset="idx", path=str(folder)), seed=0)


def test_bad_gzip_is_named(tmp_path):
    folder = write_idx_folder(tmp_path / "d")
    gz = folder / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        load_data(DataConfig(dataset="idx", path=str(folder)), seed=0)
    gz.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataError, match="is not valid gzip data"):
        read_idx(gz)


def _cli_rows(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = write_idx_folder(tmp_path / "good")
    bad = write_idx_folder(tmp_path / "bad", gz=False)
    _corrupt(bad, "truncated")
    base = ["--set", "data.dataset=idx"]
    return [
        (["--set", f"data.path={bad}"] + base, "train-images-idx3-ubyte is truncated"),
        (["--set", "data.dataset=fashion_mnist", "--set", f"data.path={tmp_path / 'none'}"],
         "fashion_mnist: the four IDX files are not in"),
        (["--set", "data.dataset=digits", "--set", "data.test_split=predefined"], "has no test split of its own"),
        (["--set", f"data.path={good}", "--set", "data.dataset=idx", "--set", "data.test_split=sometimes"],
         "data.test_split"),
    ]


def test_bad_idx_input_on_the_command_line_is_one_line_exit_2_and_writes_nothing(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    for extra, expected in _cli_rows(tmp_path):
        out = tmp_path / "out"
        res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(out), "-q", *extra])
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 2, (extra, res.output)
        assert "Traceback" not in res.output and len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert expected in lines[0], (expected, lines[0])
        assert not out.exists() or not any(out.iterdir()), "a run directory was written"


def test_distill_on_idx_files_records_the_predefined_split(tmp_path):
    folder = write_idx_folder(tmp_path / "d", n_train=400, n_test=120)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out"), "--name", "idx", "-q",
                                   "--set", "data.dataset=idx", "--set", f"data.path={folder}",
                                   "--set", "distill.epochs=3", "--set", "teacher.epochs=3"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "out" / "idx"
    data = json.loads((run / "data.json").read_text())
    assert data["test_split"] == "predefined" and data["splits"]["test"] == 120
    with np.load(run / "eval.npz") as f:
        np.testing.assert_array_equal(f["y"], make_images(120, 4, 1)[1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"]["test_accuracy"] > 0.5  # 4 classes drawn as bright rows: chance is 0.25
