"""AA-CLIP with vision-aware text anchors: cross-attention from the text tokens to the image's patches
after text layer 0, before `text_adapter[0]`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.adapter import AdaptedCLIP, block_forward
from utils.errors import UserError


class CrossAttentionModule(nn.Module):
    """Multi-head cross-attention, queries from the text stream, keys = values from the image context.

    dim: text width Wt (768 for ViT-L); context_dim: the context's width D (768). q/k/v/out projections
    with bias; attention dropout while training.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"text width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim, dim)
        self.v_proj = nn.Linear(context_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, W] -> [B, h, L, W/h]."""
        b, n, w = x.shape
        return x.view(b, n, self.num_heads, w // self.num_heads).transpose(1, 2)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, once per image. context: [B, N, D] -> 2 x [B, h, N, Wt/h]."""
        return self._heads(self.k_proj(context)), self._heads(self.v_proj(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, M, Wt] text tokens of image b (M = prompts x tokens: every token is an independent
        query, so all prompts of an image share its projected keys and values), context: [B, N, D]
        -> [B, M, Wt]."""
        k, v = self.project_context(context)
        q = self._heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def attention_weights(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The softmax attention (no dropout), for analysis. x: [B, M, Wt], context: [B, N, D]
        -> [B, h, M, N]."""
        k, _ = self.project_context(context)
        q = self._heads(self.q_proj(x))
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)


class AdaptedCLIPWithCrossAttention(AdaptedCLIP):
    """`AdaptedCLIP` plus `text_cross_attn`: each image gets its own normal/abnormal anchors."""

    def __init__(self, clip_model: nn.Module, cross_attn_heads: int = 8, cross_attn_dropout: float = 0.1, **kwargs):
        super().__init__(clip_model, **kwargs)
        text_width = clip_model.token_embedding.embedding_dim
        self.text_cross_attn = CrossAttentionModule(text_width, self.embed_dim, cross_attn_heads, cross_attn_dropout)

    # Which Stage-1 level is the context, as an index into `levels`: the plan's first (block 6 of ViT-L).
    # The one owner of that rule: training, the anchors, the sanity check and the analysis ask `image_context`.
    context_level = 0

    def image_context(self, image: torch.Tensor, stage1_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The context level's Stage-1 features (CLS residual added). `stage1_feats`: the step's own
        Stage-1 features (every level), reused when given; otherwise only the blocks up to the context
        level run. image: [B, 3, S, S] -> [B, N, D]."""
        if stage1_feats is None:
            stage1_feats, _ = self.stage1_features(image, levels=self.levels[:self.context_level + 1])
        return stage1_feats[self.context_level]

    def text_after_first_block(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and text layer 0, which do not depend on the image: computed once per prompt.
        tokens: [K, P, 77] -> (x [K, P, T, Wt], eot [K, P])."""
        k, p, length = tokens.shape
        x, eot = self.embed_text(tokens.reshape(k * p, length))
        x = block_forward(self.clip.transformer.resblocks[0], x, causal=True)
        return x.view(k, p, *x.shape[1:]), eot.view(k, p)

    def encode_text_with_context(self, tokens: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vision-aware prompt embeddings: image b uses the prompts `tokens[rows[b]]` and its context.

        tokens: [K, P, 77], rows: [B], context: [B, N, D] -> [B, P, D].
        """
        x, eot = self.text_after_first_block(tokens)
        x, eot = x[rows], eot[rows]
        b, p, t, w = x.shape
        x = x + self.text_cross_attn(x.reshape(b, p * t, w), context).view(b, p, t, w)
        x = self.adapt_text(0, x.reshape(b * p, t, w))
        x = self.text_blocks(x, adapt=True, start=1)
        return self.text_head(x, eot.reshape(-1), adapt=True).view(b, p, -1)
