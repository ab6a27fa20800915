"""ADDataset: reads a .jsonl metadata list, loads images and masks, optional training augmentation."""
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .common import DatasetError, parse_record, resolve_root

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
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
    path, modification time, file size and S), so later epochs and evaluations skip decoding and resizing."""
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


def _to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1], as torchvision's `ToTensor`."""
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def read_image(path: str, image_size: int, cache_dir: str | None = None) -> torch.Tensor:
    """`read_image_uint8` as float [3, S, S] in [0, 1]."""
    return _to_float(read_image_uint8(path, image_size, cache_dir))


def load_image(path: str, image_size: int) -> torch.Tensor:
    """The model input of an image file, as ADDataset gives it without augmentation: float [3, S, S],
    CLIP-normalised."""
    return F.normalize(read_image(path, image_size), CLIP_MEAN, CLIP_STD)


def _mask_to_binary(img: Image.Image) -> np.ndarray:
    """The original's mask rule: `convert("L")`, then every nonzero pixel is anomalous (so a colour is
    anomalous only where its luminance rounds above 0). Returns uint8 [H, W] in {0, 1}."""
    return (np.asarray(img.convert("L")) != 0).astype(np.uint8)


@dataclass(frozen=True)
class AugmentParams:
    """One training sample's augmentation as the original draws it, each step None / False when it is not applied.

    Colour factors act on the full-size image (Stage 2 only); `angle` (degrees), `translate` (pixels,
    x then y) and the flips act on the stacked [normalised image, mask] tensor.
    """
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    angle: float | None = None
    translate: tuple[int, int] | None = None
    hflip: bool = False
    vflip: bool = False

    @property
    def jitters(self) -> bool:
        return any(f is not None for f in (self.brightness, self.contrast, self.saturation))


JITTER, JITTER_P = 0.5, 0.7
ROTATION, TRANSLATE, GEOMETRIC_P = 30.0, 0.15, 0.5


def _coin(p: float) -> bool:
    # RandomApply's test: the step is skipped when p < u.
    return not p < torch.rand(1)


def draw_augment_params(image_size: int, color_jitter: bool) -> AugmentParams:
    """Draws one sample's parameters from torch's global RNG with the draws, in the order, of the
    original's torchvision pipeline (three `RandomApply([ColorJitter(x=0.5)], p=0.7)`, then
    `RandomApply([RandomRotation(30)], p=0.5)`, `RandomApply([RandomAffine(0, translate=(0.15, 0.15))],
    p=0.5)`, `RandomHorizontalFlip()`, `RandomVerticalFlip()`), so a seed gives the original's sample."""
    factors: dict[str, float | None] = dict.fromkeys(("brightness", "contrast", "saturation"))
    if color_jitter:
        for i, name in enumerate(factors):
            if _coin(JITTER_P):
                ranges = [None] * 4
                ranges[i] = [1 - JITTER, 1 + JITTER]
                factors[name] = float(T.ColorJitter.get_params(*ranges)[1 + i])
    angle = float(T.RandomRotation.get_params([-ROTATION, ROTATION])) if _coin(GEOMETRIC_P) else None
    translate = None
    if _coin(GEOMETRIC_P):
        _, translate, _, _ = T.RandomAffine.get_params([0.0, 0.0], [TRANSLATE, TRANSLATE], None, None,
                                                       [image_size, image_size])
    hflip, vflip = bool(torch.rand(1) < 0.5), bool(torch.rand(1) < 0.5)
    return AugmentParams(**factors, angle=angle, translate=translate, hflip=hflip, vflip=vflip)


def jitter_colour(img: Image.Image, params: AugmentParams) -> Image.Image:
    """Brightness, contrast, saturation (in that order) on a full-size RGB PIL image, as PIL computes them."""
    for adjust, factor in ((F.adjust_brightness, params.brightness), (F.adjust_contrast, params.contrast),
                           (F.adjust_saturation, params.saturation)):
        if factor is not None:
            img = adjust(img, factor)
    return img


def transform_geometry(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Rotation, translation and flips of x [C, S, S] (image and mask channels stacked), torchvision's
    defaults: nearest interpolation, fill 0 (the mean colour of a normalised image, background of a mask)."""
    fill = [0.0] * x.shape[0]
    if params.angle is not None:
        x = F.rotate(x, params.angle, InterpolationMode.NEAREST, fill=fill)
    if params.translate is not None:
        x = F.affine(x, angle=0.0, translate=list(params.translate), scale=1.0, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.NEAREST, fill=fill)
    if params.hflip:
        x = F.horizontal_flip(x)
    if params.vflip:
        x = F.vertical_flip(x)
    return x


class ADDataset(Dataset):
    """Anomaly-detection samples listed in a .jsonl metadata file (paths relative to `root`).

    Items are dicts: image float [3, S, S] (CLIP-normalised), mask float [1, S, S] in {0, 1},
    label int, class_name str, class_idx int (position in `class_names`), image_path str (as in the
    metadata), has_mask bool (the mask is pixel ground truth: the sample has a mask file, or is normal in
    a dataset that has masks).

    `augment` applies the original's training augmentation (`AugmentParams`): with `color_jitter` (Stage 2)
    colour jitter on the full-size image before the resize, then rotation, translation and flips of the
    stacked normalised image and mask. Its parameters come from torch's global RNG only, so seeding torch
    makes an item reproducible.
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
        self.augment, self.color_jitter = augment, color_jitter

    @classmethod
    def from_name(cls, dataset: str, root: str | None = None, metadata_dir: str = "dataset/metadata",
                  shot: int | None = None, **kw) -> "ADDataset":
        """Load <metadata_dir>/<dataset>/{full,<shot>}-shot.jsonl; root defaults to the one make_metadata
        recorded beside the lists, else the constants' root (`resolve_root`)."""
        root = resolve_root(root, metadata_dir, dataset)
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

    def _load_image(self, rel: str, params: AugmentParams | None) -> torch.Tensor:
        """float [3, S, S] in [0, 1]; colour jitter, if any, on the full-size image before the resize. A
        jittered image is decoded each time: caching full-size decodes would take the dataset's
        uncompressed size on disk (about 50 GB for VisA)."""
        path = self._path(rel)
        if params is None or not params.jitters:
            return read_image(path, self.image_size, self.cache_dir)
        img = jitter_colour(_decode(path, to_rgb), params)
        return _to_float(np.asarray(img.resize((self.image_size, self.image_size), Image.BICUBIC)))

    def _load_mask(self, sample: dict) -> torch.Tensor:
        """float [1, S, S] in {0, 1}, resized nearest from any mask size; all-zero for normal samples and
        samples without a mask."""
        size = (self.image_size, self.image_size)
        if sample["label"] == 0 or not sample["mask_path"]:
            return torch.zeros(1, *size)
        arr = _decode(self._path(sample["mask_path"]),
                      lambda img: np.asarray(Image.fromarray(_mask_to_binary(img)).resize(size, Image.NEAREST)))
        return torch.from_numpy(arr.copy())[None].float()

    def augment_params(self) -> AugmentParams | None:
        """This item's augmentation, drawn from torch's global RNG; None without `augment`."""
        return draw_augment_params(self.image_size, self.color_jitter) if self.augment else None

    def load(self, index: int, params: AugmentParams | None = None) -> dict:
        """Item `index` with the given augmentation (None: none)."""
        sample = self.samples[index]
        image = F.normalize(self._load_image(sample["image_path"], params), CLIP_MEAN, CLIP_STD)
        mask = self._load_mask(sample)
        if params is not None:
            stacked = transform_geometry(torch.cat([image, mask]), params)
            image, mask = stacked[:3], stacked[3:]
        has_mask = bool(sample["mask_path"]) or (sample["label"] == 0 and self.has_masks)
        return {
            "image": image,
            "mask": mask,
            "label": sample["label"],
            "class_name": sample["class_name"],
            "class_idx": self.class_index[sample["class_name"]],
            "image_path": sample["image_path"],
            "has_mask": has_mask,
        }

    def __getitem__(self, index: int) -> dict:
        return self.load(index, self.augment_params())


def denormalize(image: torch.Tensor) -> np.ndarray:
    """The inverse of the loader's normalisation, for display. image: [3, S, S] -> [S, S, 3] in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (image.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
