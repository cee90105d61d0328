"""Datasets, their on-disk format, and their loaders (in memory, or from image folders)."""

from .arrays import DataError, Split, load_split, save_split
from .base import Dataset, Loader, LoaderSettings
from .datasets import ImageDataset, data_root, list_datasets, load_dataset
from .folder import FolderDataset, FolderLoader
from .loader import InMemoryLoader

__all__ = [
    "DataError",
    "Dataset",
    "FolderDataset",
    "FolderLoader",
    "ImageDataset",
    "InMemoryLoader",
    "Loader",
    "LoaderSettings",
    "Split",
    "data_root",
    "list_datasets",
    "load_dataset",
    "load_split",
    "save_split",
]
