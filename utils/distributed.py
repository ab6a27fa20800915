"""Devices and the torchrun (torch.distributed) plumbing shared by training and evaluation."""
from __future__ import annotations

import contextlib
import datetime
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import UserError, own_message


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    return device


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
    """Runs the block on every rank; when it raises a UserError (DatasetError included) on any rank, every rank
    raises the lowest failing rank's message (printed once, all exit 2) instead of the others waiting
    forever at their next collective. Wraps validation and rank-0-only writes after `init_distributed`."""
    message = None
    try:
        yield
    except UserError as e:
        if not dist.is_initialized():
            raise
        message = own_message(e)
    failed = [m for m in gather_objects(message) if m is not None]
    if failed:
        raise UserError(failed[0], all_ranks=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
