"""Train AA-CLIP: Stage 1 (text adapters) then Stage 2 (image adapters), spec §6.

    python train.py --dataset VisA --pretrained ViT-L-14-336px.pt --save_path ckpt/baseline
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import ADDataset, get_dataset_info
from forward_utils import AnchorFn, PromptBank, class_anchor_fn, stage1_loss, stage2_loss
from model import AdaptedCLIP, build_clip, get_tokenizer
from utils import (RANDOM_WEIGHTS_BANNER, UserError, atomic_save, autocast, cli_main, ensure_writable_dir,
                   load_checkpoint, load_module_state, resolve_device, seed_everything, setup_logger)

# Flags that fix the architecture: a save path may only be resumed or evaluated with the same values.
ARCH_KEYS = ("variant", "model", "image_size", "quick_gelu", "relu", "levels", "text_adapt_until",
             "image_adapt_until", "surgery_until_layer", "cross_attn_heads")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that build the backbone and the adapters (shared by train.py and test.py)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-L-14-336",
                   help="open_clip model name; 'tiny' is a small test config (default: %(default)s)")
    g.add_argument("--pretrained", default="none",
                   help="CLIP weights: an OpenAI TorchScript .pt (e.g. ViT-L-14-336px.pt), a state-dict file "
                        "(.pt/.pth/.bin/.safetensors), 'openai' (open_clip download, needs internet) or "
                        "'none' (random weights, labelled as such everywhere) (default: %(default)s)")
    g.add_argument("--image_size", "--img_size", type=int, default=518,
                   help="input size; the positional embedding is resized to it (default: %(default)s)")
    g.add_argument("--quick_gelu", action="store_true",
                   help="use QuickGELU, the activation the OpenAI weights were trained with; the default plain "
                        "GELU reproduces the original AA-CLIP code")
    g.add_argument("--relu", action="store_true", help="LeakyReLU after the seg/det projections")
    g.add_argument("--text_adapt_weight", type=float, default=0.1, help="text adapter mixing weight")
    g.add_argument("--image_adapt_weight", type=float, default=0.1, help="image adapter mixing weight")
    g.add_argument("--levels", type=int, nargs="+", default=None,
                   help="vision blocks tapped for segmentation (default: every quarter of the depth, "
                        "6 12 18 24 for ViT-L)")
    g.add_argument("--text_adapt_until", type=int, default=None,
                   help="text blocks followed by an adapter (default: depth/4, 3 for ViT-L)")
    g.add_argument("--image_adapt_until", type=int, default=None,
                   help="vision blocks followed by an adapter (default: depth/4, 6 for ViT-L)")
    g.add_argument("--surgery_until_layer", type=int, default=None,
                   help="V-V attention in the last (this - 1) vision blocks of the Stage-1 features "
                        "(default: 20 for ViT-L)")
    g.add_argument("--surgery_batch_mixing", action="store_true",
                   help="reproduce the original's defect: V-V attention across the images of the batch")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast (fp32 weights and losses) or fp32; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--debug", action="store_true", help="show tracebacks for input errors")


def add_data_args(p: argparse.ArgumentParser, default_dataset: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default_dataset, help="dataset name (default: %(default)s)")
    g.add_argument("--data_root", default=None, help="dataset folder (default: the dataset's default root)")
    g.add_argument("--metadata_dir", default="dataset/metadata",
                   help="folder holding <dataset>/full-shot.jsonl and <dataset>/<k>-shot.jsonl "
                        "(made by python -m dataset.make_metadata) (default: %(default)s)")
    g.add_argument("--num_workers", type=int, default=4, help="data loader processes (default: %(default)s)")


def get_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p, default_dataset="VisA")
    g = p.add_argument_group("training")
    g.add_argument("--save_path", default="ckpt/baseline", help="checkpoint and log folder (default: %(default)s)")
    g.add_argument("--training_mode", choices=["few_shot", "full_shot"], default="few_shot",
                   help="few_shot trains on <shot>-shot.jsonl, full_shot on full-shot.jsonl")
    g.add_argument("--shot", type=int, default=32, help="samples per class in few_shot mode (default: %(default)s)")
    g.add_argument("--text_epoch", type=int, default=5, help="Stage-1 epochs; 0 keeps CLIP's own text encoder")
    g.add_argument("--image_epoch", type=int, default=20, help="Stage-2 epochs (default: %(default)s)")
    g.add_argument("--text_batch_size", type=int, default=16, help="Stage-1 batch size (default: %(default)s)")
    g.add_argument("--image_batch_size", type=int, default=2, help="Stage-2 batch size (default: %(default)s)")
    g.add_argument("--text_lr", type=float, default=1e-5, help="Stage-1 Adam learning rate")
    g.add_argument("--image_lr", type=float, default=5e-4, help="Stage-2 Adam learning rate")
    g.add_argument("--text_norm_weight", type=float, default=0.1, help="weight of the orthogonality term")
    g.add_argument("--stage1_all_levels", action="store_true",
                   help="sum the Stage-1 seg loss over all levels (the original uses the last level only)")
    g.add_argument("--seed", type=int, default=111, help="random seed (default: %(default)s)")
    return p


def resolve_precision(args: argparse.Namespace, device: torch.device) -> str:
    if args.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return args.precision


def build_model(args: argparse.Namespace, model_cls: type[AdaptedCLIP] = AdaptedCLIP, **kwargs) -> AdaptedCLIP:
    """The frozen CLIP with fresh adapters, as the flags say."""
    clip = build_clip(args.model, args.pretrained, args.image_size, args.quick_gelu)
    return model_cls(
        clip, text_adapt_weight=args.text_adapt_weight, image_adapt_weight=args.image_adapt_weight,
        levels=args.levels, relu=args.relu, text_adapt_until=args.text_adapt_until,
        image_adapt_until=args.image_adapt_until, surgery_until_layer=args.surgery_until_layer,
        surgery_batch_mixing=args.surgery_batch_mixing, **kwargs,
    )


def metadata_file(args: argparse.Namespace, dataset: str, shot: int | None) -> Path:
    name = "full-shot.jsonl" if shot is None else f"{shot}-shot.jsonl"
    return Path(args.metadata_dir) / dataset / name


def load_dataset(args: argparse.Namespace, dataset: str, shot: int | None, **kwargs) -> ADDataset:
    root = args.data_root or get_dataset_info(dataset)["default_root"]
    return ADDataset(root, str(metadata_file(args, dataset, shot)), image_size=args.image_size, **kwargs)


def make_loader(ds: ADDataset, batch_size: int, seed: int, num_workers: int, shuffle: bool = True) -> DataLoader:
    """A loader whose order and augmentation are fixed by `seed` (the caller seeds torch too), so an epoch
    resumed from a checkpoint replays exactly."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


def save_run_config(args: argparse.Namespace, variant: str) -> None:
    """Writes `args.json`, or checks that an existing run in the save path has the same architecture."""
    path = Path(args.save_path) / "args.json"
    config = dict(vars(args), variant=variant)
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in ARCH_KEYS if k in old and old[k] != config.get(k)]
        if diff:
            raise UserError(f"{args.save_path} holds a run with other settings ({', '.join(f'{k}={old[k]!r}' for k in diff)}); "
                            "choose a new --save_path or the same flags")
    path.write_text(json.dumps(config, indent=2))


def train_text_adapter(model: AdaptedCLIP, loader: DataLoader, optimizer: torch.optim.Optimizer,
                       anchor_fn: AnchorFn, bank: PromptBank, args: argparse.Namespace, device: torch.device,
                       desc: str) -> float:
    """One Stage-1 epoch; returns the mean loss. Stage-1 features are computed without gradient; the
    anchors (and so the text adapters) get the gradient."""
    model.train()
    total = 0.0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        class_idx = bank.class_indices(batch["class_name"], device)
        with autocast(device, args.precision):
            with torch.no_grad():
                feats, _ = model.stage1_features(images)
            anchors = anchor_fn(images, class_idx, feats)
            loss = stage1_loss(feats, anchors, masks, model.grid, args.stage1_all_levels, args.text_norm_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(1, len(loader))


def train_image_adapter(model: AdaptedCLIP, loader: DataLoader, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, anchor_fn: AnchorFn, bank: PromptBank,
                        args: argparse.Namespace, device: torch.device, desc: str) -> float:
    """One Stage-2 epoch (scheduler stepped per iteration); returns the mean loss."""
    model.train()
    total = 0.0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        class_idx = bank.class_indices(batch["class_name"], device)
        with autocast(device, args.precision):
            with torch.no_grad():
                anchors = anchor_fn(images, class_idx)
            seg_tokens, det_token = model(images)
            loss = stage2_loss(seg_tokens, det_token, anchors, masks, labels, model.grid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(1, len(loader))


def run_stage(
    name: str, ckpt_path: Path, state: dict, epochs: int, train_epoch: Callable[[int], float], seed: int,
    logger, keep_each_epoch: bool = False,
) -> None:
    """Epoch loop with resume. `state` maps checkpoint keys to objects with `state_dict` (modules,
    optimizer, scheduler); the checkpoint is `{"epoch": completed epochs, **states}` and a run resumes
    at that epoch. Each epoch reseeds torch from (seed, epoch), so a resumed run replays the same data
    order and augmentations."""
    start = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        for key, obj in state.items():
            if key.endswith("_scheduler") and key not in ckpt:
                logger.info(f"{ckpt_path} has no {key} (written by the original code?): the lr schedule restarts")
                continue
            load_module_state(obj, ckpt, key, ckpt_path)
        start = int(ckpt["epoch"])
        logger.info(f"{name}: loaded {ckpt_path} (after epoch {start})")
    for epoch in range(start, epochs):
        seed_everything(seed + epoch)
        loss = train_epoch(epoch)
        ckpt = {"epoch": epoch + 1, **{k: v.state_dict() for k, v in state.items()}}
        atomic_save(ckpt, ckpt_path)
        if keep_each_epoch:
            atomic_save(ckpt, ckpt_path.with_name(f"{ckpt_path.stem}_{epoch + 1}.pth"))
        logger.info(f"{name} epoch {epoch + 1}/{epochs}: loss {loss:.4f}")


def setup_run(args: argparse.Namespace, variant: str) -> tuple[torch.device, Path, logging.Logger]:
    """Device, precision, save folder, log file and the random-weights banner."""
    device = resolve_device(args.device)
    args.precision = resolve_precision(args, device)
    save_dir = ensure_writable_dir(args.save_path)
    save_run_config(args, variant)
    logger = setup_logger(save_dir, "train")
    if args.pretrained == "none":
        logger.info(RANDOM_WEIGHTS_BANNER)
    logger.info(f"{variant} training on {device} ({args.precision}): {vars(args)}")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return device, save_dir, logger


def training_shot(args: argparse.Namespace) -> int | None:
    return args.shot if args.training_mode == "few_shot" else None


def make_bank(args: argparse.Namespace, device: torch.device) -> PromptBank:
    """Prompts of every class of the training set."""
    ds = load_dataset(args, args.dataset, training_shot(args))
    return PromptBank(get_tokenizer(args.model), args.dataset, ds.class_names).to(device)


def run_stage1(args: argparse.Namespace, model: AdaptedCLIP, bank: PromptBank, device: torch.device,
               save_dir: Path, logger, modules: dict[str, nn.Module] | None = None,
               ckpt_name: str = "text_adapter.pth", anchor_fn: AnchorFn | None = None) -> None:
    """Stage 1: trains `modules` (default the text adapter) with one Adam optimizer."""
    if args.text_epoch <= 0:
        return
    ds = load_dataset(args, args.dataset, training_shot(args), augment=True)
    modules = modules or {"text_adapter": model.text_adapter}
    anchor_fn = anchor_fn or class_anchor_fn(model, bank, adapt=True, grad=True)
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.text_lr, betas=(0.5, 0.999))

    def epoch_fn(epoch: int) -> float:
        loader = make_loader(ds, args.text_batch_size, args.seed + epoch, args.num_workers)
        return train_text_adapter(model, loader, optimizer, anchor_fn, bank, args, device,
                                  f"stage 1 epoch {epoch + 1}/{args.text_epoch}")

    run_stage("stage 1", save_dir / ckpt_name, {**modules, "text_optimizer": optimizer}, args.text_epoch,
              epoch_fn, args.seed, logger)
    for m in modules.values():
        m.requires_grad_(False)


def run_stage2(args: argparse.Namespace, model: AdaptedCLIP, bank: PromptBank, device: torch.device,
               save_dir: Path, logger, anchor_fn: AnchorFn) -> None:
    """Stage 2: trains the image adapters; `anchor_fn` gives the frozen text side's anchors."""
    if args.image_epoch <= 0:
        return
    ds = load_dataset(args, args.dataset, training_shot(args), augment=True, color_jitter=True)
    optimizer = torch.optim.Adam(model.image_adapter.parameters(), lr=args.image_lr, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16000, 32000], gamma=0.5)

    def epoch_fn(epoch: int) -> float:
        loader = make_loader(ds, args.image_batch_size, args.seed + 10_000 + epoch, args.num_workers)
        return train_image_adapter(model, loader, optimizer, scheduler, anchor_fn, bank, args, device,
                                   f"stage 2 epoch {epoch + 1}/{args.image_epoch}")

    state = {"image_adapter": model.image_adapter, "image_optimizer": optimizer, "image_scheduler": scheduler}
    run_stage("stage 2", save_dir / "image_adapter.pth", state, args.image_epoch, epoch_fn,
              args.seed + 10_000, logger, keep_each_epoch=True)


@cli_main
def main() -> None:
    args = get_parser().parse_args()
    device, save_dir, logger = setup_run(args, "baseline")
    seed_everything(args.seed)
    model = build_model(args).to(device)
    bank = make_bank(args, device)
    run_stage1(args, model, bank, device, save_dir, logger)
    run_stage2(args, model, bank, device, save_dir, logger,
               class_anchor_fn(model, bank, adapt=args.text_epoch > 0))
    logger.info(f"done: checkpoints in {save_dir}")


if __name__ == "__main__":
    main()
