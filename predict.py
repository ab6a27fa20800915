"""Anomaly maps and image scores of any images, with a trained AA-CLIP (baseline or cross-attention).

    python predict.py --save_path ckpt/baseline --images photo.jpg --class_name bottle --dataset MVTec
    python predict.py --save_path ckpt/cross_attention --images shots/ 'more/**/*.png' --class_name metal_nut

Writes <out>/overlays/<image>.png (the anomaly map as a heat map over the image), <out>/scores.csv and
<out>/scores.json, all at once at the end: a run that fails leaves <out> as it was. Scores are raw:
image_score = ((det @ T)[1] + 1) / 2 and map_max = the maximum of the anomaly map, both as test.py computes
them before its tables min-max normalise maps and scores over all test images of a class (which a
prediction on single images cannot do). Compare scores within one run
and class only, and choose a threshold on images whose labels you know.
Model flags default to the ones saved in <save_path>/args.json by training.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dataset import DatasetError, get_dataset_info, get_real_name, load_image
from dataset.check import UNREADABLE, read_size
from dataset.loader import to_rgb
from dataset.make_metadata import IMAGE_EXTS
from cli import (RANDOM_WEIGHTS_BANNER, add_model_args, cli_main, compile_for, epoch_checkpoints, load_image_adapter,
                 load_model, parse_run_args)
from forward_utils import AnchorFn, PromptBank, anomaly_map, check_blur_fits, image_logits
from model import AdaptedCLIP, get_tokenizer
from utils.distributed import resolve_device
from utils.argtypes import non_negative_int, positive_int
from utils.errors import UserError
from utils.io import OutputFolder, staged_dir
from utils.progress import progress
from utils.provenance import manifest

SCORE_NOTE = ("raw scores: image_score = ((det @ T)[1] + 1) / 2, map_max = max of the anomaly map; test.py's "
              "tables min-max normalise them per class over a whole test set, single predictions cannot")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_run=True)
    g = p.add_argument_group("prediction")
    g.add_argument("--save_path", required=True, help="folder written by train.py or train_cross_attention.py")
    g.add_argument("--images", nargs="+", required=True,
                   help="image files (any format PIL reads), folders (their .png/.jpg/.jpeg/.bmp/.tif/.tiff files, "
                        "recursively) or quoted glob patterns ('**' recurses)")
    g.add_argument("--class_name", required=True,
                   help="what the images show, e.g. bottle or metal_nut: the prompts describe it")
    g.add_argument("--dataset", default=None,
                   help="take the class's prompt name and the domain (map blur) from this dataset's constants, "
                        "e.g. MVTec; any name is allowed (default: the class name with '_' as spaces, Industrial)")
    g.add_argument("--out", default=None, help="output folder (default: <save_path>/predictions)")
    g.add_argument("--epoch", type=positive_int, default=None,
                   help="use image_adapter_<epoch>.pth (default: the last epoch)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: %(default)s)")
    g.add_argument("--num_workers", type=non_negative_int, default=2,
                   help="image decoding processes (default: %(default)s)")
    g.add_argument("--text_context", choices=["image", "none"], default=None,
                   help="cross-attention runs only: anchors from each image's own context (the default), or "
                        "with the cross-attention bypassed")
    g.add_argument("--color_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="map values shown as the coldest and hottest colour, the same for every image "
                        "(default: each map's own min and max, which makes every map look hot somewhere)")
    return p


def expand_images(specs: list[str]) -> list[Path]:
    """The image files that `specs` name: files, folders (image extensions, recursively) and glob patterns,
    each sorted, in the order given, without duplicates."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        elif path.is_file():
            found.append(path)
        elif any(c in spec for c in "*?["):
            found += sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file())
        else:
            raise UserError(f"--images {spec}: no such file or folder")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    if not unique:
        raise UserError(f"--images {' '.join(specs)} names no image files ({'/'.join(IMAGE_EXTS)} in folders)")
    return list(unique.values())


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be decoded (fully: a truncated file has a good header), or None."""
    try:
        read_size(path, decode=True)
    except DatasetError as e:
        return str(e)
    except OSError as e:
        return f"cannot read {path} ({e.strerror or e})"
    return None


def check_readable(paths: list[Path], threads: int = 1) -> None:
    """Decodes every file (`threads` at a time), so that a file that is not an image, or a truncated one,
    stops the run before the model is built; the error lists all of them."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        bad = [msg for msg in pool.map(_unreadable, paths) if msg]
    if bad:
        raise UserError(f"{len(bad)} of the --images cannot be read as images (not images, or corrupted or "
                        "truncated); copy them again, or remove them or pass other files:\n" + "\n".join(bad))


def overlay_names(paths: list[Path]) -> list[str]:
    """A unique PNG name per image: its path relative to the images' common folder with '/' as '_'; a
    clash (a.png and a.jpg) gets the image's index."""
    absolute = [p.resolve() for p in paths]
    base = Path(os.path.commonpath([p.parent for p in absolute]))
    names: list[str] = []
    used: set[str] = set()
    for i, p in enumerate(absolute):
        name = p.relative_to(base).with_suffix("").as_posix().replace("/", "_")
        name = f"{name}_{i}" if name in used else name
        used.add(name)
        names.append(name + ".png")
    return names


class ImageFiles(Dataset):
    """Image files as model inputs: float [3, S, S], preprocessed as the test loader does."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(str(self.paths[index]), self.image_size)


@torch.no_grad()
def predict_batches(model: AdaptedCLIP, loader: DataLoader, anchor_fn: AnchorFn, domain: str,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of one class (row 0 of the prompt bank): anomaly maps [B, S, S] and image scores [B], as
    test.predict computes them."""
    for images in progress(loader, "predict"):
        images = images.to(device, non_blocking=True)
        class_idx = torch.zeros(len(images), dtype=torch.long, device=device)
        with model.autocast():
            anchors = anchor_fn(images, class_idx)
            seg_tokens, det_token = model(images)
        yield (anomaly_map(seg_tokens, anchors, model.grid, images.shape[-1], domain),
               (image_logits(det_token, anchors)[:, 1] + 1) / 2)


def overlay(image: Image.Image, amap: np.ndarray, lo: float, hi: float) -> Image.Image:
    """`amap` [S, S] as a jet heat map resized to the image (bilinear), half-blended over it; values
    outside [lo, hi] are clipped."""
    import matplotlib

    heat = np.asarray(Image.fromarray(amap.astype(np.float32)).resize(image.size, Image.BILINEAR))
    norm = np.clip((heat - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(heat)
    colours = (matplotlib.colormaps["jet"](norm)[..., :3] * 255).round().astype(np.uint8)
    return Image.blend(image, Image.fromarray(colours), 0.5)


def _decode_rgb(path: Path) -> Image.Image:
    """The image as RGB for its overlay (check_readable decoded it already: an error here means that the
    file changed during the run)."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except UNREADABLE as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); it changed during the run; "
                        "nothing was written: run again") from None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_scores(rows: list[dict], folder: OutputFolder, meta: dict) -> None:
    """`scores.csv` (one row per image) and `scores.json` (the run's settings and the rows)."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["image_path", "class_name", "image_score", "map_max", "overlay"])
    for r in rows:
        w.writerow([r["image_path"], r["class_name"], f"{r['image_score']:.6f}", f"{r['map_max']:.6f}",
                    r["overlay"]])
    folder.write("scores.csv", text.getvalue())
    folder.write("scores.json", json.dumps({"meta": meta, "images": rows}, indent=2))


@cli_main
def main() -> None:
    args = parse_run_args(get_parser)
    if args.color_range and args.color_range[0] >= args.color_range[1]:
        raise UserError(f"--color_range {args.color_range[0]:g} {args.color_range[1]:g}: LO must be below HI")
    device = resolve_device(args.device)
    if args.pretrained == "none":
        print(RANDOM_WEIGHTS_BANNER)
    paths = expand_images(args.images)
    check_readable(paths, threads=min(8, os.cpu_count() or 1))
    checkpoints = epoch_checkpoints(Path(args.save_path))
    epoch = args.epoch if args.epoch is not None else max(checkpoints)
    if epoch not in checkpoints:
        raise UserError(f"--epoch {epoch}: no image_adapter_{epoch}.pth in {args.save_path}; saved epochs: "
                        f"{list(checkpoints)}")
    out = Path(args.out or Path(args.save_path) / "predictions")
    # Everything is written into a folder beside `out` and moved into `out` when all is written: a run
    # that fails (an image that cannot be decoded after all, a full disk, Ctrl-C) leaves `out` as it was.
    with staged_dir(out, "--out") as stage:
        prompt_name, domain, variant, epoch, n = _predict(args, device, paths, checkpoints, epoch,
                                                          OutputFolder(stage, out, "--out"))
    print(f"{n} image(s) of '{prompt_name}' ({domain}) with {variant} epoch {epoch}: overlays in "
          f"{out / 'overlays'}, scores in {out / 'scores.csv'} and {out / 'scores.json'}")
    if args.pretrained == "none":
        print(RANDOM_WEIGHTS_BANNER)


def _predict(args: argparse.Namespace, device: torch.device, paths: list[Path], checkpoints: dict[int, Path],
             epoch: int, folder: OutputFolder) -> tuple[str, str, str, int, int]:
    """Writes the overlays and scores of `paths` into `folder`; returns what the summary line prints."""
    model, text_trained = load_model(args, device)
    load_image_adapter(model, checkpoints[epoch])
    model.eval()
    dataset = args.dataset or ""  # an unknown name: the class name as written, Industrial domain
    domain = get_dataset_info(dataset)["domain"]
    check_blur_fits(model.grid, domain)
    bank = PromptBank(get_tokenizer(args.model), dataset, [args.class_name]).to(device)
    anchor_fn = args.variant.anchor_fn(model, bank, args, "test", text_trained)
    loader = DataLoader(ImageFiles(paths, args.image_size), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    rows, files = [], iter(zip(paths, overlay_names(paths)))
    compile_for(model, args, device, args.batch_size)
    for maps, scores in predict_batches(model, loader, anchor_fn, domain,
                                        device):
        # zip pulls from `files` only while the batch has maps left, so files stay in step with batches.
        for amap, score, (path, name) in zip(maps.float().cpu().numpy(), scores.tolist(), files):
            image = _decode_rgb(path)
            lo, hi = args.color_range or (float(amap.min()), float(amap.max()))
            folder.write(f"overlays/{name}", png_bytes(overlay(image, amap, lo, hi)))
            rows.append({"image_path": str(path), "class_name": args.class_name, "image_score": score,
                         "map_max": float(amap.max()), "overlay": f"overlays/{name}"})
    variant = args.variant.name + args.variant.result_suffix(args)
    prompt_name = get_real_name(dataset, args.class_name)
    write_scores(rows, folder, {
        "save_path": args.save_path, "checkpoint": str(checkpoints[epoch]), "epoch": epoch, "variant": variant,
        "model": args.model, "pretrained": args.pretrained, "random_weights": args.pretrained == "none",
        "dataset": args.dataset, "class_name": args.class_name, "prompt_name": prompt_name, "domain": domain,
        "image_size": args.image_size, "precision": model.precision, "scores": SCORE_NOTE,
        "manifest": manifest(args.pretrained, {}, args.weights_sha256), "training_manifest": args.training_manifest,
    })
    return prompt_name, domain, variant, epoch, len(rows)


if __name__ == "__main__":
    main()
