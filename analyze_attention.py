"""Where do the prompt words look? Cross-attention maps and defect grounding of a cross-attention run.

    python analyze_attention.py --save_path ckpt/cross_attention --dataset MVTec --classes bottle cable
    python analyze_attention.py --save_path ckpt/cross_attention --dataset MVTec --prompts "a scratched {}." "a {}."

The text stream after the run's text block (text layer 0 by default) attends to the image context
(`image_context`: Stage-1 patch features and the CLS, as the run's --context_cls puts it); a word's map is
its tokens' attention rows over the patches, averaged over heads and over the word's BPE tokens. For each
class this writes, under --out:

  <class>/<image>/p<k>_<prompt>.png   the image (defect outlined) and one attention panel per word, for
                                      the first --num_images test images (anomalous first) and each prompt
  grounding.csv, grounding.md         per class, over its anomalous test images with a mask, for the state
                                      words ("damaged", "broken", "flaw", "defect", "damage") and the
                                      object words (the class's real name): the mean grounding ratio, and
                                      the CLS part against the patch part of the cross-attention output

Grounding ratio = share of the word's patch attention inside the defect / share of the image the defect
covers (mask averaged per patch): 1 = no grounding, > 1 = the word attends to the defect. With
--context_cls token the attention on the CLS token is left out of the maps (it has no place).

CLS vs patches: the value and output projections are linear, so a token's cross-attention output is a
patch part (the attention-weighted values of the patches), a CLS part and a constant bias part. Columns
`<c>_cls_norm` and `<c>_patch_norm` are the mean norms of the first two as added to the text stream (gate
included), `<c>_cls_weight` the CLS's coefficient, heads averaged: 1 for --context_cls residual (every
value carries the CLS, so its part is the same for every word), its attention weight for token, 0 for none.
Model flags default to the ones saved in <save_path>/args.json by training.
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from cli import (RANDOM_WEIGHTS_BANNER, add_data_args, add_model_args, cli_main, load_dataset, load_model,
                 parse_run_args)
from dataset import PROMPTS, ADDataset, denormalize, get_real_name
from model import get_tokenizer
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention
from utils.distributed import resolve_device
from utils.argtypes import positive_int
from utils.errors import UserError
from utils.io import ensure_writable_dir

STATE_WORDS = ("damaged", "broken", "flaw", "defect", "damage")
TEMPLATE = "a photo of {}."


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_run=True)
    add_data_args(p, default_dataset="MVTec")
    g = p.add_argument_group("analysis")
    g.add_argument("--save_path", required=True, help="folder written by train_cross_attention.py")
    g.add_argument("--classes", nargs="+", default=None, help="classes to analyse (default: all of the test set)")
    g.add_argument("--num_images", type=positive_int, default=4,
                   help="test images per class drawn as PNGs, anomalous first; grounding always uses every "
                        "anomalous image with a mask (default: %(default)s)")
    g.add_argument("--prompts", nargs="+", default=None,
                   help="prompt templates, '{}' = the class's real name (default: the 'a photo of {}.' template "
                        "with the first normal state and the five abnormal states, e.g. 'a photo of a damaged {}.')")
    g.add_argument("--out", default=None, help="output folder (default: <save_path>/attention)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: %(default)s)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_run_args(get_parser, argv)
    if not issubclass(args.variant.model_cls, AdaptedCLIPWithCrossAttention):
        raise UserError(f"{args.save_path} holds a {args.variant.name} run, which has no cross-attention; train "
                        "one with train_cross_attention.py")
    return args


# ---------------------------------------------------------------- prompts and words
def default_templates() -> list[str]:
    """One normal and every abnormal state in TEMPLATE, '{}' left for the class name."""
    return [TEMPLATE.format(s) for s in PROMPTS["prompt_normal"][:1] + PROMPTS["prompt_abnormal"]]


def _word_spans_with_offsets(tokenizer, sentence: str) -> list[tuple[str, list[int], int]]:
    """(word, token positions, character offset of the word). Words are whitespace-separated chunks
    without their leading/trailing punctuation, whose tokens are dropped; position 0 is SOT."""
    spans, pos, ids = [], 1, []
    for m in re.finditer(r"\S+", sentence):
        lead, core, trail = re.fullmatch(r"(\W*)(.*?)(\W*)", m.group()).groups()
        chunk = tokenizer.encode(m.group())
        if core:
            head, tail = tokenizer.encode(lead), tokenizer.encode(trail)
            offset = m.start() + len(lead)
            # BPE pieces never cross whitespace, but punctuation can merge with letters ("'d" of "'dog'"):
            # then the whole chunk is the word.
            split = chunk[:len(head)] == head and chunk[len(chunk) - len(tail):] == tail
            if not split or len(head) + len(tail) >= len(chunk):
                head, tail, core, offset = [], [], m.group(), m.start()
            spans.append((core, list(range(pos + len(head), pos + len(chunk) - len(tail))), offset))
        pos += len(chunk)
        ids += chunk
    full = tokenizer([sentence])[0].tolist()
    if full[1:1 + len(ids)] != ids or pos >= tokenizer.context_length:
        raise UserError(f"prompt {sentence!r} does not fit the {tokenizer.context_length}-token context "
                        "or tokenises differently word by word; shorten it")
    return spans


def word_token_spans(tokenizer, sentence: str) -> list[tuple[str, list[int]]]:
    """The words of `sentence` with their token positions in `tokenizer([sentence])[0]` (SOT at 0)."""
    return [(w, p) for w, p, _ in _word_spans_with_offsets(tokenizer, sentence)]


@dataclass
class Prompt:
    text: str
    words: list[tuple[str, list[int]]]
    groups: list[str | None]  # per word: "state", "object" (inside the real name) or None


def build_prompt(tokenizer, template: str, real_name: str) -> Prompt:
    """`template` with '{}' replaced by `real_name` (a template without '{}' is used as is)."""
    start = template.find("{}")
    text = template.replace("{}", real_name)
    name_range = range(start, start + len(real_name)) if start >= 0 else range(0)
    spans = _word_spans_with_offsets(tokenizer, text)
    groups = ["object" if off in name_range else "state" if w.lower() in STATE_WORDS else None
              for w, _, off in spans]
    return Prompt(text, [(w, p) for w, p, _ in spans], groups)


# ---------------------------------------------------------------- attention and grounding
PARTS = ("cls_norm", "patch_norm", "cls_weight")


def text_stream(model: AdaptedCLIPWithCrossAttention, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """The prompts' text stream where the cross-attention reads it, repeated for `batch` images.
    tokens: [P, 77] -> [B, P * T, Wt]."""
    x, _ = model.text_before_cross_attn(tokens[None])
    _, p, t, w = x.shape
    return x.reshape(1, p * t, w).expand(batch, -1, -1)


@torch.no_grad()
def token_attention(model: AdaptedCLIPWithCrossAttention, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Cross-attention of every prompt token on every image's patches, heads averaged.
    tokens: [P, 77], context: [B, N(+1), D] -> [B, P, T, N] (float32; rows sum to 1 over N, less the
    CLS token's weight with --context_cls token)."""
    att = model.text_cross_attn.attention_weights(text_stream(model, tokens, context.shape[0]), context)
    att = att.float().mean(dim=1)[..., :model.grid[0] * model.grid[1]]
    return att.view(context.shape[0], tokens.shape[0], -1, att.shape[-1])


@torch.no_grad()
def token_parts(model: AdaptedCLIPWithCrossAttention, tokens: torch.Tensor, patches: torch.Tensor,
                cls_unit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prompt token on every image: the norms of the CLS part and of the patch part of the (gated)
    cross-attention output and the CLS's coefficient (`cross_attn_parts`). tokens: [P, 77],
    patches: [B, N, D], cls_unit: [B, 1, D] -> {"cls_norm", "patch_norm", "cls_weight"}: [B, P, T] float32."""
    patch, cls, weight = model.cross_attn_parts(text_stream(model, tokens, patches.shape[0]), patches, cls_unit)
    shape = (patches.shape[0], tokens.shape[0], -1)
    return {"cls_norm": cls.float().norm(dim=-1).view(shape), "patch_norm": patch.float().norm(dim=-1).view(shape),
            "cls_weight": weight.float().view(shape)}


def word_maps(att: torch.Tensor, words: list[tuple[str, list[int]]]) -> torch.Tensor:
    """A word's map (or value) = mean of its tokens' rows. att: [T, ...] (one image, one prompt)
    -> [n_words, ...]."""
    return torch.stack([att[positions].mean(dim=0) for _, positions in words])


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each patch covered by the defect, patches in row-major order. mask: [S, S] -> [h*w]."""
    return F.adaptive_avg_pool2d(mask[None, None].float(), grid).flatten()


def grounding_ratio(attn: torch.Tensor, mask_grid: torch.Tensor) -> float:
    """(attention share inside the mask) / (mask share of the image). attn, mask_grid: [N]."""
    inside = float((attn * mask_grid).sum() / attn.sum())
    return inside / float(mask_grid.mean())


# ---------------------------------------------------------------- figures
def save_figure(path: Path, image: torch.Tensor, mask: torch.Tensor | None, prompt: Prompt, maps: torch.Tensor,
                grid: tuple[int, int], title: str) -> None:
    """image (defect outlined) | one panel per word: its map upsampled bilinearly to the image, overlaid,
    on one colour scale (0 to the figure's max) so that words compare. image: [3, S, S], mask: [S, S] or
    None, maps: [n_words, N]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = image.shape[-1]
    up = F.interpolate(maps.view(-1, 1, *grid), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    mask_grid = mask_to_grid(mask, grid) if mask is not None else None
    n = len(prompt.words) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.8), squeeze=False)
    img = denormalize(image)
    panels = [("image", None)] + [(w, up[i]) for i, (w, _) in enumerate(prompt.words)]
    for i, (ax, (name, heat)) in enumerate(zip(axes[0], panels)):
        ax.imshow(img)
        if heat is not None:
            ax.imshow(heat.cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=float(up.max()))
            if mask_grid is not None:
                name += f"\nratio {grounding_ratio(maps[i - 1], mask_grid):.2f}"
        if mask is not None:
            ax.contour(mask.cpu().numpy(), levels=[0.5], colors="white", linewidths=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f'{title}\n"{prompt.text}"', fontsize=9)
    # Fixed margins: tight_layout would draw every figure twice.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.62, wspace=0.05)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit]


# ---------------------------------------------------------------- per class
def column_means(prompts: list[Prompt], word_values: list[list[float]]) -> dict[str, float]:
    """One image's mean of a per-word value per column: the groups "state" and "object", and each state
    word. word_values: per prompt, one value per word."""
    values = defaultdict(list)
    for prompt, row in zip(prompts, word_values):
        for (word, _), group, v in zip(prompt.words, prompt.groups, row):
            if group is None:
                continue
            values[group].append(v)
            if group == "state":
                values[word.lower()].append(v)
    return {k: float(np.mean(v)) for k, v in values.items()}


def image_ratios(prompts: list[Prompt], maps: list[torch.Tensor], mask_grid: torch.Tensor) -> dict[str, float]:
    """One image's mean grounding ratio per column (`column_means`). maps: per prompt [n_words, N]."""
    return column_means(prompts, [[grounding_ratio(w, mask_grid) for w in m] for m in maps])


def image_parts(prompts: list[Prompt], parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """One image's `<column>_<part>` means (`column_means`) of the `token_parts`, averaged per word over its
    tokens. parts: part -> [P, T] (one image)."""
    return {f"{col}_{name}": v for name, values in parts.items()
            for col, v in column_means(prompts, [word_maps(values[j], p.words).tolist()
                                                 for j, p in enumerate(prompts)]).items()}


def analyze_class(model: AdaptedCLIPWithCrossAttention, ds: ADDataset, class_name: str, prompts: list[Prompt],
                  tokens: torch.Tensor, args: argparse.Namespace, device: torch.device, out: Path,
                  title: str) -> dict[str, list[float]]:
    """Draws the first `num_images` images and returns, per column, the ratio of each anomalous image
    with a non-empty mask, and per `<column>_<part>` its CLS/patch part value (`image_parts`)."""
    idx = [i for i, s in enumerate(ds.samples) if s["class_name"] == class_name]
    drawn = set(sorted(idx, key=lambda i: ds.samples[i]["label"] == 0)[:args.num_images])
    used = [i for i in idx if i in drawn or (ds.samples[i]["label"] == 1 and ds.samples[i]["mask_path"])]
    loader = DataLoader(Subset(ds, used), batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    columns = defaultdict(list)
    for n, batch in enumerate(loader):
        images = batch["image"].to(device)
        with torch.no_grad(), model.autocast():
            feats = model.context_features(images)
            att = token_attention(model, tokens, model.image_context(images, feats)).cpu()
            parts = {k: v.cpu() for k, v in token_parts(model, tokens, *model.context_parts(images, feats)).items()}
        for b, i in enumerate(used[n * args.batch_size:(n + 1) * args.batch_size]):
            sample, mask = ds.samples[i], batch["mask"][b, 0]
            maps = [word_maps(att[b, j], p.words) for j, p in enumerate(prompts)]
            has_defect = sample["label"] == 1 and bool(mask.sum() > 0)
            if has_defect:
                ratios = image_ratios(prompts, maps, mask_to_grid(mask, model.grid))
                for col, r in {**ratios, **image_parts(prompts, {k: v[b] for k, v in parts.items()})}.items():
                    columns[col].append(r)
            if i in drawn:
                folder = out / class_name / slug(Path(sample["image_path"]).with_suffix("").as_posix(), 120)
                folder.mkdir(parents=True, exist_ok=True)
                caption = f"{title}\n{sample['image_path']} label={sample['label']}"
                for j, (p, m) in enumerate(zip(prompts, maps)):
                    save_figure(folder / f"p{j}_{slug(p.text)}.png", batch["image"][b], mask if has_defect else None,
                                p, m, model.grid, caption)
    return columns


# ---------------------------------------------------------------- table
def table_columns(results: dict[str, dict[str, list[float]]]) -> list[str]:
    present = {c for cols in results.values() for c in cols}
    return [c for c in ("state", "object", *STATE_WORDS) if c in present]


def format_markdown(results: dict[str, dict[str, list[float]]], title: str) -> str:
    """Two tables, rows class, columns word groups / state words: cells 'mean ratio (n images)', then
    'CLS norm / patch norm (CLS coefficient)' over the same images."""
    cols = table_columns(results)
    head = ["| class | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines = [title, "", *head]
    for name, values in results.items():
        cells = [f"{np.mean(values[c]):.2f} ({len(values[c])})" if values.get(c) else "n/a" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cross-attention output: norm of its CLS part / norm of its patch part (the CLS's coefficient: 1 "
              "for --context_cls residual, its attention weight for token, 0 for none), as added to the text "
              "stream", "", *head]
    for name, values in results.items():
        cells = [" / ".join(f"{np.mean(values[f'{c}_{part}']):.3g}" for part in PARTS[:2])
                 + f" ({np.mean(values[f'{c}_cls_weight']):.2f})" if values.get(c) else "n/a" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(results: dict[str, dict[str, list[float]]], path: Path, pretrained: str) -> None:
    """Columns: class, then `<column>` (mean ratio, empty if no image) and `<column>_n` (images), then
    `<column>_<part>` for each of `PARTS` (means over the same images), pretrained."""
    cols = table_columns(results)
    part_cols = [f"{c}_{part}" for c in cols for part in PARTS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *(x for c in cols for x in (c, f"{c}_n")), *part_cols, "pretrained"])
        for name, values in results.items():
            cells = [x for c in cols for x in ((f"{np.mean(values[c]):.4f}", len(values[c])) if values.get(c)
                                                else ("", 0))]
            parts = [f"{np.mean(values[c]):.6g}" if values.get(c) else "" for c in part_cols]
            w.writerow([name, *cells, *parts, pretrained])


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """The whole analysis; returns per class and column the per-image ratios."""
    device = resolve_device(args.device)
    out = ensure_writable_dir(args.out or Path(args.save_path) / "attention", "--out")
    banner = RANDOM_WEIGHTS_BANNER if args.pretrained == "none" else ""
    if banner:
        print(banner)
    ds = load_dataset(args, args.dataset, None, class_names=args.classes)
    model = load_model(args, device)[0].eval()
    tokenizer = get_tokenizer(args.model)
    templates = args.prompts or default_templates()
    title = f"{args.dataset} | {Path(args.save_path).name} | {args.model} pretrained={args.pretrained}" + (
        f"\n{banner}" if banner else "")
    results = {}
    for name in args.classes or ds.class_names:
        prompts = [build_prompt(tokenizer, t, get_real_name(args.dataset, name)) for t in templates]
        tokens = tokenizer([p.text for p in prompts]).to(device)
        results[name] = analyze_class(model, ds, name, prompts, tokens, args, device, out, f"{name} | {title}")
    table = format_markdown(results, f"Grounding ratio (1 = none, > 1 = on the defect) | {title}\n{model.describe()}")
    print("\n" + table)
    (out / "grounding.md").write_text(table + "\n")
    write_csv(results, out / "grounding.csv", args.pretrained)
    print(f"saved {out / 'grounding.csv'}, {out / 'grounding.md'} and the PNGs under {out}")
    return results


@cli_main
def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    main()
