"""Evaluate a trained AA-CLIP (baseline or cross-attention) on a dataset's test split.

    python test.py --save_path ckpt/baseline --dataset MVTec
    python test.py --save_path ckpt/baseline --dataset MVTec --all_epochs --visualize
    python test.py --save_path ckpt/baseline --dataset MVTec --select_epoch heldout
    torchrun --standalone --nproc_per_node 2 test.py --save_path ckpt/baseline --dataset MVTec

Which epoch is reported is declared in every results JSON (`meta.epoch_selection`): `last` by default,
`fixed` for --epoch K, `all_epochs` for each file of --all_epochs (which also writes
`<dataset>_curve.csv`/`.png`, the mean metrics per epoch). `--select_epoch best_on_test` picks the epoch
with the best --select_metric on this test set and writes `<dataset>_best_on_test.*` and the curve, all
labelled "epoch chosen on the test set (optimistic)"; `--select_epoch heldout` picks it on the part of
the training dataset the run did not train on (its full-shot list minus its few-shot training list) and
writes `<dataset>_heldout.*` with the held-out scores of every epoch.

Model flags default to the ones saved in <save_path>/args.json by training. Under torchrun each process
scores a contiguous share of the test images, in the batches one process would form, and rank 0 gathers
the maps, scores and masks, computes the metrics (equal to one process's) and writes every output.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cli import (RANDOM_WEIGHTS_BANNER, cli_main, compile_for, epoch_checkpoints, get_test_parser, load_dataset,
                 load_image_adapter, load_model, metadata_file, parse_run_args)
from dataset import ADDataset, get_dataset_info, read_metadata
from forward_utils import AnchorFn, PromptBank, anomaly_map, check_blur_fits, image_logits
from metrics import METRIC_NAMES, NonFiniteError, label_regions, mean_metrics, metrics_eval
from model import AdaptedCLIP, get_tokenizer
from utils.distributed import (gather_objects, gather_rows, init_distributed, is_main, rank, same_outcome, shard,
                               world_size)
from utils.errors import UserError
from utils.io import OutputFolder, ensure_writable_dir, remove_stale_temporaries, setup_logger, staged_dir
from utils.progress import progress
from utils.provenance import manifest, sha256_file
from variants import read_saved_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the model flags the command line did not give from the run's args.json."""
    return parse_run_args(lambda: get_test_parser(__doc__), argv)


@torch.no_grad()
def predict(model: AdaptedCLIP, loader: Iterable[dict], anchor_fn: AnchorFn, domain: str,
            device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anomaly maps [N, S, S], image scores `(s + 1) / 2` [N] and ground-truth masks [N, S, S] of every image,
    in loader order: bool, or int32 region labels where the loader gives them (`WithRegions`)."""
    maps, scores, masks = [], [], []
    for batch in progress(loader, desc, enabled=is_main()):
        images = batch["image"].to(device, non_blocking=True)
        class_idx = batch["class_idx"].to(device, non_blocking=True)  # rows of `bank`, built from ds.class_names
        with model.autocast():
            anchors = anchor_fn(images, class_idx)
            seg_tokens, det_token = model(images)
        maps.append(anomaly_map(seg_tokens, anchors, model.grid, images.shape[-1], domain))
        scores.append((image_logits(det_token, anchors)[:, 1] + 1) / 2)
        mask = batch["regions"] if "regions" in batch else batch["mask"][:, 0].bool()
        masks.append(mask.to(device, non_blocking=True))
    return torch.cat(maps), torch.cat(scores), torch.cat(masks)


class WithRegions(Dataset):
    """`ds`'s items with "regions", the 8-connected regions of the mask (`metrics.label_regions`): labelled by
    the loader's workers while the GPU scores, instead of by AUPRO on one CPU core afterwards (1.3 s of an
    MVTec evaluation, docs/benchmarks.md)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        item["regions"] = torch.from_numpy(label_regions(item["mask"][0].numpy() != 0))
        return item


class StartedLoader:
    """A DataLoader whose first pass starts when it is made: its workers read and resize the first batches
    while the model is built (evaluation start-up, docs/benchmarks.md). Later passes start as usual."""

    def __init__(self, loader: DataLoader, start: bool):
        self.loader = loader
        self.started = iter(loader) if start and loader.num_workers else None

    def __iter__(self):
        started, self.started = self.started, None
        return started if started is not None else iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def shard_loader(ds: ADDataset, batch_size: int, num_workers: int, device: torch.device, start: bool = False
                 ) -> tuple[StartedLoader, list[int]]:
    """This rank's loader (its first pass begun when `start`) and every rank's image count. The ranks take
    contiguous runs of whole batches, so each image is scored in the very batch one process would put it
    in: the maps do not depend on the number of processes (batch shapes can change kernels, and so low
    bits)."""
    n_batches = math.ceil(len(ds) / batch_size)

    def images(r: int) -> range:
        batches = shard(n_batches, world_size(), r)
        return range(batches.start * batch_size, min(batches.stop * batch_size, len(ds)))

    source = WithRegions(ds) if ds.has_masks else ds
    loader = DataLoader(Subset(source, images(rank())), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    return StartedLoader(loader, start), [len(images(r)) for r in range(world_size())]


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


def save_results(results: dict[str, dict], folder: OutputFolder, name: str, meta: dict,
                 label: str | None = None) -> None:
    """`<name>.csv` (one row per class plus mean; with `label`, a last column `epoch_selection` holding it)
    and `<name>.json` (with the run's metadata)."""
    rows = {**results, "mean": mean_metrics(results)}
    extra = (["epoch_selection"], [label]) if label else ([], [])
    table = [["class", *METRIC_NAMES, *extra[0]]]
    table += [[cls, *("n/a" if m[k] is None else f"{m[k]:.4f}" for k in METRIC_NAMES), *extra[1]]
              for cls, m in rows.items()]
    folder.write(f"{name}.csv", csv_text(table))
    folder.write(f"{name}.json", json.dumps({"meta": meta, "per_class": results, "mean": rows["mean"]}, indent=2))


def csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def save_image_scores(ds: ADDataset, maps: torch.Tensor, scores: torch.Tensor, folder: OutputFolder,
                      name: str, label: str | None = None) -> None:
    """`<name>_images.csv`: per-image raw outputs (before the per-class min-max normalisation): image
    score `(s + 1) / 2` and the anomaly map's maximum; with `label`, a last column `epoch_selection`."""
    peaks = maps.flatten(1).amax(dim=1).cpu().tolist()
    extra = (["epoch_selection"], [label]) if label else ([], [])
    rows = [["image_path", "class_name", "label", "image_score", "map_max", *extra[0]]]
    rows += [[sample["image_path"], sample["class_name"], sample["label"], f"{score:.6f}", f"{peak:.6f}", *extra[1]]
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


BEST_ON_TEST_LABEL = "epoch chosen on the test set (optimistic)"


@dataclass
class EvalSet:
    """Images to score: the dataset, this rank's loader and every rank's image count, its domain (the
    test-time blur) and, once the model is built (`with_anchors`), the anchors of its classes."""
    name: str
    ds: ADDataset
    loader: StartedLoader
    counts: list[int]
    domain: str
    anchor_fn: AnchorFn | None = None


def eval_set(ds: ADDataset, name: str, args: argparse.Namespace, device: torch.device, start: bool) -> EvalSet:
    """`ds` (of dataset `name`) to score; `start`: its loader's workers begin reading now."""
    loader, counts = shard_loader(ds, args.batch_size, args.num_workers, device, start)
    return EvalSet(name, ds, loader, counts, get_dataset_info(name)["domain"])


def with_anchors(images: EvalSet, model: AdaptedCLIP, args: argparse.Namespace, device: torch.device,
                 text_trained: bool) -> EvalSet:
    """`images` ready to score with the run's test anchors."""
    check_blur_fits(model.grid, images.domain)
    bank = PromptBank(get_tokenizer(args.model), images.name, images.ds.class_names).to(device)
    images.anchor_fn = args.variant.anchor_fn(model, bank, args, "test", text_trained)
    return images


@dataclass
class Scored:
    """One epoch's evaluation (rank 0): per-class metrics, anomaly maps [N, S, S], image scores [N], and the
    seconds the images took to score and the metrics to compute."""
    results: dict[str, dict]
    maps: torch.Tensor
    scores: torch.Tensor
    seconds: tuple[float, float]


def score(model: AdaptedCLIP, images: EvalSet, device: torch.device, desc: str
          ) -> Scored | None:
    """Scores every image of `images` with the weights loaded now; the metrics on rank 0, None elsewhere."""
    t0 = time.perf_counter()
    local = predict(model, images.loader, images.anchor_fn, images.domain, device,
                    desc) if images.counts[rank()] else None
    gathered = gather_rows(local, images.counts)
    if not is_main():
        return None
    maps, scores, masks = gathered
    if device.type == "cuda":  # the GPU work (and the transfers from the other ranks) counts as scoring
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    results = evaluate_classes(images.ds, maps, scores, masks if images.ds.has_masks else None, images.domain)
    return Scored(results, maps, scores, (t1 - t0, time.perf_counter() - t1))


def best_epoch(means: dict[int, dict[str, float | None]], metric: str) -> int | None:
    """The epoch whose mean `metric` is largest, the earliest of equal ones; None where it is n/a throughout."""
    defined = {epoch: m[metric] for epoch, m in means.items() if m.get(metric) is not None}
    return max(defined, key=lambda epoch: (defined[epoch], -epoch)) if defined else None


def pick_epoch(means: dict[int, dict[str, float | None]], metric: str, where: str) -> int:
    """`best_epoch`, or a UserError when `metric` is n/a at every epoch on `where`."""
    epoch = best_epoch(means, metric)
    if epoch is None:
        raise UserError(f"{metric} is n/a at every epoch on {where} (no masks, or one label only); choose another "
                        "--select_metric, e.g. image_auroc or pixel_auroc")
    return epoch


def heldout_dataset(args: argparse.Namespace, saved: dict) -> tuple[ADDataset, dict]:
    """The held-out part of the run's training dataset: its full-shot list without the samples (by image
    path) of the few-shot list the run trained on; and its description for the results JSON. A full-shot
    run holds nothing out; a training list whose content changed since the run (its manifest's SHA-256)
    would hold out other images than the ones the run did not see: both are refused."""
    name, shot = saved.get("dataset"), saved.get("shot")
    if name is None or shot is None:
        raise UserError(f"{args.save_path}/args.json does not say which list the run trained on; --select_epoch "
                        "heldout needs it: use --select_epoch last")
    if saved.get("training_mode") == "full_shot":
        raise UserError(f"{args.save_path} trained on all of {name}'s full-shot list (--training_mode full_shot), "
                        "so nothing of it is held out; use --select_epoch last")
    # The target's --data_root is the training dataset's only when they are the same dataset.
    own = argparse.Namespace(**{**vars(args), "data_root": args.data_root if name == args.dataset else None})
    train_list = metadata_file(own, name, shot)
    full = load_dataset(own, name, None)
    recorded = ((args.training_manifest or {}).get("metadata_sha256") or {}).get(f"{name}/{train_list.name}")
    if recorded is not None and recorded != sha256_file(train_list):
        raise UserError(f"{train_list} changed since {args.save_path} trained on it, so its complement is not the "
                        "run's held-out part; restore the list, or use --select_epoch last")
    trained = {s["image_path"] for s in read_metadata(str(train_list))}
    held = copy.copy(full)  # the same images and settings, fewer samples
    held.samples = [s for s in full.samples if s["image_path"] not in trained]
    if not held.samples:
        raise UserError(f"{train_list} lists every image of {name}'s full-shot list: nothing is held out; use "
                        "--select_epoch last")
    held.class_names = sorted({s["class_name"] for s in held.samples})
    held.class_index = {c: i for i, c in enumerate(held.class_names)}
    return held, {"dataset": name, "images": len(held.samples), "classes": held.class_names,
                  "definition": f"{name}/full-shot.jsonl minus {name}/{train_list.name} (the run's training list), "
                                "by image path",
                  "training_list_checked": recorded is not None, "overlaps_target": name == args.dataset}


def heldout_scores(model: AdaptedCLIP, held: EvalSet, checkpoints: dict[int, Path],
                   metric: str, device: torch.device, logger: logging.Logger) -> dict[int, dict]:
    """The mean metrics of every epoch on the held-out images (rank 0; {} on the others)."""
    means = {}
    for epoch, path in checkpoints.items():
        load_image_adapter(model, path)
        scored = score(model, held, device, f"held-out {held.name} epoch {epoch}")
        if scored is not None:
            means[epoch] = mean_metrics(scored.results)
            value = means[epoch][metric]
            logger.info(f"held-out {held.name} epoch {epoch}: {metric} {'n/a' if value is None else f'{value:.2f}'}")
    return means


def heldout_label(info: dict) -> str:
    """The label of a held-out selection; optimistic where the held-out images are also test images."""
    label = f"epoch chosen on {info['images']} held-out {info['dataset']} training-set images"
    return label + (", which are also test images here (optimistic)" if info["overlaps_target"] else "")


def check_epoch_flags(args: argparse.Namespace) -> None:
    """--epoch, --all_epochs and --select_epoch combinations that contradict each other."""
    if args.all_epochs and args.epoch is not None:
        raise UserError("--epoch and --all_epochs contradict each other; drop one")
    if args.epoch is not None and args.select_epoch != "last":
        raise UserError(f"--epoch {args.epoch} fixes the epoch and --select_epoch {args.select_epoch} chooses one; "
                        "drop one")
    if args.all_epochs and args.select_epoch == "best_on_test":
        raise UserError("--select_epoch best_on_test evaluates every epoch already (its curve holds each epoch's "
                        "means) and labels all it writes as chosen on the test set; for unlabelled per-epoch "
                        "results run --all_epochs on its own")


def save_curve(curve: dict[int, dict], folder: OutputFolder, name: str, title: str, chosen: int | None = None,
               label: str | None = None) -> None:
    """`<name>.csv` (a row per epoch: the mean of each metric over the classes, full precision, n/a where
    undefined; with a selection, the columns `selected` (1 on the chosen epoch) and `epoch_selection`) and
    `<name>.png` (a line per metric, the chosen epoch marked)."""
    rows = [["epoch", *METRIC_NAMES, *(["selected", "epoch_selection"] if label else [])]]
    rows += [[epoch, *("n/a" if m[k] is None else repr(m[k]) for k in METRIC_NAMES),
              *([int(epoch == chosen), label] if label else [])] for epoch, m in curve.items()]
    folder.write(f"{name}.csv", csv_text(rows))
    folder.write(f"{name}.png", curve_png(curve, title, chosen))


def curve_png(curve: dict[int, dict], title: str, chosen: int | None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import, only needed here
    from matplotlib.figure import Figure  # not pyplot: no global state, no display backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    epochs = list(curve)
    for metric in METRIC_NAMES:
        if any(curve[e][metric] is not None for e in epochs):
            ax.plot(epochs, [curve[e][metric] for e in epochs], "o-", label=metric)
    if chosen is not None:
        ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen: epoch {chosen}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over classes (%)")
    ax.legend(fontsize="small")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def write_result(folder: OutputFolder, name: str, ds: ADDataset, scored: Scored, meta: dict, panels: bool,
                 label: str | None = None) -> None:
    """One evaluation's `<name>.csv`, `.json`, `_images.csv` and, with `panels`, its vis/ panels; `label`
    (an epoch selection's) goes into every CSV row."""
    save_results(scored.results, folder, name, meta, label)
    save_image_scores(ds, scored.maps, scored.scores, folder, name, label)
    if panels:
        visualize(ds, scored.maps, folder, name)


@cli_main
def main() -> None:
    args = parse_args()
    device = init_distributed(args.device)
    save_dir = Path(args.save_path)
    results_dir = Path(args.results_dir or save_dir / "results")
    mode, metric = args.select_epoch, args.select_metric
    with same_outcome():  # every rank validates and loads; rank 0 alone writes
        check_epoch_flags(args)
        checkpoints = epoch_checkpoints(save_dir)
        if args.all_epochs or mode != "last":
            chosen = list(checkpoints.items())
        else:
            epoch = args.epoch if args.epoch is not None else max(checkpoints)
            if epoch not in checkpoints:
                raise UserError(f"no checkpoint for epoch {epoch} in {save_dir}; saved epochs: {list(checkpoints)}")
            chosen = [(epoch, checkpoints[epoch])]

        if mode == "heldout":  # before the model: a run without a held-out part stops at once
            held_ds, held_info = heldout_dataset(args, read_saved_args(save_dir))
        # The loader scored first starts reading before the model is built.
        target = eval_set(load_dataset(args, args.dataset, None), args.dataset, args, device, start=mode != "heldout")
        held = eval_set(held_ds, held_info["dataset"], args, device, start=True) if mode == "heldout" else None
        t_start = time.perf_counter()
        model, text_trained = load_model(args, device)
        t_model = time.perf_counter() - t_start
        model.eval()
        for _, path in chosen:  # every checkpoint must load before anything is written
            load_image_adapter(model, path)
        for images in (target, held) if held else (target,):
            with_anchors(images, model, args, device, text_trained)
        if is_main():
            ensure_writable_dir(results_dir, "--results_dir")
            remove_stale_temporaries(results_dir)
        logger = setup_logger(results_dir, "test")
    banner = RANDOM_WEIGHTS_BANNER if args.pretrained == "none" else ""
    if banner:
        logger.info(banner)
    suffix = args.variant.result_suffix(args)
    compile_for(model, args, device, args.batch_size)
    test_list = metadata_file(args, args.dataset, None)
    inputs = manifest(args.pretrained, {f"{args.dataset}/{test_list.name}": test_list}, args.weights_sha256)
    label, selection_scores, chosen_epoch = None, {}, None
    if mode == "heldout":
        label = heldout_label(held_info)
        logger.info(f"--select_epoch heldout: {held_info['definition']}, {held_info['images']} images")
        selection_scores = heldout_scores(model, held, checkpoints, metric, device, logger)
        with same_outcome():
            chosen_epoch = pick_epoch(selection_scores, metric, f"the held-out {held.name} images") if is_main() else None
        chosen_epoch = gather_objects(chosen_epoch)[0]  # every rank then evaluates that epoch on the target
        logger.info(f"{label}: epoch {chosen_epoch} (best held-out {metric})")
        if not args.all_epochs:
            chosen = [(chosen_epoch, checkpoints[chosen_epoch])]
    elif mode == "best_on_test":
        label = BEST_ON_TEST_LABEL
    per_epoch = "all_epochs" if args.all_epochs else "fixed" if args.epoch is not None else "last"

    def meta(epoch: int, path: Path, selection: str) -> dict:
        return {"dataset": args.dataset, "epoch": epoch, "checkpoint": str(path), "epoch_selection": selection,
                "variant": args.variant.name + suffix, "model": args.model, "pretrained": args.pretrained,
                "random_weights": bool(banner), "precision": model.precision, "image_size": args.image_size,
                "manifest": inputs, "training_manifest": args.training_manifest}

    def title(path: Path, note: str = "") -> str:
        return (f"{args.dataset} | {args.variant.name}{suffix} | {path.name} | {args.model} pretrained={args.pretrained}"
                + (f"\n{note}" if note else "") + (f"\n{banner}" if banner else ""))

    curve: dict[int, dict] = {}
    kept: tuple[int, Path, Scored] | None = None  # the evaluation a selection reports
    for epoch, path in chosen:
        load_image_adapter(model, path)
        scored = score(model, target, device, f"{args.dataset} epoch {epoch}")
        if scored is None:
            continue
        on = f" on {world_size()} processes" if world_size() > 1 else ""
        logger.info(f"{len(target.ds)} images{on}: model built in {t_model:.1f} s, images read and scored in "
                    f"{scored.seconds[0]:.1f} s, metrics in {scored.seconds[1]:.1f} s")
        curve[epoch] = mean_metrics(scored.results)
        if epoch == chosen_epoch or (mode == "best_on_test" and best_epoch(curve, metric) == epoch):
            kept = (epoch, path, scored)  # a best_on_test sweep keeps the best so far only
        if mode == "best_on_test":  # writes its curve and the chosen epoch, not each epoch
            logger.info("\n" + format_table(scored.results, title(path, f"one epoch of the sweep: {label}")))
            continue
        if mode == "heldout" and not args.all_epochs:  # the chosen epoch alone: written below, labelled
            continue
        logger.info("\n" + format_table(scored.results, title(path)))
        name = f"{args.dataset}_epoch{epoch}{suffix}"
        with staged_dir(results_dir, "--results_dir") as stage:  # an epoch's outputs appear all at once, or none
            write_result(OutputFolder(stage, results_dir, "--results_dir"), name, target.ds, scored,
                         meta(epoch, path, per_epoch), args.visualize)
        logger.info(f"saved {results_dir / name}.csv, .json and _images.csv" + (", vis/" if args.visualize else ""))
    if mode == "best_on_test":
        with same_outcome():
            chosen_epoch = pick_epoch(curve, metric, f"the {args.dataset} test set") if is_main() else None
        selection_scores = curve
    sweep = args.all_epochs or mode == "best_on_test"
    if not is_main() or not (sweep or label):
        return
    saved = []
    with staged_dir(results_dir, "--results_dir") as stage:  # the curve and the selection appear together
        folder = OutputFolder(stage, results_dir, "--results_dir")
        if sweep:
            name = f"{args.dataset}_curve{suffix}"
            notes = [f"{label}: epoch {chosen_epoch}"] if label else []
            save_curve(curve, folder, name, "\n".join([f"{args.dataset} | {args.variant.name}{suffix} | mean over "
                                                       "classes per epoch", *notes, *([banner] if banner else [])]),
                       chosen_epoch, label)
            saved.append(f"{name}.csv and .png")
        if label:
            epoch, path, scored = kept
            where = "the test set" if mode == "best_on_test" else f"the held-out {held.name} images"
            logger.info("\n" + format_table(scored.results, title(path, f"{label}: epoch {epoch}, mean {metric} "
                                            f"{selection_scores[epoch][metric]:.2f} on {where}")))
            name = f"{args.dataset}_{mode}{suffix}"
            info = {"selection_label": label, "select_metric": metric,
                    "selection_scores": {str(e): m for e, m in selection_scores.items()},
                    **({"heldout": held_info} if mode == "heldout" else {})}
            write_result(folder, name, target.ds, scored, {**meta(epoch, path, mode), **info}, args.visualize, label)
            saved.append(f"{name}.csv, .json and _images.csv" + (", vis/" if args.visualize else ""))
    logger.info(f"saved {'; '.join(str(results_dir / s) for s in saved)}")


if __name__ == "__main__":
    main()
