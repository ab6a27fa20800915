"""A tiny procedural anomaly-detection dataset in MVTec layout, for demos and tests without real data.

    python -m dataset.synthetic --out data/Synthetic [--seed 0] [--size 128] [--n_normal 6] [--n_anomalous 6]

Writes <out>/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<id>_mask.png} and, unless
--metadata_dir "" is given, <metadata_dir>/<name>/{full,4}-shot.jsonl.

Classes: stripes, carpet, disc, nut (the default); zebra, felt, cap, washer are colour/shape variants of
the same four renderers with the same defect kinds, so that a model can be trained on some classes and
tested on unseen ones (tools/proxy.py). --defect_scale enlarges the defects (1: the default sizes).
"""
import argparse
import shutil
import sys
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter

from utils.argtypes import non_negative_int, positive_float, positive_int

from .common import DatasetError
from .make_metadata import build_metadata, report

MARKER = ".synthetic"  # marks a folder this module created, so re-running may replace it
TEXTURE_DEFECTS = ("scratch", "hole", "stain")
OBJECT_DEFECTS = TEXTURE_DEFECTS + ("missing_piece",)

Rendered = tuple[np.ndarray, np.ndarray, np.ndarray]  # image float [S, S, 3], support bool [S, S], background [S, S, 3]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float64)


# The renderers' keyword parameters only change colours and geometry, never which random numbers are drawn:
# their defaults draw the default classes exactly as before the variants existed.
RGB = tuple[float, float, float]


def _stripes(rng: np.random.Generator, size: int, angle_deg: float = 30, n_periods: float = 10,
             light: RGB = (200, 170, 120), dark: RGB = (120, 80, 60)) -> Rendered:
    yy, xx = _grid(size)
    angle = np.deg2rad(angle_deg + rng.normal(0, 2))
    period = size / n_periods * (1 + rng.normal(0, 0.03))
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    light_, dark_ = np.array(light, dtype=np.float64), np.array(dark, dtype=np.float64)
    image = dark_ + t[..., None] * (light_ - dark_) + rng.normal(0, 4, (size, size, 3))
    return image, np.ones((size, size), bool), image


def _carpet(rng: np.random.Generator, size: int, grain: float = 1.5, tint: RGB = (1.0, 0.97, 0.92)) -> Rendered:
    coarse = gaussian_filter(rng.normal(size=(size, size)), sigma=grain)
    value = 128 + 25 * (coarse / coarse.std() + 0.3 * rng.normal(size=(size, size)))
    image = value[..., None] * np.array(tint, dtype=np.float64)
    return image, np.ones((size, size), bool), image


def _disc(rng: np.random.Generator, size: int, radius: float = 0.3, colour: RGB = (70, 130, 80),
          backdrop: RGB = (40, 45, 50)) -> Rendered:
    """Top view of a green bottle: shaded disc with a darker mouth on a dark background."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.normal(0, size * 0.02, 2)
    r = np.hypot(yy - cy, xx - cx) / (size * radius * (1 + rng.normal(0, 0.02)))
    background = np.array(backdrop, dtype=np.float64) + rng.normal(0, 3, (size, size, 3))
    disc = np.array(colour, dtype=np.float64) * (1.2 - 0.5 * r)[..., None]
    disc[r < 0.4] *= 0.5
    support = r <= 1
    return np.where(support[..., None], disc, background), support, background


def _nut(rng: np.random.Generator, size: int, half_side: float = 0.28, hole: float = 0.1,
         metal_rgb: RGB = (105, 108, 120), backdrop: RGB = (170, 170, 165)) -> Rendered:
    """Rotated metal square with a round hole on a light background."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.normal(0, size * 0.02, 2)
    a = rng.uniform(0, np.pi / 2)
    u, v = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a), -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    background = np.array(backdrop, dtype=np.float64) + rng.normal(0, 3, (size, size, 3))
    metal = np.array(metal_rgb, dtype=np.float64) * (1 + 0.3 * (u + v) / size)[..., None]
    support = (np.maximum(abs(u), abs(v)) <= size * half_side) & (np.hypot(u, v) > size * hole)
    return np.where(support[..., None], metal, background), support, background


Renderer = Callable[[np.random.Generator, int], Rendered]

CLASSES: dict[str, tuple[Renderer, tuple[str, ...]]] = {
    "stripes": (_stripes, TEXTURE_DEFECTS),
    "carpet": (_carpet, TEXTURE_DEFECTS),
    "disc": (_disc, OBJECT_DEFECTS),
    "nut": (_nut, OBJECT_DEFECTS),
}
# Variants of the four renderers under new class names (new prompts too), with the same defect kinds: the
# unseen classes of a cross-class test. Not drawn unless asked for, so the default dataset is unchanged.
VARIANT_CLASSES: dict[str, tuple[Renderer, tuple[str, ...]]] = {
    "zebra": (partial(_stripes, angle_deg=-50, n_periods=7, light=(235, 235, 225), dark=(35, 35, 40)),
              TEXTURE_DEFECTS),
    "felt": (partial(_carpet, grain=2.5, tint=(0.75, 0.85, 1.05)), TEXTURE_DEFECTS),
    "cap": (partial(_disc, radius=0.36, colour=(170, 70, 60), backdrop=(190, 185, 175)), OBJECT_DEFECTS),
    "washer": (partial(_nut, half_side=0.32, hole=0.15, metal_rgb=(190, 150, 80), backdrop=(55, 60, 70)),
               OBJECT_DEFECTS),
}
ALL_CLASSES = {**CLASSES, **VARIANT_CLASSES}


def _defect_region(rng: np.random.Generator, defect: str, support: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Random defect shape [S, S] bool, centred on the support (the object, or the whole texture); `scale`
    multiplies its lengths (scratch length and width, radii)."""
    size = support.shape[0]
    yy, xx = _grid(size)
    if defect == "missing_piece":
        # Centred on the object's edge so the cut visibly removes part of its outline.
        candidates = np.argwhere(support & ~binary_erosion(support))
    else:
        candidates = np.argwhere(support)
    cy, cx = candidates[rng.integers(len(candidates))]
    if defect == "scratch":
        a, length, width = rng.uniform(0, np.pi), size * rng.uniform(0.25, 0.45), rng.uniform(1.2, 2.0)
        length, width = length * scale, width * scale
        along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        across = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        return (np.abs(across) <= width / 2) & (np.abs(along) <= length / 2)
    if defect == "missing_piece":
        return np.hypot(yy - cy, xx - cx) <= size * rng.uniform(0.1, 0.15) * scale
    a, (ry, rx) = rng.uniform(0, np.pi), size * scale * rng.uniform(0.04, 0.08 if defect == "hole" else 0.12, 2)
    u, v = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a), -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    radius = np.hypot(u / rx, v / ry)
    if defect == "stain":  # irregular outline
        wobble = gaussian_filter(rng.normal(size=(size, size)), sigma=size * 0.03)
        radius -= 0.3 * wobble / wobble.std()
    return radius <= 1


def _paint(rng: np.random.Generator, defect: str, image: np.ndarray, background: np.ndarray,
           region: np.ndarray) -> np.ndarray:
    out = image.copy()
    if defect == "scratch":
        # Contrast with the surface so the scratch is visible on dark and light classes alike.
        out[region] = 235.0 if image[region].mean() < 128 else 20.0
    elif defect == "hole":
        out[region] = np.array([15.0, 12, 10]) + rng.normal(0, 2, (region.sum(), 3))
    elif defect == "stain":
        out[region] = 0.25 * image[region] + 0.75 * np.array([160.0, 60, 30])
    else:
        out[region] = background[region]
    return out


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render(class_name: str, rng: np.random.Generator, size: int,
           defect: str | None = None, defect_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample: (defect-free image uint8 [S, S, 3], image uint8 [S, S, 3], mask bool [S, S]).

    The mask is exactly the set of painted pixels (restricted to the object for object classes);
    `defect_scale` multiplies the defect's lengths.
    """
    draw, _ = ALL_CLASSES[class_name]
    image, support, background = draw(rng, size)
    if defect is None:
        return _quantise(image), _quantise(image), np.zeros((size, size), bool)
    min_area = max(8, size * size // 1000)
    while True:  # reject defects that are clipped to a speck by the object's outline
        region = _defect_region(rng, defect, support, defect_scale) & support
        if region.sum() >= min_area:
            break
    return _quantise(image), _quantise(_paint(rng, defect, image, background, region)), region


def _rng(seed: int, class_name: str, split: str, index: int) -> np.random.Generator:
    # One stream per image, so images do not depend on which other classes/counts were requested.
    return np.random.default_rng([seed, zlib.crc32(class_name.encode()), zlib.crc32(split.encode()), index])


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_synthetic(out: str, seed: int = 0, size: int = 128, n_normal: int = 6, n_anomalous: int = 6,
                   n_train: int = 4, classes: Sequence[str] | None = None, defect_scale: float = 1.0) -> None:
    """Write the dataset under `out` (replacing a previous synthetic dataset there).

    Per class: n_train train/good images, n_normal test/good images and n_anomalous test images whose
    defect types cycle through the class's defects, with 0/255 masks in ground_truth/. `classes` defaults
    to the four of CLASSES; the VARIANT_CLASSES may be named too. `defect_scale` multiplies defect lengths.
    """
    if size < 32:
        raise DatasetError(f"--size must be at least 32 pixels for visible defects, got {size}")
    if not defect_scale > 0:
        raise DatasetError(f"--defect_scale must be positive, got {defect_scale}")
    classes = list(CLASSES) if classes is None else list(classes)
    unknown = sorted(set(classes) - set(ALL_CLASSES))
    if unknown:
        raise DatasetError(f"unknown synthetic class(es) {unknown}; choose from {', '.join(ALL_CLASSES)}")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise DatasetError(f"refusing to write into non-empty folder {root}: it was not created by "
                               "dataset.synthetic; pass an empty or new --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    for name in classes:
        for i in range(n_train):
            _save(render(name, _rng(seed, name, "train", i), size)[1], root / name / "train" / "good" / f"{i:03d}.png")
        for i in range(n_normal):
            _save(render(name, _rng(seed, name, "good", i), size)[1], root / name / "test" / "good" / f"{i:03d}.png")
        defects = ALL_CLASSES[name][1]
        for i in range(n_anomalous):
            defect, j = defects[i % len(defects)], i // len(defects)
            _, image, mask = render(name, _rng(seed, name, defect, j), size, defect, defect_scale)
            _save(image, root / name / "test" / defect / f"{j:03d}.png")
            _save(mask.astype(np.uint8) * 255, root / name / "ground_truth" / defect / f"{j:03d}_mask.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/Synthetic",
                        help="dataset folder; the default is the root that `--dataset Synthetic` resolves to "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes and defects (default: %(default)s)")
    parser.add_argument("--size", type=positive_int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--n_normal", type=non_negative_int, default=6,
                        help="normal test images per class (default: %(default)s)")
    parser.add_argument("--n_anomalous", type=non_negative_int, default=6,
                        help="anomalous test images per class, with masks (default: %(default)s)")
    parser.add_argument("--n_train", type=non_negative_int, default=4,
                        help="normal train images per class (default: %(default)s)")
    parser.add_argument("--classes", nargs="+", choices=list(ALL_CLASSES), default=list(CLASSES),
                        help=f"classes to draw; {', '.join(VARIANT_CLASSES)} are variants of the default four "
                             "(default: %(default)s)")
    parser.add_argument("--defect_scale", type=positive_float, default=1.0,
                        help="multiplies the defects' lengths (scratch length and width, radii) (default: "
                             "%(default)s)")
    parser.add_argument("--metadata_dir", default="dataset/metadata",
                        help='folder of the metadata lists; "" skips writing them (default: %(default)s)')
    parser.add_argument("--name", default="Synthetic",
                        help="dataset name of the metadata folder (default: %(default)s)")
    parser.add_argument("--shots", type=positive_int, nargs="*", default=[4],
                        help="k-shot lists to write besides full-shot (default: 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        make_synthetic(args.out, args.seed, args.size, args.n_normal, args.n_anomalous, args.n_train, args.classes,
                       args.defect_scale)
        print(f"wrote synthetic dataset to {args.out}")
        if args.metadata_dir:
            report(build_metadata(args.name, args.out, "mvtec", args.metadata_dir, args.shots))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
