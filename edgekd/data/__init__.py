"""Datasets: built-in ``mnist`` and ``digits``, ``npz`` arrays, image folders and CSV tables.

Every dataset becomes a :class:`DataBundle` with deterministic, stratified train/val/test splits from the
recipe seed, and normalization statistics computed on the train split only.
"""

from edgekd.data.core import DataBundle, IndexedDataset, load_data, split_indices

__all__ = ["DataBundle", "IndexedDataset", "load_data", "split_indices"]
