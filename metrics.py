"""Evaluation metrics for AA-CLIP: exact, tie-correct AUROC / AP / F1-max, AUPRO,
and the per-class evaluation protocol.

All curve metrics run in torch on the inputs' device; only the connected-component labelling of
the (small, boolean) ground-truth masks goes through scipy on the CPU.
"""

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

METRIC_NAMES = [
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "image_auroc",
    "image_ap",
    "image_f1_max",
]

# 8-connectivity, as in the MVTec AD evaluation code.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def _group_last_indices(sorted_values: Tensor) -> Tensor:
    """Index of the last element of each run of equal values in a sorted 1-D tensor -> [T]."""
    change = torch.nonzero(sorted_values[1:] != sorted_values[:-1]).squeeze(1)
    end = torch.tensor([sorted_values.numel() - 1], device=sorted_values.device)
    return torch.cat([change, end])


def binary_curve_counts(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """True / false positive counts at every distinct threshold, thresholds in decreasing order.

    scores, labels: [M] (labels bool or 0/1, nonzero = positive). Returns tps, fps: [T] int64,
    where entry i counts the samples with score >= the i-th largest distinct score.
    """
    sorted_scores, order = torch.sort(scores.reshape(-1), descending=True)
    positive = labels.reshape(-1).bool()[order]
    tps = torch.cumsum(positive, 0, dtype=torch.int64)
    last = _group_last_indices(sorted_scores)
    tps = tps[last]
    fps = last + 1 - tps
    return tps, fps


def _is_defined(tps: Tensor, fps: Tensor) -> bool:
    """Both classes present (the totals are the last cumulative counts)."""
    return bool(tps[-1] > 0) and bool(fps[-1] > 0)


def _auroc_from_counts(tps: Tensor, fps: Tensor) -> float | None:
    """Trapezoidal ROC area; tps, fps: [T] int64 from binary_curve_counts."""
    if not _is_defined(tps, fps):
        return None
    zero = tps.new_zeros(1)
    tps_prev = torch.cat([zero, tps[:-1]])
    fps_prev = torch.cat([zero, fps[:-1]])
    # Integer arithmetic keeps the area exact: the sum equals 2 * area * P * N <= M^2 / 2,
    # which fits int64 for any realistic M.
    twice_area = torch.sum((fps - fps_prev) * (tps + tps_prev))
    return twice_area.item() / (2.0 * tps[-1].item() * fps[-1].item())


def _ap_from_counts(tps: Tensor, fps: Tensor) -> float | None:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds; tps, fps: [T] int64."""
    if not _is_defined(tps, fps):
        return None
    tps_prev = torch.cat([tps.new_zeros(1), tps[:-1]])
    precision = tps.double() / (tps + fps).double()
    return (torch.sum((tps - tps_prev).double() * precision) / tps[-1].double()).item()


def _f1_max_from_counts(tps: Tensor, fps: Tensor) -> float | None:
    """Max of 2PR / (P + R) over distinct thresholds; tps, fps: [T] int64."""
    if not _is_defined(tps, fps):
        return None
    # 2PR / (P + R) simplified to 2 TP / (TP + FP + #positives); it is 0 exactly when TP = 0.
    f1 = 2.0 * tps.double() / (tps + fps + tps[-1]).double()
    return f1.max().item()


def binary_metrics(scores: Tensor, labels: Tensor) -> dict[str, float | None]:
    """AUROC, AP and F1-max from a single sort. scores, labels: [M]. Values in [0, 1] or None."""
    tps, fps = binary_curve_counts(scores, labels)
    return {
        "auroc": _auroc_from_counts(tps, fps),
        "ap": _ap_from_counts(tps, fps),
        "f1_max": _f1_max_from_counts(tps, fps),
    }


def auroc(scores: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve (= sklearn roc_auc_score). scores, labels: [M]."""
    return _auroc_from_counts(*binary_curve_counts(scores, labels))


def average_precision(scores: Tensor, labels: Tensor) -> float | None:
    """Average precision (= sklearn average_precision_score). scores, labels: [M]."""
    return _ap_from_counts(*binary_curve_counts(scores, labels))


def f1_max(scores: Tensor, labels: Tensor) -> float | None:
    """Best F1 over all thresholds of sklearn's precision_recall_curve. scores, labels: [M]."""
    return _f1_max_from_counts(*binary_curve_counts(scores, labels))


def label_regions(mask: np.ndarray) -> np.ndarray:
    """8-connected regions of one mask. mask: [H, W] (nonzero = anomalous) -> int32 [H, W], 0 = background,
    1..R (what `aupro` and `metrics_eval` take as a labelled mask)."""
    out = np.zeros(mask.shape, dtype=np.int32)
    if mask.any():
        scipy.ndimage.label(mask, structure=_STRUCTURE_8, output=out)
    return out


def connected_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected ground-truth regions, numbered globally across images.

    masks: [N, H, W] bool. Returns region ids [N, H, W] int32 (0 = background, 1..R) and R.
    scipy labels each image straight into its slice of the output, and images without a region are
    skipped: building a whole int64 copy per image took 5 ms of every 6 (MVTec: seconds per evaluation).
    """
    ids = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):
        n = scipy.ndimage.label(masks[i], structure=_STRUCTURE_8, output=ids[i])
        if n_regions:
            labelled = ids[i]
            labelled[labelled > 0] += n_regions
        n_regions += n
    return ids, n_regions


def global_region_ids(masks: Tensor) -> tuple[Tensor, int]:
    """Region ids numbered across images, on the masks' device. masks: [N, H, W], bool (labelled here,
    `connected_regions`) or integer per-image region labels (`label_regions`, e.g. from the loader's
    workers). Returns ids [N * H * W] int64 (0 = background, 1..R) and R."""
    if masks.dtype == torch.bool:
        ids_np, n_regions = connected_regions(masks.cpu().numpy())
        return torch.from_numpy(ids_np).to(masks.device).reshape(-1).long(), n_regions
    labels = masks.long()
    counts = labels.flatten(1).amax(dim=1)  # labels run 1..R_i in each image
    offsets = torch.cumsum(counts, 0) - counts
    ids = torch.where(labels > 0, labels + offsets[:, None, None], 0)
    return ids.reshape(-1), int(counts.sum())


def _trapezoid_up_to(x: Tensor, y: Tensor, x_max: float) -> Tensor:
    """Trapezoid integral of y(x) over [x[0], x_max], y linearly interpolated at x_max.

    x: [K] non-decreasing with x[0] <= x_max <= x[-1], y: [K].
    """
    k = int(torch.searchsorted(x, torch.tensor([x_max], dtype=x.dtype, device=x.device), right=True))
    xs, ys = x[:k], y[:k]
    if xs[-1] < x_max:
        # x[k] > x_max > x[k - 1], so the interpolation denominator is positive.
        w = (x_max - x[k - 1]) / (x[k] - x[k - 1])
        y_max = y[k - 1] + w * (y[k] - y[k - 1])
        xs = torch.cat([xs, xs.new_tensor([x_max])])
        ys = torch.cat([ys, y_max.reshape(1)])
    return torch.trapezoid(ys, xs)


def aupro(maps: Tensor, masks: Tensor, max_fpr: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve up to FPR = max_fpr (MVTec AD).

    maps: [N, H, W] scores; masks: [N, H, W] bool (nonzero = anomalous), or per-image region labels
    (`global_region_ids`); 0 < max_fpr <= 1.
    Exact curve over every distinct score. Returns a value in [0, 1], or None without regions or negative pixels.
    """
    ids, n_regions = global_region_ids(masks.to(maps.device))
    negative = ids == 0
    n_negative = int(negative.sum())
    if n_regions == 0 or n_negative == 0:
        return None

    # Each region pixel carries 1 / (|region| * R), so a cumulative sum gives the mean overlap.
    sizes = torch.bincount(ids, minlength=n_regions + 1).double()
    region_weight = 1.0 / (sizes * n_regions)
    region_weight[0] = 0.0
    pixel_weight = region_weight[ids]

    sorted_scores, order = torch.sort(maps.reshape(-1), descending=True)
    last = _group_last_indices(sorted_scores)
    fpr = torch.cumsum(negative[order], 0, dtype=torch.int64)[last].double() / n_negative
    pro = torch.cumsum(pixel_weight[order], 0)[last]

    zero = fpr.new_zeros(1)
    fpr = torch.cat([zero, fpr])
    pro = torch.cat([zero, pro])
    return (_trapezoid_up_to(fpr, pro, max_fpr) / max_fpr).item()


class NonFiniteError(ValueError):
    """Maps or scores hold NaN or inf: every metric computed from them would be silently wrong (one inf
    pixel min-max normalises every other pixel to 0)."""


def check_finite(values: Tensor, what: str, class_name: str) -> None:
    """Raises NonFiniteError naming the class and how many of `values` are NaN or inf."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(values).sum())
        n_bad = values.numel() - int(finite.sum())
        raise NonFiniteError(f"class {class_name!r}: {n_bad} of {values.numel()} {what} are not finite "
                             f"({n_nan} NaN, {n_bad - n_nan} inf)")


def _min_max(x: Tensor) -> Tensor:
    """Min-max normalise over all elements; a constant input maps to zeros instead of NaN."""
    lo, hi = x.min(), x.max()
    if hi == lo:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def metrics_eval(
    pixel_maps: Tensor,
    image_scores: Tensor,
    labels: Tensor,
    masks: Tensor | None,
    domain: str,
    class_name: str = "?",
) -> dict[str, float | None]:
    """Per-class evaluation as AA-CLIP defines it (image score: see the domain below).

    pixel_maps: [N, H, W]; image_scores: [N] (the (s + 1) / 2 detection scores); labels: [N]
    (nonzero = anomalous); masks: [N, H, W] bool, or int per-image region labels (`label_regions`, which
    `aupro` then does not label again), or None; domain: "Industrial" or "Medical".
    Returns METRIC_NAMES -> percent, None where undefined. Raises NonFiniteError (naming `class_name`)
    when a map value or score is NaN or inf.
    """
    if domain not in ("Industrial", "Medical"):
        raise ValueError(f"unknown domain {domain!r}")
    check_finite(pixel_maps, "pixel-map values", class_name)
    check_finite(image_scores, "image scores", class_name)
    maps = _min_max(pixel_maps)
    map_max = maps.flatten(1).amax(dim=1)
    if domain == "Industrial":
        scores = 0.5 * map_max + 0.5 * _min_max(image_scores)
    else:
        scores = map_max

    out: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    image = binary_metrics(scores, labels)
    out["image_auroc"] = _percent(image["auroc"])
    out["image_ap"] = _percent(image["ap"])
    out["image_f1_max"] = _percent(image["f1_max"])
    if masks is not None:
        pixel = binary_metrics(maps, masks)
        out["pixel_auroc"] = _percent(pixel["auroc"])
        out["pixel_ap"] = _percent(pixel["ap"])
        out["pixel_f1_max"] = _percent(pixel["f1_max"])
        out["pixel_aupro"] = _percent(aupro(maps, masks))
    return out


def mean_metrics(per_class: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the classes where it is defined (None if it is nowhere)."""
    means: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [m[name] for m in per_class.values() if m.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    return means
