"""Dataset constants (domains, default roots, class real names, prompts), the metadata line format and
the package's error type (all torch-free, for the command-line tools)."""
import copy
import json
from pathlib import Path

from utils.errors import UserError

CONSTANTS_PATH = Path(__file__).with_name("constants.json")


class DatasetError(UserError):
    """Bad dataset input: the message names the file (and line) at fault and says how to fix it."""


REQUIRED_KEYS = ("image_path", "label", "class_name")
RECORD_FORMAT = ("each line must be one JSON object with image_path, label (0/1, or 0.0/1.0), class_name and "
                 "optional mask_path")


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


def parse_record(line: str, where: str) -> dict:
    """One metadata line -> {image_path, mask_path, label, class_name}; a bad line raises DatasetError
    naming `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: invalid JSON ({e.msg}); {RECORD_FORMAT}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}; {RECORD_FORMAT}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}; {RECORD_FORMAT}")
    label, mask_path = obj["label"], obj.get("mask_path") or ""
    # The original's shipped lists write 1.0 and 0.0. The exact type test keeps out bool (an int
    # subclass: `true` in a metadata file is a mistake, not a label); NaN equals neither 0 nor 1.
    if type(label) not in (int, float) or label not in (0, 1):
        raise DatasetError(f"{where}: label must be 0 (normal) or 1 (anomalous), got {label!r}")
    for key in ("image_path", "class_name"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise DatasetError(f"{where}: {key} must be a non-empty string, got {obj[key]!r}")
    if not isinstance(mask_path, str):
        raise DatasetError(f"{where}: mask_path must be a string, \"\" or null, got {mask_path!r}")
    return {"image_path": obj["image_path"], "mask_path": mask_path, "label": int(label),
            "class_name": obj["class_name"]}
