"""Build <out_dir>/<NAME>/full-shot.jsonl (every test-split sample) and <k>-shot.jsonl lists from a dataset
folder, and record the folder in <out_dir>/<NAME>/root.json: train.py, test.py, ... then find it without
--data_root.

    python -m dataset.make_metadata --dataset MVTec --root ./data/mvtec_ad [--layout auto] [--shots 8 16 32]
    python -m dataset.make_metadata --dataset Colon_Kvasir      # root: the recorded one, else the default

A shot count larger than the smallest class is skipped with a warning that names the class; the other
lists are still written (exit code 0).

Layouts (--layout auto detects them in this order):
  visa        split_csv/1cls.csv with columns object, split, label, image, mask
  medad       Brain, Liver, Retina (BMAD): test/good/img/<id> (normal), test/Ungood/img/<id> (anomalous),
              masks test/Ungood/label/<id>
  btad        <class>/test/{ok,ko}/<id>, masks <class>/ground_truth/ko/<id>.png or .bmp
  colon       polyp sets (Colon_clinicDB, Colon_colonDB, Colon_Kvasir, Colon_cvc300): images/<id>, masks
              masks/<id>, every image anomalous
  mvtec_like  <class>/test/<defect or good>/<id>, masks <class>/ground_truth/<defect>/<id>[_mask] (optional)
  mvtec       (explicit only) MVTec AD / MPDD: as mvtec_like, masks <id>_mask.png required
Medical masks are <id> with the image's extension or .png. The medical layouts hold one class: the
constants' class of the dataset (Colon_Kvasir -> Kvasir), or the dataset name when it has none there.
"""
import argparse
import csv
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError

from .common import DatasetError, get_dataset_info, record_root, resolve_root, root_file

LAYOUTS = ("auto", "mvtec", "visa", "btad", "mvtec_like", "medad", "colon")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VISA_CSV = "split_csv/1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
DEFAULT_SHOTS = (8, 16, 32)
DEFAULT_SEED = 111
MEDAD_LABELS = {"good": 0, "Ungood": 1}  # folder under test/ -> label
# What a medical layout's folders must look like, for the error messages.
MEDICAL_TREES = {"medad": "test/good/img/<image>, test/Ungood/img/<image> and masks test/Ungood/label/<image>",
                 "colon": "images/<image> and masks masks/<image>"}
# What --layout auto looks for, for the message when nothing matches.
KNOWN_LAYOUTS = ("visa (split_csv/1cls.csv), medad (test/good/img/ or test/Ungood/img/), btad (<class>/test/ok/ "
                 "and ko/), colon (images/ holding images), mvtec_like (<class>/test/<defect or good>/)")


def record(image_path: str, mask_path: str, label: int, class_name: str) -> dict:
    """One metadata line; the key order is fixed so the output is byte-for-byte deterministic."""
    return {"image_path": image_path, "mask_path": mask_path, "label": label, "class_name": class_name}


def detect_layout(root: Path) -> str:
    """visa if split_csv/1cls.csv exists, medad if test/good/img or test/Ungood/img does, btad if some
    <class>/test has ok/ko folders, colon if images/ holds image files, else mvtec_like."""
    if (root / VISA_CSV).is_file():
        return "visa"
    if any((root / "test" / name / "img").is_dir() for name in MEDAD_LABELS):
        return "medad"
    if any((d / "ok").is_dir() or (d / "ko").is_dir() for d in root.glob("*/test")):
        return "btad"
    # Image files, not only a folder: an mvtec_like class may be called "images" (images/test/...).
    if (root / "images").is_dir() and _images(root / "images"):
        return "colon"
    return "mvtec_like"


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _class_dirs(root: Path) -> list[Path]:
    """The class folders of an MVTec-like or BTAD tree: those with a test/ folder."""
    return [d for d in _subdirs(root) if (d / "test").is_dir()]


def _root_fix(root: Path, fix: str) -> str:
    """`fix`, unless `root` is one class folder (the commonest wrong --root of an MVTec-like set)."""
    if (root / "test").is_dir():
        return f"{root} holds test/ itself, as one class folder does: pass the folder above it as --root"
    return fix


def _check_root(root: Path) -> None:
    """Clear errors for a --root that is missing, a file, or empty (hidden files do not count)."""
    if root.is_file():
        raise DatasetError(f"dataset root {root} is a file, not a folder; pass the dataset's folder as --root")
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}; download/extract the dataset there or pass --root DIR")
    if all(p.name.startswith(".") for p in root.iterdir()):
        raise DatasetError(f"dataset root {root} is empty (no classes found); download/extract the dataset there "
                           "or pass the right --root")


def _mask_candidates(gt_dir: Path, image: Path, layout: str) -> list[Path]:
    if layout == "mvtec":
        return [gt_dir / f"{image.stem}_mask.png"]
    if layout == "btad":
        return [gt_dir / f"{image.stem}.png", gt_dir / f"{image.stem}.bmp"]
    exts = dict.fromkeys([".png", image.suffix])  # ordered, de-duplicated
    suffixes = ("_mask", "") if layout == "mvtec_like" else ("",)  # medical masks share the image's stem
    return [gt_dir / f"{image.stem}{suffix}{ext}" for suffix in suffixes for ext in exts]


def _find_mask(root: Path, gt_dir: Path, image: Path, layout: str, tried: dict[str, list[Path]]) -> str:
    """The mask of an anomalous image relative to root, or "" with the candidates recorded in `tried`."""
    candidates = _mask_candidates(gt_dir, image, layout)
    found = [c for c in candidates if c.is_file()]
    if not found:
        tried[image.relative_to(root).as_posix()] = candidates
    return found[0].relative_to(root).as_posix() if found else ""


def _collect_folders(root: Path, layout: str) -> tuple[list[dict], dict[str, list[Path]]]:
    """MVTec/MPDD, mvtec_like and BTAD trees: <class>/test/<defect>/<img>, masks in <class>/ground_truth/<defect>/.

    Returns the records (mask_path "" where no mask was found) and, per unmasked anomalous image, the
    mask paths that were tried (for the error message).
    """
    normal = ("ok",) if layout == "btad" else ("good",)
    classes = _class_dirs(root)
    if not classes:
        raise DatasetError(f"no classes found under {root} for layout {layout}: expected "
                           f"<class>/test/<{'ok|ko' if layout == 'btad' else 'defect or good'}>/<image> folders; "
                           f"{_root_fix(root, 'check --root and --layout')}")
    records, tried = [], {}
    for cls in classes:
        n_before = len(records)
        for defect in _subdirs(cls / "test"):
            if layout == "btad" and defect.name not in ("ok", "ko"):
                raise DatasetError(f"unexpected folder {defect} in a BTAD tree: only ok/ and ko/ are allowed")
            label = 0 if defect.name in normal else 1
            for image in _images(defect):
                mask = _find_mask(root, cls / "ground_truth" / defect.name, image, layout, tried) if label else ""
                records.append(record(image.relative_to(root).as_posix(), mask, label, cls.name))
        if len(records) == n_before:
            raise DatasetError(f"no test images ({'/'.join(IMAGE_EXTS)}) found in {cls / 'test'}; "
                               "remove the folder or check --layout")
    return records, tried


def medical_class_name(dataset: str) -> str:
    """The class of a one-class medical dataset: its only class in the constants (Colon_Kvasir -> Kvasir),
    so that lists match the original's; else the dataset name."""
    classes = list(get_dataset_info(dataset)["classes"])
    return classes[0] if len(classes) == 1 else dataset


def _medical_folders(root: Path, layout: str) -> list[tuple[Path, Path, int]]:
    """(image folder, mask folder, label) of each part of a medad or colon tree."""
    if layout == "colon":
        folders = [(root / "images", root / "masks", 1)]
    else:
        parts = _subdirs(root / "test") if (root / "test").is_dir() else []
        for part in parts:
            if part.name not in MEDAD_LABELS:
                raise DatasetError(f"unexpected folder {part} in a medad tree: only test/good/ and test/Ungood/ "
                                   "are allowed; move it out of test/")
        folders = [(part / "img", part / "label", MEDAD_LABELS[part.name]) for part in parts]
    missing = [images for images, _, _ in folders if not images.is_dir()]
    if not folders or missing:
        where = missing[0] if missing else root / "test" / "{good,Ungood}" / "img"
        raise DatasetError(f"{where} not found: layout {layout} expects {MEDICAL_TREES[layout]}; "
                           "check --root and --layout")
    return folders


def _collect_medical(root: Path, layout: str, class_name: str) -> tuple[list[dict], dict[str, list[Path]]]:
    """One-class medical trees (medad, colon); normal images get no mask."""
    records, tried = [], {}
    for images, masks, label in _medical_folders(root, layout):
        for image in _images(images):
            mask = _find_mask(root, masks, image, layout, tried) if label else ""
            records.append(record(image.relative_to(root).as_posix(), mask, label, class_name))
    if not records:
        raise DatasetError(f"no images ({'/'.join(IMAGE_EXTS)}) found under {root}: layout {layout} expects "
                           f"{MEDICAL_TREES[layout]}; check --root and --layout")
    return records, tried


def _collect_visa(root: Path) -> tuple[list[dict], dict[str, list[Path]]]:
    """VisA: test rows of split_csv/1cls.csv (columns object, split, label, image, mask; paths relative to root)."""
    csv_path = root / VISA_CSV
    records, tried = [], {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                               f"the header must contain {', '.join(VISA_COLUMNS)}")
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            if row["split"].strip() != "test":
                continue
            label = {"normal": 0, "anomaly": 1}.get(row["label"].strip())
            if label is None:
                raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', got {row['label']!r}")
            image, mask = row["image"].strip(), row["mask"].strip() if label == 1 else ""
            for rel in filter(None, (image, mask)):
                if not (root / rel).is_file():
                    raise DatasetError(f"{where}: file not found: {root / rel}; check --root (paths in the csv are "
                                       "relative to the dataset root)")
            if label == 1 and not mask:
                tried[image] = []
            records.append(record(image, mask, label, row["object"].strip()))
    if not records:
        raise DatasetError(f"{csv_path}: no rows with split 'test'; the zero-shot lists use the test split")
    return records, tried


def _check_masks(records: list[dict], tried: dict[str, list[Path]], layout: str) -> None:
    """Either every anomalous image has a mask, or (mvtec_like/visa only) none has."""
    if not tried:
        return
    n_anomalous = sum(r["label"] for r in records)
    if layout in ("mvtec_like", "visa") and len(tried) == n_anomalous:
        return  # a dataset without pixel annotations: mask_path stays ""
    image, candidates = next(iter(tried.items()))
    looked = f" (looked for {', '.join(map(str, candidates))})" if candidates else ""
    # mvtec_like reads MVTec-style trees only: no use suggesting it for a medical tree.
    fallback = "" if layout in MEDICAL_TREES else "; use --layout mvtec_like for a dataset without masks"
    why = ("other anomalous images have masks" if len(tried) < n_anomalous
           else f"layout {layout} requires masks{fallback}")
    raise DatasetError(f"anomalous image {image} has no mask{looked}, but {why}; "
                       f"{len(tried)} anomalous image(s) lack a mask: add the masks or remove those images")


def collect_samples(root: str, layout: str = "auto", dataset: str | None = None) -> list[dict]:
    """All test-split samples under `root`, sorted by (class_name, image_path). The one-class medical
    layouts name their class after `dataset` (see `medical_class_name`), by default the root's folder name."""
    root_path = Path(root)
    _check_root(root_path)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root_path)
        # mvtec_like is what detection falls back to, not a match: without class folders nothing matched.
        if layout == "mvtec_like" and not _class_dirs(root_path):
            raise DatasetError(f"no classes found under {root_path}: it matches none of the layouts "
                               f"{KNOWN_LAYOUTS}; {_root_fix(root_path, 'check --root, or pass --layout')}")
    if layout == "visa":
        if not (root_path / VISA_CSV).is_file():
            raise DatasetError(f"{root_path / VISA_CSV} not found; a VisA root contains split_csv/1cls.csv")
        records, tried = _collect_visa(root_path)
    elif layout in MEDICAL_TREES:
        records, tried = _collect_medical(root_path, layout, medical_class_name(dataset or root_path.resolve().name))
    else:
        records, tried = _collect_folders(root_path, layout)
    _check_masks(records, tried, layout)
    return sorted(records, key=lambda r: (r["class_name"], r["image_path"]))


def shot_shortfall(samples: list[dict], k: int) -> str | None:
    """Why no k-shot list can be drawn from `samples`, naming the smallest class (the first by name among
    equals); None when every class has at least k samples."""
    counts = Counter(s["class_name"] for s in samples)
    small = sorted((n, cls) for cls, n in counts.items() if n < k)
    if not small:
        return None
    n, cls = small[0]
    others = len(small) - 1
    more = "" if not others else ", as has 1 other class" if others == 1 else f", as have {others} other classes"
    return f"class {cls!r} has only {n} test images, fewer than {k}{more}; at most {n} shots fit every class"


def k_shot(samples: list[dict], k: int, seed: int = DEFAULT_SEED) -> list[dict]:
    """k samples per class drawn with random.Random(seed), classes in sorted order, output sorted."""
    if k < 1:
        raise DatasetError(f"shot count must be >= 1, got {k}")
    shortfall = shot_shortfall(samples, k)
    if shortfall:
        raise DatasetError(f"{shortfall}; drop that shot count from --shots")
    rng = random.Random(seed)
    chosen = []
    for cls in sorted({s["class_name"] for s in samples}):
        pool = [s for s in samples if s["class_name"] == cls]
        chosen += sorted(rng.sample(pool, k), key=lambda s: s["image_path"])
    return chosen


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_lists(dataset: str, root: str, full: list[dict], out_dir: str, shots: Sequence[int],
                seed: int = DEFAULT_SEED) -> dict[Path, list[dict]]:
    """Write full-shot.jsonl and <k>-shot.jsonl (drawn from `full`) under <out_dir>/<dataset>/ and record
    `root` beside them; returns {path: records}."""
    # Draw every k-shot list before writing anything so a failing k leaves no partial output.
    lists = {"full-shot.jsonl": full} | {f"{k}-shot.jsonl": k_shot(full, k, seed) for k in shots}
    folder = Path(out_dir) / dataset
    written = {}
    try:
        for name, records in lists.items():
            write_jsonl(folder / name, records)
            written[folder / name] = records
        record_root(out_dir, dataset, root)  # last, so that it is only recorded with complete lists
    except OSError as e:
        raise DatasetError(f"cannot write the lists to {folder} ({e.strerror or e}); choose a writable output "
                           "folder") from None
    return written


def build_metadata(dataset: str, root: str, layout: str = "auto", out_dir: str = "dataset/metadata",
                   shots: Sequence[int] = DEFAULT_SHOTS, seed: int = DEFAULT_SEED) -> dict[Path, list[dict]]:
    """`write_lists` of the samples under `root`; every shot count must fit every class."""
    return write_lists(dataset, root, collect_samples(root, layout, dataset), out_dir, shots, seed)


def summarize(samples: list[dict]) -> str:
    """Per-class normal/anomalous counts as a text table."""
    normal = Counter(s["class_name"] for s in samples if s["label"] == 0)
    anomalous = Counter(s["class_name"] for s in samples if s["label"] == 1)
    classes = sorted(normal.keys() | anomalous.keys())
    width = max(len("class"), *map(len, classes))
    lines = [f"{'class':<{width}}  normal  anomalous"]
    lines += [f"{c:<{width}}  {normal[c]:>6}  {anomalous[c]:>9}" for c in classes]
    lines.append(f"{'total':<{width}}  {sum(normal.values()):>6}  {sum(anomalous.values()):>9}")
    return "\n".join(lines)


def report(written: dict[Path, list[dict]]) -> None:
    full = next(iter(written.values()))
    print(summarize(full))
    for path, records in written.items():
        print(f"wrote {path} ({len(records)} samples)")


def _dataset_name(text: str) -> str:
    """argparse type of --dataset: it names a folder inside --out_dir, so it must not be a path."""
    if text in ("", ".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"expected a folder name such as MVTec, got {text!r}")
    return text


def _shot_count(text: str) -> int:
    """argparse type of --shots: a whole number >= 1."""
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"shot counts are whole numbers >= 1, got {text!r}")
    return k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=_dataset_name,
                        help="name of the metadata folder, e.g. MVTec, VisA; later commands take the same "
                             "--dataset (required)")
    parser.add_argument("--root",
                        help="dataset folder; recorded in <out_dir>/<dataset>/root.json for later commands (default: "
                             "the root recorded by an earlier run, else the dataset's default root in "
                             "dataset/constants.json)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="folder layout, see above (default: auto, detected from the folder)")
    parser.add_argument("--out_dir", default="dataset/metadata",
                        help="where <dataset>/full-shot.jsonl, <dataset>/<k>-shot.jsonl and <dataset>/root.json "
                             "go; later commands read it as --metadata_dir (default: %(default)s)")
    parser.add_argument("--shots", type=_shot_count, nargs="*", default=list(DEFAULT_SHOTS), metavar="K",
                        help="write a <k>-shot.jsonl list (k samples per class) for each; a count larger than "
                             "the smallest class is skipped with a warning; --shots alone writes none (default: "
                             f"{' '.join(map(str, DEFAULT_SHOTS))})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the k-shot draws (default: %(default)s)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error instead of one error line; AACLIP_DEBUG=1 does "
                             "the same (default: off)")
    return parser


def _remove_stale(path: Path) -> str:
    """Delete the list of a skipped shot count left by an earlier run: drawn from another full list, it no
    longer matches the new one. Returns what the warning adds."""
    if not path.is_file():
        return ""
    path.unlink()
    return f"; deleted the {path.name} of an earlier run, drawn from another full list"


def run(args: argparse.Namespace) -> None:
    """Write the lists whose shot counts fit every class and record the root; warn of each skipped count."""
    root = resolve_root(args.root, args.out_dir, args.dataset)
    full = collect_samples(root, args.layout, args.dataset)
    shots = list(dict.fromkeys(args.shots))  # a repeated count would draw and write the same list twice
    skipped = {k: why for k in shots if (why := shot_shortfall(full, k))}
    written = write_lists(args.dataset, root, full, args.out_dir, [k for k in shots if k not in skipped], args.seed)
    report(written)
    print(f"recorded the dataset root in {root_file(args.out_dir, args.dataset)}: later commands with "
          f"--dataset {args.dataset} --metadata_dir {args.out_dir} need no --data_root")
    for k, why in skipped.items():
        stale = _remove_stale(Path(args.out_dir) / args.dataset / f"{k}-shot.jsonl")
        print(f"warning: skipped {k}-shot.jsonl: {why}{stale}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        # What cli.cli_main does for the training scripts; importing it would load torch into this fast tool.
        if args.debug or os.environ.get("AACLIP_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
