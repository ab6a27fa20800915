"""A tiny procedural anomaly-detection dataset in MVTec layout, for demos and tests without real data.

    python -m dataset.synthetic --out data/Synthetic [--seed 0] [--size 128] [--n_normal 6] [--n_anomalous 6]

Writes <out>/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<id>_mask.png} and, unless
--metadata_dir "" is given, <metadata_dir>/<name>/{full,4}-shot.jsonl.
"""
import argparse
import shutil
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter

from utils.argtypes import non_negative_int, positive_int

from .common import DatasetError
from .make_metadata import build_metadata, report

MARKER = ".synthetic"  # marks a folder this module created, so re-running may replace it
TEXTURE_DEFECTS = ("scratch", "hole", "stain")
OBJECT_DEFECTS = TEXTURE_DEFECTS + ("missing_piece",)

Rendered = tuple[np.ndarray, np.ndarray, np.ndarray]  # image float [S, S, 3], support bool [S, S], background [S, S, 3]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _stripes(rng: np.random.Generator, size: int) -> Rendered:
    yy, xx = _grid(size)
    angle = np.deg2rad(30 + rng.normal(0, 2))
    period = size / 10 * (1 + rng.normal(0, 0.03))
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    light, dark = np.array([200.0, 170, 120]), np.array([120.0, 80, 60])
    image = dark + t[..., None] * (light - dark) + rng.normal(0, 4, (size, size, 3))
    return image, np.ones((size, size), bool), image


def _carpet(rng: np.random.Generator, size: int) -> Rendered:
    coarse = gaussian_filter(rng.normal(size=(size, size)), sigma=1.5)
    value = 128 + 25 * (coarse / coarse.std() + 0.3 * rng.normal(size=(size, size)))
    image = value[..., None] * np.array([1.0, 0.97, 0.92])
    return image, np.ones((size, size), bool), image


def _disc(rng: np.random.Generator, size: int) -> Rendered:
    """Top view of a green bottle: shaded disc with a darker mouth on a dark background."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.normal(0, size * 0.02, 2)
    r = np.hypot(yy - cy, xx - cx) / (size * 0.3 * (1 + rng.normal(0, 0.02)))
    background = np.array([40.0, 45, 50]) + rng.normal(0, 3, (size, size, 3))
    disc = np.array([70.0, 130, 80]) * (1.2 - 0.5 * r)[..., None]
    disc[r < 0.4] *= 0.5
    support = r <= 1
    return np.where(support[..., None], disc, background), support, background


def _nut(rng: np.random.Generator, size: int) -> Rendered:
    """Rotated metal square with a round hole on a light background."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.normal(0, size * 0.02, 2)
    a = rng.uniform(0, np.pi / 2)
    u, v = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a), -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    background = np.array([170.0, 170, 165]) + rng.normal(0, 3, (size, size, 3))
    metal = np.array([105.0, 108, 120]) * (1 + 0.3 * (u + v) / size)[..., None]
    support = (np.maximum(abs(u), abs(v)) <= size * 0.28) & (np.hypot(u, v) > size * 0.1)
    return np.where(support[..., None], metal, background), support, background


CLASSES: dict[str, tuple[Callable[[np.random.Generator, int], Rendered], tuple[str, ...]]] = {
    "stripes": (_stripes, TEXTURE_DEFECTS),
    "carpet": (_carpet, TEXTURE_DEFECTS),
    "disc": (_disc, OBJECT_DEFECTS),
    "nut": (_nut, OBJECT_DEFECTS),
}


def _defect_region(rng: np.random.Generator, defect: str, support: np.ndarray) -> np.ndarray:
    """Random defect shape [S, S] bool, centred on the support (the object, or the whole texture)."""
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
        along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        across = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        return (np.abs(across) <= width / 2) & (np.abs(along) <= length / 2)
    if defect == "missing_piece":
        return np.hypot(yy - cy, xx - cx) <= size * rng.uniform(0.1, 0.15)
    a, (ry, rx) = rng.uniform(0, np.pi), size * rng.uniform(0.04, 0.08 if defect == "hole" else 0.12, 2)
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
           defect: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample: (defect-free image uint8 [S, S, 3], image uint8 [S, S, 3], mask bool [S, S]).

    The mask is exactly the set of painted pixels (restricted to the object for object classes).
    """
    draw, _ = CLASSES[class_name]
    image, support, background = draw(rng, size)
    if defect is None:
        return _quantise(image), _quantise(image), np.zeros((size, size), bool)
    min_area = max(8, size * size // 1000)
    while True:  # reject defects that are clipped to a speck by the object's outline
        region = _defect_region(rng, defect, support) & support
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
                   n_train: int = 4, classes: Sequence[str] | None = None) -> None:
    """Write the dataset under `out` (replacing a previous synthetic dataset there).

    Per class: n_train train/good images, n_normal test/good images and n_anomalous test images whose
    defect types cycle through the class's defects, with 0/255 masks in ground_truth/.
    """
    if size < 32:
        raise DatasetError(f"--size must be at least 32 pixels for visible defects, got {size}")
    classes = list(CLASSES) if classes is None else list(classes)
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        raise DatasetError(f"unknown synthetic class(es) {unknown}; choose from {', '.join(CLASSES)}")
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
        defects = CLASSES[name][1]
        for i in range(n_anomalous):
            defect, j = defects[i % len(defects)], i // len(defects)
            _, image, mask = render(name, _rng(seed, name, defect, j), size, defect)
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
    parser.add_argument("--classes", nargs="+", choices=list(CLASSES), default=list(CLASSES),
                        help="classes to draw (default: all)")
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
        make_synthetic(args.out, args.seed, args.size, args.n_normal, args.n_anomalous, args.n_train, args.classes)
        print(f"wrote synthetic dataset to {args.out}")
        if args.metadata_dir:
            report(build_metadata(args.name, args.out, "mvtec", args.metadata_dir, args.shots))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
