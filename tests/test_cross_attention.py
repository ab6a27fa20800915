"""The cross-attention variant: shapes, context, gradients, equivalences (tiny random CLIP)."""
import pytest
import torch

from forward_utils import PromptBank, anchors_from_embeddings, get_adapted_text_embedding, stage1_loss
from forward_utils_cross_attention import cross_attention_anchor_fn, get_vision_aware_text_embedding
from model import AdaptedCLIP, build_clip, get_tokenizer
from model.adapter import block_forward
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention

SIZE = 56


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = AdaptedCLIPWithCrossAttention(build_clip("tiny", "none", SIZE))
    return m.eval()


@pytest.fixture(scope="module")
def bank():
    return PromptBank(get_tokenizer("tiny"), "MVTec", ["bottle", "cable", "screw"])


def test_shapes_and_context_is_the_stage1_level_feature(model, bank):
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        context = model.image_context(images)
        feats, _ = model.stage1_features(images)
        baseline_feats, _ = AdaptedCLIP.stage1_features(model, images)
        emb = model.encode_text_with_context(bank.tokens[:2], torch.tensor([0, 1, 1]), context)
        anchors = get_vision_aware_text_embedding(model, bank, torch.tensor([2, 0, 2]), context)
    assert context.shape == (3, 16, model.embed_dim)
    torch.testing.assert_close(context, feats[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(context, baseline_feats[0], rtol=0, atol=1e-6)
    assert emb.shape == (3, 16, model.embed_dim) and anchors.shape == (3, model.embed_dim, 2)
    torch.testing.assert_close(anchors.norm(dim=1), torch.ones(3, 2))


def test_gradients_reach_only_the_trained_modules(model, bank):
    model.train()
    images = torch.randn(2, 3, SIZE, SIZE)
    mask = (torch.rand(2, 1, SIZE, SIZE) > 0.8).float()
    with torch.no_grad():
        feats, _ = model.stage1_features(images)
    anchors = cross_attention_anchor_fn(model, bank)(images, torch.tensor([0, 1]), feats)
    stage1_loss(feats, anchors, mask, model.grid).backward()
    model.eval()
    for name, p in [*model.text_cross_attn.named_parameters(), *model.text_adapter.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "k_proj.bias":
            # A key bias shifts every logit of a query by the same amount: softmax cancels it exactly.
            assert p.grad.norm() < 1e-6 * model.text_cross_attn.k_proj.weight.grad.norm()
        else:
            assert p.grad.norm() > 0, name
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is None for p in model.image_adapter.parameters())
    model.zero_grad(set_to_none=True)


def test_zero_output_projection_gives_baseline_anchors(bank):
    torch.manual_seed(3)
    m = AdaptedCLIPWithCrossAttention(build_clip("tiny", "none", SIZE)).eval()
    torch.nn.init.zeros_(m.text_cross_attn.out_proj.weight)
    torch.nn.init.zeros_(m.text_cross_attn.out_proj.bias)
    images = torch.randn(2, 3, SIZE, SIZE)
    class_idx = torch.tensor([1, 2])
    with torch.no_grad():
        vision_aware = get_vision_aware_text_embedding(m, bank, class_idx, m.image_context(images))
        baseline = get_adapted_text_embedding(m, bank, adapt=True)[class_idx]
    torch.testing.assert_close(vision_aware, baseline, rtol=0, atol=1e-6)


def test_anchors_depend_on_the_image_only(model, bank):
    a, b = torch.randn(2, 3, SIZE, SIZE).unbind(0)
    images = torch.stack([a, b, a])
    with torch.no_grad():
        anchors = get_vision_aware_text_embedding(model, bank, torch.tensor([0, 0, 0]), model.image_context(images))
    assert (anchors[0] - anchors[1]).abs().max() > 1e-4
    torch.testing.assert_close(anchors[0], anchors[2], rtol=0, atol=1e-6)


def naive_vision_aware_embeddings(model, tokens, context):
    """Every (image, prompt) pair run on its own with the context repeated, explicit softmax attention."""
    ca = model.text_cross_attn
    out = []
    for b in range(context.shape[0]):
        rows = []
        for p in range(tokens.shape[1]):
            x, eot = model.embed_text(tokens[b, p:p + 1])
            x = block_forward(model.clip.transformer.resblocks[0], x, causal=True)
            ctx = context[b:b + 1]
            h = ca.num_heads
            q = ca.q_proj(x).view(1, -1, h, x.shape[-1] // h).transpose(1, 2).double()
            k = ca.k_proj(ctx).view(1, -1, h, x.shape[-1] // h).transpose(1, 2).double()
            v = ca.v_proj(ctx).view(1, -1, h, x.shape[-1] // h).transpose(1, 2).double()
            w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
            x = x + ca.out_proj((w @ v).float().transpose(1, 2).flatten(2))
            x = model.adapt_text(0, x)
            x = model.text_blocks(x, adapt=True, start=1)
            rows.append(model.text_head(x, eot, adapt=True)[0])
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_shared_kv_equals_naive_per_prompt(model, bank):
    images = torch.randn(2, 3, SIZE, SIZE)
    class_idx = torch.tensor([2, 0])
    with torch.no_grad():
        context = model.image_context(images)
        fast = get_vision_aware_text_embedding(model, bank, class_idx, context)
        naive = anchors_from_embeddings(naive_vision_aware_embeddings(model, bank.tokens[class_idx], context),
                                        bank.n_normal)
    torch.testing.assert_close(fast, naive, rtol=0, atol=2e-5)


def test_attention_weights_match_module_output(model):
    ca = model.text_cross_attn
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    with torch.no_grad():
        w = ca.attention_weights(x, ctx)
        v = ca.v_proj(ctx).view(2, 7, ca.num_heads, -1).transpose(1, 2)
        ref = ca.out_proj((w @ v).transpose(1, 2).flatten(2))
        torch.testing.assert_close(ca(x, ctx), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, ca.num_heads, 5))


def test_text_none_context_bypasses_cross_attention(model, bank):
    fn = cross_attention_anchor_fn(model, bank, "none")
    with torch.no_grad():
        got = fn(torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 1]))
        ref = get_adapted_text_embedding(model, bank, adapt=True)[:2]
    torch.testing.assert_close(got, ref)
