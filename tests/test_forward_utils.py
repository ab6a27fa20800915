"""Prompts, anchors, maps and losses against hand computations and independent references."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from forward_utils import (PromptBank, anchors_from_embeddings, anomaly_map, calculate_seg_loss,
                           calculate_similarity_map, class_prompts, dice_loss, focal_loss, image_logits,
                           orthogonality_loss, similarity_logits, stage1_loss)
from model import get_tokenizer


def test_prompts_of_a_class():
    normal, abnormal = class_prompts("dark bottle")
    assert normal == ["dark bottle.", "a photo of dark bottle.", "a dark bottle.", "a photo of a dark bottle.",
                      "the dark bottle.", "a photo of the dark bottle."]
    assert len(abnormal) == 10 and abnormal[:2] == ["a damaged dark bottle.", "a photo of a damaged dark bottle."]
    assert "a photo of a dark bottle with damage." in abnormal


def test_prompt_bank_uses_real_names():
    bank = PromptBank(get_tokenizer("tiny"), "MVTec", ["bottle", "my_part"])
    assert bank.tokens.shape == (2, 16, 77) and bank.n_normal == 6
    tok = get_tokenizer("tiny")
    assert torch.equal(bank.tokens[0, 0], tok(["dark bottle."])[0])
    assert torch.equal(bank.tokens[1, 0], tok(["my part."])[0])


def test_anchors_from_embeddings():
    emb = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, -1.0]])  # 2 normal, 2 abnormal
    t = anchors_from_embeddings(emb, 2)
    n = np.array([0.6, 0.8]) + np.array([1.0, 0.0])
    a = np.array([0.0, 1.0]) + np.array([0.0, -1.0])
    np.testing.assert_allclose(t[:, 0].numpy(), n / np.linalg.norm(n), atol=1e-6)
    # The abnormal mean is the zero vector; F.normalize keeps it zero instead of NaN.
    np.testing.assert_allclose(t[:, 1].numpy(), a, atol=1e-6)


def test_focal_loss_hand_computed():
    p1 = torch.tensor([0.9, 0.2, 0.6, 0.5]).view(1, 1, 2, 2)
    probs = torch.cat([1 - p1, p1], dim=1)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    eps = 1e-5
    expected = 0.0
    for p, m in zip([0.9, 0.2, 0.6, 0.5], [1, 0, 0, 1]):
        target = [1 - eps, eps] if m == 0 else [eps, 1 - eps]
        pt = target[0] * (1 - p) + target[1] * p + eps
        expected += -((1 - pt) ** 2) * math.log(pt)
    assert focal_loss(probs, mask).item() == pytest.approx(expected / 4, rel=1e-6)


def test_dice_and_seg_loss_hand_computed():
    x = torch.tensor([[[0.5, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # sample 0: (2 * 1.5 + 1) / (1.5 + 2 + 1) = 4 / 4.5; sample 1: 1 / (4 + 0 + 1) = 0.2
    assert dice_loss(x, y).item() == pytest.approx(1 - (4 / 4.5 + 0.2) / 2, rel=1e-6)
    probs = torch.stack([1 - x, x], dim=1)
    mask = y[:, None]
    expected = focal_loss(probs, mask) + dice_loss(1 - x, 1 - y) + dice_loss(x, y)
    assert calculate_seg_loss(probs, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_orthogonality_loss():
    t = torch.zeros(2, 3, 2)
    t[0, :, 0], t[0, :, 1] = torch.tensor([1.0, 0, 0]), torch.tensor([0.6, 0.8, 0])
    t[1, :, 0], t[1, :, 1] = torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    assert orthogonality_loss(t).item() == pytest.approx(((0.6 + 0.0) / 2) ** 2)


def test_similarity_maps():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    anchors = torch.nn.functional.normalize(torch.randn(2, 8, 2), dim=1)
    logits = similarity_logits(feats, anchors, (2, 3))
    assert logits.shape == (2, 2, 2, 3)
    # patch (row 1, col 2) is token 5, row-major like the ViT's patch order
    assert logits[1, 1, 1, 2].item() == pytest.approx(100 * float(feats[1, 5] @ anchors[1, :, 1]), rel=1e-5)
    probs = calculate_similarity_map(feats, anchors, (2, 3), 12)
    assert probs.shape == (2, 2, 12, 12)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 12, 12))
    # align_corners=True keeps the corner values of the logits
    torch.testing.assert_close(probs[:, :, 0, 0], logits[:, :, 0, 0].softmax(1))


@pytest.mark.parametrize("domain,sigma,radius", [("Industrial", 1.0, 3), ("Medical", 1.5, 4)])
def test_anomaly_map_against_scipy(domain, sigma, radius):
    torch.manual_seed(1)
    grid, size = (8, 8), 8
    levels = [torch.nn.functional.normalize(torch.randn(2, 64, 16), dim=-1) for _ in range(2)]
    anchors = torch.nn.functional.normalize(torch.randn(16, 2), dim=0)
    got = anomaly_map(levels, anchors.expand(2, 16, 2), grid, size, domain)
    expected = 0
    for f in levels:
        s = (100 * f @ anchors).numpy().astype(np.float64)
        m = ((s[..., 1] + 1 - s[..., 0]) / 2).reshape(2, 8, 8)
        # torchvision pads by reflection without repeating the edge: scipy's "mirror"
        expected = expected + np.stack([gaussian_filter(x, sigma, mode="mirror", truncate=radius / sigma) for x in m])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-3)


def test_image_logits():
    det = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 3.0], [4.0, 5.0]]])
    torch.testing.assert_close(image_logits(det, anchors), torch.tensor([[1.0, 2.0], [4.0, 5.0]]))


def test_stage1_loss_last_level_by_default():
    torch.manual_seed(2)
    feats = [torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1) for _ in range(3)]
    anchors = torch.nn.functional.normalize(torch.randn(2, 8, 2), dim=1)
    mask = (torch.rand(2, 1, 6, 6) > 0.7).float()
    seg = [calculate_seg_loss(calculate_similarity_map(f, anchors, (2, 2), 6), mask) for f in feats]
    ortho = 0.1 * orthogonality_loss(anchors)
    assert stage1_loss(feats, anchors, mask, (2, 2)).item() == pytest.approx((seg[-1] + ortho).item(), rel=1e-6)
    assert stage1_loss(feats, anchors, mask, (2, 2), all_levels=True).item() == pytest.approx(
        (sum(seg) + ortho).item(), rel=1e-6)
