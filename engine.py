"""The training engine every script shares: samplers, the resumable loop of a stage, gradient averaging
under torchrun, the fast image-forward paths (torch.compile, CUDA graphs), stop handling and RNG state,
and the two stages themselves (`train_text_adapter`, `train_image_adapter`) for any registered variant."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from cli import (OPERATIONAL_KEYS, RANDOM_WEIGHTS_BANNER, build_model, compile_for, get_train_parser, load_dataset,
                 make_bank, metadata_file, resolve_precision, training_shot)
from dataset import ADDataset
from forward_utils import (STAGE1_TERMS, STAGE2_TERMS, AnchorFn, PromptBank, Variant, stage1_loss_terms,
                           stage2_loss_terms, total_loss)
from model import AdaptedCLIP
from utils.distributed import (barrier, gather_objects, init_distributed, is_main, max_over_ranks, rank, rank_seed,
                               same_outcome, seed_everything, shard, world_size)
from utils.errors import UserError, own_message
from utils.io import (RunLock, atomic_save, ensure_writable_dir, load_checkpoint, load_module_state,
                      remove_stale_temporaries, setup_logger, write_output)
from utils.progress import progress
from utils.provenance import manifest
from variants import read_saved_args


class EpochSampler(Sampler):
    """An epoch's shuffled order from `seed`, from sample `start` on, each index paired with its own
    augmentation seed: an epoch replays identically whatever the worker count or resume point."""

    def __init__(self, n: int, seed: int, start: int = 0):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        self.items = list(zip(order[start:].tolist(), seeds[start:].tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class RankSlices(Sampler):
    """Cuts `order` into global batches of `batch_size` and yields this rank's contiguous slice of each:
    every rank sees the same number of steps, and a sample keeps its augmentation seed (from the global
    order) whatever the number of processes. A slice is empty when a short last batch has fewer samples
    than there are ranks."""

    def __init__(self, order: EpochSampler, batch_size: int, rank: int, world: int):
        self.order, self.batch_size, self.rank, self.world = list(order), batch_size, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for i in range(0, len(self.order), self.batch_size):
            batch = self.order[i: i + self.batch_size]
            yield [batch[j] for j in shard(len(batch), self.world, self.rank)]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)


def collate_or_none(items: list[dict]) -> dict | None:
    """The default collation; None for an empty slice."""
    return default_collate(items) if items else None


class SeededDataset(Dataset):
    """Draws each item's augmentation from the seed its sampler gives."""

    def __init__(self, ds: ADDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.ds[index]


def _ignore_stop_signals(_: int) -> None:
    # Ctrl-C reaches the whole process group, and torchrun signals each rank's whole group: workers leave
    # both to the main process, which finishes its step and saves first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(ds: ADDataset, batch_size: int, seed: int, num_workers: int, start_batch: int = 0) -> DataLoader:
    """The training loader of one epoch, from global batch `start_batch` on: this rank's slice of each
    global batch of `batch_size` (the whole batch in one process; None for an empty slice)."""
    # Its own generator: the loader would otherwise draw its workers' base seed from the global RNG,
    # which dropout also uses, so a resumed epoch would drift from the uninterrupted one.
    order = EpochSampler(len(ds), seed, start_batch * batch_size)
    return DataLoader(SeededDataset(ds), batch_sampler=RankSlices(order, batch_size, rank(), world_size()),
                      collate_fn=collate_or_none, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_ignore_stop_signals, generator=torch.Generator().manual_seed(seed))


class GradMean:
    """Makes a step on this rank's slice of a global batch update the weights as one process's step on the
    whole batch would.

    The gradients are averaged by hand rather than by DDP: the trained modules are small adapters that
    the steps reach through several model methods, not one forward call. After backward, each rank weights
    its gradient (of a mean over its slice) by its sample count; one all_reduce sums the weighted gradients,
    losses and counts, and dividing by the global count gives the gradient and loss of the global batch's
    mean, exact also for an uneven or empty last slice. Every rank then takes the same optimizer step.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = list(params)

    def global_mean(self, local_mean: torch.Tensor | None, n: int) -> torch.Tensor:
        """The mean over the global batch of a per-sample quantity whose mean over this rank's `n`
        samples is `local_mean` (None when n = 0); detached."""
        device = self.params[0].device
        local = local_mean.detach().float() * n if n else torch.zeros((), device=device)
        buf = torch.stack([local, torch.full((), float(n), device=device)])
        dist.all_reduce(buf)
        return buf[0] / buf[1]

    def global_means(self, local_means: torch.Tensor | None, n: int, size: int) -> torch.Tensor:
        """`global_mean` of `size` quantities at once (one all_reduce): local_means [size] over this rank's
        `n` samples (None when n = 0) -> [size] over the global batch; detached."""
        device = self.params[0].device
        local = local_means.detach().float() * n if n else torch.zeros(size, device=device)
        buf = torch.cat([local, torch.full((1,), float(n), device=device)])
        dist.all_reduce(buf)
        return buf[:-1] / buf[-1]

    def reduce(self, loss: torch.Tensor | None, n: int) -> torch.Tensor:
        """Replaces each gradient by the global batch's and returns the global batch's loss (detached);
        `loss` is this rank's (None when n = 0, without a backward)."""
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
        local_loss = loss.detach().float().reshape(1) if n else parts[0].new_zeros(1)
        flat = torch.cat([*parts, local_loss, parts[0].new_ones(1)]).mul_(n)  # the last entry counts samples
        dist.all_reduce(flat)
        flat = flat[:-1] / flat[-1]
        start = 0
        for p in self.params:
            p.grad = flat[start: start + p.numel()].view_as(p)
            start += p.numel()
        return flat[-1]


def orthogonality_surrogate(anchors: torch.Tensor | None, grad_mean: GradMean) -> torch.Tensor | None:
    """Stage 1's orthogonality term `(mean_b <T_b0, T_b1>)^2` squares a mean over the global batch, which a
    rank holding a slice cannot compute. With M the global mean (an all_reduce, no gradient) and m this
    rank's, `M^2 + 2M(m - M)` averaged by `GradMean` has exactly the global term's value M^2 and gradient
    2M dM. None for an empty slice, which still joins the all_reduce. anchors: [n, D, 2] float32."""
    dots = None if anchors is None else (anchors[:, :, 0] * anchors[:, :, 1]).sum(dim=1)
    m = None if dots is None else dots.mean()
    big_m = grad_mean.global_mean(m, 0 if dots is None else len(dots))
    return None if m is None else big_m ** 2 + 2 * big_m * (m - big_m)


def text_adapter_step(model: AdaptedCLIP, batch: dict | None, optimizer: torch.optim.Optimizer,
                      anchor_fn: AnchorFn, args: argparse.Namespace, device: torch.device,
                      grad_mean: GradMean | None = None, history: StageHistory | None = None) -> torch.Tensor:
    """One Stage-1 step. Stage-1 features are computed without gradient; the anchors (and so the text
    side) get the gradient. Returns the detached loss. Under torchrun `batch` is this rank's slice of the
    global batch (None when empty) and `grad_mean` makes the step and the loss the global batch's.
    `history` records the step's loss terms and gradient norms."""
    optimizer.zero_grad(set_to_none=True)
    loss, anchors, terms = None, None, None
    if batch is not None:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        class_idx = batch["class_idx"].to(device, non_blocking=True)
        with model.autocast():
            with torch.no_grad():
                feats, _ = model.stage1_features(images)
            anchors = anchor_fn(images, class_idx, feats)
            terms = stage1_loss_terms(feats, anchors, masks, model.grid, args.stage1_all_levels,
                                      args.text_norm_weight if grad_mean is None else 0.0)
            loss = total_loss(terms)
    if grad_mean is not None and args.text_norm_weight:
        ortho = orthogonality_surrogate(None if anchors is None else anchors.float(), grad_mean)
        if loss is not None:
            # The surrogate replaces the local term (weighted by 0 above), in the log as in the loss.
            terms["orthogonality"] = args.text_norm_weight * ortho
            loss = loss + terms["orthogonality"]
    return _backward_and_step(loss, batch, optimizer, grad_mean, history, terms)


# (images [B, 3, S, S], anchors [B, D, 2], masks [B, 1, S, S], labels [B]) -> `stage2_loss_terms`
Stage2TermsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def stage2_terms(model: AdaptedCLIP, images: torch.Tensor, anchors: torch.Tensor, masks: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage 2's image forward and loss terms, eagerly (`Stage2TermsFn`)."""
    seg_tokens, det_token = model(images)
    return stage2_loss_terms(seg_tokens, det_token, anchors, masks, labels, model.grid)


class _Stage2Terms(nn.Module):
    """`stage2_terms` as a module whose parameters are the model's, returning the terms as a tuple: what
    `make_graphed_callables` needs to return the adapters' gradients from the graphed backward."""

    def __init__(self, model: AdaptedCLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, anchors: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        terms = stage2_terms(self.model, images, anchors, masks, labels)
        return tuple(terms[k] for k in STAGE2_TERMS)


class CudaGraphStage2:
    """Stage 2's image forward, loss terms and their backward replayed from CUDA graphs (`Stage2TermsFn`).

    At small batches a Stage-2 step is bound by Python launching the kernels of every block, and of the loss,
    one by one; a graph launches them at once (profile in docs/benchmarks.md). The graphs are captured with
    `torch.cuda.make_graphed_callables` (3 warm-up passes) on the first batch of `batch_size` images;
    batches of another size (an epoch's last) run eagerly. They replay the same kernels on the same
    parameters, which the optimizer updates in place. The image path and the loss have no randomness (no
    dropout), so replaying computes what the eager step computes."""

    def __init__(self, model: AdaptedCLIP, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.graphed: Callable | None = None

    def __call__(self, images: torch.Tensor, anchors: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        if images.shape[0] != self.batch_size:
            return stage2_terms(self.model, images, anchors, masks, labels)
        if self.graphed is None:
            module = _Stage2Terms(self.model).train(self.model.training)
            try:
                with self.model.autocast():
                    self.graphed = torch.cuda.make_graphed_callables(
                        module, tuple(t.clone() for t in (images, anchors, masks, labels)))
            except RuntimeError as e:
                raise UserError(f"capturing Stage 2's CUDA graph failed ({str(e).splitlines()[0]}); run the same "
                                "command with --no_cuda_graph (it resumes from the last checkpoint), and add "
                                "--debug for the traceback") from e
        return dict(zip(STAGE2_TERMS, self.graphed(images, anchors, masks, labels)))


def fast_stage2(model: AdaptedCLIP, cuda_graph_batch: int | None = None) -> Stage2TermsFn:
    """Stage 2's forward and loss terms, on CUDA through the CUDA graphs of batches of `cuda_graph_batch` images
    (None: eagerly). The graphs replay the compiled blocks where `compile_blocks` compiled them."""
    if cuda_graph_batch is None:
        return functools.partial(stage2_terms, model)
    return CudaGraphStage2(model, cuda_graph_batch)


def image_adapter_step(model: AdaptedCLIP, batch: dict | None, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, anchor_fn: AnchorFn,
                       device: torch.device, grad_mean: GradMean | None = None,
                       terms_fn: Stage2TermsFn | None = None,
                       history: StageHistory | None = None) -> torch.Tensor:
    """One Stage-2 step (the scheduler steps per iteration). Returns the detached loss; `batch`,
    `grad_mean` and `history` as in `text_adapter_step`; `terms_fn` computes the forward and loss terms
    (`fast_stage2`; default: eagerly)."""
    optimizer.zero_grad(set_to_none=True)
    loss, terms = None, None
    if batch is not None:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        class_idx = batch["class_idx"].to(device, non_blocking=True)
        with model.autocast():
            with torch.no_grad():
                anchors = anchor_fn(images, class_idx)
            terms = (terms_fn or functools.partial(stage2_terms, model))(images, anchors, masks, labels)
            loss = total_loss(terms)
    loss = _backward_and_step(loss, batch, optimizer, grad_mean, history, terms)
    scheduler.step()
    return loss


def _backward_and_step(loss: torch.Tensor | None, batch: dict | None, optimizer: torch.optim.Optimizer,
                       grad_mean: GradMean | None, history: StageHistory | None = None,
                       terms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Backward (skipped for an empty slice), the gradient average across ranks, the step's record in
    `history` (of the gradients the optimizer is about to apply), the optimizer step."""
    if loss is not None:
        loss.backward()
    n = 0 if batch is None else len(batch["image"])
    if grad_mean is not None:
        loss = grad_mean.reduce(loss, n)
    if history is not None:
        history.record_step(terms, n, grad_mean)
    optimizer.step()
    return loss.detach()


class StopRequest:
    """SIGINT/SIGTERM set a flag; the training loop saves a resumable checkpoint after the current step."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame) -> None:
        self.signum = signum

    def agreed(self) -> int:
        """The signal number if any rank got one (0 if none): torchrun signals every rank, but not at the
        same instant, so the ranks agree each step and stop at the same one."""
        return max_over_ranks(self.signum or 0)


STOP = StopRequest()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_path(ckpt_path: Path, epoch: int) -> Path:
    """`image_adapter.pth` -> `image_adapter_<epoch>.pth`."""
    return ckpt_path.with_name(f"{ckpt_path.stem}_{epoch}.pth")


def resume_checkpoint(ckpt_path: Path, per_epoch: bool, logger: logging.Logger) -> tuple[Path, dict | None]:
    """(file, checkpoint) to resume a stage from: `ckpt_path` when it loads; when it is missing or damaged
    and the stage keeps each epoch (`per_epoch`), the newest per-epoch checkpoint that loads;
    (ckpt_path, None) for a fresh start."""
    reason = None
    if ckpt_path.exists():
        try:
            return ckpt_path, load_checkpoint(ckpt_path)
        except UserError as damaged:
            if not per_epoch:
                raise
            reason = own_message(damaged)
    if per_epoch:
        epochs = sorted((int(m.group(1)), p) for p in ckpt_path.parent.glob(f"{ckpt_path.stem}_*.pth")
                        if (m := re.fullmatch(rf"{re.escape(ckpt_path.stem)}_(\d+)\.pth", p.name)))
        for _, path in reversed(epochs):
            try:
                ckpt = load_checkpoint(path)
            except UserError as e:
                logger.info(f"skipping {path.name}: {own_message(e)}")
                continue
            logger.info(f"{reason or f'{ckpt_path.name} is missing'}; resuming from {path.name}, the newest "
                        "per-epoch checkpoint that loads")
            return path, ckpt
    if reason is not None:
        raise UserError(f"{reason}; no per-epoch checkpoint loads either: delete {ckpt_path} to retrain this stage")
    return ckpt_path, None


def save_checkpoint(ckpt: dict, ckpt_path: Path, epoch: int | None) -> None:
    """Writes `ckpt_path` (and `<stem>_<epoch>.pth` first when `epoch` is given: a kill between the two
    saves then resumes from the epoch before and redoes this one). A full disk is a `UserError`; the
    previous checkpoints stay whole."""
    try:
        if epoch is not None:
            atomic_save(ckpt, epoch_path(ckpt_path, epoch))
        atomic_save(ckpt, ckpt_path)
    except OSError as e:
        raise UserError(f"cannot write a checkpoint in {ckpt_path.parent} ({e.strerror or e}); the previous "
                        "checkpoints are whole: free some space and run the same command to resume") from None


def group_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of the gradients of `params` taken as one vector (parameters without a gradient left
    out): per-tensor norms in one fused kernel, then their norm. -> [] float32 on the parameters' device,
    not read back (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


HISTORY_FILE = "metrics.jsonl"  # in a run's folder: one JSON line per epoch of each stage


class StageHistory:
    """One stage's training history as data: after every epoch one line of `<save_path>/metrics.jsonl`,
    {stage, epoch, steps, global_step, loss, loss_terms, lr, grad_norm, grad_norm_ratio, recorded_steps,
    images, images_per_s, time_s, finished}. `loss` is the epoch's mean loss (the train.log line's),
    `loss_terms` the means of its terms (they add up to it; weighted as in the loss), `lr` each parameter
    group's learning rate at the epoch's end, `grad_norm` the mean over the steps of each module group's
    gradient norm (of the gradient the optimizer applied: after the average across ranks, before the step,
    unclipped), `grad_norm_ratio` each further group's mean norm over the first group's.

    A step's terms and norms are added to sums on the device and read once at the epoch's end, so that
    recording never makes a step wait for the GPU. Mid-epoch checkpoints keep the sums (`state`): an
    epoch resumed mid-way is recorded whole, its time without the pause."""

    def __init__(self, stage: str, terms: tuple[str, ...], groups: dict[str, list[nn.Parameter]],
                 optimizer: torch.optim.Optimizer, path: Path):
        self.stage, self.terms, self.optimizer, self.path = stage, terms, optimizer, path
        self.groups = {name: list(params) for name, params in groups.items()}
        self.device = next(iter(self.groups.values()))[0].device
        self.start_epoch()

    def start_epoch(self, saved: dict | None = None) -> None:
        """Empty sums, or the ones `state` saved in a mid-epoch checkpoint."""
        saved = saved or {}
        self.term_sums = torch.tensor(saved.get("term_sums", [0.0] * len(self.terms)), dtype=torch.float64,
                                      device=self.device)  # [terms]
        self.norm_sums = torch.tensor(saved.get("norm_sums", [0.0] * len(self.groups)), dtype=torch.float64,
                                      device=self.device)  # [groups]
        self.steps, self.images = int(saved.get("steps", 0)), int(saved.get("images", 0))
        self.seconds, self.started = float(saved.get("seconds", 0.0)), time.perf_counter()

    def record_step(self, terms: dict[str, torch.Tensor] | None, n: int, grad_mean: GradMean | None) -> None:
        """Adds a step's loss terms (scalars over this rank's `n` samples; None for an empty slice) and the
        gradient norm of each group. Under torchrun the terms become the global batch's (one all_reduce)
        and the gradients already are."""
        values = None if terms is None else torch.stack([terms[k].detach().float() for k in self.terms])
        if grad_mean is not None:
            values = grad_mean.global_means(values, n, len(self.terms))
        self.term_sums += values
        self.norm_sums += torch.stack([group_grad_norm(params) for params in self.groups.values()])
        self.steps += 1

    def count_images(self, n: int) -> None:
        """A step's images (the global batch's)."""
        self.images += n

    def state(self) -> dict:
        """The epoch's sums so far, for a mid-epoch checkpoint (reads the device)."""
        return {"term_sums": self.term_sums.tolist(), "norm_sums": self.norm_sums.tolist(), "steps": self.steps,
                "images": self.images, "seconds": self.seconds + time.perf_counter() - self.started}

    def finish_epoch(self, epoch: int, steps: int, loss: float) -> dict:
        """The record of epoch `epoch` (1-based) of `steps` steps whose mean loss is `loss`."""
        seconds = self.seconds + time.perf_counter() - self.started
        sums = torch.cat([self.term_sums, self.norm_sums]).tolist()  # the epoch's one read of the device
        per_step = [v / max(1, self.steps) for v in sums]
        norms = dict(zip(self.groups, per_step[len(self.terms):]))
        first, *others = norms
        return {"stage": self.stage, "epoch": epoch, "steps": steps, "global_step": epoch * steps, "loss": loss,
                "loss_terms": dict(zip(self.terms, per_step[:len(self.terms)])),
                "lr": [float(g["lr"]) for g in self.optimizer.param_groups], "grad_norm": norms,
                "grad_norm_ratio": {f"{g}/{first}": norms[g] / norms[first] if norms[first] else None for g in others},
                "recorded_steps": self.steps, "images": self.images,
                "images_per_s": self.images / seconds if seconds > 0 else None, "time_s": seconds,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}

    def gradient_line(self, record: dict) -> str | None:
        """train.log's line on the gradient norms of a stage that trains several module groups."""
        if not record["grad_norm_ratio"]:
            return None
        norms = ", ".join(f"{g} {v:.3g}" for g, v in record["grad_norm"].items())
        ratios = ", ".join(f"{k} {'n/a' if v is None else format(v, '.3g')}" for k, v in record["grad_norm_ratio"].items())
        return f"{self.stage} epoch {record['epoch']}: mean gradient norm {norms}; ratio {ratios}"

    def append(self, record: dict) -> None:
        """Appends `record` as one line, flushed and synced to disk: a crash leaves whole lines, or a torn
        last one that the next `forget_after` drops. Rank 0 only."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({e.strerror or e}); free some space and run the same command "
                            "to resume") from None

    def forget_after(self, epoch: int) -> None:
        """Drops this stage's lines of the epochs after `epoch` (the ones a resumed run records again) and
        torn lines, so that each (stage, epoch) is in the file once however often the run was stopped.
        The file is rewritten atomically, and only when a line goes. Rank 0 only."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not self._superseded(line, epoch)]
        if kept != lines:
            write_output("".join(kept), self.path, "--save_path")

    def _superseded(self, line: str, epoch: int) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return True
        return not line.endswith("\n") or (record.get("stage") == self.stage and record.get("epoch", 0) > epoch)


def run_stage(
    name: str, ckpt_path: Path, state: dict, epochs: int, ds: ADDataset, batch_size: int,
    step_fn: Callable[[dict], torch.Tensor], args: argparse.Namespace, seed: int, logger: logging.Logger,
    keep_each_epoch: bool = False, history: StageHistory | None = None,
) -> None:
    """The training loop of one stage, resumable at any step.

    `state` maps checkpoint keys to objects with `state_dict` (modules, optimizer, scheduler). After each
    epoch, on SIGINT/SIGTERM and every `--checkpoint_every` steps the checkpoint
    `{"epoch": completed epochs, **states}` is written atomically; inside an epoch it also holds `step`
    (batches done), `loss_sum` and the torch RNG state. Each epoch's data order and augmentations come
    from (seed, epoch), so a resumed run ends with the same weights as an uninterrupted one.

    Under torchrun every rank runs this loop on its slices of the same global batches; the losses are
    the global batch's, rank 0 writes the checkpoints (the others wait), and every rank resumes from the
    same file. Dropout (the only randomness of a step) draws from a per-rank seed of (seed, epoch, rank),
    and mid-epoch checkpoints hold each rank's RNG state: a resume with the same number of processes is
    exact; with another number, dropout is reseeded per rank.

    `history` (which the step function also records into) gets each epoch's line of metrics.jsonl,
    written before the epoch's checkpoint: a run stopped in between redoes the epoch, and its line is
    dropped and written again.
    """
    start_epoch, start_step, loss_sum = 0, 0, 0.0
    with same_outcome():
        ckpt_file, ckpt = resume_checkpoint(ckpt_path, keep_each_epoch, logger)
        if ckpt is not None:
            for key, obj in state.items():
                if key.endswith("_scheduler") and key not in ckpt:
                    logger.info(f"{ckpt_path} has no {key} (written by the original code?): the lr schedule restarts")
                    continue
                load_module_state(obj, ckpt, key, ckpt_file)
    if ckpt is not None:
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
        loss_sum = float(ckpt.get("loss_sum", 0.0))
        if start_step:
            states = ckpt.get("rng_ranks", [ckpt["rng"]])
            if len(states) == world_size():
                _set_rng_state(states[rank()])
            else:
                seed_everything(rank_seed(seed + start_epoch, rank()))
                logger.info(f"{name}: {ckpt_path} was written by {len(states)} process(es), this run has "
                            f"{world_size()}: dropout is reseeded, the rest of the epoch is not bit-exact")
        logger.info(f"{name}: loaded {ckpt_file} (epoch {start_epoch}, step {start_step})")
        if keep_each_epoch and start_step == 0 and start_epoch > 0 and is_main():
            # A run killed between an epoch's two saves (or written by an older version) lacks the
            # per-epoch file of the epoch it resumes from; test.py would silently skip that epoch.
            epoch_file = epoch_path(ckpt_path, start_epoch)
            if not epoch_file.exists():
                atomic_save(ckpt, epoch_file)
                logger.info(f"{name}: wrote the missing {epoch_file.name} from {ckpt_file.name}")
        barrier()
    if history is not None:
        with same_outcome():
            if is_main():
                history.forget_after(start_epoch)
    resumed_history = ckpt.get("history") if ckpt is not None and start_step else None

    def read_loss(step: int, loss_t: torch.Tensor, epoch: int, bar: tqdm) -> float:
        loss = float(loss_t)
        if not math.isfinite(loss):  # the global batch's loss: every rank stops here
            raise UserError(f"{name}: loss is {loss} at epoch {epoch + 1} step {step}; stopped. The last good "
                            f"checkpoint {ckpt_path} is kept. Try a lower learning rate or --precision fp32",
                            all_ranks=True)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # a refresh here would ignore the bar's interval
        return loss

    def save(epoch: int, step: int, total: float, keep: bool = False, record: dict | None = None) -> None:
        ckpt = {"epoch": epoch, **{k: v.state_dict() for k, v in state.items()}}
        if step:
            ckpt.update(step=step, loss_sum=total, rng=_rng_state())
            if world_size() > 1:
                ckpt["rng_ranks"] = gather_objects(_rng_state())
            if history is not None:
                ckpt["history"] = history.state()
        with same_outcome():
            if is_main():
                if record is not None:
                    history.append(record)
                save_checkpoint(ckpt, ckpt_path, epoch if keep else None)

    for epoch in range(start_epoch, epochs):
        if start_step == 0:
            seed_everything(rank_seed(seed + epoch, rank()))
        if history is not None:
            history.start_epoch(resumed_history)
            resumed_history = None
        loader = make_loader(ds, batch_size, seed + epoch, args.num_workers, start_step)
        n_steps = start_step + len(loader)
        bar = progress(loader, f"{name} epoch {epoch + 1}/{epochs}", enabled=is_main(), initial=start_step,
                       total=n_steps)
        pending: tuple[int, torch.Tensor] | None = None
        for step, batch in enumerate(bar, start=start_step + 1):
            loss_t = step_fn(batch)
            if history is not None:
                history.count_images(min(batch_size, len(ds) - (step - 1) * batch_size))
            # Reading a loss waits for the GPU; reading the previous step's lets this step queue first.
            if pending is not None:
                loss_sum += read_loss(*pending, epoch, bar)
            pending = (step, loss_t)
            signum = STOP.agreed()
            if signum or (args.checkpoint_every and step % args.checkpoint_every == 0 and step < n_steps):
                loss_sum += read_loss(*pending, epoch, bar)
                pending = None
                save(epoch, step, loss_sum)
            if signum:
                logger.info(f"{name}: interrupted by signal {signum} at epoch {epoch + 1} step {step}; "
                            f"saved {ckpt_path}. Run the same command to resume.")
                sys.exit(128 + signum)
        if pending is not None:
            loss_sum += read_loss(*pending, epoch, bar)
        loss = loss_sum / max(1, n_steps)
        record = None if history is None else history.finish_epoch(epoch + 1, n_steps, loss)
        save(epoch + 1, 0, 0.0, keep=keep_each_epoch, record=record)
        logger.info(f"{name} epoch {epoch + 1}/{epochs}: loss {loss:.4f}")
        if record is not None and (line := history.gradient_line(record)):
            logger.info(line)
        start_step, loss_sum = 0, 0.0


def check_save_path(args: argparse.Namespace) -> None:
    """Fails before anything is written when the save path cannot be written."""
    path = Path(args.save_path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        why = "not a folder" if not existing.is_dir() else "read-only"
        raise UserError(f"cannot write to --save_path {path} ({existing} is {why}); choose another --save_path")


def run_config(args: argparse.Namespace, variant: Variant, device: torch.device) -> dict:
    """What args.json records: every flag, the variant, the precision the run computes in, and the manifest
    (code, packages, weight and metadata-list hashes)."""
    lists = {f"{args.dataset}/{f.name}": f for f in [metadata_file(args, args.dataset, training_shot(args))]
             if f.is_file()}
    return dict(vars(args), variant=variant.name, precision=resolve_precision(args.precision, device),
                manifest=manifest(args.pretrained, lists))


def config_differences(saved: dict, config: dict, stage2_started: bool, operational: tuple[str, ...] = ()
                       ) -> list[str]:
    """The settings of `config` that a rerun may not change from `saved` (args.json), one line each: any
    flag but the operational ones (and the variant's, `operational`), the weights by content, the training list by content; an epoch count
    may grow (the run goes on), except Stage 1's once Stage 2 has trained on its anchors."""
    diffs = []
    old_manifest, new_manifest = saved.get("manifest"), config["manifest"]
    for key, now in config.items():
        if key in OPERATIONAL_KEYS + operational or key in ("manifest", "starts") or key not in saved:
            continue
        before = saved[key]
        if key == "precision" and before == "auto":  # written by a version that saved the flag, not its value
            continue
        if key == "pretrained" and old_manifest is not None:
            a, b = old_manifest.get("weights_sha256"), new_manifest["weights_sha256"]
            if (a, b) != (None, None):  # a weight file on either side: same bytes, wherever it lies now
                if a != b:
                    diffs.append(f"--pretrained: {before} (sha256 {str(a)[:12]}) then, {now} (sha256 {str(b)[:12]}) "
                                 "now")
                continue
        if key in ("text_epoch", "image_epoch"):
            if now < before:
                diffs.append(f"--{key}: {before} then, {now} now; a run can only be extended (evaluate an earlier "
                             "epoch with test.py --epoch)")
            elif key == "text_epoch" and now > before and stage2_started:
                diffs.append(f"--text_epoch: {before} then, {now} now; Stage 2 has trained on the anchors of "
                             f"{before} Stage-1 epochs")
            continue
        if before != now:
            diffs.append(f"--{key}: {before!r} then, {now!r} now")
    old_lists = (old_manifest or {}).get("metadata_sha256", {})
    for name, digest in new_manifest["metadata_sha256"].items():
        if name in old_lists and old_lists[name] != digest:
            diffs.append(f"{name}: its content changed since the run started (the training images differ)")
    return diffs


def check_rerun(save_dir: Path, config: dict, variant: Variant) -> None:
    """Refuses to continue a run in `save_dir` whose args.json differs from `config` in a setting that
    changes results; the message lists each difference and the ways out. A flag that an older args.json
    lacks counts with its default, which is what that run was trained with."""
    saved = read_saved_args(save_dir)
    if not saved:
        return
    parser = get_train_parser(variant, "")
    saved = {**{a.dest: parser.get_default(a.dest) for a in parser._actions if a.dest != "help"}, **saved}
    stage2_started = any(save_dir.glob("image_adapter*.pth"))
    diffs = config_differences(saved, config, stage2_started, variant.operational_keys)
    if diffs:
        raise UserError(f"{save_dir} holds a run with other settings:\n  " + "\n  ".join(diffs) + "\nTrain into a "
                        f"new --save_path, or rerun with the saved values ({save_dir / 'args.json'}); only larger "
                        "epoch counts and operational flags (--num_workers, --device, --checkpoint_every, "
                        "--cache_dir, ...) may change")


def check_distributed_args(args: argparse.Namespace) -> None:
    """Flags that cannot mean under torchrun what they mean in one process."""
    world = world_size()
    if world == 1:
        return
    for flag in ("text_batch_size", "image_batch_size"):
        if getattr(args, flag) < world:
            raise UserError(f"--{flag} {getattr(args, flag)} is the global batch, split across the {world} "
                            f"processes: use at least {world}, or fewer processes")
    if args.surgery_batch_mixing:
        raise UserError("--surgery_batch_mixing mixes the images of a batch, which torchrun splits across "
                        "processes: train it in one process")


@dataclass
class Run:
    """A training run: its flags, variant, device, model (with the variant's fresh adapters), the prompts
    of the training classes, save folder, logger and the folder's lock."""
    args: argparse.Namespace
    variant: Variant
    device: torch.device
    model: AdaptedCLIP
    bank: PromptBank
    save_dir: Path
    logger: logging.Logger
    lock: RunLock | None = None  # held by rank 0 for the run's lifetime; `with start_run(...) as run` releases it

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, *exc) -> None:
        if exc_type is None:
            self.logger.info(f"loss curves: python -m tools.plot_history --save_path {self.save_dir}")
        if self.lock is not None:
            self.lock.release()


def start_run(args: argparse.Namespace, variant: Variant,
              build: Callable[[argparse.Namespace, Variant, torch.device], AdaptedCLIP] = build_model) -> Run:
    """Validates everything (flags, save path, earlier run's settings, weights, dataset) before writing
    anything, then holds the save folder's lock for the run's lifetime, removes temporaries a killed
    run left, writes `args.json` (settings and manifest) and opens `train.log`, and installs the
    SIGINT/SIGTERM handler. Under torchrun every rank validates and builds the model; rank 0 alone locks
    and writes."""
    device = init_distributed(args.device)
    save_dir = Path(args.save_path)
    lock = RunLock(save_dir)
    try:
        return _start_run(args, variant, build, device, save_dir, lock)
    except BaseException:
        lock.release()
        raise


def _start_run(args: argparse.Namespace, variant: Variant, build: Callable, device: torch.device, save_dir: Path,
               lock: RunLock) -> Run:
    with same_outcome():
        if variant.needs_text_stage and args.text_epoch <= 0:
            raise UserError(f"--text_epoch {args.text_epoch} leaves the {variant.name} text modules untrained; "
                            "use train.py for a run without a text stage")
        check_distributed_args(args)
        check_save_path(args)
        if save_dir.is_dir() and is_main():
            lock.acquire()
        config = run_config(args, variant, device)
        check_rerun(save_dir, config, variant)
        seed_everything(args.seed)
        model = build(args, variant, device)
        bank = make_bank(args, device)
    with same_outcome():  # after every rank has read the old args.json
        if is_main():
            made = [d for d in [save_dir, *save_dir.parents] if not d.exists()]
            try:
                ensure_writable_dir(save_dir)
                if lock.file is None:  # a new folder: another run may have made it meanwhile
                    lock.acquire()
                    check_rerun(save_dir, config, variant)
                lock.record_pid()
                remove_stale_temporaries(save_dir)
                write_args(save_dir, config)
            except UserError:
                if made and lock.file is not None:  # a failed first start leaves no folder behind
                    lock.path.unlink(missing_ok=True)
                    lock.release()
                    for d in made:
                        try:
                            d.rmdir()
                        except OSError:  # not empty: another run's files
                            break
                raise
        logger = setup_logger(save_dir, "train")
    if args.pretrained == "none":
        logger.info(RANDOM_WEIGHTS_BANNER)
    on = f"{world_size()} processes on {device.type} (torchrun)" if world_size() > 1 else str(device)
    logger.info(f"{variant.name} training on {on} ({model.precision}) into {save_dir}: {args.model} "
                f"{args.image_size} px, {args.dataset} {describe_shot(args)}, {args.text_epoch} + {args.image_epoch} "
                f"epochs, seed {args.seed}; every setting in {save_dir / 'args.json'}")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    STOP.install()
    return Run(args, variant, device, model, bank, save_dir, logger, lock if is_main() else None)


def describe_shot(args: argparse.Namespace) -> str:
    return "full-shot" if training_shot(args) is None else f"{args.shot}-shot"


def write_args(save_dir: Path, config: dict) -> None:
    """args.json, atomically; `starts` keeps when and with which code each (re)start ran."""
    starts = read_saved_args(save_dir).get("starts", [])
    start = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": config["manifest"]["code"],
             "text_epoch": config["text_epoch"], "image_epoch": config["image_epoch"]}
    write_output(json.dumps(dict(config, starts=[*starts, start]), indent=2), save_dir / "args.json", "--save_path")


def compile_stage(run: Run, batch_size: int, images: int = 0) -> int:
    """Compiles the vision blocks for this process's part of a stage's batches where --compile says so
    (`images`: the stage's epochs x images, `cli.compile_for`); returns that part's size."""
    local = len(shard(batch_size, world_size(), rank()))
    if compile_for(run.model, run.args, run.device, local, images // world_size()):
        run.logger.info(f"compiling the vision blocks for batches of {local} (--compile {run.args.compile}): the first "
                        "steps take longer, less when inductor's on-disk cache holds them")
    return local


def train_text_adapter(run: Run) -> None:
    """Stage 1: trains the variant's text modules with one Adam optimizer, then freezes them."""
    args, model, modules = run.args, run.model, run.variant.modules(run.model)
    if args.text_epoch > 0:
        with same_outcome():
            ds = load_dataset(args, args.dataset, training_shot(args), augment=True)
        anchor_fn = run.variant.anchor_fn(model, run.bank, args, "stage1")
        params = [p for m in modules.values() for p in m.parameters()]
        optimizer = torch.optim.Adam(run.variant.param_groups(modules, args), betas=(0.5, 0.999))
        grad_mean = GradMean(params) if world_size() > 1 else None
        compile_stage(run, args.text_batch_size)
        history = StageHistory("stage 1", STAGE1_TERMS, {k: list(m.parameters()) for k, m in modules.items()},
                               optimizer, run.save_dir / HISTORY_FILE)
        model.train()
        run_stage("stage 1", run.save_dir / run.variant.text_ckpt, {**modules, "text_optimizer": optimizer},
                  args.text_epoch, ds, args.text_batch_size,
                  lambda b: text_adapter_step(model, b, optimizer, anchor_fn, args, run.device, grad_mean, history),
                  args, args.seed, run.logger, history=history)
    for m in modules.values():
        m.requires_grad_(False)


def train_image_adapter(run: Run) -> None:
    """Stage 2: trains the image adapters against the frozen text side's anchors."""
    args, model = run.args, run.model
    if args.image_epoch <= 0:
        return
    with same_outcome():
        ds = load_dataset(args, args.dataset, training_shot(args), augment=True, color_jitter=True)
    anchor_fn = run.variant.anchor_fn(model, run.bank, args, "stage2", text_trained=args.text_epoch > 0)
    optimizer = torch.optim.Adam(model.image_adapter.parameters(), lr=args.image_lr, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16000, 32000], gamma=0.5)
    state = {"image_adapter": model.image_adapter, "image_optimizer": optimizer, "image_scheduler": scheduler}
    grad_mean = GradMean(list(model.image_adapter.parameters())) if world_size() > 1 else None
    history = StageHistory("stage 2", STAGE2_TERMS, {"image_adapter": list(model.image_adapter.parameters())},
                           optimizer, run.save_dir / HISTORY_FILE)
    model.train()
    graphs = run.device.type == "cuda" and not args.no_cuda_graph
    batch = compile_stage(run, args.image_batch_size, args.image_epoch * len(ds))
    terms_fn = fast_stage2(model, batch if graphs else None)
    run_stage("stage 2", run.save_dir / "image_adapter.pth", state, args.image_epoch, ds, args.image_batch_size,
              lambda b: image_adapter_step(model, b, optimizer, scheduler, anchor_fn, run.device, grad_mean, terms_fn,
                                           history),
              args, args.seed + 10_000, run.logger, keep_each_epoch=True, history=history)
