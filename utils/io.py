"""Files the runs write and read: atomic checkpoint writes, output folders, checkpoints, logs."""
from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from utils.distributed import is_main
from utils.errors import UserError


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Runs `write` on a temporary file in `path`'s folder, then renames it to `path` atomically, so a
    reader (or a crash, or a full disk) never sees a half-written file: `path` is the old file or the new
    one. The file gets the mode a plain open() would give (mkstemp makes it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    return umask


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `_atomic_write`: a crash mid-write never leaves a truncated checkpoint."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Writes `data` to `path` through `_atomic_write`."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | Path) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(text.encode("utf-8"), path)


def write_output(data: str | bytes, path: str | Path, flag: str, shown: str | Path | None = None) -> None:
    """An output file (table, JSON, CSV, args.json) written atomically; an OSError (a full disk, a
    read-only folder) becomes a `UserError` naming the file (`shown`: the name to give, for a file in a
    staging folder), and the old file, if any, stays as it was."""
    try:
        atomic_write_bytes(data.encode("utf-8") if isinstance(data, str) else data, path)
    except OSError as e:
        raise UserError(f"cannot write {shown or path} ({e.strerror or e}); free some space or choose another "
                        f"{flag}, then rerun") from None


class OutputFolder:
    """Writes into a staging folder (`staged_dir`) files that errors name as they will be in `final`."""

    def __init__(self, stage: Path, final: Path, flag: str):
        self.stage, self.final, self.flag = stage, final, flag

    def write(self, relative: str | Path, data: str | bytes) -> None:
        path = self.stage / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_output(data, path, self.flag, shown=self.final / relative)


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


def _remove_empty_dirs(dirs: list[Path]) -> None:
    """Removes `dirs` (deepest last in the list, so removed in reverse) where they are empty."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass


def _publish(files: Path, target: Path, shown: Path, flag: str, backups: Path) -> None:
    """Moves the files under `files` into `target`. A missing `target` is the whole folder renamed at once;
    into an existing one file by file (`os.replace`), the files it replaced kept (hard links, or the files
    themselves) under `backups` until all are in, so that a failing move puts everything back."""
    if not target.exists():
        try:
            os.rename(files, target)
            return
        except OSError as e:
            raise UserError(f"cannot write to output folder {shown} ({e.strerror}); nothing was written: choose "
                            f"another {flag}") from None
    if not target.is_dir():
        raise UserError(f"{flag} {shown} is a file, not a folder; choose another {flag}")
    done: list[tuple[Path, Path, Path | None]] = []  # (staged file, its place in target, the file it replaced)
    made: list[Path] = []  # folders created in target
    dst = target
    try:
        for src in sorted(p for p in files.rglob("*") if not p.is_dir()):
            rel = src.relative_to(files)
            dst = target / rel
            for d in reversed(dst.parents[:len(rel.parts) - 1]):  # the folders between target and dst
                if not d.is_dir():
                    d.mkdir()
                    made.append(d)
            old = None
            if dst.exists() or dst.is_symlink():
                old = backups / rel
                old.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(dst, old, follow_symlinks=False)  # dst stays in place until replaced below
                except OSError:
                    os.replace(dst, old)
            done.append((src, dst, old))
            os.replace(src, dst)
    except BaseException as e:  # an OSError, or Ctrl-C in the middle: put everything back
        for src, placed, old in reversed(done):
            try:
                if src.exists() or src.is_symlink():  # not moved yet: only its backup was taken
                    if old is not None and not (placed.exists() or placed.is_symlink()):
                        os.replace(old, placed)
                    continue
                if old is not None:
                    os.replace(old, placed)
                else:
                    placed.unlink()
            except OSError:
                pass
        _remove_empty_dirs(made)
        if not isinstance(e, OSError):
            raise
        raise UserError(f"cannot write {shown / dst.relative_to(target)} ({e.strerror}); {shown} is left as it "
                        f"was: free some space, or choose another {flag}") from None


def _new_hidden_dir(parent: Path, name: str) -> Path:
    """A new folder `parent/.<name>.<random>.partial`."""
    while True:
        d = parent / f".{name[:100]}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue


@contextmanager
def staged_dir(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """An output folder written all at once: yields an empty folder beside `path` (so on the same file
    system) to write everything into; when the block ends without an error its files are moved into
    `path`, else they are deleted. Either all of them appear in `path` or none, and a failed run
    leaves no file and no folder behind (the folders it made above `path` included). A file of an
    existing `path` that the block also wrote is replaced, the others are kept.

    OSErrors of making the folders and of moving the files become a `UserError` that names the path and
    `flag`; the block itself should turn its write errors into `UserError`s that name the final path."""
    shown = Path(path)
    target = Path(os.path.abspath(shown))
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {shown} is a file, not a folder; choose another {flag}")
    for folder in (target.parent, target):  # what runs killed while writing here left
        if folder.is_dir():
            remove_stale_temporaries(folder)
    made = [p for p in target.parents if not p.exists()][::-1]  # top-down
    stage = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            stage = _new_hidden_dir(target.parent, target.name)
        except PermissionError:  # a folder of one's own in a read-only one: stage inside it
            if not target.is_dir():
                raise
            stage = _new_hidden_dir(target, target.name)
        (stage / "files").mkdir()
    except OSError as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        _remove_empty_dirs(made)
        raise UserError(f"cannot write to output folder {shown} ({e.strerror}); choose another {flag}") from None
    ok = False
    try:
        yield stage / "files"
        _publish(stage / "files", target, shown, flag, stage / "replaced")
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:
            _remove_empty_dirs(made)


class _LogFile(logging.FileHandler):
    """The log file. On a full disk a plain FileHandler prints a traceback for every message; this one
    stays quiet: the console copy goes on, and the run's own writes stop it with one `error:` line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


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
    file_handler = _LogFile(Path(save_dir) / f"{name}.log")
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


class RunLock:
    """An exclusive lock on a run folder for a training's lifetime (`<folder>/.lock`, holding the PID).
    The kernel drops a `flock` when its process dies, so a lock left by a killed run never blocks."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.file = None

    def acquire(self) -> RunLock:
        """Takes the lock (the file is left as it is) or raises a `UserError` naming the holder's PID."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"another training (PID {holder}) is using {self.path.parent}; wait for it to finish, "
                            "or train into another --save_path") from None
        self.file = f
        return self

    def record_pid(self) -> None:
        """Writes this process's PID for the message of a run that finds the folder locked; called once the
        run is validated, so a rerun that stops on an error changes nothing in the folder."""
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


# `.<name>.<pid>.<random>.tmp` (`_atomic_write`) and `.<name>.<pid>.<random>.partial` (`staged_dir`).
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.\w+\.(tmp|partial)$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Deletes the temporary files and staging folders in `folder` whose writer is gone (a process killed
    while writing); their names carry the writer's PID, so a live writer's are kept. Returns them."""
    stale = []
    for p in Path(folder).glob(".*"):
        m = _TEMPORARY.match(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        stale.append(p)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
