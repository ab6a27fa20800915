"""A toy third variant, written as a new variant would be: one file, then one `register` call. Its anchors
are the baseline's plus a learned offset, renormalised; Stage 1 trains the offset with the text adapter."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from forward_utils import AnchorFn, PromptBank, Variant
from model import AdaptedCLIP


class AnchorOffset(nn.Module):
    """anchors [B, D, 2] -> normalise(anchors + offset) per column; the offset [D, 2] starts at 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(dim, 2))

    def forward(self, anchors: torch.Tensor) -> torch.Tensor:
        return F.normalize(anchors + self.offset, dim=-2)


class AnchorOffsetCLIP(AdaptedCLIP):
    def __init__(self, clip_model: nn.Module, **kwargs):
        super().__init__(clip_model, **kwargs)
        self.anchor_offset = AnchorOffset(self.embed_dim)


class AnchorOffsetVariant(Variant):
    name = "anchor_offset"
    model_cls = AnchorOffsetCLIP
    text_ckpt = "text_adapter_offset.pth"
    text_modules = ("text_adapter", "anchor_offset")

    def anchor_fn(self, model: AnchorOffsetCLIP, bank: PromptBank, args: argparse.Namespace, stage: str,
                  text_trained: bool = True) -> AnchorFn:
        base = super().anchor_fn(model, bank, args, stage, text_trained)
        return lambda images, class_idx, stage1_feats=None: model.anchor_offset(base(images, class_idx, stage1_feats))
