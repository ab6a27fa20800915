"""AA-CLIP's adapters around a frozen open_clip CLIP.

Every transformer block is run through `block_forward`, which reuses the block's own weights with
`F.scaled_dot_product_attention`, so the same code serves plain, causal (text) and V-V "surgery"
attention, and runs flash attention under bf16 autocast.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError


class SimpleAdapter(nn.Module):
    """Linear (no bias) + LeakyReLU; state-dict key `fc.0.weight`."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU(0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SimpleProj(nn.Module):
    """Linear (no bias), LeakyReLU only if `relu`; key `fc.0.weight` with relu, else `fc.weight`."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True):
        super().__init__()
        linear = nn.Linear(c_in, c_out, bias=False)
        self.fc = nn.Sequential(linear, nn.LeakyReLU(0.01)) if relu else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def mix_residual(x: torch.Tensor, adapter: nn.Module, weight: float) -> torch.Tensor:
    """`w * a * ||x|| / ||a|| + (1 - w) * x` with `a = adapter(x)`, norms per token. x: [..., C]."""
    a = adapter(x)
    a = a * (x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True))
    return weight * a + (1 - weight) * x


def attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, causal: bool = False, value_only: bool = False
) -> torch.Tensor:
    """Multi-head self-attention with the weights of `attn` (batch-first). x: [B, L, C] -> [B, L, C].

    `value_only` is CLIP-surgery's V-V attention: `softmax(v v^T / sqrt(d)) v` with the block's own
    value projection used as query, key and value.
    """
    b, n, c = x.shape
    heads = attn.num_heads
    if value_only:
        v = F.linear(x, attn.in_proj_weight[2 * c:], attn.in_proj_bias[2 * c:])
        q = k = v = v.view(b, n, heads, c // heads).transpose(1, 2)
    else:
        # `qkv_proj` exists once `AdaptedCLIP.use_fp8` has made the projection an FP8 linear.
        proj = getattr(attn, "qkv_proj", None)
        qkv = proj(x) if proj is not None else F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, c))


def block_forward(
    block: nn.Module, x: torch.Tensor, causal: bool = False, value_only: bool = False, batch_mixing: bool = False
) -> torch.Tensor:
    """One open_clip `ResidualAttentionBlock` (pre-norm, residual, MLP, layer scale). x: [B, L, C].

    `batch_mixing` reproduces the original AA-CLIP defect: its V-V attention received a
    sequence-first tensor as if it were batch-first, so it attends across the images of the batch at
    each token position. Transposing B and L around the attention computes exactly that.

    A block whose weights are stored in bf16 runs in bf16 end to end, outside autocast: autocast would
    return its norms in fp32 and keep an fp32 residual stream, doubling the memory traffic.
    """
    dtype = block.ln_1.weight.dtype
    if dtype != torch.float32:
        with torch.autocast(x.device.type, enabled=False):
            return _block(block, x.to(dtype), causal, value_only, batch_mixing)
    return _block(block, x, causal, value_only, batch_mixing)


def _block(block: nn.Module, x: torch.Tensor, causal: bool, value_only: bool, batch_mixing: bool) -> torch.Tensor:
    h = block.ln_1(x)
    if batch_mixing:
        a = attention(block.attn, h.transpose(0, 1), value_only=value_only).transpose(0, 1)
    else:
        a = attention(block.attn, h, causal=causal, value_only=value_only)
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# Recompilations allowed per compiled function: one graph per attention kind, grad mode, dtype and batch size.
RECOMPILE_LIMIT = 64
FP8_RECIPES = ("tensorwise", "rowwise")


@functools.cache
def compiled(fn: Callable, backend: str = "inductor") -> Callable:
    """`torch.compile(fn)`, made once per function and backend, so every model shares its compiled graphs."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, backend=backend, dynamic=False)


def default_levels(depth: int) -> list[int]:
    """Token taps at every quarter of the vision depth: [6, 12, 18, 24] for ViT-L."""
    return [depth // 4 * (i + 1) for i in range(4)]


def default_surgery_until_layer(depth: int) -> int:
    """The original's `surgery_until_layer` (20 for ViT-L): V-V attention in the last
    `surgery_until_layer - 1` blocks, i.e. from the first level's block on."""
    return depth - depth // 4 + 2


class AdaptedCLIP(nn.Module):
    """AA-CLIP: a frozen CLIP with residual text and image adapters.

    Sizes come from the backbone: for ViT-L-14-336 at 518 px, Wv = 1024 (vision width), Wt = 768 (text
    width), D = 768 (joint embedding), N = 1369 patches, depth 24 -> levels [6, 12, 18, 24],
    image_adapt_until 6, text_adapt_until 3, surgery_until_layer 20.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        text_adapt_weight: float = 0.1,
        image_adapt_weight: float = 0.1,
        levels: list[int] | None = None,
        relu: bool = False,
        text_adapt_until: int | None = None,
        image_adapt_until: int | None = None,
        surgery_until_layer: int | None = None,
        surgery_batch_mixing: bool = False,
    ):
        super().__init__()
        self.clip = clip_model.eval().requires_grad_(False)
        visual = clip_model.visual
        self.vision_depth = len(visual.transformer.resblocks)
        self.text_depth = len(clip_model.transformer.resblocks)
        vision_width = visual.conv1.out_channels
        text_width = clip_model.token_embedding.embedding_dim
        self.embed_dim = visual.proj.shape[1]
        self.grid = tuple(visual.grid_size)

        self.text_adapt_weight = text_adapt_weight
        self.image_adapt_weight = image_adapt_weight
        self.levels = list(levels or default_levels(self.vision_depth))
        self.text_adapt_until = text_adapt_until or max(1, self.text_depth // 4)
        self.image_adapt_until = image_adapt_until or max(1, self.vision_depth // 4)
        self.surgery_until_layer = surgery_until_layer or default_surgery_until_layer(self.vision_depth)
        self.surgery_batch_mixing = surgery_batch_mixing
        if not 1 <= self.surgery_until_layer - 1 <= self.vision_depth:
            raise UserError(f"surgery_until_layer {self.surgery_until_layer} outside 2..{self.vision_depth + 1}")
        if max(self.levels) > self.vision_depth or min(self.levels) < 1:
            raise UserError(f"levels {self.levels} outside 1..{self.vision_depth}")

        self.text_adapter = nn.ModuleList(
            [SimpleAdapter(text_width, text_width) for _ in range(self.text_adapt_until)]
            + [SimpleProj(text_width, clip_model.text_projection.shape[1], relu=True)]
        )
        self.image_adapter = nn.ModuleDict({
            "layer_adapters": nn.ModuleList(
                [SimpleAdapter(vision_width, vision_width) for _ in range(self.image_adapt_until)]),
            "seg_proj": nn.ModuleList(
                [SimpleProj(vision_width, self.embed_dim, relu) for _ in self.levels]),
            "det_proj": SimpleProj(vision_width, self.embed_dim, relu),
        })
        xavier_init(self.text_adapter)
        xavier_init(self.image_adapter)
        self.compiled_batch_sizes: set[int] = set()
        self.compile_backend = "inductor"
        self.fp8: str | None = None

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.clip.ln_final.weight.dtype

    @property
    def precision(self) -> str:
        """"bf16" or "fp32", as `--precision` settled it when the model was built, with "+fp8 <recipe>" once
        `use_fp8` made the vision blocks' linear layers FP8 (logs and results JSON)."""
        dtype = "bf16" if self.backbone_dtype == torch.bfloat16 else "fp32"
        return dtype + (f"+fp8 {self.fp8}" if self.fp8 else "")

    def autocast(self) -> torch.autocast:
        """The one precision context of every forward: bf16 autocast when the backbone is stored in bf16
        (`--precision bf16`: fp32 adapter weights, fp32 logits and losses), disabled for an fp32 backbone.
        No weight-cast cache: every adapter weight is used once per forward, and CUDA-graph capture
        (Stage 2) does not allow the cache."""
        device_type = self.clip.ln_final.weight.device.type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.backbone_dtype == torch.bfloat16,
                              cache_enabled=False)

    def set_backbone_dtype(self, dtype: torch.dtype) -> None:
        """Stores the frozen CLIP in `dtype` (bf16 for `--precision bf16`): its blocks then run in bf16
        without autocast casts; the trained adapters keep fp32 weights and run under autocast."""
        self.clip.to(dtype)

    def compile_blocks(self, batch_sizes: Iterable[int], backend: str = "inductor") -> None:
        """Runs the vision blocks and the image adapters' residual mixing through `torch.compile` for batches
        of `batch_sizes` images; other sizes (an epoch's smaller last batch) run eagerly instead of paying
        another compilation. Compilation is regional: the block's weights are inputs of the compiled graph,
        not constants, so one graph per attention kind (plain or V-V) and grad mode serves all blocks, and
        compiling costs one block's time instead of the whole depth's. Inductor keeps what it built in its
        on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_<user>), so a later process
        compiles in a fraction of the time (docs/benchmarks.md)."""
        self.compiled_batch_sizes.update(batch_sizes)
        self.compile_backend = backend

    def _maybe_compiled(self, fn: Callable, x: torch.Tensor) -> Callable:
        return compiled(fn, self.compile_backend) if x.shape[0] in self.compiled_batch_sizes else fn

    def vision_block(self, i: int, x: torch.Tensor, value_only: bool = False) -> torch.Tensor:
        """Vision block i (0-based), compiled for the batch sizes of `compile_blocks`. x: [B, 1 + N, Wv]."""
        batch_mixing = value_only and self.surgery_batch_mixing
        return self._maybe_compiled(block_forward, x)(self.clip.visual.transformer.resblocks[i], x,
                                                      value_only=value_only, batch_mixing=batch_mixing)

    def adapt_image(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Residual image adapter after 0-based vision block i < `image_adapt_until`. x: [B, 1 + N, Wv]."""
        return self._maybe_compiled(mix_residual, x)(x, self.image_adapter["layer_adapters"][i],
                                                     self.image_adapt_weight)

    def use_fp8(self, recipe: str = "tensorwise") -> None:
        """Runs the frozen vision blocks' linear layers (q/k/v, attention output, MLP) as torchao's FP8
        linears: inputs, weights and the gradients flowing back are cast to float8 with dynamic scales
        (`recipe`: one scale per tensor, or per row), on the FP8 tensor cores of an H100/H200. The V-V
        attention's value projection and the text side stay in bf16. Meant to run under `compile_blocks`,
        which fuses the casts; at ViT-L's width it is still no faster than bf16 compiled (docs/benchmarks.md)."""
        try:
            from torchao.float8 import Float8LinearConfig, ScalingGranularity, ScalingType, convert_to_float8_training
        except ImportError:
            raise UserError("--fp8 needs torchao: pip install torchao") from None
        if recipe not in FP8_RECIPES:
            raise UserError(f"unknown FP8 recipe {recipe!r}; choose one of {', '.join(FP8_RECIPES)}")
        # The weights are frozen: their gradient, which torchao's backward would compute from float8 casts that
        # need the token count divisible by 16 (2 x 1370 tokens is not), is left in bf16, where compilation
        # drops it as unused.
        config = Float8LinearConfig.from_recipe_name(recipe)
        config = dataclasses.replace(config, **{
            name: dataclasses.replace(getattr(config, name), scaling_type=ScalingType.DISABLED,
                                      scaling_granularity=ScalingGranularity.TENSORWISE)
            for name in ("cast_config_input_for_grad_weight", "cast_config_grad_output_for_grad_weight")})
        transformer = self.clip.visual.transformer
        for block in transformer.resblocks:
            attn = block.attn
            qkv = nn.Linear(attn.embed_dim, 3 * attn.embed_dim, device="meta")
            qkv.weight, qkv.bias = attn.in_proj_weight, attn.in_proj_bias
            attn.qkv_proj = qkv
        convert_to_float8_training(transformer, config=config)
        self.fp8 = recipe

    def train(self, mode: bool = True) -> "AdaptedCLIP":
        """The frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def surgery_start(self) -> int:
        """0-based index of the first V-V attention block (5 for ViT-L)."""
        return self.vision_depth - (self.surgery_until_layer - 1)

    # ---------------------------------------------------------------- text
    def embed_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token + positional embeddings, truncated after the last end-of-text token.

        Truncation is exact: with the causal mask nothing after a sequence's EOT reaches its EOT token.
        tokens: [N, 77] -> (x [N, T, Wt] with T = max EOT position + 1, eot [N]).
        """
        eot = tokens.argmax(dim=-1)
        tokens = tokens[:, : int(eot.max()) + 1]
        x = self.clip.token_embedding(tokens) + self.clip.positional_embedding[: tokens.shape[1]]
        return x, eot

    def adapt_text(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Residual text adapter after 0-based text block i (identity from `text_adapt_until` on)."""
        if i < self.text_adapt_until:
            return mix_residual(x, self.text_adapter[i], self.text_adapt_weight)
        return x

    def text_blocks(self, x: torch.Tensor, adapt: bool, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Text blocks `start..end - 1` (to the last one by default), each followed by its adapter when
        `adapt`. x: [N, T, Wt]."""
        for i in range(start, self.text_depth if end is None else end):
            x = block_forward(self.clip.transformer.resblocks[i], x, causal=True)
            if adapt:
                x = self.adapt_text(i, x)
        return x

    def text_head(self, x: torch.Tensor, eot: torch.Tensor, adapt: bool) -> torch.Tensor:
        """`ln_final` at the EOT token, then `text_adapter[-1]` (adapted) or `text_projection`.
        x: [N, T, Wt] -> [N, D]."""
        x = self.clip.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        return self.text_adapter[-1](x) if adapt else x @ self.clip.text_projection

    def encode_text(self, tokens: torch.Tensor, adapt: bool = True) -> torch.Tensor:
        """Text embeddings (not normalised). tokens: [N, 77] -> [N, D]. `adapt=False` is CLIP's own
        `encode_text`."""
        x, eot = self.embed_text(tokens)
        return self.text_head(self.text_blocks(x, adapt), eot, adapt)

    # ---------------------------------------------------------------- image
    def patch_embed(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP's `conv1` (kernel = stride = patch, no bias) as one matrix product over the flattened
        patches: cuDNN ran this convolution in bf16 with a slow implicit-GEMM kernel (profile in
        docs/benchmarks.md).
        Pixels beyond the last whole patch are dropped, as the convolution drops them.
        image: [B, 3, S, S] -> [B, N, Wv]."""
        weight = self.clip.visual.conv1.weight  # [Wv, 3, p, p]
        p = weight.shape[-1]
        b, c, h, w = image.shape
        gh, gw = h // p, w // p
        patches = image[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, gh * gw, c * p * p) @ weight.reshape(weight.shape[0], -1).t()

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS, positional embedding, `ln_pre`. image: [B, 3, S, S] -> [B, 1 + N, Wv]."""
        visual = self.clip.visual
        x = self.patch_embed(image)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's own head on tokens: `ln_post` then `proj`. [B, L, Wv] -> [B, L, D]."""
        return self.clip.visual.ln_post(tokens) @ self.clip.visual.proj

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.image_forward(image)

    def image_forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Adapted image path (Stage 2 and test).

        image: [B, 3, S, S] -> (seg_tokens: len(levels) x [B, N, D] L2-normalised per patch,
        det_token: [B, D], the mean of the L2-normalised det projections of the last level's patches).
        """
        x = self.embed_image(image)
        taps = []
        for i in range(max(self.levels)):
            x = self.vision_block(i, x)
            if i < self.image_adapt_until:
                x = self.adapt_image(i, x)
            if i + 1 in self.levels:
                taps.append(self.clip.visual.ln_post(x[:, 1:]))
        seg_tokens = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.image_adapter["seg_proj"], taps)]
        det_token = F.normalize(self.image_adapter["det_proj"](taps[-1]), dim=-1).mean(dim=1)
        return seg_tokens, det_token

    def stage1_features(
        self, image: torch.Tensor, levels: list[int] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage-1 patch features of the non-adapted CLIP.

        `P_l = normalize(proj(ln_post(surgery_tokens_l[:, 1:]))) + normalize(cls)[:, None]` for each
        level l, where the surgery path uses V-V attention from block `surgery_start` on and `cls` is the
        plain CLIP's final image embedding. The blocks before `surgery_start` are computed once for both
        paths. image: [B, 3, S, S] -> (levels x [B, N, D], cls [B, D]).
        """
        levels = self.levels if levels is None else levels
        trunk_end = min(self.surgery_start, max(levels))
        taps: dict[int, torch.Tensor] = {}
        x = self.embed_image(image)
        for i in range(trunk_end):
            x = self.vision_block(i, x)
            if i + 1 in levels:
                taps[i + 1] = x[:, 1:]
        plain = x
        for i in range(trunk_end, self.vision_depth):
            plain = self.vision_block(i, plain)
        for i in range(trunk_end, max(levels)):
            x = self.vision_block(i, x, value_only=True)
            if i + 1 in levels:
                taps[i + 1] = x[:, 1:]
        cls = self.project_tokens(plain[:, :1])[:, 0]
        cls_unit = F.normalize(cls, dim=-1)[:, None]
        feats = [F.normalize(self.project_tokens(taps[level]), dim=-1) + cls_unit for level in levels]
        return feats, cls
