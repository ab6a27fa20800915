"""The cross-attention variant: shapes, context, gradients, equivalences, the context ablations and the
tanh gate (tiny random CLIP)."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import train_cross_attention
from cli import build_model, get_train_parser
from forward_utils import PromptBank, anchors_from_embeddings, get_adapted_text_embedding, stage1_loss
from forward_utils_cross_attention import cross_attention_anchor_fn, get_vision_aware_text_embedding
from model import AdaptedCLIP, build_clip, get_tokenizer
from model.adapter import block_forward
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention
from train_cross_attention import build_with_init
from utils.errors import UserError
from utils.io import load_checkpoint, load_module_state
from variants import get_variant
from conftest import run_main, train_args

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
    """Every (image, prompt) pair run on its own with the context repeated: one loop over the text blocks
    with the cross-attention (explicit softmax attention, gated like the module) inserted after block
    `cross_attn_after`, before that block's adapter."""
    ca = model.text_cross_attn
    h = ca.num_heads
    out = []
    for b in range(context.shape[0]):
        rows = []
        for p in range(tokens.shape[1]):
            x, eot = model.embed_text(tokens[b, p:p + 1])
            for i in range(model.text_depth):
                x = block_forward(model.clip.transformer.resblocks[i], x, causal=True)
                if i == model.cross_attn_after:
                    ctx = context[b:b + 1]
                    q = ca.q_proj(x).view(1, -1, h, x.shape[-1] // h).transpose(1, 2).double()
                    k = ca.k_proj(ctx).view(1, -1, h, x.shape[-1] // h).transpose(1, 2).double()
                    v = ca.v_proj(ctx).view(1, -1, h, x.shape[-1] // h).transpose(1, 2).double()
                    w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
                    gate = 1.0 if ca.gate is None else torch.tanh(ca.gate)
                    x = x + gate * ca.out_proj((w @ v).float().transpose(1, 2).flatten(2))
                x = model.adapt_text(i, x)
            rows.append(model.text_head(x, eot, adapt=True)[0])
        out.append(torch.stack(rows))
    return torch.stack(out)


def configured(seed: int = 0, **kwargs) -> AdaptedCLIPWithCrossAttention:
    """A tiny model with the cross-attention flags `kwargs`, in eval mode."""
    torch.manual_seed(seed)
    return AdaptedCLIPWithCrossAttention(build_clip("tiny", "none", SIZE), **kwargs).eval()


@pytest.mark.parametrize("kwargs", [{}, {"context_cls": "token", "cross_attn_after": 1, "cross_attn_gate": "tanh"},
                                    {"context_cls": "none", "context_level": 1, "cross_attn_after": 3}],
                         ids=["plan", "token-after1-gated", "none-level1-after-last"])
def test_shared_kv_equals_naive_per_prompt(bank, kwargs):
    model = configured(**kwargs)
    if model.text_cross_attn.gate is not None:
        torch.nn.init.constant_(model.text_cross_attn.gate, 0.7)  # open: a closed gate would hide the module
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


# --- context ablations ------------------------------------------------------------------------------

@pytest.mark.parametrize("context_cls,level", [("residual", 1), ("token", 0), ("none", 1)])
def test_context_against_the_baseline_stage1_features(context_cls, level):
    """The reference is the baseline's own `stage1_features` (a plain list and the raw CLS)."""
    m = configured(context_cls=context_cls, context_level=level)
    images = torch.randn(2, 3, SIZE, SIZE)
    n = m.grid[0] * m.grid[1]
    with torch.no_grad():
        ref, cls = AdaptedCLIP.stage1_features(m, images)
        cls_unit = F.normalize(cls, dim=-1)[:, None]
        context = m.image_context(images)
        reused = m.image_context(images, m.stage1_features(images)[0])
    torch.testing.assert_close(reused, context, rtol=0, atol=1e-6)
    assert context.shape == (2, n + (context_cls == "token"), m.embed_dim)
    if context_cls == "residual":
        torch.testing.assert_close(context, ref[level], rtol=0, atol=1e-6)
        return
    patches = context[:, :n]
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(2, n))  # unit patch features: no CLS in them
    torch.testing.assert_close(patches + cls_unit, ref[level], rtol=0, atol=1e-6)
    if context_cls == "token":
        torch.testing.assert_close(context[:, n:], cls_unit, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="carries the CLS"):
        m.image_context(images, ref)


def test_residual_cls_leaves_the_attention_weights_unchanged(model):
    """A vector added to every key shifts a query's logits by a constant: the README's claim."""
    ca = model.text_cross_attn
    x, patches, cls = torch.randn(2, 5, 64), torch.randn(2, 7, 64), torch.randn(2, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(ca.attention_weights(x, patches + cls), ca.attention_weights(x, patches),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"context_level": 4}, "--context_level 4 is not an index into the 4 Stage-1 levels [2, 4, 6, 8]: use 0..3"),
    ({"cross_attn_after": 4}, "--cross_attn_after 4 is not a text block: the text encoder has blocks 0..3"),
    ({"context_cls": "both"}, "--context_cls 'both' is not one of residual, token, none"),
])
def test_placement_outside_the_backbone_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        configured(**kwargs)


# --- the tanh gate ----------------------------------------------------------------------------------

def test_gate_adds_one_key_to_the_plan_layout():
    plain = {f"{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")}
    assert set(configured().text_cross_attn.state_dict()) == plain
    gated = configured(cross_attn_gate="tanh").text_cross_attn.state_dict()
    assert set(gated) == plain | {"gate"} and float(gated["gate"]) == 0


def baseline_text_adapter(path) -> str:
    """A baseline Stage-1 checkpoint whose text adapter comes from another seed than the models under test,
    so a model that did not load it has other weights."""
    torch.manual_seed(5)
    donor = AdaptedCLIP(build_clip("tiny", "none", SIZE))
    torch.save({"epoch": 1, "text_adapter": donor.text_adapter.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("gate", ["tanh", "none"])
def test_init_text_adapter_with_the_gate_starts_at_the_baseline_anchors(bank, tmp_path, gate):
    """Step 0 of a gated --init_text_adapter run (train mode, dropout on): its vision-aware anchors equal the
    baseline model's anchors for every image; ungated, the random module moves them."""
    ckpt = baseline_text_adapter(tmp_path / "text_adapter.pth")
    flags = ["--model", "tiny", "--image_size", str(SIZE), "--device", "cpu", "--save_path", str(tmp_path / "run")]
    cpu, baseline, cross = torch.device("cpu"), get_variant("baseline"), get_variant("cross_attention")
    torch.manual_seed(1)  # the same random backbone for both
    base = build_model(get_train_parser(baseline, "").parse_args(flags), baseline, cpu)
    load_module_state(base.text_adapter, load_checkpoint(ckpt), "text_adapter", ckpt)
    torch.manual_seed(1)
    args = get_train_parser(cross, "").parse_args(flags + ["--init_text_adapter", ckpt, "--cross_attn_gate", gate])
    model = build_with_init(args, cross, cpu).train()
    images, class_idx = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        expected = get_adapted_text_embedding(base.eval(), bank)[class_idx]
        step0 = cross_attention_anchor_fn(model, bank)(images, class_idx)
    gap = float((step0 - expected).abs().max())
    assert gap <= 1e-6 if gate == "tanh" else gap > 1e-3, gap


def test_closed_gate_passes_gradient_to_the_gate_only(bank):
    """The module's weights get exactly zero gradient until the gate opens; the gate's is not zero."""
    m = configured(cross_attn_gate="tanh").train()
    ca = m.text_cross_attn
    images, class_idx = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 1])
    mask = (torch.rand(2, 1, SIZE, SIZE) > 0.8).float()
    with torch.no_grad():
        feats, _ = m.stage1_features(images)
    stage1_loss(feats, cross_attention_anchor_fn(m, bank)(images, class_idx, feats), mask, m.grid).backward()
    assert float(ca.gate.grad.abs()) > 1e-6
    for name, p in ca.named_parameters():
        if name != "gate":
            assert p.grad is not None and not p.grad.any(), name


def test_gate_gradient_at_zero_is_the_derivative_along_the_module_output(bank):
    """tanh'(0) = 1: the gate's gradient equals a central finite difference of a smooth function of the
    anchors (a fixed random projection; float64) in tanh(gate)."""
    m = configured(cross_attn_gate="tanh").double()
    ca = m.text_cross_attn
    images, class_idx = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64), torch.tensor([0, 2])
    with torch.no_grad():
        context = m.image_context(images)
    probe = torch.randn(2, m.embed_dim, 2, dtype=torch.float64)

    def f():
        return (get_vision_aware_text_embedding(m, bank, class_idx, context) * probe).sum()
    f().backward()
    eps = 1e-5
    with torch.no_grad():
        ca.gate.fill_(eps)
        up = float(f())
        ca.gate.fill_(-eps)
        down = float(f())
        ca.gate.zero_()
    slope = (up - down) / (2 * math.tanh(eps))
    assert abs(slope) > 1e-4 and float(ca.gate.grad) == pytest.approx(slope, rel=1e-5)


def test_the_gate_learns_at_its_own_rate(data, tmp_path):
    """Stage 1 puts the gate in an Adam group of its own at --cross_attn_gate_lr: after the run's 2 steps it
    has moved by more than one step of that rate (Adam's first steps move by about the rate), which at
    --text_lr it could not (2 steps x 1e-5)."""
    save = tmp_path / "run"
    run_main(train_cross_attention, train_args(data, save) + ["--cross_attn_gate", "tanh", "--image_epoch", "0"])
    ckpt = torch.load(save / "text_adapter_cross_attn.pth", weights_only=True)
    assert [g["lr"] for g in ckpt["text_optimizer"]["param_groups"]] == [1e-5, 1e-3]
    assert abs(float(ckpt["text_cross_attn"]["gate"])) > 1e-3
