"""Small shared helpers: user-facing errors, atomic checkpoint writes, logging, seeding, devices, and the
torchrun (torch.distributed) plumbing shared by training and evaluation."""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from dataset.common import DatasetError


class UserError(Exception):
    """A problem the user can fix (bad file, flag, dataset). CLIs print its message without a traceback.

    `all_ranks`: under torchrun, whether every rank raised this same error (then only rank 0 prints it);
    None: yes before the process group exists (every rank runs the same validation), no after."""

    def __init__(self, message: str, all_ranks: bool | None = None):
        super().__init__(message)
        self.all_ranks = all_ranks


RANDOM_WEIGHTS_BANNER = "RANDOM BACKBONE WEIGHTS (--pretrained none): these numbers say nothing about AA-CLIP"


def own_message(e: Exception) -> str:
    """The exception's message without the traceback text that a DataLoader worker's error carries
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ...: <message>")."""
    msg, head = str(e), f"\n{type(e).__module__}.{type(e).__qualname__}: "
    return msg[msg.rindex(head) + len(head):].rstrip() if "\nOriginal Traceback" in msg and head in msg else msg


def cli_main(main: Callable[[], Any]) -> Callable[[], None]:
    """Wraps a script's `main`: a `UserError` or `DatasetError` becomes one `error: ...` line and exit code 2.

    Set the environment variable AACLIP_DEBUG=1 (or pass --debug) to see the traceback instead.
    Under torchrun an error that every rank raised (see `UserError.all_ranks`) is printed by rank 0 only,
    and the ranks meet before they exit; any other error names its rank. Every rank exits 2.
    """

    @functools.wraps(main)
    def wrapper() -> None:
        debug = "--debug" in sys.argv or os.environ.get("AACLIP_DEBUG") == "1"
        try:
            main()
        except (UserError, DatasetError) as e:
            if debug:
                raise
            shared = getattr(e, "all_ranks", None)
            shared = not dist.is_initialized() if shared is None else shared
            this_rank = rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
            if this_rank == 0 or not shared:
                where = f"(rank {this_rank}) " if this_rank and not shared else ""
                print(f"error: {where}{own_message(e)}", file=sys.stderr)
            if shared:
                meet_and_close()
            sys.exit(2)
        except SystemExit:  # a stop request: every rank leaves at the same step
            close_distributed()
            raise
        close_distributed()

    return wrapper


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast (fp32 weights, fp32 losses) or a disabled context for fp32. No weight-cast cache: every
    adapter weight is used once per forward, and CUDA-graph capture (Stage 2) does not allow the cache."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)


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


# ---------------------------------------------------------------- torchrun

# Gloo group for host-side agreement (stop flags, error messages, barriers): under NCCL it keeps these
# small messages off the GPU streams, so agreeing never waits for queued GPU work.
_CONTROL: dist.ProcessGroup | None = None
# Rank 0 alone computes metrics and writes tables, panels and checkpoints while the others wait.
_TIMEOUT = datetime.timedelta(hours=2)


def init_distributed(device_arg: str) -> torch.device:
    """This process's device. Under torchrun (WORLD_SIZE > 1) also joins the process group: NCCL with
    device cuda:LOCAL_RANK, or gloo on the CPU. Without torchrun this is `resolve_device`."""
    global _CONTROL
    device = resolve_device(device_arg)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"--device {device_arg}: under torchrun each process uses the GPU of its local rank; "
                            "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local} but only {torch.cuda.device_count()} GPU(s) are "
                            "visible; lower --nproc_per_node", all_ranks=False)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=_TIMEOUT, device_id=device)
        _CONTROL = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=_TIMEOUT)
        _CONTROL = dist.group.WORLD
    return device


def meet_and_close() -> None:
    """`close_distributed`, joining a gloo group first when the error came before the process group
    existed: torchrun stops every rank as soon as one exits, and could stop rank 0 before it printed."""
    global _CONTROL
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=1))
        _CONTROL = dist.group.WORLD
    close_distributed()


def close_distributed() -> None:
    """Waits for every rank (rank 0 may still be writing), then leaves the process group."""
    global _CONTROL
    if dist.is_initialized():
        dist.barrier(group=_CONTROL)
        dist.destroy_process_group()
        _CONTROL = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, the only process that prints, logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """All ranks meet (no-op in one process); used after rank 0 wrote something."""
    if dist.is_initialized():
        dist.barrier(group=_CONTROL)


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks (one host-side all_reduce)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return int(t)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


@contextlib.contextmanager
def same_outcome() -> Iterator[None]:
    """Runs the block on every rank; when it raises a UserError or DatasetError on any rank, every rank
    raises the lowest failing rank's message (printed once, all exit 2) instead of the others waiting
    forever at their next collective. Wraps validation and rank-0-only writes after `init_distributed`."""
    message = None
    try:
        yield
    except (UserError, DatasetError) as e:
        if not dist.is_initialized():
            raise
        message = own_message(e)
    failed = [m for m in gather_objects(message) if m is not None]
    if failed:
        raise UserError(failed[0], all_ranks=True)


def rank_seed(seed: int, r: int) -> int:
    """The seed of rank r: rank 0 keeps `seed` (one process draws what it always drew), the others get
    independent ones."""
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def shard(n: int, parts: int, index: int) -> range:
    """Part `index` of `range(n)` cut into `parts` contiguous parts whose sizes differ by at most one
    (the first ones longer)."""
    q, r = divmod(n, parts)
    start = index * q + min(index, r)
    return range(start, start + q + (index < r))


def gather_rows(tensors: list[torch.Tensor] | None, counts: list[int]) -> list[torch.Tensor] | None:
    """Concatenates every rank's tensors along dim 0 on rank 0: rank r holds `counts[r]` rows of each
    (None when 0); rank 0 holds at least one. Point-to-point sends to rank 0: nothing is padded, no other
    rank receives. Returns the full tensors on rank 0, None elsewhere; in one process `tensors` itself."""
    if not dist.is_initialized():
        return tensors
    if rank() > 0:
        for t in tensors or []:
            dist.send(_wire(t.contiguous()), dst=0)
        return None
    full = [t.new_empty((sum(counts), *t.shape[1:])) for t in tensors]
    for t, f in zip(tensors, full):
        f[: counts[0]] = t
    start = counts[0]
    for src in range(1, len(counts)):
        for f in full if counts[src] else []:
            dist.recv(_wire(f[start: start + counts[src]]), src=src)
        start += counts[src]
    return full


def _wire(t: torch.Tensor) -> torch.Tensor:
    # bool is not a collective dtype everywhere; its bytes travel as uint8 (same storage).
    return t.view(torch.uint8) if t.dtype == torch.bool else t
