"""Dataset constants (domains, default roots, class real names, prompts) and the package's error type."""
import copy
import json
from pathlib import Path

CONSTANTS_PATH = Path(__file__).with_name("constants.json")


class DatasetError(Exception):
    """Bad dataset input: the message names the file (and line) at fault and says how to fix it."""


def load_constants() -> dict:
    """Return the parsed dataset/constants.json (a fresh copy, safe to modify)."""
    return copy.deepcopy(_CONSTANTS)


def _read_constants() -> dict:
    with open(CONSTANTS_PATH, encoding="utf-8") as f:
        return json.load(f)


_CONSTANTS = _read_constants()
PROMPTS: dict[str, list[str]] = _CONSTANTS["prompts"]


def _lookup(name: str) -> dict | None:
    # Case-insensitive so that `--dataset mvtec` still finds the MVTec real names and domain
    # instead of silently falling back to the generic defaults.
    datasets = _CONSTANTS["datasets"]
    if name in datasets:
        return datasets[name]
    matches = [v for k, v in datasets.items() if k.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def get_dataset_info(name: str) -> dict:
    """Return {"domain", "default_root", "classes": {class: real name}} for a dataset.

    Datasets not in the constants are allowed: Industrial domain, root ./data/<name>, no classes.
    """
    info = _lookup(name)
    if info is None:
        return {"domain": "Industrial", "default_root": f"./data/{name}", "classes": {}}
    return copy.deepcopy(info)


def get_real_name(dataset: str, class_name: str) -> str:
    """Return the text-prompt name of a class: the constants' real name, else underscores -> spaces."""
    info = _lookup(dataset)
    if info is not None and class_name in info["classes"]:
        return info["classes"][class_name]
    return class_name.replace("_", " ")
