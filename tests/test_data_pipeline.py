"""The batched loader and the uint8 image cache: same numbers as the per-sample path, decoding done once,
stale caches never read, and bad folders, images and cache files refused with one line and exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from edgekd.cli import cli
from edgekd.data import load_data
from edgekd.data.image_cache import decode_count
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

from conftest import TINY_RECIPE, write_recipe

FORMATS = ("png", "jpg", "webp")


def make_folder(root: Path, classes=("ants", "bees"), per_class: int = 8, seed: int = 0) -> Path:
    """Class folders of small images in mixed formats and sizes."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = 14 + i % 3, 12 + c
            a = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.{FORMATS[i % len(FORMATS)]}")
    return root


def folder_cfg(root: Path, cache_dir: Path | None = None, **kw) -> DataConfig:
    return DataConfig(dataset="folder", path=str(root), image_size=[10, 12],
                      cache_dir=str(cache_dir) if cache_dir else None, **kw)


def batches(data, split: str = "train", **kw) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(data.loader(split, 5, **kw))


def test_batched_loader_equals_per_sample_normalization_bit_for_bit(tmp_path):
    for data in (load_data(DataConfig(dataset="digits"), seed=0),
                 load_data(folder_cfg(make_folder(tmp_path / "img"), tmp_path / "cache"), seed=0)):
        for x, y, pos in batches(data, "val"):
            per_sample = torch.stack([data.val[int(i)][0] for i in pos])
            assert x.dtype == torch.float32
            assert torch.equal(x, per_sample)
            assert y.tolist() == [data.val[int(i)][1] for i in pos]


def test_shuffled_loader_matches_torch_dataloader_order(tmp_path):
    data = load_data(DataConfig(dataset="digits"), seed=0)
    g = torch.Generator()
    g.manual_seed(7)
    reference = [b[2] for b in torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True, generator=g)]
    g.manual_seed(7)
    ours = [b[2] for b in data.loader("train", 64, shuffle=True, generator=g)]
    assert len(ours) == len(reference) and all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_batches_are_normalized_on_the_requested_device():
    # "meta" stands in for an accelerator on this CPU-only machine: every tensor the loader returns must have
    # been created there (a CPU mean/std mixed in would fail or come back on the CPU).
    data = load_data(DataConfig(dataset="digits", limit=200), seed=0)
    x, y, pos = next(iter(data.loader("train", 8, device="meta")))
    assert x.device.type == "meta" and y.device.type == "meta"
    assert x.dtype == torch.float32 and x.shape == (8, 1, 8, 8)


def test_worker_processes_give_the_same_batches(tmp_path):
    data = load_data(folder_cfg(make_folder(tmp_path / "img"), tmp_path / "cache", workers=0), seed=0)
    serial = batches(data)
    data.workers = 1
    parallel = batches(data)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_image_cache_decodes_once_and_matches_uncached_reading(tmp_path):
    root, cache = make_folder(tmp_path / "img"), tmp_path / "cache"
    n = sum(1 for _ in root.rglob("*.*"))
    before = decode_count()
    first = load_data(folder_cfg(root, cache), seed=0)
    assert decode_count() - before == n
    assert len(list(cache.glob("*.npy"))) == 1
    mid = decode_count()
    second = load_data(folder_cfg(root, cache), seed=0)
    assert decode_count() == mid  # the second run decodes nothing
    uncached = load_data(folder_cfg(root, cache, cache=False), seed=0)
    assert second.mean == first.mean == uncached.mean
    for i in range(len(first.test)):
        assert np.array_equal(second.test.raw(i), uncached.test.raw(i))
        assert torch.equal(second.test[i][0], uncached.test[i][0])
    assert isinstance(second.train.read.array(), np.memmap)


@pytest.mark.parametrize("change", ["touch", "replace", "add"])
def test_image_cache_is_rebuilt_when_files_change(tmp_path, change):
    root, cache = make_folder(tmp_path / "img"), tmp_path / "cache"
    first = load_data(folder_cfg(root, cache), seed=0)
    target = root / "ants" / "0.png"
    if change == "touch":
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    elif change == "replace":
        Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(target)
    else:
        Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(root / "bees" / "new.png")
    before = decode_count()
    second = load_data(folder_cfg(root, cache), seed=0)
    assert decode_count() > before
    assert len(list(cache.glob("*.npy"))) == 2
    if change == "replace":  # the new pixels are what the dataset now holds
        assert not np.array_equal(first.train.read(0), second.train.read(0))
        assert np.array_equal(second.train.read(0), np.zeros((3, 10, 12), np.float32))


def test_unreadable_cache_file_is_a_data_error_naming_it(tmp_path):
    root, cache = make_folder(tmp_path / "img"), tmp_path / "cache"
    load_data(folder_cfg(root, cache), seed=0)
    (path,) = cache.glob("*.npy")
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=f"image cache {path} is unreadable"):
        load_data(folder_cfg(root, cache), seed=0)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete it"):
        load_data(folder_cfg(root, cache), seed=0)


def test_fewer_than_two_classes_is_refused(tmp_path):
    root = make_folder(tmp_path / "img", classes=("ants",))
    with pytest.raises(DataError, match="at least two"):
        load_data(folder_cfg(root, tmp_path / "cache"), seed=0)
    (root / "bees").mkdir()  # two folders, but one is empty
    with pytest.raises(DataError, match="only 'ants'.*at least two"):
        load_data(folder_cfg(root, tmp_path / "cache"), seed=0)
    np.savez(tmp_path / "one.npz", x=np.zeros((30, 4), np.float32), y=np.zeros(30, np.int64))
    with pytest.raises(DataError, match="at least two"):
        load_data(DataConfig(dataset="npz", path=str(tmp_path / "one.npz")), seed=0)


def _bad_image(kind: str, root: Path) -> Path:
    target = root / "bees" / "3.jpg"
    if kind == "truncated":
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(target, quality=95)
        target.write_bytes(target.read_bytes()[:300])
    else:
        target.write_bytes(b"this is not a jpeg")
    return target


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
@pytest.mark.parametrize("cached", [True, False])
def test_bad_image_is_a_one_line_exit_2_naming_the_file(tmp_path, kind, cached):
    root = make_folder(tmp_path / "img", per_class=6)
    bad = _bad_image(kind, root)
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["data"] = {"dataset": "folder", "path": str(root), "image_size": [8, 8], "grayscale": True,
                      "cache": cached, "cache_dir": str(tmp_path / "cache")}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    res = CliRunner().invoke(cli, ["distill", str(path), "--out", str(tmp_path / "out"), "-q"])
    msg = res.output.strip()
    assert res.exit_code == 2, res.output
    assert msg.startswith("error: cannot read image") and str(bad) in msg and len(msg.splitlines()) == 1, msg
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True  # no half cache
