"""Tests for dataset/: synthetic data, metadata building, loading, augmentation and error messages."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from dataset import PROMPTS, ADDataset, DatasetError, get_dataset_info, get_real_name, load_constants
from dataset.loader import CLIP_MEAN, CLIP_STD, AugmentParams
from dataset.make_metadata import build_metadata, collect_samples, detect_layout, k_shot, main
from dataset.synthetic import CLASSES, make_synthetic, render

MEAN, STD = np.array(CLIP_MEAN), np.array(CLIP_STD)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """[3, S, S] normalised tensor -> [S, S, 3] in [0, 1]."""
    return image.permute(1, 2, 0).numpy() * STD + MEAN


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "Synthetic"
    make_synthetic(str(root), seed=0, size=64, n_normal=3, n_anomalous=5, n_train=1)
    return root


# --- synthetic data ---------------------------------------------------------------------------------

def test_synthetic_is_deterministic(synthetic, tmp_path):
    make_synthetic(str(tmp_path / "same"), seed=0, size=64, n_normal=3, n_anomalous=5, n_train=1)
    make_synthetic(str(tmp_path / "other"), seed=1, size=64, n_normal=3, n_anomalous=5, n_train=1)
    reference, same, other = _files(synthetic), _files(tmp_path / "same"), _files(tmp_path / "other")
    assert same == reference
    assert other.keys() == reference.keys()
    images = [k for k in reference if k.endswith(".png")]
    assert all(other[k] != reference[k] for k in images if "/good/" in k)


@pytest.mark.parametrize("class_name", list(CLASSES))
def test_synthetic_mask_is_exactly_the_painted_defect(class_name):
    for defect in CLASSES[class_name][1]:
        for i in range(3):
            clean, image, mask = render(class_name, np.random.default_rng([i, len(defect)]), 64, defect)
            changed = (clean != image).any(-1)
            assert mask.sum() >= 8, (class_name, defect)
            assert not (changed & ~mask).any(), "painted pixels outside the mask"
            assert changed.sum() >= 0.9 * mask.sum(), "mask covers unpainted pixels"


def test_synthetic_masks_nonempty_exactly_for_anomalous(synthetic):
    samples = collect_samples(str(synthetic), "mvtec")
    assert len(samples) == len(CLASSES) * (3 + 5)
    for s in samples:
        assert s["label"] == (0 if "/test/good/" in s["image_path"] else 1)
        if s["label"]:
            assert np.asarray(Image.open(synthetic / s["mask_path"])).any()
        else:
            assert s["mask_path"] == ""


def test_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="refusing"):
        make_synthetic(str(tmp_path))
    assert (tmp_path / "mine.txt").exists()


# --- make_metadata -----------------------------------------------------------------------------------

def test_metadata_from_synthetic_and_k_shot(synthetic, tmp_path):
    written = build_metadata("Synthetic", str(synthetic), "mvtec", str(tmp_path), shots=[2, 4], seed=111)
    out = tmp_path / "Synthetic"
    assert sorted(p.name for p in written) == ["2-shot.jsonl", "4-shot.jsonl", "full-shot.jsonl"]
    full = [json.loads(x) for x in (out / "full-shot.jsonl").read_text().splitlines()]
    assert full == sorted(full, key=lambda r: (r["class_name"], r["image_path"]))
    assert {r["mask_path"] for r in full if r["label"] == 1} == {
        r["image_path"].replace("/test/", "/ground_truth/").replace(".png", "_mask.png") for r in full if r["label"]}
    for k in (2, 4):
        few = [json.loads(x) for x in (out / f"{k}-shot.jsonl").read_text().splitlines()]
        assert {c: sum(r["class_name"] == c for r in few) for c in CLASSES} == {c: k for c in CLASSES}
        assert all(r in full for r in few)
    first = _files(out)
    build_metadata("Synthetic", str(synthetic), "mvtec", str(tmp_path), shots=[2, 4], seed=111)
    assert _files(out) == first
    assert k_shot(full, 4, seed=5) != k_shot(full, 4, seed=111)


def test_k_shot_too_few_samples_names_class(synthetic):
    samples = collect_samples(str(synthetic))
    with pytest.raises(DatasetError, match="class 'carpet' has only 8"):
        k_shot(samples, 9)


def _mvtec_tree(root: Path, mask_name: str = "{}_mask.png") -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    _png(root / "widget" / "test" / "good" / "000.png", img)
    _png(root / "widget" / "test" / "crack" / "000.png", img)
    _png(root / "widget" / "test" / "crack" / "001.png", img)
    _png(root / "widget" / "train" / "good" / "000.png", img)
    _png(root / "a_class" / "test" / "good" / "001.png", img)
    mask = np.full((8, 8), 255, np.uint8)
    for i in ("000", "001"):
        if mask_name:
            _png(root / "widget" / "ground_truth" / "crack" / mask_name.format(i), mask)


def test_metadata_mvtec_tree(tmp_path):
    _mvtec_tree(tmp_path)
    expected = [
        {"image_path": "a_class/test/good/001.png", "mask_path": "", "label": 0, "class_name": "a_class"},
        {"image_path": "widget/test/crack/000.png", "mask_path": "widget/ground_truth/crack/000_mask.png",
         "label": 1, "class_name": "widget"},
        {"image_path": "widget/test/crack/001.png", "mask_path": "widget/ground_truth/crack/001_mask.png",
         "label": 1, "class_name": "widget"},
        {"image_path": "widget/test/good/000.png", "mask_path": "", "label": 0, "class_name": "widget"},
    ]
    assert collect_samples(str(tmp_path), "mvtec") == expected
    assert detect_layout(tmp_path) == "mvtec_like"
    assert collect_samples(str(tmp_path), "auto") == expected


def test_metadata_mvtec_like_mask_names_and_no_masks(tmp_path):
    _mvtec_tree(tmp_path / "plain", mask_name="{}.png")
    masks = [s["mask_path"] for s in collect_samples(str(tmp_path / "plain"), "mvtec_like") if s["label"]]
    assert masks == ["widget/ground_truth/crack/000.png", "widget/ground_truth/crack/001.png"]
    with pytest.raises(DatasetError, match="000_mask.png"):
        collect_samples(str(tmp_path / "plain"), "mvtec")
    _mvtec_tree(tmp_path / "none", mask_name="")
    assert [s["mask_path"] for s in collect_samples(str(tmp_path / "none"), "mvtec_like")] == [""] * 4
    with pytest.raises(DatasetError, match="mvtec_like"):
        collect_samples(str(tmp_path / "none"), "mvtec")


def test_metadata_anomaly_without_mask_when_others_have_masks(tmp_path):
    _mvtec_tree(tmp_path)
    (tmp_path / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="widget/test/crack/001.png has no mask.*other anomalous images have masks"):
        collect_samples(str(tmp_path), "auto")


def test_metadata_visa_tree(tmp_path):
    img, mask = np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8)
    for rel in ("candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
                "candle/Data/Images/Anomaly/0002.JPG", "pcb1/Data/Images/Anomaly/0003.JPG"):
        _png(tmp_path / rel, img)
    for rel in ("candle/Data/Masks/Anomaly/0002.png", "pcb1/Data/Masks/Anomaly/0003.png"):
        _png(tmp_path / rel, mask)
    csv = tmp_path / "split_csv" / "1cls.csv"
    csv.parent.mkdir()
    csv.write_text("object,split,label,image,mask\n"
                   "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
                   "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
                   "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/0003.JPG,pcb1/Data/Masks/Anomaly/0003.png\n"
                   "candle,test,anomaly,candle/Data/Images/Anomaly/0002.JPG,candle/Data/Masks/Anomaly/0002.png\n")
    assert detect_layout(tmp_path) == "visa"
    assert collect_samples(str(tmp_path)) == [
        {"image_path": "candle/Data/Images/Anomaly/0002.JPG", "mask_path": "candle/Data/Masks/Anomaly/0002.png",
         "label": 1, "class_name": "candle"},
        {"image_path": "candle/Data/Images/Normal/0001.JPG", "mask_path": "", "label": 0, "class_name": "candle"},
        {"image_path": "pcb1/Data/Images/Anomaly/0003.JPG", "mask_path": "pcb1/Data/Masks/Anomaly/0003.png",
         "label": 1, "class_name": "pcb1"},
    ]
    csv.write_text(csv.read_text().replace("test,anomaly,candle", "test,broken,candle"))
    with pytest.raises(DatasetError, match=r"1cls.csv:5: label must be 'normal' or 'anomaly'"):
        collect_samples(str(tmp_path))


def test_metadata_btad_tree(tmp_path):
    img, mask = np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8)
    _png(tmp_path / "01" / "test" / "ok" / "0000.bmp", img)
    _png(tmp_path / "01" / "test" / "ko" / "0001.bmp", img)
    _png(tmp_path / "01" / "ground_truth" / "ko" / "0001.png", mask)
    _png(tmp_path / "02" / "test" / "ko" / "0002.png", img)
    _png(tmp_path / "02" / "ground_truth" / "ko" / "0002.bmp", mask)
    assert detect_layout(tmp_path) == "btad"
    assert [tuple(s.values()) for s in collect_samples(str(tmp_path))] == [
        ("01/test/ko/0001.bmp", "01/ground_truth/ko/0001.png", 1, "01"),
        ("01/test/ok/0000.bmp", "", 0, "01"),
        ("02/test/ko/0002.png", "02/ground_truth/ko/0002.bmp", 1, "02"),
    ]


def test_make_metadata_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--dataset", "X", "--root", str(tmp_path / "missing"), "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset root not found") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["--dataset", "X", "--root", str(tmp_path), "--out_dir", str(tmp_path / "m")]) == 2
    assert "no classes found" in capsys.readouterr().err


# --- loader ------------------------------------------------------------------------------------------

def _one_sample(tmp_path: Path, image: np.ndarray, mask: np.ndarray | None = None, **kw) -> ADDataset:
    _png(tmp_path / "img.png", image)
    record = {"image_path": "img.png", "label": 0, "class_name": "thing"}
    if mask is not None:
        _png(tmp_path / "mask.png", mask)
        record.update(label=1, mask_path="mask.png")
    return ADDataset(str(tmp_path), str(_jsonl(tmp_path / "meta.jsonl", [record])), **kw)


def test_loader_matches_manual_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:12, 20:33] = 7  # any nonzero value is anomalous
    item = _one_sample(tmp_path, image, mask, image_size=32)[0]
    resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC)) / 255.0
    expected = ((resized - MEAN) / STD).transpose(2, 0, 1)
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    np.testing.assert_allclose(item["image"].numpy(), expected, atol=1e-5)
    expected_mask = np.asarray(Image.fromarray(mask).resize((32, 32), Image.NEAREST)) != 0
    assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
    np.testing.assert_array_equal(item["mask"][0].numpy(), expected_mask.astype(np.float32))
    assert (item["label"], item["class_name"], item["image_path"], item["has_mask"]) == (1, "thing", "img.png", True)


def test_loader_on_synthetic_metadata(synthetic, tmp_path):
    build_metadata("Synthetic", str(synthetic), "mvtec", str(tmp_path), shots=[2])
    ds = ADDataset.from_name("Synthetic", str(synthetic), str(tmp_path), shot=None, image_size=48,
                             class_names=["disc", "nut"])
    assert ds.class_names == ["disc", "nut"] and ds.has_masks and len(ds) == 16
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert batch["image"].shape == (16, 3, 48, 48) and batch["mask"].shape == (16, 1, 48, 48)
    has_defect = batch["mask"].flatten(1).amax(1)
    assert torch.equal(has_defect, batch["label"].float()) and batch["has_mask"].all()
    assert len(ADDataset.from_name("Synthetic", str(synthetic), str(tmp_path), shot=2)) == 2 * len(CLASSES)
    with pytest.raises(DatasetError, match="8-shot.jsonl.*python -m dataset.make_metadata.*--shots 8"):
        ADDataset.from_name("Synthetic", str(synthetic), str(tmp_path), shot=8)
    with pytest.raises(DatasetError, match="'cable'"):
        ADDataset.from_name("Synthetic", str(synthetic), str(tmp_path), class_names=["cable"])


def _square_sample(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[8:30, 12:28], mask[8:30, 12:28] = 255, 255
    return image, mask


def _original_pipeline(image_path: Path, mask_path: Path, size: int, params: AugmentParams) -> torch.Tensor:
    """The original's training item built directly with torchvision (v1, as its code does): colour jitter
    on the full-size PIL image, bicubic resize, ToTensor, Normalize; mask convert("L"), nearest resize,
    != 0; then rotation / translation / flips of the stacked [4, S, S] tensor with torchvision's defaults."""
    img = Image.open(image_path).convert("RGB")
    for name, fn in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                     ("saturation", TF.adjust_saturation)):
        factor = getattr(params, name)
        if factor is not None:  # ColorJitter with a one-point range is exactly this factor
            img = T.ColorJitter(**{name: (factor, factor)})(img)
    image = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                       T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    mask = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.NEAREST), T.ToTensor()])(
        Image.open(mask_path).convert("L"))
    x = torch.cat([image, (mask != 0).float()])
    if params.angle is not None:
        x = T.RandomRotation((params.angle, params.angle))(x)
    if params.translate is not None:
        x = TF.affine(x, angle=0.0, translate=list(params.translate), scale=1.0, shear=[0.0, 0.0], fill=[0.0] * 4)
    if params.hflip:
        x = TF.hflip(x)
    if params.vflip:
        x = TF.vflip(x)
    return x


def _photo_like(tmp_path: Path) -> tuple[Path, Path]:
    """A 70x50 RGB image with texture, and its mask at twice the size in RGB with a colour whose
    luminance rounds to 0 (not anomalous under convert("L"))."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:50, 0:70]
    image = np.dstack([xx * 3, yy * 5, (xx + yy) * 2]).astype(np.uint8) + rng.integers(0, 20, (50, 70, 3), np.uint8)
    mask = np.zeros((100, 140, 3), np.uint8)
    mask[20:60, 30:90] = 255
    mask[70:90, 10:50] = (1, 0, 0)
    return _png(tmp_path / "img.png", image), _png(tmp_path / "mask.png", mask)


AUGMENTATIONS = {
    "none": AugmentParams(),
    "jitter": AugmentParams(brightness=1.37, contrast=0.61, saturation=1.45),
    "rotate": AugmentParams(angle=-23.5),
    "translate": AugmentParams(translate=(7, -4)),
    "flips": AugmentParams(hflip=True, vflip=True),
    "all": AugmentParams(brightness=0.52, contrast=1.2, saturation=0.7, angle=11.0, translate=(-6, 5), hflip=True),
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_augmentation_equals_the_original_pipeline(tmp_path, name):
    """Fixed parameters: the item equals the original's torchvision pipeline bit for bit."""
    image_path, mask_path = _photo_like(tmp_path)
    ds = ADDataset(str(tmp_path), str(_jsonl(tmp_path / "m.jsonl", [
        {"image_path": "img.png", "mask_path": "mask.png", "label": 1, "class_name": "x"}])), image_size=48)
    params = AUGMENTATIONS[name]
    item = ds.load(0, params)
    expected = _original_pipeline(image_path, mask_path, 48, params)
    assert torch.equal(item["image"], expected[:3]) and torch.equal(item["mask"], expected[3:])
    if params.angle is not None or params.translate is not None:
        # The area rotated or shifted in is 0 in normalised space: the mean colour, not black.
        corner = item["image"][:, 0, 0] if params.translate != (7, -4) else item["image"][:, -1, 0]
        assert torch.equal(corner, torch.zeros(3))


@pytest.mark.parametrize("color_jitter", [False, True])
def test_augmentation_draws_as_the_original(tmp_path, color_jitter):
    """Seeded alike, the original's random transforms and this loader give the same item: the same
    draws in the same order."""
    image_path, mask_path = _photo_like(tmp_path)
    ds = ADDataset(str(tmp_path), str(_jsonl(tmp_path / "m.jsonl", [
        {"image_path": "img.png", "mask_path": "mask.png", "label": 1, "class_name": "x"}])), image_size=48,
        augment=True, color_jitter=color_jitter)
    jitter = T.Compose([T.RandomApply([T.ColorJitter(**{k: 0.5})], p=0.7)
                        for k in ("brightness", "contrast", "saturation")])
    geometric = T.Compose([T.RandomApply([T.RandomRotation(30)], p=0.5),
                           T.RandomApply([T.RandomAffine(degrees=0, translate=(0.15, 0.15))], p=0.5),
                           T.RandomHorizontalFlip(0.5), T.RandomVerticalFlip(0.5)])
    preprocess = T.Compose([T.Resize((48, 48), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                            T.Normalize(CLIP_MEAN, CLIP_STD)])
    mask = (T.Compose([T.Resize((48, 48), interpolation=T.InterpolationMode.NEAREST), T.ToTensor()])(
        Image.open(mask_path).convert("L")) != 0).float()
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        img = Image.open(image_path).convert("RGB")
        expected = geometric(torch.cat([preprocess(jitter(img) if color_jitter else img), mask]))
        torch.manual_seed(seed)
        item = ds[0]
        assert torch.equal(item["image"], expected[:3]) and torch.equal(item["mask"], expected[3:]), seed
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        changed += not torch.equal(item["mask"], mask)
    assert changed >= 4  # p(no geometric change) = 1/16 per seed


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_mask_is_convert_L_then_nonzero(tmp_path, mode):
    """A colour mask counts where its luminance (ITU-R 601, rounded) is nonzero, as convert("L") gives,
    not wherever some channel is nonzero."""
    colours = np.array([(1, 0, 0), (0, 1, 0), (2, 0, 0), (0, 0, 4), (0, 0, 5), (255, 255, 255), (0, 0, 0)])
    rgb = colours[np.arange(16 * 16).reshape(16, 16) % len(colours)].astype(np.uint8)
    pil = Image.fromarray(rgb)
    pil = pil.convert(mode) if mode != "P" else pil.quantize(colors=len(colours), method=Image.Quantize.MAXCOVERAGE)
    pil.save(tmp_path / "mask.png")
    _png(tmp_path / "img.png", np.zeros((16, 16, 3), np.uint8))
    ds = ADDataset(str(tmp_path), str(_jsonl(tmp_path / "m.jsonl", [
        {"image_path": "img.png", "mask_path": "mask.png", "label": 1, "class_name": "x"}])), image_size=16)
    stored = np.asarray(Image.open(tmp_path / "mask.png").convert("RGB")).astype(float)
    luminance = stored @ np.array([0.299, 0.587, 0.114])
    expected = (luminance >= 0.5).astype(np.float32)
    assert 0 < expected.sum() < (stored.sum(-1) > 0).sum()  # the rule matters for this mask
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy(), expected)


def test_mask_resized_nearest_at_real_size(tmp_path):
    """A 1024 px mask to a 518 px input, against nearest indices computed by hand (the source pixel
    under each output pixel's centre; where a centre falls exactly on a pixel border, floating-point
    rounding in PIL picks the pixel before it for 1024 -> 518, which is not a rule for other sizes):
    bilinear resizing would blur the 1-px stripes."""
    rng = np.random.default_rng(2)
    mask = np.zeros((1024, 1024), np.uint8)
    mask[::2] = 255  # 1-px stripes: any averaging resampler turns them grey
    mask[300:700, 100:400] = rng.integers(0, 2, (400, 300), np.uint8) * 255
    _png(tmp_path / "mask.png", mask)
    _png(tmp_path / "img.png", np.zeros((1024, 1024, 3), np.uint8))
    ds = ADDataset(str(tmp_path), str(_jsonl(tmp_path / "m.jsonl", [
        {"image_path": "img.png", "mask_path": "mask.png", "label": 1, "class_name": "x"}])), image_size=518)
    idx = np.ceil((np.arange(518) + 0.5) * 1024 / 518).astype(int) - 1
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy(), (mask[idx][:, idx] != 0).astype(np.float32))


def test_no_augmentation_without_flag(tmp_path):
    image, mask = _square_sample(tmp_path)
    ds = _one_sample(tmp_path, image, mask, image_size=64, color_jitter=True)
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy() > 0, mask > 0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_loader_converts_image_modes(tmp_path, mode):
    gray = np.full((16, 16), 117, np.uint8)
    if mode == "I;16":
        pil = Image.fromarray(np.full((16, 16), 30000, np.uint16))  # 30000 * 255 / 65535 -> 117
    elif mode == "RGBA":
        pil = Image.fromarray(np.dstack([gray, gray, gray, np.zeros_like(gray)]), "RGBA")
    else:
        pil = Image.fromarray(gray).convert(mode)
    pil.save(tmp_path / "img.png")
    assert Image.open(tmp_path / "img.png").mode in (mode, "I")
    ds = ADDataset(str(tmp_path), str(_jsonl(tmp_path / "m.jsonl", [
        {"image_path": "img.png", "mask_path": None, "label": 0, "class_name": "x"}])), image_size=8)
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and not item["has_mask"]
    np.testing.assert_allclose(_denormalise(item["image"]), 117 / 255, atol=1e-5)


# --- errors ------------------------------------------------------------------------------------------

GOOD = {"image_path": "img.png", "mask_path": "", "label": 0, "class_name": "x"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ({"image_path": "img.png", "label": 0}, "missing key.*class_name"),
    ({**GOOD, "label": 2}, "label must be 0"),
    ({**GOOD, "label": True}, "label must be 0"),
])
def test_bad_metadata_line_names_file_and_line(tmp_path, bad, message):
    _png(tmp_path / "img.png", np.zeros((4, 4, 3), np.uint8))
    meta = _jsonl(tmp_path / "meta.jsonl", [GOOD, "", bad])
    with pytest.raises(DatasetError, match=f"{meta}:3: {message}"):
        ADDataset(str(tmp_path), str(meta))


def test_corrupted_image_names_file(tmp_path):
    _png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "img.png").read_bytes()
    (tmp_path / "img.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    ds = ADDataset(str(tmp_path), str(_jsonl(tmp_path / "m.jsonl", [GOOD, {**GOOD, "image_path": "junk.png"}])))
    for i, name in enumerate(["img.png", "junk.png"]):
        with pytest.raises(DatasetError, match=f"cannot read image {tmp_path / name}"):
            ds[i]


def test_missing_files_name_the_path(tmp_path):
    _png(tmp_path / "img.png", np.zeros((4, 4, 3), np.uint8))
    meta = _jsonl(tmp_path / "m.jsonl", [{**GOOD, "label": 1, "mask_path": "gt/img_mask.png"}])
    with pytest.raises(DatasetError, match=f"mask file not found: {tmp_path / 'gt' / 'img_mask.png'}"):
        ADDataset(str(tmp_path), str(meta))
    with pytest.raises(DatasetError, match="python -m dataset.make_metadata"):
        ADDataset(str(tmp_path), str(tmp_path / "absent.jsonl"))
    with pytest.raises(DatasetError, match="dataset root not found"):
        ADDataset(str(tmp_path / "absent"), str(meta))


# --- constants ---------------------------------------------------------------------------------------

def test_constants_and_real_names():
    assert get_real_name("MVTec", "bottle") == "dark bottle"
    assert get_real_name("VisA", "pcb1") == "dual ultrasonic distance sensor pcb module"
    assert get_real_name("MVTec", "metal_nut") == "metal nut which has four notched edges"
    assert get_real_name("MVTec", "new_part_x") == "new part x"
    assert get_real_name("Synthetic", "missing_piece") == "missing piece"
    assert get_dataset_info("Brain")["domain"] == "Medical"
    assert get_dataset_info("Synthetic") == {"domain": "Industrial", "default_root": "./data/Synthetic", "classes": {}}
    assert PROMPTS["prompt_abnormal"][0] == "a damaged {}" and set(PROMPTS) == set(load_constants()["prompts"])
    load_constants()["datasets"]["MVTec"]["classes"]["bottle"] = "changed"
    assert get_real_name("MVTec", "bottle") == "dark bottle"


def test_image_cache_gives_identical_items(tmp_path):
    """A decoded-and-resized image cached on disk reloads bit for bit, and a changed file is re-read."""
    make_synthetic(str(tmp_path / "syn"), seed=3, size=48, n_normal=1, n_anomalous=1, n_train=0, classes=["disc"])
    build_metadata("Synthetic", str(tmp_path / "syn"), layout="mvtec", out_dir=str(tmp_path / "meta"), shots=())
    meta = str(tmp_path / "meta" / "Synthetic" / "full-shot.jsonl")
    plain = ADDataset(str(tmp_path / "syn"), meta, image_size=28)
    cached = ADDataset(str(tmp_path / "syn"), meta, image_size=28, cache_dir=str(tmp_path / "cache"))
    first = [cached[i]["image"] for i in range(len(cached))]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(cached)
    for i in range(len(cached)):
        assert torch.equal(first[i], plain[i]["image"]) and torch.equal(cached[i]["image"], plain[i]["image"])
    path = tmp_path / "syn" / cached.samples[0]["image_path"]
    Image.new("RGB", (48, 48), (255, 0, 0)).save(path)
    os.utime(path, ns=(1, 10**18))
    assert torch.equal(cached[0]["image"], plain[0]["image"]) and not torch.equal(cached[0]["image"], first[0])
