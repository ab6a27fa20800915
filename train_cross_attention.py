"""Train AA-CLIP with vision-aware text anchors (cross-attention after text layer 0).

Stage 1 trains `text_adapter` and `text_cross_attn` together; Stage 2 trains the image adapters as the
baseline does, with per-image anchors from the frozen Stage-1 model. Same flags as train.py, plus:

    python train_cross_attention.py --dataset VisA --pretrained ViT-L-14-336px.pt --save_path ckpt/cross_attention
    python train_cross_attention.py ... --init_text_adapter ckpt/baseline/text_adapter.pth   # fair comparison
    torchrun --standalone --nproc_per_node 2 train_cross_attention.py ...   # on 2 GPUs, as train.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cli import build_model, cli_main, get_train_parser, load_dataset, training_shot
from engine import start_run, train_image_adapter, train_text_adapter
from forward_utils import PromptBank, Variant, stage1_loss
from forward_utils_cross_attention import get_vision_aware_text_embedding
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention
from utils.distributed import same_outcome
from utils.errors import UserError
from utils.io import load_checkpoint, load_module_state
from variants import get_variant


def sanity_check(model: AdaptedCLIPWithCrossAttention, bank: PromptBank, args: argparse.Namespace,
                 device: torch.device) -> list[str]:
    """The plan's validation on the first training batch: context shape, context equal to the first
    level's Stage-1 features, module output shape, and finite non-zero gradients on every `text_cross_attn`
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

    with model.autocast():
        with torch.no_grad():
            feats, _ = model.stage1_features(images)
            context = model.image_context(images, feats)
            alone = model.image_context(images)
        check(tuple(context.shape) == (b, n, d), f"context shape {tuple(context.shape)} == {(b, n, d)}")
        check(torch.allclose(context.float(), alone.float(), atol=1e-4),
              f"context equals the level-{model.levels[model.context_level]} Stage-1 features computed alone")
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
