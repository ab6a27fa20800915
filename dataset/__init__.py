"""Datasets for zero-shot anomaly detection: constants, metadata lists, image/mask loading."""
from .common import PROMPTS, DatasetError, get_dataset_info, get_real_name, load_constants

__all__ = ["ADDataset", "DatasetError", "PROMPTS", "get_dataset_info", "get_real_name", "load_constants",
           "read_metadata", "denormalize", "load_image"]


def __getattr__(name: str):
    # The loader imports torch (seconds); loading it lazily keeps the metadata and synthetic-data
    # command-line tools fast and torch-free.
    if name in ("ADDataset", "read_metadata", "denormalize", "load_image"):
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
