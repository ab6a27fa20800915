"""Check a dataset's metadata lists and files, reporting every problem at once (not only the first).

    python -m dataset.check --dataset MVTec [--data_root ./data/mvtec_ad] [--metadata_dir dataset/metadata]
                            [--shot 32] [--classes bottle cable] [--decode]

Checks <metadata_dir>/<dataset>/full-shot.jsonl and the k-shot lists: every line is a valid record, every
image and mask exists and opens, anomalous samples have a mask when the dataset has masks, and no k-shot
list holds more samples of a class than the full list. A mask of another size than its image is noted, not
an error: the loader resizes every mask to the input size (nearest), as the original does. Sizes come from
the file headers (fast); --decode decodes every file fully, which also finds truncated files. Prints a
report grouped by kind of problem, each group with its fix; exit code 2 when something is wrong (notes
alone do not count), else 0.

For the training and test scripts to run at start, on one list: `check_dataset` returns the problems as
lines, `validate_dataset` raises one DatasetError summarising them.
"""
import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from utils.argtypes import positive_int
from utils.progress import progress

from .common import RECORD_FORMAT, DatasetError, parse_record, resolve_root

SHOT_LIST = re.compile(r"(\d+)-shot\.jsonl")
MAKE_HINT = "`python -m dataset.make_metadata --dataset NAME --root DIR`"
# Report groups, in report order, each with the fix of its problems.
FIXES = {
    "missing list": f"build the lists with {MAKE_HINT} [--shots K], or pass the right --metadata_dir / --shot",
    "data root": "pass --data_root, the folder the list paths are relative to (default: the root make_metadata "
                 "recorded in <metadata_dir>/<dataset>/root.json, else the dataset's default_root in "
                 "dataset/constants.json)",
    "metadata": f"{RECORD_FORMAT}: fix or delete bad lines, or (re)build the lists with {MAKE_HINT} [--shots K]",
    "missing file": "check --data_root (list paths are relative to it) and restore the file, or rebuild with "
                    f"{MAKE_HINT}",
    "unreadable file": "the file is corrupted or truncated (an interrupted copy or extraction?): copy it again, "
                       "or delete its line",
    "mask size": "note, not an error: the mask is resized to the input size (nearest), as the original does; "
                 "check the pair if its sizes should match",
    "missing mask": "this dataset has pixel masks, so every anomalous sample needs one: add its mask_path, or "
                    f"rebuild with {MAKE_HINT}",
    "class": f"pass classes the list has, or rebuild with {MAKE_HINT} on a folder that has them",
    "k-shot": f"k-shot lists are drawn from the full list: rebuild both with {MAKE_HINT} --shots K",
}
FILE_KINDS = ("data root", "missing file", "unreadable file", "mask size", "missing mask")
NOTES = ("mask size",)  # reported, but not problems: training and testing handle them
# What PIL raises for a file that is not (or no longer) an image it can read.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class Problem(NamedTuple):
    kind: str  # a key of FIXES
    where: str  # the file, or list:line, at fault
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"

    @property
    def is_note(self) -> bool:
        return self.kind in NOTES


def read_size(path: str | Path, decode: bool = False) -> tuple[int, int]:
    """(width, height) of an image file from its header, or after decoding it fully with `decode`.
    Raises FileNotFoundError, or DatasetError when PIL cannot read the file."""
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
            return img.size
    except FileNotFoundError:
        raise
    except UNREADABLE as e:
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def _read_list(path: Path) -> tuple[list[tuple[str, dict]], list[Problem]]:
    """The valid records of a .jsonl list, each with its `list:line`, and a problem per bad line."""
    try:
        # split("\n") numbers lines as read_metadata does (splitlines would also split on \r, \f, ...).
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        return [], [Problem("missing list", str(path), "metadata file not found")]
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem("metadata", str(path), f"cannot read the list ({e})")]
    rows, problems = [], []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path}:{n}"
            try:
                rows.append((where, parse_record(line, where)))
            except DatasetError as e:
                detail = str(e).removeprefix(f"{where}: ").removesuffix(f"; {RECORD_FORMAT}")
                problems.append(Problem("metadata", where, detail))
    if not rows and not problems:
        problems.append(Problem("metadata", str(path), "the list has no samples"))
    return rows, problems


def _size(path: Path, role: str, where: str, decode: bool, problems: list[Problem]) -> tuple[int, int] | None:
    """The size of an image or mask file (`role`); None, with a problem added, when it is missing or unreadable."""
    try:
        return read_size(path, decode)
    except FileNotFoundError:
        problems.append(Problem("missing file", where, f"{role} {path} not found"))
    except DatasetError as e:
        problems.append(Problem("unreadable file", where, str(e)))
    return None


def _file_problems(root: Path, rows: list[tuple[str, dict]], decode: bool) -> list[Problem]:
    has_masks = any(r["mask_path"] for _, r in rows)
    problems: list[Problem] = []
    for where, r in progress(rows, "checking files"):
        image = _size(root / r["image_path"], "image", where, decode, problems)
        if r["mask_path"]:
            mask = _size(root / r["mask_path"], "mask", where, decode, problems)
            if image and mask and image != mask:
                problems.append(Problem("mask size", where, f"mask {r['mask_path']} is {mask[0]}x{mask[1]} but "
                                                            f"image {r['image_path']} is {image[0]}x{image[1]}"))
        elif r["label"] == 1 and has_masks:
            problems.append(Problem("missing mask", where, f"anomalous sample {r['image_path']} has no mask_path, "
                                                           "but other samples of the list have masks"))
    return problems


def _shot_problems(path: Path, rows: list[tuple[str, dict]]) -> list[Problem]:
    """Classes of a k-shot list with more samples than the full list next to it has."""
    full_path = path.with_name("full-shot.jsonl")
    if not full_path.is_file():
        return []  # nothing to compare with; check_all reports the missing full list
    full = Counter(r["class_name"] for _, r in _read_list(full_path)[0])
    shot = Counter(r["class_name"] for _, r in rows)
    return [Problem("k-shot", str(path), f"class {c!r} has {n} sample(s), but {full_path.name} has "
                                         f"{f'only {full[c]}' if full[c] else 'none'}")
            for c, n in sorted(shot.items()) if n > full[c]]


def find_problems(root: str | Path, metadata_path: str | Path, class_names: Sequence[str] = (),
                  decode: bool = False) -> list[Problem]:
    """Every problem of one metadata list and its files (see the module docstring); each of
    `class_names` must have samples in the list."""
    root, path = Path(root), Path(metadata_path)
    rows, problems = _read_list(path)
    if not root.is_dir():
        problems.append(Problem("data root", str(root), "dataset root not found"))
    elif rows:
        problems += _file_problems(root, rows, decode)
    if rows:
        present = {r["class_name"] for _, r in rows}
        problems += [Problem("class", str(path), f"class {c!r} has no samples; the list has {sorted(present)}")
                     for c in class_names if c not in present]
    if SHOT_LIST.fullmatch(path.name):
        problems += _shot_problems(path, rows)
    return problems


def check_dataset(root: str | Path, metadata_path: str | Path, class_names: Sequence[str] = (),
                  decode: bool = False) -> list[str]:
    """The problems of one metadata list and its files, as `list:line: what is wrong` lines; [] if none
    (notes are left out)."""
    return [str(p) for p in find_problems(root, metadata_path, class_names, decode) if not p.is_note]


def format_report(problems: Sequence[Problem], limit: int | None = None) -> str:
    """The problems grouped by kind, each group headed by its count and fix; `limit` lines per group."""
    lines = []
    for kind, fix in FIXES.items():
        group = [p for p in problems if p.kind == kind]
        if group:
            lines.append(f"{kind} ({len(group)}): {fix}")
            lines += [f"  {p}" for p in group[:limit]]
            if limit is not None and len(group) > limit:
                lines.append(f"  ... and {len(group) - limit} more")
    return "\n".join(lines)


def validate_dataset(root: str | Path, metadata_path: str | Path, class_names: Sequence[str] = (),
                     decode: bool = False) -> None:
    """`find_problems`, raising one DatasetError that summarises them (5 per kind); notes pass."""
    problems = [p for p in find_problems(root, metadata_path, class_names, decode) if not p.is_note]
    if problems:
        path = Path(metadata_path)
        raise DatasetError(
            f"{len(problems)} problem(s) with {path} (data root {root}):\n{format_report(problems, limit=5)}\n"
            f"full report: python -m dataset.check --dataset {path.parent.name} --data_root {root} "
            f"--metadata_dir {path.parent.parent}")


def check_all(root: str | Path, metadata_dir: str | Path, dataset: str, shot: int | None = None,
              class_names: Sequence[str] = (), decode: bool = False) -> tuple[list[Path], list[Problem]]:
    """The lists of a dataset (full-shot.jsonl, and `<shot>-shot.jsonl` or else every k-shot list there)
    and all their problems, each reported once."""
    folder = Path(metadata_dir) / dataset
    if shot is not None:
        shots = [folder / f"{shot}-shot.jsonl"]
    else:
        found = [(int(m.group(1)), p) for p in folder.glob("*-shot.jsonl") if (m := SHOT_LIST.fullmatch(p.name))]
        shots = [p for _, p in sorted(found)]
    lists = [folder / "full-shot.jsonl", *shots]
    problems, seen = [], set()
    for problem in (p for path in lists for p in find_problems(root, path, class_names, decode)):
        # A file (or the root) shared by several lists is reported once, at its first line.
        key = problem.detail if problem.kind in FILE_KINDS else problem
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return lists, problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="name of the metadata folder, e.g. MVTec, VisA")
    parser.add_argument("--data_root", default=None,
                        help="folder the list paths are relative to (default: the root make_metadata recorded in "
                             "<metadata_dir>/<dataset>/root.json, else the dataset's default root)")
    parser.add_argument("--metadata_dir", default="dataset/metadata",
                        help="folder holding <dataset>/full-shot.jsonl and <k>-shot.jsonl (default: %(default)s)")
    parser.add_argument("--shot", type=positive_int, default=None,
                        help="check <shot>-shot.jsonl, which must exist (default: every k-shot list found)")
    parser.add_argument("--classes", nargs="+", default=(),
                        help="classes that must have samples in every checked list (default: no requirement)")
    parser.add_argument("--decode", action="store_true",
                        help="decode every image and mask fully (slow; finds truncated files) instead of "
                             "reading headers only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = resolve_root(args.data_root, args.metadata_dir, args.dataset)
    except DatasetError as e:  # a recorded root that is gone, or an unreadable root.json
        print(f"error: {e}", file=sys.stderr)
        return 2
    lists, problems = check_all(root, args.metadata_dir, args.dataset, args.shot, args.classes, args.decode)
    names = ", ".join(p.name for p in lists)
    errors = [p for p in problems if not p.is_note]
    if problems:
        print(f"dataset {args.dataset} (root {root}; lists {names} in {lists[0].parent}):")
        print(format_report(problems))
    if errors:
        print(f"error: {len(errors)} problem(s) in dataset {args.dataset}; see the report above", file=sys.stderr)
        return 2
    notes = f" ({len(problems)} note(s) above)" if problems else ""
    print(f"dataset {args.dataset} (root {root}): {names} {'decoded' if args.decode else 'checked'}, "
          f"no problems{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
