"""Text classification data: CSV or JSONL files of ``text`` and ``label``, tokenized to fixed-length ids.

Samples are token ids stored as float32 vectors of ``data.max_length`` (exact below 2**24), so text flows through
the same datasets, exporters and runtimes as feature vectors (layout ``NF``); ``hf_bert`` / ``hf_text`` models
cast them back to int64. Normalization is never applied to ids.

Tokenizers:

* ``bytes`` (default, no download): the UTF-8 bytes of the text, see :class:`ByteTokenizer`. Suited to URLs and
  other short strings where words mean little (the phishing-URL example).
* a local directory holding a Hugging Face tokenizer (``tokenizer.json`` / ``vocab.txt``...), loaded with
  ``local_files_only=True``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.data.common import label_names, need_path
from edgekd.errors import DataError

TEXT_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ByteTokenizer:
    """A byte-level tokenizer: ``[CLS] utf-8 bytes [SEP] [PAD]...``; needs no vocabulary file.

    Ids: 0 = padding, 1 = ``[CLS]`` (start), 2 = ``[SEP]`` (end), ``3 + b`` = byte ``b``. ``vocab_size`` is 259.
    Text longer than ``max_length - 2`` bytes is cut (at a byte, so :meth:`decode` drops a partial character).
    """

    PAD, CLS, SEP, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET
    pad_token_id = PAD

    def encode(self, text: str, max_length: int) -> np.ndarray:
        """Ids of ``text``, padded or cut to ``max_length`` (int64)."""
        if max_length < 3:
            raise DataError(f"data.max_length must be at least 3 for the bytes tokenizer, got {max_length}")
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: max_length - 2].astype(np.int64) + self.OFFSET
        ids = np.full(max_length, self.PAD, dtype=np.int64)
        ids[0] = self.CLS
        ids[1: 1 + len(body)] = body
        ids[1 + len(body)] = self.SEP
        return ids

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """The text of ``ids`` (special ids and padding skipped)."""
        raw = bytes(int(i) - self.OFFSET for i in np.asarray(ids).round().astype(np.int64) if i >= self.OFFSET)
        return raw.decode("utf-8", errors="ignore")


class _HFTokenizer:
    """A Hugging Face tokenizer from a local directory, with the :class:`ByteTokenizer` interface."""

    def __init__(self, path: Path):
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise DataError(f"cannot load the tokenizer in {path}: {first}",
                            "data.tokenizer must be a local folder written by save_pretrained, or `bytes`") from e
        self.vocab_size = len(self.tok)
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def encode(self, text: str, max_length: int) -> np.ndarray:
        ids = self.tok(text, max_length=max_length, truncation=True, padding="max_length")["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def get_tokenizer(spec: str | None) -> ByteTokenizer | _HFTokenizer:
    """``bytes`` (or None) → :class:`ByteTokenizer`; a directory → its Hugging Face tokenizer."""
    if spec in (None, "", "bytes", "char"):
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise DataError(f"data.tokenizer {spec!r} is neither `bytes` nor an existing local directory",
                        "use `bytes`, or a folder holding tokenizer files (nothing is downloaded)")
    return _HFTokenizer(path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (with a header) or JSONL file as dicts."""
    kind = TEXT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"text file {path} must end in {', '.join(TEXT_SUFFIXES)}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if kind == "jsonl":
                rows = []
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {n} is not JSON ({e.msg})") from e
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {n} is not a JSON object")
                    rows.append(row)
                return rows
            return list(csv.DictReader(f, delimiter="\t" if kind == "tsv" else ","))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read text file {path}: {e}") from e


def read_text(cfg) -> tuple[Callable[[int], np.ndarray], int, np.ndarray, list[str], str]:
    """The ``text`` dataset reader: ``(read(i), n, labels, label names, source)`` like the other readers."""
    path = need_path(cfg)
    rows = read_rows(path)
    if not rows:
        raise DataError(f"text file {path} holds no rows")
    columns = list(rows[0].keys())
    for role, col in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if col not in columns:
            raise DataError(f"text file {path} has no column {col!r} (columns: {', '.join(map(str, columns))})",
                            f"set data.{role}")
    texts, raw_labels = [], []
    for n, row in enumerate(rows, start=1):
        text, label = row.get(cfg.text_column), row.get(cfg.label_column)
        if text is None or label is None or str(label).strip() == "":
            raise DataError(f"text file {path} row {n} has no {cfg.text_column!r} or {cfg.label_column!r} value")
        texts.append(str(text))
        raw_labels.append(str(label).strip())
    tok = get_tokenizer(cfg.tokenizer)
    ids = np.stack([tok.encode(t, cfg.max_length) for t in texts]).astype(np.float32)
    y, names = label_names(np.asarray(raw_labels))
    name = "bytes" if isinstance(tok, ByteTokenizer) else str(cfg.tokenizer)
    return (lambda i: ids[i]), len(ids), y, names, f"text {path} (tokenizer {name}, max_length {cfg.max_length})"


def make_url_dataset(path: Path, n: int = 600, seed: int = 0) -> Path:
    """Write a made-up phishing-like URL dataset (``text,label`` CSV) for tests and the tiny recipe.

    Benign URLs use common hosts and short paths; "phishing" ones use look-alike hosts, IP addresses, many
    sub-domains, ``@`` and login words, which a character model can learn in a few epochs.
    """
    rng = np.random.default_rng(seed)
    brands = ["paypal", "apple", "amazon", "google", "microsoft", "netflix", "bank", "github"]
    tlds = ["com", "org", "net", "io", "de"]
    words = ["docs", "about", "blog", "news", "help", "shop", "search", "product", "item", "page"]
    bad_words = ["login", "verify", "secure", "update", "account", "signin", "confirm", "wallet"]
    rows = []
    for i in range(n):
        b = str(rng.choice(brands))
        if i % 2 == 0:
            path_part = "/".join(str(w) for w in rng.choice(words, size=rng.integers(0, 3)))
            url = f"https://www.{b}.{rng.choice(tlds)}/{path_part}"
            label = "benign"
        else:
            style = rng.integers(0, 3)
            bw = str(rng.choice(bad_words))
            if style == 0:
                url = f"http://{b}-{bw}.{rng.choice(tlds)}.{rng.integers(10, 99)}x.ru/{bw}.php?id={rng.integers(1e5)}"
            elif style == 1:
                url = f"http://{rng.integers(1, 255)}.{rng.integers(1, 255)}.{rng.integers(1, 255)}.{rng.integers(1, 255)}/{b}/{bw}"
            else:
                url = f"http://{b}.com@{bw}-{b}.support-{rng.integers(100, 999)}.top/{bw}"
            label = "phishing"
        rows.append((url, label))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path
