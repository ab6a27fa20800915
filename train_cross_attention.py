"""Train AA-CLIP with vision-aware text anchors (cross-attention in the text encoder, after text layer 0 by default).

Stage 1 trains `text_adapter` and `text_cross_attn` together; Stage 2 trains the image adapters as the
baseline does, with per-image anchors from the frozen Stage-1 model. Same flags as train.py, plus the
cross-attention's (the defaults are the plan; --context_cls, --context_level, --cross_attn_after and
--cross_attn_gate are ablations):

    python train_cross_attention.py --dataset VisA --pretrained ViT-L-14-336px.pt --save_path ckpt/cross_attention
    python train_cross_attention.py ... --init_text_adapter ckpt/baseline/text_adapter.pth \\
        --cross_attn_gate tanh   # fair comparison: starts exactly at the baseline's anchors
    torchrun --standalone --nproc_per_node 2 train_cross_attention.py ...   # on 2 GPUs, as train.py
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cli import build_model, cli_main, get_train_parser, load_dataset, training_shot
from engine import start_run, train_image_adapter, train_text_adapter
from forward_utils import PromptBank, Variant, stage1_loss
from forward_utils_cross_attention import get_vision_aware_text_embedding
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention, CrossAttentionModule
from utils.distributed import same_outcome
from utils.errors import UserError
from utils.io import load_checkpoint, load_module_state
from variants import get_variant


Check = Callable[[bool, str], None]


def sanity_check(model: AdaptedCLIPWithCrossAttention, bank: PromptBank, args: argparse.Namespace,
                 device: torch.device) -> list[str]:
    """The plan's validation on the first training batch, for every --context_cls, --context_level,
    --cross_attn_after and --cross_attn_gate: the context's shape (one more token with `token`), the
    context from the step's Stage-1 features equal to the one computed alone, the context rebuilt into the
    level's Stage-1 features (patches + CLS: the plan's `v1_patches + cls_token_24`), the module's output
    shape, and the gradients of every `text_cross_attn` parameter after one backward (`check_gradients`).
    Returns the report, one line per check; a `UserError` with the report when one fails. Leaves no
    gradient, no optimizer step and the gate as it was."""
    ds = load_dataset(args, args.dataset, training_shot(args), augment=True)
    batch = next(iter(DataLoader(ds, batch_size=args.text_batch_size, shuffle=False)))
    images, masks = batch["image"].to(device), batch["mask"].to(device)
    class_idx = bank.class_indices(batch["class_name"], device)
    b, n, d = images.shape[0], model.grid[0] * model.grid[1], model.embed_dim
    level = model.levels[model.context_level]
    ca = model.text_cross_attn
    report, failures = [f"[info] {model.describe()}"], []

    def check(ok: bool, what: str) -> None:
        report.append(f"[{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    with model.autocast():
        with torch.no_grad():
            feats, cls = model.stage1_features(images)
            context = model.image_context(images, feats)
            alone = model.image_context(images)
        tokens = n + (model.context_cls == "token")
        check(tuple(context.shape) == (b, tokens, d), f"context shape {tuple(context.shape)} == {(b, tokens, d)}")
        check(torch.allclose(context.float(), alone.float(), atol=1e-4),
              f"context equals the level-{level} context computed alone")
        check_rebuilt(context, feats[model.context_level], F.normalize(cls, dim=-1)[:, None], model.context_cls,
                      level, check)
        x, _ = model.text_before_cross_attn(bank.tokens[class_idx[:1]])
        out = ca(x.flatten(1, 2), context[:1])
        check(tuple(out.shape) == tuple(x.flatten(1, 2).shape),
              f"cross-attention output shape {tuple(out.shape)} == text stream {tuple(x.flatten(1, 2).shape)}")

    def loss() -> torch.Tensor:
        with model.autocast():
            anchors = get_vision_aware_text_embedding(model, bank, class_idx, context)
            return stage1_loss(feats, anchors, masks, model.grid, args.stage1_all_levels, args.text_norm_weight)
    check_gradients(ca, loss, check)
    model.zero_grad(set_to_none=True)
    if failures:
        raise UserError("sanity check failed:\n" + "\n".join(report))
    return report


def check_rebuilt(context: torch.Tensor, level_feats: torch.Tensor, cls_unit: torch.Tensor, context_cls: str,
                  level: int, check: Check) -> None:
    """The context rebuilt into the level's Stage-1 features: itself for `residual`, its patch rows plus the
    CLS for `token` (whose last row must be the CLS) and `none`. The tolerance is a few rounding steps of
    the features' dtype: `(P + c) - c + c` is not `P + c` bit for bit. context: [B, N(+1), D],
    level_feats: [B, N, D], cls_unit: [B, 1, D] (from `stage1_features`' CLS, not from the context)."""
    n = level_feats.shape[1]
    tol = 8 * torch.finfo(level_feats.dtype).eps

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a.float(), b.float(), rtol=0, atol=tol)
    if context_cls == "token":
        check(close(context[:, n:], cls_unit), "the last context token is the unit CLS embedding")
    rebuilt = context if context_cls == "residual" else context[:, :n] + cls_unit
    check(close(rebuilt, level_feats), f"context ({context_cls}) rebuilt is the level-{level} Stage-1 features "
                                       "(unit patches + unit CLS)")


def gradient_norm(p: torch.nn.Parameter) -> float:
    """The norm of `p`'s gradient; NaN when it has none or a non-finite one."""
    g = p.grad
    return float(g.norm()) if g is not None and bool(torch.isfinite(g).all()) else float("nan")


def check_gradients(ca: CrossAttentionModule, loss: Callable[[], torch.Tensor], check: Check) -> None:
    """Backward of `loss()` and a finite gradient on every parameter of `ca`, non-zero except where it is
    zero by construction: the key bias's (a bias added to every key shifts a query's logits by a constant,
    which softmax cancels) and, while a tanh gate is closed (0: a new run), the weights' (their output is
    multiplied by tanh(0)); the gate's then must not be zero, and the backward is repeated with the gate
    opened (tanh(1)) to check that the weights reach the loss. The gate is restored."""
    closed = ca.gate is not None and float(ca.gate.detach()) == 0
    loss().backward()
    for name, p in ca.named_parameters():
        norm = gradient_norm(p)
        what = f"text_cross_attn.{name} gradient norm {norm:.3e}"
        if name == "k_proj.bias":
            check(not math.isnan(norm), f"{what}: finite (zero by construction)")
        elif closed and name != "gate":
            check(norm == 0, f"{what}: exactly 0 while the gate is closed")
        else:
            check(norm > 0, what)
    if not closed:
        return
    ca.zero_grad(set_to_none=True)
    with torch.no_grad():
        ca.gate.fill_(1.0)
    try:
        loss().backward()
    finally:
        with torch.no_grad():
            ca.gate.zero_()
    for name, p in ca.named_parameters():
        if name not in ("gate", "k_proj.bias"):
            norm = gradient_norm(p)
            check(norm > 0, f"text_cross_attn.{name} gradient norm {norm:.3e} with the gate opened")


def build_with_init(args: argparse.Namespace, variant: Variant, device: torch.device
                    ) -> AdaptedCLIPWithCrossAttention:
    """The model, its text adapter taken from `--init_text_adapter` when a new run starts."""
    model = build_model(args, variant, device)
    if args.init_text_adapter and not (Path(args.save_path) / variant.text_ckpt).exists():
        load_module_state(model.text_adapter, load_checkpoint(args.init_text_adapter), "text_adapter",
                          args.init_text_adapter)
    return model


@cli_main
def main() -> None:
    variant = get_variant("cross_attention")
    args = get_train_parser(variant, __doc__).parse_args()
    with start_run(args, variant, build_with_init) as run:
        if args.sanity_check:
            with same_outcome():  # every rank checks the same batch: all pass or all stop
                report = sanity_check(run.model, run.bank, args, run.device)
            for line in report:
                run.logger.info(f"sanity check {line}")
        train_text_adapter(run)
        train_image_adapter(run)
        run.logger.info(f"done: checkpoints in {run.save_dir}")


if __name__ == "__main__":
    main()
