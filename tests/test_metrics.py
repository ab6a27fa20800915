import re
import numpy as np
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from metrics import (
    METRIC_NAMES,
    NonFiniteError,
    aupro,
    auroc,
    average_precision,
    binary_metrics,
    connected_regions,
    f1_max,
    global_region_ids,
    label_regions,
    mean_metrics,
    metrics_eval,
)


def _sk_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    denom = p + r
    f1 = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.max())


def _random_binary(seed: int, n: int, n_values: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    # Positives shifted up so the metrics are not all ~0.5.
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if n_values is not None:  # heavy ties
        scores = np.round(scores * n_values / 4) / n_values
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_values", [None, 3, 10])
def test_binary_metrics_match_sklearn(seed: int, n_values: int | None) -> None:
    scores, labels = _random_binary(seed, 5000, n_values)
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    ref = {
        "auroc": roc_auc_score(labels, scores.astype(np.float64)),
        "ap": average_precision_score(labels, scores.astype(np.float64)),
        "f1_max": _sk_f1_max(scores.astype(np.float64), labels),
    }
    assert auroc(s, y) == pytest.approx(ref["auroc"], abs=1e-6)
    assert average_precision(s, y) == pytest.approx(ref["ap"], abs=1e-6)
    assert f1_max(s, y) == pytest.approx(ref["f1_max"], abs=1e-6)
    for key, value in binary_metrics(s, y.long()).items():
        assert value == pytest.approx(ref[key], abs=1e-6)


def test_binary_metrics_single_class_is_none() -> None:
    scores = torch.rand(20)
    for labels in (torch.zeros(20, dtype=torch.bool), torch.ones(20, dtype=torch.bool)):
        assert auroc(scores, labels) is None
        assert average_precision(scores, labels) is None
        assert f1_max(scores, labels) is None


def test_binary_metrics_all_tied() -> None:
    scores = torch.full((6,), 0.5)
    labels = torch.tensor([1, 0, 0, 1, 0, 0])
    # One threshold: ROC from (0,0) to (1,1) -> 0.5; AP = 1 * 2/6; F1 = 2 * 2 / (6 + 2).
    assert auroc(scores, labels) == pytest.approx(0.5)
    assert average_precision(scores, labels) == pytest.approx(1 / 3)
    assert f1_max(scores, labels) == pytest.approx(0.5)


def _naive_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Direct evaluation at every distinct threshold, then a trapezoid loop."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    negative = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        xs.append((above & negative).sum() / negative.sum())
        ys.append(np.mean([(above[i] & r).sum() / r.sum() for i, r in regions]))
    area = 0.0
    for j in range(1, len(xs)):
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        if x1 > max_fpr:
            y1 = y0 + (max_fpr - x0) / (x1 - x0) * (y1 - y0)
            area += (max_fpr - x0) * (y0 + y1) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def _random_blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    seeds = rng.random((n, h, w)) < 0.06
    # An X-shaped dilation makes blobs whose pixels touch only diagonally (8- but not 4-connected).
    x_shape = np.eye(3, dtype=bool) | np.eye(3, dtype=bool)[::-1]
    return scipy.ndimage.binary_dilation(seeds, structure=x_shape[None])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_fpr", [0.3, 0.07, 1.0])
def test_aupro_matches_naive(seed: int, max_fpr: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_blob_masks(rng, 3, 10, 12)
    maps = rng.random(masks.shape) + 0.5 * masks
    if seed % 2:  # heavy ties
        maps = np.round(maps * 6) / 6
    maps = maps.astype(np.float32)
    n_regions = connected_regions(masks)[1]
    n_regions_4 = sum(scipy.ndimage.label(m)[1] for m in masks)
    assert n_regions >= 4 and n_regions_4 > n_regions  # several regions, some only 8-connected
    got = aupro(torch.from_numpy(maps), torch.from_numpy(masks), max_fpr=max_fpr)
    assert got == pytest.approx(_naive_aupro(maps.astype(np.float64), masks, max_fpr), abs=1e-9)
    # The same masks labelled per image, as test.py's loader workers give them: the same curve.
    labelled = torch.from_numpy(np.stack([label_regions(m) for m in masks]))
    assert labelled.dtype == torch.int32 and int(labelled.amax()) < n_regions
    assert aupro(torch.from_numpy(maps), labelled, max_fpr=max_fpr) == pytest.approx(got, abs=1e-12)


def test_per_image_labels_number_the_same_regions_globally() -> None:
    """`global_region_ids` of per-image labels: the partition `connected_regions` finds, numbered 1..R."""
    masks = _random_blob_masks(np.random.default_rng(7), 4, 12, 12)
    masks[1] = False  # an image without regions
    ids_np, n = connected_regions(masks)
    ids, n_labelled = global_region_ids(torch.from_numpy(np.stack([label_regions(m) for m in masks])))
    assert n_labelled == n
    assert sorted(set(ids.tolist())) == list(range(n + 1))
    pairs = set(zip(ids.tolist(), ids_np.reshape(-1).tolist()))
    assert len(pairs) == n + 1  # one-to-one: the same regions under other numbers


def test_diagonal_pixels_are_one_region() -> None:
    masks = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 0], [1, 0, 0]]], dtype=bool)
    ids, n = connected_regions(masks)
    assert n == 3
    assert ids[0, 0, 0] == ids[0, 1, 1] != 0
    assert len({ids[1, 0, 2], ids[1, 2, 0]}) == 2


def test_aupro_by_hand() -> None:
    # Scores / mask of one 2x3 image (+ = anomalous); the three + pixels form ONE 8-connected
    # region {a, d, e} of size 3 (a-d touch diagonally); negatives b, c, f.
    #   a 0.9+  b 0.8   c 0.7
    #   f 0.5   d 0.7+  e 0.4+
    # Curve (FPR, PRO): start (0, 0); t=0.9 -> (0, 1/3); t=0.8 -> (1/3, 1/3);
    # t=0.7 (c and d tied) -> (2/3, 2/3); further points lie beyond FPR 0.5.
    # max_fpr = 0.5: PRO interpolated at 0.5 is 1/3 + (1/6)/(1/3) * 1/3 = 1/2.
    # Area = 1/3 * 1/3 + 1/6 * (1/3 + 1/2) / 2 = 8/72 + 5/72 = 13/72; / 0.5 -> 13/36.
    # (Two 4-connected regions {a}, {d, e} would give 25/48 instead.)
    maps = torch.tensor([[[0.9, 0.8, 0.7], [0.5, 0.7, 0.4]]])
    masks = torch.tensor([[[True, False, False], [False, True, True]]])
    assert aupro(maps, masks, max_fpr=0.5) == pytest.approx(13 / 36, abs=1e-12)


def test_aupro_undefined() -> None:
    maps = torch.rand(2, 4, 4)
    assert aupro(maps, torch.zeros(2, 4, 4, dtype=torch.bool)) is None
    assert aupro(maps, torch.ones(2, 4, 4, dtype=torch.bool)) is None


def _hand_class() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((6, 8, 8)) * 3 + 2)
    image_scores = torch.tensor([0.2, 0.9, 0.4, 0.6, 0.3, 0.8], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    masks[1, 2:4, 2:5] = True
    masks[3, 5:7, 0:2] = True
    masks[5, 0, 0] = masks[5, 1, 1] = True
    return maps, image_scores, labels, masks


@pytest.mark.parametrize("domain", ["Industrial", "Medical"])
def test_metrics_eval(domain: str) -> None:
    maps, image_scores, labels, masks = _hand_class()
    out = metrics_eval(maps, image_scores, labels, masks, domain)
    assert list(out) == METRIC_NAMES

    m = maps.numpy()
    m = (m - m.min()) / (m.max() - m.min())
    s = image_scores.numpy()
    s = (s - s.min()) / (s.max() - s.min())
    img = m.reshape(6, -1).max(1)
    if domain == "Industrial":
        img = 0.5 * img + 0.5 * s
    y, pix_y = labels.numpy(), masks.numpy().reshape(-1)
    assert out["image_auroc"] == pytest.approx(100 * roc_auc_score(y, img), abs=1e-6)
    assert out["image_ap"] == pytest.approx(100 * average_precision_score(y, img), abs=1e-6)
    assert out["image_f1_max"] == pytest.approx(100 * _sk_f1_max(img, y), abs=1e-6)
    assert out["pixel_auroc"] == pytest.approx(100 * roc_auc_score(pix_y, m.reshape(-1)), abs=1e-6)
    assert out["pixel_ap"] == pytest.approx(100 * average_precision_score(pix_y, m.reshape(-1)), abs=1e-6)
    assert out["pixel_f1_max"] == pytest.approx(100 * _sk_f1_max(m.reshape(-1), pix_y), abs=1e-6)
    assert out["pixel_aupro"] == pytest.approx(100 * _naive_aupro(m, masks.numpy(), 0.3), abs=1e-6)


def test_metrics_eval_industrial_differs_from_medical() -> None:
    maps, image_scores, labels, masks = _hand_class()
    # Flip the image scores' order: only the industrial combination sees it.
    flipped = 1 - image_scores
    ind = metrics_eval(maps, flipped, labels, masks, "Industrial")
    med = metrics_eval(maps, flipped, labels, masks, "Medical")
    assert ind["image_auroc"] != med["image_auroc"]
    assert ind["pixel_auroc"] == med["pixel_auroc"]


def test_metrics_eval_undefined_entries() -> None:
    maps, image_scores, labels, masks = _hand_class()
    out = metrics_eval(maps, image_scores, labels, None, "Industrial")
    assert all(out[k] is None for k in METRIC_NAMES if k.startswith("pixel_"))
    assert all(out[k] is not None for k in METRIC_NAMES if k.startswith("image_"))

    good = torch.zeros(6, dtype=torch.long)
    out = metrics_eval(maps, image_scores, good, torch.zeros_like(masks), "Medical")
    assert all(v is None for v in out.values())


def test_metrics_eval_constant_inputs() -> None:
    maps, _, labels, masks = _hand_class()
    out = metrics_eval(torch.ones_like(maps), torch.ones(6), labels, masks, "Industrial")
    assert out["image_auroc"] == pytest.approx(50.0)
    assert out["pixel_auroc"] == pytest.approx(50.0)


def test_mean_metrics_skips_none() -> None:
    per_class = {
        "a": dict.fromkeys(METRIC_NAMES, 10.0),
        "b": {**dict.fromkeys(METRIC_NAMES, 20.0), "image_auroc": None},
        "c": {**dict.fromkeys(METRIC_NAMES, 60.0), "image_auroc": None, "pixel_aupro": None},
    }
    per_class["a"]["pixel_aupro"] = None
    per_class["a"]["image_auroc"] = None
    mean = mean_metrics(per_class)
    assert list(mean) == METRIC_NAMES
    assert mean["pixel_auroc"] == pytest.approx(30.0)
    assert mean["pixel_aupro"] == pytest.approx(20.0)
    assert mean["image_auroc"] is None


@pytest.mark.parametrize("where, value, what", [("map", float("inf"), "1 of 384 pixel-map values are not finite (0 NaN, 1 inf)"),
                                                ("map", float("nan"), "1 of 384 pixel-map values are not finite (1 NaN, 0 inf)"),
                                                ("score", float("nan"), "1 of 6 image scores are not finite (1 NaN, 0 inf)"),
                                                ("score", -float("inf"), "1 of 6 image scores are not finite (0 NaN, 1 inf)")])
def test_metrics_eval_refuses_non_finite(where: str, value: float, what: str) -> None:
    """One inf pixel would turn pixel AUROC 100 into ~50 through the min-max normalisation, one NaN score
    image AUROC into 0: refused with the class and the count instead."""
    maps, image_scores, labels, masks = _hand_class()
    assert maps.numel() == 384 and image_scores.numel() == 6
    (maps.view(-1) if where == "map" else image_scores)[3] = value
    with pytest.raises(NonFiniteError, match=re.escape(f"class 'bottle': {what}")):
        metrics_eval(maps, image_scores, labels, masks, "Industrial", class_name="bottle")
