"""Vision-aware text anchors for the cross-attention variant; everything else comes from `forward_utils`."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from forward_utils import AnchorFn, PromptBank, Variant, anchors_from_embeddings, class_anchor_fn
from model.adapter_cross_attention import CONTEXT_CLS, GATES, AdaptedCLIPWithCrossAttention
from utils.argtypes import non_negative_int, positive_float, positive_int, probability


def get_vision_aware_text_embedding(
    model: AdaptedCLIPWithCrossAttention, bank: PromptBank, class_idx: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Per-image anchors: image b's class prompts attend to its context. Prompts and text layer 0 are
    computed once per distinct class. class_idx: [B], context: [B, N, D] -> [B, D, 2]."""
    unique, rows = class_idx.unique(return_inverse=True)
    emb = model.encode_text_with_context(bank.tokens[unique], rows, context)
    return anchors_from_embeddings(emb, bank.n_normal)


def cross_attention_anchor_fn(model: AdaptedCLIPWithCrossAttention, bank: PromptBank,
                              text_context: str = "image") -> AnchorFn:
    """`image`: anchors from each image's own context — reusing Stage-1 features when the step already
    computed them; `none`: cross-attention bypassed (ablation)."""
    if text_context == "none":
        return class_anchor_fn(model, bank, adapt=True)

    def anchors(images, class_idx, stage1_feats=None):
        context = model.image_context(images, stage1_feats)
        return get_vision_aware_text_embedding(model, bank, class_idx, context)
    return anchors


class CrossAttentionVariant(Variant):
    """Text tokens attend to the image's Stage-1 patch features (`image_context`) after text layer 0 (by
    default: the plan; the ablation flags move it); Stage 1 trains `text_adapter` and `text_cross_attn`
    together."""

    name = "cross_attention"
    train_script = "train_cross_attention.py"
    model_cls = AdaptedCLIPWithCrossAttention
    text_ckpt = "text_adapter_cross_attn.pth"
    text_modules = ("text_adapter", "text_cross_attn")
    needs_text_stage = True
    # Saved flags that build the model, each a keyword of `AdaptedCLIPWithCrossAttention`. A run saved before
    # a flag existed loads with the flag's default, which is the plan's.
    operational_keys = ("sanity_check",)
    model_keys = ("cross_attn_heads", "cross_attn_dropout", "cross_attn_gate", "context_cls", "context_level",
                  "cross_attn_after")

    def param_groups(self, modules: dict[str, nn.Module], args: argparse.Namespace) -> list[dict]:
        """The base groups at --text_lr, the tanh gate (when there is one) on its own at --cross_attn_gate_lr."""
        gate = modules["text_cross_attn"].gate
        if gate is None:
            return super().param_groups(modules, args)
        rest = [p for m in modules.values() for p in m.parameters() if p is not gate]
        return [{"params": rest, "lr": args.text_lr}, {"params": [gate], "lr": args.cross_attn_gate_lr}]

    def add_train_args(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("cross-attention")
        g.add_argument("--cross_attn_heads", type=positive_int, default=8,
                       help="cross-attention heads (default: %(default)s)")
        g.add_argument("--cross_attn_dropout", type=probability, default=0.1,
                       help="attention dropout (default: %(default)s)")
        g.add_argument("--cross_attn_gate", choices=GATES, default="none",
                       help="none: the plan's residual x + CA(x); tanh: x + tanh(a) CA(x), a learnable scalar a "
                            "starting at 0 (Flamingo), so that with --init_text_adapter the run starts exactly at "
                            "the baseline's anchors (default: %(default)s)")
        g.add_argument("--cross_attn_gate_lr", type=positive_float, default=1e-3,
                       help="Adam learning rate of the tanh gate; Adam moves a parameter by about its learning rate "
                            "per step, so at --text_lr (1e-5) the gate would stay near 1e-3 after the default "
                            "Stage 1 and the module would hardly act (default: %(default)s)")
        g.add_argument("--context_cls", choices=CONTEXT_CLS, default="residual",
                       help="how the image's CLS embedding enters the context: added to every patch (the plan), as "
                            "one extra key/value token, or not at all (default: %(default)s)")
        g.add_argument("--context_level", type=non_negative_int, default=0,
                       help="the Stage-1 level that gives the context, an index into the levels: 0 = the first "
                            "(block 6 of ViT-L, the plan) (default: %(default)s)")
        g.add_argument("--cross_attn_after", type=non_negative_int, default=0,
                       help="the 0-based text block the module follows, before that block's adapter: 0 = after "
                            "text layer 0 (the plan) (default: %(default)s)")
        g.add_argument("--init_text_adapter", default=None,
                       help="start Stage 1 from a trained baseline text_adapter.pth (only the new module starts "
                            "from scratch)")
        g.add_argument("--text_context", choices=["image", "none"], default="image",
                       help="Stage-2 anchors: per image from the frozen Stage-1 model, or with the cross-attention "
                            "bypassed (ablation) (default: %(default)s)")
        g.add_argument("--sanity_check", action="store_true",
                       help="check context, shapes and gradients on the first batch, print a report, then train")

    def add_test_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--text_context", choices=["image", "none"], default=None,
                            help="cross-attention runs only: anchors from each test image's own context (the "
                                 "default), or with the cross-attention bypassed")

    def finish_test_args(self, args: argparse.Namespace) -> None:
        args.text_context = args.text_context or "image"

    def model_kwargs(self, args: argparse.Namespace) -> dict:
        return {key: getattr(args, key) for key in self.model_keys}

    def anchor_fn(self, model: AdaptedCLIPWithCrossAttention, bank: PromptBank, args: argparse.Namespace,
                  stage: str, text_trained: bool = True) -> AnchorFn:
        return cross_attention_anchor_fn(model, bank, "image" if stage == "stage1" else args.text_context)

    def result_suffix(self, args: argparse.Namespace) -> str:
        return f"_{args.text_context}"
