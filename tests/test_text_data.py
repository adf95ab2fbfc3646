"""Text datasets: CSV/JSONL `text,label`, the built-in byte tokenizer, local tokenizer folders, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_recipe
from edgekd.cli import cli
from edgekd.data import load_data
from edgekd.data.text import ByteTokenizer, get_tokenizer, make_url_dataset, read_rows
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

FIXTURE = Path(__file__).parent / "fixtures" / "urls.csv"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    n = len(text.encode("utf-8")) + 2
    ids = tok.encode(text, max_length=max(n, 3) + 5)
    assert ids.dtype == np.int64 and ids[0] == tok.CLS
    assert ids[n - 1] == tok.SEP and (ids[n:] == tok.PAD).all()
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids.astype(np.float32)) == text  # the dataset stores ids as float32


def test_byte_tokenizer_cuts_long_text_and_known_ids():
    tok = ByteTokenizer()
    ids = tok.encode("http://a.b/" * 10, max_length=8)
    assert ids.tolist() == [1, *[b + 3 for b in b"http:/"], 2]
    assert tok.decode(ids) == "http:/"
    with pytest.raises(DataError, match="max_length must be at least 3"):
        tok.encode("x", max_length=2)


def test_fixture_csv_loads_as_float_token_ids():
    data = load_data(DataConfig(dataset="text", path=str(FIXTURE), max_length=48), seed=0)
    assert data.labels == ["benign", "phishing"]
    assert data.input_shape == (48,) and data.layout == "NF"
    assert data.mean == [0.0] * 48 and data.std == [1.0] * 48  # ids are never standardized
    x, y, _ = data.train[0]
    assert x.dtype.is_floating_point and (x == x.round()).all() and x[0] == ByteTokenizer.CLS
    raw_x, raw_y = data.test.raw_arrays()
    url = ByteTokenizer().decode(raw_x[0])
    assert url.startswith("http")
    assert ("https://www." in url) == (data.labels[raw_y[0]] == "benign")


def test_jsonl_with_other_column_names(tmp_path):
    rows = [{"url": f"https://site{i}.com/x" if i % 2 else f"http://1.2.3.{i}/login", "y": i % 2} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_data(DataConfig(dataset="text", path=str(path), text_column="url", label_column="y",
                                max_length=32), seed=0)
    assert data.labels == ["0", "1"] and len(data.train) + len(data.val) + len(data.test) == 40
    assert read_rows(path)[1] == rows[1]


def test_unknown_label_column_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"has no column 'target' \(columns: text, label\)"):
        load_data(DataConfig(dataset="text", path=str(FIXTURE), label_column="target"), seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_data(DataConfig(dataset="text", path=str(bad)), seed=0)
    with pytest.raises(DataError, match="must end in"):
        read_rows(tmp_path / "x.txt")


def test_unknown_label_column_on_the_cli_is_one_line_exit_2(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "t", "data": {"dataset": "text", "path": str(FIXTURE), "label_column": "target"},
        "teacher": {"model": "hf_bert", "epochs": 1}, "student": {"model": "hf_bert"}})
    res = CliRunner().invoke(cli, ["distill", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith("error: text file") and "no column 'target'" in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="neither `bytes` nor an existing local directory"):
        get_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        get_tokenizer(str(tmp_path / "empty"))


def test_local_wordpiece_tokenizer_folder(tmp_path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "http", "https", ":", "/", ".", "com", "login", "www"]
    BertTokenizer(vocab={v: i for i, v in enumerate(vocab)}).save_pretrained(tmp_path / "tok")
    tok = get_tokenizer(str(tmp_path / "tok"))
    ids = tok.encode("https://www.login.com", 12)
    assert ids.tolist()[:9] == [2, 6, 7, 8, 8, 12, 9, 11, 9] and ids[-1] == 0
    assert tok.pad_token_id == 0 and tok.vocab_size == len(vocab)


def test_generated_dataset_is_balanced(tmp_path):
    path = make_url_dataset(tmp_path / "u.csv", n=50, seed=1)
    rows = read_rows(path)
    assert len(rows) == 50 and sum(r["label"] == "phishing" for r in rows) == 25
