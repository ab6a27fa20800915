"""Medical datasets (spec §8): the medad and colon layouts in make_metadata, the original's float-label
lists, the pixel-max image score and σ 1.5 / kernel 9 blur, and undefined image metrics of all-anomalous sets."""
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import test as test_script
from dataset import ADDataset, DatasetError, get_dataset_info, get_real_name, read_metadata
from dataset.check import check_all
from dataset.check import main as check_main
from dataset.common import parse_record
from dataset.make_metadata import build_metadata, collect_samples, detect_layout
from dataset.make_metadata import main as make_main
from forward_utils import anomaly_map
from metrics import METRIC_NAMES, mean_metrics, metrics_eval

SIZE = 8
# Dataset -> (layout, class name the original's lists use), written out rather than read from the constants.
MEDICAL = {
    "Brain": ("medad", "Brain"),
    "Liver": ("medad", "Liver"),
    "Retina": ("medad", "Retina"),
    "Colon_clinicDB": ("colon", "Colon_clinicDB"),
    "Colon_colonDB": ("colon", "Colon_colonDB"),
    "Colon_Kvasir": ("colon", "Kvasir"),
    "Colon_cvc300": ("colon", "CVC-300"),
}
# (image, mask, label) of each miniature, in the order the lists must have (sorted by path: "10" < "3"
# and "Ungood" < "good"). Modes: grayscale like MRI/CT slices, 16-bit, palette, and RGB.
TREES = {
    "medad": [
        ("test/Ungood/img/10.png", "test/Ungood/label/10.png", 1, "P"),
        ("test/Ungood/img/3.png", "test/Ungood/label/3.png", 1, "I;16"),
        ("test/Ungood/img/5.bmp", "test/Ungood/label/5.bmp", 1, "L"),  # mask with the image's extension
        ("test/good/img/12.png", "", 0, "RGB"),
        ("test/good/img/7.png", "", 0, "L"),
    ],
    "colon": [
        ("images/1.png", "masks/1.png", 1, "RGB"),
        ("images/10.png", "masks/10.png", 1, "L"),
        ("images/2.tif", "masks/2.png", 1, "RGB"),  # .png mask of a .tif image
    ],
}
# Files of a real BMAD tree that are no test samples: the lists must leave them out.
IGNORED = {"medad": ["train/good/0.png", "valid/Ungood/img/1.png", "test/good/label/7.png"],
           "colon": []}


def _image(mode: str, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(pixels.astype(np.uint16) * 257)
    if mode == "RGB":
        return Image.fromarray(np.dstack([pixels, pixels[::-1], pixels.T]))
    return Image.fromarray(pixels).convert(mode)


def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:5, 3:6] = 255
    return Image.fromarray(mask)


def make_tree(root: Path, layout: str) -> Path:
    """A miniature of a medad or colon dataset under `root` (see TREES); returns `root`."""
    for i, (image, mask, _, mode) in enumerate(TREES[layout]):
        _save(root / image, _image(mode, i))
        if mask:
            _save(root / mask, _mask())
    for extra in IGNORED[layout]:
        _save(root / extra, _image("L", 99))
    return root


def expected(layout: str, class_name: str) -> list[dict]:
    return [{"image_path": image, "mask_path": mask, "label": label, "class_name": class_name}
            for image, mask, label, _ in TREES[layout]]


def write_original_list(path: Path, records: list[dict]) -> None:
    """A list as the original ships it: labels as floats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**r, "label": float(r["label"])}) + "\n" for r in records))


# --- make_metadata -----------------------------------------------------------------------------------

@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("dataset", list(MEDICAL))
def test_make_metadata_builds_medical_dataset(tmp_path, dataset, explicit):
    layout, class_name = MEDICAL[dataset]
    root = make_tree(tmp_path / "data", layout)
    assert detect_layout(root) == layout
    out, chosen = tmp_path / "meta", layout if explicit else "auto"
    build_metadata(dataset, str(root), chosen, str(out), shots=(2,))
    full_text = (out / dataset / "full-shot.jsonl").read_text()
    assert [json.loads(line) for line in full_text.splitlines()] == expected(layout, class_name)
    assert '"label": 1,' in full_text and '"label": 1.0' not in full_text
    few = [json.loads(line) for line in (out / dataset / "2-shot.jsonl").read_text().splitlines()]
    assert len(few) == 2 and all(r in expected(layout, class_name) for r in few)
    assert few == sorted(few, key=lambda r: r["image_path"])
    first = {p.name: p.read_bytes() for p in (out / dataset).iterdir()}
    build_metadata(dataset, str(root), chosen, str(out), shots=(2,))
    assert {p.name: p.read_bytes() for p in (out / dataset).iterdir()} == first
    assert get_dataset_info(dataset)["domain"] == "Medical"


def test_make_metadata_cli_and_help(tmp_path, capsys):
    root = make_tree(tmp_path / "kvasir", "colon")
    assert make_main(["--dataset", "Colon_Kvasir", "--root", str(root), "--out_dir", str(tmp_path / "m"),
                      "--shots", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Kvasir\s+0\s+3$", out, re.M), out
    with pytest.raises(SystemExit):
        make_main(["--help"])
    help_text = capsys.readouterr().out
    assert "medad" in help_text and "colon" in help_text and "test/Ungood/label" in help_text


@pytest.mark.parametrize("layout", list(TREES))
def test_class_name_outside_the_constants(tmp_path, layout):
    root = make_tree(tmp_path / "my_scans", layout)
    assert collect_samples(str(root), layout, "MyScans") == expected(layout, "MyScans")
    assert collect_samples(str(root), layout) == expected(layout, "my_scans")  # no dataset: the folder's name


def test_class_named_images_stays_mvtec_like(tmp_path):
    _save(tmp_path / "images" / "test" / "good" / "0.png", _image("L", 0))
    assert detect_layout(tmp_path) == "mvtec_like"
    assert [s["class_name"] for s in collect_samples(str(tmp_path))] == ["images"]


@pytest.mark.parametrize("layout, missing, looked_for", [
    ("medad", "test/Ungood/label/3.png", ["test/Ungood/label/3.png"]),
    ("medad", "test/Ungood/label/5.bmp", ["test/Ungood/label/5.png", "test/Ungood/label/5.bmp"]),
    ("colon", "masks/2.png", ["masks/2.png", "masks/2.tif"]),
])
def test_missing_mask_names_what_was_looked_for(tmp_path, layout, missing, looked_for):
    root = make_tree(tmp_path, layout)
    (root / missing).unlink()
    image = next(image for image, mask, _, _ in TREES[layout] if mask == missing)
    looked = ", ".join(str(root / p) for p in looked_for)
    with pytest.raises(DatasetError, match=re.escape(f"anomalous image {image} has no mask (looked for {looked})")):
        collect_samples(str(root), layout, "X")


def _unexpected_folder(root: Path) -> None:
    _save(root / "test" / "bad" / "img" / "0.png", _image("L", 0))


def _no_img_folder(root: Path) -> None:
    for path in (root / "test" / "good" / "img").iterdir():
        path.rename(root / "test" / "good" / path.name)
    (root / "test" / "good" / "img").rmdir()


def _no_images(root: Path) -> None:
    for path in (root / "images").iterdir():
        path.unlink()


def _no_masks(root: Path) -> None:
    for path in (root / "masks").iterdir():
        path.unlink()


@pytest.mark.parametrize("tree, layout, damage, message", [
    ("medad", "medad", _unexpected_folder, r"unexpected folder .*test/bad in a medad tree"),
    ("medad", "medad", _no_img_folder, r"test/good/img not found: layout medad expects test/good/img/<image>"),
    ("colon", "colon", _no_images, r"no images .* found under .*: layout colon expects images/<image> and masks"),
    ("colon", "colon", _no_masks, r"but layout colon requires masks; 3 anomalous image\(s\) lack a mask"),
    ("colon", "medad", None, r"test/\{good,Ungood\}/img not found: layout medad expects"),
    ("medad", "colon", None, r"images not found: layout colon expects"),
])
def test_bad_medical_tree_says_what_is_expected(tmp_path, tree, layout, damage: Callable[[Path], None] | None,
                                                message):
    root = make_tree(tmp_path, tree)
    if damage:
        damage(root)
    with pytest.raises(DatasetError, match=message):
        collect_samples(str(root), layout, "X")


# --- the original's lists ----------------------------------------------------------------------------

@pytest.mark.parametrize("label, parsed", [(0, 0), (1, 1), (0.0, 0), (1.0, 1)])
def test_integral_labels_are_ints(label, parsed):
    record = parse_record(json.dumps({"image_path": "a.png", "label": label, "class_name": "x"}), "m:1")
    assert record["label"] == parsed and type(record["label"]) is int


@pytest.mark.parametrize("label", [True, False, "1", 0.5, 2.0, -1, None, float("nan"), float("inf")])
def test_other_labels_are_refused(label):
    line = json.dumps({"image_path": "a.png", "label": label, "class_name": "x"})
    with pytest.raises(DatasetError, match=re.escape(f"m:7: label must be 0 (normal) or 1 (anomalous), got {label!r}")):
        parse_record(line, "m:7")


@pytest.mark.parametrize("dataset", ["Brain", "Colon_Kvasir"])
def test_original_list_loads_unchanged(tmp_path, dataset):
    layout, class_name = MEDICAL[dataset]
    root, meta = make_tree(tmp_path / "data", layout), tmp_path / "meta"
    original = meta / dataset / "full-shot.jsonl"
    write_original_list(original, expected(layout, class_name))
    assert '"label": 1.0, "class_name": "' + class_name in original.read_text()
    # The list we build is the original's, up to the labels' type.
    assert read_metadata(str(original)) == collect_samples(str(root), layout, dataset)

    ds = ADDataset.from_name(dataset, str(root), str(meta), image_size=16)
    assert ds.class_names == [class_name] and ds.has_masks
    for i, (_, mask, label, _) in enumerate(TREES[layout]):
        item = ds[i]
        assert item["label"] == label and type(item["label"]) is int and item["has_mask"]
        assert item["image"].shape == (3, 16, 16) and bool(item["mask"].any()) == bool(mask)
    assert check_all(root, meta, dataset, class_names=[class_name], decode=True)[1] == []
    assert check_main(["--dataset", dataset, "--data_root", str(root), "--metadata_dir", str(meta), "--decode"]) == 0
    assert get_real_name(dataset, class_name) == {"Brain": "scan", "Colon_Kvasir": "colon endoscopy image"}[dataset]


# --- evaluation --------------------------------------------------------------------------------------

def _peaked_maps(peaks: list[float]) -> torch.Tensor:
    """[N, 4, 4] maps, 0.5 everywhere except one pixel per image at its peak."""
    maps = torch.full((len(peaks), 4, 4), 0.5)
    for i, peak in enumerate(peaks):
        maps[i, i % 4, (2 * i) % 4] = peak
    return maps


def test_medical_image_score_is_the_pixel_max():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    maps = _peaked_maps([1.0, 3.0, 5.0, 4.0, 6.0, 8.0])  # max ranks 8 of the 9 pairs right
    image_scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])  # ranks every pair wrong
    masks = maps > 3.5
    m = maps.numpy()
    peak = ((m - m.min()) / (m.max() - m.min())).reshape(6, -1).max(axis=1)
    medical = metrics_eval(maps, image_scores, labels, masks, "Medical")
    assert medical["image_auroc"] == pytest.approx(100 * roc_auc_score(labels.numpy(), peak), abs=1e-6)
    assert medical["image_auroc"] == pytest.approx(100 * 8 / 9, abs=1e-6)
    assert medical["image_ap"] == pytest.approx(100 * average_precision_score(labels.numpy(), peak), abs=1e-6)
    assert metrics_eval(maps, image_scores.flip(0), labels, masks, "Medical") == medical
    industrial = metrics_eval(maps, image_scores, labels, masks, "Industrial")
    assert industrial["image_auroc"] != pytest.approx(medical["image_auroc"], abs=1.0)


def _reference_blur(x: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """Normalised kernel x kernel Gaussian, applied after padding by reflection about the edge pixels
    (which are not repeated: torch's "reflect", what torchvision's gaussian_blur uses)."""
    d = np.arange(kernel) - kernel // 2
    g = np.exp(-0.5 * (d / sigma) ** 2)
    weights = np.outer(g, g) / np.outer(g, g).sum()
    padded = np.pad(x, kernel // 2, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel))
    return np.einsum("ijkl,kl->ij", windows, weights)


def _tokens(m: np.ndarray) -> torch.Tensor:
    """Patch features [1, H*W, 2] whose map `(100 f1 + 1 - 100 f0) / 2` under identity anchors is `m`."""
    f = np.zeros((1, m.size, 2))
    f[0, :, 1] = (2 * m.reshape(-1) - 1) / 100
    return torch.tensor(f, dtype=torch.float32)


@pytest.mark.parametrize("domain, kernel, sigma", [("Medical", 9, 1.5), ("Industrial", 7, 1.0)])
def test_anomaly_map_blur(domain, kernel, sigma):
    grid = 6  # smaller than the kernel: the reflected border reaches across the map
    levels = [np.zeros((grid, grid)), np.linspace(0, 1, grid * grid).reshape(grid, grid)]
    levels[0][0, 0], levels[0][2, 5], levels[0][3, 2] = 4.0, 2.0, 1.0  # corner, edge, inside
    anchors = torch.eye(2).expand(1, 2, 2)
    got = anomaly_map([_tokens(m) for m in levels], anchors, (grid, grid), grid, domain)[0].numpy()
    reference = sum(_reference_blur(m, kernel, sigma) for m in levels)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    other = {"Medical": (7, 1.0), "Industrial": (9, 1.5)}[domain]
    assert np.abs(got - sum(_reference_blur(m, *other) for m in levels)).max() > 1e-2


def _row(table: str, name: str) -> dict[str, str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return dict(zip(METRIC_NAMES, (cell.strip() for cell in line.strip("|").split("|")[1:])))


def test_all_anomalous_set_has_no_image_metrics(tmp_path):
    root, meta = make_tree(tmp_path / "data", "colon"), tmp_path / "meta"
    build_metadata("Colon_Kvasir", str(root), "colon", str(meta), shots=())
    ds = ADDataset.from_name("Colon_Kvasir", str(root), str(meta), image_size=SIZE)
    masks = torch.stack([ds[i]["mask"][0].bool() for i in range(len(ds))])
    maps = masks.float() + torch.rand(masks.shape, generator=torch.Generator().manual_seed(0))
    results = test_script.evaluate_classes(ds, maps, torch.rand(len(ds)), masks, "Medical")
    assert list(results) == ["Kvasir"]
    direct = metrics_eval(maps, torch.rand(len(ds)), torch.ones(len(ds)), masks, "Medical")
    for out in (results["Kvasir"], direct, mean_metrics(results)):
        assert all((out[k] is None) == k.startswith("image_") for k in METRIC_NAMES), out
    table = test_script.format_table(results, "Colon_Kvasir")
    for row in (_row(table, "Kvasir"), _row(table, "mean")):
        assert all((row[k] == "n/a") == k.startswith("image_") for k in METRIC_NAMES), row
