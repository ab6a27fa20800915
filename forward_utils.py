"""Prompts and text anchors, similarity maps and losses shared by training and testing, and the baseline
`Variant` (how its anchors are made) that other variants extend."""
from __future__ import annotations

import argparse
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from dataset import PROMPTS, get_real_name
from model import AdaptedCLIP
from utils.errors import UserError

# Test-time Gaussian blur of the similarity maps, by dataset domain: (kernel size, sigma).
BLUR = {"Industrial": (7, 1.0), "Medical": (9, 1.5)}


def check_blur_fits(grid: tuple[int, int], domain: str) -> None:
    """The map blur pads the patch grid by reflection, which needs more patches per side than half the
    kernel (a 37x37 grid at 518 px; a tiny test size can fall short)."""
    kernel = BLUR[domain][0]
    if min(grid) <= kernel // 2:
        raise UserError(f"a {grid[0]}x{grid[1]} patch grid is too small for the {domain.lower()} map blur (kernel "
                        f"{kernel}): choose an --image_size of at least {kernel // 2 + 1} patches per side")


def class_prompts(real_name: str) -> tuple[list[str], list[str]]:
    """The 6 normal and 10 abnormal sentences of a class: every template applied to every state."""
    def sentences(states: list[str]) -> list[str]:
        return [t.format(s.format(real_name)) for s in states for t in PROMPTS["prompt_templates"]]

    return sentences(PROMPTS["prompt_normal"]), sentences(PROMPTS["prompt_abnormal"])


class PromptBank:
    """Tokenised prompts of a list of classes, built once (tokenising is CPU work).

    `tokens`: [C, P, 77] with P = 16, the 6 normal sentences first; `index`: class name -> row.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], dataset: str, class_names: list[str]):
        self.class_names = list(class_names)
        self.index = {name: i for i, name in enumerate(self.class_names)}
        rows, n_normal = [], set()
        for name in self.class_names:
            normal, abnormal = class_prompts(get_real_name(dataset, name))
            rows.append(tokenizer(normal + abnormal))
            n_normal.add(len(normal))
        self.tokens = torch.stack(rows)
        self.n_normal = n_normal.pop()

    def class_indices(self, names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """[B] row of each name."""
        return torch.tensor([self.index[n] for n in names], device=device)

    def to(self, device: torch.device | str) -> "PromptBank":
        self.tokens = self.tokens.to(device)
        return self


def anchors_from_embeddings(emb: torch.Tensor, n_normal: int) -> torch.Tensor:
    """Normal/abnormal anchors from prompt embeddings: normalise each, average per group, normalise.
    emb: [..., P, D] -> [..., D, 2] (column 0 normal, column 1 abnormal)."""
    emb = F.normalize(emb, dim=-1)
    normal = F.normalize(emb[..., :n_normal, :].mean(dim=-2), dim=-1)
    abnormal = F.normalize(emb[..., n_normal:, :].mean(dim=-2), dim=-1)
    return torch.stack([normal, abnormal], dim=-1)


def get_adapted_text_embedding(
    model: AdaptedCLIP, bank: PromptBank, adapt: bool = True, class_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Text anchors of the bank's classes (or of the rows `class_idx`), all prompts in one text pass.
    `adapt=False` uses CLIP's own text encoder (when no text adapter was trained). -> [C, D, 2]."""
    tokens = bank.tokens if class_idx is None else bank.tokens[class_idx]
    c, p, length = tokens.shape
    emb = model.encode_text(tokens.reshape(c * p, length), adapt=adapt)
    return anchors_from_embeddings(emb.view(c, p, -1), bank.n_normal)


class AnchorFn(Protocol):
    """Gives each image its text anchors. images: [B, 3, S, S], class_idx: [B],
    stage1_feats: the images' Stage-1 features when already computed -> [B, D, 2]."""

    def __call__(self, images: torch.Tensor, class_idx: torch.Tensor,
                 stage1_feats: list[torch.Tensor] | None = None) -> torch.Tensor: ...


def class_anchor_fn(model: AdaptedCLIP, bank: PromptBank, adapt: bool = True, grad: bool = False) -> AnchorFn:
    """Anchors that depend on the class only. With `grad` (Stage 1) they are recomputed for the classes
    of each batch; without, computed once for every class and looked up."""
    if grad:
        def anchors(images, class_idx, stage1_feats=None):
            unique, inverse = class_idx.unique(return_inverse=True)
            return get_adapted_text_embedding(model, bank, adapt, unique)[inverse]
        return anchors
    # A bf16 backbone runs only under autocast; the table is built outside the training/test loops.
    bf16 = model.backbone_dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast(bank.tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        table = get_adapted_text_embedding(model, bank, adapt).float()

    def lookup(images, class_idx, stage1_feats=None):
        return table[class_idx]
    return lookup


def similarity_logits(patch_feats: torch.Tensor, anchors: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`100 * P @ T` as maps, in float32 even under bf16 autocast (bf16 would round logits of size ~100
    by up to 0.5). patch_feats: [B, N, D], anchors: [B, D, 2] or [D, 2] -> [B, 2, H, W]."""
    with torch.autocast(patch_feats.device.type, enabled=False):
        s = 100 * patch_feats.float() @ anchors.float()
    return s.transpose(1, 2).reshape(s.shape[0], 2, *grid)


def calculate_similarity_map(
    patch_feats: torch.Tensor, anchors: torch.Tensor, grid: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Training maps: logits upsampled bilinearly (align_corners=True) to the image size, softmax over
    normal/abnormal. -> [B, 2, S, S] probabilities."""
    logits = similarity_logits(patch_feats, anchors, grid)
    logits = F.interpolate(logits, size=(image_size, image_size), mode="bilinear", align_corners=True)
    return logits.softmax(dim=1)


def anomaly_map(
    seg_tokens: list[torch.Tensor], anchors: torch.Tensor, grid: tuple[int, int], image_size: int, domain: str
) -> torch.Tensor:
    """Test-time pixel scores: per level `(S[:, 1] + 1 - S[:, 0]) / 2` on the un-softmaxed maps,
    Gaussian blur, bilinear upsampling, summed over levels. -> [B, S, S] (float32)."""
    kernel, sigma = BLUR[domain]
    total = 0
    for feats in seg_tokens:
        s = similarity_logits(feats, anchors, grid)
        m = (s[:, 1:2] + 1 - s[:, 0:1]) / 2
        m = gaussian_blur(m, [kernel, kernel], [sigma, sigma])
        total = total + F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=True)
    return total[:, 0]


def image_logits(det_token: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """`det_token @ T` per sample, in float32. det_token: [B, D], anchors: [B, D, 2] -> [B, 2]."""
    with torch.autocast(det_token.device.type, enabled=False):
        return torch.einsum("bd,bdk->bk", det_token.float(), anchors.float())


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on softmaxed maps. probs: [B, 2, H, W], mask: [B, 1, H, W] in {0, 1} -> scalar.
    The one-hot target is clamped to [smooth, 1 - smooth]; `pt = sum(onehot * p) + smooth`."""
    onehot = torch.cat([1 - mask, mask], dim=1).clamp(smooth, 1 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`1 - mean_b (2 sum(xy) + 1) / (sum x + sum y + 1)`. x, y: [B, H, W] -> scalar."""
    x, y = x.flatten(1), y.flatten(1)
    return 1 - ((2 * (x * y).sum(1) + 1) / (x.sum(1) + y.sum(1) + 1)).mean()


def calculate_seg_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal + dice on both channels. probs: [B, 2, H, W], mask: [B, 1, H, W] -> scalar."""
    m = mask[:, 0]
    return focal_loss(probs, mask) + dice_loss(probs[:, 0], 1 - m) + dice_loss(probs[:, 1], m)


def orthogonality_loss(anchors: torch.Tensor) -> torch.Tensor:
    """`(mean_b <T_b[:, 0], T_b[:, 1]>)^2`. anchors: [B, D, 2] -> scalar."""
    return ((anchors[:, :, 0] * anchors[:, :, 1]).sum(dim=1).mean()) ** 2


STAGE1_TERMS = ("seg", "orthogonality")  # the keys of `stage1_loss_terms`, in the order they are added
STAGE2_TERMS = ("det", "seg")  # the keys of `stage2_loss_terms`


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The terms added in their order: the loss the optimizer follows. -> scalar."""
    first, *rest = terms.values()
    for term in rest:
        first = first + term
    return first


def stage1_loss_terms(
    feats: list[torch.Tensor], anchors: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
    all_levels: bool = False, text_norm_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The terms of `stage1_loss` (scalars): "seg", the seg loss of the last level only (the original's
    behaviour: its loop assigned instead of adding) or, with `all_levels`, summed over levels; and
    "orthogonality", the orthogonality term times `text_norm_weight`.
    feats: levels x [B, N, D], anchors: [B, D, 2], mask: [B, 1, S, S]."""
    size = mask.shape[-1]
    used = feats if all_levels else feats[-1:]
    seg = sum(calculate_seg_loss(calculate_similarity_map(f, anchors, grid, size), mask) for f in used)
    return {"seg": seg, "orthogonality": text_norm_weight * orthogonality_loss(anchors.float())}


def stage1_loss(
    feats: list[torch.Tensor], anchors: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
    all_levels: bool = False, text_norm_weight: float = 0.1,
) -> torch.Tensor:
    """Stage-1 loss: the sum of `stage1_loss_terms` (seg + weighted orthogonality). -> scalar."""
    return total_loss(stage1_loss_terms(feats, anchors, mask, grid, all_levels, text_norm_weight))


def stage2_loss_terms(
    seg_tokens: list[torch.Tensor], det_token: torch.Tensor, anchors: torch.Tensor, mask: torch.Tensor,
    label: torch.Tensor, grid: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """The terms of `stage2_loss` (scalars): "det", the cross-entropy of `det_token @ T` against the label,
    and "seg", the seg loss summed over levels. seg_tokens: levels x [B, N, D], det_token: [B, D],
    anchors: [B, D, 2], mask: [B, 1, S, S], label: [B]."""
    size = mask.shape[-1]
    seg = sum(calculate_seg_loss(calculate_similarity_map(f, anchors, grid, size), mask) for f in seg_tokens)
    return {"det": F.cross_entropy(image_logits(det_token, anchors), label), "seg": seg}


def stage2_loss(
    seg_tokens: list[torch.Tensor], det_token: torch.Tensor, anchors: torch.Tensor, mask: torch.Tensor,
    label: torch.Tensor, grid: tuple[int, int],
) -> torch.Tensor:
    """Stage-2 loss: the sum of `stage2_loss_terms` (det + seg). -> scalar."""
    return total_loss(stage2_loss_terms(seg_tokens, det_token, anchors, mask, label, grid))


class Variant:
    """A way of making the text anchors: everything the entry points need to know about it. The baseline
    is this class itself; a new variant subclasses it in its own file and is registered in `variants.py`.

    A variant may change the text path: its model class (a subclass of `AdaptedCLIP`), the modules Stage 1
    trains, how anchors are made, and its own flags. It must not change `image_forward` or the checkpoint
    keys of `text_adapter` and `image_adapter`, so Stage 2, testing and old checkpoints stay comparable.
    """

    name = "baseline"
    train_script = "train.py"  # the script that trains it (train.py takes --variant for those without one)
    model_cls: type[AdaptedCLIP] = AdaptedCLIP
    text_ckpt = "text_adapter.pth"  # Stage 1's checkpoint: {"epoch", <text_modules>..., "text_optimizer"}
    text_modules: tuple[str, ...] = ("text_adapter",)  # model attributes Stage 1 trains, saved under these keys
    needs_text_stage = False  # True: a run without Stage 1 (--text_epoch 0) is refused
    model_keys: tuple[str, ...] = ()  # extra saved flags that build the model (`model_kwargs` reads them)
    operational_keys: tuple[str, ...] = ()  # its flags that a rerun of a run may change (they change no result)

    def add_train_args(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this variant's training (saved in args.json)."""

    def add_test_args(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this variant's evaluation (test.py, predict.py); their defaults must be None."""

    def finish_test_args(self, args: argparse.Namespace) -> None:
        """Fills this variant's test flags left at None."""

    def model_kwargs(self, args: argparse.Namespace) -> dict:
        """Keyword arguments of `model_cls` beyond AdaptedCLIP's, from the (saved) flags."""
        return {}

    def modules(self, model: AdaptedCLIP) -> dict[str, nn.Module]:
        """The modules Stage 1 trains and `text_ckpt` holds, by checkpoint key."""
        return {key: getattr(model, key) for key in self.text_modules}

    def param_groups(self, modules: dict[str, nn.Module], args: argparse.Namespace) -> list[dict]:
        """Stage 1's Adam parameter groups: every parameter of `modules` at --text_lr."""
        return [{"params": [p for m in modules.values() for p in m.parameters()], "lr": args.text_lr}]

    def anchor_fn(self, model: AdaptedCLIP, bank: PromptBank, args: argparse.Namespace, stage: str,
                  text_trained: bool = True) -> AnchorFn:
        """Anchors for `stage`: "stage1" (with gradient to the text modules), "stage2" or "test" (frozen).
        `text_trained`: Stage 1 ran (the baseline falls back to CLIP's own text encoder otherwise)."""
        if stage == "stage1":
            return class_anchor_fn(model, bank, adapt=True, grad=True)
        return class_anchor_fn(model, bank, adapt=text_trained)

    def result_suffix(self, args: argparse.Namespace) -> str:
        """The test options in result names: "" here, e.g. "_image" for cross-attention's --text_context."""
        return ""
