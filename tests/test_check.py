"""dataset.check: every problem of a broken dataset reported at once; a clean dataset passes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import DatasetError
from dataset.check import check_all, check_dataset, main, validate_dataset
from dataset.make_metadata import build_metadata
from dataset.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def make_clean(root: Path) -> tuple[Path, Path]:
    """A synthetic dataset (2 classes x 2 normal + 3 anomalous) with full-shot and 2-shot lists."""
    data, meta = root / "syn", root / "meta"
    make_synthetic(str(data), seed=0, size=32, n_normal=2, n_anomalous=3, n_train=0, classes=["disc", "stripes"])
    build_metadata("Syn", str(data), layout="mvtec", out_dir=str(meta), shots=(2,))
    return data, meta


def read_list(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_list(path: Path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


@pytest.fixture
def broken(tmp_path) -> tuple[Path, Path, dict]:
    """The clean dataset with one problem of each kind; returns (data root, metadata dir, what was broken)."""
    data, meta = make_clean(tmp_path)
    full_path = meta / "Syn" / "full-shot.jsonl"
    full = read_list(full_path)
    anomalous = [r for r in full if r["label"] == 1]
    broken = {
        "missing_image": full[0]["image_path"],          # disc normal
        "garbage_image": full[1]["image_path"],          # disc normal
        "truncated_image": full[5]["image_path"],        # stripes normal
        "missing_mask": anomalous[0]["mask_path"],       # disc
        "small_mask": anomalous[1]["mask_path"],         # disc
        "no_mask_path": anomalous[3]["image_path"],      # stripes
    }
    (data / broken["missing_image"]).unlink()
    (data / broken["garbage_image"]).write_bytes(b"this is not a png")
    png = (data / broken["truncated_image"]).read_bytes()
    (data / broken["truncated_image"]).write_bytes(png[: len(png) // 2])
    (data / broken["missing_mask"]).unlink()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / broken["small_mask"])
    for r in full:
        if r["image_path"] == broken["no_mask_path"]:
            r["mask_path"] = ""
    lines = full + ['{"image_path": "disc/test/good/000.png", "label": 0',           # line 11: invalid JSON
                    {"image_path": "disc/test/good/000.png", "label": 0},             # line 12: no class_name
                    {"image_path": "disc/test/good/000.png", "label": 2, "class_name": "disc"}]  # line 13
    write_list(full_path, lines)
    # A 5-shot list cannot draw 5 samples of a class that has 5, plus one of a class the full list lacks.
    disc = [r for r in full if r["class_name"] == "disc"]
    write_list(meta / "Syn" / "5-shot.jsonl", disc + disc[:1] + [dict(disc[0], class_name="ghost")])
    return data, meta, broken


def test_every_problem_is_reported_with_its_file_and_line(broken):
    data, meta, b = broken
    lists, problems = check_all(data, meta, "Syn", class_names=["disc", "cable"])
    full, shot5 = meta / "Syn" / "full-shot.jsonl", meta / "Syn" / "5-shot.jsonl"
    assert [p.name for p in lists] == ["full-shot.jsonl", "2-shot.jsonl", "5-shot.jsonl"]
    found = {(p.kind, p.where, p.detail) for p in problems}

    def has(kind: str, where: str, *words: str) -> bool:
        return any(k == kind and w == where and all(x in d for x in words) for k, w, d in found)

    assert has("missing file", f"{full}:1", f"image {data / b['missing_image']} not found")
    assert has("unreadable file", f"{full}:2", str(data / b["garbage_image"]))
    assert has("missing file", f"{full}:3", f"mask {data / b['missing_mask']} not found")
    assert has("mask size", f"{full}:4", b["small_mask"], "16x16", "32x32")
    assert has("missing mask", f"{full}:8", b["no_mask_path"])
    assert has("metadata", f"{full}:11", "invalid JSON")
    assert has("metadata", f"{full}:12", "missing key(s) class_name")
    assert has("metadata", f"{full}:13", "label must be 0 (normal) or 1 (anomalous), got 2")
    assert has("class", str(full), "'cable' has no samples")
    assert has("k-shot", str(shot5), "'disc' has 6 sample(s)", "full-shot.jsonl has only 5")
    assert has("k-shot", str(shot5), "'ghost' has 1 sample(s)", "has none")
    # Header reads do not see the truncation; a bad file is reported once, not once per list.
    assert not any(b["truncated_image"] in d for _, _, d in found)
    assert len(problems) == len(found) == 13, "\n".join(map(str, problems))  # 'cable' is missing from 3 lists


def test_decode_finds_truncated_files(broken):
    data, meta, b = broken
    problems = check_dataset(data, meta / "Syn" / "full-shot.jsonl", decode=True)
    truncated = [p for p in problems if b["truncated_image"] in p]
    assert len(truncated) == 1 and truncated[0].startswith(f"{meta / 'Syn' / 'full-shot.jsonl'}:6: cannot read")


def test_cli_groups_the_report_and_exits_2(broken, capsys):
    data, meta, _ = broken
    assert main(["--dataset", "Syn", "--data_root", str(data), "--metadata_dir", str(meta)]) == 2
    out, err = capsys.readouterr()
    for heading in ("metadata (3)", "missing file (2)", "unreadable file (1)", "mask size (1)", "missing mask (1)",
                    "k-shot (2)"):
        assert f"\n{heading}: " in out, out
    assert err == "error: 9 problem(s) in dataset Syn; see the report above\n"  # the mask size is a note


def test_requested_shot_without_list_and_missing_root(tmp_path, capsys):
    data, meta = make_clean(tmp_path)
    lists, problems = check_all(data, meta, "Syn", shot=7)
    assert [str(p) for p in problems] == [f"{meta / 'Syn' / '7-shot.jsonl'}: metadata file not found"]
    lists, problems = check_all(tmp_path / "nowhere", meta, "Syn")
    assert [str(p) for p in problems] == [f"{tmp_path / 'nowhere'}: dataset root not found"]
    assert [p.kind for p in problems] == ["data root"]


def test_validate_dataset_summarises_in_one_error(broken):
    data, meta, b = broken
    with pytest.raises(DatasetError) as e:
        validate_dataset(data, meta / "Syn" / "full-shot.jsonl")
    msg = str(e.value)
    assert msg.startswith(f"7 problem(s) with {meta / 'Syn' / 'full-shot.jsonl'}")
    assert b["missing_image"] in msg and ":13: label must be" in msg
    assert f"python -m dataset.check --dataset Syn --data_root {data} --metadata_dir {meta}" in msg


def test_clean_dataset_has_no_problems(tmp_path, capsys):
    data, meta = make_clean(tmp_path)
    assert check_all(data, meta, "Syn", class_names=["disc", "stripes"], decode=True)[1] == []
    assert check_dataset(data, meta / "Syn" / "2-shot.jsonl") == []
    assert main(["--dataset", "Syn", "--data_root", str(data), "--metadata_dir", str(meta), "--decode"]) == 0
    assert "no problems" in capsys.readouterr().out


def test_real_cli(broken):
    data, meta, _ = broken
    proc = subprocess.run([sys.executable, "-m", "dataset.check", "--dataset", "Syn", "--data_root", str(data),
                           "--metadata_dir", str(meta)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 9 problem(s)") and "Traceback" not in proc.stderr + proc.stdout
    assert "unreadable file (1)" in proc.stdout


def test_mask_of_another_size_is_a_note_not_an_error(tmp_path, capsys):
    """The original resizes every mask to the input size: a differently sized mask is noted, and the
    dataset validates and loads."""
    data, meta = make_clean(tmp_path)
    full = meta / "Syn" / "full-shot.jsonl"
    record = next(r for r in read_list(full) if r["label"] == 1)
    big = np.kron(np.asarray(Image.open(data / record["mask_path"])), np.ones((3, 3), np.uint8))
    Image.fromarray(big).save(data / record["mask_path"])
    validate_dataset(data, full)
    assert check_dataset(data, full) == []
    assert main(["--dataset", "Syn", "--data_root", str(data), "--metadata_dir", str(meta)]) == 0
    out = capsys.readouterr().out
    assert "mask size (1): note, not an error" in out and "96x96" in out and "no problems (1 note(s) above)" in out
