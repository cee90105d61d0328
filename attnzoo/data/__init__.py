"""Datasets, their on-disk format, and the in-memory loader."""

from .arrays import DataError, Split, load_split, save_split
from .datasets import ImageDataset, data_root, list_datasets, load_dataset
from .loader import InMemoryLoader

__all__ = [
    "DataError",
    "ImageDataset",
    "InMemoryLoader",
    "Split",
    "data_root",
    "list_datasets",
    "load_dataset",
    "load_split",
    "save_split",
]
