"""Tests for analyze_attention.py: word/token alignment, grounding arithmetic, the CLS/patch split of the
cross-attention output, and an end-to-end run on a tiny cross-attention checkpoint trained on synthetic data."""
import csv
import json
import math

import pytest
import torch

from analyze_attention import (build_prompt, grounding_ratio, image_parts, mask_to_grid, parse_args, run,
                               token_attention, token_parts, word_maps, word_token_spans)
from cli import load_dataset, load_model
from model import build_clip, get_tokenizer
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention
from utils.errors import UserError

SIZE = 56


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("ViT-L-14-336")


def decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids).replace(" ", "")


# --- words and tokens -------------------------------------------------------------------------------

def test_word_spans_of_a_simple_prompt(tokenizer):
    sentence = "a damaged dark bottle."
    spans = word_token_spans(tokenizer, sentence)
    assert spans == [("a", [1]), ("damaged", [2]), ("dark", [3]), ("bottle", [4])]
    ids = tokenizer([sentence])[0].tolist()
    for word, positions in spans:
        assert decoded(tokenizer, [ids[p] for p in positions]) == word


def test_word_spans_of_multi_token_words(tokenizer):
    sentence = "a photo of a pipe-shaped fryum with the letters 'FF' engraved."
    spans = word_token_spans(tokenizer, sentence)
    ids = tokenizer([sentence])[0].tolist()
    assert [w for w, _ in spans] == ["a", "photo", "of", "a", "pipe-shaped", "fryum", "with", "the", "letters", "FF",
                                     "engraved"]
    for word, positions in spans:
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert decoded(tokenizer, [ids[p] for p in positions]) == word.lower()
    assert len(dict(spans)["fryum"]) > 1


def test_prompt_groups_follow_the_name_not_the_spelling(tokenizer):
    # "a" of the real name is an object word, the template's "a" is not.
    prompt = build_prompt(tokenizer, "a photo of a damaged {}.", "a black zipper")
    assert [w for w, _ in prompt.words] == ["a", "photo", "of", "a", "damaged", "a", "black", "zipper"]
    assert prompt.groups == [None, None, None, None, "state", "object", "object", "object"]


# --- grounding arithmetic ---------------------------------------------------------------------------

def test_grounding_ratio_on_hand_made_attention():
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1  # a quarter of the patches
    mask = mask.flatten()
    inside = mask / mask.sum()
    uniform = torch.full((16,), 1 / 16)
    half = 0.5 * inside + 0.5 * (1 - mask) / (1 - mask).sum()
    assert grounding_ratio(inside, mask) == pytest.approx(4)
    assert grounding_ratio(uniform, mask) == pytest.approx(1)
    assert grounding_ratio(half, mask) == pytest.approx(2)


def test_mask_to_grid_averages_per_patch():
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1  # patch (0, 0) covered
    mask[:2, 2] = 1  # patch (0, 1) half covered
    assert mask_to_grid(mask, (2, 2)).tolist() == [1.0, 0.5, 0.0, 0.0]


# --- CLS part vs patch part -------------------------------------------------------------------------

def tiny_model(context_cls: str, gate: str = "none") -> AdaptedCLIPWithCrossAttention:
    torch.manual_seed(0)
    return AdaptedCLIPWithCrossAttention(build_clip("tiny", "none", SIZE), context_cls=context_cls,
                                         cross_attn_gate=gate).eval()


def reference_parts(query: torch.Tensor, patches: torch.Tensor, cls: torch.Tensor, heads: int, context_cls: str):
    """Hand-made module: every text token's query is `query`, keys are the context itself, values and output
    projection the identity. Per head h: softmax over the context rows of `query_h . row_h / sqrt(d_h)`; the
    patch part is the weighted sum of the patch rows, the CLS part the CLS row times its coefficient (1 when
    every row carries it). query: [W], patches: [N, W], cls: [W] -> (patch part [W], CLS part [W], mean
    coefficient)."""
    rows = {"residual": patches + cls, "token": torch.cat([patches, cls[None]]), "none": patches}[context_cls]
    d = query.shape[0] // heads
    patch_part, cls_part, coefficients = torch.zeros_like(query), torch.zeros_like(query), []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = torch.tensor([float(query[sl] @ row[sl]) / math.sqrt(d) for row in rows], dtype=torch.float64)
        w = logits.softmax(dim=0)
        patch_part[sl] = sum(w[j] * patches[j, sl] for j in range(patches.shape[0]))
        coefficient = {"residual": 1.0, "token": float(w[-1]), "none": 0.0}[context_cls]
        cls_part[sl] = coefficient * cls[sl]
        coefficients.append(coefficient)
    return patch_part, cls_part, sum(coefficients) / heads


@pytest.mark.parametrize("context_cls", ["residual", "token", "none"])
def test_cls_and_patch_parts_on_a_hand_made_module(context_cls):
    """q = a constant (q_proj's bias), k = the context, v and out = identity with non-zero biases (which belong
    to neither part), the gate at 0.5: the parts equal a direct per-head recomputation times tanh(0.5)."""
    m = tiny_model(context_cls, gate="tanh").double()
    ca, w = m.text_cross_attn, m.embed_dim
    g = torch.Generator().manual_seed(1)
    query, patches, cls = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(w,), (3, w), (w,)])
    with torch.no_grad():
        ca.q_proj.weight.zero_()
        ca.q_proj.bias.copy_(query)
        for proj in (ca.k_proj, ca.v_proj, ca.out_proj):
            proj.weight.copy_(torch.eye(w))
        ca.k_proj.bias.zero_()
        ca.v_proj.bias.normal_(generator=g)
        ca.out_proj.bias.normal_(generator=g)
        ca.gate.fill_(0.5)
        x = torch.randn(1, 2, w, generator=g, dtype=torch.float64)  # any text: every query is `query`
        patch, cls_part, weight = m.cross_attn_parts(x, patches[None], cls[None, None])
    ref_patch, ref_cls, ref_weight = reference_parts(query, patches, cls, ca.num_heads, context_cls)
    for t in range(2):
        torch.testing.assert_close(patch[0, t], math.tanh(0.5) * ref_patch)
        torch.testing.assert_close(cls_part[0, t], math.tanh(0.5) * ref_cls)
        assert float(weight[0, t]) == pytest.approx(ref_weight)


@pytest.mark.parametrize("context_cls", ["residual", "token", "none"])
def test_parts_and_bias_sum_to_the_module_output(context_cls):
    m = tiny_model(context_cls, gate="tanh")
    ca = m.text_cross_attn
    with torch.no_grad():
        ca.gate.fill_(0.3)
        x, patches, cls = torch.randn(2, 5, 64), torch.randn(2, 7, 64), torch.randn(2, 1, 64)
        patch, cls_part, _ = m.cross_attn_parts(x, patches, cls)
        bias = ca.gated(ca.out_proj.weight @ ca.v_proj.bias + ca.out_proj.bias)
        torch.testing.assert_close(patch + cls_part + bias, ca(x, m.compose_context(patches, cls)), rtol=0, atol=1e-5)


def test_token_mode_maps_leave_out_the_cls_weight(tokenizer):
    """With the CLS as a token, a word's patch attention sums to 1 minus the CLS's coefficient."""
    m = tiny_model("token")
    tokens = get_tokenizer("tiny")(["a photo of a damaged bottle.", "a flawless bottle."])
    with torch.no_grad():
        patches, cls = m.context_parts(torch.randn(2, 3, SIZE, SIZE))
        att = token_attention(m, tokens, m.compose_context(patches, cls))
        parts = token_parts(m, tokens, patches, cls)
    assert att.shape[-1] == patches.shape[1] and parts["cls_weight"].shape == att.shape[:-1]
    assert 0 < float(parts["cls_weight"].min()) and float(parts["cls_weight"].max()) < 1
    torch.testing.assert_close(att.sum(dim=-1), 1 - parts["cls_weight"], rtol=0, atol=1e-5)


def test_image_parts_average_tokens_per_word_then_words_per_column(tokenizer):
    prompts = [build_prompt(tokenizer, "a photo of a damaged {}.", "bottle"),
               build_prompt(tokenizer, "a {} with flaw.", "bottle")]
    # token t's value is t: a word's value is the mean of its positions.
    values = {"cls_norm": torch.arange(10.0).expand(2, 10), "patch_norm": torch.zeros(2, 10),
              "cls_weight": torch.ones(2, 10)}
    got = image_parts(prompts, values)
    # "damaged" at 5 (prompt 0), "bottle" at 6 (prompt 0) and 2 (prompt 1), "flaw" at 4 (prompt 1).
    assert got["damaged_cls_norm"] == 5 and got["flaw_cls_norm"] == 4
    assert got["state_cls_norm"] == pytest.approx(4.5) and got["object_cls_norm"] == pytest.approx(4)
    assert got["state_patch_norm"] == 0 and got["object_cls_weight"] == 1


def test_refuses_a_baseline_run(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"variant": "baseline", "model": "tiny"}))
    with pytest.raises(UserError, match="holds a baseline run, which has no cross-attention"):
        parse_args(["--save_path", str(tmp_path)])


# --- end to end -------------------------------------------------------------------------------------

@pytest.fixture
def trained(data, runs) -> dict[str, str]:
    """The session's cross-attention run and its data, as flags."""
    return {"--dataset": "Synthetic", "--data_root": str(data / "syn"), "--metadata_dir": str(data / "meta"),
            "--num_workers": "0", "--save_path": str(runs / "cross_attention")}


def test_end_to_end_writes_figures_and_table(trained, tmp_path):
    out = tmp_path / "attention"
    run(parse_args([*(x for kv in trained.items() for x in kv), "--num_images", "1", "--out", str(out)]))
    for name in ("disc", "stripes"):
        pngs = list((out / name).glob("*/*.png"))
        assert len(pngs) == 6  # one image x the six default prompts
    assert "RANDOM BACKBONE WEIGHTS" in (out / "grounding.md").read_text()
    rows = list(csv.DictReader(open(out / "grounding.csv")))
    assert [r["class"] for r in rows] == ["disc", "stripes"]
    columns = ("state", "object", "damaged", "broken", "flaw", "defect", "damage")
    for row in rows:
        assert int(row["state_n"]) == int(row["object_n"]) == 3  # every anomalous image has a mask
        for col in columns:
            ratio, patch = float(row[col]), float(row[f"{col}_patch_norm"])
            assert math.isfinite(ratio) and ratio > 0 and math.isfinite(patch) and patch > 0
            # --context_cls residual: every value carries the CLS with coefficient 1, the same for every word
            assert float(row[f"{col}_cls_weight"]) == 1
            assert float(row[f"{col}_cls_norm"]) == pytest.approx(float(row["state_cls_norm"]), rel=1e-4)
        assert float(row["state_cls_norm"]) > 0
    assert "norm of its CLS part / norm of its patch part" in (out / "grounding.md").read_text()


def test_attention_rows_sum_to_one(trained, tokenizer):
    args = parse_args([*(x for kv in trained.items() for x in kv)])
    model = load_model(args, torch.device("cpu"))[0].eval()
    ds = load_dataset(args, args.dataset, None)
    images = torch.stack([ds[i]["image"] for i in range(2)])
    prompts = [build_prompt(tokenizer, t, "disc") for t in ("a photo of a damaged {}.", "a {} with flaw.")]
    att = token_attention(model, tokenizer([p.text for p in prompts]), model.image_context(images))
    assert att.shape[:2] == (2, 2) and att.shape[-1] == model.grid[0] * model.grid[1]
    assert torch.allclose(att.sum(dim=-1), torch.ones(att.shape[:-1]), atol=1e-5)
    maps = word_maps(att[0, 0], prompts[0].words)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(len(prompts[0].words)), atol=1e-5)
