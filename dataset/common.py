"""Dataset constants (domains, default roots, class real names, prompts), the metadata line format, the
dataset root recorded beside the lists and the package's error type (all torch-free, for the command-line
tools)."""
import copy
import json
import os
import tempfile
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


# Beside a dataset's lists, make_metadata records the folder it read them from: {"root": "<absolute path>"}.
ROOT_FILE = "root.json"


def root_file(metadata_dir: str | Path, dataset: str) -> Path:
    """Where the root of the lists in <metadata_dir>/<dataset>/ is recorded."""
    return Path(metadata_dir) / dataset / ROOT_FILE


def record_root(metadata_dir: str | Path, dataset: str, root: str | Path) -> Path:
    """Record `root` beside the dataset's lists and return the file's path. The path is made absolute so
    that commands run from any folder find it; a temporary file renamed over the old one means a reader
    (a training started meanwhile) never sees half a file."""
    path = root_file(metadata_dir, dataset)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{ROOT_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"root": os.path.abspath(root)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _rebuild_hint(metadata_dir: str | Path, dataset: str) -> str:
    return f"`python -m dataset.make_metadata --dataset {dataset} --root DIR --out_dir {metadata_dir}`"


def recorded_root(metadata_dir: str | Path, dataset: str) -> str | None:
    """The root make_metadata recorded for the lists in <metadata_dir>/<dataset>/; None when none was
    (lists made by hand, or by an older make_metadata)."""
    path = root_file(metadata_dir, dataset)
    fix = f"delete it, or rebuild the lists with {_rebuild_hint(metadata_dir, dataset)}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path} ({e}); {fix}") from None
    try:
        root = json.loads(text)["root"]
    except (json.JSONDecodeError, TypeError, KeyError):  # not JSON, not an object, or no "root" key
        root = None
    if not isinstance(root, str) or not root:
        raise DatasetError(f'{path}: expected {{"root": "DIR"}}, as make_metadata writes it; {fix}')
    return root


def resolve_root(data_root: str | None, metadata_dir: str | Path, dataset: str) -> str:
    """The dataset root: `data_root` when given, else the root recorded beside the lists (`record_root`),
    else the dataset's default root. A recorded root that is gone raises DatasetError naming the file:
    falling back to the default root instead would hide why the data moved, or read another copy of it."""
    if data_root:
        return data_root
    recorded = recorded_root(metadata_dir, dataset)
    if recorded is None:
        return get_dataset_info(dataset)["default_root"]
    if not os.path.isdir(recorded):
        raise DatasetError(f"dataset root not found: {recorded} (recorded in {root_file(metadata_dir, dataset)} "
                           "when the lists were built); pass the dataset folder with --data_root (--root for "
                           f"make_metadata), or record its new place with {_rebuild_hint(metadata_dir, dataset)}")
    return recorded


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
