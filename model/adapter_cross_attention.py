"""AA-CLIP with vision-aware text anchors: cross-attention from the text tokens to the image's Stage-1
features, inside the text encoder.

The plan (the defaults): after text layer 0, before `text_adapter[0]`; the context is the first Stage-1
level's patch features with the CLS embedding added to every patch; an ungated residual `x + CA(x)`.
Ablations change one of these at a time: how the CLS enters (`context_cls`), which level gives the context
(`context_level`), after which text block the module sits (`cross_attn_after`), and a tanh gate that starts
closed (`cross_attn_gate`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.adapter import AdaptedCLIP, block_forward
from utils.errors import UserError

# How the image's CLS embedding enters the context: added to every patch (the plan), appended as one more
# key/value token, or left out.
CONTEXT_CLS = ("residual", "token", "none")
# The residual around the module: the plan's `x + CA(x)`, or `x + tanh(gate) * CA(x)` with the gate at 0.
GATES = ("none", "tanh")


class CrossAttentionModule(nn.Module):
    """Multi-head cross-attention, queries from the text stream, keys = values from the image context.

    dim: text width Wt (768 for ViT-L); context_dim: the context's width D (768). q/k/v/out projections
    with bias; attention dropout while training.

    `gate="tanh"` multiplies the output by `tanh(gate)`, a learnable scalar initialised at 0 (Flamingo's
    gated cross-attention): the module starts as the identity of the text stream. While the gate is 0 the
    q/k/v/out weights get exactly zero gradient (their output is multiplied by tanh(0) = 0); the gate gets
    tanh'(0) = 1 times the loss's gradient along the module's output, so the first optimizer step opens it
    and the weights learn from the second step on. The state dict holds `gate` only when gated: an ungated
    module keeps the plan's keys.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8, dropout: float = 0.1, gate: str = "none"):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"text width {dim} is not divisible by {num_heads} heads")
        if gate not in GATES:
            raise UserError(f"cross-attention gate {gate!r} is not one of {', '.join(GATES)}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim, dim)
        self.v_proj = nn.Linear(context_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(())) if gate == "tanh" else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, W] -> [B, h, L, W/h]."""
        b, n, w = x.shape
        return x.view(b, n, self.num_heads, w // self.num_heads).transpose(1, 2)

    def gated(self, out: torch.Tensor) -> torch.Tensor:
        """`tanh(gate) * out` for the gated module, `out` otherwise. out: [..., Wt]."""
        return out if self.gate is None else torch.tanh(self.gate) * out

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, once per image. context: [B, N, D] -> 2 x [B, h, N, Wt/h]."""
        return self._heads(self.k_proj(context)), self._heads(self.v_proj(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, M, Wt] text tokens of image b (M = prompts x tokens: every token is an independent
        query, so all prompts of an image share its projected keys and values), context: [B, N, D]
        -> [B, M, Wt] (gated)."""
        k, v = self.project_context(context)
        q = self._heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.gated(self.out_proj(out.transpose(1, 2).flatten(2)))

    def attention_weights(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The softmax attention (no dropout), for analysis. x: [B, M, Wt], context: [B, N, D]
        -> [B, h, M, N]."""
        k, _ = self.project_context(context)
        q = self._heads(self.q_proj(x))
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)

    def value_mix(self, weights: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """What `source` brings to the output through the per-head coefficients `weights`, gated, without
        the biases: `gated(W_o concat_h(weights_h @ (W_v source)_h))`. The value and output projections are
        linear, so the output (no dropout) is the sum of these parts over a split of the context plus the
        bias part `gated(W_o b_v + b_o)` (a query's weights sum to 1). weights: [B, h, M, S],
        source: [B, S, D] -> [B, M, Wt]."""
        v = self._heads(F.linear(source, self.v_proj.weight))
        return self.gated(F.linear((weights @ v).transpose(1, 2).flatten(2), self.out_proj.weight))


class Stage1Features(list):
    """Stage-1 features as `AdaptedCLIP.stage1_features` returns them (levels x [B, N, D], each the level's
    unit patch features plus the unit CLS embedding), carrying that CLS, `cls_unit` [B, 1, D]. A training
    step hands its Stage-1 features to the anchors; a `token` or `none` context takes the CLS out of them
    again instead of running the backbone a second time."""

    def __init__(self, feats: list[torch.Tensor], cls_unit: torch.Tensor):
        super().__init__(feats)
        self.cls_unit = cls_unit


class AdaptedCLIPWithCrossAttention(AdaptedCLIP):
    """`AdaptedCLIP` plus `text_cross_attn`: each image gets its own normal/abnormal anchors.

    context_cls: "residual" (the plan), "token" or "none" (`CONTEXT_CLS`); context_level: the Stage-1 level
    that gives the context, an index into `levels` (the plan: 0, block 6 of ViT-L); cross_attn_after: the
    0-based text block the module follows, before that block's adapter (the plan: 0); cross_attn_gate:
    "none" (the plan) or "tanh" (`CrossAttentionModule`). The image path is the baseline's.
    """

    def __init__(self, clip_model: nn.Module, cross_attn_heads: int = 8, cross_attn_dropout: float = 0.1,
                 cross_attn_gate: str = "none", context_cls: str = "residual", context_level: int = 0,
                 cross_attn_after: int = 0, **kwargs):
        super().__init__(clip_model, **kwargs)
        if context_cls not in CONTEXT_CLS:
            raise UserError(f"--context_cls {context_cls!r} is not one of {', '.join(CONTEXT_CLS)}")
        if not 0 <= context_level < len(self.levels):
            raise UserError(f"--context_level {context_level} is not an index into the {len(self.levels)} Stage-1 "
                            f"levels {self.levels}: use 0..{len(self.levels) - 1}")
        if not 0 <= cross_attn_after < self.text_depth:
            raise UserError(f"--cross_attn_after {cross_attn_after} is not a text block: the text encoder has blocks "
                            f"0..{self.text_depth - 1} (0-based)")
        self.context_cls = context_cls
        # The one owner of which level is the context: training, the anchors, the sanity check and the
        # analysis all ask `image_context` / `context_parts`.
        self.context_level = context_level
        self.cross_attn_after = cross_attn_after
        text_width = clip_model.token_embedding.embedding_dim
        self.text_cross_attn = CrossAttentionModule(text_width, self.embed_dim, cross_attn_heads, cross_attn_dropout,
                                                    cross_attn_gate)

    def describe(self) -> str:
        """The module's place, context and gate in one line, for logs and titles."""
        gate = self.text_cross_attn.gate
        return (f"context --context_cls {self.context_cls} at level {self.levels[self.context_level]} "
                f"(--context_level {self.context_level}); module after text block {self.cross_attn_after}; gate "
                + ("none" if gate is None else f"tanh, value {float(gate.detach()):.3g}"))

    # ---------------------------------------------------------------- image context
    def stage1_features(self, image: torch.Tensor, levels: list[int] | None = None
                        ) -> tuple[Stage1Features, torch.Tensor]:
        """`AdaptedCLIP.stage1_features`, the same values, as `Stage1Features`."""
        feats, cls = super().stage1_features(image, levels)
        # The expression the base class added to every level, so `feats[l] - cls_unit` is its patch part.
        return Stage1Features(feats, F.normalize(cls, dim=-1)[:, None]), cls

    def context_features(self, image: torch.Tensor, stage1_feats: list[torch.Tensor] | None = None
                         ) -> list[torch.Tensor]:
        """Stage-1 features that hold the context level: the step's own when given, else computed for the
        levels up to the context level only (the surgery path stops there; the CLS still needs the whole plain
        path). image: [B, 3, S, S] -> levels x [B, N, D]."""
        if stage1_feats is None:
            stage1_feats, _ = self.stage1_features(image, levels=self.levels[:self.context_level + 1])
        return stage1_feats

    def context_parts(self, image: torch.Tensor, stage1_feats: Stage1Features | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context level's unit patch features and the unit CLS embedding. `stage1_feats`: this model's
        `stage1_features` of `image`, reused when given. image: [B, 3, S, S] -> (patches [B, N, D],
        cls_unit [B, 1, D])."""
        feats = self.context_features(image, stage1_feats)
        if not isinstance(feats, Stage1Features):
            raise TypeError("stage1_feats must come from this model's stage1_features, which carries the CLS")
        return feats[self.context_level] - feats.cls_unit, feats.cls_unit

    def compose_context(self, patches: torch.Tensor, cls_unit: torch.Tensor) -> torch.Tensor:
        """The keys/values' source. patches: [B, N, D], cls_unit: [B, 1, D] -> residual: patches + CLS
        [B, N, D]; token: [B, N + 1, D], the CLS last; none: the patches [B, N, D]."""
        if self.context_cls == "residual":
            return patches + cls_unit
        if self.context_cls == "token":
            return torch.cat([patches, cls_unit], dim=1)
        return patches

    def image_context(self, image: torch.Tensor, stage1_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The context of `context_cls` from the context level's Stage-1 features. `stage1_feats`: the
        step's own Stage-1 features (every level), reused when given (`context_features`).
        image: [B, 3, S, S] -> [B, N, D] ([B, N + 1, D] for `token`)."""
        feats = self.context_features(image, stage1_feats)
        if self.context_cls == "residual":
            # The plan's tensor exactly as the Stage-1 loss sees it (not rebuilt from its parts).
            return feats[self.context_level]
        return self.compose_context(*self.context_parts(image, feats))

    def cross_attn_parts(self, x: torch.Tensor, patches: torch.Tensor, cls_unit: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cross-attention output split by linearity (`CrossAttentionModule.value_mix`) into what the
        patches and what the CLS bring, and the CLS's coefficient: 1 for `residual` (every value carries
        the CLS and a query's weights sum to 1: the CLS part is the same for every query), the attention on
        the CLS token for `token`, 0 for `none`. `text_cross_attn(x, compose_context(patches, cls_unit))`
        = patch part + CLS part + gated(W_o b_v + b_o) in eval mode. x: [B, M, Wt], patches: [B, N, D],
        cls_unit: [B, 1, D] -> (patch part [B, M, Wt], CLS part [B, M, Wt], CLS coefficient [B, M],
        heads averaged)."""
        ca = self.text_cross_attn
        w = ca.attention_weights(x, self.compose_context(patches, cls_unit))
        n = patches.shape[1]
        if self.context_cls == "token":
            cls_w = w[..., n:]
        else:
            cls_w = torch.full_like(w[..., :1], 1.0 if self.context_cls == "residual" else 0.0)
        return ca.value_mix(w[..., :n], patches), ca.value_mix(cls_w, cls_unit), cls_w.mean(dim=1)[..., 0]

    # ---------------------------------------------------------------- text
    def text_before_cross_attn(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and text blocks 0..`cross_attn_after` (with the adapters of the blocks before it),
        which do not depend on the image: computed once per prompt. tokens: [K, P, 77] ->
        (x [K, P, T, Wt], eot [K, P])."""
        k, p, length = tokens.shape
        x, eot = self.embed_text(tokens.reshape(k * p, length))
        x = self.text_blocks(x, adapt=True, end=self.cross_attn_after)
        x = block_forward(self.clip.transformer.resblocks[self.cross_attn_after], x, causal=True)
        return x.view(k, p, *x.shape[1:]), eot.view(k, p)

    def encode_text_with_context(self, tokens: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vision-aware prompt embeddings: image b uses the prompts `tokens[rows[b]]` and its context.

        tokens: [K, P, 77], rows: [B], context: [B, N, D] -> [B, P, D].
        """
        x, eot = self.text_before_cross_attn(tokens)
        x, eot = x[rows], eot[rows]
        b, p, t, w = x.shape
        x = x + self.text_cross_attn(x.reshape(b, p * t, w), context).view(b, p, t, w)
        x = self.adapt_text(self.cross_attn_after, x.reshape(b * p, t, w))
        x = self.text_blocks(x, adapt=True, start=self.cross_attn_after + 1)
        return self.text_head(x, eot.reshape(-1), adapt=True).view(b, p, -1)
