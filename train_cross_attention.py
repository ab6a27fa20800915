"""Train AA-CLIP with vision-aware text anchors (cross-attention after text layer 0).

Stage 1 trains `text_adapter` and `text_cross_attn` together; Stage 2 trains the image adapters as the
baseline does, with per-image anchors from the frozen Stage-1 model. Same flags as train.py, plus:

    python train_cross_attention.py --dataset VisA --pretrained ViT-L-14-336px.pt --save_path ckpt/cross_attn
    python train_cross_attention.py ... --init_text_adapter ckpt/baseline/text_adapter.pth   # fair comparison
    torchrun --standalone --nproc_per_node 2 train_cross_attention.py ...   # on 2 GPUs, as train.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from forward_utils import stage1_loss
from forward_utils_cross_attention import (CROSS_ATTN_CKPT, build_cross_attention_model,
                                           cross_attention_anchor_fn, get_vision_aware_text_embedding)
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention
from train import (get_parser as get_base_parser, load_dataset, start_run, train_image_adapter, train_text_adapter,
                   training_shot)
from utils import UserError, autocast, cli_main, load_checkpoint, load_module_state, same_outcome


def get_parser() -> argparse.ArgumentParser:
    p = get_base_parser(__doc__)
    p.set_defaults(save_path="ckpt/cross_attn")
    g = p.add_argument_group("cross-attention")
    g.add_argument("--cross_attn_heads", type=int, default=8, help="cross-attention heads (default: %(default)s)")
    g.add_argument("--cross_attn_dropout", type=float, default=0.1, help="attention dropout (default: %(default)s)")
    g.add_argument("--init_text_adapter", default=None,
                   help="start Stage 1 from a trained baseline text_adapter.pth (only the new module starts "
                        "from scratch)")
    g.add_argument("--text_context", choices=["image", "none"], default="image",
                   help="Stage-2 anchors: per image from the frozen Stage-1 model, or with the cross-attention "
                        "bypassed (ablation) (default: %(default)s)")
    g.add_argument("--sanity_check", action="store_true",
                   help="check context, shapes and gradients on the first batch, print a report, then train")
    return p


def sanity_check(model: AdaptedCLIPWithCrossAttention, bank, args: argparse.Namespace,
                 device: torch.device) -> list[str]:
    """The plan's validation on the first training batch: context shape, context equal to the level-1
    Stage-1 features, module output shape, and finite non-zero gradients on every `text_cross_attn`
    parameter after one backward. Leaves no gradient and no optimizer step behind."""
    ds = load_dataset(args, args.dataset, training_shot(args), augment=True)
    batch = next(iter(DataLoader(ds, batch_size=args.text_batch_size, shuffle=False)))
    images, masks = batch["image"].to(device), batch["mask"].to(device)
    class_idx = bank.class_indices(batch["class_name"], device)
    b, n, d = images.shape[0], model.grid[0] * model.grid[1], model.embed_dim
    report, failures = [], []

    def check(ok: bool, what: str) -> None:
        report.append(f"[{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    with autocast(device, args.precision):
        with torch.no_grad():
            feats, _ = model.stage1_features(images)
            context = feats[0]
            alone = model.image_context(images)
        check(tuple(context.shape) == (b, n, d), f"context shape {tuple(context.shape)} == {(b, n, d)}")
        check(torch.allclose(context.float(), alone.float(), atol=1e-4),
              f"context equals the level-{model.levels[0]} Stage-1 features computed alone")
        x, _ = model.text_after_first_block(bank.tokens[class_idx[:1]])
        out = model.text_cross_attn(x.flatten(1, 2), context[:1])
        check(tuple(out.shape) == tuple(x.flatten(1, 2).shape),
              f"cross-attention output shape {tuple(out.shape)} == text stream {tuple(x.flatten(1, 2).shape)}")
        anchors = get_vision_aware_text_embedding(model, bank, class_idx, context)
        loss = stage1_loss(feats, anchors, masks, model.grid, args.stage1_all_levels, args.text_norm_weight)
    loss.backward()
    for name, p in model.text_cross_attn.named_parameters():
        g = p.grad
        finite = g is not None and bool(torch.isfinite(g).all())
        if name == "k_proj.bias":
            # A key bias adds the same amount to all logits of a query, which softmax cancels: its
            # gradient is zero in exact arithmetic, so only finiteness is checked.
            check(finite, f"text_cross_attn.{name} gradient finite (zero by construction: "
                          f"norm {float(g.norm()) if finite else float('nan'):.1e})")
            continue
        ok = finite and float(g.norm()) > 0
        check(ok, f"text_cross_attn.{name} gradient {'none' if g is None else f'norm {float(g.norm()):.3e}'}")
    model.zero_grad(set_to_none=True)
    if failures:
        raise UserError("sanity check failed:\n" + "\n".join(report))
    return report


def build_with_init(args: argparse.Namespace) -> AdaptedCLIPWithCrossAttention:
    """The model, its text adapter taken from `--init_text_adapter` when a new run starts."""
    model = build_cross_attention_model(args)
    if args.init_text_adapter and not (Path(args.save_path) / CROSS_ATTN_CKPT).exists():
        load_module_state(model.text_adapter, load_checkpoint(args.init_text_adapter), "text_adapter",
                          args.init_text_adapter)
    return model


@cli_main
def main() -> None:
    args = get_parser().parse_args()
    if args.text_epoch <= 0:
        raise UserError("--text_epoch 0 leaves the cross-attention untrained; use train.py for a run without "
                        "a text stage")
    device, model, bank, save_dir, logger = start_run(args, "cross_attention", build_with_init)
    if args.sanity_check:
        with same_outcome():  # every rank checks the same batch: all pass or all stop
            report = sanity_check(model, bank, args, device)
        for line in report:
            logger.info(f"sanity check {line}")
    modules = {"text_adapter": model.text_adapter, "text_cross_attn": model.text_cross_attn}
    train_text_adapter(args, model, bank, device, save_dir, logger, modules=modules, ckpt_name=CROSS_ATTN_CKPT,
                       anchor_fn=cross_attention_anchor_fn(model, bank, "image"))
    train_image_adapter(args, model, bank, device, save_dir, logger,
                        cross_attention_anchor_fn(model, bank, args.text_context))
    logger.info(f"done: checkpoints in {save_dir}")


if __name__ == "__main__":
    main()
