"""Tests for analyze_attention.py: word/token alignment, grounding arithmetic, and an end-to-end run on a
tiny cross-attention checkpoint trained on synthetic data."""
import csv
import json
import math

import pytest
import torch

from analyze_attention import (build_prompt, grounding_ratio, mask_to_grid, parse_args, run, token_attention,
                               word_maps, word_token_spans)
from cli import load_dataset, load_model
from model import get_tokenizer
from utils.errors import UserError


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
    for row in rows:
        assert int(row["state_n"]) == int(row["object_n"]) == 3  # every anomalous image has a mask
        for col in ("state", "object", "damaged", "broken", "flaw", "defect", "damage"):
            ratio = float(row[col])
            assert math.isfinite(ratio) and ratio > 0


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
