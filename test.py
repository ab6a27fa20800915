"""Evaluate a trained AA-CLIP (baseline or cross-attention) on a dataset's test split.

    python test.py --save_path ckpt/baseline --dataset MVTec
    python test.py --save_path ckpt/baseline --dataset MVTec --all_epochs --visualize
    torchrun --standalone --nproc_per_node 2 test.py --save_path ckpt/baseline --dataset MVTec

Model flags default to the ones saved in <save_path>/args.json by training. Under torchrun each process
scores a contiguous share of the test images, in the batches one process would form, and rank 0 gathers
the maps, scores and masks, computes the metrics (equal to one process's) and writes every output.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cli import (RANDOM_WEIGHTS_BANNER, cli_main, epoch_checkpoints, get_test_parser, load_dataset, load_image_adapter,
                 load_model, metadata_file, parse_run_args)
from dataset import ADDataset, get_dataset_info
from engine import ImageForwardFn, fast_image_forward
from forward_utils import AnchorFn, PromptBank, anomaly_map, image_logits
from metrics import METRIC_NAMES, NonFiniteError, mean_metrics, metrics_eval
from model import AdaptedCLIP, get_tokenizer
from utils.distributed import gather_rows, init_distributed, is_main, rank, same_outcome, shard, world_size
from utils.errors import UserError
from utils.io import OutputFolder, ensure_writable_dir, remove_stale_temporaries, setup_logger, staged_dir
from utils.progress import progress
from utils.provenance import manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the model flags the command line did not give from the run's args.json."""
    return parse_run_args(lambda: get_test_parser(__doc__), argv)


@torch.no_grad()
def predict(model: AdaptedCLIP, forward: ImageForwardFn, loader: DataLoader, anchor_fn: AnchorFn, domain: str,
            device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anomaly maps [N, S, S], image scores `(s + 1) / 2` [N] and ground-truth masks [N, S, S] (bool) of
    every image, in loader order; `forward` is the model's image forward (`fast_image_forward`)."""
    maps, scores, masks = [], [], []
    for batch in progress(loader, desc, enabled=is_main()):
        images = batch["image"].to(device, non_blocking=True)
        class_idx = batch["class_idx"].to(device, non_blocking=True)  # rows of `bank`, built from ds.class_names
        with model.autocast():
            anchors = anchor_fn(images, class_idx)
            seg_tokens, det_token = forward(images)
        maps.append(anomaly_map(seg_tokens, anchors, model.grid, images.shape[-1], domain))
        scores.append((image_logits(det_token, anchors)[:, 1] + 1) / 2)
        masks.append(batch["mask"][:, 0].to(device, non_blocking=True).bool())
    return torch.cat(maps), torch.cat(scores), torch.cat(masks)


def shard_loader(ds: ADDataset, batch_size: int, num_workers: int, device: torch.device
                 ) -> tuple[DataLoader, list[int]]:
    """This rank's loader and every rank's image count. The ranks take contiguous runs of whole batches,
    so each image is scored in the very batch one process would put it in: the maps do not depend on
    the number of processes (batch shapes can change kernels, and so low bits)."""
    n_batches = math.ceil(len(ds) / batch_size)

    def images(r: int) -> range:
        batches = shard(n_batches, world_size(), r)
        return range(batches.start * batch_size, min(batches.stop * batch_size, len(ds)))

    loader = DataLoader(Subset(ds, images(rank())), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    return loader, [len(images(r)) for r in range(world_size())]


def evaluate_classes(ds: ADDataset, maps: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor,
                     domain: str) -> dict[str, dict]:
    """Per-class metrics (percent, None where undefined)."""
    names = np.array([s["class_name"] for s in ds.samples])
    labels = torch.tensor([int(s["label"]) for s in ds.samples], device=maps.device)
    results = {}
    for name in ds.class_names:
        idx = torch.from_numpy(np.flatnonzero(names == name)).to(maps.device)
        try:
            results[name] = metrics_eval(maps[idx], scores[idx], labels[idx],
                                         masks[idx] if ds.has_masks else None, domain, class_name=name)
        except NonFiniteError as e:
            raise UserError(f"{e}: the model's outputs overflowed or the checkpoint holds NaN (a diverged "
                            "training?); nothing was written. Try --precision fp32, or evaluate another epoch") from None
    return results


def format_table(results: dict[str, dict], title: str) -> str:
    """Markdown table of the per-class metrics and their mean."""
    rows = {**results, "mean": mean_metrics(results)}
    head = "| class | " + " | ".join(METRIC_NAMES) + " |"
    lines = [title, "", head, "|" + "---|" * (len(METRIC_NAMES) + 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if m[k] is None else f"{m[k]:.2f}" for k in METRIC_NAMES) + " |")
    return "\n".join(lines)


def save_results(results: dict[str, dict], folder: OutputFolder, name: str, meta: dict) -> None:
    """`<name>.csv` (one row per class plus mean) and `<name>.json` (with the run's metadata)."""
    rows = {**results, "mean": mean_metrics(results)}
    table = [["class", *METRIC_NAMES]]
    table += [[cls, *("n/a" if m[k] is None else f"{m[k]:.4f}" for k in METRIC_NAMES)] for cls, m in rows.items()]
    folder.write(f"{name}.csv", csv_text(table))
    folder.write(f"{name}.json", json.dumps({"meta": meta, "per_class": results, "mean": rows["mean"]}, indent=2))


def csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def save_image_scores(ds: ADDataset, maps: torch.Tensor, scores: torch.Tensor, folder: OutputFolder,
                      name: str) -> None:
    """`<name>_images.csv`: per-image raw outputs (before the per-class min-max normalisation): image
    score `(s + 1) / 2` and the anomaly map's maximum."""
    peaks = maps.flatten(1).amax(dim=1).cpu().tolist()
    rows = [["image_path", "class_name", "label", "image_score", "map_max"]]
    rows += [[sample["image_path"], sample["class_name"], sample["label"], f"{score:.6f}", f"{peak:.6f}"]
             for sample, score, peak in zip(ds.samples, scores.cpu().tolist(), peaks)]
    folder.write(f"{name}_images.csv", csv_text(rows))


def visualize(ds: ADDataset, maps: torch.Tensor, folder: OutputFolder, name: str) -> None:
    """`vis/<name>/<class>/<image>.png`: image | ground truth | anomaly map panels, one per test image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dataset import denormalize

    for i, sample in enumerate(progress(ds.samples, "visualize")):
        item = ds[i]
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        panels = [(denormalize(item["image"]), "image", None), (item["mask"][0].numpy(), "ground truth", "gray"),
                  (maps[i].float().cpu().numpy(), "anomaly map", "jet")]
        for ax, (img, title, cmap) in zip(axes, panels):
            ax.imshow(img, cmap=cmap)
            ax.set_title(title)
            ax.axis("off")
        fig.suptitle(f"{sample['class_name']} label={sample['label']}")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=80)
        plt.close(fig)
        image = Path(sample["image_path"]).with_suffix("").as_posix().replace("/", "_")
        folder.write(Path("vis") / name / sample["class_name"] / f"{image}.png", png.getvalue())


@cli_main
def main() -> None:
    args = parse_args()
    device = init_distributed(args.device)
    save_dir = Path(args.save_path)
    results_dir = Path(args.results_dir or save_dir / "results")
    with same_outcome():  # every rank validates and loads; rank 0 alone writes
        if args.all_epochs and args.epoch is not None:
            raise UserError("--epoch and --all_epochs contradict each other; drop one")
        checkpoints = epoch_checkpoints(save_dir)
        if args.all_epochs:
            chosen = list(checkpoints.items())
        else:
            epoch = args.epoch if args.epoch is not None else max(checkpoints)
            if epoch not in checkpoints:
                raise UserError(f"no checkpoint for epoch {epoch} in {save_dir}; saved epochs: {list(checkpoints)}")
            chosen = [(epoch, checkpoints[epoch])]

        t_start = time.perf_counter()
        model, text_trained = load_model(args, device)
        t_model = time.perf_counter() - t_start
        model.eval()
        for _, path in chosen:  # every checkpoint must load before anything is written
            load_image_adapter(model, path)
        ds = load_dataset(args, args.dataset, None)
        domain = get_dataset_info(args.dataset)["domain"]
        bank = PromptBank(get_tokenizer(args.model), args.dataset, ds.class_names).to(device)
        anchor_fn = args.variant.anchor_fn(model, bank, args, "test", text_trained)
        if is_main():
            ensure_writable_dir(results_dir, "--results_dir")
            remove_stale_temporaries(results_dir)
        logger = setup_logger(results_dir, "test")
    banner = RANDOM_WEIGHTS_BANNER if args.pretrained == "none" else ""
    if banner:
        logger.info(banner)
    loader, counts = shard_loader(ds, args.batch_size, args.num_workers, device)
    suffix = args.variant.result_suffix(args)
    forward = fast_image_forward(model, args.compile)
    test_list = metadata_file(args, args.dataset, None)
    inputs = manifest(args.pretrained, {f"{args.dataset}/{test_list.name}": test_list}, args.weights_sha256)
    for epoch, path in chosen:
        load_image_adapter(model, path)
        t0 = time.perf_counter()
        local = predict(model, forward, loader, anchor_fn, domain, device,
                        f"{args.dataset} epoch {epoch}") if counts[rank()] else None
        gathered = gather_rows(local, counts)
        if not is_main():
            continue
        maps, scores, masks = gathered
        if device.type == "cuda":  # the GPU work (and the transfers from the other ranks) counts as scoring
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        results = evaluate_classes(ds, maps, scores, masks if ds.has_masks else None, domain)
        on = f" on {world_size()} processes" if world_size() > 1 else ""
        logger.info(f"{len(ds)} images{on}: model built in {t_model:.1f} s, images read and scored in "
                    f"{t1 - t0:.1f} s, metrics in {time.perf_counter() - t1:.1f} s")
        title = (f"{args.dataset} | {args.variant.name}{suffix} | {path.name} | {args.model} pretrained={args.pretrained}"
                 + (f"\n{banner}" if banner else ""))
        logger.info("\n" + format_table(results, title))
        name = f"{args.dataset}_epoch{epoch}{suffix}"
        meta = {"dataset": args.dataset, "epoch": epoch, "checkpoint": str(path), "variant": args.variant.name + suffix,
                "model": args.model, "pretrained": args.pretrained, "random_weights": bool(banner),
                "precision": model.precision, "image_size": args.image_size, "manifest": inputs,
                "training_manifest": args.training_manifest}
        with staged_dir(results_dir, "--results_dir") as stage:  # an epoch's outputs appear all at once, or none
            folder = OutputFolder(stage, results_dir, "--results_dir")
            save_results(results, folder, name, meta)
            save_image_scores(ds, maps, scores, folder, name)
            if args.visualize:
                visualize(ds, maps, folder, name)
        logger.info(f"saved {results_dir / name}.csv, .json and _images.csv" + (", vis/" if args.visualize else ""))


if __name__ == "__main__":
    main()
