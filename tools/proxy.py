"""Does training learn? A synthetic cross-class proxy of the zero-shot protocol, with RANDOM backbone weights.

    python -m tools.proxy --out proxy/tiny                                   # tiny model, CPU, about a minute
    python -m tools.proxy --out proxy/b16 --model ViT-B-16 --image_size 224 --device cuda

Draws a synthetic dataset of training classes (ProxyTrain) and one of unseen classes that share the
defect kinds (ProxyTest: colour/shape variants of the same renderers under other names, see
dataset/synthetic.py), trains the baseline (or --variant cross_attention) on ProxyTrain's test split
through train.py's own entry point (the zero-shot protocol trains on a dataset's test split), then scores
ProxyTest with the untrained model, after Stage 1 (epoch 0) and after every Stage-2 epoch. Writes under
--out: data/, run/ (the training run), proxy.csv, proxy.md and proxy.png (pixel and image metrics per epoch,
means over the unseen classes), all labelled RANDOM WEIGHTS.

Beside the original's image AUROC (`image_auroc`: 0.5 max(min-max map) + 0.5 min-max(det score)), the table
has its two parts alone: `image_auroc_map` (the map maximum) and `image_auroc_det` (the det score
`(det @ T)[:, 1]`), and `image_auroc_det_diff`, the det logit difference `(det @ T)[:, 1] - (det @ T)[:, 0]`
that Stage 2's cross-entropy trains (docs/proxy.md explains why they differ).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import test as test_script  # the repository's test.py (run from the repository root), not the stdlib package
import train
import train_cross_attention
from cli import (RANDOM_WEIGHTS_BANNER, build_model, cli_main, epoch_checkpoints, get_test_parser, load_dataset,
                 load_image_adapter, load_model, parse_run_args)
from dataset import get_dataset_info
from dataset.make_metadata import build_metadata
from dataset.synthetic import ALL_CLASSES, make_synthetic
from forward_utils import PromptBank, image_logits
from metrics import auroc, mean_metrics
from model import AdaptedCLIP, get_tokenizer
from utils.argtypes import non_negative_int, positive_float, positive_int
from utils.distributed import resolve_device, seed_everything
from utils.errors import UserError
from utils.io import ensure_writable_dir, write_output

TRAIN_DATASET, TEST_DATASET = "ProxyTrain", "ProxyTest"
TRAINERS = {"baseline": train, "cross_attention": train_cross_attention}
# The columns of the table, means over the unseen classes (percent).
COLUMNS = ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap", "image_auroc_map", "image_auroc_det",
           "image_auroc_det_diff")
LABEL = "RANDOM WEIGHTS"
MARKER = ".proxy"  # marks a folder this tool made, so that a rerun may replace its data and run


@dataclass
class Row:
    """One evaluated state of the model: `name` (untrained, stage 1, epoch k), its Stage-2 epoch (-1 before
    Stage 1, 0 after it) and the mean metrics over the unseen classes."""
    name: str
    epoch: int
    metrics: dict[str, float | None]


def make_data(out: Path, args: argparse.Namespace) -> None:
    """ProxyTrain (the training classes) and ProxyTest (the unseen classes), each with its full-shot list
    under <out>/meta. Both draw their images from --seed; no image is in both (other class names)."""
    for name, classes in ((TRAIN_DATASET, args.train_classes), (TEST_DATASET, args.test_classes)):
        make_synthetic(str(out / name), seed=args.seed, size=args.size, n_normal=args.n_normal,
                       n_anomalous=args.n_anomalous, n_train=0, classes=classes, defect_scale=args.defect_scale)
        build_metadata(name, str(out / name), layout="mvtec", out_dir=str(out / "meta"), shots=())


def train_argv(args: argparse.Namespace, data: Path, save: Path) -> list[str]:
    """train.py's flags for the proxy's run: full-shot on ProxyTrain, random weights."""
    return ["--dataset", TRAIN_DATASET, "--data_root", str(data / TRAIN_DATASET), "--metadata_dir", str(data / "meta"),
            "--training_mode", "full_shot", "--model", args.model, "--pretrained", "none",
            "--image_size", str(args.image_size), "--device", args.device, "--num_workers", str(args.num_workers),
            "--text_epoch", str(args.text_epoch), "--image_epoch", str(args.image_epoch),
            "--text_batch_size", str(args.batch_size), "--image_batch_size", str(args.batch_size),
            "--text_lr", str(args.text_lr), "--image_lr", str(args.image_lr), "--seed", str(args.seed),
            "--save_path", str(save)]


def run_training(args: argparse.Namespace, data: Path, save: Path) -> None:
    """Trains through the variant's script entry point, in this process (its log goes to <save>/train.log;
    stdout is silenced so that the table stays readable)."""
    argv = [f"{args.variant}.py", *train_argv(args, data, save)]
    old = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            TRAINERS[args.variant].main()
    finally:
        sys.argv = old


def test_args(args: argparse.Namespace, data: Path, save: Path) -> argparse.Namespace:
    """test.py's flags for scoring ProxyTest with the run's saved model flags."""
    return parse_run_args(get_test_parser, [
        "--save_path", str(save), "--dataset", TEST_DATASET, "--data_root", str(data / TEST_DATASET),
        "--metadata_dir", str(data / "meta"), "--device", args.device, "--num_workers", str(args.num_workers),
        "--batch_size", str(args.batch_size)])


@torch.no_grad()
def score_classes(model: AdaptedCLIP, targs: argparse.Namespace, text_trained: bool,
                  device: torch.device) -> dict[str, float | None]:
    """Mean over ProxyTest's classes of test.py's metrics (its own `predict` and `evaluate_classes`, so that
    the proxy checks the evaluation path too) and of the image AUROC of each part of the image score: the
    map maximum, the det score (abnormal column, as test.py gives it), the det logit difference."""
    model.eval()
    ds = load_dataset(targs, TEST_DATASET, None)
    bank = PromptBank(get_tokenizer(targs.model), TEST_DATASET, ds.class_names).to(device)
    anchor_fn = targs.variant.anchor_fn(model, bank, targs, "test", text_trained)
    domain = get_dataset_info(TEST_DATASET)["domain"]
    loader = DataLoader(ds, batch_size=targs.batch_size, shuffle=False, num_workers=targs.num_workers)
    seen_anchors, seen_dets = [], []

    def recording_anchors(images: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
        seen_anchors.append(anchor_fn(images, class_idx))
        return seen_anchors[-1]

    # One vision pass: test.py's own `predict`, whose anchors and det tokens also give the logit difference.
    hook = model.register_forward_hook(lambda module, inputs, outputs: seen_dets.append(outputs[1]))
    try:
        maps, scores, masks = test_script.predict(model, loader, recording_anchors, domain, device, "proxy")
    finally:
        hook.remove()
    per_class = test_script.evaluate_classes(ds, maps, scores, masks, domain)
    difference = torch.cat([det_difference(d, a) for d, a in zip(seen_dets, seen_anchors)])
    labels = torch.tensor([int(s["label"]) for s in ds.samples], device=device)
    names = [s["class_name"] for s in ds.samples]
    for name, result in per_class.items():
        idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
        result["image_auroc_map"] = _percent(auroc(maps[idx].flatten(1).amax(dim=1), labels[idx]))
        result["image_auroc_det"] = _percent(auroc(scores[idx], labels[idx]))
        result["image_auroc_det_diff"] = _percent(auroc(difference[idx], labels[idx]))
    means = mean_metrics(per_class)
    for key in COLUMNS[4:]:  # mean_metrics averages METRIC_NAMES only
        values = [r[key] for r in per_class.values() if r[key] is not None]
        means[key] = sum(values) / len(values) if values else None
    return means


def det_difference(det_token: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """`(det @ T)[:, 1] - (det @ T)[:, 0]`: the margin Stage 2's cross-entropy trains.
    det_token: [B, D], anchors: [B, D, 2] -> [B]."""
    logits = image_logits(det_token, anchors)
    return logits[:, 1] - logits[:, 0]


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def evaluate(args: argparse.Namespace, data: Path, save: Path, every_epoch: bool = True) -> list[Row]:
    """The rows: untrained (fresh adapters, CLIP's own text encoder as a run without Stage 1 uses), after
    Stage 1 (fresh image adapters), and after every Stage-2 epoch (`every_epoch`) or the last one only."""
    targs = test_args(args, data, save)
    device = resolve_device(args.device)
    seed_everything(targs.seed)  # the run's seed: the same random backbone and initial adapters as training's
    fresh = build_model(targs, targs.variant, device)
    rows = [Row("untrained", -1, score_classes(fresh, targs, False, device))]
    model, text_trained = load_model(targs, device)
    rows.append(Row("stage 1", 0, score_classes(model, targs, text_trained, device)))
    checkpoints = epoch_checkpoints(save)
    for epoch, path in checkpoints.items() if every_epoch else list(checkpoints.items())[-1:]:
        load_image_adapter(model, path)
        rows.append(Row(f"epoch {epoch}", epoch, score_classes(model, targs, text_trained, device)))
    return rows


def prepare_out(out: Path) -> Path:
    """An empty `out`, or one an earlier proxy run made (marked by MARKER), whose data and run are deleted: a
    proxy run always trains from scratch, never resumes another configuration's run."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out} is not empty and was not made by tools.proxy; choose a new or empty folder")
    for part in ("data", "run"):
        shutil.rmtree(out / part, ignore_errors=True)
    ensure_writable_dir(out, "--out")
    (out / MARKER).touch()
    return out


def run_proxy(args: argparse.Namespace, every_epoch: bool = True) -> list[Row]:
    """Data, training and the evaluation (`evaluate`) under args.out; returns the rows."""
    if args.variant == "cross_attention" and args.text_epoch == 0:
        raise UserError("--variant cross_attention needs --text_epoch >= 1 (its cross-attention trains in Stage 1)")
    shared = sorted(set(args.train_classes) & set(args.test_classes))
    if shared:
        raise UserError(f"{', '.join(shared)} both in --train_classes and --test_classes: the test classes must be "
                        "unseen")
    out = prepare_out(Path(args.out))
    data, save = out / "data", out / "run"
    make_data(data, args)
    run_training(args, data, save)
    return evaluate(args, data, save, every_epoch)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["state", "stage2_epoch", *COLUMNS, "weights"])
    for row in rows:
        writer.writerow([row.name, row.epoch, *(_fmt(row.metrics[c]) for c in COLUMNS), LABEL])
    return buffer.getvalue()


def table_markdown(rows: list[Row], title: str) -> str:
    lines = [f"**{RANDOM_WEIGHTS_BANNER}**", "", title, "", "| state | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {row.name} | " + " | ".join(_fmt(row.metrics[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(rows: list[Row], title: str) -> bytes:
    """PNG: pixel and image metrics against the Stage-2 epoch (-1 untrained, 0 after Stage 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import, only needed here
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    epochs = [r.epoch for r in rows]
    panels = (("pixel", ("pixel_auroc", "pixel_ap")),
              ("image", ("image_auroc", "image_ap", "image_auroc_map", "image_auroc_det", "image_auroc_det_diff")))
    for ax, (what, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(epochs, [r.metrics[key] for r in rows], "o-" if key in COLUMNS[:4] else ".--", label=key)
        ax.axhline(50, color="grey", lw=0.8)
        ax.set_xlabel("Stage-2 epoch (-1: untrained, 0: after Stage 1)")
        ax.set_ylabel("percent, mean over unseen classes")
        ax.set_title(f"{what} level", fontsize="medium")
        ax.legend(fontsize="small")
    fig.suptitle(f"{LABEL}\n" + "\n".join(textwrap.wrap(title, 150)), fontsize="medium")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    return png.getvalue()


def describe(args: argparse.Namespace) -> str:
    return (f"{args.variant} {args.model} {args.image_size} px, train {'+'.join(args.train_classes)} -> test "
            f"{'+'.join(args.test_classes)} (unseen), {args.n_normal}+{args.n_anomalous} images per class of "
            f"{args.size} px, defect scale {args.defect_scale}, {args.text_epoch}+{args.image_epoch} epochs, "
            f"batch {args.batch_size}, image lr {args.image_lr}, seed {args.seed}")


def write_outputs(rows: list[Row], args: argparse.Namespace) -> None:
    out, title = Path(args.out), describe(args)
    write_output(table_csv(rows), out / "proxy.csv", "--out")
    write_output(table_markdown(rows, title), out / "proxy.md", "--out")
    write_output(figure(rows, title), out / "proxy.png", "--out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    classes = list(ALL_CLASSES)
    p.add_argument("--out", default="proxy/tiny", help="output folder (default: %(default)s)")
    p.add_argument("--variant", choices=list(TRAINERS), default="baseline", help="what to train (default: %(default)s)")
    p.add_argument("--model", default="tiny", help="open_clip model name, random weights (default: %(default)s)")
    p.add_argument("--image_size", type=positive_int, default=112, help="input size (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--train_classes", nargs="+", choices=classes, default=["stripes", "carpet", "disc", "nut"],
                   help="synthetic classes to train on (default: %(default)s)")
    p.add_argument("--test_classes", nargs="+", choices=classes, default=["zebra", "felt", "cap", "washer"],
                   help="unseen synthetic classes to test on (default: %(default)s)")
    p.add_argument("--size", type=positive_int, default=112, help="synthetic image side (default: %(default)s)")
    p.add_argument("--n_normal", type=non_negative_int, default=12,
                   help="normal images per class (default: %(default)s)")
    p.add_argument("--n_anomalous", type=non_negative_int, default=12,
                   help="anomalous images per class (default: %(default)s)")
    p.add_argument("--defect_scale", type=positive_float, default=2.0,
                   help="multiplies the synthetic defects' lengths (default: %(default)s)")
    p.add_argument("--text_epoch", type=non_negative_int, default=1, help="Stage-1 epochs (default: %(default)s)")
    p.add_argument("--image_epoch", type=positive_int, default=8, help="Stage-2 epochs (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="batch size of both stages and of scoring (default: %(default)s)")
    p.add_argument("--text_lr", type=positive_float, default=1e-5, help="Stage-1 learning rate (default: %(default)s)")
    p.add_argument("--image_lr", type=positive_float, default=5e-3,
                   help="Stage-2 learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the training (default: %(default)s)")
    p.add_argument("--num_workers", type=non_negative_int, default=0,
                   help="data loader processes (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="intra-op CPU threads; the tiny model gains nothing from more, and on a shared machine a "
                        "second thread waiting for a busy core made the run several times slower (default: "
                        "%(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    return p


@cli_main
def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    rows = run_proxy(args)
    write_outputs(rows, args)
    print(table_markdown(rows, describe(args)))
    print(f"wrote {Path(args.out) / 'proxy.csv'}, proxy.md, proxy.png")


if __name__ == "__main__":
    main()
