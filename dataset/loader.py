"""ADDataset: reads a .jsonl metadata list, loads images and masks, optional training augmentation."""
import hashlib
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from .common import DatasetError, get_dataset_info, parse_record

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SINGLE_CHANNEL_MODES = _HIGH_BIT_MODES | {"1", "L"}
_MAKE_HINT = "build it with `python -m dataset.make_metadata --dataset NAME --root DIR`"


def read_metadata(path: str) -> list[dict]:
    """Parse a .jsonl metadata file into records {image_path, mask_path, label, class_name}.

    Blank lines are skipped; a missing/null mask_path becomes "". Any malformed line raises
    DatasetError naming the file and the 1-based line number.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                records.append(parse_record(line, f"{path}:{n}"))
    return records


def _decode(path: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open an image file and apply `convert`, turning every read failure into DatasetError."""
    try:
        with Image.open(path) as img:
            img.load()
            return convert(img)
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}; check the dataset root or rebuild the metadata") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}; the file is corrupted or truncated: copy or extract "
                           "it again, or leave it out (delete its metadata line, or drop it from --images)") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16/32-bit and float images are rescaled, not clipped.

    Integer images within [0, 65535] are taken as 16-bit (x * 255 / 65535) so that intensities stay
    comparable across images; other ranges and float images are min-max scaled per image.
    """
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode != "F" and lo >= 0 and hi <= 65535:
            arr = arr * (255.0 / 65535.0)
        else:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        # Palette transparency is only honoured via RGBA; going there first avoids PIL's warning.
        img = img.convert("RGBA")
    # Alpha is dropped, not composited: AD images use it as an unused channel, if at all.
    return img.convert("RGB")


def read_image_uint8(path: str, image_size: int, cache_dir: str | None = None) -> np.ndarray:
    """Any file PIL reads (any size, grayscale, RGBA, 16-bit, ...) -> uint8 [S, S, 3]: RGB as `to_rgb`
    makes it, resized bicubic to S x S. With `cache_dir`, the result is kept there as `.npy` (keyed by
    path, modification time and size), so later epochs and evaluations skip decoding and resizing."""
    cached = None
    if cache_dir:
        stat = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_mtime_ns}|{stat.st_size}|{image_size}".encode())
        cached = os.path.join(cache_dir, key.hexdigest() + ".npy")
        if os.path.exists(cached):
            return np.load(cached)
    size = (image_size, image_size)
    arr = np.ascontiguousarray(_decode(path, lambda img: np.asarray(to_rgb(img).resize(size, Image.BICUBIC))))
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        # Written under a unique name, then renamed: loader workers may cache the same file at once.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, cached)
    return arr


def read_image(path: str, image_size: int, cache_dir: str | None = None) -> torch.Tensor:
    """`read_image_uint8` as float [3, S, S] in [0, 1]."""
    arr = read_image_uint8(path, image_size, cache_dir)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def load_image(path: str, image_size: int) -> torch.Tensor:
    """The model input of an image file, as ADDataset gives it without augmentation: float [3, S, S],
    CLIP-normalised."""
    return v2.functional.normalize(read_image(path, image_size), CLIP_MEAN, CLIP_STD)


def _mask_to_binary(img: Image.Image) -> np.ndarray:
    """Any nonzero pixel (in any colour channel, alpha ignored) is anomalous. Returns uint8 [H, W] in {0, 1}."""
    if img.mode in _SINGLE_CHANNEL_MODES:
        arr = np.asarray(img) != 0
    else:
        arr = (np.asarray(to_rgb(img)) != 0).any(axis=-1)
    return arr.astype(np.uint8)


def _color_jitter() -> v2.Transform:
    return v2.Compose([v2.RandomApply([v2.ColorJitter(**{k: 0.5})], p=0.7)
                       for k in ("brightness", "contrast", "saturation")])


def _geometric() -> v2.Transform:
    # v2 always uses nearest interpolation for tv_tensors.Mask, so masks stay binary.
    bilinear = InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RandomApply([v2.RandomRotation(30, interpolation=bilinear)], p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.15, 0.15), interpolation=bilinear)], p=0.5),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
    ])


class ADDataset(Dataset):
    """Anomaly-detection samples listed in a .jsonl metadata file (paths relative to `root`).

    Items are dicts: image float [3, S, S] (CLIP-normalised), mask float [1, S, S] in {0, 1},
    label int, class_name str, class_idx int (position in `class_names`), image_path str (as in the metadata), has_mask bool (the mask is
    pixel ground truth: the sample has a mask file, or is normal in a dataset that has masks).
    Augmentation draws from torch's global RNG only, so seeding torch makes it reproducible.
    """

    def __init__(self, root: str, metadata: str, image_size: int = 518, augment: bool = False,
                 color_jitter: bool = False, class_names: list[str] | None = None, cache_dir: str | None = None):
        if not os.path.isfile(metadata):
            raise DatasetError(f"metadata file not found: {metadata}; {_MAKE_HINT}")
        if not os.path.isdir(root):
            raise DatasetError(f"dataset root not found: {root}; pass the folder the metadata paths are "
                               f"relative to (--data_root, or --root for make_metadata), or {_MAKE_HINT}")
        samples = read_metadata(metadata)
        if not samples:
            raise DatasetError(f"metadata file {metadata} lists no samples; {_MAKE_HINT}")
        if class_names is not None:
            present = {s["class_name"] for s in samples}
            unknown = sorted(set(class_names) - present)
            if unknown:
                raise DatasetError(f"class(es) {unknown} not in {metadata}; available: {sorted(present)}")
            samples = [s for s in samples if s["class_name"] in class_names]
        self.root, self.metadata, self.image_size = root, metadata, image_size
        self.cache_dir = cache_dir
        self.samples = samples
        self.class_names = sorted({s["class_name"] for s in samples})
        self.class_index = {name: i for i, name in enumerate(self.class_names)}
        self.has_masks = any(s["mask_path"] for s in samples)
        self._check_files()
        self.color = _color_jitter() if augment and color_jitter else None
        self.geometric = _geometric() if augment else None
        self.normalize = v2.Normalize(CLIP_MEAN, CLIP_STD)

    @classmethod
    def from_name(cls, dataset: str, root: str | None = None, metadata_dir: str = "dataset/metadata",
                  shot: int | None = None, **kw) -> "ADDataset":
        """Load <metadata_dir>/<dataset>/{full,<shot>}-shot.jsonl; root defaults to the constants' root."""
        root = root or get_dataset_info(dataset)["default_root"]
        metadata = os.path.join(metadata_dir, dataset, "full-shot.jsonl" if shot is None else f"{shot}-shot.jsonl")
        if not os.path.isfile(metadata):
            shots = "" if shot is None else f" --shots {shot}"
            raise DatasetError(f"metadata file not found: {metadata}; build it with `python -m dataset.make_metadata "
                               f"--dataset {dataset} --root {root} --out_dir {metadata_dir}{shots}`")
        return cls(root, metadata, **kw)

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _check_files(self) -> None:
        # Fail at construction, not hours into training, when the root or metadata is stale.
        missing = [self._path(s["image_path"]) for s in self.samples if not os.path.isfile(self._path(s["image_path"]))]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) listed in {self.metadata} are missing, e.g. {missing[0]}; "
                               f"check the root ({self.root}) or {_MAKE_HINT}")
        for s in self.samples:
            if s["label"] == 1 and s["mask_path"] and not os.path.isfile(self._path(s["mask_path"])):
                raise DatasetError(f"mask file not found: {self._path(s['mask_path'])} (anomalous sample "
                                   f"{s['image_path']} in {self.metadata}); check the root or {_MAKE_HINT}")

    def __len__(self) -> int:
        return len(self.samples)

    def _load_image(self, rel: str) -> tv_tensors.Image:
        return tv_tensors.Image(read_image(self._path(rel), self.image_size, self.cache_dir))

    def _load_mask(self, sample: dict) -> tv_tensors.Mask:
        """Returns uint8 [1, S, S] in {0, 1}; all-zero for normal samples and samples without a mask."""
        size = (self.image_size, self.image_size)
        if sample["label"] == 0 or not sample["mask_path"]:
            return tv_tensors.Mask(torch.zeros(1, *size, dtype=torch.uint8))
        arr = _decode(self._path(sample["mask_path"]),
                      lambda img: np.asarray(Image.fromarray(_mask_to_binary(img)).resize(size, Image.NEAREST)))
        return tv_tensors.Mask(torch.from_numpy(arr.copy())[None])

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, mask = self._load_image(sample["image_path"]), self._load_mask(sample)
        if self.color is not None:
            image = self.color(image)
        if self.geometric is not None:
            image, mask = self.geometric(image, mask)
        has_mask = bool(sample["mask_path"]) or (sample["label"] == 0 and self.has_masks)
        return {
            "image": self.normalize(image).as_subclass(torch.Tensor),
            "mask": mask.as_subclass(torch.Tensor).float(),
            "label": sample["label"],
            "class_name": sample["class_name"],
            "class_idx": self.class_index[sample["class_name"]],
            "image_path": sample["image_path"],
            "has_mask": has_mask,
        }


def denormalize(image: torch.Tensor) -> np.ndarray:
    """The inverse of the loader's normalisation, for display. image: [3, S, S] -> [S, S, 3] in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (image.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
