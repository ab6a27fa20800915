"""Vision-aware text anchors for the cross-attention variant; everything else comes from `forward_utils`."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from forward_utils import AnchorFn, PromptBank, anchors_from_embeddings, class_anchor_fn
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention
from train import build_model
from utils import load_checkpoint, load_module_state

CROSS_ATTN_CKPT = "text_adapter_cross_attn.pth"


def get_vision_aware_text_embedding(
    model: AdaptedCLIPWithCrossAttention, bank: PromptBank, class_idx: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Per-image anchors: image b's class prompts attend to its context. Prompts and text block 1 are
    computed once per distinct class. class_idx: [B], context: [B, N, D] -> [B, D, 2]."""
    unique, rows = class_idx.unique(return_inverse=True)
    emb = model.encode_text_with_context(bank.tokens[unique], rows, context)
    return anchors_from_embeddings(emb, bank.n_normal)


def cross_attention_anchor_fn(model: AdaptedCLIPWithCrossAttention, bank: PromptBank,
                              text_context: str = "image") -> AnchorFn:
    """`image`: anchors from each image's own context — reusing Stage-1 features when the step already
    computed them (their first level is the context); `none`: cross-attention bypassed (ablation)."""
    if text_context == "none":
        return class_anchor_fn(model, bank, adapt=True)

    def anchors(images, class_idx, stage1_feats=None):
        context = stage1_feats[0] if stage1_feats is not None else model.image_context(images)
        return get_vision_aware_text_embedding(model, bank, class_idx, context)
    return anchors


def build_cross_attention_model(args: argparse.Namespace) -> AdaptedCLIPWithCrossAttention:
    return build_model(args, AdaptedCLIPWithCrossAttention, cross_attn_heads=args.cross_attn_heads,
                       cross_attn_dropout=args.cross_attn_dropout)


def load_cross_attention_model(args: argparse.Namespace, device: torch.device) -> AdaptedCLIPWithCrossAttention:
    """The model with its trained text adapter and cross-attention from `<save_path>/text_adapter_cross_attn.pth`."""
    model = build_cross_attention_model(args).to(device)
    path = Path(args.save_path) / CROSS_ATTN_CKPT
    ckpt = load_checkpoint(path)
    load_module_state(model.text_adapter, ckpt, "text_adapter", path)
    load_module_state(model.text_cross_attn, ckpt, "text_cross_attn", path)
    return model
