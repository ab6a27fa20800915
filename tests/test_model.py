"""AdaptedCLIP against open_clip itself and against independent re-computations (tiny random CLIP)."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from model import AdaptedCLIP, build_clip, get_tokenizer, load_state_dict_file
from model.adapter import block_forward, default_levels, default_surgery_until_layer
from utils.errors import UserError

SIZE = 56  # 4 x 4 patches of 14 px


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip("tiny", "none", SIZE)


@pytest.fixture(scope="module")
def tokens():
    return get_tokenizer("tiny")(["a photo of a dark bottle.", "a damaged {} with flaw", "x"])


def zero_mixing(clip):
    return AdaptedCLIP(clip, text_adapt_weight=0.0, image_adapt_weight=0.0)


def test_depth_derived_defaults_match_vit_l():
    assert default_levels(24) == [6, 12, 18, 24]
    assert default_surgery_until_layer(24) == 20
    clip = build_clip("tiny", "none", SIZE)
    m = AdaptedCLIP(clip)
    assert m.levels == [2, 4, 6, 8] and m.image_adapt_until == 2 and m.text_adapt_until == 1
    assert m.surgery_start == m.levels[0] - 1
    assert m.grid == (4, 4)


def test_text_path_reproduces_open_clip(clip, tokens):
    """Adapters off: every block output, ln_final at EOT and encode_text equal open_clip's."""
    m = zero_mixing(clip)
    with torch.no_grad():
        ref = clip.token_embedding(tokens) + clip.positional_embedding
        x, eot = m.embed_text(tokens)
        t = x.shape[1]
        assert t == int(tokens.argmax(-1).max()) + 1 < 77
        mask = clip.attn_mask
        for block in clip.transformer.resblocks:
            ref = block(ref, attn_mask=mask)
        x = m.text_blocks(x, adapt=True)
        # Truncation after EOT is exact: the kept positions equal open_clip's full-length run.
        torch.testing.assert_close(x, ref[:, :t], rtol=0, atol=2e-5)
        torch.testing.assert_close(m.encode_text(tokens, adapt=False), clip.encode_text(tokens), rtol=0, atol=2e-5)
        pooled = clip.ln_final(ref)[torch.arange(3), tokens.argmax(-1)]
        torch.testing.assert_close(clip.ln_final(x[torch.arange(3), eot]), pooled, rtol=0, atol=2e-5)


def test_each_block_equals_open_clip_block(clip):
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        for block in clip.visual.transformer.resblocks:
            torch.testing.assert_close(block_forward(block, x), block(x), rtol=0, atol=1e-5)
        causal = clip.attn_mask[:17, :17]
        for block in clip.transformer.resblocks:
            torch.testing.assert_close(block_forward(block, x, causal=True), block(x, attn_mask=causal),
                                       rtol=0, atol=1e-5)


def test_image_path_reproduces_open_clip(clip):
    """Adapters off: ln_post of the level taps equal open_clip's intermediates, the CLS path equals
    encode_image."""
    m = zero_mixing(clip)
    image = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = clip.visual.forward_intermediates(image, indices=len(clip.visual.transformer.resblocks),
                                                output_fmt="NLC", intermediates_only=True)
        inter = out["image_intermediates"]
        x = m.embed_image(image)
        for i, block in enumerate(clip.visual.transformer.resblocks):
            x = block_forward(block, x)
            torch.testing.assert_close(x[:, 1:], inter[i], rtol=0, atol=3e-5)
        torch.testing.assert_close(m.project_tokens(x[:, :1])[:, 0], clip.encode_image(image), rtol=0, atol=3e-5)
        _, cls = m.stage1_features(image)
        torch.testing.assert_close(cls, clip.encode_image(image), rtol=0, atol=3e-5)


def test_patch_embed_equals_conv1(clip):
    """The patch embedding as one matrix product equals CLIP's strided convolution, also for a size that is
    not a multiple of the patch (the convolution drops the remainder)."""
    m = AdaptedCLIP(clip)
    for size in (SIZE, SIZE + 5):
        image = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = clip.visual.conv1(image).flatten(2).transpose(1, 2)
            torch.testing.assert_close(m.patch_embed(image), ref, rtol=0, atol=1e-5)


def test_adapted_forward_against_manual(clip):
    """The adapted forward recomputed by hand from open_clip blocks and the adapter formula."""
    m = AdaptedCLIP(clip, image_adapt_weight=0.3)
    image = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        seg, det = m(image)
        x = m.embed_image(image)
        taps = []
        for i, block in enumerate(clip.visual.transformer.resblocks):
            x = block(x)
            if i < m.image_adapt_until:
                a = m.image_adapter["layer_adapters"][i](x)
                a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
                x = 0.3 * a + 0.7 * x
            if i + 1 in m.levels:
                taps.append(clip.visual.ln_post(x[:, 1:]))
        for k, t in enumerate(taps):
            ref = F.normalize(t @ m.image_adapter["seg_proj"][k].fc.weight.T, dim=-1)
            torch.testing.assert_close(seg[k], ref, rtol=0, atol=3e-5)
        ref_det = F.normalize(taps[-1] @ m.image_adapter["det_proj"].fc.weight.T, dim=-1).mean(1)
        torch.testing.assert_close(det, ref_det, rtol=0, atol=3e-5)
    assert [s.shape for s in seg] == [(2, 16, 64)] * 4 and det.shape == (2, 64)


def naive_surgery_features(clip, m, image, across_batch: bool):
    """Independent Stage-1 features: two full passes, explicit softmax V-V attention."""
    blocks = clip.visual.transformer.resblocks
    x = m.embed_image(image)
    plain = x
    for block in blocks:
        plain = block(plain)
    cls = clip.visual.ln_post(plain[:, 0]) @ clip.visual.proj
    feats = []
    for i, block in enumerate(blocks):
        if i < m.surgery_start:
            x = block(x)
        else:
            h = block.ln_1(x)
            if across_batch:
                h = h.transpose(0, 1)
            c = h.shape[-1]
            heads = block.attn.num_heads
            v = h @ block.attn.in_proj_weight[2 * c:].T + block.attn.in_proj_bias[2 * c:]
            v = v.view(*v.shape[:2], heads, c // heads).transpose(1, 2).double()
            w = (v @ v.transpose(-1, -2) / (c // heads) ** 0.5).softmax(-1)
            o = (w @ v).float().transpose(1, 2).reshape(h.shape)
            o = block.attn.out_proj(o)
            if across_batch:
                o = o.transpose(0, 1)
            x = x + o
            x = x + block.mlp(block.ln_2(x))
        if i + 1 in m.levels:
            f = F.normalize(clip.visual.ln_post(x[:, 1:]) @ clip.visual.proj, dim=-1)
            feats.append(f + F.normalize(cls, dim=-1)[:, None])
    return feats, cls


def test_surgery_features_equal_naive_and_are_per_image(clip):
    m = AdaptedCLIP(clip)
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        feats, cls = m.stage1_features(images)
        ref, ref_cls = naive_surgery_features(clip, m, images, across_batch=False)
        for f, r in zip(feats, ref):
            torch.testing.assert_close(f, r, rtol=0, atol=5e-5)
        alone, _ = m.stage1_features(images[:1])
        for f, a in zip(feats, alone):
            torch.testing.assert_close(f[:1], a, rtol=0, atol=1e-5)


def test_surgery_batch_mixing_reproduces_original_defect(clip):
    m = AdaptedCLIP(clip, surgery_batch_mixing=True)
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        feats, _ = m.stage1_features(images)
        ref, _ = naive_surgery_features(clip, m, images, across_batch=True)
        for f, r in zip(feats, ref):
            torch.testing.assert_close(f, r, rtol=0, atol=5e-5)
        alone, _ = m.stage1_features(images[:1])
    # The defect: an image's features depend on the rest of its batch.
    assert (feats[-1][:1] - alone[-1]).abs().max() > 1e-3


def test_first_level_alone_equals_full_pass(clip):
    m = AdaptedCLIP(clip)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        full, cls = m.stage1_features(images)
        first, cls1 = m.stage1_features(images, levels=m.levels[:1])
    torch.testing.assert_close(first[0], full[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cls1, cls, rtol=0, atol=1e-6)


def adapter_params(model):
    return [*model.text_adapter.parameters(), *model.image_adapter.parameters()]


def test_checkpoint_layout_is_the_originals():
    """Key names of the original checkpoints (spec §2), with sizes from the backbone."""
    m = AdaptedCLIP(build_clip("tiny", "none", SIZE))
    assert list(m.text_adapter.state_dict()) == ["0.fc.0.weight", "1.fc.0.weight"]
    keys = list(m.image_adapter.state_dict())
    assert keys == ["layer_adapters.0.fc.0.weight", "layer_adapters.1.fc.0.weight",
                    *[f"seg_proj.{i}.fc.weight" for i in range(4)], "det_proj.fc.weight"]
    relu = AdaptedCLIP(build_clip("tiny", "none", SIZE), relu=True)
    assert "seg_proj.0.fc.0.weight" in relu.image_adapter.state_dict()
    # A state dict in the original layout loads into a fresh model.
    other = AdaptedCLIP(build_clip("tiny", "none", SIZE))
    other.image_adapter.load_state_dict(copy.deepcopy(m.image_adapter.state_dict()))
    other.text_adapter.load_state_dict(m.text_adapter.state_dict())
    for a, b in zip(adapter_params(other), adapter_params(m)):
        assert torch.equal(a, b)


def test_only_adapters_are_trainable(clip):
    m = AdaptedCLIP(clip)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"text_adapter", "image_adapter"}
    m.train()
    assert not m.clip.training


def save_openai_torchscript(clip, path, image_size):
    """An OpenAI-style TorchScript archive: the CLIP weights under OpenAI's key names plus the three
    integer entries OpenAI's files carry."""
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, p in clip.state_dict().items():
                parts = name.split(".")
                mod = self
                for part in parts[:-1]:
                    if not hasattr(mod, part):
                        mod.add_module(part, torch.nn.Module())
                    mod = getattr(mod, part)
                mod.register_parameter(parts[-1], torch.nn.Parameter(p.clone(), requires_grad=False))
            self.register_buffer("input_resolution", torch.tensor(image_size))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(49408))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.script(Holder()).save(str(path))


def test_weights_load_from_torchscript_and_state_dict(tmp_path):
    torch.manual_seed(1)
    src = build_clip("tiny", "none", 84)  # the config's native 6 x 6 grid
    save_openai_torchscript(src, tmp_path / "tiny-openai.pt", 84)
    torch.save(src.state_dict(), tmp_path / "tiny.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "wrapped.bin")
    sd = load_state_dict_file(tmp_path / "tiny-openai.pt")
    assert "input_resolution" not in sd

    loaded = [build_clip("tiny", str(tmp_path / name), 112) for name in ("tiny-openai.pt", "tiny.pth", "wrapped.bin")]
    # Positional embedding resized 6x6 -> 8x8 with open_clip's own bicubic resize.
    expected = {"visual.positional_embedding": src.visual.positional_embedding.detach().clone()}
    open_clip.model.resize_pos_embed(expected, loaded[0])
    for model in loaded:
        sd = model.state_dict()
        assert sd["visual.positional_embedding"].shape == (65, 64)
        torch.testing.assert_close(sd["visual.positional_embedding"], expected["visual.positional_embedding"],
                                   rtol=0, atol=0)
        for k, v in src.state_dict().items():
            if k != "visual.positional_embedding":
                assert torch.equal(sd[k], v), k
    # The CLS position is kept as it is.
    assert torch.equal(loaded[0].visual.positional_embedding[0], src.visual.positional_embedding[0])


def test_weight_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*--pretrained"):
        build_clip("tiny", str(tmp_path / "missing.pt"), SIZE)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="broken.pt"):
        build_clip("tiny", str(tmp_path / "broken.pt"), SIZE)
    other = {k: v for k, v in build_clip("tiny", "none", SIZE).state_dict().items() if not k.startswith("visual.")}
    torch.save(other, tmp_path / "text_only.pt")
    with pytest.raises(UserError, match="do not fit"):
        build_clip("tiny", str(tmp_path / "text_only.pt"), SIZE)
    with pytest.raises(UserError, match="multiple of"):
        build_clip("tiny", "none", 50)
    with pytest.raises(UserError, match="unknown model"):
        build_clip("ViT-Q-99", "none", SIZE)


def test_bf16_backbone_close_to_fp32():
    """`--precision bf16` stores the frozen CLIP in bf16 and runs its blocks in bf16 outside autocast;
    the adapters stay fp32. Outputs stay close to fp32, and the anchor table (built outside the
    training/test loops) works with it."""
    from forward_utils import PromptBank, class_anchor_fn

    torch.manual_seed(4)
    m = AdaptedCLIP(build_clip("tiny", "none", SIZE)).eval()
    bank = PromptBank(get_tokenizer("tiny"), "MVTec", ["bottle", "cable"])
    image = torch.randn(2, 3, SIZE, SIZE)
    idx = torch.tensor([0, 1])
    with torch.no_grad():
        ref_seg, ref_det = m(image)
        ref_feats, _ = m.stage1_features(image)
        ref_anchors = class_anchor_fn(m, bank)(image, idx)
        m.set_backbone_dtype(torch.bfloat16)
        assert m.backbone_dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in m.image_adapter.parameters())
        anchors = class_anchor_fn(m, bank)(image, idx)
        assert block_forward(m.clip.visual.transformer.resblocks[0], torch.randn(1, 5, 64)).dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seg, det = m(image)
            feats, _ = m.stage1_features(image)
    torch.testing.assert_close(anchors, ref_anchors, rtol=0, atol=2e-2)
    torch.testing.assert_close(det.float(), ref_det, rtol=0, atol=2e-2)
    for a, b in zip([*seg, *feats], [*ref_seg, *ref_feats]):
        assert F.cosine_similarity(a.float(), b, dim=-1).min() > 0.99
