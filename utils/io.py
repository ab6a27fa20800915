"""Files the runs write and read: atomic checkpoint writes, output folders, checkpoints, logs."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.distributed import is_main
from utils.errors import UserError


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through a temporary file in the same folder and an atomic rename,
    so a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: str | Path, flag: str = "--save_path") -> Path:
    """Creates `path` and checks that files can be written there; `flag` names the option in the message."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path} ({e.strerror}); choose another {flag}") from None
    return path


def setup_logger(save_dir: str | Path, name: str) -> logging.Logger:
    """A logger that writes to `<save_dir>/<name>.log` (appending, so a resumed run keeps its history)
    and to stdout; under torchrun only on rank 0, the other ranks get a logger that drops everything."""
    if not is_main():
        silent = logging.getLogger(f"aaclip.{name}.silent")
        silent.propagate = False
        if not silent.handlers:
            silent.addHandler(logging.NullHandler())
        return silent
    logger = logging.getLogger(f"aaclip.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    file_handler = logging.FileHandler(Path(save_dir) / f"{name}.log")
    stream_handler = logging.StreamHandler(sys.stdout)
    for h in (file_handler, stream_handler):
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def load_checkpoint(path: str | Path) -> dict:
    """Reads a training checkpoint (a dict of state dicts); a damaged file is a `UserError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found") from None
    except Exception as e:  # truncated zip, pickle errors, ...
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); it is damaged (an interrupted copy?): "
                        "delete it to retrain, or copy it again") from None
    if not isinstance(ckpt, dict) or "epoch" not in ckpt:
        raise UserError(f"{path} is not an AA-CLIP training checkpoint (no 'epoch' entry)")
    return ckpt


def load_module_state(module: torch.nn.Module, ckpt: dict, key: str, path: str | Path) -> None:
    """`module.load_state_dict(ckpt[key])` with a clear message when the checkpoint is of another kind
    or shape."""
    if key not in ckpt:
        raise UserError(f"{path} has no '{key}' entry (it holds {sorted(ckpt)}); it was written by another "
                        "variant of the training script")
    try:
        module.load_state_dict(ckpt[key])
    except RuntimeError as e:
        detail = "; ".join(s.strip() for s in str(e).splitlines()[1:3])
        raise UserError(f"'{key}' in {path} does not fit this model ({detail}); it was trained with another "
                        "--model or other adapter flags (--relu, --levels, ...)") from None
